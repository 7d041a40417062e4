"""Optimizer-state memory of every registered optimizer on the GaLore paper's LLaMA sizes.

For the LLaMA 60M, 130M, 350M, 1B and 7B configs of the GaLore paper (Zhao et
al., 2024, Table 9; ``models.LlamaConfig.preset``: vocabulary 32000, untied
embedding and LM head, no biases), the parameters are built abstractly
(``jax.eval_shape`` through ``train.steps.abstract_model``: nothing is
allocated) and the state of each optimizer is measured exactly, as the bytes
of ``jax.eval_shape(tx.init, params)`` (every moment, basis, key, limiter
norm and step count; ``optax_lowrank.memory.state_bytes``'s total, whose
per-leaf split is also taken, and checked against that total, for the rows
compared with the papers), for bfloat16 and float32
parameters (the state follows the parameters' dtype, except where a method
fixes it: keys ``uint32``, limiter norms ``float32``, counts ``int32``, Flora's
momentum ``bfloat16``).

Optimizers: ``optax.adamw`` (the baseline) and whatever
``optax_lowrank.optimizers`` holds, each with the paper's settings where
known, projecting only the attention and MLP matrices (``mask`` and
``dimension_numbers`` from ``models.lowrank_spec``):

* galore, fira: rank 128 / 256 / 256 / 512 / 1024 (60M / 130M / 350M / 1B /
  7B; GaLore paper);
* apollo: rank 128 / 192 / 256 / 256 / 256 (APOLLO paper); apollo_mini:
  rank 1;
* frugal: density 0.25, subspace ``columns`` (the layers are not stacked);
  ``frugal[blocks]``: density 0.25, subspace ``blocks`` on the same model
  built with ``scan_layers=True`` (blocks are whole matrices of a stack);
* vlorp: the VLoRP paper's fixed budget ``c·r = 256`` (Wang et al., ICML
  2025, arXiv 2505.01744) at the levels ``(c, r)`` = (256, 1), (64, 4),
  (16, 16), (4, 64), (1, 256), rows ``vlorp[c=..,r=..]``; its first moment is
  ``max(m, n)·c·r`` per projected matrix, the same at every level, plus the
  factored second moment (``m + n``) and a key, so the levels' states are
  equal to within the key and count bytes (the script checks the projected
  part against that formula);
* any other registered name (e.g. flora): its defaults, with GaLore's rank
  for the size if it takes a ``rank``, and the mask and dimension numbers if it
  takes them. A factory that fails to build is skipped with the reason
  printed.

GB is 10^9 bytes throughout; the JSON also has exact bytes and GiB.

Gradient accumulation (``--accum-k``, default 4): the accumulator bytes of
``optax.MultiSteps(optax.adamw, k)`` (a full-size running mean, float32 by
default) next to ``optax_lowrank.MultiSteps(vlorp[c=256,r=1], k)`` (projected
leaves accumulated at projected size, ``max(m, n)·c·r`` in the gradient's
dtype; the others full-size in float32) and, for the same optimizer,
``optax.MultiSteps(vlorp[c=256,r=1], k)`` (full-size). Accumulator bytes are
those of ``acc_grads`` (and ``acc_projected``) in
``jax.eval_shape(multi.init, params)``; the totals add the wrapped state.

Comparison with GaLore's Table 6 (BF16 optimizer states: Full .23 / .51 /
1.37 / 5.20 GB, GaLore .13 / .28 / .54 / 1.78 GB for 60M / 130M / 350M / 1B).
The paper gives no formula for these estimates (a user asked for one in
jiaweizzhao/GaLore issue #67), and no single counting rule reproduces all
eight numbers:

* Full (AdamW, two bf16 moments per parameter): ours count 58.1M / 134.1M /
  368.0M / 1339.1M parameters (embedding and LM head untied, 32000 x d each).
  60M's .23 matches in GB (ours 0.232), 350M's 1.37 matches in GiB (ours
  1.371 GiB = 1.472 GB), 130M's .51 lies between GB (0.536) and GiB (0.500),
  and 1B's 5.20 equals 1.3B parameters x 4 bytes (ours 1.339B: 5.356 GB,
  4.988 GiB). So the gaps of a few percent on Full are the paper's rounding and
  units, not a different state.
* GaLore: ours are larger, by +26.0% / +22.5% / +20.9% / +17.1% in GB. Ours
  count everything GaLore keeps: two moments of the projected gradient,
  ``max(m, n) x r`` (the ``std`` rule keeps the larger side), plus the basis
  ``min(m, n) x r`` in the parameters' dtype (as galore-torch; see
  ``projectors.svd``), plus full Adam for the
  embedding, LM head and norms, which are not projected. 60M's .13 GB equals
  the Adam state of the unprojected embedding and LM head alone (0.131 GB,
  the ``galore_unprojected_gb`` entry in the JSON), leaving nothing for the
  projected matrices; dropping the basis (and counting GiB) brings the larger
  models close (1B: 1.73 GB without the basis), but no one convention fits
  60M through 1B. The paper's numbers are estimates; ours are the bytes of
  the state ``tx.init`` builds.

The APOLLO paper's 7B figures (APOLLO 1.6G, APOLLO-Mini 0.0G of optimizer
states) count the projected matrices only: ours are 1.619 GB and 0.006 GB for
those, plus 1.050 GB of AdamW state on the unprojected embedding, LM head and
norms in the totals (printed and in the JSON as ``apollo_paper_7b``).

Usage:
  python benchmarks/memory.py            # ~20 s of CPU, nothing allocated
  python benchmarks/memory.py --sizes 60m 1b --out /tmp/memory.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import optax_lowrank  # noqa: E402  pylint: disable=g-import-not-at-top
from models import LlamaConfig, lowrank_spec  # noqa: E402
from models.lowrank import params_tree  # noqa: E402
from train.steps import abstract_model  # noqa: E402

SIZES = ("60m", "130m", "350m", "1b", "7b")
LABELS = {"60m": "60M", "130m": "130M", "350m": "350M", "1b": "1B", "7b": "7B"}
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
GALORE_RANK = {"60m": 128, "130m": 256, "350m": 256, "1b": 512, "7b": 1024}
APOLLO_RANK = {"60m": 128, "130m": 192, "350m": 256, "1b": 256, "7b": 256}
FRUGAL_DENSITY = 0.25
# VLoRP paper: fixed budget c*r = 256, from the finest unit to plain rank 256.
VLORP_LEVELS = ((256, 1), (64, 4), (16, 16), (4, 64), (1, 256))
VLORP_ACCUM_LEVEL = (256, 1)
# GaLore paper, Table 6: optimizer-state memory in BF16, GB.
PAPER_TABLE6 = {
    "adamw": {"60m": 0.23, "130m": 0.51, "350m": 1.37, "1b": 5.20},
    "galore": {"60m": 0.13, "130m": 0.28, "350m": 0.54, "1b": 1.78},
}
PAPER_NAMES = {"adamw": "Full", "galore": "GaLore"}
# APOLLO paper (Zhu et al., 2025), LLaMA 7B optimizer states, GB: these count
# the projected matrices' states (the embedding and LM head are not included).
APOLLO_7B = {"apollo": 1.6, "apollo_mini": 0.0}


def vlorp_label(c: int, r: int) -> str:
  return f"vlorp[c={c},r={r}]"


VLORP_LABELS = {vlorp_label(c, r): (c, r) for c, r in VLORP_LEVELS}
DETAILED = set(PAPER_TABLE6) | set(APOLLO_7B)
GB, GIB = 1e9, 2**30


# ----------------------------------------------------------------------------
# Parameters.


def abstract_params(size: str, param_dtype: str, scan_layers: bool = False):
  """(config, params as ShapeDtypeStructs, mask, dimension numbers)."""
  cfg = LlamaConfig.preset(size, param_dtype=param_dtype,
                           scan_layers=scan_layers)
  params = params_tree(abstract_model(cfg)[1])
  mask, dims = lowrank_spec(params, cfg)
  return cfg, params, mask, dims


def with_dtype(built, param_dtype: str):
  """``abstract_params``'s result with every parameter in ``param_dtype``.

  The model's shapes do not depend on ``param_dtype`` (every parameter takes
  it), so the second dtype is a relabelling rather than a second trace.
  """
  cfg, params, mask, dims = built
  params = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, param_dtype), params)
  return cfg.replace(param_dtype=param_dtype), params, mask, dims


def count(tree, mask=None) -> int:
  leaves = jax.tree.leaves(tree)
  keep = [True] * len(leaves) if mask is None else jax.tree.leaves(mask)
  return sum(int(x.size) for x, k in zip(leaves, keep) if k)


# ----------------------------------------------------------------------------
# Optimizers.


class Row:
  """One optimizer row: how to build it for a size, and on which layout."""

  def __init__(self, label: str, factory: Callable[..., Any],
               kwargs: Callable[[str], dict], *, spec: bool = True,
               scan_layers: bool = False, setting: str = ""):
    self.label, self.factory, self.kwargs = label, factory, kwargs
    self.spec, self.scan_layers, self.setting = spec, scan_layers, setting


def _accepts(factory, name: str) -> bool:
  try:
    params = inspect.signature(factory).parameters
  except (TypeError, ValueError):
    return True
  return name in params or any(
      p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


KNOWN = {
    "galore": (lambda s: dict(rank=GALORE_RANK[s]),
               "rank 128/256/256/512/1024 (GaLore paper)"),
    "fira": (lambda s: dict(rank=GALORE_RANK[s]),
             "rank 128/256/256/512/1024 (as GaLore)"),
    "apollo": (lambda s: dict(rank=APOLLO_RANK[s]),
               "rank 128/192/256/256/256 (APOLLO paper)"),
    "apollo_mini": (lambda s: dict(rank=1), "rank 1"),
    "frugal": (lambda s: dict(density=FRUGAL_DENSITY, subspace="columns"),
               "density 0.25, subspace columns"),
    "gradnorm_lorp": (lambda s: dict(rank=GALORE_RANK[s]),
                      "rank as GaLore's, plus 4 float32 per output (g, |v|, g's moments)"),
}


def optimizer_rows() -> list[Row]:
  """optax.adamw, every registered optimizer, and FRUGAL's blocks subspace."""
  rows = [Row("adamw", optax.adamw, lambda s: {}, spec=False,
              setting="optax.adamw, moments in the parameters' dtype")]
  for name, factory in optax_lowrank.optimizers.items():
    if name == "vlorp":
      for c, r in VLORP_LEVELS:
        rows.append(Row(
            vlorp_label(c, r), factory,
            lambda s, c=c, r=r: dict(rank=r, granularity=c),
            setting=f"granularity {c}, rank {r} (budget c*r = 256, VLoRP "
            "paper)"))
      continue
    if name == "gum":  # the full-rank branch saves memory on stacked layers
      rows.append(Row(name, factory, lambda s: dict(rank=GALORE_RANK[s]),
                      scan_layers=True,
                      setting="rank as GaLore's, 2 full-rank layers, scanned "
                      "(stacked) layers"))
      continue
    if name in KNOWN:
      kwargs, setting = KNOWN[name]
    elif _accepts(factory, "rank"):
      kwargs = lambda s: dict(rank=GALORE_RANK[s])  # noqa: E731
      setting = "defaults, rank as GaLore's"
    else:
      kwargs, setting = (lambda s: {}), "defaults"
    rows.append(Row(name, factory, kwargs, setting=setting))
  if "frugal" in optax_lowrank.optimizers:
    rows.append(Row(
        "frugal[blocks]", optax_lowrank.optimizers["frugal"],
        lambda s: dict(density=FRUGAL_DENSITY, subspace="blocks"),
        scan_layers=True,
        setting="density 0.25, subspace blocks, scanned (stacked) layers"))
  return rows


def nbytes(tree) -> int:
  return sum(int(math.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def measure(row: Row, size: str, dtype: str, cache: dict) -> dict:
  """State bytes of ``row`` on ``size`` with ``dtype`` parameters.

  The total is the bytes of ``jax.eval_shape(tx.init, params)``, which is
  ``memory.state_bytes(...).total_bytes``; the per-leaf split of
  ``state_bytes`` (its attribution of state leaves to parameters is quadratic
  in the number of leaves, a third of the run time here) is taken for the
  BF16 rows compared with the papers only, where it also checks the total.
  """
  key = (size, dtype, row.scan_layers)
  if key not in cache:
    other = [v for (s, _, scan), v in cache.items()
             if s == size and scan == row.scan_layers]
    cache[key] = (with_dtype(other[0], dtype) if other
                  else abstract_params(size, dtype, row.scan_layers))
  _, params, mask, dims = cache[key]
  kwargs = dict(row.kwargs(size))
  if row.spec:
    for name, value in (("projection_mask", mask), ("dimension_numbers", dims)):
      if _accepts(row.factory, name):
        kwargs[name] = value
  tx = row.factory(1e-3, **kwargs)
  total = nbytes(jax.eval_shape(tx.init, params))
  out = dict(bytes=total, gb=total / GB, gib=total / GIB)
  if row.label in DETAILED and dtype == "bfloat16":
    mem = optax_lowrank.memory.state_bytes(tx, params)
    assert mem.total_bytes == total, (row.label, mem.total_bytes, total)
    out.update(
        shared_bytes=mem.shared_bytes,
        projected_bytes=sum(l.state_bytes for l in mem.leaves if l.projected),
        unprojected_bytes=sum(
            l.state_bytes for l in mem.leaves if not l.projected),
        projected_leaves=sum(l.projected for l in mem.leaves),
    )
  if row.label in VLORP_LABELS:
    c, r = VLORP_LABELS[row.label]
    formula = vlorp_formula_bytes(params, mask, c, r)
    out.update(formula_bytes=formula, minus_formula_bytes=total - formula,
               projected_formula_bytes=vlorp_formula_bytes(
                   params, mask, c, r, unprojected=False))
  return out


def vlorp_formula_bytes(params, mask, c: int, r: int,
                        unprojected: bool = True) -> int:
  """VLoRP's state from its formula, but for the shared step counts.

  Per projected matrix (all 2-D here): the first moment, ``max(m, n)·c·r``
  in the parameters' dtype; ProjFactor's factored second moment, ``m + n``
  float32, and its int32 count; the key of the random matrix, two uint32.
  Per other leaf (``unprojected``): AdamW's two moments in its dtype.
  """
  total = 0
  for x, keep in zip(jax.tree.leaves(params), jax.tree.leaves(mask)):
    itemsize = jnp.dtype(x.dtype).itemsize
    if keep:
      m, n = x.shape
      total += max(m, n) * c * r * itemsize + (m + n) * 4 + 4 + 8
    elif unprojected:
      total += 2 * int(x.size) * itemsize
  return total


def measure_accumulation(size: str, dtype: str, k: int, cache: dict) -> dict:
  """Accumulator and total state bytes of gradient accumulation over ``k``."""
  key = (size, dtype, False)
  if key not in cache:
    other = [v for (s, _, scan), v in cache.items() if s == size and not scan]
    cache[key] = (with_dtype(other[0], dtype) if other
                  else abstract_params(size, dtype))
  _, params, mask, dims = cache[key]
  c, r = VLORP_ACCUM_LEVEL
  vlorp = lambda: optax_lowrank.vlorp(  # noqa: E731
      1e-3, rank=r, granularity=c, projection_mask=mask, dimension_numbers=dims)
  setups = {
      "adamw + optax.MultiSteps": (
          optax.MultiSteps(optax.adamw(1e-3), k), lambda st: st.acc_grads),
      f"{vlorp_label(c, r)} + optax_lowrank.MultiSteps": (
          optax_lowrank.MultiSteps(vlorp(), k),
          lambda st: (st.acc_grads, st.acc_projected)),
      f"{vlorp_label(c, r)} + optax.MultiSteps": (
          optax.MultiSteps(vlorp(), k), lambda st: st.acc_grads),
  }
  out = {}
  for label, (tx, acc_of) in setups.items():
    st = jax.eval_shape(tx.init, params)
    acc, total = nbytes(acc_of(st)), nbytes(st)
    out[label] = dict(accumulator_bytes=acc, accumulator_gb=acc / GB,
                      total_bytes=total, total_gb=total / GB,
                      inner_bytes=nbytes(st.inner_opt_state))
  return out


# ----------------------------------------------------------------------------
# Output.


def rel(ours: float, paper: float) -> float:
  return (ours - paper) / paper


def print_tables(results, sizes, skipped):
  for dkey in DTYPES:
    print(f"\nOptimizer-state memory, {dkey.upper()} parameters, GB (1e9 B):")
    head = f"  {'optimizer':<16}" + "".join(
        f"{LABELS[s]:>10}" for s in sizes)
    print(head)
    for label, by_size in results[dkey].items():
      cells = "".join(
          f"{by_size[s]['gb']:>10.3f}" if s in by_size else f"{'skip':>10}"
          for s in sizes)
      print(f"  {label:<16}{cells}")
  for label, reasons in skipped.items():
    for where, why in reasons.items():
      print(f"  skipped {label} at {where}: {why}")


def print_vlorp_check(results, sizes):
  """The projected state of the VLoRP levels: equal, and as the formula says."""
  levels = [l for l in results["bf16"] if l in VLORP_LABELS]
  if not levels:
    return
  for dkey in DTYPES:
    print(f"\nVLoRP at c*r = 256, {dkey.upper()}: state of the 5 levels "
          "(min-max), of which projected matrices; measured minus formula "
          "(vlorp_formula_bytes) per level:")
    for s in sizes:
      cells = [results[dkey][l][s] for l in levels if s in results[dkey][l]]
      if not cells:
        continue
      totals = [x["bytes"] for x in cells]
      print(f"  {LABELS[s]:<5} {min(totals) / GB:.4f}-{max(totals) / GB:.4f} "
            f"GB (spread {max(totals) - min(totals):,} B), projected "
            f"{cells[0]['projected_formula_bytes'] / GB:.4f} GB; minus "
            "formula " + ", ".join(f"{x['minus_formula_bytes']:,}"
                                   for x in cells) + " B")


def print_accumulation(accum, sizes, k):
  for dkey in DTYPES:
    print(f"\nGradient accumulation over {k} micro-batches, {dkey.upper()} "
          "parameters: accumulator GB (total state GB):")
    labels = list(next(iter(accum[dkey].values()), {}))
    for label in labels:
      cells = "".join(
          f"{accum[dkey][s][label]['accumulator_gb']:>9.3f} "
          f"({accum[dkey][s][label]['total_gb']:.3f})"
          if s in accum[dkey] else f"{'skip':>17}" for s in sizes)
      print(f"  {label:<40}{cells}")


def comparison(results, sizes) -> list[dict]:
  rows = []
  for label, paper in PAPER_TABLE6.items():
    for s in sizes:
      if s not in paper or s not in results["bf16"].get(label, {}):
        continue
      r = results["bf16"][label][s]
      row = dict(
          size=s, optimizer=label, paper_name=PAPER_NAMES[label],
          ours_gb=r["gb"], ours_gib=r["bytes"] / GIB, paper=paper[s],
          rel_diff_gb=rel(r["gb"], paper[s]),
          rel_diff_gib=rel(r["bytes"] / GIB, paper[s]),
      )
      if label == "galore":
        row["galore_unprojected_gb"] = r["unprojected_bytes"] / GB
      rows.append(row)
  return rows


def apollo_comparison(results) -> list[dict]:
  rows = []
  for label, paper in APOLLO_7B.items():
    r = results["bf16"].get(label, {}).get("7b")
    if r is None:
      continue
    rows.append(dict(
        size="7b", optimizer=label, paper=paper, ours_total_gb=r["gb"],
        ours_projected_gb=r["projected_bytes"] / GB,
        ours_unprojected_gb=r["unprojected_bytes"] / GB,
        diff_projected_gb=r["projected_bytes"] / GB - paper,
    ))
  return rows


def print_apollo_comparison(rows):
  if not rows:
    return
  print("\nAPOLLO paper, LLaMA 7B optimizer states (BF16), next to ours "
        "(projected matrices only / everything):")
  for r in rows:
    print(f"  {r['optimizer']:<12} paper {r['paper']:.1f} GB   ours "
          f"{r['ours_projected_gb']:.3f} GB / {r['ours_total_gb']:.3f} GB "
          f"(+{r['ours_unprojected_gb']:.3f} GB of AdamW on the embedding, "
          f"LM head and norms)")


def print_comparison(rows):
  print("\nGaLore paper, Table 6 (BF16 optimizer states) next to ours:")
  print(f"  {'size':<6}{'method':<8}{'paper':>7}{'ours GB':>9}{'diff':>8}"
        f"{'ours GiB':>10}{'diff':>8}")
  for r in rows:
    print(f"  {LABELS[r['size']]:<6}{r['paper_name']:<8}{r['paper']:>7.2f}"
          f"{r['ours_gb']:>9.3f}{100 * r['rel_diff_gb']:>+7.1f}%"
          f"{r['ours_gib']:>10.3f}{100 * r['rel_diff_gib']:>+7.1f}%")


def plot(results, sizes, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  labels = list(results["bf16"])
  x = np.arange(len(sizes))
  width = 0.85 / max(len(labels), 1)
  fig, ax = plt.subplots(figsize=(11, 5))
  # tab10 for the optimizers, shades of one hue for VLoRP's levels.
  others = [l for l in labels if l not in VLORP_LABELS]
  shades = plt.cm.PuBuGn(np.linspace(0.45, 0.95, len(VLORP_LABELS)))
  colors = {l: plt.cm.tab10(i % 10) for i, l in enumerate(others)}
  colors.update(zip(VLORP_LABELS, shades))
  for i, label in enumerate(labels):
    by_size = results["bf16"][label]
    ys = [by_size[s]["gb"] if s in by_size else np.nan for s in sizes]
    xs = x - 0.425 + (i + 0.5) * width
    ax.bar(xs, ys, width, label=label, color=colors[label])
    if label in PAPER_TABLE6:
      px = [xx for xx, s in zip(xs, sizes) if s in PAPER_TABLE6[label]]
      py = [PAPER_TABLE6[label][s] for s in sizes if s in PAPER_TABLE6[label]]
      full = label == "adamw"
      ax.scatter(px, py, marker="_" if full else "x", s=260 if full else 60,
                 linewidths=2, zorder=4, color="black",
                 label=f"{PAPER_NAMES[label]}, GaLore paper Table 6")
  ax.set_yscale("log")
  ax.set_xticks(x, [LABELS[s] for s in sizes])
  ax.set_xlabel("LLaMA size (GaLore paper configs)")
  ax.set_ylabel("optimizer state, GB (1e9 B), log scale")
  ax.set_title("Optimizer-state memory, BF16 parameters "
               "(attention and MLP matrices projected)")
  ax.grid(axis="y", which="both", alpha=0.3)
  ax.legend(ncol=3, fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--sizes", nargs="+", choices=SIZES, default=list(SIZES))
  ap.add_argument("--out", default=None, help="JSON path (default: "
                  "benchmarks/results/memory.json; the PNG goes beside it)")
  ap.add_argument("--accum-k", type=int, default=4,
                  help="micro-batches of the gradient-accumulation rows")
  args = ap.parse_args(argv)
  sizes = [s for s in SIZES if s in args.sizes]
  t0 = time.perf_counter()

  cache: dict = {}
  rows = optimizer_rows()
  results: dict = {d: {row.label: {} for row in rows} for d in DTYPES}
  skipped: dict = {}
  for row in rows:
    for s in sizes:
      for dkey, dtype in DTYPES.items():
        try:
          results[dkey][row.label][s] = measure(row, s, dtype, cache)
        except Exception as e:  # noqa: BLE001 - report and go on
          why = f"{type(e).__name__}: {e}".splitlines()[0][:300]
          skipped.setdefault(row.label, {})[f"{s}/{dkey}"] = why
  for d in DTYPES:  # drop rows that built for no size at all
    results[d] = {k: v for k, v in results[d].items() if v}
  accum: dict = {d: {} for d in DTYPES}
  if "vlorp" in optax_lowrank.optimizers:
    for s in sizes:
      for dkey, dtype in DTYPES.items():
        try:
          accum[dkey][s] = measure_accumulation(s, dtype, args.accum_k, cache)
        except Exception as e:  # noqa: BLE001 - report and go on
          why = f"{type(e).__name__}: {e}".splitlines()[0][:300]
          skipped.setdefault("accumulation", {})[f"{s}/{dkey}"] = why

  models = {}
  for s in sizes:
    cfg, params, mask, _ = cache.get((s, "bfloat16", False)) or (
        abstract_params(s, "bfloat16"))
    models[s] = dict(
        d_model=cfg.d_model, d_ff=cfg.d_ff, num_heads=cfg.num_heads,
        num_layers=cfg.num_layers, vocab_size=cfg.vocab_size,
        n_params=count(params), n_projected=count(params, mask),
    )
  comp = comparison(results, sizes)
  print_tables(results, sizes, skipped)
  print_vlorp_check(results, sizes)
  print_accumulation(accum, sizes, args.accum_k)
  print_comparison(comp)
  apollo_comp = apollo_comparison(results) if "7b" in sizes else []
  print_apollo_comparison(apollo_comp)

  out = args.out or os.path.join(
      os.path.dirname(os.path.abspath(__file__)), "results", "memory.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  png = os.path.splitext(out)[0] + ".png"
  plot(results, sizes, png)
  elapsed = time.perf_counter() - t0
  payload = dict(
      command="python benchmarks/memory.py " + " ".join(
          sys.argv[1:] if argv is None else argv),
      jax=jax.__version__, optax=optax.__version__,
      optax_lowrank=optax_lowrank.__version__,
      unit="GB = 1e9 bytes (gib: 2^30 bytes); bytes are exact",
      method=("optax_lowrank.memory.state_bytes: jax.eval_shape of tx.init "
              "on abstract parameters; nothing allocated"),
      settings={row.label: row.setting for row in rows},
      models=models,
      results=results,
      accumulation=dict(
          k=args.accum_k,
          note=("accumulator bytes: acc_grads (+ acc_projected) of "
                "jax.eval_shape(multi.init, params); total: the whole "
                "MultiSteps state. optax.MultiSteps accumulates at full size "
                "in float32; optax_lowrank.MultiSteps keeps projected leaves "
                "at projected size in the gradient's dtype, the others "
                "full-size in float32."),
          results=accum),
      skipped=skipped,
      paper_table6=dict(
          source="Zhao et al., 2024, GaLore, Table 6 (BF16 optimizer states)",
          values_gb=PAPER_TABLE6),
      comparison=comp,
      apollo_paper_7b=dict(
          source=("Zhu et al., 2025, APOLLO: optimizer states of LLaMA 7B "
                  "(APOLLO 1.6G, APOLLO-Mini 0.0G)"),
          values_gb=APOLLO_7B, comparison=apollo_comp),
      seconds=round(elapsed, 2),
  )
  with open(out, "w") as f:
    json.dump(payload, f, indent=1)
  print(f"\nwrote {out} and {png} ({elapsed:.1f}s)")


if __name__ == "__main__":
  main()
