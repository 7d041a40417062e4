"""lowrank_project: composition with optax, refresh control, safety, errors."""

import functools

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_lowrank as ol
from optax_lowrank import projectors


def _params(dtype=jnp.float32):
  k = jax.random.split(jax.random.key(0), 3)
  return {
      "w": jax.random.normal(k[0], (24, 16), dtype),
      "v": jax.random.normal(k[1], (12, 20), dtype),
      "b": jnp.zeros((16,), dtype),
  }


def _grads(step, params):
  """Deterministic, distinct gradients per step."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.fold_in(jax.random.key(1), step), len(leaves))
  return treedef.unflatten(
      [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
  )


def _run(tx, params, steps, jit=True, grads_fn=_grads):
  update = jax.jit(tx.update) if jit else tx.update
  state = tx.init(params)
  out = []
  for t in range(steps):
    u, state = update(grads_fn(t, params), state, params)
    params = optax.apply_updates(params, u)
    out.append(u)
  return out, state, params


def _assert_trees_close(a, b, rtol=1e-6):
  """Per leaf, ‖a − b‖ ≤ rtol·‖b‖ (a norm-wise relative error)."""

  def check(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    assert x.shape == y.shape
    err = np.linalg.norm(x - y)
    assert err <= rtol * np.linalg.norm(y) or err == 0.0, err / np.linalg.norm(y)

  jax.tree.map(check, a, b)


@pytest.mark.parametrize(
    "inner",
    [
        optax.chain(optax.clip_by_global_norm(0.5), optax.adam(1e-2)),
        optax.adafactor(1e-2),
        optax.lion(1e-3),
    ],
    ids=["clip+adam", "adafactor", "lion"],
)
def test_nothing_projected_is_exactly_inner(inner):
  params = _params()
  # rank 16 >= min side of both matrices: nothing is projected.
  ours, _, _ = _run(ol.lowrank_project(inner, rank=16), params, 4)
  ref, _, _ = _run(inner, params, 4)
  jax.tree.map(np.testing.assert_array_equal, ours, ref)
  masked, _, _ = _run(
      ol.lowrank_project(inner, rank=4, projection_mask=lambda p: jax.tree.map(lambda _: False, p)),
      params, 4,
  )
  jax.tree.map(np.testing.assert_array_equal, masked, ref)


def test_global_norm_clipping_sees_the_projected_tree():
  """One inner state over the tree: the clip uses the norm of all of R."""
  params = _params()
  g = _grads(0, params)
  tx = ol.lowrank_project(optax.clip_by_global_norm(1.0), rank=4)
  u, state = tx.update(g, tx.init(params), params)
  # Reference: project by hand with the stored bases, clip globally, go back.
  bases = state.bases
  r_w = g["w"] @ bases["w"].basis.u  # w is (24, 16): matrix (16, 24) → left
  r_v = g["v"].T @ bases["v"].basis.vh.T  # v is (12, 20): matrix (20, 12) → right
  total = jnp.sqrt(jnp.sum(r_w**2) + jnp.sum(r_v**2) + jnp.sum(g["b"] ** 2))
  factor = jnp.minimum(1.0, 1.0 / total)
  np.testing.assert_allclose(u["b"], g["b"] * factor, rtol=1e-6)
  np.testing.assert_allclose(
      u["w"], (r_w * factor) @ bases["w"].basis.u.T, rtol=1e-5, atol=1e-6
  )


def test_jit_equals_eager():
  params = _params()
  tx = ol.galore(1e-2, rank=4, update_proj_gap=3, weight_decay=0.1)
  eager, _, _ = _run(tx, params, 5, jit=False)
  jitted, _, _ = _run(tx, params, 5, jit=True)
  _assert_trees_close(eager, jitted, rtol=1e-5)


def test_alias_is_direction_times_schedule_plus_decay():
  """galore = -lr_t · (lowrank_project(adam) + wd·W), checked by hand."""
  params = _params()
  sched = optax.linear_schedule(1e-2, 1e-3, 5)
  wd = 0.1
  alias = ol.galore(sched, rank=4, update_proj_gap=3, weight_decay=wd)
  direction = ol.lowrank_project(
      optax.scale_by_adam(eps=1e-6), rank=4, update_proj_gap=3, scale=0.25
  )
  sa, sd = alias.init(params), direction.init(params)
  alias_update, direction_update = jax.jit(alias.update), jax.jit(direction.update)
  p = params
  for t in range(5):
    g = _grads(t, p)
    u, sa = alias_update(g, sa, p)
    d, sd = direction_update(g, sd, p)
    expected = jax.tree.map(lambda d, w: -sched(t) * (d + wd * w), d, p)
    _assert_trees_close(u, expected, rtol=1e-5)
    p = optax.apply_updates(p, u)


def test_multisteps_accumulates_before_projecting():
  params = _params()
  make = lambda: ol.galore(1e-2, rank=4, update_proj_gap=2)
  multi = optax.MultiSteps(make(), every_k_schedule=2)
  single = make()
  sm, ss = multi.init(params), single.init(params)
  multi_update, single_update = jax.jit(multi.update), jax.jit(single.update)
  for t in range(3):
    g1, g2 = _grads(2 * t, params), _grads(2 * t + 1, params)
    u0, sm = multi_update(g1, sm, params)
    jax.tree.map(lambda x: np.testing.assert_array_equal(x, 0.0), u0)
    um, sm = multi_update(g2, sm, params)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
    us, ss = single_update(mean, ss, params)
    _assert_trees_close(um, us, rtol=1e-5)


def test_inject_hyperparams_learning_rate_and_scale():
  params = _params()
  injected = optax.inject_hyperparams(
      ol.galore, static_args=("rank", "update_proj_gap")
  )(learning_rate=0.1, rank=4, update_proj_gap=3, scale=0.25)
  plain = ol.galore(0.1, rank=4, update_proj_gap=3, scale=0.25)
  si, sp = injected.init(params), plain.init(params)
  injected_update, plain_update = jax.jit(injected.update), jax.jit(plain.update)
  # optax.inject_hyperparams(optax.adamw) itself differs from optax.adamw by
  # ~7e-6 (float32 hyper-parameters), hence the tolerance.
  for t in range(3):
    g = _grads(t, params)
    ui, si = injected_update(g, si, params)
    up, sp = plain_update(g, sp, params)
    _assert_trees_close(ui, up, rtol=2e-5)
  # Changing lr and scale rescales projected leaves by lr·scale, others by lr (the
  # hyper-parameters are traced state: the same compiled update reads the new values).
  si.hyperparams["learning_rate"] = jnp.asarray(0.05)
  si.hyperparams["scale"] = jnp.asarray(0.5)
  g = _grads(3, params)
  ui, _ = injected_update(g, si, params)
  up, _ = plain_update(g, sp, params)
  _assert_trees_close(ui["w"], up["w"], rtol=2e-5)  # 0.5·2 = 1
  _assert_trees_close(ui["b"], 0.5 * up["b"], rtol=2e-5)


def test_apply_if_finite_skips_a_nan_step():
  params = _params()
  make = lambda: ol.galore(1e-2, rank=4, update_proj_gap=2)
  safe = optax.apply_if_finite(make(), max_consecutive_errors=3)
  ref = make()
  ss, sr = safe.init(params), ref.init(params)
  bad = jax.tree.map(lambda x: x.at[0].set(jnp.nan), _grads(0, params))
  u, ss = jax.jit(safe.update)(bad, ss, params)
  jax.tree.map(lambda x: np.testing.assert_array_equal(x, 0.0), u)
  for t in range(4):
    g = _grads(t, params)
    us, ss = jax.jit(safe.update)(g, ss, params)
    ur, sr = jax.jit(ref.update)(g, sr, params)
    jax.tree.map(np.testing.assert_array_equal, us, ur)


def test_nan_gradient_on_a_refresh_step_keeps_the_previous_basis():
  params = _params()
  tx = ol.lowrank_project(optax.scale_by_adam(), rank=4, update_proj_gap=2)
  state = tx.init(params)
  _, state = tx.update(_grads(0, params), state)  # refresh at 0
  _, state = tx.update(_grads(1, params), state)
  before = state.bases
  bad = _grads(2, params)
  bad["w"] = bad["w"].at[3, 3].set(jnp.inf)
  _, state = tx.update(bad, state)  # step 2 is a refresh step
  jax.tree.map(np.testing.assert_array_equal, state.bases["w"], before["w"])
  assert bool(jnp.all(jnp.isfinite(state.bases["w"].basis.u)))
  # The finite leaf refreshed normally.
  assert not np.allclose(state.bases["v"].basis.vh, before["v"].basis.vh)


def _counting_svd(events):
  """The SVD projector, recording (matrix shape, step) of each executed refresh."""
  base = projectors.svd()

  def refresh(ctx, g, basis):
    jax.debug.callback(
        lambda s, shape=g.shape: events.append((shape, int(s))), ctx.step,
        ordered=False,
    )
    return base.refresh(ctx, g, basis)

  return base._replace(refresh=refresh)


def test_svd_runs_only_on_refresh_steps():
  params = _params()
  events = []
  tx = ol.lowrank_project(
      optax.scale_by_adam(), rank=4, update_proj_gap=4,
      projector=_counting_svd(events),
  )
  _run(tx, params, 10)
  jax.effects_barrier()
  steps = sorted(s for _, s in events)
  assert steps == [0, 0, 4, 4, 8, 8]
  # And in the traced program every SVD sits inside a cond's branch.
  jaxpr = jax.make_jaxpr(tx.update)(params, tx.init(params), params).jaxpr
  assert _count_svds(jaxpr, outside_cond=True) == 0
  assert _count_svds(jaxpr, outside_cond=False) == 2


def _count_svds(jaxpr, outside_cond):
  """SVD primitives in ``jaxpr`` and its sub-jaxprs (optionally skipping conds)."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "svd":
      total += 1
    if outside_cond and eqn.primitive.name == "cond":
      continue
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          total += _count_svds(sub, outside_cond)
  return total


def test_stagger_spreads_refreshes_over_the_gap():
  shapes = [(24, 16), (20, 12), (28, 10), (18, 14)]
  params = {f"p{i}": jnp.ones(s) for i, s in enumerate(shapes)}
  events = []
  tx = ol.lowrank_project(
      optax.scale_by_adam(), rank=4, update_proj_gap=8, stagger=True,
      projector=_counting_svd(events),
  )
  _run(tx, params, 19)
  jax.effects_barrier()
  for i, (a, b) in enumerate(shapes):  # leaf i is offset by 8·i/4 = 2i
    steps = sorted(s for shape, s in events if shape == (a, b))
    expected = sorted({0} | {s for s in range(19) if s >= 2 * i and (s - 2 * i) % 8 == 0})
    assert steps == expected, (i, steps)
  per_step = np.bincount([s for _, s in events if s > 0])
  assert per_step.max() == 1  # after step 0, no step pays for two SVDs


def test_fixed_projector_supplied_by_the_user():
  """Any Projector plugs in: a fixed orthonormal Q gives U = scale·Q·adam(QᵀG)."""
  q = np.linalg.qr(np.random.RandomState(0).randn(16, 4))[0].astype(np.float32)

  fixed = ol.Projector(
      init=lambda info, dtype: jnp.asarray(q),
      refresh=lambda ctx, g, basis: basis,
      # g arrives in the kernel's layout (n, m) = (in, out); see Projector.
      down=lambda basis, g: jnp.einsum("mr,...nm->...rn", basis, g),
      up=lambda basis, r: jnp.einsum("mr,...rn->...nm", basis, r),
  )
  params = {"w": jnp.ones((24, 16))}
  tx = ol.lowrank_project(optax.sgd(1.0), rank=4, scale=0.5, projector=fixed)
  g = _grads(0, params)
  u, _ = tx.update(g, tx.init(params))
  expected = -0.5 * (q @ (q.T @ np.asarray(g["w"]).T)).T
  np.testing.assert_allclose(u["w"], expected, rtol=1e-5, atol=1e-6)


def test_dtypes_and_state_types_are_stable():
  params = _params(jnp.bfloat16)
  tx = ol.galore(1e-2, rank=4, update_proj_gap=2)
  state = tx.init(params)
  before = jax.tree.map(jax.typeof, state)
  u, state = jax.jit(tx.update)(_grads(0, params), state, params)
  assert jax.tree.map(jax.typeof, state) == before
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u))
  abstract = jax.eval_shape(
      tx.init, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  )
  assert jax.tree.map(lambda x: (x.shape, x.dtype), abstract) == jax.tree.map(
      lambda x: (x.shape, x.dtype), state
  )


def test_no_recompilation_after_the_first_step():
  params = _params()
  tx = ol.galore(1e-2, rank=4, update_proj_gap=2)
  traces = []

  @jax.jit
  def step(g, s, p):
    traces.append(1)
    return tx.update(g, s, p)

  state = tx.init(params)
  for t in range(4):
    _, state = step(_grads(t, params), state, params)
  assert len(traces) == 1


@pytest.mark.parametrize("policy", ["reset", "rotate"])
def test_moment_policies_only_touch_refreshed_leaves(policy):
  """With stagger, a policy acts on the refreshed leaf; the other is untouched."""
  params = {"a": jnp.ones((24, 16)), "c": jnp.ones((20, 12))}
  kw = dict(rank=4, update_proj_gap=4, stagger=True)
  keep = ol.lowrank_project(optax.scale_by_adam(), **kw)
  other = ol.lowrank_project(optax.scale_by_adam(), on_refresh=policy, **kw)
  _, sk, _ = _run(keep, params, 2)  # leaf "c" (offset 2) refreshes at step 2
  _, so, _ = _run(other, params, 2)
  g = _grads(2, params)
  _, sk = keep.update(g, sk)
  _, so = other.update(g, so)
  np.testing.assert_array_equal(so.inner_state.mu["a"], sk.inner_state.mu["a"])
  np.testing.assert_array_equal(so.inner_state.nu["a"], sk.inner_state.nu["a"])
  assert not np.allclose(so.inner_state.mu["c"], sk.inner_state.mu["c"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rank=0), "`rank`"),
        (dict(rank=1.5), "`rank`"),
        (dict(rank="8"), "`rank`"),
        (dict(rank=4, update_proj_gap=0), "`update_proj_gap`"),
        (dict(rank=4, scale=0.0), "`scale`"),
        (dict(rank=4, proj_type="diag"), "`proj_type` must be one of"),
        (dict(rank=4, on_refresh="drop"), "`on_refresh` must be one of"),
        (dict(rank=4, projector="qr"), "`projector`"),
    ],
)
def test_bad_hyperparameters_are_rejected_at_build_time(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ol.lowrank_project(optax.scale_by_adam(), **kwargs)
  if "rank" in kwargs and "projector" not in kwargs and "on_refresh" not in kwargs:
    with pytest.raises(ValueError, match=match):
      ol.galore(1e-3, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(b1=1.0), "`b1`"), (dict(b2=-0.1), "`b2`"), (dict(eps=-1e-8), "`eps`"),
     (dict(weight_decay=-0.1), "`weight_decay`")],
)
def test_bad_adam_hyperparameters_of_the_alias(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ol.galore(1e-3, **kwargs)


def test_three_axis_leaf_without_dimension_numbers_stays_full_size():
  """As optax.contrib.galore: not projected, one warning naming the leaf."""
  params = {"blocks": {"w": jnp.ones((3, 24, 16))}, "b": jnp.ones(4),
            "k": jnp.ones((24, 16))}
  tx = ol.lowrank_project(optax.scale_by_adam(), rank=4)
  with pytest.warns(UserWarning, match=r"1 leaves.*\['blocks'\]\['w'\] \(3, 24, 16\)"):
    state = tx.init(params)
  assert set(state.bases) == {"k"}
  assert state.inner_state.mu["blocks"]["w"].shape == (3, 24, 16)
  grads = jax.tree.map(lambda x: x * 0.5, params)
  ours, _ = tx.update(grads, state, params)
  ref, _ = optax.scale_by_adam().update(grads, optax.scale_by_adam().init(params))
  np.testing.assert_array_equal(ours["blocks"]["w"], ref["blocks"]["w"])
  assert not np.allclose(ours["k"], ref["k"])  # projected: a rank-4 update
  excluded = ol.lowrank_project(
      optax.scale_by_adam(), rank=4,
      projection_mask={"blocks": {"w": False}, "b": True, "k": True})
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert set(excluded.init(params).bases) == {"k"}


def test_optax_dimension_numbers_are_accepted():
  params = {"w": jax.random.normal(jax.random.key(0), (3, 24, 16))}
  ours = ol.lowrank_project(optax.scale_by_adam(), rank=4,
                            dimension_numbers=ol.DimensionNumbers(1, 2))
  want, _ = ours.update(params, ours.init(params), params)
  for spec in (optax.contrib.GaLoreDimensionNumbers(1, 2),
               optax.contrib.MuonDimensionNumbers(1, 2)):
    tx = ol.lowrank_project(optax.scale_by_adam(), rank=4,
                            dimension_numbers={"w": spec})
    state = tx.init(params)
    assert state.bases["w"].matrix_shape == (3, 16, 24)
    got, _ = tx.update(params, state, params)
    np.testing.assert_array_equal(got["w"], want["w"])


def test_match_paths_selects_by_regular_expression():
  params = {"layers": {"attn": {"q": jnp.ones((16, 16))},
                       "mlp": {"up": jnp.ones((16, 32))},
                       "norm": jnp.ones((16, 16))}, "head": jnp.ones((16, 32))}
  mask = ol.match_paths("attn|mlp")(params)
  assert mask == {"layers": {"attn": {"q": True}, "mlp": {"up": True},
                             "norm": False}, "head": False}
  tx = ol.lowrank_project(optax.scale_by_adam(), rank=4,
                          projection_mask=ol.match_paths("attn|mlp"))
  assert set(tx.init(params).bases) == {"layers/attn/q", "layers/mlp/up"}
  with pytest.raises(ValueError, match="`pattern`"):
    ol.match_paths("(")


def test_bad_dimension_numbers_name_the_leaf():
  params = {"blocks": {"w": jnp.ones((3, 24, 16))}, "b": jnp.ones(4)}
  bad_dims = ol.lowrank_project(
      optax.scale_by_adam(), rank=4,
      dimension_numbers={"blocks": {"w": ol.DimensionNumbers(1, 1)}, "b": None},
  )
  with pytest.raises(ValueError, match=r"\['blocks'\]\['w'\].*distinct"):
    bad_dims.init(params)


def _moments_after_refresh(policy):
  """Adam moments of leaf "w" before and after the refresh at step 2, and the
  bases on both sides of it (gap 2, right basis: R = G Vhᵀ, (m, r))."""
  params = {"w": jnp.ones((16, 24))}
  tx = ol.lowrank_project(optax.scale_by_adam(), rank=4, update_proj_gap=2,
                          on_refresh=policy)
  _, state, _ = _run(tx, params, 2)
  before = state
  _, after = jax.jit(tx.update)(_grads(2, params), state, params)
  return before, after


@pytest.mark.parametrize("name", ["rotate_first_moment", "rotate_moments"])
def test_rotation_policies_against_float64(name):
  """M ← T M and (both moments) V ← (T √V)², T = Pₙ Pₒᵀ for right bases."""
  before, after = _moments_after_refresh(getattr(ol.moments, name)())
  old = np.asarray(before.bases["w"].basis.vh, np.float64)  # (r, n) = (4, 16)
  new = np.asarray(after.bases["w"].basis.vh, np.float64)
  t = new @ old.T  # (r, r): coordinates in the new basis of the old vectors
  g = np.asarray(_grads(2, {"w": jnp.ones((16, 24))})["w"], np.float64)
  r = g.T @ new.T  # G (m, n) = gᵀ; R = G Vhᵀ, stored as Rᵀ (r, m)
  mu0 = np.asarray(before.inner_state.mu["w"], np.float64)  # (r, m)
  nu0 = np.asarray(before.inner_state.nu["w"], np.float64)
  mu_want = 0.9 * (t @ mu0) + 0.1 * r.T
  nu_rot = np.square(t @ np.sqrt(nu0)) if name == "rotate_moments" else nu0
  nu_want = 0.999 * nu_rot + 0.001 * np.square(r.T)
  np.testing.assert_allclose(after.inner_state.mu["w"], mu_want, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(after.inner_state.nu["w"], nu_want, rtol=2e-5, atol=1e-7)
  # Negative control: the subspace really moved, so keeping differs.
  assert np.abs(t - np.eye(4)).max() > 0.1


def test_a_custom_refresh_policy_sees_each_moment_kind():
  seen = []

  def halve_second(kind, x, fresh, change):
    seen.append(kind)
    return x * 0.5 if kind == "second" else x

  keep_before, keep_after = _moments_after_refresh("keep")
  _, after = _moments_after_refresh(ol.RefreshPolicy(halve_second, "halve"))
  assert sorted(set(seen)) == ["first", "second"]
  np.testing.assert_array_equal(after.inner_state.mu["w"], keep_after.inner_state.mu["w"])
  np.testing.assert_allclose(
      after.inner_state.nu["w"],
      keep_after.inner_state.nu["w"] - 0.999 * 0.5 * keep_before.inner_state.nu["w"],
      rtol=1e-5, atol=1e-9)


def _recording_projector(log):
  """The SVD projector, recording each refresh's (leaf shape, key data,
  params, group) from its RefreshContext."""
  base = projectors.svd()

  def refresh(ctx, g, basis):
    jax.debug.callback(
        lambda k, w, grp, shape=g.shape: log.append(
            (shape, np.asarray(k).tolist(), np.asarray(w), int(grp))),
        jax.random.key_data(ctx.key), ctx.params, ctx.group, ordered=False)
    return base.refresh(ctx, g, basis)

  return base._replace(refresh=refresh)


def test_groups_share_key_and_refresh_steps_and_context_carries_params():
  params = {"q": jax.random.normal(jax.random.key(3), (24, 16)),
            "k": jnp.ones((24, 16)), "up": jnp.ones((20, 12))}
  log = []
  group = lambda name: "attn" if name in ("q", "k") else name
  tx = ol.lowrank_project(optax.scale_by_adam(), rank=4, update_proj_gap=4,
                          stagger=True, group_fn=group,
                          projector=_recording_projector(log))
  state = tx.init(params)
  for t in range(6):
    _, state = tx.update(_grads(t, params), state, params)
  jax.effects_barrier()
  by_shape = {}
  for shape, key, w, grp in log:
    by_shape.setdefault(shape, []).append((key, grp, w))
  # Step 0: all three refresh; then "attn" (group 0, offset 0) at step 4 and
  # "up" (group 1 of 2, offset 2) at step 2: q and k share every key.
  attn = [e for e in log if e[0] == (24, 16)]
  assert len(attn) == 4 and len(by_shape[(20, 12)]) == 2
  keys = sorted({tuple(e[1]) for e in attn})
  assert len(keys) == 2  # one key per refresh, the same for q and k
  assert {e[3] for e in attn} == {0} and {e[1] for e in by_shape[(20, 12)]} == {1}
  # The context's params are the leaf's own parameters, in g's layout.
  assert any(np.array_equal(e[2], np.asarray(params["q"])) for e in attn)
  # Without groups every leaf draws its own key.
  log.clear()
  solo = ol.lowrank_project(optax.scale_by_adam(), rank=4,
                            projector=_recording_projector(log))
  solo.update(_grads(0, params), solo.init(params), params)
  jax.effects_barrier()
  assert len({tuple(e[1]) for e in log}) == 3


def test_warns_when_the_inner_optimizer_is_stateless():
  """chain(lowrank_project(identity), adam) projects nothing worth saving."""
  params = {"w": jnp.ones((64, 32))}
  tx = optax.chain(ol.lowrank_project(optax.identity(), rank=8), optax.adam(1e-3))
  with pytest.warns(UserWarning, match="inner transform keeps no per-parameter state"):
    state = tx.init(params)
  assert sum(x.size for x in jax.tree.leaves(state)) > 2 * 64 * 32  # the trap
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    ol.lowrank_project(optax.scale_by_adam(), rank=8).init(params)


def test_proj_type_with_a_projector_instance_is_an_error():
  with pytest.raises(ValueError, match="`proj_type`.*Projector instance"):
    ol.lowrank_project(optax.scale_by_adam(), rank=4, proj_type="left",
                       projector=projectors.random())


def test_update_names_a_leaf_whose_shape_changed_since_init():
  tx = ol.lowrank_project(optax.scale_by_adam(), rank=4)
  state = tx.init({"w": jnp.ones((24, 16))})
  with pytest.raises(ValueError, match=r"Leaf \['w'\] of shape \(24, 20\)"):
    tx.update({"w": jnp.ones((24, 20))}, state)
