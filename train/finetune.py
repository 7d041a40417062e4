"""Fine-tune a pretrained LLaMA on instruction data with any registered optimizer.

    python -m train.finetune --init-from runs/quickstart --data data/stdlib_mc/train.jsonl \\
        --eval-mc data/stdlib_mc/val_mc.jsonl --optimizer galore --steps 200

`--init-from` is one of our checkpoint directories (`--ckpt-dir` of `train.pretrain`,
or its `--out` run directory, whose config.json names it): the newest intact step's
parameters, the byte vocabulary or the `--tokenizer` it was trained with; or a Hugging
Face directory (a config.json with `model_type`, safetensors, tokenizer.json), read by
`models.from_pretrained`. The loss is on completion tokens only (`train.instruct`); the
evaluations (`train.evals`) run before training and every `--eval-every` steps. The
rest (optimizer, mesh, compiled step, checkpoints and resume, faults, metrics, plot) is
pretraining's machinery (`train.loop`). Flags may also come from `--config file.json`.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Sequence

from train import paths, pretrain


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m train.finetune", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default=None, help="JSON file of flag values (command line wins)")
  g = p.add_argument_group("model")
  g.add_argument("--init-from", required=True, metavar="DIR",
                 help="our checkpoint (or run) directory, or a Hugging Face directory")
  g.add_argument("--seq-len", type=int, default=None,
                 help="row length (default: the model's context)")
  g.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=None,
                 help="Hugging Face import: stack the layers (ours: as saved)")
  pretrain.add_numerics_flags(g)
  g.set_defaults(param_dtype=None)  # the checkpoint's
  pretrain.add_optimizer_flags(p.add_argument_group("optimizer"))
  pretrain.add_run_flags(p.add_argument_group("run"))
  pretrain.add_fault_flags(p.add_argument_group("faults"))
  g = p.add_argument_group("data")
  g.add_argument("--data", required=True, help="training jsonl: prompt/completion or messages")
  g.add_argument("--packing", action=argparse.BooleanOptionalAction, default=False,
                 help="join examples into full rows (attention is not reset between "
                 "them); default: one example per row, right-padded")
  g.add_argument("--eval-data", default=None, help="jsonl like --data: completion loss")
  g.add_argument("--eval-mc", default=None,
                 help="multiple-choice jsonl: question/prompt, choices, answer")
  g.add_argument("--eval-gen", default=None, help="jsonl prompt/answer: exact match")
  g.add_argument("--max-new-tokens", type=int, default=32, help="greedy generation")
  g.add_argument("--eval-limit", type=int, default=None,
                 help="evaluate at most this many records of each eval file")
  # --eval-batches is pretraining's: None here, so that setting it is refused.
  p.set_defaults(steps=200, lr=1e-3, eval_every=100, out="runs/finetune", ckpt_every=100,
                 eval_batches=None)
  return p


def parse_args(argv: Sequence[str] | None = None, num_devices: int | None = None):
  """Parses and validates flags; every error names its flag (argparse exits with 2)."""
  parser = build_parser()
  args = pretrain.parse_with_config(parser, argv)
  error = parser.error
  if not paths.resolve(args.init_from).is_dir():
    error(f"--init-from: not a directory: {args.init_from}")
  if paths.is_remote(args.init_from) and _hf_dir(args.init_from):
    error(f"--init-from: a Hugging Face directory must be local (copy it from "
          f"{args.init_from}); our run and checkpoint directories may be remote")
  for name in ("data", "eval_data", "eval_mc", "eval_gen"):
    path = getattr(args, name)
    if path is not None and not os.path.isfile(path):
      error(f"--{name.replace('_', '-')}: file not found: {path}")
  if args.eval_batches is not None:
    error("--eval-batches: pretraining only; fine-tuning evaluates every record of "
          "--eval-data/--eval-mc/--eval-gen (cap them with --eval-limit)")
  for name in ("max_new_tokens", "eval_limit"):
    if getattr(args, name) is not None and getattr(args, name) <= 0:
      error(f"--{name.replace('_', '-')}: must be positive, got {getattr(args, name)}")
  pretrain.check_common(args, error, num_devices)
  return args


def _hf_dir(path: str) -> bool:
  """A Hugging Face model directory: a config.json that is not our run's."""
  config = paths.resolve(path) / "config.json"
  if not config.is_file():
    return False
  try:
    value = json.loads(config.read_text())
  except (OSError, json.JSONDecodeError):
    return True
  return not (isinstance(value, dict) and "args" in value and "model" in value)


class Source:
  """What `--init-from` holds: the model config, its tokenizer, and how to get its
  parameters (`load(setup)`: pure-dict params laid out like `setup`'s)."""

  def __init__(self, args, mesh):
    from models.config import LlamaConfig
    from train import data
    from train.loop import RunError
    path = args.init_from
    self.hf_model = None
    if _hf_dir(path):
      import models  # models.from_pretrained: the Hugging Face import
      from flax import nnx
      self.hf_model = models.from_pretrained(path, dtype=args.dtype,
                                             param_dtype=args.param_dtype,
                                             scan_layers=bool(args.scan_layers), mesh=mesh)
      cfg = self.hf_model.cfg.replace(remat=args.remat)
      tokenizer = os.path.join(path, "tokenizer.json")
      if not os.path.isfile(tokenizer):
        raise RunError(f"--init-from: {path} has no tokenizer.json")
      self.tokenizer = data.BPETokenizer(tokenizer)
      self.description = f"Hugging Face model {path}"
      self.cfg = cfg
      self._params = lambda: _pure(nnx.state(self.hf_model, nnx.Param))
      return
    run_config = paths.resolve(path) / "config.json"
    if run_config.is_file():  # our run directory: its checkpoints
      ckpt_dir = json.loads(run_config.read_text())["args"].get("ckpt_dir")
      if not ckpt_dir:
        raise RunError(f"--init-from: the run {path} kept no checkpoints (it ran without "
                       "--ckpt-dir); pass a run that did, or its --ckpt-dir")
      path = ckpt_dir
    from train.checkpoint import Checkpointer
    ckpt = Checkpointer(path)
    step = next((s for s in reversed(ckpt.steps()) if ckpt.verify(s) is None), None)
    if step is None:
      raise RunError(f"--init-from: no intact checkpoint in {path}")
    flags = ckpt.flags(step) or {}
    if flags.get("weight_quant", "none") != "none":
      raise RunError(f"--init-from: step {step} in {path} has --weight-quant "
                     f"{flags['weight_quant']} weights; fine-tune from a float checkpoint")
    scan = bool(flags.get("scan_layers"))
    if args.scan_layers is not None and args.scan_layers != scan:
      raise RunError(f"--scan-layers: the checkpoint in {path} was saved with "
                     f"--{'' if scan else 'no-'}scan-layers; fine-tuning keeps its layout")
    vocab = ckpt.array_metadata(step)["params"]["embed"].shape[0]
    cfg = LlamaConfig.preset(flags.get("model", "tiny"), vocab_size=vocab,
                             max_seq_len=flags.get("seq_len") or 256, scan_layers=scan,
                             remat=args.remat, dtype=args.dtype,
                             param_dtype=args.param_dtype or flags.get("param_dtype",
                                                                       "float32"))
    if flags.get("tokenizer"):
      self.tokenizer = data.BPETokenizer(flags["tokenizer"])
    else:
      self.tokenizer = data.ByteTokenizer()
      self.tokenizer.bos_id = None  # pretraining puts no <bos> before its documents
    self.cfg, self.description = cfg, f"step {step} of {path} (--model {flags.get('model')})"
    self._ckpt, self._step = ckpt, step

  def load(self, setup):
    """The parameters, placed like `setup.abstract_state["params"]`."""
    import jax
    import orbax.checkpoint as ocp
    if self.hf_model is not None:
      params = self._params()
      return jax.device_put(params, setup.shardings["params"])
    want = {"params": setup.abstract_state["params"]}  # Orbax casts to their dtypes
    item = self._ckpt.path(self._step) / "default"
    with ocp.PyTreeCheckpointer() as reader:
      restored = reader.restore(item, args=ocp.args.PyTreeRestore(
          want, restore_args=ocp.checkpoint_utils.construct_restore_args(want),
          partial_restore=True))
    return restored["params"]


def _pure(state):
  from models.lowrank import pure_dict
  return pure_dict(state)


def main(argv: Sequence[str] | None = None) -> dict:
  from train.loop import RunError
  pretrain.maybe_initialize_distributed()
  args = parse_args(argv)
  try:
    return run(args)
  except RunError as e:
    raise SystemExit(f"python -m train.finetune: error: {e}") from None


def run(args) -> dict:
  """Fine-tunes as the parsed flags say; a failure raises `train.loop.RunError`."""
  import jax
  import numpy as np
  from models import sharding as shd
  from train import data, evals, instruct, loop, optimizers, steps, telemetry, validate
  from train.plot import plot_runs

  refused = optimizers.refused_flags(args.optimizer, args)
  if refused:
    raise loop.RunError(f"--optimizer {args.optimizer}: {refused}")
  lead = jax.process_index() == 0
  say = print if lead else (lambda *a, **k: None)
  flags = validate.flags_of(args)
  ckpt, resume = loop.open_checkpoints(args, flags, lead, say)
  mesh = pretrain.build_mesh(args, say)
  source = Source(args, mesh)
  tok = source.tokenizer
  seq_len = args.seq_len or source.cfg.max_seq_len
  cfg = source.cfg.replace(max_seq_len=max(seq_len, source.cfg.max_seq_len))
  pad_id = tok.eos_id
  try:  # every record is read (and checked) before anything compiles
    train_rows = (instruct.pack_rows if args.packing else instruct.pad_rows)(
        instruct.load_examples(args.data, tok), seq_len, pad_id)
    limit = slice(args.eval_limit)
    eval_rows = (instruct.pad_rows(instruct.load_examples(args.eval_data, tok)[limit],
                                   seq_len, pad_id) if args.eval_data else None)
    questions = instruct.load_choices(args.eval_mc)[limit] if args.eval_mc else None
    prompts = instruct.load_generations(args.eval_gen)[limit] if args.eval_gen else None
  except instruct.InstructError as e:
    raise loop.RunError(str(e)) from None
  if prompts and args.max_new_tokens >= seq_len:
    raise loop.RunError(f"--max-new-tokens ({args.max_new_tokens}) must be below the row "
                        f"length --seq-len ({seq_len})")
  choice_rows = questions and instruct.choice_rows(questions, tok, seq_len, pad_id)
  prompt_buffer = prompts and evals.prompt_buffer([p for p, _ in prompts], tok, seq_len,
                                                  args.max_new_tokens, pad_id)
  say(f"init from {source.description}; tokenizer {tok.name}")
  say(f"data: {args.data}: {len(train_rows)} rows of {seq_len + 1} tokens "
      f"({'packed' if args.packing else 'padded'}), "
      f"{int(train_rows.mask.sum()):,} completion tokens"
      + (f"; {train_rows.truncated} example(s) cut to fit" if train_rows.truncated else ""))

  setup = loop.Setup(args, cfg, mesh, say)
  setup.prepare(ckpt, say)
  batch_sharding = steps.batch_sharding(mesh)
  eval_sharding = steps.batch_sharding(mesh, micro_batched=False)
  micro = args.batch_size // args.micro_batches
  shape = (args.micro_batches, micro)

  with shd.set_mesh(mesh):
    from_params = jax.jit(setup.from_params, out_shardings=setup.shardings)
    state, resume = setup.start_state(ckpt, resume, flags, say,
                                      lambda: from_params(source.load(setup)))
    if lead:
      loop.write_json(os.path.join(args.out, "config.json"),
                      {"args": vars(args), "model": cfg.to_dict(), "finetune": True})
    log = loop.MetricsLog(os.path.join(args.out, "metrics.jsonl"), resume, enabled=lead,
                          say=say)
    log = telemetry.with_tensorboard(log, args, lead, resume)
    abstract_batch = steps.masked_batch(
        jax.ShapeDtypeStruct((*shape, seq_len + 1), np.int32, sharding=batch_sharding),
        jax.ShapeDtypeStruct((*shape, seq_len), np.float32, sharding=batch_sharding))
    compiled = setup.compile_step(abstract_batch, batch_sharding, say)
    score = setup.jit_eval(steps.make_masked_eval_step(setup.eval_graphdef), eval_sharding)
    generate = setup.jit_eval(
        evals.make_greedy_fn(setup.eval_graphdef, args.max_new_tokens, tok.eos_id),
        eval_sharding, eval_sharding) if prompts else None
    size = args.eval_batch_size

    def batches(*arrays):
      """The rows in batches of --eval-batch-size (the last one filled with copies of
      row 0, whose results are dropped)."""
      n = len(arrays[0])
      for i in range(0, n, size):
        part = [a[i:i + size] for a in arrays]
        fill = size - len(part[0])
        yield len(part[0]), [np.concatenate([p, np.repeat(a[:1], fill, 0)]) for p, a in
                             zip(part, arrays)]

    def per_row(params, rows):
      nll, count = [], []
      for n, (tokens, mask) in batches(rows.tokens, rows.mask.astype(np.float32)):
        s, c = score(params, loop.put(steps.masked_batch(tokens, mask), eval_sharding))
        nll.append(np.asarray(s)[:n])
        count.append(np.asarray(c)[:n])
      return np.concatenate(nll), np.concatenate(count)

    def evaluate(params) -> dict:
      result = {}
      if eval_rows is not None:
        nll, count = per_row(params, eval_rows)
        result["val_loss"] = float(nll.sum() / max(count.sum(), 1))
        result["val_ppl"] = data.perplexity(result["val_loss"])
      if questions:
        nll, count = per_row(params, choice_rows)
        result.update(evals.choice_accuracy(nll, count, questions))
      if prompts:
        texts = []
        for n, (t, l) in batches(*prompt_buffer):
          out = np.asarray(generate(params, loop.put(t, eval_sharding),
                                    loop.put(l, eval_sharding)))
          texts += evals.generated_text(out[:n], l[:n], tok)
        result["gen_exact"] = float(np.mean(
            [instruct.final_answer(t) == instruct.final_answer(a)
             for t, (_, a) in zip(texts, prompts)]))
      return result

    if resume is None:
      before = evaluate(state["params"])
      log.write({"step": 0, **before})
    else:
      before = _logged(os.path.join(args.out, "metrics.jsonl"), 0)
    say(f"before fine-tuning: {_describe(before)}")

    def batch_at(step: int):
      tokens, mask = instruct.sample_rows(train_rows, args.seed, step, args.batch_size)
      batch = steps.masked_batch(tokens.reshape(*shape, -1),
                                 mask.astype(np.float32).reshape(*shape, -1))
      return loop.put(batch, batch_sharding)

    state, step, after, stop = loop.train(
        args, state, compiled, batch_at, evaluate, ckpt=ckpt, flags=flags, log=log,
        vocab_size=cfg.vocab_size, tokens_per_step=args.batch_size * seq_len, lead=lead,
        flops_per_token=telemetry.flops_per_token(cfg, seq_len), describe=_describe)
    if stop:
      say(f"stopped ({stop}) at step {step}"
          + (f"; checkpoint saved in {args.ckpt_dir}" if ckpt else ""))
      return {"step": step, "interrupted": True}

  plot = os.path.join(args.out, "loss.png")
  if lead:
    plot_runs([args.out], plot, labels=[f"{args.optimizer} (fine-tuning)"])
  summary = {"step": step, "before": before, "after": after, "plot": plot,
             "param_bytes": setup.param_bytes,
             "skipped_steps": int(jax.device_get(state["health"]["skipped_steps"]))}
  if lead:
    loop.write_json(os.path.join(args.out, "summary.json"), summary)
  say(f"after fine-tuning ({step} steps): {_describe(after)}")
  say(f"loss curves: {plot}")
  return summary


def _describe(result: dict | None) -> str:
  if not result:
    return "no evaluation (give --eval-data, --eval-mc or --eval-gen)"
  words = {"val_loss": "completion loss {:.4f}", "val_ppl": "perplexity {:.2f}",
           "mc_acc": "multiple-choice accuracy {:.1%}", "mc_acc_norm": "per token {:.1%}",
           "gen_exact": "exact match {:.1%}"}
  return ", ".join(words[k].format(v) for k, v in result.items() if k in words)


def _logged(path: str, step: int) -> dict | None:
  """The evaluation record of `step` in a metrics.jsonl (None if absent)."""
  try:
    for line in paths.resolve(path).read_text().splitlines():
      record = json.loads(line)
      if record.get("step") == step and "loss" not in record:
        return {k: v for k, v in record.items() if k != "step"}
  except (OSError, json.JSONDecodeError):
    pass
  return None


if __name__ == "__main__":
  main()
