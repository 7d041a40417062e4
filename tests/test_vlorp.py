"""VLoRP's granularity (any projector) and ProjFactor's state, against NumPy float64.

The update formulas of ``vlorp`` are checked step by step against the authors' code in
``test_vlorp_reference.py``; this file checks the regrouping itself, the subspace found
by other projectors on the regrouped matrix, the exact state bytes, and the errors.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_lowrank as ol
from optax_lowrank import projectors, shapes
from tests.reference import vlorp as ref


def _kernel(rng, R, C, batch=()):
  """A Flax-layout kernel (..., in, out) = (..., C, R): the torch weight transposed."""
  return rng.standard_normal(batch + (C, R)).astype(np.float32)


@pytest.mark.parametrize("R, C", [(48, 16), (16, 48), (32, 32)])
@pytest.mark.parametrize("c", [1, 4, 0.5, 16])
def test_regroup_is_the_references_row_major_reshape(R, C, c):
  rng = np.random.default_rng(0)
  x = _kernel(rng, R, C, batch=(2,))
  m2, n2, side = shapes.granular_shape(R, C, c)
  assert (m2, n2) == ref.granular_shape(R, C, c) and side == ref.side(R, C)
  got = np.asarray(shapes.regroup(jnp.asarray(x), m2, n2))
  for layer in range(2):
    want = x[layer].T.reshape(m2, n2)  # torch weight, row-major reshape
    np.testing.assert_array_equal(got[layer], want.T)
  back = shapes.ungroup(jnp.asarray(got), R, C, None)
  np.testing.assert_array_equal(np.asarray(back), x)


@pytest.mark.parametrize("R, C, c", [(48, 16, 4), (16, 48, 4), (32, 32, 0.5)])
def test_random_granular_projection_matches_float64(R, C, c):
  """One step of lowrank_project(identity) is up(down(G)) of the regrouped matrix."""
  rng = np.random.default_rng(1)
  x = _kernel(rng, R, C)
  r = 2
  tx = ol.lowrank_project(optax.identity(), rank=r, granularity=c,
                          projector=projectors.random(std="rank"))
  state = tx.init({"w": jnp.asarray(x)})
  u, state = jax.jit(tx.update)({"w": jnp.asarray(x)}, state)
  basis = state.bases["w"].basis
  m = np.asarray(basis.basis.matrix(), np.float64) * math.sqrt(r)  # the code's N(0, 1)
  assert m.shape == ref.proj_shape(R, C, r, c)
  G = x.T.astype(np.float64)
  want = ref.project_back(ref.project(G, m, c), m, c, r, 1.0, (R, C))
  got = np.asarray(u["w"], np.float64).T
  assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("R, C, c", [(48, 16, 4), (16, 48, 2), (32, 32, 0.5)])
def test_svd_projector_on_the_regrouped_matrix(R, C, c):
  """Granularity is a matricize option: the SVD basis spans the regrouped matrix's top
  singular subspace on the side VLoRP projects (right when R >= C)."""
  rng = np.random.default_rng(2)
  x = _kernel(rng, R, C)
  r = 3
  tx = ol.lowrank_project(optax.identity(), rank=r, granularity=c,
                          projector=projectors.svd("std"))
  state = tx.init({"w": jnp.asarray(x)})
  u, state = tx.update({"w": jnp.asarray(x)}, state)
  Gt = x.T.astype(np.float64).reshape(ref.granular_shape(R, C, c))
  U, _, Vh = np.linalg.svd(Gt, full_matrices=False)
  if ref.side(R, C) == "right":
    want = Gt @ Vh[:r].T @ Vh[:r]
  else:
    want = U[:, :r] @ U[:, :r].T @ Gt
  got = np.asarray(u["w"], np.float64).T.reshape(Gt.shape)
  assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_state_bytes_are_the_budget_plus_row_and_column_factors():
  """Per projected matrix: max(R, C)·c·r first-moment floats, R + C factored
  second-moment floats, no stored projection (an 8-byte key) and a 4-byte step count;
  unprojected leaves keep AdamW's two moments and a step count."""
  params = {"w": jnp.zeros((64, 256)), "v": jnp.zeros((256, 64)),
            "layers": jnp.zeros((3, 128, 64)), "b": jnp.zeros(64),
            "emb": jnp.zeros((100, 64))}
  dims = {"w": None, "v": None, "layers": ol.DimensionNumbers(1, 2), "b": None,
          "emb": None}
  mask = {"w": True, "v": True, "layers": True, "b": False, "emb": False}
  for c, r in [(16, 1), (4, 4), (1, 16), (0.5, 8)]:
    tx = ol.vlorp(1e-3, rank=r, granularity=c, projection_mask=mask,
                  dimension_numbers=dims)
    mem = ol.memory.state_bytes(tx, params)
    by_path = {leaf.path: leaf.state_bytes for leaf in mem.leaves}
    for path, (L, R, C) in {"['w']": (1, 256, 64), "['v']": (1, 64, 256),
                            "['layers']": (3, 64, 128)}.items():
      want = 4 * L * (max(R, C) * c * r + R + C) + 8 + 4
      assert by_path[path] == want, (path, c, r, by_path[path], want)
    assert by_path["['b']"] == 2 * 4 * 64 + 4
    assert by_path["['emb']"] == 2 * 4 * 100 * 64 + 4
    # The budget c·r fixes the projected state whatever the split.
    if c >= 1:
      assert by_path["['w']"] == 4 * (256 * 16 + 256 + 64) + 12


def test_std_side_stays_the_original_smaller_side_for_coarse_units():
  """c < 1 makes the compressed side the longer one of the regrouped matrix; the code
  still projects the original smaller side (multiplier_pos from the weight's shape)."""
  tx = ol.vlorp(1e-3, rank=1, granularity=0.25)
  state = tx.init({"w": jnp.zeros((32, 32))})  # R = C: right, (R/4, 4C) = (8, 128)
  key_basis = state[0].bases["w"].basis.basis
  assert key_basis.side == "right" and key_basis.shape == (1, 128)


@pytest.mark.parametrize("granularity", [3, 0, -2, 1.5, True, "4"])
def test_granularity_must_be_a_power_of_two(granularity):
  with pytest.raises(ValueError, match="`granularity` must be a power of two"):
    ol.vlorp(1e-3, granularity=granularity)


def test_granularity_that_does_not_fit_names_the_leaf():
  params = {"attn": {"q": jnp.zeros((64, 48))}, "mlp": {"up": jnp.zeros((64, 96))}}
  tx = ol.vlorp(1e-3, rank=1, granularity=32)  # 48 is not divisible by 32
  with pytest.raises(ValueError, match=r"\['attn'\]\['q'\].*`granularity` 32"):
    tx.init(params)
  tx = ol.vlorp(1e-3, rank=4, granularity=32)  # mlp up: (96·32, 64/32): side 2 < rank 4
  with pytest.raises(ValueError, match=r"\['mlp'\]\['up'\].*rank 4 exceeds"):
    tx.init({"mlp": {"up": jnp.zeros((64, 96))}})


@pytest.mark.parametrize("kwargs, match", [
    (dict(b2=1.0), "b2"), (dict(eps=-1.0), "eps"), (dict(weight_decay=-0.1), "weight_decay"),
    (dict(distribution="uniform"), "distribution"), (dict(projector="svd"), "projector"),
    (dict(rank=0), "rank"), (dict(update_proj_gap=0), "update_proj_gap"),
])
def test_bad_hyperparameters_name_the_parameter(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ol.vlorp(1e-3, **kwargs)


def test_jit_stacked_leaf_keeps_one_matrix_per_layer():
  rng = np.random.default_rng(3)
  params = {"layers": jnp.asarray(_kernel(rng, 48, 16, batch=(3,)))}
  dims = {"layers": ol.DimensionNumbers(1, 2)}
  tx = ol.vlorp(1e-2, rank=2, granularity=4, dimension_numbers=dims)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for seed in range(3):
    g = {"layers": jnp.asarray(_kernel(np.random.default_rng(seed), 48, 16, (3,)))}
    u, state = update(g, state, params)
  assert u["layers"].shape == (3, 16, 48) and np.all(np.isfinite(u["layers"]))
  matrices = np.asarray(state[0].bases["layers"].basis.basis.matrix())
  assert matrices.shape == (3, 2, 4)
  assert not np.allclose(matrices[0], matrices[1])  # each layer draws its own
