"""Exact optimizer-state memory, per parameter, through ``jax.eval_shape``."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import numpy as np
import optax

from optax_lowrank import shapes
from optax_lowrank.core import LeafBasis

# ``LowRankState`` fields keyed by a projected leaf's ``shapes.path_name``.
_KEYED_BY_NAME = ("bases", "combine_states")


class LeafMemory(NamedTuple):
  """State memory attributed to one parameter leaf."""

  path: str
  shape: tuple[int, ...]
  projected: bool
  rank: Optional[int]
  state_bytes: int


class StateMemory(NamedTuple):
  """Optimizer-state memory of a transform for given parameters.

  Attributes:
    leaves: One ``LeafMemory`` per parameter leaf, in tree order.
    shared_bytes: State not belonging to any one parameter (step counts).
    total_bytes: Everything, in bytes.
  """

  leaves: tuple[LeafMemory, ...]
  shared_bytes: int
  total_bytes: int

  def table(self) -> str:
    """A plain-text table, one row per parameter leaf, and the totals."""
    rows = [("parameter", "shape", "rank", "state bytes")]
    for leaf in self.leaves:
      rows.append((
          leaf.path, "x".join(map(str, leaf.shape)) or "()",
          str(leaf.rank) if leaf.projected else "-", f"{leaf.state_bytes:,}",
      ))
    rows.append(("(shared)", "", "", f"{self.shared_bytes:,}"))
    rows.append(("total", "", "", f"{self.total_bytes:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join(
        "  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                  for i, (c, w) in enumerate(zip(r, widths)))
        for r in rows
    )


def _nbytes(x) -> int:
  return int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize


def param_owner(path, param_paths, names) -> Optional[int]:
  """The parameter that a leaf of an optimizer state belongs to.

  The parameter whose key path occurs in ``path``; the longest wins. Under
  ``LowRankState.bases`` and ``combine_states`` a leaf is keyed by its path
  name (``"layers/mlp/wi"``, see ``shapes.path_name``) instead. Used by
  ``state_bytes`` and by ``sampling.layerwise`` (which freezes the state of
  layers not drawn).

  Args:
    path: The state leaf's key path (a tuple of ``jax.tree_util`` keys).
    param_paths: Each parameter leaf's key path, in tree order.
    names: ``shapes.path_name`` of each projected parameter → its index.

  Returns:
    The index of the owning parameter leaf, or ``None`` (a count, a key).

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from optax_lowrank import memory
    >>> params = {"w": jnp.ones((2, 3))}
    >>> state = optax.adam(1e-3).init(params)
    >>> paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    >>> [memory.param_owner(tuple(p), paths, {}) for p, _ in
    ...  jax.tree_util.tree_flatten_with_path(state)[0]]
    [None, 0, 0]

  References:
    Zhao et al., `GaLore <https://arxiv.org/abs/2403.03507>`_, ICML 2024
    (the state it accounts for).
  """
  for prev, key in zip(path, path[1:]):
    if (isinstance(prev, jax.tree_util.GetAttrKey) and prev.name in _KEYED_BY_NAME
        and isinstance(key, jax.tree_util.DictKey) and key.key in names):
      return names[key.key]
  best, best_len = None, 0
  for i, pp in enumerate(param_paths):
    k = len(pp)
    if k <= best_len or k > len(path):
      continue
    if any(tuple(path[s:s + k]) == pp for s in range(len(path) - k + 1)):
      best, best_len = i, k
  return best


def state_bytes(tx: optax.GradientTransformation, params: Any) -> StateMemory:
  """Bytes of ``tx``'s state for ``params``, per parameter leaf and in total.

  Nothing is allocated: the state's shapes come from ``jax.eval_shape``, so
  this works for models far larger than the host. A state leaf is attributed
  to the parameter whose key path it contains (as every optax state does for
  its moments); what contains none (step counts) is ``shared_bytes``.

  Args:
    tx: Any optax transform (e.g. ``optax_lowrank.galore(...)``).
    params: Parameters, or a pytree of ``jax.ShapeDtypeStruct``.

  Returns:
    A ``StateMemory``; ``print(result.table())`` shows it.

  Example:
    >>> import jax.numpy as jnp, optax_lowrank
    >>> params = {"w": jnp.zeros((256, 64))}
    >>> mem = optax_lowrank.memory.state_bytes(
    ...     optax_lowrank.galore(1e-3, rank=8), params)
    >>> mem.total_bytes  # (2·8·256 moments + 64·8 basis) float32 + 2 counts
    18440
  """
  state = jax.eval_shape(tx.init, params)
  param_items = jax.tree.flatten_with_path(params)[0]
  param_paths = [tuple(p) for p, _ in param_items]
  names = {shapes.path_name(p): i for i, p in enumerate(param_paths)}
  per_leaf = [0] * len(param_items)
  ranks: list[Optional[int]] = [None] * len(param_items)
  shared = 0
  for path, leaf in jax.tree.flatten_with_path(
      state, is_leaf=lambda x: isinstance(x, LeafBasis)
  )[0]:
    owner = param_owner(tuple(path), param_paths, names)
    if isinstance(leaf, LeafBasis):
      if owner is not None:
        ranks[owner] = leaf.rank
      nbytes = sum(_nbytes(x) for x in jax.tree.leaves(leaf.basis))
    else:
      nbytes = _nbytes(leaf)
    if owner is None:
      shared += nbytes
    else:
      per_leaf[owner] += nbytes
  leaves = tuple(
      LeafMemory(
          jax.tree_util.keystr(path), tuple(p.shape), ranks[i] is not None,
          ranks[i], per_leaf[i],
      )
      for i, (path, p) in enumerate(param_items)
  )
  return StateMemory(leaves, shared, shared + sum(per_leaf))
