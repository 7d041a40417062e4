"""COAP (``projectors.coap``, ``optax_lowrank.coap``) against float64 NumPy references.

``tests/reference/coap.py`` was written from the authors' torch code (bytedance/coap)
and cross-checked against it run in float64; its basis-loss gradient is analytic and was
checked against torch autograd. Both sides get the same float32 gradients; the updates
are compared at every step, leaf by leaf and layer by layer, by ``‖ours − ref‖ /
‖ref‖``. Orientation: library kernels are ``(in, out)``; the references take torch's
``W (out, in)``, so they get ``grad.T`` and are compared with ``update.T``.

The first basis of each matrix comes from a Gaussian block drawn from the refresh key
(the code seeds a torch generator); the test draws the same block from the same key and
hands it to the reference. A recomputed basis keeps each vector on the side of the one
it replaces (the code leaves the signs to LAPACK, and they matter, since the moments are
kept in the old coordinates): the reference runs with ``basis_signs="previous"``. With ``GAP = 2`` and ``FACTOR = 3`` the basis is found at step
0, corrected by a gradient step at steps 2 and 4, recomputed from itself at 6, and so on:
24 steps hold 4 range finds and 8 corrections.

Run with ``-s`` to see each case's worst error.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_lowrank as ol
from optax_lowrank import DimensionNumbers, projectors, schedules
from optax_lowrank.projectors.coap import (
    correction_loss_and_grad, correction_step, fill_dead_columns,
    keep_if_moment_not_finite)
from tests import hlo, sharded
from tests.gradients import drifting_low_rank
from tests.reference import coap as ref

STEPS, GAP, FACTOR, RANK, LR, WD, TOL = 24, 2, 3, 3, 1e-2, 0.1, 1e-5
B1, B2, EPS, SCALE = 0.9, 0.999, 1e-6, 0.25
# (in, out) kernels: G = grad.T is (24, 10) (m > n, right basis) for "a" and (10, 24)
# (m < n, left basis) for "b"; a bias, never projected (HF AdamW in the reference).
SHAPES = {"a": (10, 24), "b": (24, 10), "bias": (24,)}
# Stacked: "w" is 2 × G (24, 10) (right), "v" is 2 × G (10, 24) (left).
STACKED = {"w": (2, 10, 24), "v": (2, 24, 10), "bias": (10,)}
STACKED_DN = {"w": DimensionNumbers(1, 2), "v": DimensionNumbers(1, 2), "bias": None}
SCHEDULE = optax.linear_schedule(LR, 0.2 * LR, STEPS)


@functools.lru_cache(maxsize=None)
def make_grads(stacked, steps=STEPS, seed=0, shapes=None):
  """Float32 gradients with separated singular values whose factors drift with ``t``.

  Each matrix is ``Qx diag(s) Qyᵀ + 0.05 · noise`` with ``s = 4 · 0.6^i``: the range
  finder's small SVD then has no near-ties (float32 and float64 bases agree to ~1e-6),
  and the drift and noise give the correction step something to follow.
  """
  shapes = dict(shapes) if shapes else STACKED if stacked else SHAPES
  return drifting_low_rank(shapes, steps, seed=seed, top=4.0, decay=0.6, rank=6,
                           rate=0.1, noise=0.05)


def first_omegas(shapes, seed=0):
  """The Gaussian blocks ``coap`` draws at step 0, per projected leaf, in order.

  ``lowrank_project``'s refresh key of projected leaf ``i`` at step 0 is
  ``fold_in(fold_in(key(seed), 0), i)``; the block has the basis's warm-start shape,
  ``Vhᵀ`` ``(batch..., n, r)`` on the right and ``U`` ``(batch..., m, r)`` on the left.
  """
  out, index = {}, 0
  for k, shape in sorted(shapes.items()):  # the parameters' flattening order
    if len(shape) == 1:
      continue
    n, m = shape[-2:]
    side_len = n if m >= n else m
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 0), index)
    out[k] = np.asarray(jax.random.normal(key, shape[:-2] + (side_len, RANK)),
                        np.float64)
    index += 1
  return out


def run_parity(stacked=False, lr=LR, weight_decay=0.0, scale=SCALE, grad_scale=1.0):
  shapes = STACKED if stacked else SHAPES
  tx = ol.coap(lr, RANK, update_proj_gap=GAP, reproject_factor=FACTOR, scale=scale,
               b1=B1, b2=B2, eps=EPS, weight_decay=weight_decay,
               dimension_numbers=STACKED_DN if stacked else None)
  params = {k: jnp.asarray(np.random.RandomState(1).randn(*s), jnp.float32)
            for k, s in shapes.items()}
  state = tx.init(params)
  update = jax.jit(tx.update)
  omegas = first_omegas(shapes)
  ref_lr = (lambda t: float(lr(t - 1))) if callable(lr) else lr
  # One reference per matrix (torch orientation); weight decay of the pre-update weight
  # is the library's documented choice and is added below, so the references run with 0.
  refs = {}
  for k, shape in shapes.items():
    if len(shape) == 1:
      refs[k] = [ref.RefAdamW(ref_lr, (B1, B2), EPS)]
      continue
    layers = shape[0] if len(shape) == 3 else None
    make = lambda om: ref.RefCOAPAdamW(
        RANK, ref_lr, (B1, B2), EPS, update_interval=GAP, reproject_factor=FACTOR,
        scale=scale, initial_omega=om, basis_signs="previous")
    refs[k] = ([make(omegas[k])] if layers is None
               else [make(omegas[k][l]) for l in range(layers)])
  worst = 0.0
  for t, g in enumerate(make_grads(stacked)):
    g = jax.tree.map(lambda x: x * np.float32(grad_scale), g)
    lr_t = float(lr(t)) if callable(lr) else lr
    u, state = update(g, state, params)
    for k, shape in shapes.items():
      got = np.asarray(u[k], np.float64)
      w = np.asarray(params[k], np.float64)
      gk = np.asarray(g[k], np.float64)
      if len(shape) == 1:
        pairs = [(got, w, gk, refs[k][0], lambda x: x)]
      elif len(shape) == 2:
        pairs = [(got, w, gk, refs[k][0], np.transpose)]
      else:
        pairs = [(got[l], w[l], gk[l], refs[k][l], np.transpose)
                 for l in range(shape[0])]
      for got_l, w_l, g_l, r, to_torch in pairs:
        want = r.step(to_torch(w_l), to_torch(g_l)) - to_torch(w_l)
        want = want - lr_t * weight_decay * to_torch(w_l)
        err = np.linalg.norm(to_torch(got_l) - want) / np.linalg.norm(want)
        worst = max(worst, err)
        assert err < TOL, (t, k, err)
    params = optax.apply_updates(params, u)
  return worst


@pytest.mark.parametrize("kind", ["flat", "stacked, schedule, weight decay"])
def test_coap_matches_reference(kind):
  if kind == "flat":
    worst = run_parity()
  else:
    worst = run_parity(stacked=True, lr=SCHEDULE, weight_decay=WD, scale=1.0)
  print(f"coap {kind}: worst relative error {worst:.2e}")


@pytest.mark.parametrize("grad_scale", [1e18, 1e19])
def test_coap_matches_reference_at_huge_gradients(grad_scale):
  """Issue 14: from gradients of ~1e17 the correction's squared gradient norm overflowed
  and the step was NaN (0 · inf), where optax.adamw stays finite. Against the float64
  reference fed the same (scaled) gradients: the same tolerance as at scale 1 (the
  inner Adam squares as (1 − b2)·g·g, representable to |g| ≈ 5.8e20; optax.adamw's
  g² overflows from 1.8e19)."""
  worst = run_parity(grad_scale=grad_scale)
  print(f"coap x{grad_scale:.0e}: worst relative error {worst:.2e}")


def test_correction_step_is_the_clipped_step_and_scale_free():
  """``correction_step`` is the plain clipped step bit for bit at ordinary scales, and a
  gradient and moment multiplied by 2⁷⁰ (~1e21, beyond float32's squares) give the same
  step as by 2¹⁰ (both clipped), bit for bit: the rescaling is by powers of two."""
  rs = np.random.RandomState(7)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  g, mom = f32(rs.randn(2, 12, 30)), f32(rs.randn(2, 3, 30))
  p = f32(np.linalg.qr(rs.randn(2, 12, 3))[0].swapaxes(-1, -2))
  lr, clip = 0.1, 1.0
  _, grad = correction_loss_and_grad(p, mom, g, "right")
  norm = jnp.sqrt(jnp.sum(jnp.square(grad), axis=(-2, -1), keepdims=True))
  plain = p - lr * jnp.minimum(1.0, clip / (norm + 1e-6)) * grad
  np.testing.assert_array_equal(correction_step(p, mom, g, "right", lr, clip), plain)
  small = correction_step(p, mom * 2.0**10, g * 2.0**10, "right", lr, clip)
  huge = correction_step(p, mom * 2.0**70, g * 2.0**70, "right", lr, clip)
  assert np.all(np.isfinite(np.asarray(huge)))
  np.testing.assert_array_equal(huge, small)


def test_reference_events_cover_both_corrections():
  """The schedule under test: range finds at 0, 6, 12, 18; corrections between."""
  r = ref.RefCOAPAdamW(RANK, LR, update_interval=GAP, reproject_factor=FACTOR,
                       initial_omega=first_omegas(SHAPES)["a"])
  events = []
  for g in make_grads(False):
    gk = np.asarray(g["a"], np.float64).T
    r.step(np.zeros_like(gk), gk)
    events.append(r.last_event)
  assert [t for t, e in enumerate(events) if e in ("init", "recompute")] == [0, 6, 12, 18]
  assert [t for t, e in enumerate(events) if e == "sgd"] == [2, 4, 8, 10, 14, 16, 20, 22]


def test_wrong_moment_is_seen():
  """Negative control: a correction fed the wrong moment (zeros) leaves the reference."""
  tx = ol.lowrank_project(optax.scale_by_adam(), RANK, update_proj_gap=1,
                          projector=projectors.coap(reproject_factor=FACTOR))
  grads = make_grads(False)
  state = tx.init(grads[0])
  update = jax.jit(tx.update)
  for g in grads[:2]:
    _, state = update(g, state)
  g = np.asarray(grads[2]["a"], np.float64).T
  p = np.asarray(state.bases["a"].basis.basis.vh, np.float64)
  m = np.asarray(state.inner_state.mu["a"], np.float64).T
  want = ref.coap_update_proj(p, m, g, "right")
  wrong = ref.coap_update_proj(p, np.zeros_like(m), g, "right")
  _, state = update(grads[2], state)
  got = np.asarray(state.bases["a"].basis.basis.vh, np.float64)
  assert np.linalg.norm(got - want) < 1e-5 * np.linalg.norm(want)
  assert np.linalg.norm(got - wrong) > 100 * np.linalg.norm(got - want)


@pytest.mark.parametrize("side", ["right", "left"])
def test_correction_loss_and_gradient_match_float64(side):
  rs = np.random.RandomState(3)
  m, n, r, layers = 12, 7, 3, 2
  g = rs.randn(layers, m, n) if side == "right" else rs.randn(layers, n, m)
  p = rs.randn(layers, r, g.shape[-1]) if side == "right" else rs.randn(
      layers, g.shape[-2], r)
  mom = rs.randn(layers, g.shape[-2], r) if side == "right" else rs.randn(
      layers, r, g.shape[-1])
  # Library layouts: g is Gᵀ, the moment is Mᵀ (down's layout), P as in the reference.
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  loss, grad = correction_loss_and_grad(
      f32(p), f32(np.swapaxes(mom, -1, -2)), f32(np.swapaxes(g, -1, -2)), side)
  for l in range(layers):
    want_loss, want_grad = ref.coap_reconstruction_loss_and_grad(p[l], mom[l], g[l], side)
    assert abs(float(loss[l]) - want_loss) <= 1e-5 * abs(want_loss)
    np.testing.assert_allclose(np.asarray(grad[l]), want_grad, rtol=0,
                               atol=1e-5 * np.abs(want_grad).max())


def test_first_basis_is_the_range_finder_of_the_drawn_block():
  """Step 0: ``compute_orthogonal`` of ``G`` (right) or ``Gᵀ`` (left), signs aside."""
  tx = ol.lowrank_project(optax.scale_by_adam(), RANK,
                          projector=projectors.coap())
  g = make_grads(False)[0]
  _, state = jax.jit(tx.update)(g, tx.init(g))
  omegas = first_omegas(SHAPES)
  for k, side in (("a", "right"), ("b", "left")):
    basis = state.bases[k].basis.basis
    got = np.asarray(basis.vh if side == "right" else basis.u, np.float64)
    want = ref.coap_orthogonal_matrix(np.asarray(g[k], np.float64).T, RANK, side,
                                      omegas[k])
    aligned, _ = ref.align_signs(got, want, side)
    np.testing.assert_allclose(aligned, want, atol=1e-5)


def test_sharded_matches_unsharded_and_gathers_nothing(mesh):
  """Gradients sharded along either matrix axis: same updates and state types, and
  the compiled step moves no whole matrix between devices."""
  from jax.sharding import PartitionSpec as P
  # Layout (L, n, m): "w" has a right basis and n sharded, "v" a left basis and m
  # sharded (the projected sides), "x" a right basis and both axes sharded.
  shapes = {"w": (2, 16, 40), "v": (2, 40, 16), "x": (48, 32), "bias": (16,)}
  specs = {"w": P("b", "a", None), "v": P(None, None, "a"), "x": P("a", "b"),
           "bias": P()}
  # Steps 0 (range find from a drawn block), 2 (basis step) and 4 (range find from
  # the basis).
  # Adam's ε is 1e-3 here, not the default 1e-6, so that `rtol` measures the
  # projector's sharding rather than Adam's first step. That step is R/(|R| + ε')
  # per entry of R = P G, ε' = ε/√(1 − β₂): a smoothed sign, of slope up to 1/ε'.
  # Sharded and unsharded R differ by reduction order, in the bases and in R's own
  # contraction, by a few ulp of Σ|P||G| (~0.5 here: ulp 6e-8). With ε = 1e-6
  # (1/ε' = 3.2e4) an entry of R near 0 turns each such ulp into ~1e-5 of the
  # update's norm: this data has R = 5.9e-5 in "w" at step 0 (slope 3.8e3,
  # ‖R/(|R| + ε')‖ = 15.5: 1.5e-5 per ulp), where the two runs differed by 6e-7
  # (10 ulp, from bases 5.8e-7 apart) and step 0 failed at 1.45e-4 while the later
  # steps agreed to 3e-6. Over 6 first blocks and 2 layouts step 0 ranged from 5e-7
  # to 1.45e-4 with ε = 1e-6. With ε = 1e-3 the slope is at most 32 for any data, a
  # few ulp of R move the update by ~1e-7, and step 0 agrees as the later steps do
  # (measured over the same 12 runs: step 0 ≤ 3.9e-6, later steps ≤ 4.7e-6).
  tx = ol.coap(LR, RANK, update_proj_gap=GAP, reproject_factor=2, eps=1e-3,
               dimension_numbers={**STACKED_DN, "x": None})
  grads = make_grads(True, steps=5, shapes=tuple(shapes.items()))
  params = jax.tree.map(jnp.zeros_like, grads[0])
  _, compiled = sharded.assert_sharded_matches(tx, params, grads, mesh, specs, rtol=1e-4)
  # Range finds and corrections run where the gradient lies: no matrix is gathered.
  found = hlo.collectives(compiled.as_text())
  assert any(op == "all-reduce" for op, _ in found)  # the parser sees them
  matrices = {k: s for k, s in shapes.items() if len(s) > 1}
  assert not hlo.whole_matrices(found, matrices), found


def _two_layer_mlp():
  """A tanh MLP whose second layer starts at zero: the first layer's gradient is
  exactly zero at step 0 (it flows back through the second layer's weights)."""
  rs = np.random.RandomState(0)
  x = jnp.asarray(rs.randn(64, 32), jnp.float32)
  y = jnp.asarray(np.tanh(x @ rs.randn(32, 48) / 6) @ rs.randn(48, 16), jnp.float32)
  params = {"w1": jnp.asarray(rs.randn(32, 48) / np.sqrt(32), jnp.float32),
            "w2": jnp.zeros((48, 16), jnp.float32)}
  loss = lambda p: jnp.mean((jnp.tanh(x @ p["w1"]) @ p["w2"] - y) ** 2)
  return params, loss


def _train(tx, params, loss, steps):
  def step(carry, _):
    p, s = carry
    value, g = jax.value_and_grad(loss)(p)
    u, s = tx.update(g, s, p)
    return (optax.apply_updates(p, u), s), value
  (p, _), losses = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), None,
                                                  steps))(params)
  return p, np.asarray(losses)


def test_a_zero_first_gradient_still_trains_the_layer():
  """Issue 14: the range find of a zero gradient gave a zero basis that every later
  correction and range find kept, so the layer never moved (``‖ΔW1‖ = 0`` where GaLore
  moves it by ~4.8). Dead vectors now get a random orthonormal start; the layer moves
  and the loss falls as much as with GaLore (measured: ‖ΔW1‖ 4.85 vs 4.78, final loss
  7.46 vs 7.35 from 16.1)."""
  params, loss = _two_layer_mlp()
  g0 = jax.grad(loss)(params)["w1"]
  assert not np.any(np.asarray(g0))  # the premise: an exactly zero first gradient
  steps = 200
  kw = dict(rank=4, update_proj_gap=10)
  ours, our_losses = _train(ol.coap(1e-2, reproject_factor=5, **kw), params, loss, steps)
  galore, galore_losses = _train(ol.galore(1e-2, **kw), params, loss, steps)
  moved = float(jnp.linalg.norm(ours["w1"] - params["w1"]))
  galore_moved = float(jnp.linalg.norm(galore["w1"] - params["w1"]))
  assert galore_moved > 1.0, galore_moved
  assert 0.5 * galore_moved < moved < 2.0 * galore_moved, (moved, galore_moved)
  drop, galore_drop = our_losses[0] - our_losses[-1], galore_losses[0] - galore_losses[-1]
  assert drop > 0.75 * galore_drop, (our_losses[[0, -1]], galore_losses[[0, -1]])
  # The first basis (from the zero gradient) is orthonormal, not zero.
  tx = ol.lowrank_project(optax.scale_by_adam(), RANK, projector=projectors.coap())
  grads = {"a": jnp.zeros((10, 24))}
  _, state = jax.jit(tx.update)(grads, tx.init(grads))
  vh = np.asarray(state.bases["a"].basis.basis.vh, np.float64)
  np.testing.assert_allclose(vh @ vh.T, np.eye(RANK), atol=1e-6)


def test_fill_dead_columns_keeps_live_vectors_and_stays_orthonormal():
  """Dead (zero or NaN) columns take the previous basis's column if it is live, else a
  Gaussian one, made orthogonal to the live vectors; live vectors are kept bit for bit."""
  rs = np.random.RandomState(5)
  p, r = 40, 4
  q = np.linalg.qr(rs.randn(p, r))[0].astype(np.float32)
  prev = np.linalg.qr(rs.randn(p, r))[0].astype(np.float32)
  vectors = q.copy()
  vectors[:, 1] = 0.0
  vectors[:, 3] = np.nan
  prev[:, 3] = 0.0  # column 3 has no live predecessor: a Gaussian start
  out = np.asarray(fill_dead_columns(jnp.asarray(vectors), jnp.asarray(prev),
                                     jax.random.key(0)), np.float64)
  np.testing.assert_array_equal(out[:, [0, 2]], q[:, [0, 2]])
  np.testing.assert_allclose(out.T @ out, np.eye(r), atol=1e-6)
  # Column 1 is the previous column 1 with the live directions projected out.
  live = q[:, [0, 2]].astype(np.float64)
  want = prev[:, 1] - live @ (live.T @ prev[:, 1])
  want /= np.linalg.norm(want)
  np.testing.assert_allclose(out[:, 1], want, atol=1e-6)


def test_a_non_finite_first_moment_does_not_poison_the_basis():
  """Issue 14: one NaN gradient leaves Adam's first moment NaN; the next correction
  read it and turned the basis NaN, and every later range find started from it. Now
  the correction keeps the basis of a matrix whose moment is not finite, and the next
  range find (which never reads the moment) equals the float64 reference's warm start
  from that basis."""
  tx = ol.lowrank_project(optax.scale_by_adam(), RANK, update_proj_gap=1,
                          projector=projectors.coap(reproject_factor=FACTOR))
  grads = make_grads(False, steps=5)
  state = tx.init(grads[0])
  update = jax.jit(tx.update)
  vh = lambda s: np.asarray(s.bases["a"].basis.basis.vh, np.float64)
  _, state = update(grads[0], state)                  # step 0: range find
  first = vh(state)
  bad = {**grads[1], "a": grads[1]["a"].at[0, 0].set(jnp.nan)}
  _, state = update(bad, state)                       # skipped: G not finite
  assert np.isnan(np.asarray(state.inner_state.mu["a"])).any()
  _, state = update(grads[2], state)                  # correction, NaN moment
  np.testing.assert_array_equal(vh(state), first)     # kept, not NaN
  _, state = update(grads[3], state)                  # correction again
  np.testing.assert_array_equal(vh(state), first)
  _, state = update(grads[4], state)                  # range find from the basis
  got = vh(state)
  g = np.asarray(grads[4]["a"], np.float64).T
  want = ref.coap_orthogonal_matrix(g, RANK, "right", first.T)
  aligned, _ = ref.align_signs(got, want, "right")
  np.testing.assert_allclose(aligned, want, atol=1e-5)


def test_errors():
  params = {"w": jnp.ones((10, 24))}
  no_moment = ol.lowrank_project(optax.scale_by_rms(), RANK, projector=projectors.coap())
  with pytest.raises(ValueError, match=r"Leaf \['w'\].*first moment"):
    no_moment.init(params)
  for wrap in (lambda p: schedules.lazy(p, 10), lambda p: schedules.adaptive_rank(p),
               lambda p: projectors.granular(p, 2), ol.quantize.quantize_basis):
    with pytest.raises(ValueError, match="reads the inner optimizer's first moment"):
      wrap(projectors.coap())
  with pytest.raises(ValueError, match="granularity"):
    ol.lowrank_project(optax.scale_by_adam(), RANK, projector=projectors.coap(),
                       granularity=2)
  for kwargs, name in ((dict(reproject_factor=0), "reproject_factor"),
                       (dict(proj_type="full"), "proj_type"),
                       (dict(learning_rate=-1.0), "learning_rate"),
                       (dict(max_grad_norm=0.0), "max_grad_norm")):
    with pytest.raises(ValueError, match=f"`{name}`"):
      projectors.coap(**kwargs)
