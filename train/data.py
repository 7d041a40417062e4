"""Corpora, tokenizers and the step-indexed batch sampler.

The default corpus needs no download: the Python standard library's own source files
(sorted, capped in size) plus the pydoc topics text. Documents are split into train and
validation by a hash of their name, so the split is deterministic and disjoint. Batch `i`
is a pure function of `(seed, i)`, which makes a resumed run see exactly the batches the
uninterrupted run would have seen.

A `.bin` token file is memory-mapped and split by blocks of `BIN_BLOCK_TOKENS` without
copying (`Blocks`); a batch reads only the windows it samples, and a process of a
multi-process run only its own rows of them (`rows`). A remote `.bin` (`gs://...`) is read
whole into memory; mount a large one (gcsfuse) to memory-map it instead.
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
    self.path = str(paths.resolve(path))
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


def _text_lines(path: str) -> Iterator[str]:
  """The lines of a UTF-8 text file (local or remote), read as they are needed."""
  with paths.resolve(path).open("rb") as raw:
    yield from io.TextIOWrapper(raw, encoding="utf-8", errors="replace")


def _jsonl_documents(path: str) -> Iterator[tuple[str, str]]:
  for i, line in enumerate(_text_lines(path)):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}:{i + 1}: invalid JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
      raise DataError(f"{path}:{i + 1}: expected a JSON object with a string field "
                      "\"text\"")
    yield f"{i}", record["text"]


def _txt_documents(path: str) -> Iterator[tuple[str, str]]:
  """Chunks of at least `TXT_CHUNK_BYTES` characters, each ending at the first newline
  after that (the last one at the end of the file), named by where they start."""
  start, lines, size = 0, [], 0
  for line in _text_lines(path):
    lines.append(line)
    size += len(line)
    if size > TXT_CHUNK_BYTES and line.endswith("\n"):
      yield f"{start}", "".join(lines)
      start, lines, size = start + size, [], 0
  if lines:
    yield f"{start}", "".join(lines)


def iter_documents(path: str) -> Iterator[tuple[str, str]]:
  """(name, text) documents of a .txt (8 KiB chunks cut at newlines) or .jsonl (`text`),
  read as they are needed; a line of a .jsonl that is not a JSON object with a string
  `text` raises `DataError` naming the file and the line."""
  return _jsonl_documents(path) if path.endswith(".jsonl") else _txt_documents(path)


def file_documents(path: str) -> list[tuple[str, str]]:
  """The documents of `iter_documents(path)` in a list."""
  return list(iter_documents(path))


def token_dtype(vocab_size: int) -> type:
  """The smallest unsigned dtype of token ids below `vocab_size`: uint16 or uint32."""
  return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def read_sidecar(path: str) -> dict | None:
  """What `train.tokenize` wrote beside the token file `path` (`<path>.json`: dtype,
  vocab_size, max_id, tokenizer, eos_id, tokens, documents), or None if there is none."""
  sidecar = paths.resolve(path + ".json")
  if not sidecar.exists():
    return None
  try:
    meta = json.loads(sidecar.read_text())
  except json.JSONDecodeError as e:
    raise DataError(f"{sidecar}:{e.lineno}: invalid JSON ({e.msg})") from None
  if not isinstance(meta, dict):
    raise DataError(f"{sidecar}: expected a JSON object")
  missing = sorted({"dtype", "vocab_size", "max_id"} - set(meta))
  if missing:
    raise DataError(f"{sidecar}: no {', '.join(missing)} (not written by train.tokenize?)")
  return meta


class Blocks:
  """Blocks `blocks` (ascending) of `BIN_BLOCK_TOKENS` tokens of `tokens` (a memory map),
  seen as one token array without copying them: `len`, indexing by integer arrays (which
  reads only the tokens indexed), `chunks()` and `np.asarray` (which copies them all)."""

  def __init__(self, tokens: np.ndarray, blocks: Iterable[int]):
    self.tokens, self.blocks = tokens, np.asarray(list(blocks), np.int64)
    self.dtype = tokens.dtype
    sizes = np.minimum(len(tokens) - self.blocks * BIN_BLOCK_TOKENS, BIN_BLOCK_TOKENS)
    self._len = int(sizes.sum())

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index) -> np.ndarray:
    index = np.asarray(index)
    block, offset = np.divmod(index, BIN_BLOCK_TOKENS)
    return self.tokens[self.blocks[block] * BIN_BLOCK_TOKENS + offset]

  def chunks(self) -> Iterator[np.ndarray]:
    for b in self.blocks:
      yield self.tokens[b * BIN_BLOCK_TOKENS:(b + 1) * BIN_BLOCK_TOKENS]

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    out = np.concatenate(list(self.chunks())) if len(self.blocks) else np.zeros(0, self.dtype)
    return out if dtype is None else out.astype(dtype)


def _chunks(tokens) -> Iterator[np.ndarray]:
  """`tokens` (an array or `Blocks`) in pieces that each fit in memory."""
  if isinstance(tokens, Blocks):
    yield from tokens.chunks()
  else:
    yield tokens


@dataclasses.dataclass
class Corpus:
  """Train and validation token streams (documents joined with an end-of-text token);
  `top` is the largest token id in either."""
  train: np.ndarray | Blocks
  val: np.ndarray | Blocks
  vocab_size: int
  description: str
  top: int


def _join(parts: list[np.ndarray], eos: int | None, dtype) -> np.ndarray:
  if eos is not None:
    parts = [p for doc in parts for p in (doc, np.asarray([eos], dtype))]
  return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)


def load_corpus(data: str | None = None, *, tokenizer=None, data_dtype: str = "uint16",
                val_fraction: float = 0.05, max_bytes: int = DEFAULT_CORPUS_BYTES,
                vocab_size: int | None = None) -> Corpus:
  """Loads and tokenizes the corpus; `.bin` files are already token ids (`data_dtype`),
  memory-mapped (read into memory if remote) and split by blocks without a copy."""
  if data is not None and data.endswith(".bin"):
    tokens = _token_file(data, np.dtype(data_dtype))
    if not len(tokens):
      raise DataError(f"{data}: no tokens (the file is empty)")
    count = -(-len(tokens) // BIN_BLOCK_TOKENS)
    train, val = ([int(name[5:]) for name, _ in part] for part in
                  split_documents([(f"block{i}", None) for i in range(count)], val_fraction))
    meta = read_sidecar(data)  # written by train.tokenize: saves a pass over the file
    top = meta["max_id"] if meta else max(
        int(tokens[i:i + (1 << 24)].max()) for i in range(0, len(tokens), 1 << 24))
    return Corpus(Blocks(tokens, train), Blocks(tokens, val), vocab_size or top + 1,
                  f"{data}: {len(tokens):,} tokens", top)
  tokenizer = tokenizer or ByteTokenizer()
  docs = file_documents(data) if data is not None else stdlib_documents(max_bytes)
  dtype = token_dtype(tokenizer.vocab_size)
  train, val = ([tokenizer.encode(text) for _, text in part]
                for part in split_documents(docs, val_fraction))
  what = data or f"Python {sysconfig.get_python_version()} stdlib + pydoc topics"
  train, val = _join(train, tokenizer.eos_id, dtype), _join(val, tokenizer.eos_id, dtype)
  top = int(max((part.max() for part in (train, val) if len(part)), default=0))
  return Corpus(train, val, tokenizer.vocab_size,
                f"{what}: {len(docs):,} documents, tokenizer {tokenizer.name}", top)


def _token_file(path: str, dtype: np.dtype) -> np.ndarray:
  """The tokens of a `.bin` file: a read-only memory map, or in memory if remote."""
  if paths.is_remote(path):
    return np.frombuffer(paths.resolve(path).read_bytes(), dtype)
  if not os.path.getsize(path):
    return np.zeros(0, dtype)  # np.memmap refuses an empty file
  return np.memmap(path, dtype=dtype, mode="r")


def _windows(tokens, starts: np.ndarray, seq_len: int) -> np.ndarray:
  return np.asarray(tokens[starts[:, None] + np.arange(seq_len + 1)], np.int32)


def sample_batch(tokens, seed: int, step: int, batch_size: int, seq_len: int,
                 rows: np.ndarray | None = None) -> np.ndarray:
  """Training batch `step`: `batch_size` random windows of `seq_len + 1` tokens, or only
  its `rows` (indices into the batch; a process's share of it), reading only those.

  A pure function of `(seed, step)` (its own NumPy generator), so resuming at any step
  reproduces the same data.
  """
  rng = np.random.default_rng([seed, step])
  starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)
  return _windows(tokens, starts if rows is None else starts[rows], seq_len)


def eval_batch(tokens, index: int, batch_size: int, seq_len: int,
               rows: np.ndarray | None = None) -> np.ndarray:
  """Validation batch `index`: consecutive non-overlapping windows (wrapping around), or
  only its `rows`."""
  n = (len(tokens) - 1) // seq_len
  windows = (index * batch_size + np.arange(batch_size)) % n
  return _windows(tokens, (windows if rows is None else windows[rows]) * seq_len, seq_len)


def unigram_entropy(tokens, vocab_size: int) -> float:
  """Entropy (nats/token) of the token frequencies of `tokens` (an array or `Blocks`,
  counted block by block): the loss of the best context-free predictor fitted to this
  very split, a floor for any unigram model."""
  counts = sum(np.bincount(chunk.astype(np.int64), minlength=vocab_size)
               for chunk in _chunks(tokens)).astype(np.float64)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


def perplexity(loss: float) -> float:
  return math.exp(min(loss, 700.0))
