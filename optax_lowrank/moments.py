"""What happens to the inner optimizer's moments when a leaf's subspace changes.

The inner optimizer keeps one state over the whole tree of projected gradients,
so a policy reaches one leaf's moments through ``optax.tree.map_params``: each
parameter-shaped state leaf is matched to the parameter it belongs to. A state
stored quantized (``quantize.quantize_state``) is matched through its
dequantized view, and a changed moment is quantized again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from optax_lowrank import quantize

ON_REFRESH = ("keep", "reset", "transfer", "rotate")
# Field names optax uses for first moments (scale_by_adam, lion, trace, ...).
FIRST_MOMENT_FIELDS = ("mu", "trace", "momentum")


def _param_index_per_state_leaf(
    inner, inner_state, treedef,
    purpose: str = "`on_refresh` 'reset', 'transfer' and 'rotate'",
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


def apply_on_refresh(
    policy: str,
    *,
    inner: optax.GradientTransformation,
    inner_state: Any,
    treedef,
    refreshed: Sequence[Optional[jax.Array]],
    rotate: Sequence[Optional[Any]],
    fresh_state_fn,
) -> Any:
  """Applies ``policy`` to the moments of the leaves that were refreshed.

  Args:
    policy: ``keep`` (galore-torch: moments carry over unchanged), ``reset``
      (the leaf's parameter-shaped state is re-initialized; shared counters are
      kept), ``transfer`` (Flora: first moments are mapped through the change
      of subspace, ``M ← down(new, up(old, M))``; second moments are kept) or
      ``rotate``, the same map under the name it has for orthonormal bases
      (where it re-expresses ``M`` in the new basis).
    inner: The inner transform.
    inner_state: Its state, before the current gradient is added.
    treedef: Tree definition of the parameters.
    refreshed: Per parameter leaf, a bool scalar (refreshed this step) or
      ``None`` for leaves that are not projected.
    rotate: Per parameter leaf, ``None`` or a function mapping a first moment
      from the old basis to the new one.
    fresh_state_fn: Returns a freshly initialized inner state (for ``reset``).

  Returns:
    The inner state with the policy applied.
  """
  if policy == "keep":
    return inner_state
  view = quantize.dequantize_tree(inner_state)
  marks = _param_index_per_state_leaf(inner, view, treedef)
  paths = [path for path, _ in jax.tree.flatten_with_path(view)[0]]
  stored, state_def = jax.tree.flatten(inner_state, is_leaf=_is_quantized)
  if policy == "reset":
    fresh = jax.tree.leaves(quantize.dequantize_tree(fresh_state_fn()))
    new_leaves = [
        old if i < 0 or refreshed[i] is None
        else _replace_if(refreshed[i], old, lambda _, new=new: new, cheap=True)
        for old, new, i in zip(stored, fresh, marks)
    ]
  else:
    new_leaves = [
        old if i < 0 or rotate[i] is None or not _is_first_moment(path)
        else _replace_if(refreshed[i], old, rotate[i])
        for path, old, i in zip(paths, stored, marks)
    ]
  return state_def.unflatten(new_leaves)


def _is_quantized(x) -> bool:
  return isinstance(x, quantize.QuantizedArray)


def _replace_if(flag, old, fn, *, cheap=False):
  """``fn(old)`` where ``flag``, else ``old``.

  ``fn`` runs under a ``lax.cond`` (on refresh steps only) unless ``cheap``;
  a quantized leaf is dequantized for ``fn`` and quantized again.
  """
  if not _is_quantized(old):
    if cheap:
      return jnp.where(flag, fn(old), old)
    return jax.lax.cond(flag, lambda x: fn(x).astype(x.dtype), lambda x: x,
                        old)
  return jax.lax.cond(
      flag, lambda q: quantize.requantize(q, fn(quantize.dequantize(q))),
      lambda q: q, old)
