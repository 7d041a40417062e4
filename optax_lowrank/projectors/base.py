"""The projector interface: how a subspace is found and used."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Optional

import jax

from optax_lowrank.shapes import MatrixInfo

Basis = Any  # a pytree of arrays


class RefreshContext(NamedTuple):
  """What a projector's ``refresh`` may read besides the gradient and basis.

  ``lowrank_project`` builds one per projected leaf and step; every field is
  an array (or ``None``), so it passes through ``lax.cond`` and ``jit``.

  Attributes:
    step: The optimizer step (int32 scalar), counted from 0.
    key: A PRNG key for this refresh. Leaves of one group (``group_fn`` of
      ``lowrank_project``) receive the same key, so that a random choice
      drawn from it (layers, coordinates, a Gaussian block of the same
      shape) is the same for all of them.
    params: The leaf's parameters in the gradient's layout
      ``(batch..., n, m)``, or ``None`` when ``update`` was called without
      parameters.
    first_moment: The inner optimizer's first moment of this leaf in the
      subspace (``down``'s layout, float32) as it was before this step's
      gradient, for projectors with ``reads_first_moment``; else ``None``.
    group: The index of the leaf's group (int32 scalar): groups are numbered
      in the order of their first leaf.
    due: For a projector with a ``due`` hook, the matrices it chose to
      renew at this step (bool, ``(batch...)``); else ``None``.
  """

  step: jax.Array
  key: jax.Array
  params: Optional[jax.Array] = None
  first_moment: Optional[jax.Array] = None
  group: Optional[jax.Array] = None
  due: Optional[jax.Array] = None


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
    refresh: ``refresh(ctx: RefreshContext, g, basis) -> basis``, a new
      basis from the float32 gradient ``g``. Runs only on refresh steps.
    down: ``down(basis, g) -> r``, the gradient in the subspace.
    up: ``up(basis, r) -> g``, back to the full space in ``g``'s layout
      ``(batch..., n, m)`` (no scale applied).
    reads_first_moment: ``False`` for projectors that need the gradient
      only. ``True`` (COAP) makes ``lowrank_project`` fill
      ``ctx.first_moment`` with the inner optimizer's float32 first moment of
      this leaf in the subspace (``down``'s layout), as it was before this
      step's gradient; the inner optimizer must then keep exactly one
      (``mu``, ``trace`` or ``momentum``, see ``moments.FIRST_MOMENT_FIELDS``)
      per projected leaf.
    due: ``None`` (``lowrank_project``'s schedule decides when the leaf
      refreshes), or ``due(step, r, basis) -> bool (batch...)``: which
      matrices of the leaf renew their subspace at this step, decided every
      step from the projected gradient in the current basis,
      ``r = down(basis, g)`` (the same ``r`` the step then uses where
      nothing is renewed; ``schedules.on_convergence``). The leaf's
      ``lax.cond`` runs ``refresh`` when any is due, with the choice in
      ``ctx.due``; ``refresh`` must renew only those matrices and keep the
      others' basis as it was, and the refresh policy acts on them only.
  """

  init: Callable[[MatrixInfo, Any], Basis]
  refresh: Callable[..., Basis]
  down: Callable[[Basis, jax.Array], jax.Array]
  up: Callable[[Basis, jax.Array], jax.Array]
  reads_first_moment: bool = False
  due: Optional[Callable[[jax.Array, jax.Array, Basis], jax.Array]] = None


def check_wrappable(projector: Projector, wrapper: str) -> None:
  """Raises if ``projector`` cannot be wrapped by ``wrapper``.

  Wrappers (granularity, lazy refresh, adaptive rank, a quantized basis) call
  ``refresh`` on a basis of their own making, whose layout the inner
  optimizer's first moment does not share, so they cannot hand it on to a
  projector that reads one.
  """
  if not isinstance(projector, Projector):
    raise ValueError(
        f"`projector` must be a Projector (for {wrapper}), got {projector!r}")
  if projector.due is not None:
    raise ValueError(
        f"{wrapper} cannot wrap a projector that decides its own refreshes "
        "(due, e.g. schedules.on_convergence); wrap the other way round, "
        f"schedules.on_convergence({wrapper}(projector), ...).")
  if projector.reads_first_moment:
    raise ValueError(
        f"{wrapper} cannot wrap a projector that reads the inner optimizer's "
        "first moment (reads_first_moment=True, e.g. projectors.coap); give "
        "it to lowrank_project directly."
    )
