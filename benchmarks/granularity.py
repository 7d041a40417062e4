"""VLoRP at a fixed memory budget: validation loss of the tiny LLaMA per granularity level.

VLoRP (Wang et al., ICML 2025, arXiv 2505.01744) regroups each projected
matrix with granularity ``c`` and projects it to rank ``r``; its first moment
is ``max(m, n)·c·r`` floats per matrix, so ``c·r`` is the memory budget. The
paper fixes ``c·r = 256`` and finds the finest unit (``c = 256, r = 1``) best
for fine-tuning. The trainer's tiny LLaMA (d_model 128, d_ff 352, 4 layers, 2
KV heads) has 64 as its smallest projected side and 32 as the largest power
of two dividing every projected side, so the budget here is ``c·r = 32``:

* ``vlorp`` at ``(c, r)`` = (32, 1), (8, 4), (2, 16), (1, 32), with the
  alias's defaults otherwise (gap 30, scale 0.25, Gaussian, ProjFactor);
* ``galore --rank 32`` as in the README's Quickstart (``--lr 1e-2
  --update-proj-gap 100``, scale 0.25);
* ``adamw --lr 3e-3`` (the Quickstart's baseline).

All runs share the Quickstart's ``--model tiny --steps 300 --batch-size 16
--seq-len 128`` and seed, and evaluate on the same validation windows
(``--eval-batch-size 16`` everywhere, since the default is the micro-batch).
VLoRP's learning rate is picked first at ``(8, 4)`` from ``--vlorp-lrs``
(lowest final validation loss) and then used for every level. Two more runs
use the chosen level with ``--micro-batches 4`` (same global batch):
``--accumulate subspace`` (``optax_lowrank.MultiSteps``: projected
micro-gradients, each micro-batch clipped) and ``--accumulate full``
(full-size accumulation in the step, the mean clipped).

Each run is ``python -m train.pretrain ... --out <runs-dir>/<name>`` in a
subprocess; its stdout goes to ``<runs-dir>/<name>/stdout.log``. The script
reads ``summary.json`` (final validation loss) and ``metrics.jsonl``
(validation curve, step times), parses the trainer's ``train step memory per
device`` line, and counts the optimizer-state bytes exactly
(``jax.eval_shape`` of the same optimizer the trainer builds, through
``train.pretrain.parse_args`` and ``train.optimizers``). It writes
``benchmarks/results/granularity.json`` and ``granularity.png`` and prints a
markdown table.

Optional extras: ``--extra-seeds S ...`` (the four levels again with
``--seed S`` and VLoRP's projection seed ``S``), ``--extra-lrs LR ...`` (the
``(8, 4)`` level at more learning rates, not used to choose) and
``--clip-off-check`` (``(8, 4)`` with ``--clip 0``, in one batch and with
``--accumulate subspace``: without the per-micro-batch clip they should train
alike).

Usage:
  python benchmarks/granularity.py                  # 9 runs, 49 min on 2 busy CPU cores
  python benchmarks/granularity.py --reuse --extra-seeds 1 --extra-lrs 1e-3 \
      --clip-off-check                              # docs/results.md: 16 runs
  python benchmarks/granularity.py --steps 4 --eval-every 2 --runs-dir /tmp/g \
      --out /tmp/g.json                             # smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LEVELS = ((32, 1), (8, 4), (2, 16), (1, 32))
LR_LEVEL = (8, 4)
MEMORY_RE = re.compile(
    r"train step memory per device: arguments ([\d.]+) MiB, outputs ([\d.]+) "
    r"MiB \(aliased ([\d.]+) MiB\), temporaries ([\d.]+) MiB")


def vlorp_name(c: int, r: int, lr: float, suffix: str = "") -> str:
  return f"vlorp_c{c}_r{r}_lr{lr:g}{suffix}"


def common_flags(a, seed=None) -> list[str]:
  seed = a.seed if seed is None else seed
  return ["--model", "tiny", "--steps", str(a.steps), "--batch-size",
          str(a.batch_size), "--seq-len", str(a.seq_len), "--seed", str(seed),
          "--eval-every", str(a.eval_every), "--eval-batch-size",
          str(a.batch_size)]


def vlorp_flags(c: int, r: int, lr: float, seed=None) -> list[str]:
  """``seed``: also the projections' (vlorp's ``seed``; default 0)."""
  opt_args = f"granularity={c}" + ("" if seed is None else f",seed={seed}")
  return ["--optimizer", "vlorp", "--opt-args", opt_args, "--rank", str(r),
          "--lr", f"{lr:g}"]


# ----------------------------------------------------------------------------
# Running and reading one configuration.


def run_one(name: str, flags: list[str], a, meta: dict, seed=None) -> dict:
  out_dir = os.path.join(a.runs_dir, name)
  argv = flags + common_flags(a, seed) + ["--out", out_dir]
  meta = dict(meta, seed=a.seed if seed is None else seed)
  command = "python -m train.pretrain " + " ".join(argv)
  summary_path = os.path.join(out_dir, "summary.json")
  log_path = os.path.join(out_dir, "stdout.log")
  wall = None
  if a.reuse and os.path.exists(summary_path) and _same_args(out_dir, argv):
    print(f"[reuse] {name}", flush=True)
    wall = _read_json(os.path.join(out_dir, "wall.json")).get("wall_s")
  else:
    print(f"[run] {command}", flush=True)
    os.makedirs(out_dir, exist_ok=True)
    for stale in ("summary.json", "metrics.jsonl"):
      if os.path.exists(os.path.join(out_dir, stale)):
        os.remove(os.path.join(out_dir, stale))
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
      proc = subprocess.run([sys.executable, "-m", "train.pretrain", *argv],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    with open(os.path.join(out_dir, "wall.json"), "w") as f:
      json.dump({"wall_s": wall, "returncode": proc.returncode}, f)
    if proc.returncode != 0:
      tail = open(log_path).read()[-2000:]
      print(f"  FAILED ({proc.returncode}); last output:\n{tail}", flush=True)
      return dict(meta, name=name, command=command, out=out_dir,
                  failed=proc.returncode, wall_s=wall)
  summary = _read_json(summary_path)
  from train.plot import read_metrics  # pylint: disable=g-import-not-at-top
  train, evals = read_metrics(out_dir)
  times = [r["step_time"] for r in train[1:] if "step_time" in r]
  losses = [r["loss"] for r in train]
  memory = None
  if os.path.exists(log_path):
    m = MEMORY_RE.search(open(log_path).read())
    if m:
      memory = dict(zip(("arguments_mib", "outputs_mib", "aliased_mib",
                         "temporaries_mib"), map(float, m.groups())))
  result = dict(
      meta, name=name, command=command, out=out_dir,
      val_loss=summary["val_loss"], val_ppl=summary["val_ppl"],
      unigram_loss=summary.get("unigram_loss"),
      val_curve=[[r["step"], r["val_loss"]] for r in evals],
      final_train_loss=losses[-1] if losses else None,
      diverged=not all(map(math.isfinite, losses + [summary["val_loss"]])),
      median_step_s=statistics.median(times) if times else None,
      wall_s=wall, train_step_memory=memory,
      state_bytes=state_bytes(argv),
  )
  print(f"  {name}: val loss {result['val_loss']:.4f} (ppl "
        f"{result['val_ppl']:.2f}), wall {wall or float('nan'):.0f}s, "
        f"state {result['state_bytes']['inner_optimizer']:,} B"
        + (f", temporaries {memory['temporaries_mib']} MiB" if memory else ""),
        flush=True)
  return result


def _read_json(path):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _same_args(out_dir, argv) -> bool:
  """Whether the finished run in ``out_dir`` was started with these flags."""
  from train.pretrain import parse_args  # pylint: disable=g-import-not-at-top
  saved = _read_json(os.path.join(out_dir, "config.json")).get("args", {})
  wanted = vars(parse_args(argv, num_devices=1))
  # Flags the trainer gained after the run are not in its config.json.
  keys = [k for k in wanted if k in saved and k != "mesh_shape"]
  return bool(saved) and all(str(saved[k]) == str(wanted[k]) for k in keys)


def state_bytes(argv) -> dict:
  """Exact optimizer-state bytes of the run's optimizer (``jax.eval_shape``).

  ``inner_optimizer`` is the state of the optimizer the trainer builds
  (with its global-norm clip); for ``--accumulate subspace`` runs
  ``multisteps_total`` is that of ``optax_lowrank.MultiSteps`` around it,
  whose accumulator (``accumulator``) holds the projected micro-gradients;
  ``--accumulate full`` keeps its full-size accumulator among the step's
  temporaries, not in the state.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import optax_lowrank  # pylint: disable=g-import-not-at-top
  from models import LlamaConfig, lowrank_spec  # pylint: disable=g-import-not-at-top
  from models.config import BYTE_VOCAB_SIZE  # pylint: disable=g-import-not-at-top
  from models.lowrank import params_tree  # pylint: disable=g-import-not-at-top
  from train import optimizers  # pylint: disable=g-import-not-at-top
  from train.pretrain import parse_args  # pylint: disable=g-import-not-at-top
  from train.steps import abstract_model  # pylint: disable=g-import-not-at-top

  args = parse_args(argv, num_devices=1)
  # The default corpus is byte-tokenized (no --data here): byte vocabulary.
  cfg = LlamaConfig.preset(args.model, vocab_size=BYTE_VOCAB_SIZE,
                           max_seq_len=args.seq_len)
  params = params_tree(abstract_model(cfg)[1])
  mask, dims = lowrank_spec(params, cfg)
  schedule = optimizers.make_schedule(args.lr, args.steps)
  tx = optimizers.build(args.optimizer, args, schedule, mask, dims)
  inner = _nbytes(jax.eval_shape(tx.init, params))
  out = dict(inner_optimizer=inner,
             n_params=sum(int(x.size) for x in jax.tree.leaves(params)))
  if args.micro_batches > 1 and args.accumulate != "full":
    multi = optax_lowrank.MultiSteps(
        optimizers.build(args.optimizer, args, schedule, mask, dims, clip=False),
        args.micro_batches)
    st = jax.eval_shape(multi.init, params)
    out.update(multisteps_total=_nbytes(st),
               accumulator=_nbytes((st.acc_grads, st.acc_projected)))
  return out


def _nbytes(tree) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------
# Output.


def label(r: dict) -> str:
  if r["optimizer"] == "vlorp":
    acc = r.get("accumulate")
    s = f"vlorp (c={r['c']}, r={r['r']}), lr {r['lr']:g}"
    if r.get("stage") == "extra seed":
      s += f", seed {r['seed']}"
    if r.get("clip") == 0:
      s += ", no clip"
    return s + (f", {r['micro_batches']} micro-batches, {acc}" if acc else "")
  if r["optimizer"] == "galore":
    return f"galore (rank {r['r']}), lr {r['lr']:g}"
  return f"adamw, lr {r['lr']:g}"


def markdown(results: list[dict]) -> str:
  lines = [
      "| run | c·r | val loss | val ppl | state KiB | train-step arguments MiB "
      "| train-step temporaries MiB | median step s | wall s |",
      "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
  ]
  for r in results:
    if r.get("failed") is not None:
      lines.append(f"| {label(r)} | | failed ({r['failed']}) | | | | | | |")
      continue
    mem = r["train_step_memory"] or {}
    sb = r["state_bytes"]
    state = sb["inner_optimizer"] / 1024
    state_txt = f"{state:.1f}"
    if "accumulator" in sb:
      state_txt += f" + {sb['accumulator'] / 1024:.1f} acc."
    budget = r["c"] * r["r"] if r["optimizer"] == "vlorp" else (
        r["r"] if r["optimizer"] == "galore" else "–")
    lines.append(
        f"| {label(r)} | {budget} | {r['val_loss']:.4f} | {r['val_ppl']:.2f} "
        f"| {state_txt} | {mem.get('arguments_mib', float('nan')):.1f} "
        f"| {mem.get('temporaries_mib', float('nan')):.1f} "
        f"| {r['median_step_s']:.3f} | {r['wall_s'] or float('nan'):.0f} |")
  return "\n".join(lines)


def plot(results: list[dict], chosen_lr: float, path: str, title: str = ""):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  ok = [r for r in results if r.get("failed") is None]
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8), dpi=120,
                               gridspec_kw=dict(width_ratios=[3, 2]))
  main = [r for r in ok if r.get("stage") not in ("extra seed", "clip off")]
  for i, r in enumerate(main):
    steps, losses = zip(*r["val_curve"])
    style = "o-" if r["optimizer"] == "vlorp" else "s--"
    ax.plot(steps, losses, style, markersize=3, color=f"C{i % 10}",
            label=f"{label(r)}: {r['val_loss']:.3f}")
  extra = [r for r in ok if r.get("stage") == "extra seed"]
  for k, r in enumerate(extra):
    steps, losses = zip(*r["val_curve"])
    ax.plot(steps, losses, ":", color="gray", alpha=0.6, linewidth=1,
            label=None if k else "vlorp levels, other seeds")
  if ok and ok[0].get("unigram_loss"):
    ax.axhline(ok[0]["unigram_loss"], color="gray", linestyle=":",
               label="unigram baseline")
  ax.set_xlabel("step")
  ax.set_ylabel("validation loss (nats / byte)")
  ax.set_ylim(top=min(ax.get_ylim()[1], 3.6))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  ax.set_title(f"Tiny LLaMA{title}: validation loss", fontsize=10)

  def at_levels(rs):
    return sorted(rs, key=lambda r: -r["c"])

  levels = at_levels(
      r for r in ok if r["optimizer"] == "vlorp" and r["lr"] == chosen_lr
      and r.get("stage") in ("level", "lr check"))
  xs = range(len(levels))
  seed0 = levels[0]["seed"] if levels else 0
  bx.plot(list(xs), [r["val_loss"] for r in levels], "o-", color="C0",
          label=f"vlorp, lr {chosen_lr:g}, seed {seed0}")
  index = {r["c"]: i for i, r in enumerate(levels)}
  seeds = sorted({r["seed"] for r in ok if r.get("stage") == "extra seed"})
  for k, seed in enumerate(seeds):
    rs = at_levels(r for r in ok if r.get("stage") == "extra seed"
                   and r["seed"] == seed and r["c"] in index)
    bx.plot([index[r["c"]] for r in rs], [r["val_loss"] for r in rs], "o:",
            color=f"C{(k + 4) % 10}", label=f"vlorp, lr {chosen_lr:g}, "
            f"seed {seed}")
  for i, (opt, color) in enumerate((("galore", "C3"), ("adamw", "C2"))):
    for r in ok:
      if r["optimizer"] == opt:
        bx.axhline(r["val_loss"], color=color, linestyle="--",
                   label=f"{label(r)}")
  for k, r in enumerate(x for x in ok if x["optimizer"] == "vlorp"
                        and x["lr"] != chosen_lr and not x.get("accumulate")):
    if r["c"] in index:
      bx.plot([index[r["c"]]], [r["val_loss"]], "x", color=f"C{(k + 1) % 10}",
              markersize=8, label=label(r))
  bx.set_xticks(list(xs), [f"c={r['c']}\nr={r['r']}" for r in levels])
  bx.set_xlabel("granularity level at c·r = 32 (finer to the left)")
  bx.set_ylabel("final validation loss")
  bx.grid(alpha=0.3)
  bx.legend(fontsize=7)
  bx.set_title("Final validation loss per level")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--batch-size", type=int, default=16)
  ap.add_argument("--seq-len", type=int, default=128)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--eval-every", type=int, default=25,
                  help="validation points on the curves (does not change "
                  "training: batch i depends only on the seed and i)")
  ap.add_argument("--vlorp-lrs", type=float, nargs="+", default=[3e-3, 1e-2])
  ap.add_argument("--micro-batches", type=int, default=4)
  ap.add_argument("--extra-seeds", type=int, nargs="*", default=[],
                  help="run every vlorp level again (chosen lr) with these "
                  "seeds (--seed and vlorp's projection seed): the "
                  "seed-to-seed spread")
  ap.add_argument("--clip-off-check", action="store_true",
                  help=f"vlorp at {LR_LEVEL} without clipping (--clip 0), in "
                  "one batch and with --accumulate subspace: without the "
                  "per-micro-batch clip the two should agree")
  ap.add_argument("--extra-lrs", type=float, nargs="*", default=[],
                  help=f"vlorp at {LR_LEVEL} with these learning rates too "
                  "(reported, not used to choose the rate)")
  ap.add_argument("--runs-dir", default=os.path.join("runs", "granularity"))
  ap.add_argument("--reuse", action="store_true",
                  help="keep finished runs whose config.json matches")
  ap.add_argument("--out", default=None, help="JSON path (default: "
                  "benchmarks/results/granularity.json; the PNG goes beside it)")
  a = ap.parse_args(argv)
  os.chdir(ROOT)
  t0 = time.perf_counter()
  results = []

  # 1. Learning rate of vlorp at one level.
  c, r = LR_LEVEL
  lr_check = []
  for lr in a.vlorp_lrs:
    res = run_one(vlorp_name(c, r, lr), vlorp_flags(c, r, lr), a,
                  dict(optimizer="vlorp", c=c, r=r, lr=lr, stage="lr check"))
    lr_check.append(res)
  finished = [x for x in lr_check if x.get("failed") is None
              and math.isfinite(x["val_loss"])]
  if not finished:
    raise SystemExit("every lr-check run failed")
  chosen = min(finished, key=lambda x: x["val_loss"])["lr"]
  print(f"chosen vlorp lr: {chosen:g}", flush=True)
  results += lr_check

  # 2. The other levels at that learning rate.
  for c, r in LEVELS:
    if (c, r) == LR_LEVEL:
      continue
    results.append(run_one(
        vlorp_name(c, r, chosen), vlorp_flags(c, r, chosen), a,
        dict(optimizer="vlorp", c=c, r=r, lr=chosen, stage="level")))

  # 3. Baselines.
  results.append(run_one(
      "galore_r32", ["--optimizer", "galore", "--lr", "1e-2", "--rank", "32",
                     "--update-proj-gap", "100"], a,
      dict(optimizer="galore", r=32, lr=1e-2, gap=100, stage="baseline")))
  results.append(run_one(
      "adamw", ["--optimizer", "adamw", "--lr", "3e-3"], a,
      dict(optimizer="adamw", lr=3e-3, stage="baseline")))

  # 4. Accumulation at the chosen level.
  c, r = LR_LEVEL
  for acc in ("subspace", "full"):
    results.append(run_one(
        vlorp_name(c, r, chosen, f"_mb{a.micro_batches}_{acc}"),
        vlorp_flags(c, r, chosen) + ["--micro-batches", str(a.micro_batches),
                                     "--accumulate", acc], a,
        dict(optimizer="vlorp", c=c, r=r, lr=chosen, stage="accumulation",
             accumulate=acc, micro_batches=a.micro_batches)))

  # 5. Extras: the seed-to-seed spread of the levels, other learning rates.
  for seed in a.extra_seeds:
    for c, r in LEVELS:
      results.append(run_one(
          vlorp_name(c, r, chosen, f"_seed{seed}"),
          vlorp_flags(c, r, chosen, seed),
          a, dict(optimizer="vlorp", c=c, r=r, lr=chosen, stage="extra seed"),
          seed=seed))
  c, r = LR_LEVEL
  for lr in a.extra_lrs:
    results.append(run_one(
        vlorp_name(c, r, lr), vlorp_flags(c, r, lr), a,
        dict(optimizer="vlorp", c=c, r=r, lr=lr, stage="extra lr")))

  if a.clip_off_check:
    base = vlorp_flags(c, r, chosen) + ["--clip", "0"]
    results.append(run_one(
        vlorp_name(c, r, chosen, "_clip0"), base, a,
        dict(optimizer="vlorp", c=c, r=r, lr=chosen, stage="clip off",
             clip=0)))
    results.append(run_one(
        vlorp_name(c, r, chosen, f"_clip0_mb{a.micro_batches}_subspace"),
        base + ["--micro-batches", str(a.micro_batches), "--accumulate",
                "subspace"], a,
        dict(optimizer="vlorp", c=c, r=r, lr=chosen, stage="clip off",
             clip=0, accumulate="subspace", micro_batches=a.micro_batches)))

  elapsed = time.perf_counter() - t0
  table = markdown(results)
  print("\n" + table + "\n")
  out = a.out or os.path.join(ROOT, "benchmarks", "results", "granularity.json")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  png = os.path.splitext(out)[0] + ".png"
  plot(results, chosen, png,
       f", {a.steps} steps, batch {a.batch_size} x {a.seq_len}, seed {a.seed}")
  import jax  # pylint: disable=g-import-not-at-top
  payload = dict(
      command="python benchmarks/granularity.py " + " ".join(
          sys.argv[1:] if argv is None else argv),
      machine=dict(platform=platform.platform(), processor=platform.processor(),
                   cpu_count=os.cpu_count(), jax=jax.__version__,
                   python=platform.python_version(),
                   device=str(jax.devices()[0])),
      timestamp_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      budget="c*r = 32 (vlorp); galore rank 32",
      chosen_vlorp_lr=chosen,
      lr_check=[dict(lr=x["lr"], val_loss=x.get("val_loss")) for x in lr_check],
      notes=("Final val loss from summary.json (step == --steps); all runs "
             "evaluate the same 8 validation windows of 16 x 128 bytes "
             "(--eval-batch-size 16). state_bytes: exact bytes of the "
             "optimizer state (jax.eval_shape), float32 parameters. "
             "train_step_memory: XLA's memory analysis printed by the trainer."),
      runs=results,
      seconds=round(elapsed, 1),
  )
  with open(out, "w") as f:
    json.dump(payload, f, indent=1)
  print(f"wrote {out} and {png} ({elapsed / 60:.1f} min)")


if __name__ == "__main__":
  main()
