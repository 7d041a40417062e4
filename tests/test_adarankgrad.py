"""AdaRankGrad (``adarankgrad``) against the float64 reference of its loop.

The problem is ``f(W) = ½‖W − W*‖²`` for two stacked ``16 × 12`` matrices, each ``W*`` of
rank 4 with a known spectrum, from ``W = 0``: the gradient ``W − W*`` lies in a rank-4
subspace, Adam inside the chosen subspace drives the projected gradient down, and each
matrix switches subspace when ``‖QᵀG‖ ≤ ς``, at its own steps, well before the step cap.
The whole run is one compiled ``lax.scan`` (the decision never leaves the device), and is
compared with ``tests/reference/adarankgrad.py`` (exact SVD, its own rank rule, Adam, both
moments carried), matrix by matrix. Negative controls: the reference with GaLore's fixed
gap, or carrying the first moment only, ends elsewhere.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_lowrank as ol
from optax_lowrank import projectors, schedules
from tests.reference.adarankgrad import AdaRankGrad

A, B = 16, 12  # each matrix of the stack; the smaller side (12) is projected
RANK, THRESHOLD, SWITCH, CAP, LR, STEPS = 4, 0.9, 1.2, 25, 0.1, 16
# (seed, spectrum of W*) per matrix of the stack.
TARGETS = ((5, (2.5, 1.5, 1.0, 0.3)), (0, (3.0, 1.5, 1.2, 0.5)))
DIMS = {"w": ol.DimensionNumbers(reduction_axes=1, output_axes=2)}


def _target(seed, spectrum):
  rng = np.random.default_rng(seed)
  u, _ = np.linalg.qr(rng.normal(size=(A, len(spectrum))))
  v, _ = np.linalg.qr(rng.normal(size=(B, len(spectrum))))
  return (u * np.asarray(spectrum)) @ v.T


W_STAR = np.stack([_target(*t) for t in TARGETS])


def _reference(**ablation):
  """Each matrix's float64 run: (final W, reference objects)."""
  out, refs = [], []
  for w_star in W_STAR:
    ref = AdaRankGrad(RANK, threshold=THRESHOLD, switch_threshold=SWITCH,
                      max_gap=CAP, lr=LR, scale=1.0, **ablation)
    w = np.zeros((A, B))
    for _ in range(STEPS):
      w = w + ref.step(w - w_star)
    out.append(w)
    refs.append(ref)
  return np.stack(out), refs


def _library(on_refresh="rotate_moments"):
  """The alias on the same problem, all steps in one jit: (W, switched_at, rank, state)."""
  tx = ol.adarankgrad(LR, rank=RANK, threshold=THRESHOLD, switch_threshold=SWITCH,
                      update_proj_gap=CAP, scale=1.0, dimension_numbers=DIMS,
                      on_refresh=on_refresh)
  w_star = jnp.asarray(W_STAR, jnp.float32)

  def body(carry, _):
    params, state = carry
    updates, state = tx.update({"w": params["w"] - w_star}, state, params)
    params = optax.apply_updates(params, updates)
    basis = state[0].bases["w"].basis
    return (params, state), (basis.switched_at, basis.basis.rank)

  @jax.jit
  def run():
    params = {"w": jnp.zeros((2, A, B), jnp.float32)}
    (params, state), trace = jax.lax.scan(body, (params, tx.init(params)), None,
                                          length=STEPS)
    return params["w"], trace, state

  w, (switched_at, rank), state = run()
  return np.asarray(w, np.float64), np.asarray(switched_at), np.asarray(rank), state


@pytest.fixture(scope="module")
def library():
  return _library()


def test_the_problem_switches_on_the_criterion_with_margins():
  """The reference's decisions are far from their thresholds (float32 cannot flip them),
  each matrix switches before the cap at its own steps, and one rank drops."""
  _, refs = _reference()
  for ref in refs:
    norms = np.asarray(ref.norms[1:])
    assert np.min(np.abs(norms - SWITCH)) > 0.02 * SWITCH
    assert min(np.min(np.abs(c - THRESHOLD)) for c in ref.captured) > 0.01
    assert min(ref.gaps) > 0.1  # the kept singular vectors are well separated
    assert ref.switches[0] == 0 and 0 < ref.switches[1] < CAP
  assert refs[0].switches != refs[1].switches
  assert refs[0].ranks[-1] < refs[0].ranks[0]


def test_switch_steps_ranks_and_weights_equal_the_float64_reference(library):
  w, switched_at, rank, _ = library
  expected, refs = _reference()
  for i, ref in enumerate(refs):
    steps = [t for t in range(STEPS) if switched_at[t, i] == t]
    assert steps == ref.switches, (i, steps, ref.switches)
    assert [int(rank[t, i]) for t in steps] == ref.ranks
  # float32 against float64: Adam's normalization amplifies rounding in the weak
  # coordinates after back-to-back switches (steps 5-6, 12-13) to ~6e-4 of weights ~3.
  np.testing.assert_allclose(w, expected, rtol=0, atol=1e-3)


def test_both_moments_are_carried_into_the_new_subspace(library):
  """The final Adam moments equal the reference's (zero-padded to the maximum rank;
  the first up to each basis vector's sign)."""
  _, _, _, state = library
  adam = state[0].inner_state
  _, refs = _reference()
  for i, ref in enumerate(refs):
    mu, nu = np.asarray(adam.mu["w"][i]), np.asarray(adam.nu["w"][i])
    if mu.shape != (A, RANK):
      mu, nu = mu.T, nu.T
    k = ref.k
    np.testing.assert_allclose(np.abs(mu[:, :k]), np.abs(ref.m), atol=2e-4)
    np.testing.assert_allclose(nu[:, :k], ref.v, rtol=1e-3, atol=1e-7)
    np.testing.assert_array_equal(mu[:, k:], 0.0)


def test_fixed_gap_or_first_moment_only_end_elsewhere(library):
  """Negative controls: without the criterion, or carrying only the first moment, the
  reference ends far from where the library (and the full reference) does."""
  w = library[0]
  fixed, refs = _reference(fixed_gap=True)
  assert all(ref.switches == [0] for ref in refs)
  assert np.max(np.abs(fixed - w)) > 100 * 1e-3
  first_only, _ = _reference(rotate="first")
  assert np.max(np.abs(first_only - w)) > 100 * 1e-3


def test_a_matrix_not_due_keeps_its_basis_and_moments_bit_for_bit():
  """At a step where only one matrix of the stack switches, the other's basis and Adam
  moments are exactly those its own step would give without any switch."""
  tx = ol.lowrank_project(
      optax.scale_by_adam(), RANK, dimension_numbers=DIMS,
      on_refresh="rotate_moments",
      projector=schedules.on_convergence(projectors.svd(), 0.5, 100))
  rng = np.random.default_rng(0)
  g0 = jnp.asarray(rng.normal(size=(2, A, B)), jnp.float32)
  state = tx.init({"w": g0})
  update = jax.jit(tx.update)
  _, state = update({"w": g0}, state)  # both switch at step 0
  # Matrix 0's new gradient is orthogonal to its subspace (norm 0 <= 0.5): it switches;
  # matrix 1's lies in its own subspace: it keeps it.
  basis = state.bases["w"].basis
  g1 = np.asarray(rng.normal(size=(2, A, B)), np.float32)
  down = np.asarray(projectors.svd().down(basis.basis, jnp.asarray(g1)))
  up = np.asarray(projectors.svd().up(basis.basis, jnp.asarray(down)))
  g1[0] -= up[0]
  g1[1] = up[1]
  new_updates, new_state = update({"w": jnp.asarray(g1)}, state)
  new_basis = new_state.bases["w"].basis
  np.testing.assert_array_equal(np.asarray(new_basis.switched_at), [1, 0])
  for old, new in zip(jax.tree.leaves(basis.basis), jax.tree.leaves(new_basis.basis)):
    np.testing.assert_array_equal(np.asarray(new)[1], np.asarray(old)[1])
    assert np.max(np.abs(np.asarray(new)[0] - np.asarray(old)[0])) > 0.1
  # Matrix 1 as if nothing had switched: the same transform with an unreachable threshold.
  still = ol.lowrank_project(
      optax.scale_by_adam(), RANK, dimension_numbers=DIMS,
      on_refresh="rotate_moments",
      projector=schedules.on_convergence(projectors.svd(), 0.0, 100))
  kept_updates, kept_state = jax.jit(still.update)({"w": jnp.asarray(g1)}, state)
  for a, b in zip(jax.tree.leaves(new_state.inner_state),
                  jax.tree.leaves(kept_state.inner_state)):
    if np.ndim(a) == 3:
      np.testing.assert_array_equal(np.asarray(a)[1], np.asarray(b)[1])
  np.testing.assert_array_equal(np.asarray(new_updates["w"])[1],
                                np.asarray(kept_updates["w"])[1])


def test_zero_threshold_is_galores_fixed_schedule():
  """``switch_threshold=0`` switches every ``update_proj_gap`` steps, as ``galore``'s
  schedule does, and gives galore's updates at full rank capture (threshold 1)."""
  rng = np.random.default_rng(1)
  grads = [jnp.asarray(rng.normal(size=(A, B)), jnp.float32) for _ in range(5)]
  ours = ol.lowrank_project(
      optax.scale_by_adam(), RANK, update_proj_gap=2,
      projector=schedules.on_convergence(projectors.svd(), 0.0, 2))
  galore = ol.lowrank_project(optax.scale_by_adam(), RANK, update_proj_gap=2)
  s1, s2 = ours.init({"w": grads[0]}), galore.init({"w": grads[0]})
  update1, update2 = jax.jit(ours.update), jax.jit(galore.update)
  for t, g in enumerate(grads):
    u1, s1 = update1({"w": g}, s1)
    u2, s2 = update2({"w": g}, s2)
    assert int(s1.bases["w"].basis.switched_at) == t - t % 2
    np.testing.assert_allclose(u1["w"], u2["w"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(switch_threshold=-1.0), "switch_threshold"),
    (dict(update_proj_gap=0), "update_proj_gap"),
])
def test_bad_values_name_the_argument(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ol.adarankgrad(1e-3, rank=4, **kwargs)


def test_on_convergence_refuses_bad_arguments_and_per_leaf_bases():
  with pytest.raises(ValueError, match="max_gap"):
    schedules.on_convergence(projectors.svd(), 0.1, 0)
  with pytest.raises(ValueError, match="switch_threshold"):
    schedules.on_convergence(projectors.svd(), -0.1, 10)
  with pytest.raises(ValueError, match="on_convergence"):
    schedules.adaptive_rank(schedules.on_convergence(projectors.svd(), 0.1, 10))
  tx = ol.lowrank_project(
      optax.scale_by_adam(), 2, dimension_numbers=DIMS,
      projector=schedules.on_convergence(projectors.random(), 0.1, 10))
  with pytest.raises(ValueError, match="one entry per matrix"):
    tx.init({"w": jnp.zeros((3, A, B))})
