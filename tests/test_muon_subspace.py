"""Muon in the subspace: ``lowrank_project(optax.contrib.scale_by_muon(...))`` orthogonalizes
the projected momentum, ``U = scale · P · NS(M)``, against a float64 NumPy reference; the
shape scale a user means is the full matrix's, given outside (``scale=``), not the one
optax's ``muon`` computes from the projected shape; and ``newton_schulz`` is optax's."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.contrib import _muon

import optax_lowrank as ol
from tests.reference.gum import left_basis, newton_schulz as ref_ns

N_IN, M_OUT, RANK, BETA = 24, 16, 4, 0.95  # m < n: the std side is left (U[:, :r])


def _grads(steps):
  keys = jax.random.split(jax.random.key(3), steps)
  return [np.asarray(jax.random.normal(k, (N_IN, M_OUT))) for k in keys]


def _reference(grads, *, nesterov, orthogonalize=True):
  """optax's Muon momentum on ``R = PᵀG`` (P from the first gradient), then ``P·NS``."""
  p = left_basis(grads[0].T, RANK)
  mu, out = np.zeros((RANK, N_IN)), []
  for t, g in enumerate(grads, start=1):
    r = p.T @ g.T
    mu = BETA * mu + (1 - BETA) * r
    if nesterov:
      hat = BETA * mu / (1 - BETA ** (t + 1)) + (1 - BETA) * r / (1 - BETA ** t)
    else:
      hat = mu / (1 - BETA ** t)
    out.append((p @ (ref_ns(hat) if orthogonalize else hat)).T)
  return out


@pytest.mark.parametrize("nesterov", [False, True])
def test_lowrank_scale_by_muon_is_p_times_ns_of_the_projected_momentum(nesterov):
  scale = math.sqrt(max(1.0, M_OUT / N_IN)) * 3.0  # any full-shape factor, via scale=
  tx = ol.lowrank_project(
      optax.contrib.scale_by_muon(beta=BETA, nesterov=nesterov), rank=RANK, scale=scale,
      update_proj_gap=100)
  grads = _grads(3)
  state, update = tx.init(jnp.zeros((N_IN, M_OUT))), jax.jit(tx.update)
  want = _reference(grads, nesterov=nesterov)
  plain = _reference(grads, nesterov=nesterov, orthogonalize=False)
  for g, w, pl in zip(grads, want, plain):
    u, state = update(jnp.asarray(g), state)
    u = np.asarray(u)
    assert np.linalg.norm(u - scale * w) < 2e-4 * np.linalg.norm(scale * w)
    # Negative control: the same momentum without Newton–Schulz.
    assert np.linalg.norm(u - scale * pl) > 0.5 * np.linalg.norm(scale * w)


def test_a_tree_with_stacked_layers_needs_matrix_dimension_numbers():
  """On a parameter tree (a matrix, a stack of two, a bias) ``scale_by_muon`` needs
  dimension numbers (optax's default takes one bare matrix); with
  ``matrix_dimension_numbers`` every matrix, stacked ones layer by layer, gets
  ``P·NS(M)`` of its own gradients (float64 reference), the bias Adam."""
  dims = {"w": None, "s": ol.DimensionNumbers(1, 2), "b": None}
  tx = ol.lowrank_project(
      optax.contrib.scale_by_muon(
          beta=BETA, weight_dimension_numbers=ol.newton_schulz.matrix_dimension_numbers),
      rank=RANK, update_proj_gap=100, dimension_numbers=dims,
      unprojected=optax.scale_by_adam())
  keys = jax.random.split(jax.random.key(5), 3)
  grads = [{"w": jax.random.normal(k, (N_IN, M_OUT)),
            "s": jax.random.normal(jax.random.fold_in(k, 1), (2, N_IN, M_OUT)),
            "b": jnp.ones(M_OUT)} for k in keys]
  state, update = tx.init(jax.tree.map(jnp.zeros_like, grads[0])), jax.jit(tx.update)
  got = []
  for g in grads:
    u, state = update(g, state)
    got.append(u)
  matrices = {"w": [np.asarray(g["w"]) for g in grads]}
  matrices.update({f"s{i}": [np.asarray(g["s"][i]) for g in grads] for i in range(2)})
  for name, gs in matrices.items():
    for t, want in enumerate(_reference(gs, nesterov=True)):
      u = np.asarray(got[t]["w"] if name == "w" else got[t]["s"][int(name[1])])
      assert np.linalg.norm(u - want) < 2e-4 * np.linalg.norm(want), (name, t)
  bad = optax.contrib.scale_by_muon()
  with pytest.raises(ValueError):
    bad.update({"w": grads[0]["w"]}, bad.init({"w": grads[0]["w"]}))


def test_optax_muon_inside_the_wrapper_scales_by_the_projected_shape():
  """``optax.contrib.muon`` (its ``scale_by_shape`` included) inside ``lowrank_project``
  multiplies by ``√max(1, fan_out/fan_in)`` of the projected ``(n, r)`` leaf, not of the
  ``(n, m)`` parameter: for a tall projection (here ``r × m`` kept, ``m = 48 > n = 16``)
  that is ``√(m/r)`` instead of ``√(m/n)``. The documented rule: ``scale_by_muon`` inside,
  the full matrix's factor outside (``scale=``), as the test above does."""
  n, m, r = 16, 48, 4
  g = jax.random.normal(jax.random.key(0), (n, m))
  inside = ol.lowrank_project(optax.contrib.muon(1.0, beta=BETA), rank=r)
  bare = ol.lowrank_project(optax.contrib.scale_by_muon(beta=BETA), rank=r)
  first = lambda tx: tx.update(g, tx.init(g), g)[0]
  u_inside, u_bare = jax.jit(lambda: (first(inside), first(bare)))()
  ratio = float(jnp.linalg.norm(u_inside) / jnp.linalg.norm(u_bare))
  np.testing.assert_allclose(ratio, math.sqrt(m / r), rtol=1e-5)  # -lr·√(m/r)·...
  assert abs(ratio - math.sqrt(m / n)) > 1.0  # not the full matrix's √(m/n)


@pytest.mark.parametrize("shape", [(3, 24, 10), (2, 8, 20)])
def test_newton_schulz_is_optaxs_and_the_float64_reference(shape):
  x = jax.random.normal(jax.random.key(1), shape)
  got, optax_ns = jax.jit(lambda x: (
      ol.newton_schulz.newton_schulz(x),
      _muon.orthogonalize_via_newton_schulz(
          x, jnp.asarray(ol.newton_schulz.MUON_COEFFS), 5,
          dimension_numbers=_muon.MuonDimensionNumbers(1, 2))))(x)
  got = np.asarray(got)
  np.testing.assert_allclose(got, np.asarray(optax_ns), atol=5e-6)
  for a, b in zip(got, np.asarray(x, np.float64)):
    ref = ref_ns(b)
    assert np.linalg.norm(a - ref) < 1e-5 * np.linalg.norm(ref)
    assert np.linalg.norm(a - b / np.linalg.norm(b)) > 0.1  # it does orthogonalize
