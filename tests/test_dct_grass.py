"""The ``dct`` and ``grass`` projectors against float64 NumPy references of the authors' methods.

``dct`` runs inside ``lowrank_project(Adam, update_proj_gap=1, on_refresh="keep")`` (DCTAdamW's
defaults; also ``"rotate"``) and is compared step by step with ``tests/reference/dct.py``
(written from IST-DASLab's ``fft_low_rank`` code), which chooses its own columns from the
float64 gradient: the library's indices must be the reference's top-L1 columns at every step.
``grass`` runs with ``on_refresh="reset"`` against ``tests/reference/grass.py`` (from the
paper: no code was published); for norm sampling the draw is read from the library's state and
handed to the reference, which recomputes the scales in float64; the draw itself is checked
statistically (unbiasedness, frequencies).

Adam: ``scale_by_adam_exact`` below is ``optax.scale_by_adam`` with accurate float32 bias
corrections. ``optax.scale_by_adam`` itself computes ``1 - b2**t`` from ``float32(0.999)``
and is off by up to ~1e-5 relative (measured 1.01e-5 on the DCT run), the whole tolerance; it
is run once with the looser ``TOL_OPTAX``.

Orientation: parameters are Flax kernels ``(in, out) = (n, m)``; the references work on
torch's ``G: (m, n)``, so they get ``grad.T`` and are compared with ``update.T``. A stacked
leaf ``(layers, in, out)`` is compared layer by layer with one reference each.
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import optax_lowrank
from optax_lowrank.projectors.dct import DCTBasis, MAX_SIZE, dct, dct_matrix
from optax_lowrank.inner.adam import bias_correction
from optax_lowrank.projectors.grass import grass
from optax_lowrank.projectors.base import RefreshContext
from optax_lowrank.shapes import DimensionNumbers, MatrixInfo
from tests.reference.dct import RefDCTAdamW, dct3_matrix
from tests.reference.grass import RefGrass, sampling_probabilities

RANK, STEPS, TOL, TOL_OPTAX = 6, 10, 1e-5, 3e-5
# Kernels (in, out) = (n, m). G = grad.T: "a" (40, 24) and "c" (48, 16) are projected on the
# right (columns; DCT sizes 24 and 16), "b" (24, 40) and the stacked "w" (4 × (24, 40)) on the
# left (rows, size 24).
SHAPES = {"a": (24, 40), "b": (40, 24), "c": (16, 48), "w": (4, 40, 24)}
DIMS = {"a": None, "b": None, "c": None, "w": DimensionNumbers(reduction_axes=1, output_axes=2)}
# On the 4 x 2 mesh ("a", "b"): both matrix axes, one, or the layers and one are sharded.
SPECS = {"a": P("a", "b"), "b": P("b", "a"), "c": P(None, "a"), "w": P("a", None, "b")}


def make_grads(shapes, steps, seed=0):
  """float32 gradients: noise on row and column scales that drift with the step, so norms
  are well separated yet the chosen indices change over the run."""
  rs = np.random.RandomState(seed)
  out = [{} for _ in range(steps)]
  for k, s in shapes.items():
    rows = rs.randn(2, *s[:-1], 1)
    cols = rs.randn(2, *s[:-2], 1, s[-1])
    base = rs.randn(*s)
    for t in range(steps):
      c, sn = np.cos(0.3 * t), np.sin(0.3 * t)
      scale = np.exp(0.8 * (c * rows[0] + sn * rows[1]) + 0.8 * (c * cols[0] + sn * cols[1]))
      out[t][k] = ((base + 0.6 * rs.randn(*s)) * scale).astype(np.float32)
  return out


def _layers(x):
  """Torch-oriented matrices of a leaf, one per layer: ``(layers, m, n)``."""
  x = np.asarray(x, np.float64)
  return np.swapaxes(x if x.ndim == 3 else x[None], -1, -2)


def scale_by_adam_exact(b1=0.9, b2=0.999, eps=1e-8):
  """``optax.scale_by_adam`` (one global step count, ``m̂ / (√v̂ + eps)``) with the library's
  accurate float32 bias corrections (``inner.adam.bias_correction``): optax's
  ``1 - b2**t`` with ``float32(0.999)`` is off by ~1e-5 relative, as much as the tolerance."""

  def init(params):
    return optax.ScaleByAdamState(jnp.zeros([], jnp.int32), optax.tree.zeros_like(params),
                                  optax.tree.zeros_like(params))

  def update(updates, state, params=None):
    del params
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, updates)
    count = optax.safe_int32_increment(state.count)
    c1, c2 = bias_correction(b1, count), bias_correction(b2, count)
    out = jax.tree.map(lambda m, v: (m / c1) / (jnp.sqrt(v / c2) + eps), mu, nu)
    return out, optax.ScaleByAdamState(count, mu, nu)

  return optax.GradientTransformation(init, update)


INNER = {"exact": scale_by_adam_exact, "optax": optax.scale_by_adam}


# Configurations: (projector, on_refresh, update_proj_gap, inner Adam).
DCT_KEEP = (("dct",), "keep", 1, "exact")
DCT_ROTATE = (("dct",), "rotate", 1, "exact")
DCT_OPTAX = (("dct",), "keep", 1, "optax")
GRASS_TOP = (("grass", ("selection", "top_norm")), "reset", 1, "exact")
GRASS_SAMPLING = (("grass", ("selection", "norm_sampling")), "reset", 3, "exact")


@functools.lru_cache(maxsize=None)
def library_run(config, mesh=None):
  """The library's updates and bases (NumPy) over ``STEPS`` steps, computed once per
  configuration (and mesh). Under ``mesh`` every leaf is sharded as ``SPECS`` says, and the
  state's types and the updates' shardings are checked at every step."""
  (kind, *kwargs), on_refresh, gap, inner = config
  projector = dct(**dict(kwargs)) if kind == "dct" else grass(**dict(kwargs))
  tx = optax_lowrank.lowrank_project(
      INNER[inner](), rank=RANK, projector=projector, update_proj_gap=gap,
      on_refresh=on_refresh, dimension_numbers=DIMS, seed=7)
  init, update = jax.jit(tx.init), jax.jit(tx.update)
  rs = np.random.RandomState(100)
  params = {k: jnp.asarray(rs.randn(*s), jnp.float32) for k, s in SHAPES.items()}
  grads = [{k: jnp.asarray(v) for k, v in g.items()} for g in make_grads(SHAPES, STEPS)]
  put = lambda t: t
  if mesh is not None:
    put = lambda t: {k: jax.device_put(x, NamedSharding(mesh, SPECS[k])) for k, x in t.items()}
  updates, bases = [], []
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    state = init(put(params))
    types = jax.tree.map(jax.typeof, state)
    if mesh is not None:  # indices (layers, r) are sharded like the layers
      assert tuple(types.bases["w"].basis.indices.sharding.spec)[:1] == ("a",)
    for g in grads:
      upd, state = update(put(g), state)
      if mesh is not None:
        assert jax.tree.map(jax.typeof, state) == types
        assert all(jax.typeof(upd[k]).sharding.spec == SPECS[k] for k in SHAPES)
      updates.append({k: np.asarray(v, np.float64) for k, v in upd.items()})
      bases.append({k: jax.tree.map(np.asarray, state.bases[k].basis) for k in SHAPES})
  return updates, bases, [{k: np.asarray(v) for k, v in g.items()} for g in grads]


def run(config, make_ref, *, inject=False):
  """The library's run of ``config`` against one reference per matrix.

  Returns per-leaf lists of per-step relative errors and the library's bases per step.
  ``make_ref(m, n)`` builds a reference; with ``inject`` the library's indices are handed
  to the reference's ``step(G, sigma=...)`` (norm sampling), else the reference's own
  choice must equal the library's.
  """
  updates, bases, grads = library_run(config)
  refs = {k: [make_ref(*m.shape) for m in _layers(v)] for k, v in grads[0].items()}
  errs = {k: [] for k in SHAPES}
  for upd, basis_t, g in zip(updates, bases, grads):
    for k in SHAPES:
      basis = basis_t[k]
      idx = basis.indices.reshape(-1, RANK)
      want = []
      for l, (ref, grad) in enumerate(zip(refs[k], _layers(g[k]))):
        if inject:
          want.append(ref.step(grad, sigma=idx[l]))
          np.testing.assert_allclose(basis.scales.reshape(-1, RANK)[l], ref.rho, rtol=1e-5)
        else:
          want.append(ref.step(grad))
          ref_idx = ref.idx if hasattr(ref, "idx") else ref.sigma
          np.testing.assert_array_equal(idx[l], ref_idx)
      want = np.stack(want)
      errs[k].append(np.linalg.norm(_layers(upd[k]) - want) / np.linalg.norm(want))
  return errs, bases


def _assert_close(errs, tol=TOL):
  worst = {k: (max(v), int(np.argmax(v))) for k, v in errs.items()}  # (error, step)
  assert all(len(v) == STEPS for v in errs.values())
  assert all(e <= tol for e, _ in worst.values()), worst


def _changes(bases, k):
  """Number of steps at which leaf ``k``'s indices changed."""
  return sum(not np.array_equal(a[k].indices, b[k].indices) for a, b in zip(bases, bases[1:]))


# ----------------------------------------------------------------------------- DCT


def test_dct_matrix_is_the_orthonormal_dct2():
  for n in (1, 2, 7, 24, 128):
    q = np.asarray(jax.jit(dct_matrix, static_argnums=0)(n), np.float64)
    np.testing.assert_allclose(q, dct3_matrix(n), rtol=0, atol=1e-6)  # the authors' matrix
    np.testing.assert_allclose(q.T @ q, np.eye(n), rtol=0, atol=1e-6)
    # Q x is the orthonormal DCT-II of x, from its definition (no scipy):
    # X_k = sqrt(2/N) w_k sum_j x_j cos(pi k (2j + 1) / 2N), w_0 = 1/sqrt(2).
    x = np.random.RandomState(n).randn(n)
    want = [np.sqrt(2.0 / n) * (np.sqrt(0.5) if k == 0 else 1.0)
            * sum(x[j] * np.cos(np.pi * k * (2 * j + 1) / (2 * n)) for j in range(n))
            for k in range(n)]
    np.testing.assert_allclose(q @ x, want, rtol=0, atol=1e-6 * np.abs(x).sum())


def test_dct_columns_at_the_largest_size():
  """``Q[:, idx]`` rebuilt from indices: exact phase reduction up to ``MAX_SIZE``."""
  n = MAX_SIZE
  idx = np.array([0, 1, 12345, n - 2, n - 1])
  j = np.arange(n, dtype=np.int64)[:, None]
  phase = (j * (2 * idx[None, :] + 1)) % (4 * n)  # exact in int64
  want = np.sqrt(2.0 / n) * np.cos(np.pi * phase / (2.0 * n))
  want[0] *= np.sqrt(0.5)
  for side in ("left", "right"):
    build = jax.jit(lambda i, side=side: DCTBasis(i, side, n).matrix())
    got = np.asarray(build(jnp.asarray(idx, jnp.int32)), np.float64)
    got = got if side == "left" else got.T
    assert np.abs(got - want).max() <= 1e-6 * np.sqrt(2.0 / n), side
    np.testing.assert_allclose(got.T @ got, np.eye(len(idx)), atol=1e-5)


DCT_CASES = {  # library on_refresh -> reference options
    "keep": dict(),  # DCTAdamW's default rotate_subspace=False
    "rotate": dict(rotate_subspace=True, rotate_second=False),
}


@pytest.mark.parametrize("config", [DCT_KEEP, DCT_ROTATE, DCT_OPTAX],
                         ids=["keep", "rotate", "keep-optax.scale_by_adam"])
def test_dct_matches_reference(config):
  make = lambda m, n: RefDCTAdamW(m, n, RANK, **DCT_CASES[config[1]])
  errs, bases = run(config, make)
  _assert_close(errs, TOL if config[3] == "exact" else TOL_OPTAX)
  for k in SHAPES:  # the moments really do meet new columns
    assert _changes(bases, k) >= STEPS // 2, (k, _changes(bases, k))
    assert bases[-1][k].indices.dtype == np.int32


@pytest.mark.parametrize("config,ref_opts", [
    (DCT_KEEP, dict(rotate_subspace=True)),  # the authors' rotation of m and v
    (DCT_ROTATE, dict(rotate_subspace=True, rotate_second=True)),  # v rotated too
    (DCT_KEEP, dict(ell_norm=2)),  # l2 selection
], ids=["keep-vs-rotate", "rotate-vs-rotate-v", "l1-vs-l2"])
def test_dct_reference_discriminates(config, ref_opts):
  """Negative controls (configurations compiled above): a reference that rotates moments the
  library keeps, or ranks by l2, must disagree."""
  make = lambda m, n: RefDCTAdamW(m, n, RANK, **ref_opts)
  if "ell_norm" in ref_opts:  # the indices differ: run() would stop at the first step
    with pytest.raises(AssertionError, match="not equal"):
      run(config, make)
    return
  errs, _ = run(config, make)
  assert max(max(v) for v in errs.values()) > 1e-3, errs


@pytest.mark.parametrize("side", ["left", "right"])
def test_dct_l1_and_l2_rank_differently(side):
  """A crafted ``S`` whose column 2 wins in l1 (4 > 3) and column 5 in l2 (3 > 2)."""
  size, other = 8, 4
  s = np.full((other, size), 0.05)
  s[:, 2], s[:, 5] = 1.0, [3.0, 0.0, 0.0, 0.0]
  q = dct3_matrix(size)
  # right: S = G Q, G (other, size); left: S' = Qᵀ G with S' = Sᵀ, G (size, other).
  g_torch = s @ q.T if side == "right" else q @ s.T
  m, n = g_torch.shape
  info = MatrixInfo((), m, n, 1, None)
  g = jnp.asarray(g_torch.T, jnp.float32)  # the array layout (n, m)
  for norm, want in (("l1", 2), ("l2", 5)):
    proj = dct(side, norm=norm)
    basis = proj.refresh(RefreshContext(0, jax.random.key(0)), g,
                         proj.init(info, jnp.float32))
    assert basis.side == side and basis.indices.tolist() == [want], (norm, basis.indices)
    ref = RefDCTAdamW(m, n, 1, ell_norm=1 if norm == "l1" else 2)
    if ref.right == (side == "right"):
      ref.step(g_torch)
      assert ref.idx.tolist() == [want]


def test_dct_size_limit_is_reported_at_init():
  tx = optax_lowrank.lowrank_project(optax.scale_by_adam(), rank=2, projector=dct())
  params = {"w": jax.ShapeDtypeStruct((MAX_SIZE + 1, MAX_SIZE + 2), jnp.float32)}
  with pytest.raises(ValueError, match=r"\['w'\].*`dct`"):
    jax.eval_shape(tx.init, params)


# ----------------------------------------------------------------------------- GRASS


def _grass_ref(selection, gap, **opts):
  def make(m, n):
    # proj_type "std": columns when m >= n (right), else rows (left).
    return RefGrass(m, n, RANK, side="right" if m >= n else "left", selection=selection,
                    update_proj_gap=gap, **opts)
  return make


@pytest.mark.parametrize("config", [GRASS_TOP, GRASS_SAMPLING], ids=["top_norm", "norm_sampling"])
def test_grass_matches_reference(config):
  selection, gap = config[0][1][1], config[2]
  errs, bases = run(config, _grass_ref(selection, gap), inject=selection == "norm_sampling")
  _assert_close(errs)
  refreshes = set(range(0, STEPS, gap))
  for k in SHAPES:
    for t, (a, b) in enumerate(zip(bases, bases[1:]), start=1):
      if t not in refreshes:  # the subspace changes on refresh steps only
        assert np.array_equal(a[k].indices, b[k].indices), (k, t)
    assert _changes(bases, k) >= 1, k
    for b in bases:
      idx = b[k].indices
      assert idx.dtype == np.int32 and np.all(np.diff(idx, axis=-1) >= 0)
      if selection == "top_norm":
        assert np.all(np.diff(idx, axis=-1) > 0) and np.all(b[k].scales == 1.0)


def test_grass_reference_discriminates():
  """Negative control: moments the reference keeps across refreshes (the library resets)."""
  errs, _ = run(GRASS_SAMPLING, _grass_ref("norm_sampling", 3, reset_moments=False),
                inject=True)
  assert max(max(v) for v in errs.values()) > 1e-3, errs


def test_grass_sampling_is_unbiased():
  """``E[up(down(G))] = G`` over draws and index frequencies follow ``q ∝ ‖row‖^power``, on both
  sides; top-norm is biased (the negative control). One compiled function for all cases."""
  r, draws = 3, 20000
  rs = np.random.RandomState(0)
  g_rows = rs.randn(8, 12) * np.exp(rs.randn(8, 1))  # torch (m, n): 8 rows of varied norms
  g_rows[2] = 0.0  # a zero row is never drawn
  cases = [("left", 1.0), ("right", 1.0), ("left", 2.0)]  # "right" keeps columns: use G.T
  mats = {side: g_rows if side == "left" else g_rows.T for side, _ in cases}
  projs = [grass(side, selection="norm_sampling", power=power) for side, power in cases]
  infos = [MatrixInfo((), *mats[side].shape, r, None) for side, _ in cases]

  def one(key):
    outs = []
    for proj, info, (side, _) in zip(projs, infos, cases):
      g = jnp.asarray(mats[side].T, jnp.float32)  # the array layout (n, m)
      b = proj.refresh(RefreshContext(0, key), g, proj.init(info, jnp.float32))
      outs.append((proj.up(b, proj.down(b, g)), b.indices, b.scales))
    return outs

  results = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(1), draws))
  sq = (g_rows ** 2).sum(axis=1)
  for (side, power), (full, idx, scales) in zip(cases, results):
    want = mats[side].T
    full = np.asarray(full, np.float64)
    mean, se = full.mean(0), full.std(0) / np.sqrt(draws)
    assert np.all(np.abs(mean - want) <= 5 * se + 1e-6), (side, np.abs(mean - want).max())
    assert np.linalg.norm(mean - want) < 0.05 * np.linalg.norm(want)
    q = sampling_probabilities(sq, power)
    idx = np.asarray(idx)
    freq = np.bincount(idx.ravel(), minlength=q.size) / (draws * r)
    assert np.all(np.abs(freq - q) <= 5 * np.sqrt(q * (1 - q) / (draws * r)) + 1e-12), side
    assert freq[2] == 0.0 and np.all(np.diff(idx, axis=-1) >= 0)
    np.testing.assert_allclose(np.asarray(scales), 1 / np.sqrt(r * q[idx]), rtol=1e-5)
  # Negative control: top-norm keeps the same r rows every time, a biased sketch.
  top = grass("left", selection="top_norm")
  g = jnp.asarray(g_rows.T, jnp.float32)
  b = top.refresh(RefreshContext(0, jax.random.key(0)), g,
                  top.init(infos[0], jnp.float32))
  assert b.indices.tolist() == sorted(np.argsort(-sq)[:r].tolist())
  kept = np.asarray(top.up(b, top.down(b, g)))
  assert np.linalg.norm(kept - g_rows.T) > 0.1 * np.linalg.norm(g_rows)


# ----------------------------------------------------------------------------- both


@pytest.mark.parametrize("config", [DCT_KEEP, GRASS_TOP, GRASS_SAMPLING],
                         ids=["dct", "grass-top_norm", "grass-norm_sampling"])
def test_sharded_matches_unsharded(mesh, config):
  """Every leaf sharded (``SPECS``): same indices and scales, updates within 1e-5, the state's
  types stable and the updates sharded like the parameters (checked in ``library_run``)."""
  want_updates, want_bases, _ = library_run(config)
  got_updates, got_bases, _ = library_run(config, mesh)
  for want_u, got_u, want_b, got_b in zip(want_updates, got_updates, want_bases, got_bases):
    for k in SHAPES:
      np.testing.assert_array_equal(got_b[k].indices, want_b[k].indices)
      if hasattr(want_b[k], "scales"):
        np.testing.assert_allclose(got_b[k].scales, want_b[k].scales, rtol=1e-6)
      err = np.linalg.norm(got_u[k] - want_u[k]) / np.linalg.norm(want_u[k])
      assert err <= 1e-5, (k, err)


@pytest.mark.parametrize("make,param", [
    (lambda: dct("full"), "proj_type"),
    (lambda: dct("smaller"), "proj_type"),
    (lambda: dct(norm="L1"), "norm"),
    (lambda: grass("full"), "proj_type"),
    (lambda: grass(selection="topk"), "selection"),
    (lambda: grass(power=-1.0), "power"),
    (lambda: grass(power=float("nan")), "power"),
    (lambda: grass(power="1"), "power"),
])
def test_bad_arguments(make, param):
  with pytest.raises(ValueError, match=f"`{param}`"):
    make()
