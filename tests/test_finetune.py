"""Tests of fine-tuning (train/finetune.py, instruct.py, evals.py, the masked loss of
steps.py): masks, multiple-choice scores and greedy generation against float64 NumPy
references on the model's own logits, and a tiny run from one of our checkpoints that
resumes exactly."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from models.config import LlamaConfig
from models.llama import Llama
from models.lowrank import pure_dict
from train import data, evals, finetune, instruct, steps
from train.checkpoint import Checkpointer
from tests.compile_cache import compilation_cache

CFG = LlamaConfig.tiny(num_layers=2, d_model=32, d_ff=64, num_heads=2, num_kv_heads=1,
                       max_seq_len=24)
TOK = data.ByteTokenizer()
TOK.bos_id = None  # as train.finetune reads our byte-level checkpoints


@pytest.fixture(scope="module")
def model():
  """(graphdef, params, logits(tokens) → float64 NumPy logits of each row alone)."""
  m = Llama(CFG, rngs=nnx.Rngs(params=jax.random.key(3)))
  graphdef, state = nnx.split(m)
  params = pure_dict(nnx.state(m, nnx.Param))
  forward = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))
  fill = np.random.default_rng(9)

  def logits(tokens):
    """The logits of a prefix, run at the one compiled length: random tokens after it
    (which causal attention must ignore; different ones on every call)."""
    padded = fill.integers(0, 256, CFG.max_seq_len).astype(np.int32)
    padded[:len(tokens)] = tokens
    out = np.asarray(forward(params, jnp.asarray(padded)[None]), np.float64)[0]
    return out[:len(tokens)]
  return graphdef, params, logits


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_records_become_tokens_and_completion_masks():
  tokens, mask = instruct.example({"prompt": "ab", "completion": "cd"}, TOK, "f:1")
  np.testing.assert_array_equal(tokens, [97, 98, 99, 100, TOK.eos_id])
  np.testing.assert_array_equal(mask, [0, 0, 1, 1, 1])
  chat = {"messages": [{"role": "user", "content": "x"},
                       {"role": "assistant", "content": "y"},
                       {"role": "user", "content": "z"}]}
  tokens, mask = instruct.example(chat, TOK, "f:1")
  assert TOK.decode(tokens) == "user: x\nassistant: y\nuser: z\n"
  trained = "".join(chr(t) for t, m in zip(tokens, mask) if m and t < 256)
  assert trained == "y\n" and not mask[-1]  # the chat ends with the user: no eos loss
  # padding: one example per row, right-padded, masks shifted onto the predicted tokens
  ex = [(np.array([1, 2, 3]), np.array([0, 1, 1], bool)),
        (np.array([4, 5, 6, 7, 8, 9]), np.array([0, 0, 0, 0, 1, 1], bool))]
  rows = instruct.pad_rows(ex, 4, pad_id=0)
  np.testing.assert_array_equal(rows.tokens, [[1, 2, 3, 0, 0], [5, 6, 7, 8, 9]])
  np.testing.assert_array_equal(rows.mask, [[1, 1, 0, 0], [0, 0, 1, 1]])
  assert rows.truncated == 1  # cut from the left: the completion survives
  # packing: joined, rows of 5 overlapping by one, the last one padded
  rows = instruct.pack_rows(ex, 4, pad_id=0)
  np.testing.assert_array_equal(rows.tokens, [[1, 2, 3, 4, 5], [5, 6, 7, 8, 9]])
  np.testing.assert_array_equal(rows.mask, [[1, 1, 0, 0], [0, 0, 1, 1]])
  rows = instruct.pack_rows(ex[:1] * 3, 4, pad_id=0)  # 9 tokens: 2 rows, 1 pad
  np.testing.assert_array_equal(rows.tokens, [[1, 2, 3, 1, 2], [2, 3, 1, 2, 3]])
  np.testing.assert_array_equal(rows.mask, [[1, 1, 0, 1], [1, 0, 1, 1]])


def test_masked_train_loss_and_gradient_are_the_mean_over_completion_tokens(model):
  """Two micro-batches with very different numbers of completion tokens: the step's
  loss is the float64 NumPy masked cross-entropy of the same logits over the whole
  batch, and its gradient that of one masked mean over the whole batch."""
  graphdef, params, logits = model
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 256, (4, CFG.max_seq_len + 1)).astype(np.int32)
  mask = np.zeros((4, CFG.max_seq_len), np.float32)
  mask[0, 3:] = 1.0  # micro-batch 0: 21 + 1 tokens, micro-batch 1: 2 + 1
  mask[1, 20:21] = mask[2, 5:7] = mask[3, 0] = 1.0
  ref = []
  for t, m in zip(tokens, mask):
    lp = _log_softmax(logits(t[:-1]))
    ref.append(-lp[np.arange(len(m)), t[1:]] * m)
  expected = np.sum(ref) / mask.sum()
  record = optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p),
                                        lambda g, s, p=None: (g, g))
  step = jax.jit(steps.make_train_step(graphdef, record))
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": record.init(params)}
  batch = steps.masked_batch(tokens.reshape(2, 2, -1), mask.reshape(2, 2, -1))
  new, metrics = step(state, batch)
  np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=2e-6)
  # negative controls, far outside that tolerance: the mean of the micro-batch means
  # (equal weights), the mean of the rows' means, the mean over every token
  halves = [np.sum(ref[:2]) / mask[:2].sum(), np.sum(ref[2:]) / mask[2:].sum()]
  rows = [r[m > 0].mean() for r, m in zip(ref, mask)]
  unmasked = np.mean([-_log_softmax(logits(t[:-1]))[np.arange(len(t) - 1), t[1:]]
                      for t in tokens])
  for wrong in (np.mean(halves), np.mean(rows), unmasked):
    assert abs(wrong - expected) > 1e-3, wrong

  def whole(p):
    model_ = nnx.merge(graphdef, p)
    lp = jax.nn.log_softmax(model_(jnp.asarray(tokens[:, :-1])).astype(jnp.float32))
    picked = jnp.take_along_axis(lp, jnp.asarray(tokens[:, 1:, None]), -1)[..., 0]
    return -jnp.sum(picked * mask) / mask.sum()
  grads = jax.jit(jax.grad(whole))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
               jax.device_get(new["opt_state"]), jax.device_get(grads))


def test_masked_subspace_accumulation_equals_one_step_on_the_whole_batch():
  """VLoRP accumulating 2 micro-batches in the subspace (optax_lowrank.MultiSteps, which
  averages the micro-batch gradients) with very uneven completion tokens gives the step
  that VLoRP takes on the whole batch at once: the same loss, the same weights."""
  import optax_lowrank as ol
  from models.lowrank import lowrank_spec
  cfg = CFG.replace(num_layers=1)
  m = Llama(cfg, rngs=nnx.Rngs(params=jax.random.key(4)))
  graphdef, params = nnx.graphdef(m), pure_dict(nnx.state(m, nnx.Param))
  mask_tree, dims = lowrank_spec(params, cfg)
  make = lambda: ol.vlorp(1e-2, rank=2, granularity=4, projection_mask=mask_tree,
                          dimension_numbers=dims)
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, 256, (4, CFG.max_seq_len + 1)).astype(np.int32)
  mask = np.zeros((4, CFG.max_seq_len), np.float32)
  mask[0, 2:] = mask[1, 4:] = mask[3, 7] = 1.0
  results = []
  for tx, make_step, k in ((make(), steps.make_train_step, 1),
                           (ol.MultiSteps(make(), 2), steps.make_subspace_train_step, 2)):
    state = {"step": jnp.zeros((), jnp.int32), "params": params,
             "opt_state": tx.init(params)}
    batch = steps.masked_batch(tokens.reshape(k, 4 // k, -1), mask.reshape(k, 4 // k, -1))
    results.append(jax.device_get(jax.jit(make_step(graphdef, tx))(state, batch)))
  (whole, m1), (acc, m2) = results
  np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-6)
  # Adam's first step lr·g/(|g|+eps) on the unprojected leaves turns float32 noise in a
  # tiny gradient into up to ~1e-5 (as in test_train's accumulation tests); a wrong
  # weighting of the micro-batches shows at the size of the step, ~lr
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               acc["params"], whole["params"])
  moved = max(jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(),
                                           whole["params"], jax.device_get(params))))
  assert moved > 1e-3  # the step did move the weights


def test_multiple_choice_scores_are_choice_log_likelihoods(model):
  graphdef, params, logits = model
  questions = [instruct.Choice("The cat sat on", [" the", " a mat", " x"], 1),
               instruct.Choice("1 2 3", [" 4", " 5 6"], 0)]
  rows = instruct.choice_rows(questions, TOK, CFG.max_seq_len, pad_id=TOK.eos_id)
  score = jax.jit(steps.make_masked_eval_step(graphdef))
  nll, count = jax.device_get(score(params, steps.masked_batch(rows.tokens, rows.mask)))
  ref, lengths = [], []
  for q in questions:  # each (prompt, choice) alone, unpadded, in float64
    prompt = TOK.encode(q.prompt)
    for c in q.choices:
      ids, seq = TOK.encode(c), np.concatenate([prompt, TOK.encode(c)])
      lp = _log_softmax(logits(seq[:-1]))
      ref.append(-sum(lp[len(prompt) - 1 + i, t] for i, t in enumerate(ids)))
      lengths.append(len(ids))
  np.testing.assert_allclose(nll, ref, rtol=1e-5)
  np.testing.assert_array_equal(count, lengths)
  acc = evals.choice_accuracy(nll, count, questions)
  scores = -np.asarray(ref)
  want = np.mean([np.argmax(scores[:3]) == 1, np.argmax(scores[3:]) == 0])
  want_norm = np.mean([np.argmax(scores[:3] / lengths[:3]) == 1,
                       np.argmax(scores[3:] / lengths[3:]) == 0])
  assert acc == {"mc_acc": want, "mc_acc_norm": want_norm}
  # negative control: without the mask the prompt's tokens would count too
  whole, _ = jax.device_get(score(params, steps.masked_batch(
      rows.tokens, (np.arange(CFG.max_seq_len) < [[len(r) - 1] for r in rows.tokens])
      & (rows.tokens[:, 1:] != TOK.eos_id))))
  assert np.all(whole > nll + 1.0)


def test_greedy_generation_is_the_argmax_loop(model):
  graphdef, params, logits = model
  prompts = ["def f(", "import os\n", "x"]
  new = 6
  tokens, lengths = evals.prompt_buffer(prompts, TOK, CFG.max_seq_len, new, TOK.eos_id)
  generate = jax.jit(evals.make_greedy_fn(graphdef, new, eos_id=TOK.eos_id))
  out = np.asarray(generate(params, tokens, lengths))
  for row, prompt, n in zip(out, prompts, lengths):
    seq = list(TOK.encode(prompt))
    for _ in range(new):  # the reference: the model on the prefix alone, argmax
      seq.append(int(np.argmax(logits(np.asarray(seq))[-1])))
      if seq[-1] == TOK.eos_id:
        break
    np.testing.assert_array_equal(row[:len(seq)], seq)
    assert n == len(TOK.encode(prompt))
  texts = evals.generated_text(out, lengths, TOK)
  assert texts[0] == TOK.decode(out[0, lengths[0]:lengths[0] + new])
  assert instruct.final_answer("so 6 + 1 =\n#### 7 ") == "7"


@pytest.mark.parametrize("line,field", [
    ('{"prompt": "a"}', '"completion"'),
    ('{"prompt": "a", "completion": 3}', '"completion"'),
    ('{"messages": [{"role": "bot", "content": "x"}]}', '"role"'),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant"),
    ('{"text": "a"}', '"prompt" and "completion", or "messages"'),
    ('[1]', "expected a JSON object"),
    ('{"prompt": ', "invalid JSON"),
])
def test_bad_records_name_the_file_line_and_field(tmp_path, line, field):
  path = tmp_path / "d.jsonl"
  path.write_text('{"prompt": "a", "completion": "b"}\n' + line + "\n")
  with pytest.raises(instruct.InstructError, match=f"d.jsonl:2: .*{field}"):
    instruct.load_examples(str(path), TOK)


@pytest.mark.parametrize("record,field", [
    ({"question": "q", "choices": ["a"], "answer": 0}, '"choices"'),
    ({"question": "q", "choices": ["a", "b"], "answer": 2}, '"answer"'),
    ({"question": "q", "choices": ["a", "b"], "answer": "C"}, '"answer"'),
    ({"choices": ["a", "b"], "answer": 0}, '"question" or "prompt"'),
])
def test_bad_multiple_choice_records_name_the_field(tmp_path, record, field):
  path = tmp_path / "mc.jsonl"
  path.write_text(json.dumps(record) + "\n")
  with pytest.raises(instruct.InstructError, match=f"mc.jsonl:1: .*{field}"):
    instruct.load_choices(str(path))
  ok = {"question": "q", "choices": ["a", "b"], "answer": "B"}
  path.write_text(json.dumps(ok) + "\n")
  assert instruct.load_choices(str(path))[0] == instruct.Choice("q\nAnswer:", [" a", " b"], 1)


# the program end to end, from one of our checkpoints


def _pretrained(root):
  """A checkpoint as `train.pretrain --model tiny --seq-len 32` leaves it (random
  weights stand in for trained ones)."""
  cfg = LlamaConfig.tiny(max_seq_len=32)
  params = pure_dict(nnx.state(Llama(cfg, rngs=nnx.Rngs(params=jax.random.key(1))),
                               nnx.Param))
  ckpt = Checkpointer(str(root / "pre"))
  ckpt.save(5, {"step": jnp.asarray(5), "params": params},
            {"model": "tiny", "seq_len": 32, "scan_layers": False, "param_dtype": "float32",
             "weight_quant": "none", "tokenizer": None})
  ckpt.close()
  return params


def _instruction_files(root):
  def write(name, records):
    with open(root / name, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in records)
  write("train.jsonl", [{"prompt": f"{i} plus 1 is", "completion": f" {i + 1}"}
                        for i in range(20)])
  write("mc.jsonl", [{"question": f"{i} plus 1?", "choices": [str(i + 1), str(i + 2)],
                      "answer": 0} for i in range(4)])
  write("gen.jsonl", [{"prompt": f"{i} plus 1 is", "answer": str(i + 1)} for i in range(4)])


def test_finetune_runs_from_our_checkpoint_and_resumes_exactly(tmp_path, capsys):
  params = _pretrained(tmp_path)
  _instruction_files(tmp_path)
  base = ["--init-from", str(tmp_path / "pre"), "--data", str(tmp_path / "train.jsonl"),
          "--eval-mc", str(tmp_path / "mc.jsonl"), "--eval-gen", str(tmp_path / "gen.jsonl"),
          "--eval-data", str(tmp_path / "train.jsonl"), "--eval-limit", "8",
          "--optimizer", "adamw", "--lr", "1e-2", "--steps", "4",
          "--batch-size", "8", "--eval-every", "4", "--ckpt-every", "2",
          "--max-new-tokens", "2", "--packing"]
  run = lambda name, *extra: finetune.main(
      [*base, "--out", str(tmp_path / name), "--ckpt-dir", str(tmp_path / f"{name}_ckpt"),
       *extra])
  with compilation_cache(tmp_path / "xla_cache"):
    whole = run("a")
    assert run("b", "--stop-at", "2") == {"step": 2, "interrupted": True}
    resumed = run("b")
  printed = capsys.readouterr().out
  assert "before fine-tuning: completion loss" in printed and "multiple-choice" in printed
  # the model started from the checkpoint's weights: its loss before training is the
  # masked loss of those weights, recomputed here
  graphdef = steps.abstract_model(LlamaConfig.tiny(max_seq_len=32))[0]
  rows = instruct.pad_rows(instruct.load_examples(str(tmp_path / "train.jsonl"), TOK)[:8],
                           32, TOK.eos_id)
  nll, count = jax.jit(steps.make_masked_eval_step(graphdef))(
      params, steps.masked_batch(rows.tokens, rows.mask))
  np.testing.assert_allclose(whole["before"]["val_loss"], float(nll.sum() / count.sum()),
                             rtol=1e-5)
  assert set(whole["after"]) == {"val_loss", "val_ppl", "mc_acc", "mc_acc_norm", "gen_exact"}
  assert whole["after"]["val_loss"] < whole["before"]["val_loss"]
  # resumed at step 2: the same losses and the same evaluation as the uninterrupted run
  losses = lambda name: [r["loss"] for r in map(json.loads, open(tmp_path / name /
                                                                 "metrics.jsonl"))
                         if "loss" in r]
  assert losses("a") == losses("b") and len(losses("a")) == 4
  assert resumed["after"] == whole["after"] and resumed["before"] == whole["before"]


@pytest.mark.parametrize("argv,flag", [
    (["--init-from", "/nonexistent"], "--init-from"),
    (["--data", "/nonexistent.jsonl"], "--data"),
    (["--eval-mc", "/nonexistent.jsonl"], "--eval-mc"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--lr", "-1"], "--lr"),
    (["--eval-batches", "4"], "--eval-batches"),
])
def test_bad_flags_fail_with_one_line_naming_the_flag(tmp_path, argv, flag, capsys):
  (tmp_path / "d.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
  base = ["--init-from", str(tmp_path), "--data", str(tmp_path / "d.jsonl")]
  with pytest.raises(SystemExit) as e:
    finetune.parse_args([*base, *argv])
  assert e.value.code == 2
  assert flag in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_bad_record_stops_the_program_in_one_line(tmp_path):
  _pretrained(tmp_path)
  (tmp_path / "d.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
  with pytest.raises(SystemExit, match=r"^python -m train.finetune: error: .*d.jsonl:2: "
                                       r"field \"completion\""):
    finetune.main(["--init-from", str(tmp_path / "pre"), "--data", str(tmp_path / "d.jsonl"),
                   "--out", str(tmp_path / "out")])
  # a run directory that kept no checkpoints is named as such
  os.makedirs(tmp_path / "run")
  (tmp_path / "run" / "config.json").write_text('{"args": {"ckpt_dir": null}, "model": {}}')
  with pytest.raises(SystemExit, match="--init-from: the run .* kept no checkpoints"):
    finetune.main(["--init-from", str(tmp_path / "run"), "--data",
                   str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "out")])


def _hugging_face_dir(root):
  """A tiny LLaMA-3.2-style directory (tied embeddings, grouped-query attention) written by
  `models.save_pretrained`, with a word-level tokenizer.json; and its model."""
  import models
  from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
  words = ["<s>", "</s>", "<unk>", "plus", "is", "?"] + [str(i) for i in range(24)]
  tokenizer = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(words)},
                                             unk_token="<unk>"))
  tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  cfg = LlamaConfig(vocab_size=len(words), d_model=32, d_ff=64, num_heads=4,
                    num_kv_heads=2, num_layers=2, max_seq_len=32, tie_embeddings=True,
                    norm_eps=1e-5)
  model = Llama(cfg, rngs=nnx.Rngs(params=jax.random.key(4)))
  models.save_pretrained(model, root / "hf")
  tokenizer.save(str(root / "hf" / "tokenizer.json"))
  return model


def test_finetune_starts_from_a_hugging_face_directory(tmp_path):
  model = _hugging_face_dir(tmp_path)
  _instruction_files(tmp_path)
  result = finetune.main(
      ["--init-from", str(tmp_path / "hf"), "--data", str(tmp_path / "train.jsonl"),
       "--eval-data", str(tmp_path / "train.jsonl"), "--eval-limit", "8",
       "--optimizer", "galore", "--rank", "4", "--lr", "1e-2", "--steps", "2",
       "--batch-size", "8", "--eval-every", "2", "--seq-len", "16",
       "--out", str(tmp_path / "out")])
  # Before training: the completion loss of the directory's weights under its own
  # tokenizer (<s> first, </s> after the completion), recomputed in float64 from the
  # in-memory model the directory was written from.
  tok = data.BPETokenizer(str(tmp_path / "hf" / "tokenizer.json"))
  assert (tok.bos_id, tok.eos_id) == (0, 1)
  nll, count = 0.0, 0
  for i in range(8):
    prompt = [0] + [int(t) for t in tok.encode(f"{i} plus 1 is")]
    completion = [int(t) for t in tok.encode(f" {i + 1}")] + [1]
    tokens = np.asarray(prompt + completion, np.int32)
    logits = np.asarray(model(jnp.asarray(tokens)[None]), np.float64)[0]
    logp = _log_softmax(logits[:-1])[np.arange(len(tokens) - 1), tokens[1:]]
    nll -= logp[len(prompt) - 1:].sum()
    count += len(completion)
  np.testing.assert_allclose(result["before"]["val_loss"], nll / count, rtol=1e-5)
  assert result["after"]["val_loss"] < result["before"]["val_loss"]
