"""COAP: a basis corrected by one gradient step between occasional range finds."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from optax_lowrank import shapes
from optax_lowrank.projectors import matmul
from optax_lowrank.projectors.base import Projector
from optax_lowrank.projectors.online_pca import reconstruction_error
from optax_lowrank.projectors.randomized_svd import randomized_subspace
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


def _one_minus_mean_cosine(x: jax.Array, g: jax.Array) -> jax.Array:
  """``1 − mean_i cos(X_i, G_i)`` over the rows of the references' matrices.

  ``x`` and ``g`` are in the parameter's layout ``(batch..., n, m)``, so the
  references' rows (``m`` of them, each of length ``n``) are columns here.
  Each norm is clamped below at ``COSINE_EPS`` and differentiated as if it
  were not, as torch's ``cosine_similarity`` does; a zero column has a zero
  gradient through its norm.
  """
  def unit(v):
    square = jnp.sum(jnp.square(v), axis=-2, keepdims=True)
    norm = jnp.where(square > 0, jnp.sqrt(jnp.where(square > 0, square, 1.0)),
                     0.0)
    clamp = jax.lax.stop_gradient(jnp.maximum(norm, COSINE_EPS) - norm)
    return v / (norm + clamp)

  cos = jnp.sum(unit(x) * unit(g), axis=-2)  # (batch..., m)
  return 1.0 - jnp.mean(cos, axis=-1)


def correction_loss_and_grad(
    p: jax.Array, moment: jax.Array, g: jax.Array, side: str
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

  Returns:
    ``(loss, grad)``: ``(batch...)`` and ``p``'s shape.
  """
  n, m = g.shape[-2:]
  error, error_grad = reconstruction_error(p, g, side)
  mse, mse_grad = error / (m * n), error_grad / (m * n)
  up = matmul.up_right if side == "right" else matmul.up_left
  x = up(p, moment)  # (M P)ᵀ or (P M)ᵀ, (batch..., n, m)
  cosine_term, vjp = jax.vjp(lambda x: _one_minus_mean_cosine(x, g), x)
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
    _, grad = correction_loss_and_grad(p, moment, g, side)
    norm = jnp.sqrt(jnp.sum(jnp.square(grad), axis=(-2, -1), keepdims=True))
    clip = jnp.minimum(1.0, max_grad_norm / (norm + CLIP_EPS))
    return one_sided_like(basis, p - learning_rate * clip * grad)

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
