"""What happens to the inner optimizer's moments when a leaf's subspace changes.

A refresh policy is a small object, like a combine rule: ``keep`` (galore-torch),
``reset``, ``rotate_first_moment`` (Flora's transfer, LDAdam/AdaRankGrad-style
rotation of the momentum), ``rotate_moments`` (both moments), or one of your
own. It maps each parameter-shaped inner-state leaf of a refreshed leaf, told
which kind of moment it is and how the subspace changed.

The inner optimizer keeps one state over the whole tree of projected gradients,
so a policy reaches one leaf's moments through ``optax.tree.map_params``: each
parameter-shaped state leaf is matched to the parameter it belongs to. A state
stored quantized (``quantize.quantize_state``) is matched through its
dequantized view, and a changed moment is quantized again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from optax_lowrank import quantize
from optax_lowrank import shapes

# Field names optax uses for first moments (scale_by_adam, lion, trace, ...).
FIRST_MOMENT_FIELDS = ("mu", "trace", "momentum")
# Field names optax uses for second moments (scale_by_adam, scale_by_rms, ...).
SECOND_MOMENT_FIELDS = ("nu",)


class SubspaceChange(NamedTuple):
  """One refreshed leaf: its projector and the basis before and after.

  Attributes:
    projector: The leaf's ``Projector``.
    old: The basis the moments are expressed in.
    new: The basis found by this refresh.
  """

  projector: Any
  old: Any
  new: Any

  def transfer(self, x: jax.Array) -> jax.Array:
    """``down(new, up(old, x))``: ``x`` re-expressed in the new subspace.

    For orthonormal bases this is the rotation ``Pₙᵀ Pₒ x`` (a projection
    where the subspaces differ); for random ones, Flora's transfer.
    """
    p = self.projector
    y = p.down(self.new, p.up(self.old, x)).astype(x.dtype)
    return shapes.reshard_like(y, x)  # as x under explicit mesh axes


# moment(kind, x, fresh, change) -> x' for one parameter-shaped state leaf of
# a refreshed leaf. ``kind`` is "first", "second" or "other" (by optax's
# field names); ``fresh`` is the leaf's value in a freshly initialized state.
MomentMap = Callable[[str, jax.Array, jax.Array, SubspaceChange], jax.Array]


class RefreshPolicy(NamedTuple):
  """What a refresh does to a leaf's inner-optimizer state.

  Attributes:
    moment: ``moment(kind, x, fresh, change) -> x'`` applied, on refresh
      steps only, to each parameter-shaped inner-state leaf of the refreshed
      leaf (``kind``: ``"first"``, ``"second"`` or ``"other"``); ``None``
      keeps the state as it is (no work at all). Shared leaves (a global step
      count) are never touched.
    name: A short name, for messages.
  """

  moment: Optional[MomentMap]
  name: str = "custom"


def keep() -> RefreshPolicy:
  """Moments carry over unchanged (galore-torch, APOLLO, Q-GaLore, COAP).

  Returns:
    A ``RefreshPolicy``.

  Example:
    >>> import optax, optax_lowrank
    >>> tx = optax_lowrank.lowrank_project(
    ...     optax.scale_by_adam(), rank=4,
    ...     on_refresh=optax_lowrank.moments.keep())

  References:
    Zhao et al., `GaLore <https://arxiv.org/abs/2403.03507>`_, 2024.
  """
  return RefreshPolicy(None, "keep")


def reset() -> RefreshPolicy:
  """The leaf's moments restart from their initial value (FRUGAL, GRASS).

  A per-leaf count (``inner.scale_by_adam_per_leaf``) restarts too, so the
  bias correction starts over; a count shared by all leaves is kept.

  Returns:
    A ``RefreshPolicy``.

  Example:
    >>> import optax, optax_lowrank
    >>> tx = optax_lowrank.lowrank_project(
    ...     optax.scale_by_adam(), rank=4,
    ...     on_refresh=optax_lowrank.moments.reset())

  References:
    Zmushko et al., `FRUGAL <https://arxiv.org/abs/2411.07837>`_, 2024.
  """
  return RefreshPolicy(lambda kind, x, fresh, change: fresh, "reset")


def rotate_first_moment() -> RefreshPolicy:
  """The first moment is mapped into the new subspace, ``M ← down(new, up(old, M))``.

  Other moments are kept. For orthonormal bases this rotates the momentum
  into the new coordinates; for Flora's random projections it is the paper's
  momentum transfer.

  Returns:
    A ``RefreshPolicy``.

  Example:
    >>> import optax, optax_lowrank
    >>> tx = optax_lowrank.lowrank_project(
    ...     optax.scale_by_adam(), rank=4,
    ...     on_refresh=optax_lowrank.moments.rotate_first_moment())

  References:
    Hao et al., `Flora: Low-Rank Adapters Are Secretly Gradient Compressors
    <https://arxiv.org/abs/2402.03293>`_, ICML 2024.
  """

  def moment(kind, x, fresh, change):
    del fresh
    return change.transfer(x) if kind == "first" else x

  return RefreshPolicy(moment, "rotate_first_moment")


def rotate_moments() -> RefreshPolicy:
  """Both moments follow the subspace: ``M ← T(M)`` and ``V ← T(√V)²``.

  ``T = down(new, up(old, ·))`` is the change of subspace. The second moment
  is carried as a magnitude: its square root is mapped and squared again,
  the parallel transport of Riemannian Adam (Bécigneul and Ganea, 2019),
  which keeps ``V`` non-negative and equal to the old one wherever the
  subspace did not move. Other state is kept.

  Returns:
    A ``RefreshPolicy``.

  Example:
    >>> import optax, optax_lowrank
    >>> tx = optax_lowrank.lowrank_project(
    ...     optax.scale_by_adam(), rank=4,
    ...     on_refresh=optax_lowrank.moments.rotate_moments())

  References:
    Bécigneul and Ganea, `Riemannian Adaptive Optimization Methods
    <https://arxiv.org/abs/1810.00760>`_, ICLR 2019; Refael et al.,
    `AdaRankGrad <https://arxiv.org/abs/2410.17881>`_, ICLR 2025 (moments
    transformed into the new subspace).
  """

  def moment(kind, x, fresh, change):
    del fresh
    if kind == "first":
      return change.transfer(x)
    if kind == "second":
      return jnp.square(change.transfer(jnp.sqrt(jnp.maximum(x, 0))))
    return x

  return RefreshPolicy(moment, "rotate_moments")


# The names ``on_refresh`` accepts as shorthand.
POLICIES = {
    "keep": keep,
    "reset": reset,
    "rotate": rotate_first_moment,
    "rotate_first_moment": rotate_first_moment,
    "rotate_moments": rotate_moments,
}


def as_policy(on_refresh: Union[str, RefreshPolicy]) -> RefreshPolicy:
  """``on_refresh`` as a ``RefreshPolicy`` (a name of ``POLICIES`` or one)."""
  if isinstance(on_refresh, RefreshPolicy):
    return on_refresh
  if isinstance(on_refresh, str) and on_refresh in POLICIES:
    return POLICIES[on_refresh]()
  raise ValueError(
      f"`on_refresh` must be one of {tuple(POLICIES)} or a "
      f"moments.RefreshPolicy, got {on_refresh!r}")


def _param_index_per_state_leaf(
    inner, inner_state, treedef,
    purpose: str = "`on_refresh` policies other than 'keep'",
    instead: str = "Use on_refresh='keep'.",
) -> list[int]:
  """For each leaf of ``inner_state``, the index of its parameter, or -1."""
  index_tree = treedef.unflatten(range(treedef.num_leaves))
  try:
    marks = optax.tree.map_params(
        inner,
        lambda _, i: i,
        inner_state,
        index_tree,
        transform_non_params=lambda _: -1,
    )
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f"{purpose} need an inner transform whose init accepts optax's "
        "parameter placeholder (optax.tree.map_params); this one failed with: "
        f"{e!r}. {instead}"
    ) from e
  return jax.tree.leaves(marks)


def _is_first_moment(path) -> bool:
  return any(
      isinstance(k, jax.tree_util.GetAttrKey) and k.name in FIRST_MOMENT_FIELDS
      for k in path
  )


def first_moments(inner, inner_state, treedef) -> list[Optional[Any]]:
  """Each parameter leaf's first moment in ``inner_state``, or ``None``.

  A first moment is a parameter-shaped state leaf under a field named in
  ``FIRST_MOMENT_FIELDS``. It is returned as stored, a ``QuantizedArray`` for
  a quantized state (``quantize.dequantize_tree`` it where it is used, so
  that it is dequantized on refresh steps only).

  Raises:
    ValueError: If a parameter leaf has more than one.
  """
  view = quantize.dequantize_tree(inner_state)
  marks = _param_index_per_state_leaf(
      inner, view, treedef,
      purpose="Projectors that read the first moment (coap)",
      instead="Use an inner optimizer like optax.scale_by_adam.")
  found: list[Optional[Any]] = [None] * treedef.num_leaves
  paths = [path for path, _ in jax.tree.flatten_with_path(view)[0]]
  stored = jax.tree.leaves(inner_state, is_leaf=_is_quantized)
  for path, leaf, i in zip(paths, stored, marks):
    if i < 0 or not _is_first_moment(path):
      continue
    if found[i] is not None:
      raise ValueError(
          "The inner optimizer keeps more than one first moment "
          f"({FIRST_MOMENT_FIELDS}) for a parameter; a projector that reads "
          "the first moment needs exactly one.")
    found[i] = leaf
  return found


def _moment_kind(path) -> str:
  for k in path:
    if isinstance(k, jax.tree_util.GetAttrKey):
      if k.name in FIRST_MOMENT_FIELDS:
        return "first"
      if k.name in SECOND_MOMENT_FIELDS:
        return "second"
  return "other"


def apply_on_refresh(
    policy: RefreshPolicy,
    *,
    inner: optax.GradientTransformation,
    inner_state: Any,
    treedef,
    changes: Sequence[Optional[tuple[jax.Array, SubspaceChange]]],
    fresh_state_fn: Callable[[], Any],
) -> Any:
  """Applies ``policy`` to the moments of the leaves that were refreshed.

  Args:
    policy: A ``RefreshPolicy``.
    inner: The inner transform.
    inner_state: Its state, before the current gradient is added.
    treedef: Tree definition of the parameters.
    changes: Per parameter leaf, ``None`` (not projected, or no refresh this
      call) or ``(refreshed, change)``: a bool scalar, or a bool per matrix
      ``(batch...)`` (the policy then acts on those matrices only, the
      others' moments are kept bit for bit), and the leaf's
      ``SubspaceChange``.
    fresh_state_fn: Returns a freshly initialized inner state (its leaves
      are the ``fresh`` values the policy sees).

  Returns:
    The inner state with the policy applied where ``refreshed``.
  """
  if policy.moment is None or all(c is None for c in changes):
    return inner_state
  view = quantize.dequantize_tree(inner_state)
  marks = _param_index_per_state_leaf(inner, view, treedef)
  paths = [path for path, _ in jax.tree.flatten_with_path(view)[0]]
  stored, state_def = jax.tree.flatten(inner_state, is_leaf=_is_quantized)
  fresh = jax.tree.leaves(quantize.dequantize_tree(fresh_state_fn()))
  new_leaves = []
  for path, old, new, i in zip(paths, stored, fresh, marks):
    if i < 0 or changes[i] is None:
      new_leaves.append(old)
      continue
    refreshed, change = changes[i]
    kind = _moment_kind(path)
    new_leaves.append(_replace_if(
        refreshed, old,
        lambda x, kind=kind, new=new, change=change: policy.moment(
            kind, x, new, change)))
  return state_def.unflatten(new_leaves)


def _is_quantized(x) -> bool:
  return isinstance(x, quantize.QuantizedArray)


def _replace_if(flag, old, fn):
  """``fn(old)`` where ``flag``, else ``old``.

  ``fn`` runs under a ``lax.cond`` (on refresh steps only); a quantized leaf
  is dequantized for ``fn`` and quantized again. A ``flag`` per matrix
  (``(batch...)``, the leading axes of ``old``) selects matrix by matrix.
  """
  if jnp.ndim(flag):
    def per_matrix(x):
      y = fn(x).astype(x.dtype)
      mask = flag.reshape(flag.shape + (1,) * (x.ndim - flag.ndim))
      return shapes.reshard_like(jnp.where(mask, y, x), x)

    if not _is_quantized(old):
      return jax.lax.cond(jnp.any(flag), per_matrix, lambda x: x, old)
    return jax.lax.cond(
        jnp.any(flag),
        lambda q: quantize.requantize(
            q, per_matrix(quantize.dequantize(q))),
        lambda q: q, old)
  if not _is_quantized(old):
    return jax.lax.cond(flag, lambda x: fn(x).astype(x.dtype), lambda x: x,
                        old)
  return jax.lax.cond(
      flag, lambda q: quantize.requantize(q, fn(quantize.dequantize(q))),
      lambda q: q, old)
