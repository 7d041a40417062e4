"""GoLore: GaLore's SVD subspaces, then random orthonormal ones from a set step."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from optax_lowrank import shapes
from optax_lowrank.projectors.base import Projector
from optax_lowrank.projectors.svd import LeftBasis, RightBasis, svd


def random_stiefel(key: jax.Array, shape: tuple[int, ...], side: str
                   ) -> jax.Array:
  """A Haar-distributed matrix with orthonormal rows (right) or columns (left).

  The polar factor ``Z (ZᵀZ)^{-1/2}`` of a Gaussian ``Z``, as the reference
  code computes it, taken here from the thin SVD of ``Z`` (``U Vh``), which is
  the same matrix without forming the singular ``n × n`` Gram matrix.

  Args:
    key: A PRNG key.
    shape: ``(batch..., r, n)`` for ``right`` or ``(batch..., m, r)`` for
      ``left``.
    side: ``right`` (orthonormal rows) or ``left`` (orthonormal columns).

  Returns:
    The float32 matrix.
  """
  z = jax.random.normal(key, shape, jnp.float32)
  tall = jnp.swapaxes(z, -1, -2) if side == "right" else z  # (batch..., p, r)
  u, _, vh = jnp.linalg.svd(tall, full_matrices=False)
  q = u @ vh
  return jnp.swapaxes(q, -1, -2) if side == "right" else q


def golore(switch_step: int, proj_type: str = "std") -> Projector:
  """GaLore's exact-SVD subspace until ``switch_step``, then random ones.

  Refreshes before step ``switch_step`` take the top-``r`` singular vectors
  of the gradient (``projectors.svd``); refreshes from ``switch_step`` on
  draw a uniformly random subspace (orthonormal rows or columns, from the
  refresh key) instead, which makes the method converge where GaLore's
  gradient-aligned subspaces, biased by the noise of small batches, do not.
  Sides and shapes are GaLore's (``proj_type`` ``std``, ``reverse_std``,
  ``left`` or ``right``).

  Args:
    switch_step: The first step whose refresh is random (the reference's
      ``rand_ratio · num_training_steps``). ``0``: random from the start.
    proj_type: ``std``, ``reverse_std``, ``left`` or ``right``.

  Returns:
    A ``Projector`` whose basis is GaLore's (``RightBasis`` or ``LeftBasis``).

  Example:
    >>> import optax, optax_lowrank
    >>> tx = optax_lowrank.lowrank_project(
    ...     optax.scale_by_adam(), rank=8, update_proj_gap=200,
    ...     projector=optax_lowrank.projectors.golore(switch_step=8000),
    ...     on_refresh="rotate")

  References:
    He et al., `Subspace Optimization for Large Language Models with
    Convergence Guarantees <https://arxiv.org/abs/2410.11289>`_, ICML 2025;
    code: github.com/pkumelon/Golore (``golore_torch``).
  """
  if (isinstance(switch_step, bool) or not isinstance(switch_step, int)
      or switch_step < 0):
    raise ValueError(
        f"`switch_step` must be a non-negative int, got {switch_step!r}")
  if proj_type == "full":
    raise ValueError(
        "`proj_type` must be one of ('std', 'reverse_std', 'left', 'right') "
        "for golore (its random subspaces are one-sided), got 'full'")
  exact = svd(proj_type)

  def random_basis(ctx, g, basis):
    del g
    if isinstance(basis, RightBasis):
      return RightBasis(random_stiefel(ctx.key, basis.vh.shape, "right")
                        .astype(basis.vh.dtype))
    return LeftBasis(random_stiefel(ctx.key, basis.u.shape, "left")
                     .astype(basis.u.dtype))

  def like_old(branch):
    return lambda ctx, g, basis: jax.tree.map(
        shapes.reshard_like, branch(ctx, g, basis), basis)

  def refresh(ctx, g, basis):
    return jax.lax.cond(ctx.step >= switch_step, like_old(random_basis),
                        like_old(exact.refresh), ctx, g, basis)

  return Projector(exact.init, refresh, exact.down, exact.up)
