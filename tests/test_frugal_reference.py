"""Parity of ``frugal`` with the independent float64 NumPy FRUGAL of ``tests/reference/frugal.py``.

Both implementations get the same float32 gradients and parameters; the updates are compared
leaf by leaf at every step (``‖ours − ref‖ / ‖ref‖ ≤ 1e-5``). The reference draws no subspace:
after each library step the subspace it used is read from the state (``state[0].bases``) and
handed to the reference, which reads it on its own refresh steps only (0, gap, 2·gap, ...), so
the refresh schedule, the moment/step-count restarts, the combine rule and the weight decay
are all the reference's. The subspaces themselves are checked on their own: the SVD basis
against a float64 SVD of the same gradient, random bases for orthonormality, indices for
range, count and sortedness, block windows against the reference's ``block_indices``.

Orientation: parameters are Flax kernels ``(in, out) = (n, m)``; the reference works on torch's
``W, G: (m, n)``, so it gets ``grad.T`` and is compared with ``update.T``.

Blocks: the library picks ``round(L·density)`` layers of each stacked leaf ``(L, in, out)``,
the reference picks among all tensors of a model (a documented difference). So a stacked leaf
is compared with ``L`` independent ``RefFrugal(kind="blocks")`` matrices, each told whether its
layer is in the library's ``BlockBasis.indices`` for the coming period.

Parity runs use ``proj_type="std"``, the only side ``frugal`` accepts: there its rank
``round(density·min(m, n))`` is FRUGAL's ``round(density·projected side)``; other sides are
refused with an error naming ``proj_type`` (``test_other_sides_are_refused``).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_lowrank
from optax_lowrank import DimensionNumbers
from optax_lowrank.projectors.svd import LeftBasis, RightBasis
from tests.reference.frugal import RefFrugal, block_indices, subspace_size

STEPS, GAP, DENSITY, LR, TOL = 32, 10, 0.25, 1e-2, 1e-5  # refreshes at steps 0, 10, 20, 30
REFRESHES = tuple(range(0, STEPS, GAP))
# (in, out) kernels: G = grad.T is (40, 24) m > n (right side) for "a", (24, 40) m < n (left
# side) for "b"; "bias" is never projected (plain AdamW, never reset).
SHAPES = {"a": (24, 40), "b": (40, 24), "bias": (40,)}
LAYERS, BLOCK_DENSITY = 5, 0.4  # 2 of 5 layers: the deterministic windows wrap around
STACKED = {"w": (LAYERS, 24, 40), "bias": (40,)}
STACKED_DN = {"w": DimensionNumbers(reduction_axes=1, output_axes=2), "bias": None}
SCHEDULE = optax.warmup_cosine_decay_schedule(1e-3, LR, 6, STEPS, end_value=1e-3)
REF_KIND = {"random_k": "randk"}
REF_RULE = {"sign": "sign_sgd", "sgd": "sgd"}
# float32 resolution of the residual ``G − up(down(G))`` of the dense (svd, random) bases: an
# entry below TIE · max|G| has no float32-meaningful sign (see ``_compare``). The measured
# float32 error of that residual is ~1e-7 · max|G|.
TIE = 1e-5


# ----------------------------------------------------------------------------- gradients


def make_grads(shapes, steps, seed=0):
  """Deterministic float32 gradients in the leaf layout.

  Every matrix (torch orientation) is ``Qm diag(s) Qnᵀ + 0.02 · noise`` with singular values
  ``s = 8 · 0.7^i`` (i < 8) on factors that rotate smoothly with ``t``: a slowly drifting
  subspace with a clear gap around the rank (6 of 24), so a float32 SVD pins the top
  singular vectors to ~1e-6.
  """
  rs = np.random.RandomState(seed)
  s = 8.0 * 0.7 ** np.arange(8)
  qr = lambda x: np.linalg.qr(x)[0]
  fac = {}
  for k, shape in shapes.items():
    if len(shape) == 1:
      fac[k] = [rs.randn(*shape) for _ in range(2)]
    else:  # leaf (..., n, m): factors for the m side and the n side
      n, m = shape[-2:]
      fac[k] = [rs.randn(*shape[:-2], d, 8) for d in (m, m, n, n)]
  seq = []
  for t in range(steps):
    c, sn = np.cos(0.05 * t), np.sin(0.05 * t)
    g = {}
    for k, shape in shapes.items():
      f = fac[k]
      if len(shape) == 1:
        g[k] = c * f[0] + sn * f[1] + 0.1 * rs.randn(*shape)
      else:
        qm, qn = qr(c * f[0] + sn * f[1]), qr(c * f[2] + sn * f[3])
        torch_g = (qm * s) @ np.swapaxes(qn, -1, -2)  # (..., m, n)
        g[k] = np.swapaxes(torch_g, -1, -2) + 0.02 * rs.randn(*shape)
    seq.append({k: v.astype(np.float32) for k, v in g.items()})
  return seq


# ----------------------------------------------------------------------------- reference


class Ref(RefFrugal):
  """``RefFrugal`` that keeps the float64 residual its state-free rule saw (for ``_compare``)."""

  residual = None  # G − up(down(G)) of the last step (float64, torch orientation)
  scale_g = None  # max|G| of the last step, set by the driver

  def _free(self, g, lr):
    self.residual = g
    return super()._free(g, lr)


def _svd_canonical(g, r, side):
  """float64 SVD basis with the library's sign convention (largest |entry| of u positive)."""
  u, _, vh = np.linalg.svd(g, full_matrices=False)
  sign = np.sign(u[np.argmax(np.abs(u), axis=0), np.arange(u.shape[1])])
  u, vh = u * sign, vh * sign[:, None]
  return vh[:r] if side == "right" else u[:, :r]


_matrix = jax.jit(lambda basis: basis.matrix())  # KeyBasis -> its float32 matrix
_schedule = jax.jit(SCHEDULE)


def _subspace(kind, basis, ref):
  """The library's subspace of one 2-D leaf, in the form ``RefFrugal`` takes (torch side)."""
  if kind == "svd":
    side = {RightBasis: "right", LeftBasis: "left"}[type(basis)]
    assert side == ref.side, (side, ref.side)
    return np.asarray(basis.vh if side == "right" else basis.u, np.float64)
  if kind == "random":
    assert basis.side == ref.side, (basis.side, ref.side)
    return np.asarray(_matrix(basis), np.float64)
  idx = np.asarray(basis.indices)
  if kind == "randperm":  # the rows of a permutation matrix, as FRUGAL's _get_randperm_matrix
    assert basis.kind == {"right": "columns", "left": "rows"}[ref.side], basis.kind
    p = np.zeros((ref.size, ref.n) if ref.side == "right" else (ref.m, ref.size))
    if ref.side == "right":
      p[np.arange(ref.size), idx] = 1.0
    else:
      p[idx, np.arange(ref.size)] = 1.0
    return p
  return idx


def _check_subspace(kind, sub, ref, g_torch):
  """Properties of a freshly drawn subspace, independent of the parity."""
  if kind == "svd":
    want = _svd_canonical(g_torch, ref.size, ref.side)
    np.testing.assert_allclose(sub, want, atol=1e-5)
  elif kind == "random":  # orthonormal rows (right) / columns (left), no 1/√r
    gram = sub @ sub.T if ref.side == "right" else sub.T @ sub
    np.testing.assert_allclose(gram, np.eye(ref.size), atol=1e-5)
  elif kind != "randperm":
    size = {"columns": ref.n, "rows": ref.m, "random_k": ref.m * ref.n}[kind]
    assert sub.shape == (ref.size,), (sub.shape, ref.size)
    assert np.all(np.diff(sub) > 0) and sub[0] >= 0 and sub[-1] < size, sub


def _compare(got, want, ref, kind, rule, flip):
  """``‖got − want‖ / ‖want‖`` and the number of sign ties excused.

  For the dense bases (svd, random) with the sign rule, ``sign(G − up(down(G)))`` is
  ill-posed below float32 where the residual is within rounding of zero: an entry with
  ``|residual| ≤ TIE · max|G|`` (float64) may take either sign. Where such an entry does
  differ, by at most the sign step ``flip = 2 · lr · s · c``, it is left out of the norm;
  the caller bounds how many there are (none were seen in these runs: ~3e-4 of the
  entries are within TIE, but the float32 residual keeps their sign).
  """
  diff = got - want
  ties = 0
  if kind in ("svd", "random") and rule == "sign":
    tie = (np.abs(ref.residual) <= TIE * ref.scale_g) & (np.abs(diff) > 0.25 * flip)
    assert np.all(np.abs(diff[tie]) <= flip * (1 + 1e-5) + 1e-12)
    ties = int(tie.sum())
    diff = np.where(tie, 0.0, diff)
  return np.linalg.norm(diff) / np.linalg.norm(want), ties


# ----------------------------------------------------------------------------- driver


@functools.lru_cache(maxsize=None)
def _frugal(kind, reset=True, rule="sign", s=1.0, c=1.0, wd=0.0, schedule=False,
            order="descending"):
  """Cached (tx, jitted init, jitted update): identical configurations compile once."""
  blocks = kind == "blocks"
  tx = optax_lowrank.frugal(
      SCHEDULE if schedule else LR, BLOCK_DENSITY if blocks else DENSITY, subspace=kind,
      update_proj_gap=GAP, order=order, proj_lr_scale=s, state_free_lr_scale=c,
      state_free_rule=rule, reset_statistics=reset, weight_decay=wd,
      dimension_numbers=STACKED_DN if blocks else None, seed=3)
  return jax.jit(tx.init), jax.jit(tx.update)


def run_parity(kind, *, reset=True, rule="sign", s=1.0, c=1.0, wd=0.0, schedule=False,
               order="descending", ref_reset=None, seed=0):
  """Runs both for ``STEPS``; returns per-leaf lists of the per-step relative errors, the
  number of sign ties excused, and the library's subspace at each refresh."""
  blocks = kind == "blocks"
  shapes = STACKED if blocks else SHAPES
  init, update = _frugal(kind, reset, rule, s, c, wd, schedule, order)
  rs = np.random.RandomState(seed + 100)
  params = {k: jnp.asarray(rs.randn(*v), jnp.float32) for k, v in shapes.items()}
  state = init(params)
  lrs = np.asarray(_schedule(jnp.arange(STEPS)), np.float64) if schedule else [LR] * STEPS

  common = dict(update_proj_gap=GAP, weight_decay=wd, lr=LR, proj_params_lr_scale=s,
                inactive_lr_scale=c, inactive_update_rule=REF_RULE[rule])
  refs = {"bias": Ref(1, 40, kind="dense", **common)}
  if blocks:
    refs["w"] = [Ref(40, 24, kind="blocks", **common) for _ in range(LAYERS)]
  else:
    for k, (n, m) in (("a", SHAPES["a"]), ("b", SHAPES["b"])):
      refs[k] = Ref(m, n, kind=REF_KIND.get(kind, kind), rank_or_density=DENSITY,
                    reset_statistics=reset if ref_reset is None else ref_reset, **common)
      assert refs[k].size == subspace_size(m, n, REF_KIND.get(kind, kind), DENSITY)

  errs = {k: [] for k in shapes}
  ties, seen, prev = 0, {k: [] for k in shapes if k != "bias"}, {}
  for t, g in enumerate(make_grads(shapes, STEPS, seed)):
    lr = float(lrs[t])
    upd, state = update({k: jnp.asarray(v) for k, v in g.items()}, state, params)
    lowrank = state[0]
    w = {k: np.asarray(v, np.float64) for k, v in params.items()}
    got = {k: np.asarray(v, np.float64) for k, v in upd.items()}
    assert "bias" not in lowrank.bases

    # bias: plain AdamW with the group lr (no proj_lr_scale), never reset.
    want = refs["bias"].step(g["bias"][None], w["bias"][None], lr=lr)[0]
    errs["bias"].append(np.linalg.norm(got["bias"] - want) / np.linalg.norm(want))

    for k in seen:
      basis = lowrank.bases[k].basis
      leaves = [np.asarray(x) for x in jax.tree.leaves(basis)]
      if t > 0:  # the subspace changes on refresh steps only
        same = all(np.array_equal(x, y) for x, y in zip(leaves, prev[k]))
        if t not in REFRESHES:
          assert same, (k, t)
        elif order != "random":  # a random draw of 2 of 5 blocks may repeat
          assert not same, (k, t)
      prev[k] = leaves
      if blocks:
        idx = np.asarray(basis.indices)
        if t in REFRESHES:
          seen[k].append(idx.tolist())
        want = np.stack([r.step(g[k][l].T, w[k][l].T, subspace=l in idx, lr=lr).T
                         for l, r in enumerate(refs[k])])
        errs[k].append(np.linalg.norm(got[k] - want) / np.linalg.norm(want))
        continue
      ref, g_torch = refs[k], g[k].T.astype(np.float64)
      sub = _subspace(kind, basis, ref)
      if t in REFRESHES:
        _check_subspace(kind, sub, ref, g_torch)
        seen[k].append(sub)
      ref.scale_g = np.abs(g_torch).max()
      want = ref.step(g_torch, w[k].T, subspace=sub, lr=lr)
      flip = 2 * lr * s * c
      e, n_ties = _compare(got[k].T, want, ref, kind, rule, flip)
      errs[k].append(e)
      ties += n_ties
    params = optax.apply_updates(params, upd)
  return errs, ties, seen


def _assert_close(errs, ties=0):
  worst = {k: (max(v), int(np.argmax(v))) for k, v in errs.items()}  # (error, step)
  assert all(len(v) == STEPS for v in errs.values())
  assert all(e <= TOL for e, _ in worst.values()), worst
  # Sign ties that flip are rare (none seen): many would mean a wrong residual, not rounding.
  assert ties <= 3, ties


# ----------------------------------------------------------------------------- tests

# (kind, reset_statistics, options): every subspace kind with reset on and off, each of the
# options (rule sgd, proj_lr_scale, state_free_lr_scale, weight decay, lr schedule) on some.
MATRIX_CASES = [
    ("svd", True, dict()),
    ("svd", False, dict(rule="sgd", s=0.5, c=0.3, wd=0.1)),
    ("random", True, dict(s=0.3, wd=0.1)),
    ("random", False, dict(rule="sgd", schedule=True)),
    ("randperm", True, dict(c=0.1)),
    ("randperm", False, dict(s=2.0, wd=0.1)),
    ("columns", True, dict(schedule=True, wd=0.05)),
    ("columns", False, dict(rule="sgd", c=0.5)),
    ("rows", True, dict(rule="sgd", s=0.5)),
    ("rows", False, dict(c=0.3, wd=0.1)),
    ("random_k", True, dict(s=0.3, c=2.0)),
    ("random_k", False, dict(rule="sgd", wd=0.1)),
]


@pytest.mark.parametrize("kind,reset,opts", MATRIX_CASES,
                         ids=[f"{k}-reset{r}-{'-'.join(o) or 'plain'}"
                              for k, r, o in MATRIX_CASES])
def test_frugal_matches_reference(kind, reset, opts):
  errs, ties, seen = run_parity(kind, reset=reset, **opts)
  _assert_close(errs, ties)
  for k in ("a", "b"):  # a new subspace at every refresh (and only there: see run_parity)
    assert len(seen[k]) == len(REFRESHES)
    for x, y in zip(seen[k], seen[k][1:]):
      assert not np.array_equal(x, y), (k, x, y)


BLOCK_CASES = [  # reset_statistics=False is ignored for blocks (always reset), as in FRUGAL
    ("ascending", dict(reset=False)),
    ("descending", dict(s=0.3, wd=0.1)),
    ("random", dict(rule="sgd", c=0.5, schedule=True)),
]


@pytest.mark.parametrize("order,opts", BLOCK_CASES,
                         ids=[f"{o}-{'-'.join(p) or 'plain'}" for o, p in BLOCK_CASES])
def test_frugal_blocks_match_reference(order, opts):
  errs, _, seen = run_parity("blocks", order=order, **opts)
  _assert_close(errs)
  k = round(LAYERS * BLOCK_DENSITY)
  if order == "random":
    assert all(len(set(i)) == k == len(i) and i == sorted(i) for i in seen["w"]), seen
    assert all(0 <= j < LAYERS for i in seen["w"] for j in i), seen
    assert len({tuple(i) for i in seen["w"]}) > 1, seen
  else:
    assert seen["w"] == [block_indices(LAYERS, BLOCK_DENSITY, order, j)
                         for j in range(len(REFRESHES))], seen


@pytest.mark.parametrize("kind,opts", [("svd", dict()), ("columns", dict(schedule=True, wd=0.05))])
def test_reference_discriminates(kind, opts):
  """Negative control: the reference with ``reset_statistics`` flipped must disagree, so the
  parity checks do see the moment and step-count restarts. (Configurations of
  ``MATRIX_CASES``, so nothing new is compiled.)"""
  errs, _, _ = run_parity(kind, reset=True, ref_reset=False, **opts)
  assert max(max(errs["a"]), max(errs["b"])) > 1e-3, errs
  assert max(errs["bias"]) <= TOL  # the control changes the projected leaves only


@pytest.mark.parametrize("kind", ["svd", "randperm"])
@pytest.mark.parametrize("proj_type", ["reverse_std", "left"])
def test_other_sides_are_refused(kind, proj_type):
  # On these sides FRUGAL's rank would be round(density · 40) for a (40, 24) G, which the
  # wrapper's min-side rank cannot express: refused at build time rather than wrong.
  assert subspace_size(40, 24, kind, DENSITY, proj_type) == 10
  with pytest.raises(ValueError, match="proj_type"):
    optax_lowrank.frugal(LR, DENSITY, subspace=kind, proj_type=proj_type)
