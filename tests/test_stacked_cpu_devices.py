"""Regression: stacked layers on 8 simulated CPU devices must not deadlock.

jaxlib's batched CPU SVD fans a stack out over the shared thread pool and
blocks on it; with several simulated devices doing so at once the process
hung (GaLore with scanned layers in the trainer). The SVD projector now
factorizes stacks one matrix at a time on CPU. Run in a subprocess so that a
regression fails on its timeout instead of hanging the suite.
"""

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, optax, optax_lowrank as ol
    from jax.sharding import NamedSharding, PartitionSpec as P
    shapes = {"gate": (4, 128, 352), "up": (4, 128, 352), "down": (4, 352, 128)}
    dims = {k: ol.DimensionNumbers(1, 2) for k in shapes}
    tx = ol.galore(1e-2, rank=32, update_proj_gap=2, dimension_numbers=dims)
    g = {k: jax.random.normal(jax.random.key(i), s) for i, (k, s) in enumerate(shapes.items())}
    ref, _ = jax.jit(tx.update)(g, tx.init(g), g)
    mesh = jax.make_mesh((8,), ("data",))
    with jax.set_mesh(mesh):
      sg = {k: jax.device_put(x, NamedSharding(mesh, P())) for k, x in g.items()}
      u, _ = jax.jit(tx.update)(sg, jax.jit(tx.init)(sg), sg)
      for k in shapes:
        a, b = np.asarray(u[k]), np.asarray(ref[k])
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b), k
    print("ok")
""")


def test_stacked_leaves_on_8_simulated_devices_finish():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
      "--xla_force_host_platform_device_count=8"
      " --xla_cpu_enable_concurrency_optimized_scheduler=false"
  )
  root = pathlib.Path(__file__).resolve().parents[1]
  try:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=root, env=env, timeout=240,
        capture_output=True, text=True,
    )
  except subprocess.TimeoutExpired:
    pytest.fail("the update on 8 simulated devices hung (deadlock regression)")
  assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
