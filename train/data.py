"""Corpora, tokenizers and the step-indexed batch sampler.

The default corpus needs no download: the Python standard library's own source files
(sorted, capped in size) plus the pydoc topics text. Documents are split into train and
validation by a hash of their name, so the split is deterministic and disjoint. Batch `i`
is a pure function of `(seed, i)`, which makes a resumed run see exactly the batches the
uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import sysconfig
from typing import Iterable, Iterator

import numpy as np

from models.config import BYTE_SPECIALS
from train import paths

DEFAULT_CORPUS_BYTES = 6_000_000
TXT_CHUNK_BYTES = 8192
BIN_BLOCK_TOKENS = 1 << 16


class ByteTokenizer:
  """UTF-8 bytes 0..255 followed by the special tokens of `models.config.BYTE_SPECIALS`."""

  vocab_size = 256 + len(BYTE_SPECIALS)
  bos_id, eos_id = 256 + BYTE_SPECIALS.index("<bos>"), 256 + BYTE_SPECIALS.index("<eos>")
  name = "bytes"

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8", errors="replace"), np.uint8).astype(np.uint16)

  def decode(self, ids: Iterable[int]) -> str:
    return bytes(int(i) for i in ids if i < 256).decode("utf-8", errors="replace")


class BPETokenizer:
  """A `tokenizers` (Hugging Face) tokenizer loaded from a tokenizer.json (optional dep)."""

  def __init__(self, path: str):
    from tokenizers import Tokenizer  # optional: only needed with --tokenizer
    self._tok = Tokenizer.from_str(paths.resolve(path).read_text())
    self.vocab_size = self._tok.get_vocab_size()
    self.name = paths.resolve(path).name
    ids = [self._tok.token_to_id(t) for t in ("</s>", "<|endoftext|>", "<eos>")]
    self.eos_id = next((i for i in ids if i is not None), None)
    ids = [self._tok.token_to_id(t) for t in ("<s>", "<|begin_of_text|>", "<bos>")]
    self.bos_id = next((i for i in ids if i is not None), None)  # fine-tuning prepends it

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text).ids, np.uint32)

  def decode(self, ids: Iterable[int]) -> str:
    return self._tok.decode([int(i) for i in ids])


def _name_hash(name: str) -> float:
  """A uniform number in [0, 1) fixed by the document's name."""
  return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") / 2**64


def _is_validation(name: str, val_fraction: float) -> bool:
  return _name_hash(name) < val_fraction


def split_documents(docs: list[tuple[str, str]], val_fraction: float):
  """(train, validation) lists of documents; a document's side depends only on its name
  (a small corpus with no document under `val_fraction` gives its lowest-hash one to
  validation, if it has more than one)."""
  val_names = {name for name, _ in docs if _is_validation(name, val_fraction)}
  if not val_names and val_fraction > 0 and len(docs) > 1:
    val_names = {min((name for name, _ in docs), key=_name_hash)}
  train = [doc for doc in docs if doc[0] not in val_names]
  val = [doc for doc in docs if doc[0] in val_names]
  return train, val


def stdlib_documents(max_bytes: int = DEFAULT_CORPUS_BYTES) -> list[tuple[str, str]]:
  """(name, text) of the pydoc topics (one document) and the standard library's `*.py`
  files (sorted, up to `max_bytes` of them); deterministic for a given Python."""
  root = sysconfig.get_paths()["stdlib"]
  sources = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames
                         if d not in ("site-packages", "dist-packages", "__pycache__"))
    sources.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
  docs, total = [], 0
  try:  # one document: topics repeat each other's text, so they must not straddle the split
    from pydoc_data.topics import topics
    text = "\n\n".join(topics[key] for key in sorted(topics))
    docs.append(("pydoc_data/topics", text))
  except ImportError:
    pass
  for path in sorted(sources):
    if total >= max_bytes:
      break
    with open(path, "rb") as f:
      text = f.read().decode("utf-8", errors="replace")
    docs.append((os.path.relpath(path, root), text))
    total += len(text)
  return docs


class DataError(ValueError):
  """A data file that cannot be read as a corpus; the message names the file and line."""


def _jsonl_documents(path: str) -> list[tuple[str, str]]:
  docs = []
  with paths.resolve(path).open("rb") as raw:
    for i, line in enumerate(io.TextIOWrapper(raw, encoding="utf-8", errors="replace")):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{i + 1}: invalid JSON ({e.msg}, column {e.colno})") from None
      if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise DataError(f"{path}:{i + 1}: expected a JSON object with a string field "
                        "\"text\"")
      docs.append((f"{i}", record["text"]))
  return docs


def file_documents(path: str) -> list[tuple[str, str]]:
  """(name, text) documents of a .txt (8 KiB chunks cut at newlines) or .jsonl (`text`);
  a line of a .jsonl that is not a JSON object with a string `text` raises `DataError`
  naming the file and the line."""
  if path.endswith(".jsonl"):
    return _jsonl_documents(path)
  text = paths.resolve(path).read_bytes().decode("utf-8", errors="replace")
  docs, start = [], 0
  while start < len(text):
    end = text.find("\n", start + TXT_CHUNK_BYTES)
    end = len(text) if end < 0 else end + 1
    docs.append((f"{start}", text[start:end]))
    start = end
  return docs


@dataclasses.dataclass
class Corpus:
  """Train and validation token streams (documents joined with an end-of-text token)."""
  train: np.ndarray
  val: np.ndarray
  vocab_size: int
  description: str


def _join(parts: list[np.ndarray], eos: int | None, dtype) -> np.ndarray:
  if eos is not None:
    parts = [p for doc in parts for p in (doc, np.asarray([eos], dtype))]
  return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)


def load_corpus(data: str | None = None, *, tokenizer=None, data_dtype: str = "uint16",
                val_fraction: float = 0.05, max_bytes: int = DEFAULT_CORPUS_BYTES,
                vocab_size: int | None = None) -> Corpus:
  """Loads and tokenizes the corpus; `.bin` files are already token ids (`data_dtype`)."""
  if data is not None and data.endswith(".bin"):
    tokens = np.fromfile(data, dtype=np.dtype(data_dtype))
    if not len(tokens):
      raise DataError(f"{data}: no tokens (the file is empty)")
    blocks = [tokens[i:i + BIN_BLOCK_TOKENS] for i in range(0, len(tokens), BIN_BLOCK_TOKENS)]
    train, val = ([block for _, block in part] for part in
                  split_documents([(f"block{i}", b) for i, b in enumerate(blocks)], val_fraction))
    vocab = vocab_size or int(tokens.max()) + 1
    return Corpus(_join(train, None, tokens.dtype), _join(val, None, tokens.dtype), vocab,
                  f"{data}: {len(tokens):,} tokens")
  tokenizer = tokenizer or ByteTokenizer()
  docs = file_documents(data) if data is not None else stdlib_documents(max_bytes)
  dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
  train, val = ([tokenizer.encode(text) for _, text in part]
                for part in split_documents(docs, val_fraction))
  what = data or f"Python {sysconfig.get_python_version()} stdlib + pydoc topics"
  corpus = Corpus(_join(train, tokenizer.eos_id, dtype), _join(val, tokenizer.eos_id, dtype),
                  tokenizer.vocab_size,
                  f"{what}: {len(docs):,} documents, tokenizer {tokenizer.name}")
  return corpus


def sample_batch(tokens: np.ndarray, seed: int, step: int, batch_size: int,
                 seq_len: int) -> np.ndarray:
  """Training batch `step`: `batch_size` random windows of `seq_len + 1` tokens.

  A pure function of `(seed, step)` (its own NumPy generator), so resuming at any step
  reproduces the same data.
  """
  rng = np.random.default_rng([seed, step])
  starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)
  return tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)


def eval_batch(tokens: np.ndarray, index: int, batch_size: int, seq_len: int) -> np.ndarray:
  """Validation batch `index`: consecutive non-overlapping windows (wrapping around)."""
  n = (len(tokens) - 1) // seq_len
  rows = (index * batch_size + np.arange(batch_size)) % n
  return tokens[rows[:, None] * seq_len + np.arange(seq_len + 1)].astype(np.int32)


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
  """Entropy (nats/token) of the token frequencies of `tokens`: the loss of the best
  context-free predictor fitted to this very split, a floor for any unigram model."""
  counts = np.bincount(tokens.astype(np.int64), minlength=vocab_size).astype(np.float64)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


def perplexity(loss: float) -> float:
  return math.exp(min(loss, 700.0))
