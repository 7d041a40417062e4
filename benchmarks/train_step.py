"""Whole train step (forward, backward, optimizer) of every registered optimizer vs AdamW.

Times the trainer's own compiled step, built by ``train.loop.Setup`` exactly as
``python -m train.pretrain`` builds it (the model, ``--clip 1``, the optimizer by
name through ``train.optimizers``, the fault guard, the state donated), so it
measures what users run, on the LLaMA 60M and 1B shapes of ``models.config``
(byte vocabulary by default, as the trainer's default corpus; ``--vocab-size
32000`` for the paper's). Every optimizer keeps its own defaults (rank, gap,
scale) unless ``--rank`` is given.

Per optimizer and shape:

* memory: ``compiled.memory_analysis()`` of the compiled step (arguments,
  outputs, aliased, temporaries, all per device) and the optimizer state's
  bytes (from the abstract state, nothing allocated);
* time (shapes in ``--time-shapes``): a **refresh** step, the first step of a
  fresh state (state step 0, where every low-rank optimizer finds its subspaces:
  ``count % update_proj_gap == 0``), and **steady** steps, the steps after it
  (counts 1, 2, ..., below every default gap, so no refresh; ``dct_adamw``'s
  default gap is 1, so its every step selects columns). Optimizers are timed
  interleaved in rounds: each round initializes a fresh state for each
  optimizer in turn (untimed) and times its refresh step and
  ``--steady-per-round`` steady steps; medians over rounds, ratios to
  ``adamw`` of the same run. The step is compiled ahead of time and the init
  before the timed steps, so no compilation is timed.

Only one optimizer's train state is alive at a time. The 1B shape is compiled
for its memory analysis and, on CPU, not timed by default (one step of 1B on two
cores is minutes, and its state needs ~16 GB; ``--time-shapes 60m,1b`` times
it anyway); on an accelerator both shapes are timed.

Usage:
  python benchmarks/train_step.py                          # CPU: 60M timed, 1B memory
  python benchmarks/train_step.py --rounds 10              # GPU: both timed
  python benchmarks/train_step.py --optimizers adamw galore --memory-shapes 60m \\
      --rounds 1 --out /tmp/t.json                         # smoke test
"""

from __future__ import annotations

import argparse
import json
import os

# LAPACK (the SVD of a refresh step, on CPU) runs on OpenBLAS threads; on a
# small shared CPU their spinning makes SVDs 10-70x slower (step_time.py).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import platform
import re
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from models import sharding as shd  # noqa: E402  pylint: disable=g-import-not-at-top
from models.config import BYTE_VOCAB_SIZE  # noqa: E402
from train import loop, optimizers, pretrain, steps  # noqa: E402

SHAPES = ("60m", "1b")
# FRUGAL's default `blocks` subspace needs stacked (scanned) layers; the trainer's default
# layout is one matrix per layer, where FRUGAL takes the `columns` subspace.
OPT_ARGS = {"frugal": "subspace=columns"}
MEMORY_FIELDS = ("argument", "output", "alias", "temp")


def device_name() -> str:
  d = jax.devices()[0]
  kind = d.device_kind
  name = d.platform if kind.lower() == d.platform else f"{d.platform}_{kind}"
  return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _shapes(text: str) -> tuple[str, ...]:
  names = tuple(s.strip() for s in text.split(",") if s.strip())
  bad = [s for s in names if s not in SHAPES]
  if bad:
    raise argparse.ArgumentTypeError(f"unknown shape(s) {bad}; choose from {SHAPES}")
  return names


def build(name: str, shape: str, a):
  """(compiled step, jitted init, batch, memory record) of optimizer `name` at `shape`."""
  argv = ["--model", shape, "--optimizer", name, "--batch-size", str(a.batch_size),
          "--seq-len", str(a.seq_len), "--steps", str(a.schedule_steps),
          "--out", tempfile.gettempdir()]
  if name in OPT_ARGS:
    argv += ["--opt-args", OPT_ARGS[name]]
  if a.scan_layers:
    argv += ["--scan-layers"]
  if a.rank is not None and optimizers.refused_flags(
      name, pretrain.parse_args(argv + ["--rank", str(a.rank)])) is None:
    argv += ["--rank", str(a.rank)]
  args = pretrain.parse_args(argv)
  cfg = pretrain.model_config(args, vocab_size=a.vocab_size, max_seq_len=args.seq_len)
  mesh = shd.make_mesh(args.mesh_shape, explicit=args.shard_mode == "explicit")
  setup = loop.Setup(args, cfg, mesh, say=lambda *_, **__: None)
  batch_sharding = steps.batch_sharding(mesh)
  shape_ = (1, args.batch_size, args.seq_len + 1)
  t0 = time.perf_counter()
  with shd.set_mesh(mesh):
    compiled = setup.compile_step(
        jax.ShapeDtypeStruct(shape_, np.int32, sharding=batch_sharding), batch_sharding,
        say=lambda *_, **__: None)
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  record = dict(compile_s=compile_s, argv=argv,
                params=int(sum(x.size for x in jax.tree.leaves(setup.abstract_params))),
                opt_state_bytes=int(sum(x.size * x.dtype.itemsize for x in
                                        jax.tree.leaves(setup.abstract_state["opt_state"]))))
  if mem is not None:
    record.update({f"{k}_bytes": int(getattr(mem, f"{k}_size_in_bytes"))
                   for k in MEMORY_FIELDS})
  tokens = np.random.default_rng(0).integers(0, a.vocab_size, shape_, dtype=np.int32)
  batch = loop.put(tokens, batch_sharding)
  init = jax.jit(setup.init, out_shardings=setup.shardings)
  return dict(compiled=compiled, init=init, batch=batch, mesh=mesh), record


def time_rounds(built: dict, a) -> dict:
  """{name: {"refresh": [s...], "steady": [s...]}}, interleaved over rounds."""
  samples = {name: {"refresh": [], "steady": []} for name in built}

  def run(name: str, seed: int, steady: int):
    b = built[name]
    with shd.set_mesh(b["mesh"]):
      state = jax.block_until_ready(b["init"](jax.random.key(seed)))
      for i in range(1 + steady):
        t0 = time.perf_counter()
        state, metrics = b["compiled"](state, b["batch"])
        jax.block_until_ready((state, metrics))
        samples[name]["refresh" if i == 0 else "steady"].append(time.perf_counter() - t0)
    del state

  for r in range(a.rounds):
    t0 = time.perf_counter()
    for name in built:
      run(name, r, a.steady_per_round)
    print(f"  round {r + 1}/{a.rounds}: {time.perf_counter() - t0:.0f} s "
          f"(load {os.getloadavg()[0]:.1f})", flush=True)
  return samples


def summarize(records: dict, samples: dict | None) -> dict:
  """Adds medians and ratios to adamw's (time and memory) to each record."""
  base = records["adamw"]
  for name, rec in records.items():
    for k in ("argument_bytes", "temp_bytes", "opt_state_bytes"):
      if k in rec and base.get(k):
        rec[k.replace("_bytes", "_ratio")] = rec[k] / base[k]
    if samples is None:
      continue
    for kind in ("steady", "refresh"):
      rec[f"{kind}_samples_s"] = samples[name][kind]
      rec[f"{kind}_s"] = statistics.median(samples[name][kind])
  if samples is not None:
    for rec in records.values():
      for kind in ("steady", "refresh"):
        rec[f"{kind}_ratio"] = rec[f"{kind}_s"] / base["steady_s"]
  return records


def markdown(shape: str, records: dict) -> str:
  timed = "steady_s" in records["adamw"]
  head = "| optimizer |" + (" steady s | × adamw | refresh s | × adamw steady |"
                            if timed else "")
  head += " arguments MiB | × adamw | temporaries MiB | optimizer state MiB |"
  lines = [head, "|---|" + "--:|" * (head.count("|") - 2)]
  for name, r in records.items():
    row = f"| `{name}` |"
    if timed:
      row += (f" {r['steady_s']:.3f} | {r['steady_ratio']:.2f} | {r['refresh_s']:.3f} | "
              f"{r['refresh_ratio']:.2f} |")
    mib = lambda k: f"{r[k] / 2**20:,.1f}" if k in r else "–"
    ratio = f"{r['argument_ratio']:.2f}" if "argument_ratio" in r else "–"
    row += (f" {mib('argument_bytes')} | {ratio} | {mib('temp_bytes')} | "
            f"{mib('opt_state_bytes')} |")
    lines.append(row)
  return "\n".join(lines)


def plot(results: dict, path: str, title: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  panels = [(s, "time") for s in results if "steady_s" in results[s]["adamw"]]
  panels += [(s, "memory") for s in results]
  fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.2 * len(panels)), squeeze=False)
  for ax, (shape, what) in zip(axes[:, 0], panels):
    recs = results[shape]
    names = list(recs)
    x = np.arange(len(names))
    if what == "time":
      ax.bar(x - 0.2, [recs[n]["steady_ratio"] for n in names], 0.4, label="steady")
      ax.bar(x + 0.2, [recs[n]["refresh_ratio"] for n in names], 0.4, label="refresh")
      ax.set_ylabel("× adamw steady step")
      ax.set_yscale("log")
    else:
      ax.bar(x - 0.2, [recs[n].get("argument_bytes", 0) / 2**20 for n in names], 0.4,
             label="arguments")
      ax.bar(x + 0.2, [recs[n].get("temp_bytes", 0) / 2**20 for n in names], 0.4,
             label="temporaries")
      ax.set_ylabel("MiB per device")
    ax.axhline(1 if what == "time" else recs["adamw"].get("argument_bytes", 0) / 2**20,
               color="gray", lw=0.8, ls="--")
    ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
    ax.set_title(f"{shape}: {what}", fontsize=9)
    ax.legend(fontsize=8)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  on_cpu = jax.devices()[0].platform == "cpu"
  names = list(optimizers.available())
  names = ["adamw"] + [n for n in names if n != "adamw"]
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--optimizers", nargs="+", default=names, metavar="NAME",
                  help="default: every registered optimizer (adamw is always added)")
  ap.add_argument("--time-shapes", type=_shapes, default=("60m",) if on_cpu else SHAPES,
                  help="shapes timed (default: 60m on CPU, 60m,1b on accelerators)")
  ap.add_argument("--memory-shapes", type=_shapes, default=SHAPES,
                  help="shapes compiled for their memory analysis (the timed ones too)")
  ap.add_argument("--batch-size", type=int, default=4)
  ap.add_argument("--seq-len", type=int, default=256)
  ap.add_argument("--vocab-size", type=int, default=BYTE_VOCAB_SIZE,
                  help=f"default {BYTE_VOCAB_SIZE}, the trainer's byte vocabulary")
  ap.add_argument("--rank", default=None,
                  help="--rank of the optimizers that take it (default: each one's own)")
  ap.add_argument("--scan-layers", action="store_true",
                  help="the trainer's --scan-layers (stacked layers under lax.scan: one "
                  "layer is compiled, minutes less for 1B on CPU)")
  ap.add_argument("--rounds", type=int, default=3 if on_cpu else 10)
  ap.add_argument("--steady-per-round", type=int, default=1 if on_cpu else 3)
  ap.add_argument("--schedule-steps", type=int, default=10000,
                  help="--steps of the schedule (warmup is 10%%: the timed steps' rate "
                  "is small but not zero)")
  ap.add_argument("--out", default=None, help="JSON path (default: "
                  "benchmarks/results/train_step_<device>.json)")
  a = ap.parse_args(argv)
  unknown = [n for n in a.optimizers if n not in names]
  if unknown:
    ap.error(f"--optimizers: unknown {unknown}; choose from {', '.join(names)}")
  chosen = ["adamw"] + [n for n in a.optimizers if n != "adamw"]
  shapes = [s for s in SHAPES if s in a.memory_shapes or s in a.time_shapes]
  command = "python benchmarks/train_step.py " + " ".join(sys.argv[1:] if argv is None
                                                         else argv)
  dev = jax.devices()[0]
  print(f"device: {dev} ({dev.device_kind}), jax {jax.__version__}, "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}", flush=True)

  results, started, loads = {}, time.perf_counter(), [os.getloadavg()]
  for shape in shapes:
    timed = shape in a.time_shapes
    print(f"\n== {shape} ({'timed' if timed else 'memory only'}), batch "
          f"{a.batch_size}x{a.seq_len}, vocab {a.vocab_size}", flush=True)
    built, records = {}, {}
    for name in chosen:
      try:
        b, records[name] = build(name, shape, a)
      except loop.RunError as e:
        print(f"  {name}: skipped ({e})", flush=True)
        continue
      r = records[name]
      print(f"  {name}: compiled in {r['compile_s']:.0f} s; arguments "
            f"{r.get('argument_bytes', 0) / 2**20:,.1f} MiB, temporaries "
            f"{r.get('temp_bytes', 0) / 2**20:,.1f} MiB", flush=True)
      if timed:
        built[name] = b
      else:
        del b
    samples = time_rounds(built, a) if timed else None
    results[shape] = summarize(records, samples)
    built.clear()
    loads.append(os.getloadavg())
    print("\n" + markdown(shape, results[shape]), flush=True)
    write(results, a, command, chosen, loads, time.perf_counter() - started)


def write(results: dict, a, command: str, chosen: list[str], loads: list,
          wall_s: float) -> None:
  """The JSON, the markdown tables and the plot of the shapes done so far."""
  dev = jax.devices()[0]
  out = a.out or os.path.join(ROOT, "benchmarks", "results", f"train_step_{device_name()}.json")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  title = (f"{command}\n{dev.device_kind}, batch {a.batch_size}x{a.seq_len}, vocab "
           f"{a.vocab_size}; time: median over {a.rounds} rounds")
  plot(results, os.path.splitext(out)[0] + ".png", title)
  tables = "\n\n".join(f"### {shape}\n\n{markdown(shape, recs)}"
                       for shape, recs in results.items())
  with open(os.path.splitext(out)[0] + ".md", "w") as f:
    f.write(f"`{command}` on {dev.device_kind} ({os.cpu_count()} CPUs), "
            f"{time.strftime('%Y-%m-%d', time.gmtime())}\n\n{tables}\n")
  with open(out, "w") as f:
    json.dump(dict(
        command=command, device=device_name(), platform=dev.platform,
        device_kind=dev.device_kind, device_count=jax.device_count(),
        cpu_count=os.cpu_count(), python=platform.python_version(),
        jax=jax.__version__, openblas_num_threads=os.environ.get("OPENBLAS_NUM_THREADS"),
        timestamp_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        wall_s=wall_s, load_averages=loads,
        settings={k: v for k, v in vars(a).items() if k != "optimizers"},
        optimizers=chosen, results=results), f, indent=1)
  print(f"\nwrote {out}")


if __name__ == "__main__":
  main()
