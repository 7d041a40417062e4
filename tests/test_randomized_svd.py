"""The randomized-SVD projector: subspace quality, float64 parity, use, sharding.

Matrices with known spectra are built in float64 as ``U diag(s) Vᵀ`` with random
orthogonal ``U``, ``V``; quality is measured by principal angles to the true top-``r``
singular subspace. The float64 reference below re-implements the documented algorithm
(range finder, shifted CholeskyQR2, ``eigh`` of ``B Bᵀ``, sign rule) from the same
Gaussian draws. On 8 simulated devices the compiled update must not move a whole
gradient matrix between devices, which the exact SVD projector does.
"""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import optax_lowrank as ol
from optax_lowrank.projectors.base import RefreshContext
from optax_lowrank.projectors.randomized_svd import SHIFT, randomized_svd
from optax_lowrank.projectors.svd import LeftBasis, RightBasis, svd
from tests import hlo, sharded

RANK = 8
EPS32 = 2.0 ** -24


def _orthogonal(rng, n, k):
  q, r = np.linalg.qr(rng.standard_normal((n, k)))
  return q * np.sign(np.diag(r))


def _known(seed, m, n, s):
  """``G = U diag(s) Vᵀ`` (``m × n``, float64) with random orthogonal ``U``, ``V``."""
  rng = np.random.default_rng(seed)
  s = np.asarray(s, np.float64)
  u, v = _orthogonal(rng, m, len(s)), _orthogonal(rng, n, len(s))
  return (u * s) @ v.T, u, v


def _cosines(a, b):
  """Cosines of the principal angles between the spans of two orthonormal bases.

  The singular values of ``aᵀ b`` (no re-orthonormalization: a basis short of
  orthonormal shows as smaller cosines).
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.svd(a.T @ b, compute_uv=False)


def _grads(seed, shapes_):
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes_.items()}


FAST = 0.7 ** np.arange(64)             # geometric decay
SLOW = 1.0 / np.sqrt(1.0 + np.arange(64))  # slow decay, heavy tail


# --------------------------------------------------------------------- float64 reference


def _ref_cqr2(y):
  for _ in range(2):
    gram = y.T @ y
    k = gram.shape[0]
    shift = SHIFT * k * EPS32 * np.max(np.diag(gram))
    y = y @ np.linalg.inv(np.linalg.cholesky(gram + shift * np.eye(k))).T
  return y


def _ref_first_maxabs_sign(x):
  idx = np.argmax(np.abs(x), axis=0)
  return np.where(x[idx, np.arange(x.shape[1])] < 0, -1.0, 1.0)


def reference_basis(g, rank, draw, *, power_iters, oversample, side, prev=None):
  """float64 basis for one matrix ``g`` (parameter layout ``(n, m)``).

  ``draw``: the projector's Gaussian block, ``(q, k)`` for a cold start or ``(p, k)``
  with ``prev`` (``(p, r)``, the previous basis) for a warm one. Returns ``vh``
  ``(r, n)`` for ``side="right"`` or ``u`` ``(m, r)`` for ``side="left"``.
  """
  a = np.asarray(g, np.float64)
  a = a if side == "right" else a.T      # the subspace is a's left one, (p, q)
  a = a / np.abs(a).max()
  p, q = a.shape
  k = min(rank + oversample, p, q)
  draw = np.asarray(draw, np.float64)
  if prev is None:
    omega = draw
  else:
    start = draw if not np.any(prev) else np.concatenate([prev, draw[:, rank:]], 1)
    omega = a.T @ start
  y = _ref_cqr2(a @ omega)
  for _ in range(power_iters):
    y = _ref_cqr2(a @ _ref_cqr2(a.T @ y))
  b = y.T @ a
  _, w = np.linalg.eigh(b @ b.T)
  w = w[:, ::-1][:, :rank]
  basis, image = y @ w, b.T @ w
  basis = basis / np.linalg.norm(basis, axis=0)
  basis = basis * _ref_first_maxabs_sign(image if side == "right" else basis)
  return basis.T if side == "right" else basis


# ----------------------------------------------------------------------- subspace quality


@pytest.fixture(scope="module")
def refreshes():
  """Jitted refreshes on one (96 × 64) matrix: std gives a right basis (8, 64)."""
  info = ol.shapes.MatrixInfo((), 96, 64, RANK, None)
  out = {}
  for name, proj in (("q2", randomized_svd()), ("q0", randomized_svd(power_iters=0)),
                     ("exact", svd())):
    out[name] = (jax.jit(proj.refresh), proj.init(info, jnp.float32))
  return out


def _refresh(refreshes, name, big_g, key=0):
  fn, basis0 = refreshes[name]
  return fn(RefreshContext(0, jax.random.key(key)), jnp.asarray(big_g.T, jnp.float32),
            basis0)


def test_fast_decay_matches_exact_svd(refreshes):
  big_g, _, v = _known(0, 96, 64, FAST)
  basis = _refresh(refreshes, "q2", big_g)
  exact = _refresh(refreshes, "exact", big_g)
  assert isinstance(basis, RightBasis) and basis.vh.shape == (RANK, 64)
  vh = np.asarray(basis.vh, np.float64)
  cos = _cosines(vh.T, v[:, :RANK])
  assert cos.min() >= 0.999, cos
  assert cos.min() >= 1 - 1e-5, cos  # measured 1 - 1.4e-7
  np.testing.assert_allclose(vh @ vh.T, np.eye(RANK), atol=1e-5)
  # Same vectors, same signs as the exact SVD projector (float32 jnp.linalg.svd).
  np.testing.assert_allclose(vh, np.asarray(exact.vh), atol=1e-5)
  assert _cosines(np.asarray(exact.vh).T, v[:, :RANK]).min() >= 1 - 1e-5


def test_power_iterations_matter_on_slow_decay(refreshes):
  big_g, _, v = _known(1, 96, 64, SLOW)
  cos = {name: _cosines(np.asarray(_refresh(refreshes, name, big_g).vh).T,
                        v[:, :RANK]).min() for name in ("q0", "q2", "exact")}
  # Measured: q=0 0.38, q=2 0.96, exact 1 - 1e-12.
  assert cos["exact"] >= 1 - 1e-5, cos
  assert cos["q2"] >= 0.94, cos
  assert cos["q0"] <= 0.7, cos
  assert cos["q2"] - cos["q0"] >= 0.3, cos


def test_matches_float64_reference(refreshes):
  """The right basis of the refresh above equals the float64 re-implementation."""
  for seed, spectrum in ((0, FAST), (1, SLOW)):
    big_g, _, _ = _known(seed, 96, 64, spectrum)
    for name, power_iters in (("q2", 2), ("q0", 0)):
      got = np.asarray(_refresh(refreshes, name, big_g, key=seed).vh)
      draw = jax.random.normal(jax.random.key(seed), (96, RANK + 8), jnp.float32)
      want = reference_basis(big_g.T, RANK, draw, power_iters=power_iters,
                             oversample=8, side="right")
      np.testing.assert_allclose(got, want, atol=1e-4, err_msg=f"{seed} {name}")


def test_stacked_left_warm_start_matches_float64_reference():
  """A stack of 3 matrices, left basis, cold then warm refreshes vs float64."""
  batch, n, m, rank, oversample = 3, 48, 80, 6, 5
  spectra = (FAST[:48], SLOW[:48], 0.5 ** np.arange(48))
  mats = [_known(10 + i, m, n, s)[0] for i, s in enumerate(spectra)]  # G: (m, n)
  g1 = np.stack([x.T for x in mats])                                    # (3, n, m)
  rng = np.random.default_rng(3)
  g2 = g1 + 0.05 * rng.standard_normal(g1.shape) * np.abs(g1).max()
  proj = randomized_svd("left", power_iters=1, oversample=oversample, warm_start=True)
  info = ol.shapes.MatrixInfo((batch,), m, n, rank, None)
  basis = proj.init(info, jnp.float32)
  assert isinstance(basis, LeftBasis) and basis.u.shape == (batch, m, rank)
  refresh = jax.jit(proj.refresh)
  k = rank + oversample
  keys = jax.random.key(7), jax.random.key(8)

  first = refresh(RefreshContext(0, keys[0]), jnp.asarray(g1, jnp.float32), basis)
  # Matrix 1 keeps an all-zero basis (as after a non-finite gradient): it starts cold.
  prev = first.u.at[1].set(0.0)
  second = refresh(RefreshContext(200, keys[1]), jnp.asarray(g2, jnp.float32),
                   LeftBasis(prev))

  for got, g, key, prior in ((first, g1, keys[0], np.zeros((batch, m, rank))),
                             (second, g2, keys[1], np.asarray(prev, np.float64))):
    draws = np.asarray(jax.random.normal(key, (batch, m, k), jnp.float32))
    for i in range(batch):
      want = reference_basis(g[i], rank, draws[i], power_iters=1, oversample=oversample,
                             side="left", prev=prior[i])
      u = np.asarray(got.u[i], np.float64)
      np.testing.assert_allclose(u, want, atol=1e-4)
      # svd's sign rule: each left vector's largest-magnitude entry is positive.
      assert np.all(u[np.argmax(np.abs(u), 0), np.arange(rank)] > 0)
  # Warm-started bases track the top subspace of the new gradient.
  for i in range(batch):
    true_u = np.linalg.svd(g2[i].T)[0][:, :rank]
    assert _cosines(np.asarray(second.u[i]), true_u).min() >= 0.9

  # Degenerate gradients (same compiled refresh): a zero matrix gives a zero basis, a
  # rank-1 matrix of huge entries one unit vector and zeros; nothing is non-finite.
  g3 = np.stack([np.zeros((n, m)), 1e30 * np.outer(np.arange(n), np.ones(m)), g1[2]])
  third = refresh(RefreshContext(400, keys[0]), jnp.asarray(g3, jnp.float32), second)
  norms = np.linalg.norm(np.asarray(third.u), axis=1)          # (batch, rank)
  np.testing.assert_allclose(norms[0], 0.0, atol=1e-6)
  np.testing.assert_allclose(norms[1], [1.0] + [0.0] * (rank - 1), atol=1e-5)
  np.testing.assert_allclose(norms[2], 1.0, atol=1e-5)


# ------------------------------------------------------------------- use in optimizers


def test_lowrank_project_stacked_rotate_bf16():
  params = {"s": jnp.zeros((3, 48, 80)), "b": jnp.zeros(80)}
  dims = {"s": ol.DimensionNumbers(1, 2), "b": None}
  tx = ol.lowrank_project(
      optax.scale_by_adam(), rank=RANK, update_proj_gap=2, on_refresh="rotate",
      dimension_numbers=dims,
      projector=randomized_svd(warm_start=True, basis_dtype=jnp.bfloat16))
  state = jax.jit(tx.init)(params)
  types = jax.tree.map(jax.typeof, state)
  basis = state.bases["s"].basis
  assert isinstance(basis, RightBasis)                  # m=80 >= n=48: right
  assert basis.vh.shape == (3, RANK, 48) and basis.vh.dtype == jnp.bfloat16
  update = jax.jit(tx.update)
  for seed in range(4):  # refreshes at steps 0 and 2, the second one warm
    grads = _grads(seed, {k: x.shape for k, x in params.items()})
    updates, state = update(grads, state)
    assert jax.tree.map(jax.typeof, state) == types
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
  vh = np.asarray(state.bases["s"].basis.vh, np.float32)
  for i in range(3):
    np.testing.assert_allclose(vh[i] @ vh[i].T, np.eye(RANK), atol=2e-2)  # bf16


def test_state_memory_is_the_exact_svd_state():
  params = {"w": jax.ShapeDtypeStruct((128, 64), jnp.float32),
            "s": jax.ShapeDtypeStruct((3, 48, 80), jnp.bfloat16)}
  dims = {"w": None, "s": ol.DimensionNumbers(1, 2)}
  exact = ol.galore(1e-3, rank=RANK, dimension_numbers=dims)
  ours = ol.galore(1e-3, rank=RANK, dimension_numbers=dims, projector=randomized_svd())
  assert (jax.tree.map(jax.typeof, jax.eval_shape(ours.init, params))
          == jax.tree.map(jax.typeof, jax.eval_shape(exact.init, params)))
  assert (ol.memory.state_bytes(ours, params).total_bytes
          == ol.memory.state_bytes(exact, params).total_bytes)


# ----------------------------------------------------------------------------- sharding

# One leaf per case, each projected on a different side; shapes are distinct so the
# compiled program's collectives can be told apart. Parameter layout (batch..., n, m).
SHAPES = {"rows": (4, 64, 96), "cols": (128, 64), "both": (3, 48, 80)}
DIMS = {"rows": ol.DimensionNumbers(1, 2), "cols": None,
        "both": ol.DimensionNumbers(1, 2)}
SPECS = {"rows": P("b", "a", None),   # stacked right basis, sharded along layers and n
         "cols": P(None, "a"),        # left basis, sharded along m (the projected side)
         "both": P(None, "a", "b")}   # stacked right basis, sharded along n and m
def test_sharded_updates_match_and_gather_nothing(mesh):
  tx = ol.galore(1e-3, rank=RANK, update_proj_gap=2, dimension_numbers=DIMS,
                 weight_decay=0.01, projector=randomized_svd())
  params, grads = _grads(0, SHAPES), [_grads(s, SHAPES) for s in (1, 2, 3)]
  expected, compiled = sharded.assert_sharded_matches(tx, params, grads, mesh, SPECS,
                                                      rtol=1e-4)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(expected))

  collectives = hlo.collectives(compiled.as_text())
  assert any(op == "all-reduce" for op, _ in collectives)  # the parser sees them
  full = {s[-2:] for s in SHAPES.values()} | {s[-2:][::-1] for s in SHAPES.values()}
  gathers = [s for op, s in collectives if op == "all-gather"]
  assert not [s for s in gathers if s[-2:] in full], gathers
  assert not hlo.whole_matrices(collectives, SHAPES), collectives


def test_exact_svd_gathers_the_whole_matrix(mesh):
  """The negative control: the same check fails for the exact SVD projector."""
  shapes_ = {k: SHAPES[k] for k in ("cols", "both")}
  tx = ol.galore(1e-3, rank=RANK, dimension_numbers={k: DIMS[k] for k in shapes_},
                 projector=svd())
  with jax.set_mesh(mesh):
    sp = {k: jax.device_put(jnp.ones(s), NamedSharding(mesh, SPECS[k]))
          for k, s in shapes_.items()}
    state = jax.jit(tx.init)(sp)
    text = jax.jit(tx.update).lower(sp, state, sp).compile().as_text()
  collectives = hlo.collectives(text)
  for shape in shapes_.values():
    assert ("all-gather", shape) in collectives, collectives
  assert hlo.whole_matrices(collectives, shapes_)


# -------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs, name", [
    (dict(proj_type="full"), "proj_type"),
    (dict(proj_type="smaller"), "proj_type"),
    (dict(power_iters=-1), "power_iters"),
    (dict(power_iters=1.5), "power_iters"),
    (dict(power_iters=True), "power_iters"),
    (dict(oversample=-2), "oversample"),
    (dict(oversample="8"), "oversample"),
    (dict(warm_start=1), "warm_start"),
    (dict(basis_dtype=jnp.int8), "basis_dtype"),
    (dict(basis_dtype="not a dtype"), "basis_dtype"),
])
def test_bad_arguments(kwargs, name):
  with pytest.raises(ValueError, match=f"`{name}`"):
    randomized_svd(**kwargs)
