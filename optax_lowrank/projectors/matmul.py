"""One-sided projections by a dense matrix, in the parameter's layout.

Gradients arrive as ``g`` of shape ``(batch..., n, m)``, the transpose of the
references' ``G`` (``m × n``); bases keep the references' shapes: ``u`` is
``(batch..., m, r)`` (the left side, rows ``m`` projected) and ``vh`` is
``(batch..., r, n)`` (the right side, columns ``n`` projected). The projected
gradient keeps ``g``'s layout with the projected axis replaced by ``r``: ``Rᵀ``
of the references, ``(n, r)`` on the left and ``(r, m)`` on the right, so each
down-projection is a plain, untransposed matmul of ``g``.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from optax_lowrank import shapes

# The side a one-sided basis projects, in every projector: ``left`` (the rows
# ``m`` of the references' ``G``) or ``right`` (its columns ``n``). Bases name
# theirs as ``basis.side`` (a field, or a property of the SVD bases).
SIDES = ("left", "right")

# galore-torch's projection types, the one vocabulary of every projector's
# ``proj_type`` (``side`` maps each to a side). Every projector takes the
# one-sided ones; ``full`` (both sides) is ``projectors.svd``'s alone, and
# ``projectors.random`` adds ``smaller`` (Flora's tie rule).
PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
ONE_SIDED = PROJ_TYPES[:4]


def check_proj_type(proj_type, accepted: tuple[str, ...] = ONE_SIDED,
                    hint: str = "") -> None:
  """Raises ``ValueError`` naming ``proj_type`` unless it is in ``accepted``."""
  if not isinstance(proj_type, str) or proj_type not in accepted:
    raise ValueError(
        f"`proj_type` must be one of {accepted}, got {proj_type!r}{hint}")


def side(proj_type: str, m: int, n: int, std_side: Optional[str] = None) -> str:
  """galore-torch's rule for the side a ``proj_type`` projects.

  Args:
    proj_type: ``std`` (compress the smaller side: ``right`` when ``m >= n``),
      ``reverse_std`` (the opposite), ``smaller`` (the smaller side, but the
      rows ``m`` on a tie: Flora's optax rule), ``left``, ``right`` or
      ``full``.
    m: Rows (output size) of the reference-oriented matrix.
    n: Columns (reduction size).
    std_side: The side ``std`` compresses when the matricize stage fixes it
      (``MatrixInfo.std_side``); ``reverse_std`` takes the other one.

  Returns:
    ``left``, ``right`` or ``full``.
  """
  std = std_side or ("right" if m >= n else "left")
  if proj_type == "std":
    return std
  if proj_type == "reverse_std":
    return "left" if std == "right" else "right"
  if proj_type == "smaller":
    return "right" if n < m else "left"
  return proj_type


def down_left(u: jax.Array, g: jax.Array) -> jax.Array:
  """``(Uᵀ G)ᵀ = g U``, ``(batch..., n, r)``: the rows ``m`` are projected.

  Under explicit sharding ``u`` is first sharded like ``g`` along the axis
  they contract (a no-op for a basis born so; a local slice for one kept
  whole), so ``g`` is never gathered.
  """
  spec = shapes.explicit_spec(g)
  u = shapes.reshard_to(u, shapes.partition(spec, "mr"))
  out = None if spec is None else (*spec[:-1], None)
  return jnp.einsum("...nm,...mr->...nr", g, u.astype(g.dtype),
                    out_sharding=shapes.out_sharding(out))


def down_right(vh: jax.Array, g: jax.Array) -> jax.Array:
  """``(G Vᵀ)ᵀ = V g``, ``(batch..., r, m)``: the columns ``n`` are projected.

  ``vh`` is sharded like ``g`` along ``n`` first, as in ``down_left``.
  """
  spec = shapes.explicit_spec(g)
  vh = shapes.reshard_to(vh, shapes.partition(spec, "rn"))
  out = None if spec is None else (*spec[:-2], None, spec[-1])
  return jnp.einsum("...rn,...nm->...rm", vh.astype(g.dtype), g,
                    out_sharding=shapes.out_sharding(out))


def up_left(u: jax.Array, r: jax.Array) -> jax.Array:
  """``(U R)ᵀ = Rᵀ Uᵀ``, back to ``(batch..., n, m)``."""
  return jnp.einsum("...nr,...mr->...nm", r, u.astype(r.dtype))


def up_right(vh: jax.Array, r: jax.Array) -> jax.Array:
  """``(R V)ᵀ = Vᵀ Rᵀ``, back to ``(batch..., n, m)``."""
  return jnp.einsum("...rn,...rm->...nm", vh.astype(r.dtype), r)
