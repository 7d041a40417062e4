"""Parity of ``apollo``, ``apollo_mini`` and ``fira`` with float64 NumPy references.

The references (``tests/reference/apollo.py``, ``tests/reference/fira.py``) were written
from the authors' torch code, not from this library. Both sides get the same float32
gradient sequence; the updates are compared at every step, leaf by leaf (and layer by
layer for stacked leaves), by the relative error ``‖ours − ref‖ / ‖ref‖``.

Orientation: library kernels are ``(in, out)`` (or ``(L, in, out)`` stacked, with
``DimensionNumbers(reduction_axes=1, output_axes=2)``); the references take torch's
``W (out, in)``, so they get ``grad.T`` and are compared with ``update.T``. APOLLO's random
matrix is read from the library's state after each step (``KeyBasis.matrix()``, the
float32 matrix ``down``/``up`` draw from the key) and handed to the reference, which uses
it only on refresh steps. Fira's SVD is float32 in the library and float64 in the
reference, so the gradients have a clear spectral gap (see ``make_grads``).

Weight decay is a documented difference: the library decays the pre-update weight
(``−lr·(U_bc + wd·W)``, ``optax.add_decayed_weights``), the references the updated one
(``(W − ss·U)(1 − lr·wd)``). The weight-decay cases therefore run the reference with
``weight_decay=0`` and add ``−lr·wd·W`` to it here.

Run with ``-s`` to see each case's worst error.
"""

import dataclasses
import functools
import math
from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_lowrank
from optax_lowrank import DimensionNumbers
from optax_lowrank.projectors.base import RefreshContext
from optax_lowrank.projectors.random import KeyBasis
from tests.gradients import drifting_low_rank
from tests.reference import apollo as ref_apollo
from tests.reference import fira as ref_fira

STEPS, GAP, LR, WD, TOL = 36, 12, 1e-2, 0.1, 1e-5
B1, B2, EPS = 0.9, 0.999, 1e-6
# (in, out) kernels: the references' G = grad.T is (40, 24) m>n, (24, 40) m<n, (32, 32)
# m=n; plus a bias, never projected (HF AdamW in both references).
SHAPES = {"a": (24, 40), "b": (40, 24), "c": (32, 32), "bias": (40,)}
# Stacked layers: "w" is 3 × G (40, 24) (right side), "v" is 3 × G (24, 40) (left side).
STACKED = {"w": (3, 24, 40), "v": (3, 40, 24), "bias": (24,)}
STACKED_DN = {"w": DimensionNumbers(reduction_axes=1, output_axes=2),
              "v": DimensionNumbers(reduction_axes=1, output_axes=2), "bias": None}
SCHEDULE = optax.linear_schedule(LR, 0.2 * LR, STEPS)
ALIASES = {"apollo": optax_lowrank.apollo, "apollo_mini": optax_lowrank.apollo_mini,
           "fira": optax_lowrank.fira}


# ----------------------------------------------------------------------------- gradients


@functools.lru_cache(maxsize=None)
def make_grads(name, steps=STEPS, seed=0):
  """Deterministic float32 gradient sequence for ``SHAPES`` or ``STACKED``.

  Each matrix is ``amp_t · (Qx diag(s) Qyᵀ + 0.02 · noise)``: a rank-8 signal with
  well-separated singular values ``s = 8 · 0.7^i`` whose factors rotate smoothly with
  ``t`` (so Fira's float32 and float64 SVDs agree to ~1e-6; i.i.d. Gaussian matrices have
  near-collisions that cost ~5e-5), and an amplitude ``amp_t = 1 + 0.5 sin(0.4 t)`` that
  makes the norm-growth limiter bind on some steps and not on others.
  """
  shapes = {"flat": SHAPES, "stacked": STACKED}[name]
  return drifting_low_rank(shapes, steps, seed=seed, top=8.0, decay=0.7, rank=8,
                           rate=0.05, noise=0.02,
                           amplitude=lambda t: 1.0 + 0.5 * np.sin(0.4 * t))


# ----------------------------------------------------------------------------- driver


@dataclasses.dataclass(frozen=True)
class Case:
  """One parity run: the alias with ``kw`` against the matching reference."""

  name: str
  alias: str
  kw: tuple  # library kwargs as sorted items (hashable, for the compile cache)
  stacked: bool = False
  lr: Union[float, Callable[[Any], Any]] = LR

  @property
  def options(self):
    return dict(self.kw)


def case(name, alias, stacked=False, lr=LR, **kw):
  return Case(name, alias, tuple(sorted(kw.items())), stacked, lr)


@functools.lru_cache(maxsize=None)
def _compiled(alias, stacked, lr, kw):
  """(tx, jitted step) per configuration; the step also returns the random matrices."""
  tx = ALIASES[alias](lr, update_proj_gap=GAP, b1=B1, b2=B2, eps=EPS,
                      dimension_numbers=STACKED_DN if stacked else None, **dict(kw))

  def step(g, state, params):
    upd, state = tx.update(g, state, params)
    mats = {k: b.basis.matrix() for k, b in state[0].bases.items()
            if isinstance(getattr(b, "basis", None), KeyBasis)}
    return upd, state, mats

  return tx, jax.jit(step)


def reference_factory(c: Case, **override):
  """``make(m, n)`` building the reference of one (m, n) matrix for case ``c``."""
  kw = {k: v for k, v in c.options.items() if k != "weight_decay"}
  if c.alias == "apollo_mini":
    kw = {"rank": 1, "scale": 128.0, "scale_type": "tensor", **kw}
  if c.alias == "fira":
    kw = {"scale": 0.25, **kw}
    kw.pop("limiter", None)  # RefFira always limits; "off" is GAMMA = 1e300 (see test)
  kw.update(override)
  cls = ref_fira.RefFira if c.alias == "fira" else ref_apollo.RefApollo
  rank = kw.pop("rank")
  # weight_decay=0: the library's decay of the pre-update weight is added by run_parity.
  return lambda m, n: cls(m, n, rank, update_proj_gap=GAP, b1=B1, b2=B2, eps=EPS,
                          lr=LR, weight_decay=0.0, **kw)


def _rel(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def run_parity(c: Case, **override):
  """Runs case ``c`` against its reference; returns {(leaf, layer): [error per step]}.

  ``override`` changes the reference's options (negative controls). Parameters are
  updated with the library's updates; the references never read them (weight_decay=0).
  """
  shapes = STACKED if c.stacked else SHAPES
  wd = c.options.get("weight_decay", 0.0)
  tx, step = _compiled(c.alias, c.stacked, c.lr, c.kw)
  make_ref = reference_factory(c, **override)
  rs = np.random.RandomState(1)
  params = {k: jnp.asarray(rs.randn(*s), jnp.float32) for k, s in shapes.items()}
  state = tx.init(params)
  refs = {}
  for k, s in shapes.items():
    if len(s) == 1:
      refs[k] = [ref_apollo.RefAdamW(b1=B1, b2=B2, eps=EPS, lr=LR)]
    else:
      refs[k] = [make_ref(s[-1], s[-2]) for _ in range(s[0] if len(s) == 3 else 1)]
  errs = {(k, i): [] for k in shapes for i in range(len(refs[k]))}
  for t, g in enumerate(make_grads("stacked" if c.stacked else "flat")):
    lr_t = float(c.lr(t)) if callable(c.lr) else c.lr
    upd, state, mats = step(g, state, params)
    for k, s in shapes.items():
      got = np.asarray(upd[k], np.float64)
      gk = np.asarray(g[k], np.float64)
      w = np.asarray(params[k], np.float64)
      for i, ref in enumerate(refs[k]):
        if len(s) == 1:
          want, got_i, w_i = ref.step(gk, lr=lr_t), got, w
        else:
          sl = (lambda x: x[i]) if len(s) == 3 else (lambda x: x)
          got_i, w_i = sl(got).T, sl(w).T  # torch orientation (out, in)
          if c.alias == "fira":
            ref.lr = lr_t  # RefFira reads its lr attribute at each step
            want = ref.step(sl(gk).T)
          else:
            p = np.asarray(sl(mats[k]), np.float64)
            want = ref.step(sl(gk).T, None, p, lr=lr_t)
            # Between refreshes the state's key must still draw the reference's matrix.
            np.testing.assert_array_equal(ref.p, p)
        want = want - lr_t * wd * w_i  # library: decoupled decay of the pre-update W
        errs[(k, i)].append(_rel(got_i, want))
    params = optax.apply_updates(params, upd)
  return errs


def assert_parity(c: Case, errs, tol=TOL):
  worst = max(max(e) for e in errs.values())
  bad = {key: (int(np.argmax(e)), max(e)) for key, e in errs.items() if max(e) > tol}
  print(f"\n[parity] {c.alias:<11} {c.name:<31} worst rel. error {worst:.2e}")
  assert not bad, f"{c.name}: (leaf, layer) -> (step, error) above {tol}: {bad}"


# ----------------------------------------------------------------------------- cases

APOLLO_CASES = [
    # Channel scaling on m>n (right, per row), m<n (left, per column), m=n (right).
    case("channel_scale2", "apollo", rank=4, scale=2.0),
    case("channel_limiter_off", "apollo", rank=4, limiter=False),
    case("channel_scale_front", "apollo", rank=4, scale=2.0, scale_front=True),
    case("stacked_wd_schedule", "apollo", stacked=True, lr=SCHEDULE, rank=4, scale=2.0,
         weight_decay=WD),
    # Forced sides: the reference (as apollo-torch) takes channel scaling's ``norm_dim``
    # from G's shape, so channel scaling on the non-std side does not broadcast there;
    # tensor scaling (APOLLO-Mini) does. "left" is the non-std side for "a" and "c",
    # "right" for the stacked "v".
    case("mini", "apollo_mini"),
    case("mini_scale_front_left", "apollo_mini", scale_front=True, proj_type="left"),
    case("mini_stacked_right_wd", "apollo_mini", stacked=True, proj_type="right",
         weight_decay=WD),
]
FIRA_CASES = [
    case("scale0.25", "fira", rank=4),
    case("scale1", "fira", rank=4, scale=1.0),
    case("scale0.25_limiter_off", "fira", rank=4, limiter=False),
    case("scale1_limiter_off_reverse_std", "fira", rank=4, scale=1.0, limiter=False,
         proj_type="reverse_std"),
    case("stacked_wd_schedule", "fira", stacked=True, lr=SCHEDULE, rank=4,
         weight_decay=WD),
]
CASES = {f"{c.alias}-{c.name}": c for c in APOLLO_CASES + FIRA_CASES}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name, monkeypatch):
  c = CASES[name]
  if c.alias == "fira" and not c.options.get("limiter", True):
    # RefFira has no switch: with γ = 1e300, max(ratio, γ)/γ == 1, i.e. no limiting.
    monkeypatch.setattr(ref_fira, "GAMMA", 1e300)
  assert_parity(c, run_parity(c))


@pytest.mark.parametrize("name,module,override", [
    ("apollo-channel_scale2", ref_apollo, dict(gamma=1.02)),
    ("apollo-channel_scale2", ref_apollo, dict(scale=1.0)),
    ("apollo_mini-mini", ref_apollo, dict(scale=192.0)),
    ("fira-scale0.25", ref_fira, dict(gamma=1.02)),
    ("fira-scale0.25", ref_fira, dict(scale=0.3)),
], ids=["apollo-gamma", "apollo-scale", "mini-scale", "fira-gamma", "fira-scale"])
def test_reference_discriminates(name, module, override, monkeypatch):
  """Negative control: a reference with another limiter γ or scale disagrees with the
  library far above the tolerance, on every projected leaf (the bias is unaffected)."""
  c, override = CASES[name], dict(override)
  if "gamma" in override:
    monkeypatch.setattr(module, "GAMMA", override.pop("gamma"))
  errs = run_parity(c, **override)
  worst = {k: max(e) for (k, _), e in errs.items() if k != "bias"}
  print(f"\n[control] {c.alias} {c.name} {override or 'gamma'}: "
        f"min over leaves {min(worst.values()):.2e}")
  assert min(worst.values()) > 1e-3, worst
  assert max(errs[("bias", 0)]) <= TOL


# ----------------------------------------------------------------------------- random matrix


def test_random_matrix_distribution_and_state():
  """Entries ~ N(0, 1/r) over a large matrix, on both sides; the state keeps a key only."""
  rank = 64
  params = {"left": jax.ShapeDtypeStruct((1024, 256), jnp.float32),   # P (256, 64)
            "right": jax.ShapeDtypeStruct((256, 1024), jnp.float32)}  # P (64, 256)
  bases = optax_lowrank.apollo(LR, rank).init(params)[0].bases
  # The bases hold keys only: no leaf is anywhere near a matrix (r·n = 16384 entries).
  leaves = jax.tree.leaves(bases)
  assert leaves and all(l.size < rank for l in leaves), [l.shape for l in leaves]
  assert all(l.dtype == jnp.uint32 for l in leaves)
  refresh = optax_lowrank.projectors.random().refresh  # apollo's projector's refresh
  for k, shape in (("left", (256, rank)), ("right", (rank, 256))):
    basis = refresh(RefreshContext(0, jax.random.key(7)), None, bases[k].basis)
    assert isinstance(basis, KeyBasis) and basis.side == k
    x = np.asarray(basis.matrix(), np.float64)
    assert x.shape == shape and basis.matrix().dtype == jnp.float32
    n = x.size
    assert abs(x.mean()) < 5.0 / math.sqrt(rank * n), x.mean()
    assert abs(x.var() * rank - 1.0) < 5.0 * math.sqrt(2.0 / n), x.var() * rank
    # Gaussian rather than ±1/√r (Rademacher) or orthonormal: ~68.3% within one std.
    within = np.mean(np.abs(x) < 1.0 / math.sqrt(rank))
    assert abs(within - 0.6827) < 0.02, within
    # Not orthogonalized: PᵀP (left) or PPᵀ (right) is far from a multiple of I.
    gram = x.T @ x if k == "left" else x @ x.T
    off = gram - np.diag(np.diag(gram))
    assert np.abs(off).max() > 0.1 * np.diag(gram).mean()


def test_random_matrix_regenerated_from_key():
  """The matrix is a function of the key: the same across steps between refreshes, new
  after each refresh, and the same in ``down`` and ``up`` (checked within one step)."""
  c = CASES["apollo-channel_scale2"]
  tx, step = _compiled(c.alias, c.stacked, c.lr, c.kw)
  params = {k: jnp.zeros(s) for k, s in SHAPES.items()}
  state = tx.init(params)
  seen = {k: [] for k in ("a", "b", "c")}
  keys = []
  for g in make_grads("flat")[:3 * GAP]:
    _, state, mats = step(g, state, params)
    keys.append(np.asarray(state[0].bases["a"].basis.key))
    for k in seen:
      seen[k].append(np.asarray(mats[k]))
      # Redrawn outside the step, from the stored key alone: the same matrix.
      np.testing.assert_array_equal(state[0].bases[k].basis.matrix(), mats[k])
  for k, ms in seen.items():
    for t in range(1, len(ms)):
      if t % GAP:
        np.testing.assert_array_equal(ms[t], ms[t - 1])
      else:
        assert np.abs(ms[t] - ms[t - 1]).max() > 0.1, (k, t)
        assert not np.array_equal(keys[t], keys[t - 1])
    assert np.abs(ms[0] - ms[2 * GAP]).max() > 0.1

  # down and up inside one update: with an identity inner optimizer and GaLore's
  # back-projection the update is up(down(G)) = G PᵀP (right) or P Pᵀ G (left) for the
  # one matrix P drawn from the state's key.
  tx = optax_lowrank.lowrank_project(
      optax.identity(), 4, update_proj_gap=GAP,
      projector=optax_lowrank.projectors.random(),
      combine=optax_lowrank.combine.back_project())
  upd_fn = jax.jit(tx.update)
  state = tx.init(params)
  for t, g in enumerate(make_grads("flat")[:GAP + 2]):
    upd, state = upd_fn(g, state, params)
    for k in ("a", "b", "c"):
      basis = state.bases[k].basis
      p = np.asarray(basis.matrix(), np.float64)
      gt = np.asarray(g[k], np.float64).T
      want = gt @ p.T @ p if basis.side == "right" else p @ p.T @ gt
      assert _rel(np.asarray(upd[k], np.float64).T, want) < 1e-6, (t, k)
  np.testing.assert_array_equal(upd["bias"], g["bias"])
