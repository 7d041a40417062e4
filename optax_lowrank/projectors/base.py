"""The projector interface: how a subspace is found and used."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from optax_lowrank.shapes import MatrixInfo

Basis = Any  # a pytree of arrays


class Projector(NamedTuple):
  """Four pure functions over the basis state of one leaf.

  Gradients arrive in the parameter's own layout, ``g`` of shape
  ``(batch..., n, m)``: the transpose of the references' ``G`` (``m × n``,
  output × reduction), so no step pays for transposing the gradient or the
  update; write ``down`` and ``up`` as ``einsum`` contractions on that layout
  (see ``shapes``). Leading batch axes (stacked layers) are carried through,
  each slice with a basis of its own.

  Attributes:
    init: ``init(info: MatrixInfo, dtype) -> basis``, the basis state before
      the first refresh. Must only build arrays (it runs under
      ``jax.eval_shape``); use ``info.zeros`` so the state is sharded like the
      parameter.
    refresh: ``refresh(g, basis, key, step) -> basis``, a new basis from the
      float32 gradient ``g``. Runs only on refresh steps.
    down: ``down(basis, g) -> r``, the gradient in the subspace.
    up: ``up(basis, r) -> g``, back to the full space in ``g``'s layout
      ``(batch..., n, m)`` (no scale applied).
  """

  init: Callable[[MatrixInfo, Any], Basis]
  refresh: Callable[[jax.Array, Basis, jax.Array, jax.Array], Basis]
  down: Callable[[Basis, jax.Array], jax.Array]
  up: Callable[[Basis, jax.Array], jax.Array]
