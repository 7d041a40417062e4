"""Checks of the trainer's flags, before anything loads or compiles, and of what a
resumed run may change.

`check(args, error)` checks every value, the data and tokenizer files and that the output
directories can be written; `error` (argparse's `parser.error`) exits with one line naming
the flag. `resume_changes` compares the flags stored with a checkpoint with this run's:
a flag that shapes the train state may not change, the others (schedule, data, mesh) may.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from typing import Any, Callable

from train import paths

# Flags that decide the train state's arrays: a resumed run must keep them.
SHAPE_FLAGS = ("model", "optimizer", "rank", "proj_type", "opt_args", "scan_layers",
               "param_dtype", "weight_quant", "spike_window", "tokenizer", "vocab_size",
               "velora", "velora_groups")
# Flags that name where things go or what is reported, not what is trained: not
# compared on resume.
PLACE_FLAGS = ("config", "out", "ckpt_dir", "stop_at", "mesh_shape", "dcn_shape",
               "log_every", "tensorboard", "profile_steps", "peak_tflops")
MIN_FREE_BYTES = 1 << 20  # --out needs at least this much free space


def _flag(name: str) -> str:
  return "--" + name.replace("_", "-")


def check(args, error: Callable[[str], None]) -> None:
  """Every flag's value; calls `error` (which exits) with one line on the first bad one.
  Flags a program does not have (fine-tuning has no corpus flags) are passed over."""
  for name in ("steps", "batch_size", "micro_batches", "eval_every", "eval_batches",
               "eval_batch_size", "update_proj_gap", "keep", "ckpt_every", "stop_at",
               "seq_len", "vocab_size", "corpus_bytes", "max_nonfinite_steps",
               "log_every"):
    value = getattr(args, name, None)
    if value is not None and value <= 0:
      error(f"{_flag(name)}: must be positive, got {value}")
  if args.seed < 0:
    error(f"--seed: must be non-negative, got {args.seed}")
  if args.spike_window < 2:
    error(f"--spike-window: must be at least 2, got {args.spike_window}")
  if args.stop_at is not None and args.stop_at > args.steps:
    error(f"--stop-at: must be at most --steps ({args.steps}), got {args.stop_at}")
  profile = args.profile_steps
  if profile is not None and (len(profile) != 2 or not 1 <= profile[0] <= profile[1]
                              or profile[0] > args.steps):
    error(f"--profile-steps: expected START,END with 1 <= START <= END and START at most "
          f"--steps ({args.steps}), got {','.join(map(str, profile))}")
  # floats: (name, low, high, low inclusive, high inclusive); None: no bound
  ranges = (("lr", 0, None, False, False), ("warmup", 0, 1, True, False),
            ("final_lr_fraction", 0, 1, True, True), ("weight_decay", 0, None, True, False),
            ("clip", 0, None, True, False), ("b1", 0, 1, True, False),
            ("b2", 0, 1, True, False), ("eps", 0, None, True, False),
            ("scale", 0, None, False, False), ("val_fraction", 0, 1, False, False),
            ("spike_factor", 0, None, False, False), ("peak_tflops", 0, None, False, False))
  for name, low, high, low_in, high_in in ranges:
    value = getattr(args, name, None)
    if value is None:
      continue
    bad = (not math.isfinite(value) or (value < low if low_in else value <= low)
           or (high is not None and (value > high if high_in else value >= high)))
    if bad:
      lo, hi = ("[" if low_in else "(") + str(low), str(high) + ("]" if high_in else ")")
      where = f"in {lo}, {hi}" if high is not None else (
          "non-negative" if low_in else "positive")
      error(f"{_flag(name)}: must be {where} (and finite), got {value}")
  if hasattr(args, "data_dtype"):  # the pretraining corpus
    _check_files(args, error)
  for name in ("out", "ckpt_dir"):
    path = getattr(args, name)
    why = path is not None and unwritable(path)
    if why:
      error(f"{_flag(name)}: {why}")


def _check_files(args, error) -> None:
  if args.data is not None:
    path, file = args.data, paths.resolve(args.data)
    if not file.exists():
      error(f"--data: file not found: {path}")
    if not file.is_file():
      error(f"--data: {path} is not a file")
    if not path.endswith((".txt", ".jsonl", ".bin")):
      error(f"--data: expected a .txt, .jsonl or .bin file, got {path}")
    size = file.stat().length
    if size == 0:
      error(f"--data: {path} is empty")
    itemsize = {"uint16": 2, "uint32": 4}.get(args.data_dtype)
    if path.endswith(".bin") and itemsize and size % itemsize:
      error(f"--data: {path} has {size} bytes, not a whole number of {args.data_dtype} "
            "tokens (see --data-dtype)")
  if args.tokenizer is not None and not paths.resolve(args.tokenizer).is_file():
    error(f"--tokenizer: file not found: {args.tokenizer}")


def unwritable(path: str) -> str | None:
  """Why directory `path` cannot be created and written to, or None if it can (tested by
  creating a temporary file in it or in its nearest existing ancestor). A remote `path`
  (`gs://...`) is not tested: the first write there reports what is wrong."""
  if paths.is_remote(path):
    return None
  probe = os.path.abspath(path)
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    return f"cannot create {path}: {probe} is not a directory"
  try:
    with tempfile.TemporaryFile(dir=probe):
      pass
  except OSError as e:
    return f"cannot write in {probe}: {e.strerror or e}"
  free = shutil.disk_usage(probe).free
  if free < MIN_FREE_BYTES:
    return f"no space left on the device of {probe} ({free:,} bytes free)"
  return None


def flags_of(args) -> dict[str, Any]:
  """The flags as JSON values (stored with every checkpoint)."""
  return json.loads(json.dumps(vars(args), default=str))


def _show(value: Any) -> str:
  if value is None:
    return "unset"
  if isinstance(value, dict):
    return ",".join(f"{k}={v}" for k, v in sorted(value.items())) or "none"
  return str(value)


def resume_changes(saved: dict[str, Any], current: dict[str, Any]):
  """(error, changes): `error` is one line about the first shape-defining flag that
  differs (None if none does), `changes` lists the other flags that differ."""
  error, changes = None, []
  for name in sorted(set(saved) | set(current)):
    if name in PLACE_FLAGS:
      continue
    old, new = saved.get(name), current.get(name)
    if old == new:
      continue
    if name in SHAPE_FLAGS and error is None:
      error = (f"{_flag(name)}: the checkpoint was written with {_flag(name)} "
               f"{_show(old)}, this run has {_flag(name)} {_show(new)}; a resumed run "
               "cannot change it (resume with the old value, or use a new --ckpt-dir)")
    elif name not in SHAPE_FLAGS:
      changes.append(f"{_flag(name)} {_show(old)} → {_show(new)}")
  return error, changes
