"""Exact truncated-SVD subspaces (GaLore) with galore-torch's projection types."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from optax_lowrank import spread
from optax_lowrank.projectors import matmul
from optax_lowrank.projectors.base import Projector

class RightBasis(NamedTuple):
  """Top-``r`` right singular vectors ``Vh[:r]``, ``(batch..., r, n)``."""

  vh: jax.Array

  @property
  def side(self) -> str:
    """``right`` (``matmul.SIDES``)."""
    return "right"


class LeftBasis(NamedTuple):
  """Top-``r`` left singular vectors ``U[:, :r]``, ``(batch..., m, r)``."""

  u: jax.Array

  @property
  def side(self) -> str:
    """``left`` (``matmul.SIDES``)."""
    return "left"


def one_sided_matrix(basis) -> jax.Array:
  """The matrix of a ``RightBasis`` (``vh``) or ``LeftBasis`` (``u``)."""
  return basis.vh if isinstance(basis, RightBasis) else basis.u


def one_sided_like(like, matrix: jax.Array):
  """``matrix`` as a basis of ``like``'s side (``RightBasis`` or ``LeftBasis``)."""
  return RightBasis(matrix) if isinstance(like, RightBasis) else LeftBasis(matrix)


class TwoSidedBasis(NamedTuple):
  """Both sides, for ``proj_type="full"``."""

  u: jax.Array
  vh: jax.Array

  @property
  def side(self) -> str:
    """``full``: both sides."""
    return "full"


def _canonical_signs(u: jax.Array, vh: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Flips singular pairs so each left vector's largest entry is positive.

  SVD signs are arbitrary and differ between LAPACK, cuSOLVER and precisions;
  fixing them makes a refresh (and moments kept across it) reproducible.
  """
  idx = jnp.argmax(jnp.abs(u), axis=-2, keepdims=True)
  sign = jnp.sign(jnp.take_along_axis(u, idx, axis=-2))
  sign = jnp.where(sign == 0, 1.0, sign)
  return u * sign, vh * jnp.swapaxes(sign, -1, -2)


def _top_vectors(g: jax.Array, left: int, right: int) -> tuple[jax.Array, jax.Array]:
  """``(U[:, :left], Vh[:right])`` of ``G`` for ``g = Gᵀ`` ``(batch..., n, m)``, signs
  canonical (``_canonical_signs``). Only these leave the device that computed them."""
  # g = Gᵀ = A S Bᴴ, so G = B S Aᵀ: U = Bᴴᵀ and Vh = Aᵀ.
  a, _, bh = jnp.linalg.svd(g, full_matrices=False)
  u, vh = _canonical_signs(jnp.swapaxes(bh, -1, -2), jnp.swapaxes(a, -1, -2))
  return u[..., :, :left], vh[..., :right, :]


def svd(proj_type: str = "std", *, basis_dtype: Optional[jnp.dtype] = None) -> Projector:
  """Exact truncated SVD of the gradient, computed in float32.

  ``proj_type`` follows galore-torch (matrices oriented ``(output, reduction)``
  as ``nn.Linear.weight``): ``std`` keeps the right singular vectors when
  ``m >= n`` (``R = G Vᵣᵀ``, ``m × r``) and the left ones otherwise
  (``R = Uᵣᵀ G``, ``r × n``), so the larger side stays; ``reverse_std`` does
  the opposite; ``right`` and ``left`` always take that side; ``full``
  projects both (``R = Uᵣᵀ G Vᵣᵀ``, ``r × r``). Arrays keep the parameter's
  layout, so ``R`` is stored as ``Rᵀ``: the gradient ``(batch..., n, m)`` with
  its projected axis replaced by ``r``, which makes every down-projection a
  plain matmul of the gradient. Singular vector signs are made deterministic
  (largest entry of each left vector positive).

  Args:
    proj_type: One of ``std``, ``reverse_std``, ``left``, ``right``, ``full``.
    basis_dtype: Storage dtype of the basis; ``None`` stores it in the
      parameter's dtype, as galore-torch does.

  Returns:
    A ``Projector``.

  Example:
    >>> import optax, optax_lowrank
    >>> tx = optax_lowrank.lowrank_project(
    ...     optax.scale_by_adam(), rank=4,
    ...     projector=optax_lowrank.projectors.svd("full"))

  References:
    Zhao et al., `GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
    Projection <https://arxiv.org/abs/2403.03507>`_, ICML 2024.
  """
  matmul.check_proj_type(proj_type, matmul.PROJ_TYPES)

  def init(info, dtype):
    dtype = basis_dtype or dtype
    side = matmul.side(proj_type, info.m, info.n, info.std_side)
    if side == "right":
      return RightBasis(info.zeros("rn", dtype))
    if side == "left":
      return LeftBasis(info.zeros("mr", dtype))
    return TwoSidedBasis(info.zeros("mr", dtype), info.zeros("rn", dtype))

  def refresh(ctx, g, basis):
    # Each device factorizes its share of a stack; an unstacked leaf is
    # factorized by the device its group's index names (spread.py).
    left = 0 if isinstance(basis, RightBasis) else basis.u.shape[-1]
    right = 0 if isinstance(basis, LeftBasis) else basis.vh.shape[-2]
    u, vh = spread.map_matrices(
        lambda x: _top_vectors(x, left, right), g.astype(jnp.float32),
        owner=ctx.group)
    if isinstance(basis, RightBasis):
      return RightBasis(vh.astype(basis.vh.dtype))
    if isinstance(basis, LeftBasis):
      return LeftBasis(u.astype(basis.u.dtype))
    return TwoSidedBasis(u.astype(basis.u.dtype), vh.astype(basis.vh.dtype))

  def down(basis, g):
    if isinstance(basis, RightBasis):
      return matmul.down_right(basis.vh, g)
    if isinstance(basis, LeftBasis):
      return matmul.down_left(basis.u, g)
    return matmul.down_right(basis.vh, matmul.down_left(basis.u, g))  # (r, r)

  def up(basis, r):
    """The update in the gradient's layout, ``(batch..., n, m)``."""
    if isinstance(basis, RightBasis):
      return matmul.up_right(basis.vh, r)
    if isinstance(basis, LeftBasis):
      return matmul.up_left(basis.u, r)
    vr = jnp.einsum("...rn,...rk->...nk", basis.vh.astype(r.dtype), r)
    return jnp.einsum("...nk,...mk->...nm", vr, basis.u.astype(r.dtype))

  return Projector(init, refresh, down, up)
