"""COAP: a basis corrected by one gradient step between occasional range finds."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from optax_lowrank import numerics, shapes
from optax_lowrank.projectors import matmul
from optax_lowrank.projectors.base import Projector
from optax_lowrank.projectors.online_pca import reconstruction_error
from optax_lowrank.projectors.randomized_svd import (
    _cholesky_qr2, randomized_subspace)
from optax_lowrank.projectors.svd import (
    one_sided_like, one_sided_matrix, svd)

# torch.nn.functional.cosine_similarity's default ``eps``: each vector's norm
# is clamped below at it.
COSINE_EPS = 1e-8
# torch.nn.utils.clip_grad_norm_'s guard: ``max_norm / (norm + 1e-6)``.
CLIP_EPS = 1e-6


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class COAPBasis:
  """State of ``coap``.

  Attributes:
    basis: The projection matrix (``RightBasis`` or ``LeftBasis``); after a
      correction step its rows (columns) are no longer exactly orthonormal,
      and it is used as it is, as in the reference code.
    count: Refreshes taken so far (int32): every ``reproject_factor``-th one,
      the first included, recomputes the basis by a range finder.
  """

  basis: Any
  count: jax.Array


def _live_columns(x: jax.Array) -> jax.Array:
  """``(batch..., 1, r)``: each column of ``x`` is nonzero and finite."""
  square = jnp.sum(jnp.square(x), axis=-2, keepdims=True)
  return jnp.isfinite(square) & (square > 0)


def fill_dead_columns(vectors: jax.Array, previous: jax.Array,
                      key: jax.Array) -> jax.Array:
  """A range find's basis vectors with its zero or non-finite ones replaced.

  A gradient that is exactly zero (a layer behind a zero-initialized one) or
  of rank below ``r`` leaves zero vectors from the range finder, and nothing
  brings them back: the next range find starts from them (``Y = A Ω`` is zero
  along them), and the correction step's gradient vanishes along a zero row
  of ``P`` (both of its terms are linear in it). Each dead column is therefore
  replaced by the previous basis's column of the same index if that one is
  live (a zero gradient carries no information, so the old direction is
  kept), else by a Gaussian column drawn from ``key`` (a fresh random start,
  as at the first range find). The replacements are made orthogonal to the
  live vectors (projected out twice, "twice is enough") and orthonormal among
  themselves (CholeskyQR2), so the basis stays orthonormal; live vectors are
  returned bit for bit. Only contractions over the vectors' length are used,
  ending in ``r × r`` reductions, so a sharded basis is never gathered.

  Args:
    vectors: ``(batch..., p, r)`` float32, columns unit or zero.
    previous: ``(batch..., p, r)``, the basis the range find replaces.
    key: PRNG key for the Gaussian columns.

  Returns:
    ``vectors`` with every dead column replaced, same shape and sharding.
  """
  spec = shapes.explicit_spec(vectors)
  batch = None if spec is None else tuple(spec[:-2])
  small = shapes.out_sharding(None if spec is None else batch + (None, None))
  same = shapes.out_sharding(spec)
  live = _live_columns(vectors)
  kept = jnp.where(live, vectors, 0.0)
  drawn = jax.random.normal(key, vectors.shape, jnp.float32, out_sharding=same)
  previous = previous.astype(jnp.float32)
  fill = jnp.where(_live_columns(previous), previous, drawn)
  fill = jnp.where(live, 0.0, fill)
  for _ in range(2):
    overlap = jnp.einsum("...pk,...pl->...kl", kept, fill, out_sharding=small)
    fill = fill - jnp.einsum("...pk,...kl->...pl", kept, overlap,
                             out_sharding=same)
  fill = _cholesky_qr2(fill, batch)
  return jnp.where(live, vectors, fill)


def keep_if_moment_not_finite(new: jax.Array, old: jax.Array,
                              moment: jax.Array) -> jax.Array:
  """``new`` where the first moment of its matrix is finite, else ``old``.

  The correction step reads the inner optimizer's first moment, which one
  non-finite gradient can leave NaN or infinite for good (while the step's own
  gradient is finite, so ``lowrank_project``'s guard does not apply). Such a
  matrix keeps its basis rather than taking a step without the moment term:
  the step's objective is ``mse · (1 − cos(M P, G))``, undefined without
  ``M``, and a step on the reconstruction error alone is one COAP never takes
  (its scale differs by the factor ``1 − cos`` in ``[0, 2]``). Keeping the
  basis is what a skipped refresh does, and the next range find, which does
  not read the moment, recomputes it on schedule.

  Args:
    new: The corrected basis matrix, ``(batch..., a, b)``.
    old: The basis matrix before the step, same shape.
    moment: The projected first moment, ``(batch..., c, d)``.

  Returns:
    ``new`` or ``old`` per matrix of the batch.
  """
  finite = jnp.all(jnp.isfinite(moment), axis=(-2, -1), keepdims=True)
  return jnp.where(finite, new, old)


def _one_minus_mean_cosine(x: jax.Array, g: jax.Array, x_eps=COSINE_EPS,
                           g_eps=COSINE_EPS) -> jax.Array:
  """``1 − mean_i cos(X_i, G_i)`` over the rows of the references' matrices.

  ``x`` and ``g`` are in the parameter's layout ``(batch..., n, m)``, so the
  references' rows (``m`` of them, each of length ``n``) are columns here.
  Each norm is clamped below at ``COSINE_EPS`` (``x_eps``, ``g_eps`` for
  inputs divided by a scale: ``COSINE_EPS / scale``) and differentiated as if
  it were not, as torch's ``cosine_similarity`` does; a zero column has a zero
  gradient through its norm.
  """
  def unit(v, eps):
    square = jnp.sum(jnp.square(v), axis=-2, keepdims=True)
    norm = jnp.where(square > 0, jnp.sqrt(jnp.where(square > 0, square, 1.0)),
                     0.0)
    clamp = jax.lax.stop_gradient(jnp.maximum(norm, eps) - norm)
    return v / (norm + clamp)

  cos = jnp.sum(unit(x, x_eps) * unit(g, g_eps), axis=-2)  # (batch..., m)
  return 1.0 - jnp.mean(cos, axis=-1)


def correction_loss_and_grad(
    p: jax.Array, moment: jax.Array, g: jax.Array, side: str, *,
    moment_scale=1.0, g_scale=1.0,
) -> tuple[jax.Array, jax.Array]:
  """COAP's loss on the basis ``P`` and its gradient in ``P``.

  In the references' orientation (``G`` is ``m × n``; on the right ``P`` is
  ``r × n`` and the projected first moment ``M`` is ``m × r``, on the left
  ``P`` is ``m × r`` and ``M`` is ``r × n``)::

      L(P) = mean((G PᵀP − G)²) · (1 − mean_i cos((M P)_i, G_i))   (right)
      L(P) = mean((P Pᵀ G − G)²) · (1 − mean_i cos((P M)_i, G_i))  (left)

  with means over the ``m·n`` entries and the ``m`` rows. The product rule
  runs through both factors (``M P`` depends on ``P``): the first factor's
  gradient is ``reconstruction_error``'s, the cosine's comes from ``jax.vjp``
  of an elementwise map of the back-projected moment and is carried to ``P``
  by one contraction with ``M``.

  Args:
    p: ``(batch..., r, n)`` (right) or ``(batch..., m, r)`` (left), float32.
    moment: The projected first moment in ``down``'s layout: ``(batch..., r,
      m)`` (right) or ``(batch..., n, r)`` (left).
    g: The gradient, ``Gᵀ`` in the parameter's layout ``(batch..., n, m)``.
    side: ``right`` or ``left``.
    moment_scale: ``moment`` is the first moment divided by this (an array
      broadcasting against it, or a float); only the cosine's norm clamp
      depends on it, which becomes ``COSINE_EPS / moment_scale``.
    g_scale: The same for ``g``. With both scales powers of two, the loss and
      gradient are those of the unscaled inputs divided by ``g_scale²``
      exactly (barring underflow), which ``correction_step`` uses.

  Returns:
    ``(loss, grad)``: ``(batch...)`` and ``p``'s shape.
  """
  n, m = g.shape[-2:]
  error, error_grad = reconstruction_error(p, g, side)
  mse, mse_grad = error / (m * n), error_grad / (m * n)
  up = matmul.up_right if side == "right" else matmul.up_left
  x = up(p, moment)  # (M P)ᵀ or (P M)ᵀ, (batch..., n, m)
  # Below the smallest normal float a clamp could flush to zero (0/0 on a zero
  # column); the smallest normal is as good a clamp there.
  tiny = jnp.finfo(jnp.float32).tiny
  x_eps = jnp.maximum(COSINE_EPS / moment_scale, tiny)
  g_eps = jnp.maximum(COSINE_EPS / g_scale, tiny)
  cosine_term, vjp = jax.vjp(
      lambda x: _one_minus_mean_cosine(x, g, x_eps, g_eps), x)
  (dx,) = vjp(jnp.ones_like(cosine_term))
  out = shapes.out_sharding(shapes.explicit_spec(p))
  if side == "right":  # X = M P: dL/dP = Mᵀ dL/dX
    cosine_grad = jnp.einsum("...rm,...nm->...rn", moment, dx,
                             out_sharding=out)
  else:  # X = P M: dL/dP = dL/dX Mᵀ
    cosine_grad = jnp.einsum("...nm,...nr->...mr", dx, moment,
                             out_sharding=out)
  expand = (...,) + (None,) * 2
  loss = mse * cosine_term
  grad = cosine_term[expand] * mse_grad + mse[expand] * cosine_grad
  return loss, grad


def correction_step(p: jax.Array, moment: jax.Array, g: jax.Array, side: str,
                    learning_rate: float, max_grad_norm: float) -> jax.Array:
  """One clipped gradient step on ``correction_loss_and_grad``, overflow-safe.

  ``P − learning_rate · min(1, max_grad_norm / (‖∇L‖ + CLIP_EPS)) · ∇L``, per
  matrix (torch's ``clip_grad_norm_``). ``∇L`` grows as ``‖G‖²``, so its
  squared norm overflowed float32 from gradients of about 1e17 (0 · inf =
  NaN in the step). Here ``G`` and the moment are divided by powers of two
  ``s`` and ``s_m`` near their largest entries
  (``numerics.power_of_two_scale``), the loss's gradient is taken there
  (``∇L / s²``: the cosine factor does not depend on either scale), and the
  clip is written in those units:
  ``(learning_rate · min(s², max_grad_norm / (‖∇L/s²‖ + CLIP_EPS/s²))) ·
  ∇L/s²``. Every rescaling is by a power of two, so for gradients whose
  ``s²`` is a normal float (``1e-19 < max |G| < 1e19``) the result is the
  unscaled formula's bit for bit; beyond, it stays finite for any finite
  ``G`` (the clip then always binds, and the step is ``learning_rate ·
  max_grad_norm`` along ``∇L``'s direction, as it would be in exact
  arithmetic).

  Args:
    p: The basis matrix, float32, as for ``correction_loss_and_grad``.
    moment: The projected first moment, float32, finite.
    g: The gradient ``Gᵀ``, float32, finite.
    side: ``right`` or ``left``.
    learning_rate: The step size.
    max_grad_norm: The clip.

  Returns:
    The new basis matrix, shaped like ``p``.
  """
  g_scale = numerics.power_of_two_scale(g)
  moment_scale = numerics.power_of_two_scale(moment)
  _, grad = correction_loss_and_grad(
      p, moment / moment_scale, g / g_scale, side,
      moment_scale=moment_scale, g_scale=g_scale)
  norm = jnp.sqrt(jnp.sum(jnp.square(grad), axis=(-2, -1), keepdims=True))
  square = jnp.square(g_scale)  # inf beyond 1.8e19: the min picks the clip
  factor = jnp.minimum(square, max_grad_norm / (norm + CLIP_EPS / square))
  return p - (learning_rate * factor) * grad


def coap(
    reproject_factor: int = 5,
    proj_type: str = "std",
    *,
    learning_rate: float = 0.1,
    max_grad_norm: float = 1.0,
    basis_dtype: Optional[jnp.dtype] = None,
) -> Projector:
  """COAP's projector: range finds, and a correction step between them.

  Every refresh of a leaf (``lowrank_project``'s schedule: step 0 and every
  ``update_proj_gap`` steps, the code's ``update_interval``) does one of two
  things, counted per leaf:

  * every ``reproject_factor``-th refresh, the first included, recomputes
    the basis by a range finder without power iterations or oversampling
    (the code's ``compute_orthogonal``): ``Y = A Ω``, ``Q = orth(Y)``, the
    top ``r`` right singular vectors of ``QᵀA``, where ``A`` is ``G`` for a
    right basis (``Vh``, ``r × n``) and ``Gᵀ`` for a left one (``U``,
    ``m × r``), and ``Ω`` is the previous basis (``Vhᵀ`` or ``U``) or, at the
    first refresh, a Gaussian block drawn from the refresh key (the code
    seeds a fixed ``torch.Generator``);
  * otherwise it takes one gradient step on the basis with learning rate
    ``learning_rate`` on ``correction_loss_and_grad`` (reconstruction error
    times one minus the mean row cosine between the back-projected first
    moment and ``G``), the gradient clipped to norm ``max_grad_norm`` per
    matrix first (``clip_grad_norm_``).

  The step uses the first moment of the inner optimizer as it was before
  this step's gradient, which ``lowrank_project`` hands to ``refresh``
  (``reads_first_moment``). The orthonormalization and the small SVD are
  ``randomized_svd``'s (CholeskyQR2, ``eigh`` of ``k × k``), so a sharded
  gradient is never gathered. They give the code's basis up to the signs of
  its vectors, which the code leaves to the SVD library. The signs matter,
  since the moments are kept in the old basis's coordinates across a
  recomputation: here each recomputed vector has a non-negative inner product
  with the one it replaces, so a moment keeps pointing the same way.

  Three safeguards the code does not have: a range find that leaves zero or
  non-finite vectors (a zero gradient, e.g. behind a zero-initialized layer)
  fills them from the previous basis or a fresh Gaussian draw
  (``fill_dead_columns``), since nothing would revive them; a correction whose
  first moment is not finite keeps the basis (``keep_if_moment_not_finite``);
  and the correction is computed on power-of-two rescaled inputs
  (``correction_step``), the same step bit for bit where the plain one is
  finite and a finite one for any finite gradient.

  Args:
    reproject_factor: Every how many refreshes the basis is recomputed.
    proj_type: ``std`` (the code: the right side when ``m >= n``),
      ``reverse_std``, ``left`` or ``right``.
    learning_rate: Step size of the correction (the code: 0.1).
    max_grad_norm: Clip of the correction's gradient norm (the code: 1.0).
    basis_dtype: Storage dtype of the basis; ``None`` stores it in the
      parameter's dtype, as the code does.

  Returns:
    A ``Projector`` whose basis is a ``COAPBasis``.

  Example:
    >>> import optax, optax_lowrank
    >>> from optax_lowrank.projectors import coap
    >>> tx = optax_lowrank.lowrank_project(
    ...     optax.scale_by_adam(), rank=4, update_proj_gap=32,
    ...     projector=coap(reproject_factor=5))

  References:
    Xiao et al., `COAP: Memory-Efficient Training with Correlation-Aware
    Gradient Projection <https://arxiv.org/abs/2412.00071>`_, CVPR 2025;
    code: github.com/bytedance/coap (``coap_torch/optimizer/adamw.py``,
    ``projection/coap_matrix.py``, ``utils/orthogonal.py``).
  """
  if (isinstance(reproject_factor, bool) or not isinstance(reproject_factor, int)
      or reproject_factor < 1):
    raise ValueError(
        f"`reproject_factor` must be a positive int, got {reproject_factor!r}")
  matmul.check_proj_type(proj_type)
  for name, value in (("learning_rate", learning_rate),
                      ("max_grad_norm", max_grad_norm)):
    if not isinstance(value, (int, float)) or not value > 0:
      raise ValueError(f"`{name}` must be a positive float, got {value!r}")
  exact = svd(proj_type, basis_dtype=basis_dtype)

  def init(info, dtype):
    return COAPBasis(exact.init(info, dtype), jnp.zeros([], jnp.int32))

  def recompute(g, state, key, moment):
    del moment
    basis = state.basis
    right = basis.side == "right"
    a = jnp.swapaxes(g, -1, -2) if right else g  # (p, q): G right, Gᵀ left
    # Y = A Ω spans the same space whatever A's scale; this keeps the Gram
    # matrices of CholeskyQR finite.
    a = a / jnp.maximum(jnp.max(jnp.abs(a), axis=(-2, -1), keepdims=True),
                        jnp.finfo(jnp.float32).tiny)
    previous = one_sided_matrix(basis).astype(jnp.float32)
    if right:
      previous = jnp.swapaxes(previous, -1, -2)  # Vhᵀ, (n, r)
    spec = shapes.explicit_spec(previous)
    drawn = jax.random.normal(key, previous.shape, jnp.float32,
                              out_sharding=shapes.out_sharding(spec))
    omega = jnp.where(state.count == 0, drawn, previous)
    rank = omega.shape[-1]
    _, image = randomized_subspace(a, omega, rank, power_iters=0)
    # image = Aᵀ Q W: the right singular vectors of QᵀA times their values.
    norm = jnp.sqrt(jnp.sum(jnp.square(image), axis=-2, keepdims=True))
    vectors = image / jnp.where(norm > 0, norm, 1.0)
    vectors = fill_dead_columns(vectors, previous, jax.random.fold_in(key, 1))
    # The moments stay in the coordinates of the old basis: keep each vector
    # on the side of its predecessor (an SVD's signs are arbitrary).
    agree = jnp.sum(vectors * previous, axis=-2, keepdims=True)
    vectors = jnp.where(agree < 0, -vectors, vectors)
    if right:
      vectors = jnp.swapaxes(vectors, -1, -2)
    return one_sided_like(basis, vectors)

  def correct(g, state, key, moment):
    del key
    basis = state.basis
    side = basis.side
    p = one_sided_matrix(basis).astype(jnp.float32)
    new = correction_step(p, moment, g, side, learning_rate, max_grad_norm)
    return one_sided_like(basis, keep_if_moment_not_finite(new, p, moment))

  def refresh(ctx, g, state):
    def stored(branch):
      def run(*args):
        new = branch(*args)
        return jax.tree.map(
            lambda x, old: shapes.reshard_like(x.astype(old.dtype), old),
            new, state.basis)
      return run
    basis = jax.lax.cond(
        state.count % reproject_factor == 0, stored(recompute),
        stored(correct), g, state, ctx.key,
        ctx.first_moment.astype(jnp.float32))
    return COAPBasis(basis, state.count + 1)

  def down(state, g):
    return exact.down(state.basis, g)

  def up(state, r):
    return exact.up(state.basis, r)

  return Projector(init, refresh, down, up, reads_first_moment=True)
