"""Token data at scale: `python -m train.tokenize`'s speed, and the memory and time of
loading a large `.bin` and drawing batches from it, memory-mapped (`train.data`) and
read whole as before (`np.fromfile`, then the train blocks joined into one array).

    nice python benchmarks/token_data.py --gib 1 --out benchmarks/results/token_data.json

The `.bin` (random uint16 ids, with a `train.tokenize` sidecar) is written to a temporary
directory and deleted afterwards; it is in the page cache when loaded, so the times are
of memory, not disk. Resident memory is read from /proc before and after: private
(RssAnon) and file pages mapped (RssFile; the kernel maps pages around each one read).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train import data, tokenize  # noqa: E402


def rss_mib() -> np.ndarray:
  """Resident memory (MiB): private (RssAnon), file pages mapped (RssFile: the page
  cache, shared and reclaimable)."""
  with open("/proc/self/status") as f:
    kib = dict(line.split()[:2] for line in f if line.startswith(("RssAnon:", "RssFile:")))
  return np.array([int(kib["RssAnon:"]), int(kib["RssFile:"])]) / 1024


def growth(before: np.ndarray) -> dict:
  anon, file = rss_mib() - before
  return {"private_mib": round(anon, 1), "file_pages_mib": round(file, 1)}


def draw(train, batches: int, batch_size: int, seq_len: int) -> float:
  """Seconds per batch of `batch_size` windows."""
  start = time.perf_counter()
  for step in range(batches):
    data.sample_batch(train, 0, step, batch_size, seq_len)
  return (time.perf_counter() - start) / batches


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--gib", type=float, default=1.0, help="size of the .bin")
  parser.add_argument("--batch-size", type=int, default=512)
  parser.add_argument("--seq-len", type=int, default=1024)
  parser.add_argument("--batches", type=int, default=20)
  parser.add_argument("--out", default=None, help="JSON results")
  args = parser.parse_args()
  result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                       f"Python {platform.python_version()}, NumPy {np.__version__}"}
  with tempfile.TemporaryDirectory() as tmp:
    # tokenize: the default corpus (standard library sources), byte tokenizer
    text = os.path.join(tmp, "stdlib.txt")
    with open(text, "w") as f:
      f.writelines(t for _, t in data.stdlib_documents())
    mb = os.path.getsize(text) / 2**20
    start = time.perf_counter()
    tokenize.tokenize([text], os.path.join(tmp, "stdlib.bin"), data.ByteTokenizer(),
                      say=lambda line: None)
    seconds = time.perf_counter() - start
    result["tokenize"] = {"mib": round(mb, 1), "seconds": round(seconds, 2),
                          "mib_per_s": round(mb / seconds, 1)}
    # a large .bin and its sidecar
    path = os.path.join(tmp, "big.bin")
    n = int(args.gib * 2**30) // 2
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
      for i in range(0, n, 1 << 26):
        f.write(rng.integers(0, 32000, min(1 << 26, n - i), dtype=np.uint16).tobytes())
    with open(path + ".json", "w") as f:
      json.dump({"dtype": "uint16", "vocab_size": 32000, "max_id": 31999}, f)
    shape = {"tokens": n, "batch_size": args.batch_size, "seq_len": args.seq_len}
    before = rss_mib()
    start = time.perf_counter()
    corpus = data.load_corpus(path, val_fraction=0.05)
    load = time.perf_counter() - start
    per_batch = draw(corpus.train, args.batches, args.batch_size, args.seq_len)
    result["memmap"] = {**shape, "load_s": round(load, 3),
                        "batch_ms": round(per_batch * 1e3, 2), **growth(before)}
    del corpus
    before = rss_mib()
    start = time.perf_counter()  # the loader before: the file read, the train blocks joined
    tokens = np.fromfile(path, np.uint16)
    size = data.BIN_BLOCK_TOKENS
    blocks = [(f"block{i}", tokens[i * size:(i + 1) * size])
              for i in range(-(-len(tokens) // size))]
    train, _ = data.split_documents(blocks, 0.05)
    train = np.concatenate([b for _, b in train])
    load = time.perf_counter() - start
    per_batch = draw(train, args.batches, args.batch_size, args.seq_len)
    result["read_whole"] = {**shape, "load_s": round(load, 3),
                            "batch_ms": round(per_batch * 1e3, 2), **growth(before)}
  print(json.dumps(result, indent=2))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
