"""Data at scale: memory-mapped `.bin` token files split without copying, and batches of
which each process reads and places only its own rows."""

import json

import jax
import numpy as np
import pytest

from models import sharding as shd
from train import data, loop, pretrain, steps, tokenize

SEQ, BATCH = 16, 8


def _reference_split(tokens, val_fraction):
  """(train, val) token arrays as the whole-file loader made them: blocks of
  `BIN_BLOCK_TOKENS`, each on the side the hash of its name `block<i>` picks, joined."""
  size = data.BIN_BLOCK_TOKENS
  blocks = [(f"block{i}", tokens[i * size:(i + 1) * size])
            for i in range(-(-len(tokens) // size))]
  train, val = data.split_documents(blocks, val_fraction)
  return (np.concatenate([b for _, b in train]), np.concatenate([b for _, b in val]))


class _Recorder:
  """A token array that records how many tokens each indexing reads."""

  def __init__(self, tokens):
    self.tokens, self.dtype, self.reads = tokens, tokens.dtype, []

  def __len__(self):
    return len(self.tokens)

  def __getitem__(self, index):
    self.reads.append(np.size(index) if not isinstance(index, slice) else index)
    return self.tokens[index]


def test_a_bin_file_is_memory_mapped_and_each_process_reads_only_its_rows(tmp_path):
  """The training split of a .bin is a view of the memory map in which a batch is the
  whole-file loader's batch (the same windows of the same tokens); process p of 2 reads
  exactly rows [4p, 4p + 4) of it, 4·(SEQ + 1) tokens; the halves are disjoint and
  together the batch. Validation batches likewise."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 60_000, 5 * data.BIN_BLOCK_TOKENS + 123).astype(np.uint16)
  tokens.tofile(tmp_path / "t.bin")
  corpus = data.load_corpus(str(tmp_path / "t.bin"), val_fraction=0.3)
  assert isinstance(corpus.train.tokens, np.memmap)
  train, val = _reference_split(tokens, 0.3)
  assert len(corpus.train) == len(train) and len(corpus.val) == len(val) and len(val)
  assert corpus.top == tokens.max() and corpus.vocab_size == tokens.max() + 1
  np.testing.assert_array_equal(np.asarray(corpus.val), val)
  for step in (0, 7):
    starts = np.random.default_rng([3, step]).integers(0, len(train) - SEQ - 1, BATCH)
    want = train[starts[:, None] + np.arange(SEQ + 1)].astype(np.int32)
    whole = data.sample_batch(corpus.train, 3, step, BATCH, SEQ)
    np.testing.assert_array_equal(whole, want)
    halves = []
    for p in range(2):
      recorder = data.Blocks(_Recorder(corpus.train.tokens), corpus.train.blocks)
      rows = np.arange(p * BATCH // 2, (p + 1) * BATCH // 2)
      halves.append(data.sample_batch(recorder, 3, step, BATCH, SEQ, rows))
      assert recorder.tokens.reads == [len(rows) * (SEQ + 1)]
    np.testing.assert_array_equal(np.concatenate(halves), want)
  n = (len(val) - 1) // SEQ
  windows = (2 * BATCH + np.arange(BATCH)) % n
  want = val[windows[:, None] * SEQ + np.arange(SEQ + 1)].astype(np.int32)
  halves = [data.eval_batch(corpus.val, 2, BATCH, SEQ, np.arange(p * 4, p * 4 + 4))
            for p in range(2)]
  np.testing.assert_array_equal(np.concatenate(halves), want)
  counts = np.bincount(val, minlength=corpus.vocab_size)
  p = counts[counts > 0] / counts.sum()
  assert data.unigram_entropy(corpus.val, corpus.vocab_size) == \
      np.float64(-(p * np.log(p)).sum())


def test_a_process_places_only_the_rows_its_devices_hold():
  """`local_rows` of a process whose devices hold micro-batch rows 2-3 of 4 (of both
  micro-batches) are flat rows 2, 3, 6, 7; `put_rows` on 8 devices builds the global
  batch (its rows split 4 ways, each on 2 devices) from the rows it asks for."""
  shape = (2, 4, SEQ + 1)
  index_map = {"d0": (slice(None), slice(2, 3), slice(None)),
               "d1": (slice(None), slice(3, 4), slice(None))}
  np.testing.assert_array_equal(loop.local_rows(shape, index_map), [2, 3, 6, 7])
  batch = np.arange(np.prod(shape), dtype=np.int32).reshape(shape)
  asked = []

  def rows_of(rows):
    asked.append(rows)
    return batch.reshape(-1, SEQ + 1)[rows]

  mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})  # rows replicated on tensor
  placed = loop.put_rows(rows_of, shape, steps.batch_sharding(mesh))
  np.testing.assert_array_equal(jax.device_get(placed), batch)
  np.testing.assert_array_equal(asked[0], np.arange(8))  # one process: every row


def _word_tokenizer(path):
  """A tokenizer.json of a word-level vocabulary with an end-of-text token `</s>`."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  words = ["<unk>", "</s>", "the", "cat", "sat", "on", "a", "mat", ".", "dog", "ran"]
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(str(path))
  return len(words)


def test_tokenize_writes_each_documents_ids_and_eos_and_pretrain_reads_its_sidecar(
    tmp_path, monkeypatch, capsys):
  """`python -m train.tokenize` on a .jsonl and a .txt writes, in chunks of 3 ids, the ids
  `tokenizers` gives each document followed by `</s>`, as uint16, with a progress line
  per document (one per byte asked; not on a terminal) and a sidecar that
  `train.pretrain` takes --data-dtype, --vocab-size and --tokenizer from; flags that
  contradict it, or a tokenizer it names that is gone, fail naming the flag."""
  from tokenizers import Tokenizer
  vocab = _word_tokenizer(tmp_path / "tok.json")
  docs = ["the cat sat on a mat .", "a dog ran", "the zebra sat ."]
  (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
  (tmp_path / "d.txt").write_text("the dog sat on the cat .\n")
  monkeypatch.setattr(tokenize, "CHUNK_TOKENS", 3)
  out = str(tmp_path / "out" / "d.bin")
  meta = tokenize.main([str(tmp_path / "d.jsonl"), str(tmp_path / "d.txt"), "--out", out,
                        "--tokenizer", str(tmp_path / "tok.json"), "--progress-mb", "1e-6"])
  reference = Tokenizer.from_file(str(tmp_path / "tok.json"))
  want = [i for d in docs + ["the dog sat on the cat .\n"]
          for i in reference.encode(d).ids + [1]]
  assert 0 in want  # "zebra" is unknown
  np.testing.assert_array_equal(np.fromfile(out, np.uint16), want)
  assert meta == json.loads(open(out + ".json").read())
  assert {k: meta[k] for k in ("dtype", "vocab_size", "max_id", "eos_id", "tokens",
                               "documents", "tokenizer")} == {
      "dtype": "uint16", "vocab_size": vocab, "max_id": max(want), "eos_id": 1,
      "tokens": len(want), "documents": 4, "tokenizer": str(tmp_path / "tok.json")}
  printed = capsys.readouterr().out.splitlines()
  assert sum(line.startswith("tokenize: ") for line in printed) == 4
  assert data.token_dtype(1 << 16) is np.uint16
  assert data.token_dtype((1 << 16) + 1) is np.uint32
  args = pretrain.parse_args(["--data", out], num_devices=8)
  assert (args.data_dtype, args.vocab_size, args.tokenizer) == (
      "uint16", vocab, str(tmp_path / "tok.json"))
  wider = pretrain.parse_args(["--data", out, "--vocab-size", "64"], num_devices=8)
  assert wider.vocab_size == 64
  assert data.load_corpus(out, data_dtype="uint16", val_fraction=0.0).top == max(want)
  for flag, value in (("--data-dtype", "uint32"), ("--vocab-size", str(vocab - 1))):
    with pytest.raises(SystemExit):
      pretrain.parse_args(["--data", out, flag, value], num_devices=8)
    assert flag in capsys.readouterr().err.strip().splitlines()[-1]
  (tmp_path / "tok.json").rename(tmp_path / "moved.json")  # the sidecar's tokenizer is gone
  with pytest.raises(SystemExit):
    pretrain.parse_args(["--data", out], num_devices=8)
  assert "--tokenizer" in capsys.readouterr().err.strip().splitlines()[-1]
