"""Refresh-step time of every subspace finder on one LLaMA-1B layer, and quantized state bytes.

Part 1, time. The seven matrices of one layer of the GaLore paper's LLaMA 1B
(d_model 2048, d_ff 5461; Flax ``(in, out)`` float32 kernels: q, k, v, o
``2048×2048``, gate, up ``2048×5461``, down ``5461×2048``), every one of them
projected, rank 512 (GaLore's 1B rank; ``--rank``). For each optimizer a
jitted ``tx.update`` + ``optax.apply_updates`` (params and state donated, fixed
random gradients, no model; as ``step_time.py``) is timed on

* a **steady** step, where no subspace is refreshed (``count % gap != 0``);
* a **refresh** step, where every matrix refreshes (the step counter set to a
  multiple of the gap, as ``step_time.py`` does);

and ``amortized = (refresh + (gap - 1) * steady) / gap`` with the optimizer's
own default gap. Optimizers (all with the same rank; ``optax_lowrank``
defaults otherwise):

* ``optax.adamw``: the baseline of every ratio (no refresh);
* ``galore``: exact SVD (``projectors.svd``), gap 200;
* ``galore[rsvd p=2]``, ``galore[rsvd p=0]``: ``galore(projector=
  projectors.randomized_svd(power_iters=p))`` (oversample 8), gap 200;
* ``dct_adamw``: DCT columns chosen every step (its default gap 1: every step
  is a refresh, so steady = refresh = amortized); ``dct_adamw[gap=200]``
  (``--no-dct-gap200`` drops it) is the same optimizer with gap 200, whose
  steady step is DCT-AdamW without the per-step selection;
* ``grass``: norm-sampled rows, gap 200, moments reset on a refresh;
* ``osd``: exact SVD at step 0 only, then every step moves the basis by one
  AdamW step on the online-PCA loss: its "refresh" is step 0 and its steady
  step already moves the basis, so amortized = steady (no gap);
* ``adarankgrad``: randomized SVD (power_iters 2) plus the rank rule
  (``schedules.adaptive_rank``), both moments rotated; it switches per matrix
  when ``‖down(G)‖ ≤ switch_threshold`` or after 200 steps
  (``schedules.on_convergence``), so its steady step also computes that norm,
  and the refresh timed here is the step cap (random gradients never fall
  below the threshold);
* ``galore_8bit``: galore with int8 Adam moments (``quantize.quantize_state``);
* ``q_galore``: exact SVD, int4 basis (``quantize.quantize_basis``), lazy
  refresh (``schedules.lazy``), int8 moments, initial gap 200. The refresh
  timed here is one where every matrix is due (the counter is a multiple of
  ``200·2^12``, so it stays due after the lazy gap has doubled); in training
  the lazy rule skips later refreshes of stable matrices, so its amortized
  figure is an upper bound;
* ``optax.contrib.galore``: rank 512, its own defaults (gap 200, scale 1.0),
  every kernel projected (``GaLoreDimensionNumbers(0, 1)``).

Everything is timed interleaved in one process (round ``i`` times one steady
step of every optimizer, and one refresh step while ``i < --refresh-repeats``),
so the ratios to ``optax.adamw`` are side by side. Compilation and one steady
warm-up step are excluded (the warm-up does not refresh: the refresh branch is
compiled with the step, and on CPU a refresh costs as much as a timed one).
Random gradients are full rank: ``adarankgrad`` keeps the full rank 512 (its
rule would shrink it on a real, low effective-rank gradient, which does not
change the refresh cost: the basis is always found at rank 512).

Part 2, memory. Exact optimizer-state bytes (``optax_lowrank.memory.
state_bytes``: ``jax.eval_shape`` of ``tx.init`` on ``jax.ShapeDtypeStruct``
parameters, nothing allocated) of ``optax.adamw``, ``galore``, ``galore_8bit``
and ``q_galore`` on the full LLaMA 60M / 130M / 350M / 1B / 7B models as
``benchmarks/memory.py`` builds them (``models.LlamaConfig.preset``, attention
and MLP matrices projected by ``models.lowrank_spec``, GaLore's ranks
128/256/256/512/1024), in BF16 and FP32 parameters, with the shrink factors
``galore / galore_8bit`` and ``galore / q_galore`` (whole state and the
projected matrices' part).

Usage:
  python benchmarks/refresh_time.py                 # ~10-11 min on 2 busy CPU cores
  python benchmarks/refresh_time.py --repeats 10 --refresh-repeats 5   # GPU
  python benchmarks/refresh_time.py --d-model 256 --d-ff 683 --rank 64 \\
      --out /tmp/refresh.json                         # smoke test, ~1 min
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os

# As step_time.py: LAPACK on one OpenBLAS thread (spinning threads on a small
# shared CPU make the SVD many times slower). Must happen before jax loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax
from optax import contrib

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import optax_lowrank  # noqa: E402  pylint: disable=g-import-not-at-top
from optax_lowrank import projectors  # noqa: E402


def _load(name: str):
  """A sibling benchmark script as a module (benchmarks/ is not a package)."""
  spec = importlib.util.spec_from_file_location(
      f"_bench_{name}", os.path.join(HERE, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


step_time = _load("step_time")

D_MODEL, D_FF, RANK = 2048, 5461, 512  # GaLore paper, LLaMA 1B
GAP = 200
# Refresh steps are timed at multiples of GAP * 2**12, so that q_galore's
# lazy gap (which doubles once a matrix's subspace looks stable, as it does
# for fixed gradients after 5 refreshes) still divides the counter.
LAZY_HEADROOM = 2**12
# COAP's defaults: a basis update every 32 steps, every 5th a range find.
COAP_GAP, COAP_FACTOR = 32, 5
QUANT_SIZES = ("60m", "130m", "350m", "1b", "7b")
QUANT_ROWS = ("adamw", "galore", "galore_8bit", "q_galore")


# ----------------------------------------------------------------------------
# Part 1: time.


def layer_shapes(d_model: int, d_ff: int) -> dict:
  """One LLaMA layer's projected kernels, Flax ``(in, out)`` layout."""
  h, ff = d_model, d_ff
  return {
      "attn": {n: {"kernel": (h, h)} for n in ("q", "k", "v", "o")},
      "mlp": {
          "gate": {"kernel": (h, ff)},
          "up": {"kernel": (h, ff)},
          "down": {"kernel": (ff, h)},
      },
  }


def optimizers(rank: int, *, dct_gap200: bool = True) -> dict:
  """name -> (transform, kind, gap, what it does).

  kind: ``none`` (no subspace), ``gap`` (refresh when ``count % gap == 0``),
  ``every`` (every step refreshes), ``first`` (refresh at step 0 only; the
  basis moves on every later step), ``coap_find`` / ``coap_step`` (``gap``,
  with COAP's own counter set so that the timed refresh is a range find or
  a gradient step on the basis).
  """
  every = lambda p, _: contrib.GaLoreDimensionNumbers(0, 1)  # noqa: E731
  opts = {
      "optax.adamw": (optax.adamw(1e-3), "none", None,
                      "full-rank AdamW (the baseline)"),
      "galore": (optax_lowrank.galore(1e-3, rank=rank), "gap", GAP,
                 "exact SVD (jnp.linalg.svd, float32) of every matrix"),
      "galore[rsvd p=2]": (
          optax_lowrank.galore(
              1e-3, rank=rank,
              projector=projectors.randomized_svd(power_iters=2)),
          "gap", GAP,
          "randomized SVD, k = r + 8 columns, 2 power iterations"),
      "galore[rsvd p=0]": (
          optax_lowrank.galore(
              1e-3, rank=rank,
              projector=projectors.randomized_svd(power_iters=0)),
          "gap", GAP, "randomized SVD, k = r + 8 columns, no power iteration"),
      "dct_adamw": (optax_lowrank.dct_adamw(1e-3, rank=rank), "every", 1,
                    "top-r DCT columns by L1 norm of G Q, chosen every step"),
  }
  if dct_gap200:
    opts["dct_adamw[gap=200]"] = (
        optax_lowrank.dct_adamw(1e-3, rank=rank, update_proj_gap=GAP), "gap",
        GAP, "as dct_adamw, columns chosen every 200 steps (not its default)")
  opts.update({
      "grass": (optax_lowrank.grass(1e-3, rank=rank), "gap", GAP,
                "r norm-sampled rows (gather/scatter), moments reset"),
      "osd": (optax_lowrank.osd(1e-3, rank=rank), "first", None,
              "exact SVD at step 0, then one AdamW step on the basis per step"),
      "adarankgrad": (optax_lowrank.adarankgrad(1e-3, rank=rank), "gap", GAP,
                      "randomized SVD (p=2) + adaptive rank on ||down(G)|| <= 1e-3 or 200 steps, m and v rotated"),
      "galore_8bit": (optax_lowrank.galore_8bit(1e-3, rank=rank), "gap", GAP,
                      "galore, int8 Adam moments (blocks of 256)"),
      "q_galore": (optax_lowrank.q_galore(1e-3, rank=rank), "gap", GAP,
                   "exact SVD, int4 basis, lazy refresh, int8 moments; "
                   "refresh timed with every matrix due"),
      "coap[range find]": (
          optax_lowrank.coap(1e-3, rank=rank), "coap_find", COAP_GAP,
          "COAP's range finder (no power iteration), seeded by the basis"),
      "coap[basis step]": (
          optax_lowrank.coap(1e-3, rank=rank), "coap_step", COAP_GAP,
          "COAP's gradient step on the basis (reads Adam's first moment)"),
      "optax.contrib.galore": (
          contrib.galore(learning_rate=1e-3, rank=rank,
                         weight_dimension_numbers=lambda params: (
                             jax.tree_util.tree_map_with_path(every, params))),
          "gap", GAP, "optax's GaLore, exact SVD, its defaults (gap 200, "
          "scale 1.0)"),
  })
  return opts


def set_coap_count(state, count: int):
  """``state`` with every ``COAPBasis`` counter set to ``count`` (which
  branch, range find or basis step, the next refresh takes)."""
  is_coap = lambda x: isinstance(x, projectors.COAPBasis)  # noqa: E731
  return jax.tree.map(
      lambda b: (dataclasses.replace(b, count=jnp.asarray(count, jnp.int32))
                 if is_coap(b) else b),
      state, is_leaf=is_coap)


def coap_mix(find: dict, step: dict) -> dict:
  """COAP at its defaults from the two timed kinds of refresh: each refresh
  is a range find every ``COAP_FACTOR``-th time, a basis step otherwise."""
  steady = statistics.median([find["steady_ms"], step["steady_ms"]])
  refresh = (find["refresh_ms"]
             + (COAP_FACTOR - 1) * step["refresh_ms"]) / COAP_FACTOR
  amortized = (refresh + (COAP_GAP - 1) * steady) / COAP_GAP
  adamw = find["steady_ms"] / find["steady_ratio"]
  return dict(kind="derived", gap=COAP_GAP, state_mib=find["state_mib"],
              what=f"mean refresh: 1 range find per {COAP_FACTOR} updates",
              steady_ms=steady, steady_ratio=steady / adamw,
              refresh_ms=refresh, refresh_ratio=refresh / adamw,
              amortized_ms=amortized, amortized_ratio=amortized / adamw,
              refresh_minus_steady_ms=refresh - steady, compiled_variants=1)


def time_layer(*, d_model, d_ff, rank, repeats, refresh_repeats, seed=0,
               dct_gap200=True, only=None) -> dict:
  shapes = layer_shapes(d_model, d_ff)
  key_p, key_g = jax.random.split(jax.random.key(seed))
  grads = jax.block_until_ready(step_time.random_tree(shapes, key_g, 1e-3))
  n_params = sum(x.size for x in jax.tree.leaves(grads))
  print(f"\n== one LLaMA layer: d_model {d_model}, d_ff {d_ff}, 7 matrices, "
        f"{n_params / 1e6:.1f}M parameters, rank {rank}; {repeats} steady "
        f"and {refresh_repeats} refresh samples", flush=True)
  opts = optimizers(rank, dct_gap200=dct_gap200)
  if only:
    opts = {k: v for k, v in opts.items()
            if k == "optax.adamw" or any(k.startswith(o) for o in only)}
  runs = {}
  for name, (tx, kind, gap, _) in opts.items():
    t0 = time.perf_counter()
    params = step_time.random_tree(shapes, key_p, 0.02)
    # Copy every state leaf: osd's init returns the same array as its basis
    # and its next basis, and a donated state must not alias itself.
    state = jax.tree.map(jnp.copy, tx.init(params))
    step = step_time.make_step(tx)
    # One untimed steady step compiles the step (both branches of the
    # refresh cond) and warms it up.
    if kind != "none" and kind != "every":
      state = step_time.set_refresh_count(state, (gap or GAP) + 1)
    params, state = jax.block_until_ready(step(params, state, grads))
    runs[name] = dict(step=step, params=params, state=state, steady=[],
                      refresh=[], state_mib=step_time.tree_mib(state))
    print(f"  compile + warm-up {name}: {time.perf_counter() - t0:.1f}s "
          f"(state {runs[name]['state_mib']:.0f} MiB)", flush=True)

  def timed(r, count):
    if count is not None:
      r["state"] = step_time.set_refresh_count(r["state"], count)
    jax.block_until_ready((r["params"], r["state"]))
    t0 = time.perf_counter()
    r["params"], r["state"] = jax.block_until_ready(
        r["step"](r["params"], r["state"], grads))
    return time.perf_counter() - t0

  t_loop = time.perf_counter()
  for i in range(repeats):
    for name, (_, kind, gap, _) in opts.items():
      r = runs[name]
      if kind == "none":
        r["steady"].append(timed(r, None))
      elif kind == "every":
        r["steady"].append(timed(r, GAP + 1 + i))  # every count refreshes
      else:
        g = gap or GAP
        r["steady"].append(timed(r, g + 1 + i % (g - 1)))
        if i < refresh_repeats:
          count = 0 if kind == "first" else g * LAZY_HEADROOM * (i + 1)
          if kind.startswith("coap"):
            r["state"] = set_coap_count(
                r["state"], COAP_FACTOR if kind == "coap_find" else 1)
          r["refresh"].append(timed(r, count))
    print(f"  round {i + 1}/{repeats} done "
          f"({time.perf_counter() - t_loop:.0f}s)", flush=True)

  adamw = 1e3 * statistics.median(runs["optax.adamw"]["steady"])
  results = {}
  for name, (_, kind, gap, what) in opts.items():
    r = runs[name]
    steady = 1e3 * statistics.median(r["steady"])
    row = dict(kind=kind, gap=gap, what=what, steady_ms=steady,
               steady_ratio=steady / adamw,
               steady_samples_ms=[1e3 * t for t in r["steady"]],
               state_mib=r["state_mib"],
               compiled_variants=r["step"]._cache_size())  # pylint: disable=protected-access
    if kind == "every":
      refresh, amortized = steady, steady
    elif kind == "none":
      refresh = amortized = None
    else:
      refresh = 1e3 * statistics.median(r["refresh"])
      row["refresh_samples_ms"] = [1e3 * t for t in r["refresh"]]
      amortized = (steady if kind == "first"
                   else (refresh + (gap - 1) * steady) / gap)
    if refresh is not None:
      row.update(refresh_ms=refresh, refresh_ratio=refresh / adamw,
                 amortized_ms=amortized, amortized_ratio=amortized / adamw,
                 refresh_minus_steady_ms=refresh - steady)
    results[name] = row
  if "coap[range find]" in results and "coap[basis step]" in results:
    results["coap"] = coap_mix(results["coap[range find]"],
                               results["coap[basis step]"])
  for r in runs.values():
    del r["params"], r["state"]
  return dict(d_model=d_model, d_ff=d_ff, rank=rank, n_params=n_params,
              repeats=repeats, refresh_repeats=refresh_repeats,
              lazy_refresh_count_multiple=GAP * LAZY_HEADROOM,
              optimizers=results)


def gap_label(o) -> str:
  return {"none": "–", "every": "1", "first": "step 0 only"}.get(
      o["kind"], str(o["gap"]))


def print_time_table(res):
  print(f"\nOne LLaMA layer ({res['d_model']}/{res['d_ff']}), rank "
        f"{res['rank']}: median ms and ratio to optax.adamw, same run:\n")
  print("| optimizer | gap | steady ms | × adamw | refresh ms | × adamw | "
        "amortized ms | × adamw | state MiB |")
  print("|---|---|--:|--:|--:|--:|--:|--:|--:|")
  for name, o in res["optimizers"].items():
    if "refresh_ms" in o:
      rest = (f"{o['refresh_ms']:.0f} | {o['refresh_ratio']:.1f} | "
              f"{o['amortized_ms']:.0f} | {o['amortized_ratio']:.2f}")
    else:
      rest = "– | – | – | –"
    print(f"| {name} | {gap_label(o)} | {o['steady_ms']:.0f} | "
          f"{o['steady_ratio']:.2f} | {rest} | {o['state_mib']:.0f} |")
  for name, o in res["optimizers"].items():
    if o["compiled_variants"] != 1:
      print(f"WARNING: {name} step compiled {o['compiled_variants']} times")


# ----------------------------------------------------------------------------
# Part 2: quantized state bytes.


def quantized_memory(sizes) -> dict:
  mem_bench = _load("memory")
  out = {d: {} for d in mem_bench.DTYPES}
  for s in sizes:
    built = mem_bench.abstract_params(s, "bfloat16")
    rank = mem_bench.GALORE_RANK[s]
    for dkey, dtype in mem_bench.DTYPES.items():
      _, params, mask, dims = mem_bench.with_dtype(built, dtype)
      lowrank = dict(projection_mask=mask, dimension_numbers=dims)
      txs = {
          "adamw": optax.adamw(1e-3),
          "galore": optax_lowrank.galore(1e-3, rank=rank, **lowrank),
          "galore_8bit": optax_lowrank.galore_8bit(1e-3, rank=rank, **lowrank),
          "q_galore": optax_lowrank.q_galore(1e-3, rank=rank, **lowrank),
      }
      cells = {}
      for label, tx in txs.items():
        mem = optax_lowrank.memory.state_bytes(tx, params)
        total = mem.total_bytes
        assert total == mem_bench.nbytes(jax.eval_shape(tx.init, params))
        projected = sum(l.state_bytes for l in mem.leaves if l.projected)
        cells[label] = dict(
            bytes=total, gb=total / 1e9, projected_bytes=projected,
            unprojected_bytes=sum(
                l.state_bytes for l in mem.leaves if not l.projected),
            shared_bytes=mem.shared_bytes)
      g = cells["galore"]
      for label in ("galore_8bit", "q_galore"):
        c = cells[label]
        c["shrink_vs_galore"] = g["bytes"] / c["bytes"]
        c["projected_shrink_vs_galore"] = (
            g["projected_bytes"] / c["projected_bytes"])
      cells["rank"] = rank
      out[dkey][s] = cells
      print(f"  state bytes {s} {dkey}: " + ", ".join(
          f"{k} {v['gb']:.3f} GB" for k, v in cells.items()
          if isinstance(v, dict)), flush=True)
  return out


def print_memory_tables(mem, sizes):
  labels = {"60m": "60M", "130m": "130M", "350m": "350M", "1b": "1B",
            "7b": "7B"}
  for dkey, by_size in mem.items():
    print(f"\nOptimizer state, {dkey.upper()} parameters, GB (1e9 B); in "
          "brackets galore's bytes divided by the row's:\n")
    print("| optimizer | " + " | ".join(
        f"{labels[s]} (r={by_size[s]['rank']})" for s in sizes) + " |")
    print("|---|" + "--:|" * len(sizes))
    for label in QUANT_ROWS:
      cells = []
      for s in sizes:
        c = by_size[s][label]
        extra = (f" ({c['shrink_vs_galore']:.2f}×)"
                 if "shrink_vs_galore" in c else "")
        cells.append(f"{c['gb']:.3f}{extra}")
      print(f"| {label} | " + " | ".join(cells) + " |")
    print("| projected matrices only: galore / galore_8bit / q_galore GB | "
          + " | ".join(
              " / ".join(f"{by_size[s][l]['projected_bytes'] / 1e9:.3f}"
                         for l in ("galore", "galore_8bit", "q_galore"))
              for s in sizes) + " |")


# ----------------------------------------------------------------------------
# Plot and main.


def plot(res, mem, sizes, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  fig, (ax, ax2) = plt.subplots(
      1, 2, figsize=(15, 5.5), gridspec_kw=dict(width_ratios=[2.2, 1]))
  names = list(res["optimizers"])
  x = np.arange(len(names))
  width = 0.27
  for j, (key, label) in enumerate((
      ("steady_ratio", "steady"), ("refresh_ratio", "refresh"),
      ("amortized_ratio", "amortized (own gap)"))):
    ys = [res["optimizers"][n].get(key, np.nan) for n in names]
    ax.bar(x + (j - 1) * width, ys, width, label=label)
  ax.axhline(1.0, color="black", lw=0.8)
  ax.set_yscale("log")
  ax.set_xticks(x, names, rotation=35, ha="right", fontsize=8)
  ax.set_ylabel("step time / optax.adamw step (log)")
  ax.set_title(f"One LLaMA-1B layer ({res['d_model']}×{res['d_ff']}), rank "
               f"{res['rank']}, CPU")
  ax.grid(axis="y", which="both", alpha=0.3)
  ax.legend(fontsize=8)

  xs = np.arange(len(sizes))
  w2 = 0.8 / len(QUANT_ROWS)
  for j, label in enumerate(QUANT_ROWS):
    ys = [mem["bf16"][s][label]["gb"] for s in sizes]
    ax2.bar(xs - 0.4 + (j + 0.5) * w2, ys, w2, label=label)
  ax2.set_yscale("log")
  ax2.set_xticks(xs, [s.upper() for s in sizes])
  ax2.set_ylabel("optimizer state, GB (log)")
  ax2.set_title("State bytes, BF16 params (GaLore ranks)")
  ax2.grid(axis="y", which="both", alpha=0.3)
  ax2.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--rank", type=int, default=RANK)
  ap.add_argument("--d-model", type=int, default=D_MODEL)
  ap.add_argument("--d-ff", type=int, default=D_FF)
  ap.add_argument("--repeats", type=int, default=5,
                  help="timed steady steps per optimizer")
  ap.add_argument("--refresh-repeats", type=int, default=1,
                  help="timed refresh steps per optimizer (capped at "
                  "--repeats; on a busy 2-core CPU an exact-SVD refresh of "
                  "the 1B layer takes ~40 s, one round of refreshes ~5 min)")
  ap.add_argument("--optimizers", nargs="*", default=None,
                  help="time only the optimizers whose names start with "
                  "these (optax.adamw, the baseline, always runs)")
  ap.add_argument("--no-dct-gap200", action="store_true",
                  help="skip the dct_adamw[gap=200] diagnostic row")
  ap.add_argument("--sizes", nargs="*", choices=QUANT_SIZES,
                  default=list(QUANT_SIZES),
                  help="model sizes of the state-bytes table")
  ap.add_argument("--out", default=None, help="JSON path (default: "
                  "benchmarks/results/refresh_time_<device>.json; the PNG "
                  "goes beside it)")
  args = ap.parse_args(argv)
  t0 = time.perf_counter()
  d = jax.devices()[0]
  print(f"device: {d} ({d.device_kind}), jax {jax.__version__}, optax "
        f"{optax.__version__}, python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs", flush=True)
  res = time_layer(d_model=args.d_model, d_ff=args.d_ff, rank=args.rank,
                   repeats=args.repeats,
                   refresh_repeats=min(args.repeats, args.refresh_repeats),
                   dct_gap200=not args.no_dct_gap200, only=args.optimizers)
  t_time = time.perf_counter() - t0
  print_time_table(res)
  sizes = [s for s in QUANT_SIZES if s in args.sizes]
  mem = quantized_memory(sizes)
  if sizes:
    print(f"\nQuantized state bytes ({', '.join(sizes)}):", flush=True)
    print_memory_tables(mem, sizes)

  dev = step_time.device_name()
  out = args.out or os.path.join(HERE, "results", f"refresh_time_{dev}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  png = os.path.splitext(out)[0] + ".png"
  if sizes:
    plot(res, mem, sizes, png)
  elapsed = time.perf_counter() - t0
  payload = dict(
      device=dev, platform=d.platform, device_kind=d.device_kind,
      cpu_count=os.cpu_count(), jax=jax.__version__, optax=optax.__version__,
      optax_lowrank=optax_lowrank.__version__,
      openblas_num_threads=os.environ.get("OPENBLAS_NUM_THREADS"),
      command=" ".join(["python benchmarks/refresh_time.py",
                        *(sys.argv[1:] if argv is None else argv)]),
      timestamp_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      notes=(
          "Part 1: optimizer update + apply_updates only, jitted, params and "
          "state donated, float32, fixed random gradients, one LLaMA layer's "
          "7 kernels all projected; medians; all optimizers timed "
          "interleaved in one process. amortized = (refresh + (gap-1) "
          "steady)/gap with each optimizer's default gap; dct_adamw "
          "refreshes every step (amortized = steady); osd's refresh is its "
          "step-0 SVD and its steady step moves the basis (amortized = "
          "steady); q_galore's refresh is timed with every matrix due (lazy "
          "skips make its amortized figure an upper bound). Part 2: exact "
          "state bytes from optax_lowrank.memory.state_bytes on "
          "jax.ShapeDtypeStruct parameters (benchmarks/memory.py's models), "
          "GB = 1e9 B."),
      time=res, time_seconds=round(t_time, 1),
      quantized_state=dict(
          method="optax_lowrank.memory.state_bytes (jax.eval_shape of "
          "tx.init), attention+MLP kernels projected (models.lowrank_spec), "
          "GaLore ranks 128/256/256/512/1024",
          results=mem),
      seconds=round(elapsed, 1),
  )
  with open(out, "w") as f:
    json.dump(payload, f, indent=1)
  print(f"\nwrote {out}" + (f" and {png}" if sizes else "")
        + f" ({elapsed:.0f}s)")


if __name__ == "__main__":
  main()
