"""Parity of ``galore`` / ``lowrank_project`` with an independent float64 NumPy GaLore-AdamW.

The reference below is written from the documented semantics only (galore-torch's
``GaLoreAdamW`` with optax's eps placement and ``add_decayed_weights``), not from the
library's implementation. Both implementations are fed the same deterministic gradient
sequence; the updates are compared leaf by leaf at every step.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_lowrank
from optax_lowrank import DimensionNumbers

STEPS, GAP, RANK, SCALE, LR, EPS = 36, 12, 6, 0.25, 1e-2, 1e-6
TOL32, TOL_BF16 = 1e-5, 2e-2
# ``full`` on the two steps after its moments restart from the ill-posed diagonal R (see
# run_parity): the float32 rounding noise of that step still weighs on small entries.
TOL_AFTER_FRESH = 2e-3
# (in, out) kernels: G = grad.T is (40, 24) m>n, (24, 40) m<n, (32, 32) m=n; plus a bias.
SHAPES = {"a": (24, 40), "b": (40, 24), "c": (32, 32), "bias": (40,)}
STACKED = {"w": (3, 24, 40), "bias": (24,)}
STACKED_DN = {"w": DimensionNumbers(reduction_axes=1, output_axes=2), "bias": None}


# ----------------------------------------------------------------------------- reference


@functools.lru_cache(maxsize=None)
def f32_bias_correction(decay, steps=256):
  """``1 - decay**k`` for k = 1..steps, as optax's float32 Adam computes it.

  ``optax.scale_by_adam`` evaluates this scalar in float32, where ``1 - 0.999**k`` loses
  ~5 digits to cancellation (relative error up to ~2e-5 at small ``k``, ~1e-5 on the
  update after the square root). That is optax's own float32 rounding, present in plain
  ``optax.adam`` too, not something the library under test controls, so the reference
  takes these two scalars from float32 and does everything else in float64.
  """
  f = jax.jit(lambda d, c: 1 - d ** c)
  out = f(jnp.float32(decay), jnp.arange(1, steps + 1, dtype=jnp.int32))
  return tuple(float(x) for x in np.asarray(out))


def _axes(a):
  return (a,) if isinstance(a, int) else tuple(a)


class RefGaLore:
  """float64 GaLore-AdamW. ``lr=None`` returns the direction before ``-lr`` (as
  ``lowrank_project(scale_by_adam)``); otherwise ``-lr (U + wd W)``.

  ``sign``: ``maxabs`` is the documented convention (largest-magnitude entry of each
  left singular vector positive); ``first`` (first entry positive) is a wrong one, for
  the negative control. ``f32_bc=False`` uses exact bias corrections (see
  ``f32_bias_correction``; the float32 library path then differs by ~1e-5).
  """

  def __init__(self, shapes, rank, *, gap=GAP, scale=SCALE, proj_type="std", b1=0.9,
               b2=0.999, eps=EPS, lr=None, wd=0.0, on_refresh="keep", dims=None,
               sign="maxabs", f32_bc=True):
    self.gap, self.scale, self.proj_type = gap, scale, proj_type
    self.b1, self.b2, self.eps, self.lr, self.wd = b1, b2, eps, lr, wd
    self.on_refresh, self.sign, self.t = on_refresh, sign, 0
    if f32_bc:
      self.bc = lambda b, k: f32_bias_correction(b)[k - 1]
    else:
      self.bc = lambda b, k: 1 - b ** k
    self.leaf = {}
    for k, shape in shapes.items():
      dn = (dims or {}).get(k)
      if dn is None and len(shape) == 2:
        dn = DimensionNumbers(0, 1)
      info = {"projected": False}
      if dn is not None:
        red, out = _axes(dn.reduction_axes), _axes(dn.output_axes)
        batch = tuple(i for i in range(len(shape)) if i not in red + out)
        perm = batch + out + red
        m = int(np.prod([shape[i] for i in out]))
        n = int(np.prod([shape[i] for i in red]))
        r = rank if isinstance(rank, int) else int(round(rank * min(m, n)))
        if min(m, n) > r:
          info = dict(projected=True, perm=perm, m=m, n=n, r=r, bases=None)
      self.leaf[k] = info
      self.leaf[k]["mu"] = self.leaf[k]["nu"] = 0.0

  # --- matrix view of a leaf: (B, m, n), rows = output axes, columns = reduction axes.
  @staticmethod
  def to_mats(x, info):
    y = np.transpose(x, info["perm"])
    return y.reshape((-1, info["m"], info["n"]))

  @staticmethod
  def from_mats(y, info, shape):
    permuted = tuple(shape[i] for i in info["perm"])
    return np.transpose(y.reshape(permuted), np.argsort(info["perm"]))

  # --- SVD basis and its down / up maps.
  def basis(self, G, r):
    U, _, Vh = np.linalg.svd(G, full_matrices=False)
    cols = np.arange(U.shape[1])
    rows = np.argmax(np.abs(U), axis=0) if self.sign == "maxabs" else 0
    s = np.sign(U[rows, cols])
    U, Vh = U * s, Vh * s[:, None]
    m, n = G.shape
    side = {"std": "right" if m >= n else "left",
            "reverse_std": "left" if m >= n else "right"}.get(self.proj_type, self.proj_type)
    return side, U[:, :r], Vh[:r]

  @staticmethod
  def down(b, X):
    side, A, B = b
    return {"right": lambda: X @ B.T, "left": lambda: A.T @ X,
            "full": lambda: A.T @ X @ B.T}[side]()

  @staticmethod
  def up(b, N):
    side, A, B = b
    return {"right": lambda: N @ B, "left": lambda: A @ N, "full": lambda: A @ N @ B}[side]()

  def diag_coords(self, key, x):
    """Diagonal of a (``full``) leaf update in the current basis: ``diag(Aᵀ U Bᵀ)``."""
    L = self.leaf[key]
    return np.stack([np.diagonal(self.down(b, Xi))
                     for b, Xi in zip(L["bases"], self.to_mats(x, L))])

  def step(self, grads, params=None):
    t, k = self.t, self.t + 1
    refresh = t % self.gap == 0
    out = {}
    for key, g in grads.items():
      g = np.asarray(g, np.float64)
      L = self.leaf[key]
      if L["projected"]:
        G = self.to_mats(g, L)
        if refresh:
          new = [self.basis(Gi, L["r"]) for Gi in G]
          if t > 0 and self.on_refresh == "reset":
            L["mu"] = L["nu"] = 0.0
          elif t > 0 and self.on_refresh == "rotate":
            L["mu"] = np.stack([self.down(bn, self.up(bo, mi))
                                for bn, bo, mi in zip(new, L["bases"], L["mu"])])
          L["bases"] = new
        R = np.stack([self.down(b, Gi) for b, Gi in zip(L["bases"], G)])
      else:
        R = g
      L["mu"] = self.b1 * L["mu"] + (1 - self.b1) * R
      L["nu"] = self.b2 * L["nu"] + (1 - self.b2) * R * R
      mhat = L["mu"] / self.bc(self.b1, k)
      vhat = L["nu"] / self.bc(self.b2, k)
      N = mhat / (np.sqrt(vhat) + self.eps)
      if L["projected"]:
        U = self.scale * np.stack([self.up(b, Ni) for b, Ni in zip(L["bases"], N)])
        U = self.from_mats(U, L, g.shape)
      else:
        U = N
      if self.lr is not None:
        U = -self.lr * (U + self.wd * np.asarray(params[key], np.float64))
      out[key] = U
    self.t += 1
    return out


# ----------------------------------------------------------------------------- gradients


def make_grads(shapes, kind, steps, seed=0):
  """Deterministic gradient sequence (leaf layout, float64).

  Every 2-D slice is ``Qx diag(s) Qyᵀ + 0.02 · noise`` with orthonormal ``Qx, Qy`` and
  well-separated singular values ``s = 8 · 0.7^i`` (i < 8). ``smooth``: the factors rotate
  smoothly with ``t`` (a slowly drifting subspace, as in training); ``independent``: fresh
  Gaussian factors every step (the subspace jumps at every step).

  Why not i.i.d. N(0, 1) matrices: their singular values nearly collide (a gap of 0.04
  at 7.5 in a 24 × 40 draw), so any float32 SVD gives the individual singular vectors to
  only ~1e-5 (measured: scipy's sgesdd 7e-6, ``jnp.linalg.svd`` 1.4e-5) and the update
  can't be compared at 1e-5. NumPy's float32 SVD computes in float64 and hides this.
  """
  rs = np.random.RandomState(seed)
  s = 8.0 * 0.7 ** np.arange(8)
  qr = lambda x: np.linalg.qr(x)[0]
  fac = {}
  for k, shape in shapes.items():
    lead, mat = shape[:-2], shape[-2:]
    fac[k] = [rs.randn(*shape) for _ in range(2)] if len(shape) == 1 else [
        rs.randn(*lead, d, 8) for d in mat for _ in range(2)]
  seq = []
  for t in range(steps):
    c, sn = np.cos(0.05 * t), np.sin(0.05 * t)
    g = {}
    for k, shape in shapes.items():
      if kind == "smooth":
        f = [c * f0 + sn * f1 for f0, f1 in zip(fac[k][::2], fac[k][1::2])]
      else:
        f = [rs.randn(*x.shape) for x in fac[k][::2]]
      if len(shape) == 1:
        g[k] = f[0] + 0.1 * rs.randn(*shape)
      else:
        g[k] = (qr(f[0]) * s) @ np.swapaxes(qr(f[1]), -1, -2) + 0.02 * rs.randn(*shape)
    seq.append(g)
  return seq


# ----------------------------------------------------------------------------- driver


@functools.lru_cache(maxsize=None)
def _galore(proj_type="std", wd=0.0, rank=RANK, gap=GAP, stacked=False, on_refresh=None):
  """Cached (tx, jitted update) so that identical configurations compile once."""
  if on_refresh is not None:
    tx = optax_lowrank.lowrank_project(
        optax.scale_by_adam(eps=EPS), rank, update_proj_gap=gap, scale=SCALE,
        proj_type=proj_type, on_refresh=on_refresh)
  else:
    tx = optax_lowrank.galore(
        LR, rank, update_proj_gap=gap, scale=SCALE, proj_type=proj_type, b1=0.9,
        b2=0.999, eps=EPS, weight_decay=wd,
        dimension_numbers=STACKED_DN if stacked else None)
  return tx, jax.jit(tx.update)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def run_parity(tx_fn, ref, shapes, grads, dtype=jnp.float32, seed=1):
  """Feeds ``grads`` to both; returns each leaf's max over steps of the relative error.

  ``full`` right after its moments start from zero (step 0, and refreshes under
  ``reset``): ``R = Aᵀ G Bᵀ = diag(S)`` exactly, so its off-diagonal entries are pure
  rounding noise δ (~1e-6 in float32, ~1e-15 in float64) that Adam's first step,
  ``R / (|R| + eps)``, normalizes to O(1): the update there is ill-posed below float64
  (50-100% off the exact one). On that step only its well-posed part is compared, the
  diagonal of the update in the reference's coordinates, ``diag(Aᵀ U Bᵀ)``. On the
  next two steps δ still weighs on the moments of entries whose new gradient is small
  (measured up to 4.5e-4, then up to 1.5e-5, decaying to 1e-6 by the third step), so
  they are checked at ``TOL_AFTER_FRESH``; later steps at the caller's tolerance.
  Returns each leaf's max error over the steps checked at the caller's tolerance.
  """
  tx, update = tx_fn
  rs = np.random.RandomState(seed)
  params = {k: jnp.asarray(rs.randn(*s), dtype) for k, s in shapes.items()}
  state = tx.init(params)
  errs = {k: 0.0 for k in shapes}
  fresh = lambda t: t == 0 or (ref.on_refresh == "reset" and t > 0 and t % ref.gap == 0)
  for t, g in enumerate(grads):
    g = {k: jnp.asarray(v, dtype) for k, v in g.items()}
    upd, state = update(g, state, params)
    # The reference sees exactly the (rounded) gradients and parameters the library saw.
    want = ref.step({k: np.asarray(v.astype(jnp.float32)) for k, v in g.items()},
                    {k: np.asarray(v.astype(jnp.float32)) for k, v in params.items()})
    for k in shapes:
      assert upd[k].dtype == dtype and upd[k].shape == shapes[k]
      got = np.asarray(upd[k].astype(jnp.float32), np.float64)
      if ref.proj_type == "full" and ref.leaf[k]["projected"]:
        if fresh(t):
          got, want[k] = ref.diag_coords(k, got), ref.diag_coords(k, want[k])
        elif fresh(t - 1) or fresh(t - 2):
          assert _rel(got, want[k]) <= TOL_AFTER_FRESH, (t, k, _rel(got, want[k]))
          continue
      errs[k] = max(errs[k], _rel(got, want[k]))
    params = optax.apply_updates(params, upd)
  return errs


# ----------------------------------------------------------------------------- tests

CASES = [(p, kind, 0.0) for p in ("std", "reverse_std", "left", "right")
         for kind in ("smooth", "independent")]
# ``full`` with smooth gradients is ill-conditioned in float32: right after a refresh the
# off-diagonal of R is small (~noise), its float32 rounding error is ~1e-4 relative, and
# Adam's per-entry normalization carries that into the update; so ``independent`` only.
CASES += [("full", "independent", 0.0), ("std", "smooth", 0.1), ("full", "independent", 0.1)]


@pytest.mark.parametrize("proj_type,kind,wd", CASES)
def test_galore_matches_reference(proj_type, kind, wd):
  ref = RefGaLore(SHAPES, RANK, proj_type=proj_type, lr=LR, wd=wd)
  errs = run_parity(_galore(proj_type, wd), ref, SHAPES, make_grads(SHAPES, kind, STEPS))
  assert max(errs.values()) <= TOL32, errs


@pytest.mark.parametrize("kind", ["smooth", "independent"])
def test_galore_stacked_batch_axis(kind):
  ref = RefGaLore(STACKED, RANK, lr=LR, wd=0.1, dims=STACKED_DN)
  errs = run_parity(_galore(wd=0.1, stacked=True), ref, STACKED,
                    make_grads(STACKED, kind, STEPS, seed=3))
  assert max(errs.values()) <= TOL32, errs


@pytest.mark.parametrize("on_refresh", ["keep", "reset", "rotate"])
@pytest.mark.parametrize("proj_type,kind", [("std", "smooth"), ("left", "independent"),
                                            ("full", "independent")])
def test_lowrank_project_on_refresh(on_refresh, proj_type, kind):
  ref = RefGaLore(SHAPES, RANK, proj_type=proj_type, on_refresh=on_refresh)
  errs = run_parity(_galore(proj_type, on_refresh=on_refresh), ref, SHAPES,
                    make_grads(SHAPES, kind, STEPS, seed=5))
  assert max(errs.values()) <= TOL32, errs


@pytest.mark.parametrize("wrong", [dict(on_refresh="reset"), dict(on_refresh="rotate"),
                                   dict(sign="first")])
def test_reference_discriminates(wrong):
  """Negative control: a reference with other refresh or sign semantics must disagree
  with the library, so the parity tests do check the moments kept across refreshes and
  the sign convention (a different convention changes R's signs between refreshes)."""
  ref = RefGaLore(SHAPES, RANK, **wrong)
  errs = run_parity(_galore("std", on_refresh="keep"), ref, SHAPES,
                    make_grads(SHAPES, "independent", STEPS, seed=5))
  assert min(errs[k] for k in ("a", "b", "c")) > 1e-2, errs


def test_galore_bf16():
  shapes = {"a": (24, 40), "b": (40, 24), "bias": (40,)}
  ref = RefGaLore(shapes, RANK, gap=5, lr=LR, wd=0.1)
  errs = run_parity(_galore(wd=0.1, gap=5), ref, shapes,
                    make_grads(shapes, "smooth", 10, seed=7), dtype=jnp.bfloat16)
  assert max(errs.values()) <= TOL_BF16, errs


def test_rank_fraction():
  # 0.25 of the smaller side: 6, 6, 8 and 4.
  shapes = {"a": (24, 40), "b": (40, 24), "c": (32, 32), "d": (48, 16), "bias": (40,)}
  ref = RefGaLore(shapes, 0.25, lr=LR)
  errs = run_parity(_galore(rank=0.25), ref, shapes,
                    make_grads(shapes, "independent", 24, seed=9))
  assert [ref.leaf[k].get("r") for k in shapes] == [6, 6, 8, 4, None]
  assert max(errs.values()) <= TOL32, errs
  # Where 0.25 · min(m, n) == 6 for every leaf, the float and the int give the same updates.
  two = {k: shapes[k] for k in ("a", "b", "bias")}
  params = {k: jnp.asarray(np.random.RandomState(0).randn(*s), jnp.float32)
            for k, s in two.items()}
  (tf, uf), (ti, ui) = _galore(rank=0.25), _galore(rank=RANK)
  sf, si = tf.init(params), ti.init(params)
  for g in make_grads(two, "smooth", 14, seed=11):
    g = {k: jnp.asarray(v, jnp.float32) for k, v in g.items()}
    a, sf = uf(g, sf, params)
    b, si = ui(g, si, params)
    for k in two:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-9)
