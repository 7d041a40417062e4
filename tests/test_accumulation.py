"""``optax_lowrank.MultiSteps``: gradient accumulation in the subspace.

Projection is linear, so the mean of k projected micro-gradients is the projection of
their mean: checked against dense float64 NumPy, against the authors' ProjFactor run on
the same micro-batches (``tests/reference/vlorp.py``), and, for SVD projectors, against
a float64 GaLore step whose basis comes from the first micro-batch.
"""

import math

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
  assert jax.tree.map(jnp.shape, state.acc_projected) == ({"w": (r, R)},)
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
  size of the first moment) and full size only for the other leaves, against a full
  accumulator for everything under optax.MultiSteps."""
  params = {"w": jnp.zeros((64, 256)), "v": jnp.zeros((256, 64)), "emb": jnp.zeros((100, 64))}
  mask = {"w": True, "v": True, "emb": False}
  c, r = 8, 2
  vlorp = ol.vlorp(1e-3, rank=r, granularity=c, projection_mask=mask)
  plain = ol.memory.state_bytes(vlorp, params).total_bytes
  acc = ol.memory.state_bytes(ol.MultiSteps(vlorp, 4), params).total_bytes
  assert acc - plain == 4 * (2 * 256 * c * r) + 4 * 100 * 64 + 2 * 4
  full = ol.memory.state_bytes(optax.MultiSteps(vlorp, 4), params).total_bytes
  assert full - plain == 4 * (2 * 256 * 64 + 100 * 64) + 2 * 4


@pytest.mark.parametrize("make", [
    lambda: ol.apollo(1e-3, rank=2), lambda: ol.fira(1e-3, rank=2),
    lambda: ol.frugal(1e-3, subspace="columns"), lambda: ol.flora(1e-3, rank=2, min_dim_size_to_factor=4),
])
def test_rules_that_read_the_full_gradient_are_refused_at_init(make):
  with pytest.raises(ValueError, match="optax.MultiSteps"):
    ol.MultiSteps(make(), 2).init({"w": jnp.zeros((32, 16))})


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
