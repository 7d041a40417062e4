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
  assert jax.typeof(s).sharding.spec == P(None, None)  # the stack's batch axis as it was
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


def _device_index():
  """Inside ``map_matrices``' ``shard_map``: this device's row-major index."""
  return jax.lax.axis_index("data") * 4 + jax.lax.axis_index("fsdp")


def test_each_device_factorizes_its_own_block_of_layers():
  """``fn`` stamps each matrix with the index of the device that ran it: the
  16 layers go to the 8 devices in blocks of 2, once each."""
  mesh = _mesh()
  _, sx = _stack(mesh, P(None, "fsdp", None))
  stamp = lambda a: jnp.zeros(a.shape[:-2], jnp.int32) + _device_index()
  with jax.set_mesh(mesh):
    who = jax.jit(lambda a: spread.map_matrices(stamp, a))(sx)
  np.testing.assert_array_equal(np.asarray(who), np.arange(LAYERS) // (LAYERS // 8))


def test_an_unstacked_matrix_is_factorized_by_its_owner_only():
  """A single matrix goes to device ``owner mod 8``; the result every device
  gets is that device's alone (the others add zeros). In GaLore's update of
  unstacked leaves the SVD sits in a per-device ``conditional`` on the
  partition id, and the update equals the unsharded one."""
  mesh = _mesh()
  x = jax.random.normal(jax.random.key(1), (ROWS, COLS))
  stamp = lambda a: jnp.ones((), jnp.int32) + _device_index()
  with jax.set_mesh(mesh):
    sx = jax.device_put(x, NamedSharding(mesh, P("fsdp", None)))
    owners = [jax.jit(lambda a, k=k: spread.map_matrices(stamp, a, owner=k))(sx)
              for k in (0, 5, 11)]
  assert [int(o) for o in owners] == [1, 6, 4]

  params = {f"w{i}": jax.random.normal(jax.random.key(i), (ROWS, COLS)) for i in range(3)}
  tx = ol.lowrank_project(optax.scale_by_adam(), rank=8)
  ref, _ = jax.jit(tx.update)(params, tx.init(params), params)
  with jax.set_mesh(mesh):
    sparams = {k: jax.device_put(v, NamedSharding(mesh, P("fsdp", None)))
               for k, v in params.items()}
    state = jax.jit(tx.init)(sparams)
    update = jax.jit(tx.update)
    text = update.lower(sparams, state, sparams).compile().as_text()
    out, _ = update(sparams, state, sparams)
  branches = {name for line in text.splitlines() if " conditional(" in line
              and "partition" not in line
              for name in re.findall(r"%([\w.]+_spmd)", line.split("branch_computations=")[-1])}
  computations = re.split(r"\n(?=\S)", text)
  with_svd = [c.split(" ", 1)[0].lstrip("%") for c in computations if "gesdd" in c]
  assert len(with_svd) == 3 and all(name in branches for name in with_svd), with_svd
  assert text.count("partition-id()") >= 3
  for k in params:
    a, b = np.asarray(out[k], np.float64), np.asarray(ref[k], np.float64)
    assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b)


def test_a_stack_no_mesh_axis_divides_is_factorized_on_every_device():
  """3 layers on a (2, 4) mesh, or any stack on a one-device mesh (its axes of size
  1): the fallback factorizes the replicated stack and still matches float64; so
  does one matrix given an owner, on either mesh."""
  mesh = _mesh()
  x = jax.random.normal(jax.random.key(2), (3, ROWS, COLS))
  sv = lambda a: jnp.linalg.svd(a, compute_uv=False)
  ref = np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)
  one = jax.make_mesh((1, 1), ("data", "fsdp"), devices=jax.devices()[:1])
  for m in (mesh, one):
    with jax.set_mesh(m):
      sx = jax.device_put(x, NamedSharding(m, P(None, "fsdp", None)))
      s = jax.jit(lambda a: spread.map_matrices(sv, a))(sx)
      # and one matrix with an owner
      s0 = jax.jit(lambda a: spread.map_matrices(sv, a, owner=3))(sx[0])
    np.testing.assert_allclose(np.asarray(s), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(s0), ref[0], rtol=1e-5, atol=1e-5)
