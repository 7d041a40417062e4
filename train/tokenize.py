"""Tokenize .txt/.jsonl files into a .bin of token ids for `train.pretrain --data`.

    python -m train.tokenize corpus.jsonl more.txt --out data/corpus.bin \\
        --tokenizer tokenizer.json

Documents are those `train.pretrain` reads from the same files (.jsonl: the `text` field
of each line; .txt: 8 KiB chunks cut at newlines), each followed by the tokenizer's
end-of-text token. Ids are uint16 when the vocabulary has at most 65,536 entries, else
uint32, in native byte order. The files are read and the ids written as they go, so
neither is held in memory whole. Beside the .bin, `<out>.json` records its dtype,
vocabulary size, largest id, tokenizer, end-of-text id and counts; `train.pretrain` reads
it. Paths may be remote (`gs://...`).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import numpy as np

from train import data, paths

CHUNK_TOKENS = 1 << 22  # ids written at a time


def tokenize(inputs: Sequence[str], out: str, tokenizer, progress_mb: float = 100.0,
             say=print) -> dict:
  """Writes the ids of every document of `inputs` (each followed by the end-of-text id,
  if `tokenizer` has one) to `out` and the sidecar `<out>.json`; returns the sidecar."""
  dtype = data.token_dtype(tokenizer.vocab_size)
  eos = np.asarray([] if tokenizer.eos_id is None else [tokenizer.eos_id], dtype)
  total = sum(paths.resolve(path).stat().length for path in inputs)
  bar = None
  if sys.stdout.isatty():
    from tqdm import tqdm
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenize")
  pending, waiting, count, documents, top, read, shown = [], 0, 0, 0, 0, 0, 0
  target = paths.resolve(out)
  target.parent.mkdir(parents=True, exist_ok=True)
  with target.open("wb") as f:
    def flush() -> int:
      """Writes the pending ids; returns the largest."""
      ids = np.concatenate(pending) if pending else np.zeros(0, dtype)
      f.write(ids.tobytes())
      pending.clear()
      return int(ids.max(initial=0))

    for path in inputs:
      for _, text in data.iter_documents(path):
        ids = tokenizer.encode(text).astype(dtype)
        pending += [ids, eos]
        waiting, count = waiting + len(ids) + len(eos), count + len(ids) + len(eos)
        documents += 1
        size = len(text.encode("utf-8"))
        read += size
        if bar is not None:
          bar.update(size)
        elif read - shown >= progress_mb * 2**20:
          shown = read
          say(f"tokenize: {read / 2**20:,.0f} of {total / 2**20:,.0f} MB, {count:,} tokens")
        if waiting >= CHUNK_TOKENS:
          top, waiting = max(top, flush()), 0
    top = max(top, flush())
  if bar is not None:
    bar.close()
  meta = {"dtype": np.dtype(dtype).name, "vocab_size": tokenizer.vocab_size, "max_id": top,
          "tokenizer": getattr(tokenizer, "path", tokenizer.name),
          "eos_id": tokenizer.eos_id, "tokens": count,
          "documents": documents, "inputs": list(inputs)}
  paths.resolve(out + ".json").write_text(json.dumps(meta, indent=2))
  return meta


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(prog="python -m train.tokenize", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("inputs", nargs="+", help=".txt or .jsonl files (field text)")
  parser.add_argument("--out", required=True, help="the .bin to write (and <out>.json)")
  parser.add_argument("--tokenizer", default=None,
                      help="tokenizer.json (needs `tokenizers`); default: UTF-8 bytes")
  parser.add_argument("--progress-mb", type=float, default=100.0,
                      help="a progress line per this many MB read (when not on a terminal; "
                      "on one, a progress bar)")
  args = parser.parse_args(argv)
  for path in args.inputs:
    if not path.endswith((".txt", ".jsonl")):
      parser.error(f"inputs: expected .txt or .jsonl files, got {path}")
    if not paths.resolve(path).is_file():
      parser.error(f"inputs: file not found: {path}")
  if not args.out.endswith(".bin"):
    parser.error(f"--out: expected a .bin file, got {args.out}")
  if args.tokenizer is not None and not paths.resolve(args.tokenizer).is_file():
    parser.error(f"--tokenizer: file not found: {args.tokenizer}")
  if not args.progress_mb > 0:
    parser.error(f"--progress-mb: must be positive, got {args.progress_mb}")
  tokenizer = data.BPETokenizer(args.tokenizer) if args.tokenizer else data.ByteTokenizer()
  try:
    meta = tokenize(args.inputs, args.out, tokenizer, args.progress_mb)
  except data.DataError as e:
    raise SystemExit(f"python -m train.tokenize: error: inputs: {e}") from None
  print(f"{args.out}: {meta['tokens']:,} tokens ({meta['dtype']}) of {meta['documents']:,} "
        f"documents; {args.out}.json")
  return meta


if __name__ == "__main__":
  main()
