"""Q-GaLore's lazy refresh and AdaRankGrad-style adaptive rank, step by step.

Synthetic gradients with a known spectrum whose leading subspace is held fixed or
rotated; the expected gaps and ranks come from a plain-Python transcription of the
rules (Q-GaLore's ``q_galore_projector.py`` queue; the energy rule documented in
``schedules.adaptive_rank``), not from the library.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_lowrank as ol
from optax_lowrank import projectors, schedules

R, C = 40, 24  # torch (out, in): R >= C, GaLore projects the right side


def _orthogonal(rng, n):
  q, _ = np.linalg.qr(rng.standard_normal((n, n)))
  return q


def _gradient(rng, spectrum, v=None):
  """Flax-layout (C, R) gradient of torch G = U diag(s) Vᵀ; a fresh V unless given."""
  u = _orthogonal(rng, R)[:, :len(spectrum)]
  v = _orthogonal(rng, C)[:, :len(spectrum)] if v is None else v
  return ((u * spectrum) @ v.T).T, v


def _expected_lazy_gaps(similarities, gap, queue_size=5, threshold=0.4, gamma=2):
  """Q-GaLore's rule on a list of similarities (one per refresh after the first)."""
  queue, gaps = [], []
  for cos in similarities:
    if len(queue) == queue_size:
      queue.pop(0)
    queue.append(cos)
    if len(queue) == queue_size and sum(queue) / queue_size >= threshold:
      gap = int(gap * gamma)
    gaps.append(gap)
  return gaps


@pytest.mark.parametrize("fixed", [True, False])
def test_lazy_refresh_doubles_the_gap_of_a_stable_subspace(fixed):
  rng = np.random.default_rng(0)
  spectrum = np.array([10.0, 3.0, 1.0, 0.5])
  gap = 2
  tx = ol.lowrank_project(optax.identity(), rank=2, update_proj_gap=gap,
                          projector=schedules.lazy(projectors.svd(), gap))
  params = {"w": jnp.zeros((C, R))}
  state = tx.init(params)
  update = jax.jit(tx.update)
  fixed_g, _ = _gradient(rng, spectrum)
  refreshes, similarities, previous = [], [], None
  for step in range(40):
    g = fixed_g if fixed else _gradient(rng, spectrum)[0]
    g = g + 1e-3 * rng.standard_normal(g.shape)  # each SVD differs a little
    _, state = update({"w": jnp.asarray(g, jnp.float32)}, state)
    lazy = state.bases["w"].basis
    first = np.asarray(lazy.basis.vh[0], np.float64)
    if previous is None or not np.allclose(first, previous, atol=1e-6):
      refreshes.append(step)
      if previous is not None:
        similarities.append(float(first @ previous))
      previous = first
    if fixed and step in refreshes[1:]:
      assert abs(similarities[-1]) > 0.99
  # The refresh steps follow Q-GaLore's queue: a refresh at multiples of the gap in
  # force, the gap growing after each refresh whose last 5 similarities average >= 0.4.
  gaps = _expected_lazy_gaps(similarities, gap)
  got_gap = int(state.bases["w"].basis.gap)
  if fixed:
    expected, current, t = [0], gap, 0
    for new_gap in gaps:
      t = next(s for s in range(t + 1, 40) if s % current == 0)
      expected.append(t)
      current = new_gap
    assert refreshes == expected[:len(refreshes)]
    assert got_gap == gaps[-1] and got_gap > gap
  else:  # a rotating subspace: similarities near 0, the gap stays
    assert got_gap == gap and refreshes == list(range(0, 40, gap))


def test_lazy_refresh_follows_each_leafs_staggered_schedule():
  """With ``stagger``, leaf "b" is asked at steps 0, 2, 6, 10, ... instead of 0, 4, 8:
  its lazy gap counts those calls, so it refreshes on the same calls as leaf "a"."""
  rng = np.random.default_rng(1)
  gap, steps = 4, 80
  tx = ol.lowrank_project(optax.identity(), rank=2, update_proj_gap=gap, stagger=True,
                          projector=schedules.lazy(projectors.svd(), gap))
  fixed_g, _ = _gradient(rng, np.array([10.0, 3.0, 1.0, 0.5]))
  state = tx.init({"a": jnp.zeros((C, R)), "b": jnp.zeros((C, R))})
  update = jax.jit(tx.update)
  refreshed = {"a": [], "b": []}
  previous = {}
  for step in range(steps):
    g = {k: jnp.asarray(fixed_g + 1e-3 * rng.standard_normal(fixed_g.shape), jnp.float32)
         for k in refreshed}
    _, state = update(g, state)
    for k, offset in (("a", 0), ("b", gap // 2)):
      first = np.asarray(state.bases[k].basis.basis.vh[0])
      if k not in previous or not np.array_equal(first, previous[k]):
        refreshed[k].append((step + (gap - offset) % gap) // gap)  # the call's index
      previous[k] = first
  assert refreshed["a"] == refreshed["b"], refreshed
  assert len(refreshed["a"]) >= 4 and refreshed["a"][-1] > len(refreshed["a"])  # grew
  assert int(state.bases["b"].basis.gap) == int(state.bases["a"].basis.gap) > gap


def test_adaptive_rank_keeps_the_energy_and_never_grows():
  rng = np.random.default_rng(1)
  r, threshold = 6, 0.85
  tx = ol.lowrank_project(optax.identity(), rank=r, update_proj_gap=1,
                          projector=schedules.adaptive_rank(projectors.svd(), threshold))
  state = tx.init({"w": jnp.zeros((C, R))})
  update = jax.jit(tx.update)
  expected_rank = r
  for spectrum in ([5.0, 4.0, 2.0, 1.0, 0.5, 0.2, 0.1],   # needs 3
                   [3.0, 2.9, 2.8, 2.7, 2.6, 2.5, 0.1],   # needs 6 -> stays 3
                   [9.0, 2.0, 1.0, 0.5, 0.1, 0.1, 0.1]):  # needs 1
    g, _ = _gradient(rng, np.array(spectrum))
    u, state = update({"w": jnp.asarray(g, jnp.float32)}, state)
    energy = np.cumsum(np.square(spectrum)) / np.sum(np.square(spectrum))
    needed = int(np.argmax(energy >= threshold)) + 1 if np.any(energy >= threshold) else r
    expected_rank = min(expected_rank, needed, r)
    basis = state.bases["w"].basis
    assert int(basis.rank) == expected_rank
    vh = np.asarray(basis.basis.vh)
    assert np.all(vh[expected_rank:] == 0) and np.all(np.linalg.norm(vh[:expected_rank], axis=1) > 0.99)
    # The update is the projection on the top-k right singular vectors (float64).
    G = g.T
    _, _, vt = np.linalg.svd(G)
    want = G @ vt[:expected_rank].T @ vt[:expected_rank]
    got = np.asarray(u["w"], np.float64).T
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_lazy_refresh_through_an_int4_basis_keeps_its_bookkeeping_exact():
  """Q-GaLore's order: the int4 basis wraps the lazy schedule, whose previous singular
  vector and similarities stay float32, so a stable subspace still doubles the gap."""
  from optax_lowrank import quantize
  rng = np.random.default_rng(2)
  gap = 2
  projector = quantize.quantize_basis(schedules.lazy(projectors.svd(), gap), bits=4)
  tx = ol.lowrank_project(optax.identity(), rank=2, update_proj_gap=gap, projector=projector)
  state = tx.init({"w": jnp.zeros((C, R))})
  update = jax.jit(tx.update)
  g, _ = _gradient(rng, np.array([10.0, 3.0, 1.0]))  # one subspace, both sides fixed
  for _ in range(12):
    noisy = g + 1e-3 * rng.standard_normal(g.shape)
    _, state = update({"w": jnp.asarray(noisy, jnp.float32)}, state)
  lazy = state.bases["w"].basis
  assert isinstance(lazy.basis.vh, quantize.QuantizedArray)
  assert lazy.previous.dtype == jnp.float32 and lazy.similarities.dtype == jnp.float32
  # Refreshes at 0, 2, 4, 6, 8, 10: five similarities by step 10, so the gap doubled.
  assert int(lazy.gap) == 2 * gap


def test_stacked_leaves_keep_a_gap_and_a_rank_per_matrix():
  params = {"layers": jnp.zeros((3, C, R))}
  dims = {"layers": ol.DimensionNumbers(1, 2)}
  for projector in (schedules.lazy(projectors.svd(), 2),
                    schedules.adaptive_rank(projectors.svd(), 0.5)):
    tx = ol.lowrank_project(optax.scale_by_adam(), rank=4, update_proj_gap=2,
                            projector=projector, dimension_numbers=dims)
    state = tx.init(params)
    g = {"layers": jax.random.normal(jax.random.key(0), (3, C, R))}
    u, state = jax.jit(tx.update)(g, state)
    assert np.all(np.isfinite(u["layers"]))
    basis = state.bases["layers"].basis
    per_matrix = basis.gap if hasattr(basis, "gap") else basis.rank
    assert per_matrix.shape == (3,)


@pytest.mark.parametrize("make, match", [
    (lambda: schedules.lazy(projectors.svd(), 0), "update_proj_gap"),
    (lambda: schedules.lazy(projectors.svd(), 2, gamma=1), "gamma"),
    (lambda: schedules.lazy(projectors.svd(), 2, queue_size=0), "queue_size"),
    (lambda: schedules.lazy(projectors.svd(), 2, cos_threshold=2.0), "cos_threshold"),
    (lambda: schedules.adaptive_rank(projectors.svd(), 0.0), "threshold"),
])
def test_bad_arguments_name_the_parameter(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_random_bases_are_refused_with_the_leaf_path():
  tx = ol.lowrank_project(optax.identity(), rank=2,
                          projector=schedules.lazy(projectors.random(), 2))
  with pytest.raises(ValueError, match=r"\['w'\].*SVD-type basis"):
    tx.init({"w": jnp.zeros((C, R))})
