"""Parity of ``optax_lowrank.flora`` with the float64 NumPy reference ``tests/reference/flora.py``.

``RefFlora`` is written from the authors' optax code (BorealisAI/flora-opt), not from this
library. The library keeps that code's semantics except the momentum transfer on a redraw,
which follows the paper / the torch code, ``M <- down(new, up(old, M))``: the reference is
run with ``transfer="paper"`` (and with ``transfer="optax"`` as a negative control).

Both sides work on the arrays as stored (Flax kernels (in, out)), so nothing is transposed.
The random projection is read from the library's state (``KeyBasis.matrix()``, the float32
matrix its key draws) and handed to the reference at every redraw; the weights the reference
sees are the library's float32 weights of that step, so each step is compared on the same
input. The comparison is ``||ours - ref|| / ||ref||`` per leaf (per matrix for a stacked
leaf) at every step, with the momentum kept in float32 (``momentum_dtype=jnp.float32``);
the bfloat16 default is compared with that float32 path. Gradients are Gaussian with a
scale that jumps from step to step, so the lagging second moment over- or under-normalizes
and the RMS clip binds at some steps and not at others.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_lowrank
from optax_lowrank import DimensionNumbers
from reference.flora import RefFlora, proj_shape

STEPS, KAPPA, RANK, LR, WD = 32, 10, 8, 1e-2, 1e-3  # redraws at t = 0, 10, 20, 30
TOL32, TOL_BF16, NEG_CONTROL = 1e-5, 2e-2, 1e-3

# (in, out) kernels as stored. Compressed iff min side >= 128 and max <= 4 min.
SHAPES = {
    "wide": (128, 256),    # m < n: P (r, m), down = P @ X, M (r, n)
    "tall": (256, 128),    # m > n: P (n, r), down = X @ P, M (m, r)
    "square": (128, 128),  # tie: the output axis (axis 1) is compressed, P (n, r)
    "small": (40, 64),     # min side < 128: full momentum, unfactored second moment
    "embed": (128, 600),   # max > 4 min: full momentum, factored second moment
    "bias": (256,),        # 1-D: full momentum, unfactored (reference: a (1, 256) matrix)
}
COMPRESSED = ("wide", "tall", "square")
PAPER = dict(b1=0.9, b2=0.8, transfer="paper")


class _Ref(RefFlora):
  """``RefFlora`` that records the RMS of the momentum output before the clip."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.pre_clip_rms = []

  def momentum(self, u, proj_matrix):
    o = super().momentum(u, proj_matrix)
    self.pre_clip_rms.append(float(np.sqrt(np.mean(np.square(o)))))
    return o


def _views(shape):
  """(index, 2-D shape) the references see: each matrix of a stack, (1, n) for a vector."""
  if len(shape) == 1:
    return [(None, (1, shape[0]))]
  if len(shape) == 3:
    return [(i, shape[1:]) for i in range(shape[0])]
  return [(None, shape)]


def _pick(x, index, shape2d):
  x = np.asarray(x, np.float64)
  return x.reshape(shape2d) if index is None else x[index]


def _per_matrix(x, shape):
  """Broadcasts per-matrix factors (k,) of a stack over (k, m, n); a scalar otherwise."""
  return np.reshape(x, (-1, 1, 1)) if len(shape) == 3 else x[0]


@jax.jit
def _matrices(bases):
  """The float32 projection of every compressed leaf, by name, in one call."""
  return {name: b.basis.matrix() for name, b in bases.items()}


def run(shapes, *, tx_kwargs, refs_kwargs, learning_rate=LR, seed=0, weight_scales=None,
        ref_overrides=None, momentum_dtype=jnp.float32):
  """Runs ``flora`` and, per variant in ``refs_kwargs``, one ``_Ref`` per matrix, all on
  the same gradients and (the library's) weights.

  Returns a dict: ``errors[variant][name][k]`` the relative errors over steps of matrix
  ``k`` of leaf ``name``; ``refs[variant][name][k]``; ``updates[name]`` the library's
  update per step; ``keys[name]`` its basis key per step (``None`` if not compressed);
  ``state`` the final state.
  """
  rng = np.random.default_rng(seed)
  params = {}
  for name, shape in shapes.items():
    w = rng.standard_normal(shape)
    if weight_scales and name in weight_scales:
      w = w * _per_matrix(np.asarray(weight_scales[name]), shape)
    params[name] = jnp.asarray(w, jnp.float32)
  # Gradients: a fixed direction plus as much noise, times a scale that jumps per step.
  grad_means = {name: rng.standard_normal(s) for name, s in shapes.items()}
  grad_scales = {name: np.exp(rng.uniform(-1.5, 1.5, (STEPS, len(_views(s)))))
                 for name, s in shapes.items()}
  tx = optax_lowrank.flora(learning_rate, RANK, kappa=KAPPA, momentum_dtype=momentum_dtype,
                           **tx_kwargs)
  refs = {}
  for variant, kwargs in refs_kwargs.items():
    refs[variant] = {}
    for name, shape in shapes.items():
      kw = dict(kwargs, **(ref_overrides or {}).get(name, {}))
      refs[variant][name] = [_Ref(s2, RANK, kappa=KAPPA, **kw) for _, s2 in _views(shape)]

  state = jax.jit(tx.init)(params)
  update = jax.jit(tx.update)
  errors = {v: {name: [[] for _ in _views(s)] for name, s in shapes.items()} for v in refs}
  updates = {name: [] for name in shapes}
  keys = {name: [] for name in shapes}
  for t in range(STEPS):
    grads = {name: jnp.asarray((grad_means[name] + rng.standard_normal(s))
                               * _per_matrix(grad_scales[name][t], s), jnp.float32)
             for name, s in shapes.items()}
    u, state = update(grads, state, params)
    # The reference reads the projection at its redraw steps only (t % KAPPA == 0).
    mats = _matrices(state[1].bases) if t % KAPPA == 0 else None
    for name, shape in shapes.items():
      leaf_basis = state[1].bases.get(name)
      compressed = leaf_basis is not None
      keys[name].append(np.asarray(leaf_basis.basis.key) if compressed else None)
      matrix = np.asarray(mats[name], np.float64) if compressed and mats else None
      ours = np.asarray(u[name], np.float64)
      updates[name].append(ours)
      for k, (index, s2) in enumerate(_views(shape)):
        p = None if matrix is None else (matrix if index is None else matrix[index])
        g, w, got = (_pick(x, index, s2) for x in (grads[name], params[name], ours))
        for variant in refs:
          ref = refs[variant][name][k]
          assert ref.compressed == compressed, (name, k)
          want = ref.step(g, w, p)
          errors[variant][name][k].append(
              float(np.linalg.norm(got - want) / np.linalg.norm(want)))
    params = optax.apply_updates(params, u)
  return dict(errors=errors, refs=refs, updates=updates, keys=keys, state=state)


def _assert_close(errors, tol=TOL32):
  for name, per_matrix in errors.items():
    for k, errs in enumerate(per_matrix):
      worst = int(np.argmax(errs))
      assert errs[worst] <= tol, (
          f"{name}[{k}]: rel. error {errs[worst]:.2e} at step {worst} "
          f"(all: {['%.1e' % e for e in errs]})")


def _schedule():
  return optax.warmup_cosine_decay_schedule(1e-3, 2 * LR, 6, STEPS, end_value=1e-3)


@functools.lru_cache(maxsize=None)
def _default_run(momentum_dtype=jnp.float32):
  """The authors' config plus decay, against the paper-transfer and optax-transfer refs."""
  return run(SHAPES, tx_kwargs=dict(weight_decay=WD), momentum_dtype=momentum_dtype,
             refs_kwargs={"paper": dict(PAPER, lr=LR, weight_decay=WD),
                          "optax": dict(PAPER, lr=LR, weight_decay=WD, transfer="optax")})


def _config(name):
  """(run result, clipping threshold) of a named configuration."""
  if name == "default":
    return _default_run(), 1.0
  if name == "unfactored":
    kw = dict(factorized_second_moment=False, weight_decay=WD)
    return run(SHAPES, tx_kwargs=kw, refs_kwargs={"paper": dict(PAPER, lr=LR, **kw)},
               seed=1), 1.0
  if name == "no_clip_no_param_scale":
    kw = dict(clipping_threshold=None, multiply_by_parameter_scale=False)
    return run(SHAPES, tx_kwargs=kw, refs_kwargs={"paper": dict(PAPER, lr=LR, **kw)},
               seed=2), None
  if name == "clip_0.5_schedule_decay_mask":
    # Learning rate as an optax schedule; weight decay on all leaves but the bias.
    sched = _schedule()
    mask = {k: k != "bias" for k in SHAPES}
    return run(
        SHAPES, learning_rate=sched, seed=3,
        tx_kwargs=dict(clipping_threshold=0.5, weight_decay=WD, mask=mask),
        refs_kwargs={"paper": dict(PAPER, clipping_threshold=0.5, weight_decay=WD,
                                   lr=lambda t: float(sched(t)))},
        ref_overrides={"bias": dict(weight_decay=None)}), 0.5
  raise ValueError(name)


CONFIGS = ["default", "unfactored", "no_clip_no_param_scale", "clip_0.5_schedule_decay_mask"]


@pytest.mark.parametrize("config", CONFIGS)
def test_matches_float64_reference(config):
  result, threshold = _config(config)
  _assert_close(result["errors"]["paper"])

  # Redraws at t = 0, KAPPA, 2 KAPPA, ... and only there: >= 2 after step 0.
  redraws = list(range(KAPPA, STEPS, KAPPA))
  assert len(redraws) >= 2
  for name in COMPRESSED:
    ks = result["keys"][name]
    changed = [t for t in range(1, STEPS) if not np.array_equal(ks[t], ks[t - 1])]
    assert changed == redraws, (name, changed)

  # The clip binds at some steps and not at others. The compressed outputs carry
  # ``up(down(.))`` (about sqrt(min side / r) larger), so at threshold 1 they are the ones
  # clipped; the 0.5 config also clips the uncompressed leaves at some steps. With the clip
  # off, the output does exceed 1 at some steps (turning it off is observable).
  refs = result["refs"]["paper"]
  binds = {n: int(np.sum(np.array(refs[n][0].pre_clip_rms) > (threshold or 1.0)))
           for n in SHAPES}
  assert all(0 < binds[n] < STEPS for n in COMPRESSED), binds
  if threshold is not None and threshold < 1.0:
    assert all(0 < binds[n] < STEPS for n in SHAPES), binds


def test_square_compresses_output_axis():
  """The tie rule: a square (in, out) kernel compresses axis 1 (the output); the shapes
  of the projection and of the momentum follow the reference's for each orientation."""
  params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in SHAPES.items()}
  state = jax.eval_shape(optax_lowrank.flora(LR, RANK, kappa=KAPPA).init, params)
  for name in COMPRESSED:
    m, n = SHAPES[name]
    assert tuple(state[1].bases[name].basis.shape) == proj_shape((m, n), RANK), name
    mom = state[1].inner_state.momentum[name]
    assert mom.shape == ((RANK, n) if m < n else (m, RANK)), name
  assert state[1].inner_state.momentum["square"].shape == (128, RANK)


def test_stacked_leaf_equals_independent_references():
  """(3, in, out) with ``DimensionNumbers(1, 2)``: three matrices, each against its own
  reference with ``matrix()[i]``, with per-matrix clipping and parameter scale (the weight
  scales differ 25x across the stack; the clip binds in one matrix and not another)."""
  shapes = {"s": (3, 128, 128), "bias": (128,)}
  dn = {"s": DimensionNumbers(reduction_axes=1, output_axes=2), "bias": None}
  kw = dict(weight_decay=WD, clipping_threshold=2.0)
  result = run(shapes, tx_kwargs=dict(dimension_numbers=dn, **kw),
               refs_kwargs={"paper": dict(PAPER, lr=LR, **kw)},
               weight_scales={"s": (0.2, 1.0, 5.0)}, seed=4)
  errors = result["errors"]["paper"]
  assert len(errors["s"]) == 3
  _assert_close(errors)
  mats = np.asarray(result["state"][1].bases["s"].basis.matrix())
  assert mats.shape == (3, 128, RANK)
  assert not np.allclose(mats[0], mats[1]) and not np.allclose(mats[1], mats[2])
  rms = np.array([r.pre_clip_rms for r in result["refs"]["paper"]["s"]])  # (3, STEPS)
  clipped = rms > 2.0
  assert np.any(clipped.any(0) & ~clipped.all(0)), rms.round(2)


def test_bfloat16_momentum_close_to_float32():
  """The default bfloat16 momentum runs and stays within 2e-2 of the float32 path."""
  r32, r16 = _default_run(), _default_run(jnp.bfloat16)
  for name in SHAPES:
    assert r16["state"][1].inner_state.momentum[name].dtype == jnp.bfloat16
    for t, (a, b) in enumerate(zip(r16["updates"][name], r32["updates"][name])):
      err = np.linalg.norm(a - b) / np.linalg.norm(b)
      assert err <= TOL_BF16, (name, t, err)
  default = jax.eval_shape(optax_lowrank.flora(LR, RANK).init,
                           {"w": jax.ShapeDtypeStruct((128, 128), jnp.float32)})
  assert default[1].inner_state.momentum["w"].dtype == jnp.bfloat16


def test_optax_code_transfer_differs_after_first_redraw():
  """Negative control: the authors' optax transfer (old projection on both sides) agrees
  up to the first redraw after step 0 and not from then on, for the compressed leaves."""
  errors = _default_run()["errors"]["optax"]
  for name in SHAPES:
    errs = np.array(errors[name][0])
    if name in COMPRESSED:
      assert errs[:KAPPA].max() <= TOL32, (name, errs[:KAPPA])
      assert errs[KAPPA:].min() > NEG_CONTROL, (name, errs[KAPPA:])
    else:
      assert errs.max() <= TOL32, (name, errs)


def test_state_holds_keys_not_projections():
  """Each compressed leaf's basis is one uint32 key; the whole state is the second moment,
  the momenta, the keys and two counters: no projection matrix anywhere."""
  state = _default_run(jnp.bfloat16)["state"]
  expected = 2  # counts of scale_by_factored_rms and lowrank_project
  for name, shape in SHAPES.items():
    leaf_basis = state[1].bases.get(name)
    if name in COMPRESSED:
      (key,) = jax.tree.leaves(leaf_basis)
      assert key.dtype == jnp.uint32 and key.shape == (2,), (name, key)
      m, n = shape
      expected += 2 + RANK * (n if m < n else m)  # key + compressed momentum
    else:
      assert leaf_basis is None, name
      expected += int(np.prod(shape))  # full momentum
    if len(shape) == 2 and min(shape) >= 128:  # factored: v_row, v_col, a (1,) v
      expected += shape[0] + shape[1] + 1
    else:  # full v, (1,) v_row and v_col
      expected += int(np.prod(shape)) + 2
  total = sum(x.size for x in jax.tree.leaves(state))
  assert total == expected, (total, expected)
