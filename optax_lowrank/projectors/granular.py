"""VLoRP's projection granularity: any projector, applied to regrouped rows."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from optax_lowrank import shapes
from optax_lowrank.projectors.base import Projector, check_wrappable


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GranularBasis:
  """The wrapped projector's basis for the regrouped matrix.

  Attributes:
    basis: The wrapped projector's basis, built for ``(m2, n2)``.
    m: Rows of the leaf's matrix before regrouping (static).
    n: Columns before regrouping (static).
    m2: Rows of the regrouped matrix (static).
    n2: Columns of the regrouped matrix (static).

  Nothing here depends on a device mesh: ``down`` regroups the gradient as
  it is sharded, and ``up`` ungroups as the wrapped projector's output is
  (the core then reshards the update like the gradient).
  """

  basis: Any
  m: int = dataclasses.field(metadata=dict(static=True))
  n: int = dataclasses.field(metadata=dict(static=True))
  m2: int = dataclasses.field(metadata=dict(static=True))
  n2: int = dataclasses.field(metadata=dict(static=True))


def granular(projector: Projector, granularity) -> Projector:
  """Runs ``projector`` on VLoRP's regrouped matrix of granularity ``c``.

  Each matrix ``G`` (``m × n``, references' orientation) is reshaped
  row-major to ``(m·c, n/c)`` when ``m >= n`` and to ``(m/c, n·c)``
  otherwise (``shapes.granular_shape``); ``projector`` finds, applies and
  inverts its subspace on that matrix, and ``up`` reshapes back. The side a
  ``proj_type="std"`` projector compresses is the original matrix's smaller
  side (right when ``m >= n``), as in the reference code, even where ``c < 1``
  makes it the longer side of the regrouped matrix. A random projection of
  rank ``r`` then keeps ``max(m, n)·c·r`` numbers per matrix: the budget
  ``c·r`` is split between finer units (``c``) and rank (``r``).

  ``lowrank_project(..., granularity=c)`` applies this to its projector;
  combine rules still see the leaf's own matrix, so rules defined on it
  (APOLLO's channels, ProjFactor's row and column factors) keep their meaning.

  Args:
    projector: Any ``Projector``.
    granularity: ``c``, a power of two (``c < 1`` allowed). It must fit each
      projected matrix; ``init`` says which leaf does not.

  Returns:
    A ``Projector`` whose basis is a ``GranularBasis``.

  Example:
    >>> import optax, optax_lowrank
    >>> from optax_lowrank import projectors
    >>> p = projectors.granular(projectors.random(std="rank"), 16)
    >>> tx = optax_lowrank.lowrank_project(optax.scale_by_adam(), rank=2,
    ...                                    projector=p)

  References:
    Wang et al., `Memory-Efficient LLM Training by Various-Grained Low-Rank
    Projection of Gradients <https://arxiv.org/abs/2505.01744>`_, ICML 2025.
  """
  shapes.validate_granularity(granularity)
  check_wrappable(projector, "granularity (projectors.granular)")

  def init(info, dtype):
    m2, n2, side = shapes.granular_shape(info.m, info.n, granularity)
    if info.rank > (n2 if side == "right" else m2):
      raise ValueError(
          f"rank {info.rank} exceeds the projected side of the regrouped "
          f"matrix ({m2}, {n2}) for `granularity` {granularity!r}; use a "
          "smaller rank or granularity"
      )
    # The regrouped view's sharding, read off a regrouped stand-in (traced
    # only: init runs under jax.eval_shape or jit).
    inner_spec = None if info.spec is None else shapes.explicit_spec(
        shapes.regroup(info.zeros("nm", jnp.float32), m2, n2))
    inner_info = shapes.MatrixInfo(
        info.batch_shape, m2, n2, info.rank, inner_spec, std_side=side)
    return GranularBasis(projector.init(inner_info, dtype), info.m, info.n,
                         m2, n2)

  def refresh(ctx, g, basis):
    # The parameters are regrouped like the gradient, so that a projector
    # reading them sees the same units.
    if ctx.params is not None:
      ctx = ctx._replace(params=shapes.regroup(ctx.params, basis.m2, basis.n2))
    new = projector.refresh(ctx, shapes.regroup(g, basis.m2, basis.n2),
                            basis.basis)
    return dataclasses.replace(basis, basis=new)

  def down(basis, g):
    return projector.down(basis.basis, shapes.regroup(g, basis.m2, basis.n2))

  def up(basis, r):
    return shapes.ungroup(projector.up(basis.basis, r), basis.m, basis.n)

  return Projector(init, refresh, down, up)
