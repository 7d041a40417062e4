"""Validation loss of every registered optimizer on the README's Quickstart, each tuned.

Trains the tiny LLaMA on the Quickstart's setting (``--model tiny --steps 300
--batch-size 16 --seq-len 128``, the standard library corpus, byte tokens) with
every optimizer of ``train.optimizers.available()`` (``adamw``,
``adamw_lr_scaled`` and the library's aliases), each at its own best learning
rate:

1. a learning-rate sweep at seed ``--seeds[0]``: three half-decade values
   around the optimizer's centre (``3e-3`` for the AdamW baselines, ``1e-2``,
   the Quickstart's GaLore rate, for the low-rank optimizers and
   ``adamw_lr_scaled``, whose projected matrices step at ``lr · 0.25``;
   ``--lrs`` overrides the sweep for every optimizer). A best rate at an end of the sweep extends it by the next half-decade on that
   side, until the best is inside (or at 1e-4 or 1e-1).
2. the other ``--seeds`` at the rate with the lowest final validation loss.

The low-rank optimizers get the Quickstart's ``--rank 0.5`` (half of each
projected matrix's smaller side) where their default rank is above 1 (APOLLO-
Mini and VLoRP keep their rank-1 defaults) and ``--update-proj-gap 100`` where
they take a gap (FRUGAL its ``columns`` subspace and GUM ``--scan-layers``, which
the trainer's one-matrix-per-layer model needs, and VLoRP granularity 32, which
divides the tiny model's sides); everything else is each optimizer's default. ``adamw_lr_scaled``
is AdamW with GaLore's per-group rates (``lr · scale`` on the matrices GaLore
projects, ``lr`` elsewhere; scale 0.25), the baseline that isolates GaLore's
projection from its smaller step on the matrices.

Each run is ``python -m train.pretrain ... --out <runs-dir>/<name>`` in a
subprocess (stdout in ``<runs-dir>/<name>/stdout.log``); a run whose
``summary.json`` exists is read, not rerun, so the sweep can be run in pieces
(interrupt it and start it again). A run that fails (a diverged loss ends the
trainer with an error) counts as infinitely bad. The script prints a markdown
table (best rate, final validation loss mean ± half the range over seeds) and
writes ``benchmarks/results/quality.json`` and ``quality.png`` (validation
loss against learning rate per optimizer).

Usage:
  python benchmarks/quality.py                                   # everything: ~120 runs
  python benchmarks/quality.py --optimizers adamw adamw_lr_scaled galore --seeds 0
  python benchmarks/quality.py --steps 4 --eval-every 2 --optimizers adamw galore \\
      --lrs 1e-3 --runs-dir /tmp/q --out /tmp/q.json              # smoke test
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Half-decade learning rates; a sweep is the three around an optimizer's centre.
LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
ADAMW_CENTRE, LOWRANK_CENTRE = 3e-3, 1e-2
QUICKSTART_RANK, QUICKSTART_GAP = "0.5", "100"
# The trainer's default layout is one matrix per layer: FRUGAL takes its `columns`
# subspace there (its default `blocks` needs stacked layers), GUM needs the stacked
# (scanned) layers for its layer draw. VLoRP's default granularity 256 does not divide the
# tiny model's sides (64 to 352): granularity 32 at its rank 1 is the finest unit of the
# budget c·r = 32 that benchmarks/granularity.py uses on this model.
EXTRA_FLAGS = {"frugal": ["--opt-args", "subspace=columns"], "gum": ["--scan-layers"],
               "vlorp": ["--opt-args", "granularity=32"]}


def centre(name: str) -> float:
  return ADAMW_CENTRE if name == "adamw" else LOWRANK_CENTRE


def sweep(name: str, lrs=None) -> list[float]:
  if lrs:
    return list(lrs)
  i = LRS.index(centre(name))
  return list(LRS[i - 1:i + 2])


def optimizer_flags(name: str) -> list[str]:
  """The Quickstart's low-rank flags that optimizer `name` takes."""
  import optax_lowrank  # pylint: disable=g-import-not-at-top
  factory = getattr(optax_lowrank, "optimizers", {}).get(name)
  if factory is None:  # adamw, adamw_lr_scaled
    return []
  params = inspect.signature(factory).parameters
  flags = []
  rank = params.get("rank")
  if rank is not None and (rank.default is inspect.Parameter.empty or rank.default > 1):
    flags += ["--rank", QUICKSTART_RANK]
  if "update_proj_gap" in params:
    flags += ["--update-proj-gap", QUICKSTART_GAP]
  return flags + EXTRA_FLAGS.get(name, [])


def run_name(name: str, lr: float, seed: int) -> str:
  return f"{name}_lr{lr:g}_s{seed}"


def run_one(name: str, lr: float, seed: int, a) -> dict:
  """Runs (or reads the finished) `name` at `lr` and `seed`; returns its record."""
  out_dir = os.path.join(a.runs_dir, run_name(name, lr, seed))
  argv = (["--model", "tiny", "--optimizer", name, "--lr", f"{lr:g}", *optimizer_flags(name),
           "--steps", str(a.steps), "--batch-size", str(a.batch_size), "--seq-len",
           str(a.seq_len), "--eval-every", str(a.eval_every), "--seed", str(seed),
           "--out", out_dir])
  command = "python -m train.pretrain " + " ".join(argv)
  record = dict(optimizer=name, lr=lr, seed=seed, command=command, out=out_dir)
  summary_path = os.path.join(out_dir, "summary.json")
  failed_path = os.path.join(out_dir, "failed.json")
  if os.path.exists(summary_path):
    print(f"[done] {run_name(name, lr, seed)}", flush=True)
  elif os.path.exists(failed_path):
    print(f"[failed before] {run_name(name, lr, seed)}", flush=True)
    return dict(record, **_read_json(failed_path), val_loss=math.inf)
  else:
    print(f"[run] {command}", flush=True)
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    with open(os.path.join(out_dir, "stdout.log"), "w") as log:
      proc = subprocess.run([sys.executable, "-m", "train.pretrain", *argv], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
      lines = open(os.path.join(out_dir, "stdout.log")).read().strip().splitlines()
      error = lines[-1] if lines else ""
      print(f"  failed ({proc.returncode}): {error}", flush=True)
      failure = dict(returncode=proc.returncode, error=error, wall_s=wall)
      with open(failed_path, "w") as f:
        json.dump(failure, f)
      return dict(record, **failure, val_loss=math.inf)
    with open(os.path.join(out_dir, "wall.json"), "w") as f:
      json.dump({"wall_s": wall}, f)
  summary = _read_json(summary_path)
  wall = _read_json(os.path.join(out_dir, "wall.json")).get("wall_s")
  print(f"  {name} lr {lr:g} seed {seed}: val loss {summary['val_loss']:.4f}"
        + (f" ({wall:.0f} s)" if wall else ""), flush=True)
  return dict(record, val_loss=summary["val_loss"], val_ppl=summary["val_ppl"],
              unigram_loss=summary.get("unigram_loss"), wall_s=wall)


def tune(name: str, a) -> list[dict]:
  """The sweep's runs at the first seed; without `--lrs`, a best rate at an end of the
  sweep extends it by the next half-decade on that side (within `LRS`)."""
  lrs = sweep(name, a.lrs)
  runs = [run_one(name, lr, a.seeds[0], a) for lr in lrs]
  while not a.lrs:
    best = min(runs, key=lambda r: r["val_loss"])
    side = -1 if best["lr"] == min(lrs) else 1 if best["lr"] == max(lrs) else 0
    i = LRS.index(best["lr"]) + side
    if not side or not 0 <= i < len(LRS) or not math.isfinite(best["val_loss"]):
      return runs
    lrs.append(LRS[i])
    runs.append(run_one(name, LRS[i], a.seeds[0], a))
  return runs


def _read_json(path):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def summarize(name: str, runs: list[dict], seeds: list[int]) -> dict:
  """The best rate at the first seed, and the final loss over the seeds run at it."""
  first = [r for r in runs if r["seed"] == seeds[0]]
  best = min(first, key=lambda r: r["val_loss"])
  at_best = [r["val_loss"] for r in runs if r["lr"] == best["lr"]]
  finite = [v for v in at_best if math.isfinite(v)]
  return dict(optimizer=name, best_lr=best["lr"], lrs=sorted({r["lr"] for r in first}),
              sweep={f"{r['lr']:g}": r["val_loss"] for r in first},
              seeds=[r["seed"] for r in runs if r["lr"] == best["lr"]],
              val_losses=at_best,
              mean=sum(finite) / len(finite) if finite else math.inf,
              half_range=(max(finite) - min(finite)) / 2 if finite else math.nan)


def markdown(rows: list[dict]) -> str:
  lines = ["| optimizer | learning rates tried (val loss, first seed) | best lr | seeds | "
           "val loss (mean ± half range) |", "|---|---|--:|--:|--:|"]
  for r in sorted(rows, key=lambda r: r["mean"]):
    tried = ", ".join(f"{lr}: {v:.4f}" if math.isfinite(v) else f"{lr}: failed"
                      for lr, v in sorted(r["sweep"].items(), key=lambda kv: float(kv[0])))
    spread = f" ± {r['half_range']:.4f}" if len(r["seeds"]) > 1 else ""
    lines.append(f"| `{r['optimizer']}` | {tried} | {r['best_lr']:g} | "
                 f"{', '.join(map(str, r['seeds']))} | {r['mean']:.4f}{spread} |")
  return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(8, 5))
  for r in rows:
    points = sorted((float(lr), v) for lr, v in r["sweep"].items() if math.isfinite(v))
    if not points:
      continue
    style = "--" if r["optimizer"].startswith("adamw") else "-"
    ax.plot(*zip(*points), style, marker="o", label=r["optimizer"])
  ax.set_xscale("log")
  ax.set_xlabel("peak learning rate")
  ax.set_ylabel("final validation loss (nats/byte)")
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  from train import optimizers  # pylint: disable=g-import-not-at-top
  names = list(optimizers.available())
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--optimizers", nargs="+", default=names, metavar="NAME",
                  help="default: every registered optimizer")
  ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1],
                  help="the first one sweeps the learning rate")
  ap.add_argument("--lrs", nargs="+", type=float, default=None,
                  help="the sweep of every optimizer (default: three around its centre)")
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--batch-size", type=int, default=16)
  ap.add_argument("--seq-len", type=int, default=128)
  ap.add_argument("--eval-every", type=int, default=100)
  ap.add_argument("--runs-dir", default=os.path.join(ROOT, "runs", "quality"))
  ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                "quality.json"))
  a = ap.parse_args(argv)
  unknown = [n for n in a.optimizers if n not in names]
  if unknown:
    ap.error(f"--optimizers: unknown {unknown}; choose from {', '.join(names)}")

  rows, runs = [], []
  for name in a.optimizers:
    mine = tune(name, a)
    best = min(mine, key=lambda r: r["val_loss"])
    if math.isfinite(best["val_loss"]):
      mine += [run_one(name, best["lr"], seed, a) for seed in a.seeds[1:]]
    runs += mine
    rows.append(summarize(name, mine, a.seeds))

  table = markdown(rows)
  print("\n" + table)
  command = "python benchmarks/quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
  title = (f"tiny LLaMA, {a.steps} steps, batch {a.batch_size}x{a.seq_len}; "
           f"best-lr sweep at seed {a.seeds[0]}")
  os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
  plot(rows, os.path.splitext(a.out)[0] + ".png", title)
  with open(a.out, "w") as f:
    json.dump(dict(command=command, python=platform.python_version(),
                   machine=f"{platform.machine()}, {os.cpu_count()} CPUs",
                   load_average=os.getloadavg(),
                   timestamp_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   settings=vars(a), summary=rows, runs=runs, table=table),
              f, indent=1, default=str)
  print(f"\nwrote {a.out}")


if __name__ == "__main__":
  main()
