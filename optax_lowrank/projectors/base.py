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
    reads_first_moment: ``False`` for projectors that need the gradient
      only. ``True`` (COAP) makes ``lowrank_project`` call
      ``refresh(g, basis, key, step, first_moment)``, where ``first_moment``
      is the inner optimizer's float32 first moment of this leaf in the
      subspace (``down``'s layout), as it was before this step's gradient;
      the inner optimizer must then keep exactly one (``mu``, ``trace`` or
      ``momentum``, see ``moments.FIRST_MOMENT_FIELDS``) per projected leaf.
  """

  init: Callable[[MatrixInfo, Any], Basis]
  refresh: Callable[..., Basis]
  down: Callable[[Basis, jax.Array], jax.Array]
  up: Callable[[Basis, jax.Array], jax.Array]
  reads_first_moment: bool = False


def check_wrappable(projector: Projector, wrapper: str) -> None:
  """Raises if ``projector`` cannot be wrapped by ``wrapper``.

  Wrappers (granularity, lazy refresh, adaptive rank, a quantized basis) call
  ``refresh(g, basis, key, step)`` on a basis of their own making, so they
  cannot hand a first moment to a projector that reads one.
  """
  if not isinstance(projector, Projector):
    raise ValueError(
        f"`projector` must be a Projector (for {wrapper}), got {projector!r}")
  if projector.reads_first_moment:
    raise ValueError(
        f"{wrapper} cannot wrap a projector that reads the inner optimizer's "
        "first moment (reads_first_moment=True, e.g. projectors.coap); give "
        "it to lowrank_project directly."
    )
