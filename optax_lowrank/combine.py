"""Combine rules: how the full-space update is built from the subspace one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from optax_lowrank.projectors.base import Projector

# combine(projector, basis, g, r, n, scale) -> full-space update, in g's layout
CombineRule = Callable[[Projector, Any, jax.Array, jax.Array, jax.Array, Any], jax.Array]


def back_project(projector, basis, g, r, n, scale):
  """``U = scale · up(basis, N)``: GaLore's back-projection.

  Args:
    projector: The leaf's ``Projector``.
    basis: The leaf's basis state.
    g: The matricized gradient ``(batch..., n, m)`` (unused here).
    r: The projected gradient ``down(basis, g)`` (unused here).
    n: The inner optimizer's output in the subspace.
    scale: Scalar multiplier (GaLore's ``alpha``).

  Returns:
    The update in the full matrix space.

  References:
    Zhao et al., `GaLore <https://arxiv.org/abs/2403.03507>`_, 2024, Alg. 2.
  """
  del g, r
  return scale * projector.up(basis, n)
