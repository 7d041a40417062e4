"""Overlay the train/validation loss curves of one or more runs in one PNG.

    python -m train.plot runs/adamw runs/galore --out compare.png
"""

from __future__ import annotations

import argparse
import io
import json
import os
from typing import Sequence

from train import paths

METRICS = "metrics.jsonl"


def read_metrics(run_dir: str) -> tuple[list[dict], list[dict]]:
  """(train records, eval records) from a run directory's metrics.jsonl (unreadable
  lines, e.g. one torn by a kill, are skipped)."""
  path = paths.resolve(run_dir) / METRICS
  if not path.exists():
    raise FileNotFoundError(f"{path} not found (is {run_dir!r} a run directory?)")
  train, evals = [], []
  with path.open() as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(record, dict):
        (evals if "val_loss" in record else train).append(record)
  return train, evals


def _smooth(values: Sequence[float], weight: float = 0.9) -> list[float]:
  """Exponential moving average, debiased (no lag towards the first value)."""
  out, avg = [], 0.0
  for t, v in enumerate(values, start=1):
    avg = weight * avg + (1 - weight) * v
    out.append(avg / (1 - weight ** t))
  return out


def plot_runs(run_dirs: Sequence[str], out: str, labels: Sequence[str] | None = None,
              baseline: float | None = None) -> str:
  """Writes the PNG `out` (local or remote) and returns its path."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  labels = list(labels) if labels else [paths.resolve(d).name for d in run_dirs]
  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
  for i, (run_dir, label) in enumerate(zip(run_dirs, labels)):
    color = f"C{i}"
    train, evals = read_metrics(run_dir)
    if train:
      steps = [r["step"] for r in train]
      losses = [r["loss"] for r in train]
      ax.plot(steps, losses, color=color, alpha=0.2, linewidth=0.8)
      ax.plot(steps, _smooth(losses), color=color, linewidth=1.5, label=f"{label} train")
    if evals:
      ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o--",
              color=color, markersize=3.5, label=f"{label} val")
  if baseline is not None:
    ax.axhline(baseline, color="gray", linestyle=":", label="unigram baseline (val)")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats / token)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  png = io.BytesIO()  # matplotlib writes local files only: the bytes go through epath
  fig.savefig(png, format="png")
  plt.close(fig)
  target = paths.resolve(out)
  target.parent.mkdir(parents=True, exist_ok=True)
  target.write_bytes(png.getvalue())
  return out


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m train.plot", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl)")
  parser.add_argument("--out", default="loss.png", help="output PNG path")
  parser.add_argument("--labels", default=None, help="comma-separated legend labels")
  args = parser.parse_args(argv)
  labels = args.labels.split(",") if args.labels else None
  if labels and len(labels) != len(args.runs):
    parser.error(f"--labels: got {len(labels)} labels for {len(args.runs)} runs")
  for run in args.runs:
    if not (paths.resolve(run) / METRICS).exists():
      parser.error(f"runs: {os.path.join(run, METRICS)} not found")
  print(plot_runs(args.runs, args.out, labels, baseline=_shared_baseline(args.runs)))


def _shared_baseline(run_dirs: Sequence[str]) -> float | None:
  """The runs' unigram baseline (config.json), when they all report the same one."""
  values = set()
  for run in run_dirs:
    try:
      config = json.loads((paths.resolve(run) / "config.json").read_text())
      values.add(config.get("unigram_baseline"))
    except (OSError, ValueError):
      return None
  return values.pop() if len(values) == 1 and None not in values else None


if __name__ == "__main__":
  main()
