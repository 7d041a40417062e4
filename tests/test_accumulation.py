"""``optax_lowrank.MultiSteps``: gradient accumulation in the subspace.

Projection is linear, so the mean of k projected micro-gradients is the projection of
their mean: checked against dense float64 NumPy, against the authors' ProjFactor run on
the same micro-batches (``tests/reference/vlorp.py``), and, for SVD projectors, against
a float64 GaLore step whose basis comes from the first micro-batch.

Against ``optax.MultiSteps`` running the same chain: the trajectories are compared in
float64 (``x64``), where they agree to ~1e-16 relative. In float32 they differ by
rounding that Adam amplifies (a projected mean is summed in another order than the
full-size one; where an entry of the projected gradient nearly cancels, Adam's
``m̂/√v̂`` turns that into ~1e-4 of the update), so a float32 tolerance would have to be
loose enough to hide real errors. Refresh windows repeat one micro-gradient (then the
first micro-batch, from which an SVD refresh is computed, is the window's mean
exactly); ``test_refresh_windows_are_the_one_difference`` shows what happens otherwise.
"""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import optax_lowrank as ol
from optax_lowrank import projectors
from tests.reference import vlorp as ref

K = 3  # micro-batches per step


def _lowrank(state):
  return [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, ol.LowRankState))
          if isinstance(s, ol.LowRankState)]


def _micro_grads(seed, shapes):
  rng = np.random.default_rng(seed)
  return [{k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
          for _ in range(K)]


@pytest.mark.parametrize("R, C, c", [(48, 16, 4), (16, 48, 0.5)])
def test_accumulated_projection_equals_projected_mean_float64(R, C, c):
  """identity inner, back-projection: the k-th update is up(down(mean G)) of the step's
  basis, computed densely in float64 from the micro-batches."""
  r = 2
  tx = ol.MultiSteps(ol.lowrank_project(
      optax.identity(), rank=r, granularity=c, update_proj_gap=2,
      projector=projectors.random(std="rank")), K)
  params = {"w": jnp.zeros((C, R))}
  state = tx.init(params)
  update = jax.jit(tx.update)
  for step in range(3):
    grads = _micro_grads(step, {"w": (C, R)})
    for i, g in enumerate(grads):
      u, state = update(g, state, params)
      if i < K - 1:
        assert not np.any(np.asarray(u["w"])) and not tx.has_updated(state)
    assert tx.has_updated(state)
    basis = _lowrank(state)[0].bases["w"].basis
    m = np.asarray((basis.basis if c != 1 else basis).matrix(), np.float64) * math.sqrt(r)
    mean = sum(np.asarray(g["w"], np.float64) for g in grads).T / K
    want = ref.project_back(ref.project(mean, m, c), m, c, r, 1.0, (R, C))
    got = np.asarray(u["w"], np.float64).T
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), step


def test_vlorp_accumulated_equals_the_authors_projfactor_on_micro_batches():
  """MultiSteps(vlorp) over 3 micro-batches for 7 steps (redraws every 3) against
  RefProjFactor / RefAdamW fed the same micro-batches, their mean (average=True) and
  our drawn matrices."""
  lr, r, c, gap, scale = 1e-2, 2, 4, 3, 0.25
  shapes = {"w": (16, 48), "v": (48, 16), "b": (48,)}  # kernels (C, R): R>=C / R<C
  tx = ol.MultiSteps(ol.vlorp(lr, rank=r, granularity=c, update_proj_gap=gap,
                              scale=scale), K)
  rng = np.random.default_rng(7)
  params = {k: jnp.asarray(0.1 * rng.standard_normal(s), jnp.float32)
            for k, s in shapes.items()}
  refs = {"w": ref.RefProjFactor((48, 16), r, c, lr=lr, gap=gap, scale=scale, average=True),
          "v": ref.RefProjFactor((16, 48), r, c, lr=lr, gap=gap, scale=scale, average=True),
          "b": ref.RefAdamW(lr=lr, average=True)}
  w_ref = {k: np.asarray(p, np.float64) for k, p in params.items()}
  state = tx.init(params)
  update = jax.jit(tx.update)
  worst = 0.0
  for step in range(7):
    grads = _micro_grads(100 + step, shapes)
    for g in grads:
      u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
    bases = _lowrank(state)[0].bases
    for k in shapes:
      micro = [np.asarray(g[k], np.float64) for g in grads]
      before = w_ref[k]
      if k == "b":
        w_ref[k] = refs[k].step(before, micro)
      else:
        m = np.asarray(bases[k].basis.basis.matrix(), np.float64) * math.sqrt(r)
        w_ref[k] = refs[k].step(before.T, [x.T for x in micro], m).T
      want, got = w_ref[k] - before, np.asarray(u[k], np.float64)
      err = np.abs(got - want).max() / np.abs(want).max()
      worst = max(worst, err)
      assert err <= 1e-5, (step, k, err)
      w_ref[k] = np.asarray(params[k], np.float64)  # continue from our weights
  print(f"vlorp accumulated vs reference: worst relative error {worst:.2e}")


def test_svd_refresh_uses_the_first_micro_batch():
  """GaLore under MultiSteps: the step-0 basis is the SVD of the first micro-gradient;
  Adam then runs on the projected mean (checked in float64)."""
  R, C, r, lr, scale, eps = 48, 16, 3, 1e-2, 0.25, 1e-6
  tx = ol.MultiSteps(ol.galore(lr, rank=r, scale=scale, eps=eps), K)
  params = {"w": jnp.zeros((C, R))}
  state = tx.init(params)
  grads = _micro_grads(5, {"w": (C, R)})
  for g in grads:
    u, state = tx.update(g, state, params)
  micro = [np.asarray(g["w"], np.float64).T for g in grads]  # torch (R, C)
  _, _, vh = np.linalg.svd(micro[0], full_matrices=False)
  v = vh[:r]  # R >= C: right side
  got_v = np.asarray(_lowrank(state)[0].bases["w"].basis.vh, np.float64)
  np.testing.assert_allclose(np.abs(got_v @ v.T), np.eye(r), atol=1e-4)  # same subspace
  proj = (sum(micro) / K) @ v.T  # first Adam step: m̂/(√v̂ + eps) = R/(|R| + eps)
  want = -lr * scale * (proj / (np.abs(proj) + eps)) @ v
  got = np.asarray(u["w"], np.float64).T
  assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
  # The accumulator is GaLore's projected gradient (r × R), not the 16 × 48 matrix.
  acc, = state.acc_projected
  assert jax.tree.map(jnp.shape, acc.projected) == {"w": (r, R)}
  assert acc.unprojected == {"w": optax.MaskedNode()}
  assert state.acc_grads == {"w": optax.MaskedNode()}


def test_without_lowrank_it_is_optax_multisteps():
  shapes = {"w": (8, 6), "b": (6,)}
  ours = ol.MultiSteps(optax.adamw(1e-2), K)
  theirs = optax.MultiSteps(optax.adamw(1e-2), K)
  params = {k: jnp.ones(s) for k, s in shapes.items()}
  s1, s2 = ours.init(params), theirs.init(params)
  for step in range(2):
    for g in _micro_grads(step, shapes):
      u1, s1 = ours.update(g, s1, params)
      u2, s2 = theirs.update(g, s2, params)
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), u1, u2)


def test_accumulator_is_projected_for_projected_leaves():
  """State bytes: the accumulator adds max(R, C)·c·r floats per projected matrix (the
  size of the first moment), the window's basis (a key of 8 bytes per matrix for VLoRP)
  and full size only for the other leaves, against a full accumulator for everything
  under optax.MultiSteps."""
  params = {"w": jnp.zeros((64, 256)), "v": jnp.zeros((256, 64)), "emb": jnp.zeros((100, 64))}
  mask = {"w": True, "v": True, "emb": False}
  c, r = 8, 2
  vlorp = ol.vlorp(1e-3, rank=r, granularity=c, projection_mask=mask)
  plain = ol.memory.state_bytes(vlorp, params).total_bytes
  acc = ol.memory.state_bytes(ol.MultiSteps(vlorp, 4), params).total_bytes
  assert acc - plain == 4 * (2 * 256 * c * r) + 2 * 8 + 4 * 100 * 64 + 2 * 4
  full = ol.memory.state_bytes(optax.MultiSteps(vlorp, 4), params).total_bytes
  assert full - plain == 4 * (2 * 256 * 64 + 100 * 64) + 2 * 4


@pytest.mark.parametrize("k", [0, -1, 1.5, True, None])
def test_bad_every_k_names_the_parameter(k):
  with pytest.raises(ValueError, match="every_k_schedule"):
    ol.MultiSteps(optax.sgd(1e-3), k)


def test_sharded_equals_unsharded_and_state_types_are_stable(mesh):
  shapes = {"w": (64, 32), "layers": (4, 32, 48), "b": (32,)}
  dims = {"w": None, "layers": ol.DimensionNumbers(1, 2), "b": None}
  specs = {"w": P("a", "b"), "layers": P("b", "a", None), "b": P("a")}
  make = lambda: ol.MultiSteps(ol.vlorp(1e-2, rank=2, granularity=4, update_proj_gap=2,
                                        dimension_numbers=dims), 2)
  params = {k: jnp.ones(s) * 0.1 for k, s in shapes.items()}
  grads = [g for step in range(3) for g in _micro_grads(step, shapes)[:2]]
  tx = make()
  state = tx.init(params)
  update = jax.jit(tx.update)  # unsharded reference, compiled once
  expected = []
  for g in grads:
    u, state = update(g, state, params)
    expected.append(u)
  tx = make()
  with jax.set_mesh(mesh):
    put = lambda t: {k: jax.device_put(x, NamedSharding(mesh, specs[k])) for k, x in t.items()}
    sp = put(params)
    state = jax.jit(tx.init)(sp)
    types = jax.tree.map(jax.typeof, state)
    update = jax.jit(tx.update)
    for g, want in zip(grads, expected):
      u, state = update(put(g), state, sp)
      assert jax.tree.map(jax.typeof, state) == types
      for k in shapes:
        assert jax.typeof(u[k]).sharding.spec == specs[k], k
        np.testing.assert_allclose(np.asarray(u[k]), np.asarray(want[k]), atol=2e-6)


def test_orbax_roundtrip_in_the_middle_of_an_accumulation(tmp_path):
  shapes = {"w": (16, 48), "b": (48,)}
  tx = ol.MultiSteps(ol.vlorp(1e-2, rank=2, granularity=4, update_proj_gap=2), K)
  params = {k: jnp.ones(s) * 0.1 for k, s in shapes.items()}
  grads = [g for step in range(3) for g in _micro_grads(step, shapes)]
  step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
      *tx.update(g, s, p)))
  p, s = params, tx.init(params)
  for g in grads:
    p, s = step(p, s, g)
  straight = (p, s)
  p, s = params, tx.init(params)
  for g in grads[:4]:  # one step and one micro-batch into the next
    p, s = step(p, s, g)
  assert int(s.mini_step) == 1
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "ckpt", {"params": p, "opt_state": s})
  abstract = jax.eval_shape(lambda: {"params": params, "opt_state": tx.init(params)})
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(tmp_path / "ckpt", abstract)
  p, s = restored["params"], restored["opt_state"]
  for g in grads[4:]:
    p, s = step(p, s, g)
  jax.tree.map(np.testing.assert_array_equal, (p, s), straight)


# ---------------------------------------------------------------------------
# optax.MultiSteps's meaning, for any chain around lowrank_project.

SHAPES = {"w": (24, 12), "v": (12, 30), "b": (12,)}  # two projected kernels and a bias
GAP = 2  # update_proj_gap: windows 0 and 2 of 4 refresh


@pytest.fixture
def x64():
  """float64 arrays for the duration of a test (see the module docstring)."""
  before = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", before)


def _windows(seed, sizes, *, refresh=(), use_grad_mean=True, poison=(), shapes=SHAPES):
  """Float64 micro-gradients for windows of ``sizes[i]`` micro-batches.

  A window in ``refresh`` repeats one gradient (mean), or has it followed by zeros
  (sum), so that its first micro-batch is its mean (sum) exactly. ``poison``:
  ``(window, position)`` pairs where a NaN micro-batch is inserted
  (``optax.skip_not_finite`` skips it; it does not count).
  """
  rng = np.random.default_rng(seed)
  draw = lambda: {k: rng.standard_normal(s) for k, s in shapes.items()}
  flat = []
  for w, size in enumerate(sizes):
    if w in refresh:
      g = draw()
      rest = g if use_grad_mean else {k: np.zeros(s) for k, s in shapes.items()}
      window = [g] + [rest] * (size - 1)
    else:
      window = [draw() for _ in range(size)]
    for pos in sorted((p for ww, p in poison if ww == w), reverse=True):
      window.insert(pos, {k: np.full(s, np.nan) for k, s in shapes.items()})
    flat += window
  return [{k: jnp.asarray(x, jnp.float64) for k, x in g.items()} for g in flat]


def _params(shapes=SHAPES):
  rng = np.random.default_rng(99)
  return {k: jnp.asarray(0.1 * rng.standard_normal(s), jnp.float64) for k, s in shapes.items()}


def _run(tx, params, grads):
  update = jax.jit(tx.update)
  state = tx.init(params)
  updates, emitted = [], []
  for g in grads:
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
    updates.append(u)
    emitted.append(bool(tx.has_updated(state)))
  return updates, emitted, state


def _same_as_optax(make, grads, *args, **kwargs):
  """Runs ``make()`` under both wrappers; returns the worst difference of the updates
  relative to their largest entry, and our final state."""
  kwargs = dict(accumulator_dtype=jnp.float64, **kwargs)
  params = _params(jax.tree.map(jnp.shape, grads[0]))
  ours, ours_emitted, state = _run(ol.MultiSteps(make(), *args, **kwargs), params, grads)
  theirs, theirs_emitted, _ = _run(optax.MultiSteps(make(), *args, **kwargs), params, grads)
  assert ours_emitted == theirs_emitted and sum(theirs_emitted) >= 3
  scale = max(float(jnp.max(jnp.abs(x))) for u in theirs for x in jax.tree.leaves(u))
  assert scale > 0
  worst = max(float(jnp.max(jnp.abs(a - b))) for u, v in zip(ours, theirs)
              for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(v)))
  return worst / scale, state


def _lowrank_adam(**kwargs):
  return ol.lowrank_project(optax.scale_by_adam(), rank=2, update_proj_gap=GAP, **kwargs)


DECAY_MASK = {"w": True, "v": True, "b": False}
CHAINS = {
    "galore": lambda: ol.galore(1e-2, rank=2, update_proj_gap=GAP),
    # a schedule before the projection (linear), decoupled weight decay and a
    # learning-rate schedule after it
    "schedules_and_decay": lambda: optax.chain(
        optax.scale_by_schedule(optax.linear_schedule(1.0, 0.5, 4)), _lowrank_adam(),
        optax.add_decayed_weights(0.1, DECAY_MASK),
        optax.scale_by_learning_rate(optax.linear_schedule(1e-2, 1e-3, 4))),
    # v and b pass through optax.masked raw: MultiSteps accumulates them
    "masked": lambda: optax.chain(
        optax.masked(_lowrank_adam(), {"w": True, "v": False, "b": False}),
        optax.scale(-1e-2)),
    "partition": lambda: optax.partition(
        {"low": optax.chain(_lowrank_adam(), optax.scale(-1e-2)), "adam": optax.adam(1e-2)},
        {"w": "low", "v": "low", "b": "adam"}),
    "inject_hyperparams": lambda: optax.inject_hyperparams(
        ol.galore, static_args=("rank", "update_proj_gap"))(
            learning_rate=optax.linear_schedule(1e-2, 1e-3, 4), rank=2,
            update_proj_gap=GAP),
    # coupled (L2) decay before the projection: affine, commutes with the mean
    "decay_before": lambda: optax.chain(
        optax.add_decayed_weights(0.1), _lowrank_adam(), optax.scale(-1e-2)),
    # momentum before the projection: its state reads the mean, so MultiSteps
    # accumulates those raw gradients too (correct, no saving)
    "momentum_before": lambda: optax.chain(
        optax.trace(0.5), _lowrank_adam(), optax.scale(-1e-2)),
}


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_equals_optax_multisteps(name, x64):
  grads = _windows(1, [K] * 4, refresh=(0, 2))
  err, state = _same_as_optax(CHAINS[name], grads, K)
  print(f"{name}: max |Δ update| / max |update| = {err:.1e}")
  assert err <= 1e-12
  raw = {k: not isinstance(x, optax.MaskedNode) for k, x in state.acc_grads.items()}
  expected = {"masked": {"w": False, "v": True, "b": True},
              "partition": {"w": False, "v": False, "b": True},
              "momentum_before": {"w": True, "v": True, "b": True}}
  assert raw == expected.get(name, {"w": False, "v": False, "b": False})


@pytest.mark.parametrize("case", ["sum", "skip", "callable_k"])
def test_equals_optax_multisteps_arguments(case, x64):
  make = CHAINS["galore"]
  if case == "sum":
    grads = _windows(2, [K] * 4, refresh=(0, 2), use_grad_mean=False)
    err, _ = _same_as_optax(make, grads, K, use_grad_mean=False)
  elif case == "skip":  # the first micro-batch of a refresh window is skipped too
    grads = _windows(3, [K] * 4, refresh=(0, 2), poison=[(0, 0), (1, 2), (2, 0), (3, 1)])
    err, state = _same_as_optax(make, grads, K, should_skip_update_fn=optax.skip_not_finite)
    assert int(state.skip_state["num_not_finite"]) == 0
  else:
    every_k = lambda step: 2 + step % 2
    grads = _windows(4, [2, 3, 2, 3], refresh=(0, 2))
    err, _ = _same_as_optax(make, grads, every_k)
  print(f"{case}: max |Δ update| / max |update| = {err:.1e}")
  assert err <= 1e-12


@pytest.mark.parametrize("make", [
    lambda: ol.apollo(1e-2, rank=2, update_proj_gap=1),
    lambda: ol.fira(1e-2, rank=2, update_proj_gap=1),
    lambda: ol.frugal(1e-2, subspace="columns", update_proj_gap=1),
    lambda: ol.flora(1e-2, rank=2, min_dim_size_to_factor=4),
], ids=["apollo", "fira", "frugal", "flora"])
def test_rules_that_read_the_full_gradient_accumulate_raw_as_optax(make, x64):
  """Their update needs the full mean gradient: nothing is accumulated at projected
  size, and the trajectory is optax.MultiSteps's on every step, refreshes (here every
  step, from generic micro-batches) included. Flora's factored normalization before
  its projection is allowed here."""
  grads = _windows(5, [2] * 3, shapes={"w": (24, 12), "b": (12,)})
  err, state = _same_as_optax(make, grads, 2)
  print(f"max |Δ update| / max |update| = {err:.1e}")
  assert err <= 1e-12
  assert not ol.MultiSteps.accumulates_projected(state) and state.acc_projected == ()
  assert jax.tree.map(jnp.shape, state.acc_grads) == {"w": (24, 12), "b": (12,)}


def test_refresh_windows_are_the_one_difference(x64):
  """Generic micro-batches. On a refresh window the SVD basis is the first
  micro-batch's (optax.MultiSteps: the mean's), so the updates differ; given the same
  state, a window without a refresh gives optax.MultiSteps's update."""
  k = K
  grads = _windows(6, [k] * 3)  # refreshes on windows 0 and 2 (update_proj_gap=2)
  make = CHAINS["galore"]
  ours = ol.MultiSteps(make(), k, accumulator_dtype=jnp.float64)
  theirs = optax.MultiSteps(make(), k, accumulator_dtype=jnp.float64)
  params = _params()
  s1, s2 = ours.init(params), theirs.init(params)
  u1, u2 = jax.jit(ours.update), jax.jit(theirs.update)

  def window(i, s1, s2):
    for g in grads[i * k:(i + 1) * k]:
      a, s1 = u1(g, s1, params)
      b, s2 = u2(g, s2, params)
    diff = max(float(jnp.max(jnp.abs(a[n] - b[n]))) for n in a)
    return diff / max(float(jnp.max(jnp.abs(b[n]))) for n in b), s1, s2

  err, s1, s2 = window(0, s1, s2)
  assert err > 1e-2, err  # refreshed from different gradients
  # ours is the SVD of the first micro-batch (GaLore: m = 12 < n = 24 projects left)
  first = np.asarray(grads[0]["w"]).T  # reference orientation (m, n)
  u = np.linalg.svd(first, full_matrices=False)[0][:, :2]
  got = np.asarray(_lowrank(s1)[0].bases["w"].basis.u, np.float64)
  np.testing.assert_allclose(np.abs(got.T @ u), np.eye(2), atol=1e-5)
  s1 = s1._replace(inner_opt_state=s2.inner_opt_state)  # same subspace from here
  err, s1, s2 = window(1, s1, s2)
  assert err <= 1e-12, err  # no refresh inside the window: the same update
  err, s1, s2 = window(2, s1, s2)
  assert err > 1e-2, err


def test_buffers_are_projected_size_for_projected_leaves():
  """GaLore with decoupled decay: the projected leaves' accumulators are r·max(m, n),
  their window bases r·min(m, n) (the same size as the stored bases), the bias is
  accumulated at full size; no full-size accumulator exists for the kernels."""
  r = 4
  params = {"w": jnp.zeros((64, 32)), "v": jnp.zeros((32, 80)), "b": jnp.zeros(32)}
  tx = optax.chain(ol.lowrank_project(optax.scale_by_adam(), rank=r),
                   optax.add_decayed_weights(1e-2), optax.scale_by_learning_rate(1e-3))
  state = jax.eval_shape(ol.MultiSteps(tx, 4).init, params)
  acc, = state.acc_projected
  size = lambda t: jax.tree.map(lambda x: x.size, t)
  assert size(acc.projected) == {"w": r * 64, "v": r * 80, "b": optax.MaskedNode()}
  stored = {k: b.basis for k, b in _lowrank(state.inner_opt_state)[0].bases.items()}
  assert jax.tree.map(jnp.shape, acc.bases) == jax.tree.map(jnp.shape, stored)
  assert size(acc.bases) == {"w": type(stored["w"])(r * 32), "v": type(stored["v"])(r * 32)}
  assert jax.tree.map(lambda x: (x.shape, x.dtype), acc.unprojected) == {
      "w": optax.MaskedNode(), "v": optax.MaskedNode(), "b": ((32,), jnp.float32)}
  assert state.acc_grads == {k: optax.MaskedNode() for k in params}
  assert ol.MultiSteps.accumulates_projected(state)
  ours = sum(x.size for x in jax.tree.leaves((state.acc_grads, state.acc_projected)))
  theirs = jax.eval_shape(optax.MultiSteps(tx, 4).init, params).acc_grads
  assert ours == r * (64 + 80) + r * (32 + 32) + 32
  assert ours * 5 < sum(x.size for x in jax.tree.leaves(theirs))  # 864 against 4640


def _issue_params_and_grads():
  rng = np.random.default_rng(13)
  params = {"w": jnp.zeros((32, 16)), "b": jnp.zeros(16)}
  grads = [{"w": jnp.asarray(rng.standard_normal((32, 16)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal(16), jnp.float32)} for _ in range(K)]
  return params, grads


def test_regression_bias_is_not_clipped_alone():
  """Issue 13: main accepted chain(clip_by_global_norm(1.0), lowrank_project(...)) and,
  at the last micro-batch, clipped the raw bias mean with zeros in place of the
  projected kernel: a bias update of norm 1.0 where optax.MultiSteps clips the whole
  mean gradient (a small bias share). The clip of the mean cannot be formed at
  projected size, so the chain is refused at init."""
  make = lambda: optax.chain(optax.clip_by_global_norm(1.0),
                             ol.lowrank_project(optax.sgd(1.0), rank=2))
  params, grads = _issue_params_and_grads()
  tx = optax.MultiSteps(make(), K)
  state, update = tx.init(params), jax.jit(tx.update)
  for g in grads:
    u, state = update(g, state, params)
  mean = jax.tree.map(lambda *x: sum(x) / K, *grads)
  share = float(jnp.linalg.norm(mean["b"]) / optax.tree.norm(mean))  # 0.19 here
  assert float(jnp.linalg.norm(u["b"])) == pytest.approx(share, rel=1e-5) and share < 0.3
  with pytest.raises(ValueError, match="clip_by_global_norm"):
    ol.MultiSteps(make(), K).init(params)


@pytest.mark.parametrize("prefix, use_grad_mean, named, what", [
    (lambda: optax.clip_by_global_norm(1.0), True, "clip_by_global_norm",
     "not linear in the gradient"),
    (lambda: optax.add_decayed_weights(0.1), False, "add_decayed_weights", "affine"),
])
def test_a_prefix_without_the_mean_s_meaning_is_refused_naming_it(
    prefix, use_grad_mean, named, what):
  tx = optax.chain(prefix(), ol.lowrank_project(optax.scale_by_adam(), rank=2),
                   optax.scale(-1e-2))
  params, _ = _issue_params_and_grads()
  with pytest.raises(ValueError) as e:
    ol.MultiSteps(tx, K, use_grad_mean=use_grad_mean).init(params)
  msg = str(e.value)
  assert f"{named}: " in msg and what in msg and "lowrank_project #1" in msg, msg
  if named == "clip_by_global_norm":  # the equation's source, up to the transform
    assert os.path.join("optax", "transforms", "_clipping.py") in msg, msg


def test_a_cond_between_multisteps_and_lowrank_project_is_refused():
  """The projected gradients are handed back within one trace; under a lax.cond they
  would be tracers of the branch."""
  inner = optax.with_extra_args_support(ol.lowrank_project(optax.scale_by_adam(), rank=2))

  def update(u, s, p=None, **extra):
    ok = jnp.all(jnp.isfinite(u["w"]))
    return jax.lax.cond(ok, lambda: inner.update(u, s, p, **extra), lambda: (u, s))

  tx = optax.GradientTransformationExtraArgs(inner.init, update)
  params, _ = _issue_params_and_grads()
  with pytest.raises(ValueError, match="lax.cond, lax.scan, vmap or jit"):
    ol.MultiSteps(tx, K).init(params)
