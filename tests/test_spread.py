"""Refresh factorizations spread over the devices (``optax_lowrank.spread``).

On 8 simulated devices, a stacked leaf's refresh must factorize only its
share of the layers on each device: read off the compiled HLO (the loop that
calls LAPACK carries ``layers / 8`` matrices, and no collective moves the
whole stack), and the results must match a float64 NumPy SVD.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import optax_lowrank as ol
from optax_lowrank import spread
from tests import hlo

LAYERS, ROWS, COLS = 16, 48, 24


@pytest.mark.parametrize("batch, mesh_shape, expected", [
    ((16,), {"data": 2, "fsdp": 4}, (0, ("data", "fsdp"))),
    ((6,), {"data": 2, "fsdp": 4}, (0, ("data",))),       # 4 does not divide 6
    ((3,), {"data": 2, "fsdp": 4}, (None, ())),           # nothing divides 3
    ((3, 8), {"data": 2, "fsdp": 4}, (1, ("data", "fsdp"))),  # the axis most devices divide
    ((8,), {"data": 1, "fsdp": 8}, (0, ("fsdp",))),       # size-1 axes are not named
])
def test_spread_axes(batch, mesh_shape, expected):
  assert spread.spread_axes(batch, mesh_shape) == expected


def _stack(mesh, spec):
  x = jax.random.normal(jax.random.key(0), (LAYERS, ROWS, COLS), jnp.float32)
  return x, jax.device_put(x, NamedSharding(mesh, spec))


def _mesh():
  if jax.device_count() < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
  return jax.make_mesh((2, 4), ("data", "fsdp"))


@pytest.mark.parametrize("spec", [P(None, "fsdp", None), P()], ids=["fsdp", "replicated"])
def test_svd_of_each_share_matches_float64(spec):
  mesh = _mesh()
  x, sx = _stack(mesh, spec)
  svd = lambda a: tuple(jnp.linalg.svd(a, full_matrices=False))
  with jax.set_mesh(mesh):
    u, s, vh = jax.jit(lambda a: spread.map_matrices(svd, a))(sx)
  assert jax.typeof(s).sharding.spec == P(("data", "fsdp"), None)
  ref_u, ref_s, ref_vh = np.linalg.svd(np.asarray(x, np.float64), full_matrices=False)
  np.testing.assert_allclose(np.asarray(s), ref_s, rtol=1e-5, atol=1e-5)
  # Singular vectors up to sign: the reconstruction and |u| agree.
  np.testing.assert_allclose(np.asarray(u) * np.asarray(s)[:, None] @ np.asarray(vh),
                             np.asarray(x, np.float64), atol=1e-4)
  np.testing.assert_allclose(np.abs(np.asarray(u)), np.abs(ref_u), atol=1e-3)


def _loop_stacks(text: str, matrix: tuple[int, int]) -> set[int]:
  """Leading sizes of the ``(k, p, q)`` stacks of ``matrix``-shaped arrays that
  compiled ``while`` loops carry (the loops that call LAPACK per matrix)."""
  found = set()
  for line in text.splitlines():
    if " while(" not in line:
      continue
    for dims in re.findall(r"f32\[([0-9,]+)\]", line.split(" while(")[0]):
      d = tuple(int(v) for v in dims.split(","))
      if len(d) == 3 and tuple(sorted(d[1:])) == tuple(sorted(matrix)):
        found.add(d[0])
  return found


@pytest.mark.parametrize("projector", ["svd", "randomized_svd"])
def test_refresh_factorizes_one_eighth_of_the_layers_per_device(projector):
  """GaLore's update on a stacked, FSDP-sharded leaf: the compiled per-device
  program loops over ``16 / 8 = 2`` matrices (the exact SVD's, or the
  randomized finder's ``k × k`` Cholesky and ``eigh`` problems), never 16, and
  gathers no whole stack; its update equals the unsharded one."""
  mesh = _mesh()
  x, sx = _stack(mesh, P(None, "fsdp", None))
  params, sparams = {"w": x}, {"w": sx}
  chosen = (None if projector == "svd" else ol.projectors.randomized_svd(power_iters=0, oversample=4))
  kwargs = {} if chosen is None else {"projector": chosen}
  tx = ol.lowrank_project(optax.scale_by_adam(), rank=8, update_proj_gap=10,
                          dimension_numbers=ol.DimensionNumbers(1, 2), **kwargs)
  ref, _ = jax.jit(tx.update)(params, tx.init(params), params)
  with jax.set_mesh(mesh):
    state = jax.jit(tx.init)(sparams)
    update = jax.jit(tx.update)
    text = update.lower(sparams, state, sparams).compile().as_text()
    out, _ = update(sparams, state, sparams)
  matrix = (ROWS, COLS) if projector == "svd" else (12, 12)  # rank 8 + oversample 4
  assert _loop_stacks(text, matrix) == {LAYERS // 8}
  whole = hlo.whole_matrices(hlo.collectives(text), {"w": (LAYERS, ROWS, COLS)})
  assert not [s for _, s in whole if np.prod(s) >= LAYERS * ROWS * COLS], whole
  a, b = np.asarray(out["w"], np.float64), np.asarray(ref["w"], np.float64)
  assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b)
