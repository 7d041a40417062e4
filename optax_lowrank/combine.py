"""Combine rules: how the full-space update is built from the subspace one.

A rule sees, per projected leaf, the matricized gradient ``g``
``(batch..., n, m)``, its projection ``r = down(basis, g)``, the inner
optimizer's output ``n`` (same shape as ``r``) and the leaf's basis, and
returns the update in ``g``'s layout. A rule may keep a small state of its own
per leaf (the norm-growth limiter's last norm, a factored second moment).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optax_lowrank.projectors.base import Projector
from optax_lowrank.shapes import MatrixInfo


class CombineRule(NamedTuple):
  """A combine rule: two pure functions.

  Attributes:
    init: ``init(info: MatrixInfo) -> state``, the rule's per-leaf state
      (a pytree of arrays; ``()`` for stateless rules).
    apply: ``apply(projector, basis, g, r, n, scale, state) -> (u, state)``,
      the update ``u`` in ``g``'s layout ``(batch..., n, m)``.
  """

  init: Callable[[MatrixInfo], Any]
  apply: Callable[
      [Projector, Any, jax.Array, jax.Array, jax.Array, Any, Any],
      tuple[jax.Array, Any],
  ]


def back_project() -> CombineRule:
  """``U = scale · up(basis, N)``: GaLore's back-projection (stateless).

  Returns:
    A ``CombineRule``.

  Example:
    >>> import optax, optax_lowrank
    >>> tx = optax_lowrank.lowrank_project(
    ...     optax.scale_by_adam(), rank=4,
    ...     combine=optax_lowrank.combine.back_project())

  References:
    Zhao et al., `GaLore <https://arxiv.org/abs/2403.03507>`_, 2024, Alg. 2.
  """

  def apply(projector, basis, g, r, n, scale, state):
    del g, r
    return scale * projector.up(basis, n), state

  return CombineRule(lambda info: (), apply)
