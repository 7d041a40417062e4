"""Refresh work spread over the devices: GaLore's refresh step on 1-8 devices.

A GaLore update (exact SVD, rank ``d/4``) of one LLaMA-shaped stack of
scanned layers (``--layers`` layers of q, k, v, o ``d×d``, gate, up ``d×ff``,
down ``ff×d``; every kernel FSDP-sharded along its first matrix axis over a
1-D mesh of ``D`` devices) is timed, for ``D`` in ``--devices``, on a
**refresh** step (the step counter a multiple of the gap) and a **steady**
step, with two ways of factorizing on a refresh:

* ``spread`` (the library): each device factorizes ``layers / D`` of each
  stack (``optax_lowrank.spread.map_matrices``); with ``--unstacked`` (one
  2-D leaf per layer and kernel, as an unscanned model) each leaf is
  factorized by one device, leaf ``i`` by device ``i mod D``;
* ``replicated`` (the library before it): every matrix gathered on every
  device, which factorizes all of them; reproduced here by replacing
  ``spread.map_matrices`` with a function that does exactly that.

Each ``D`` runs in its own process (the simulated device count is fixed when
JAX starts). Memory: per-device temporary bytes (``memory_analysis``) of the
compiled update with each refresh, and of the same update with a refresh that
keeps the basis (the steady program), next to one matrix's bytes.

On a CPU, simulated devices share the host's cores, so the ``replicated``
refresh grows with ``D`` (``D`` devices each factorize everything) while
``spread`` stays flat; on ``D`` real devices ``spread`` would be ``D`` times
faster than ``replicated``.

Usage:
  python benchmarks/spread_refresh.py                      # ~3 min on 2 CPU cores
  python benchmarks/spread_refresh.py --unstacked          # the same layers unscanned
  python benchmarks/spread_refresh.py --d-model 2048 --d-ff 5461 --layers 8  # a GPU host
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "spread_refresh_cpu{}.json")


def measure(args) -> dict:
  """Runs in a process that sees ``args.devices`` devices."""
  import jax
  import jax.numpy as jnp
  import optax
  from jax.sharding import NamedSharding, PartitionSpec as P

  import optax_lowrank as ol
  from optax_lowrank import shapes, spread

  d, ff, layers = args.d_model, args.d_ff, args.layers
  kernels = {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d),
             "gate": (d, ff), "up": (d, ff), "down": (ff, d)}
  mesh = jax.make_mesh((jax.device_count(),), ("fsdp",))
  keys = jax.random.split(jax.random.key(0), len(kernels))
  stacks = {name: jax.random.normal(k, (layers, *s)) * 1e-3
            for k, (name, s) in zip(keys, kernels.items())}
  if args.unstacked:  # one 2-D leaf per layer and kernel
    sharding = NamedSharding(mesh, P("fsdp", None))
    host = {f"{name}_{i}": x[i] for name, x in stacks.items() for i in range(layers)}
    dims = None
  else:
    sharding = NamedSharding(mesh, P(None, "fsdp", None))
    host, dims = stacks, ol.DimensionNumbers(1, 2)
  with jax.set_mesh(mesh):
    grads = {name: jax.device_put(x, sharding) for name, x in host.items()}

  def replicated_map(fn, x, owner=None):
    """The library's refresh before spreading: every device factorizes all."""
    del owner
    x = jax.sharding.reshard(shapes.gather_matrices(x), P())
    return spread._one_at_a_time(fn, x)

  svd = ol.projectors.svd()
  steady_projector = svd._replace(refresh=lambda ctx, g, basis: basis)
  gap = 100

  def optimizer(projector):
    return ol.lowrank_project(optax.scale_by_adam(), rank=d // 4, update_proj_gap=gap,
                              projector=projector,
                              dimension_numbers=dims)

  def compiled(tx, map_matrices):
    spread_map, spread.map_matrices = spread.map_matrices, map_matrices
    try:
      with jax.set_mesh(mesh):
        state = jax.jit(tx.init)(grads)
        fn = jax.jit(tx.update).lower(grads, state, grads).compile()
    finally:
      spread.map_matrices = spread_map
    temp = fn.memory_analysis().temp_size_in_bytes
    return fn, state, temp

  variants = {"spread": compiled(optimizer(svd), spread.map_matrices),
              "replicated": compiled(optimizer(svd), replicated_map)}
  steady_temp = compiled(optimizer(steady_projector), spread.map_matrices)[2]

  def timed(fn, state, count):
    state = state._replace(count=jax.numpy.asarray(count, jnp.int32))
    start = time.perf_counter()
    jax.block_until_ready(fn(grads, state, grads))
    return time.perf_counter() - start

  times = {name: {"refresh": [], "steady": []} for name in variants}
  for name, (fn, state, _) in variants.items():  # warm-up
    timed(fn, state, 1)
  for _ in range(args.repeats):  # interleaved rounds
    for name, (fn, state, _) in variants.items():
      times[name]["refresh"].append(timed(fn, state, gap))
      times[name]["steady"].append(timed(fn, state, 1))
  matrix_bytes = 4 * d * ff
  return {
      "devices": jax.device_count(),
      "device_kind": jax.devices()[0].device_kind,
      **{f"{name}_{kind}_s": statistics.median(values)
         for name, kinds in times.items() for kind, values in kinds.items()},
      **{f"{name}_temp_bytes": variants[name][2] for name in variants},
      "steady_program_temp_bytes": steady_temp,
      "largest_matrix_bytes": matrix_bytes,
  }


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--devices", default="1,2,4,8", help="simulated CPU device counts")
  p.add_argument("--d-model", type=int, default=256)
  p.add_argument("--d-ff", type=int, default=688)
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--unstacked", action="store_true",
                 help="one 2-D leaf per layer and kernel (each factorized by one device)")
  p.add_argument("--out", default=None, help="default: benchmarks/results/"
                 "spread_refresh_cpu.json (_unstacked.json with --unstacked)")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    print(json.dumps(measure(args)))
    return
  rows = []
  for count in (int(c) for c in args.devices.split(",")):
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", XLA_FLAGS=(
        f"--xla_force_host_platform_device_count={count}"
        " --xla_cpu_enable_concurrency_optimized_scheduler=false"))
    argv = [sys.executable, __file__, "--child", "--d-model", str(args.d_model),
            "--d-ff", str(args.d_ff), "--layers", str(args.layers),
            "--repeats", str(args.repeats), *(["--unstacked"] if args.unstacked else [])]
    out = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True,
                         check=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    rows.append(row)
    print(f"{count} devices: refresh spread {row['spread_refresh_s']:.3f} s, replicated "
          f"{row['replicated_refresh_s']:.3f} s; steady {row['spread_steady_s']:.3f} s; "
          f"temp MiB spread {row['spread_temp_bytes'] / 2**20:.1f}, replicated "
          f"{row['replicated_temp_bytes'] / 2**20:.1f}, steady program "
          f"{row['steady_program_temp_bytes'] / 2**20:.1f}", flush=True)
  result = {"config": {k: v for k, v in vars(args).items() if k not in ("child", "out")},
            "machine": f"{platform.processor() or platform.machine()}, "
                       f"{os.cpu_count()} cores", "rows": rows}
  out = args.out or RESULTS.format("_unstacked" if args.unstacked else "")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
