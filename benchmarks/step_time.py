"""Optimizer step time: optax.adamw vs every optax_lowrank alias vs optax.contrib.galore.

Times only the optimizer: a jitted ``tx.update(grads, state, params)`` followed by
``optax.apply_updates``, with ``params`` and the optimizer state donated, on the
weight shapes of the GaLore paper's LLaMA configs (Flax ``(in, out)`` kernels,
float32). Gradients are fixed random arrays, so no model runs.

For the GaLore optimizers three numbers are reported:

* steady: a step on which no subspace is refreshed (``count % gap != 0``);
* refresh: a step on which every projected matrix is refreshed (an SVD each);
* amortized: ``(refresh + (gap - 1) * steady) / gap``.

VLoRP (``optax_lowrank.vlorp``) is timed at the levels ``(c, r)`` of its
paper's fixed budget ``c·r = 256`` (``--vlorp-levels``; default all five:
256x1, 64x4, 16x16, 4x64, 1x256), with the same gap as the others; its
refresh is a new key, and every step regenerates the random matrix from it.

Steady and refresh steps are selected by setting the transform's step counter
in the (donated) state before each timed step; all optimizers are timed
interleaved in one process, so the ratios to ``optax.adamw`` are side by side.

Usage:
  python benchmarks/step_time.py --config both
  python benchmarks/step_time.py --config 1b --layers 24 --repeats 20
"""

from __future__ import annotations

import argparse
import json
import os

# LAPACK (the SVD of a refresh step, on CPU) runs on OpenBLAS threads. On a
# small shared CPU its spinning worker threads make a 512x512 SVD 10-70x
# slower (and slow down the XLA step around it); one thread is stable. Set
# OPENBLAS_NUM_THREADS yourself to override. Must happen before jax loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import platform
import re
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from optax import contrib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import optax_lowrank  # noqa: E402  pylint: disable=g-import-not-at-top
from optax_lowrank.core import LowRankState  # noqa: E402

VOCAB = 32000
CONFIGS = {
    # GaLore paper, Table 9 / galore-torch configs/llama_60m.json, llama_1b.json.
    "60m": dict(hidden=512, intermediate=1376, layers=8, rank=128),
    "1b": dict(hidden=2048, intermediate=5461, layers=24, rank=512),
}
# Reduced layer count for the 1B config on CPU (2 cores would take many
# minutes per refresh step with all 24 layers).
CPU_1B_LAYERS = 2
PROJECTED = ("q", "k", "v", "o", "gate", "up", "down")
# VLoRP paper: fixed budget c*r = 256 (granularity c, rank r).
VLORP_LEVELS = ((256, 1), (64, 4), (16, 16), (4, 64), (1, 256))


# ----------------------------------------------------------------------------
# Parameters, gradients, masks.


def param_shapes(hidden: int, intermediate: int, layers: int) -> dict:
  """Nested dict of shapes, Flax layout: kernels ``(in, out)``."""
  h, ff = hidden, intermediate
  tree: dict[str, Any] = {"embed": {"embedding": (VOCAB, h)}}
  for i in range(layers):
    tree[f"layer_{i}"] = {
        "attn_norm": {"scale": (h,)},
        "attn": {n: {"kernel": (h, h)} for n in ("q", "k", "v", "o")},
        "mlp_norm": {"scale": (h,)},
        "mlp": {
            "gate": {"kernel": (h, ff)},
            "up": {"kernel": (h, ff)},
            "down": {"kernel": (ff, h)},
        },
    }
  tree["final_norm"] = {"scale": (h,)}
  tree["lm_head"] = {"kernel": (h, VOCAB)}
  return tree


def _is_shape(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def _path_names(path) -> list[str]:
  return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def is_projected(path) -> bool:
  """The attention and MLP matrices (what the GaLore paper projects)."""
  names = _path_names(path)
  return (
      len(names) >= 3
      and names[-1] == "kernel"
      and names[-3] in ("attn", "mlp")
      and names[-2] in PROJECTED
  )


def projection_mask(params) -> Any:
  return jax.tree_util.tree_map_with_path(lambda p, _: is_projected(p), params)


def contrib_dimension_numbers(params) -> Any:
  """optax.contrib.galore: project the masked kernels only (None elsewhere)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: contrib.GaLoreDimensionNumbers(0, 1) if is_projected(p) else None,
      params,
  )


def random_tree(shapes: dict, key, scale: float) -> Any:
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=_is_shape)
  keys = jax.random.split(key, len(leaves))
  make = jax.jit(
      lambda k, shape: scale * jax.random.normal(k, shape, jnp.float32),
      static_argnums=1,
  )
  return treedef.unflatten([make(k, s) for k, s in zip(keys, leaves)])


# ----------------------------------------------------------------------------
# Optimizers and their step counters.


def set_refresh_count(state, count: int):
  """Returns ``state`` with every GaLore step counter set to ``count``.

  Both ``optax_lowrank.LowRankState`` and ``optax.contrib``'s ``GaLoreState``
  refresh when ``count % gap == 0``. Other counters (Adam's bias correction)
  are left as they are.
  """
  if isinstance(state, (LowRankState, contrib.GaLoreState)):
    return state._replace(count=jnp.asarray(count, jnp.int32))
  if isinstance(state, tuple) and hasattr(state, "_fields"):
    return type(state)(*(set_refresh_count(s, count) for s in state))
  if isinstance(state, (tuple, list)):
    return type(state)(set_refresh_count(s, count) for s in state)
  if isinstance(state, dict):
    return {k: set_refresh_count(v, count) for k, v in state.items()}
  return state


def make_optimizers(rank: int, gap: int, mask_fn: Callable,
                    vlorp_levels=VLORP_LEVELS, layers: int = 8) -> dict:
  opts = {
      "optax.adamw": dict(
          tx=optax.adamw(1e-3), galore=False,
          projects="nothing (full-rank AdamW on all leaves)",
      ),
      "optax_lowrank.galore": dict(
          tx=optax_lowrank.galore(
              1e-3, rank=rank, update_proj_gap=gap, scale=0.25, projection_mask=mask_fn
          ),
          galore=True,
          projects=(
              "q,k,v,o,gate,up,down via mask; galore-torch 'std' orientation "
              "on the (out, in) view: the smaller side of each matrix is "
              "compressed (Adam state max(m,n) x r)"
          ),
      ),
      "optax_lowrank.apollo": dict(
          tx=optax_lowrank.apollo(
              1e-3, rank=rank, update_proj_gap=gap, projection_mask=mask_fn),
          galore=True,
          projects="as galore; random projection redrawn from a key",
      ),
      "optax_lowrank.apollo_mini": dict(
          tx=optax_lowrank.apollo_mini(1e-3, update_proj_gap=gap, projection_mask=mask_fn),
          galore=True,
          projects="as galore, rank 1, tensor-wise scaling",
      ),
      "optax_lowrank.fira": dict(
          tx=optax_lowrank.fira(
              1e-3, rank=rank, update_proj_gap=gap, projection_mask=mask_fn),
          galore=True,
          projects="as galore (exact SVD) plus the scaled residual",
      ),
      "optax_lowrank.frugal": dict(
          tx=optax_lowrank.frugal(
              1e-3, 0.25, subspace="columns", update_proj_gap=gap,
              projection_mask=mask_fn),
          galore=True,
          projects="as galore's mask; 25% random columns state-full, "
          "signSGD elsewhere",
      ),
      "optax_lowrank.flora": dict(
          tx=optax_lowrank.flora(1e-3, rank=rank, kappa=gap, projection_mask=mask_fn),
          galore=True,
          projects="as galore's mask (where min side >= 128, max <= 4 min); "
          "Adafactor second moment everywhere",
      ),
      "optax_lowrank.gradnorm_lorp": dict(
          tx=optax_lowrank.gradnorm_lorp(
              1e-3, rank=rank, update_proj_gap=gap, projection_mask=mask_fn),
          galore=True,
          projects="as galore; each matrix weight-normalized per output around it",
      ),
      "optax_lowrank.gum": dict(
          tx=optax_lowrank.gum(
              1e-3, rank=rank, update_proj_gap=gap, num_layers=layers,
              full_rank_layers=min(2, layers - 1),
              group_fn=lambda path: path.split("/")[0], projection_mask=mask_fn),
          galore=True,
          projects="as galore (exact SVD); 2 of the layers (1 of 2) per period take "
          "Muon on G - PP^T G (one m x n buffer per unscanned matrix), the "
          "others Muon in the subspace; Adam on the other leaves",
      ),
      "optax_lowrank.owlore": dict(
          tx=optax_lowrank.owlore(
              1e-3, rank=rank, update_proj_gap=gap, projection_mask=mask_fn),
          galore=True,
          projects="as galore's mask; GaLore-AdamW in round(5/32 L) layers "
          "drawn every 50 steps by OWL ratio, the other layers' update and "
          "state selected back (all gradients still computed)",
      ),
      "optax.contrib.galore": dict(
          tx=contrib.galore(
              learning_rate=1e-3, rank=rank, update_proj_gap=gap, scale=0.25,
              weight_dimension_numbers=contrib_dimension_numbers,
          ),
          galore=True,
          projects=(
              "q,k,v,o,gate,up,down via weight_dimension_numbers (None for "
              "embedding, head, norms); on the (in, out) kernel it compresses "
              "the larger side of each matrix (Adam state r x min(m,n)); "
              "Adam eps 1e-8 (ours 1e-6)"
          ),
      ),
  }
  for c, r in vlorp_levels:
    opts[f"optax_lowrank.vlorp[c={c},r={r}]"] = dict(
        tx=optax_lowrank.vlorp(
            1e-3, rank=r, granularity=c, update_proj_gap=gap, projection_mask=mask_fn),
        galore=True,
        projects=(
            f"as galore's mask; granularity {c}, rank {r} (c*r = {c * r}); "
            "Gaussian matrix regenerated from a key every step (redrawn on "
            "refresh), ProjFactor factored second moment"
        ),
    )
  return opts


def tree_mib(tree) -> float:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)) / 2**20


# ----------------------------------------------------------------------------
# Timing.


def make_step(tx):
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step, donate_argnums=(0, 1))


def run_config(
    name, *, layers, rank, gap, repeats, refresh_repeats, warmup_refresh=True,
    seed=0, vlorp_levels=VLORP_LEVELS,
):
  cfg = CONFIGS[name]
  h, ff = cfg["hidden"], cfg["intermediate"]
  shapes = param_shapes(h, ff, layers)
  key_p, key_g = jax.random.split(jax.random.key(seed))
  grads = jax.block_until_ready(random_tree(shapes, key_g, 1e-3))
  n_params = sum(x.size for x in jax.tree.leaves(grads))
  n_proj = sum(
      x.size for p, x in jax.tree_util.tree_leaves_with_path(grads)
      if is_projected(p)
  )
  print(
      f"\n== {name}: hidden {h}, intermediate {ff}, {layers} layers"
      f" (paper: {cfg['layers']}), rank {rank}, gap {gap}; "
      f"{n_params / 1e6:.1f}M params, {n_proj / 1e6:.1f}M projected "
      f"in {7 * layers} matrices",
      flush=True,
  )

  opts = make_optimizers(rank, gap, projection_mask, vlorp_levels, layers)
  runs = {}
  for oname, o in opts.items():
    t0 = time.perf_counter()
    params = random_tree(shapes, key_p, 0.02)
    state = o["tx"].init(params)
    step = make_step(o["tx"])
    # Warm-up: compile and run one refresh step (count 0) and one steady step,
    # untimed. `warmup_refresh=False` (1B on CPU) skips the warm-up refresh,
    # which costs as much as a timed one there; the basis is then still zero
    # during the steady warm-up step (same cost, zero update).
    if o["galore"] and warmup_refresh:
      state = set_refresh_count(state, 0)
      params, state = jax.block_until_ready(step(params, state, grads))
    if o["galore"]:
      state = set_refresh_count(state, 1)
    params, state = jax.block_until_ready(step(params, state, grads))
    runs[oname] = dict(
        step=step, params=params, state=state, steady=[], refresh=[],
        state_mib=tree_mib(state),
    )
    print(
        f"  warm-up {oname}: {time.perf_counter() - t0:.1f}s "
        f"(state {runs[oname]['state_mib']:.0f} MiB)",
        flush=True,
    )

  def timed(r, count):
    if count is not None:
      r["state"] = set_refresh_count(r["state"], count)
    jax.block_until_ready((r["params"], r["state"]))
    t0 = time.perf_counter()
    r["params"], r["state"] = jax.block_until_ready(
        r["step"](r["params"], r["state"], grads)
    )
    return time.perf_counter() - t0

  # Interleave the optimizers so that machine noise hits them alike.
  for i in range(repeats):
    for oname, o in opts.items():
      r = runs[oname]
      # Steady: a count that is not a multiple of gap (gap > 1).
      steady_count = gap + 1 + i % (gap - 1)
      r["steady"].append(timed(r, steady_count if o["galore"] else None))
      if o["galore"] and i < refresh_repeats:
        r["refresh"].append(timed(r, gap * (i + 1)))

  results = {}
  adamw_ms = 1e3 * statistics.median(runs["optax.adamw"]["steady"])
  for oname, o in opts.items():
    r = runs[oname]
    steady = 1e3 * statistics.median(r["steady"])
    row = dict(
        steady_ms=steady,
        steady_samples_ms=[1e3 * t for t in r["steady"]],
        steady_ratio=steady / adamw_ms,
        state_mib=r["state_mib"],
        projects=o["projects"],
        compiled_variants=r["step"]._cache_size(),  # pylint: disable=protected-access
    )
    if o["galore"]:
      refresh = 1e3 * statistics.median(r["refresh"])
      amortized = (refresh + (gap - 1) * steady) / gap
      row.update(
          refresh_ms=refresh,
          refresh_samples_ms=[1e3 * t for t in r["refresh"]],
          refresh_ratio=refresh / adamw_ms,
          amortized_ms=amortized,
          amortized_ratio=amortized / adamw_ms,
      )
    results[oname] = row
  for r in runs.values():  # free device memory before the next config
    del r["params"], r["state"]
  return dict(
      config=name, hidden=h, intermediate=ff, layers=layers,
      paper_layers=cfg["layers"], rank=rank, gap=gap, vocab=VOCAB,
      n_params=n_params, n_projected=n_proj, repeats=repeats,
      refresh_repeats=refresh_repeats, warmup_refresh=warmup_refresh,
      optimizers=results,
  )


def print_table(res):
  print(
      f"\n{res['config']} ({res['layers']}/{res['paper_layers']} layers, "
      f"rank {res['rank']}, gap {res['gap']}), median ms and ratio to "
      f"optax.adamw, same run:"
  )
  width = max(22, *(len(o) for o in res["optimizers"]))
  hdr = (
      f"  {'optimizer':<{width}} {'steady ms':>10} {'x adamw':>8} "
      f"{'refresh ms':>11} {'x adamw':>8} {'amortized ms':>13} {'x adamw':>8}"
      f" {'state MiB':>10}"
  )
  print(hdr)
  for oname, o in res["optimizers"].items():
    line = (f"  {oname:<{width}} {o['steady_ms']:>10.1f} "
            f"{o['steady_ratio']:>8.2f} ")
    if "refresh_ms" in o:
      line += (
          f"{o['refresh_ms']:>11.1f} {o['refresh_ratio']:>8.2f} "
          f"{o['amortized_ms']:>13.1f} {o['amortized_ratio']:>8.2f}"
      )
    else:
      line += f"{'-':>11} {'':>8} {'-':>13} {'':>8}"
    line += f" {o['state_mib']:>10.0f}"
    print(line)
  for oname, o in res["optimizers"].items():
    if o["compiled_variants"] != 1:
      print(f"  WARNING: {oname} step compiled {o['compiled_variants']} times")


def device_name() -> str:
  d = jax.devices()[0]
  kind = d.device_kind
  name = d.platform if kind.lower() == d.platform else f"{d.platform}_{kind}"
  return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", choices=("60m", "1b", "both"), default="60m")
  ap.add_argument(
      "--layers", type=int, default=None,
      help="override the layer count (default: the paper's, except 1B on CPU: "
      f"{CPU_1B_LAYERS})",
  )
  ap.add_argument(
      "--rank", type=int, default=None,
      help="default: 128 for 60M, 512 for 1B (the paper's)",
  )
  ap.add_argument("--gap", type=int, default=200)
  ap.add_argument(
      "--repeats", type=int, default=None,
      help="timed steady steps per optimizer (default: on CPU 10 for 60M and 5 "
      "for 1B; 30 on accelerators)",
  )
  ap.add_argument(
      "--refresh-repeats", type=int, default=None,
      help="timed refresh steps per GaLore optimizer (default: on CPU 3 for "
      "60M and 1 for 1B, where one refresh step is ~14 SVDs and ~50 s; 10 on "
      "accelerators; capped at --repeats)",
  )
  ap.add_argument(
      "--vlorp-levels", nargs="*", default=None, metavar="CxR",
      help="VLoRP levels to time, e.g. 256x1 16x16 (default: 256x1 64x4 "
      "16x16 4x64 1x256, the paper's budget c*r = 256; the flag alone: "
      "no VLoRP)",
  )
  ap.add_argument("--out", default=None, help="JSON path (default: "
                  "benchmarks/results/step_time_<device>.json)")
  args = ap.parse_args(argv)

  on_cpu = jax.devices()[0].platform == "cpu"
  vlorp_levels = VLORP_LEVELS
  if args.vlorp_levels is not None:
    try:
      vlorp_levels = tuple(
          tuple(int(v) for v in level.lower().split("x"))
          for level in args.vlorp_levels)
    except ValueError:
      ap.error("--vlorp-levels: each level is CxR, e.g. 256x1")
    if any(len(level) != 2 for level in vlorp_levels):
      ap.error("--vlorp-levels: each level is CxR, e.g. 256x1")
  if args.gap < 2:
    ap.error("--gap must be at least 2 (otherwise every step refreshes)")
  dev = device_name()
  print(
      f"device: {jax.devices()[0]} ({jax.devices()[0].device_kind}), "
      f"jax {jax.__version__}, optax {optax.__version__}, "
      f"python {platform.python_version()}"
  )
  names = ("60m", "1b") if args.config == "both" else (args.config,)
  all_res = []
  for name in names:
    layers = args.layers or (
        CPU_1B_LAYERS if (on_cpu and name == "1b") else CONFIGS[name]["layers"]
    )
    rank = args.rank or CONFIGS[name]["rank"]
    big_cpu = on_cpu and name == "1b"
    repeats = args.repeats or ((5 if big_cpu else 10) if on_cpu else 30)
    refresh_repeats = min(
        repeats,
        args.refresh_repeats or ((1 if big_cpu else 3) if on_cpu else 10),
    )
    res = run_config(
        name, layers=layers, rank=rank, gap=args.gap, repeats=repeats,
        refresh_repeats=refresh_repeats, warmup_refresh=not big_cpu,
        vlorp_levels=vlorp_levels,
    )
    print_table(res)
    all_res.append(res)

  out = args.out or os.path.join(
      os.path.dirname(os.path.abspath(__file__)), "results",
      f"step_time_{dev}.json",
  )
  os.makedirs(os.path.dirname(out), exist_ok=True)
  d = jax.devices()[0]
  payload = dict(
      device=dev, platform=d.platform, device_kind=d.device_kind,
      device_count=jax.device_count(), cpu_count=os.cpu_count(),
      jax=jax.__version__, optax=optax.__version__,
      optax_lowrank=optax_lowrank.__version__,
      openblas_num_threads=os.environ.get("OPENBLAS_NUM_THREADS"),
      command="python benchmarks/step_time.py " + " ".join(
          sys.argv[1:] if argv is None else argv
      ),
      timestamp_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      notes=(
          "Optimizer update + apply_updates only, jitted, params and state "
          "donated, float32, fixed random gradients; medians; all optimizers "
          "timed interleaved in one process (ratios are side by side). "
          "Refresh/steady selected by setting the GaLore step counter."
      ),
      results=all_res,
  )
  with open(out, "w") as f:
    json.dump(payload, f, indent=1)
  print(f"\nwrote {out}")


if __name__ == "__main__":
  main()
