"""FRUGAL's block subspace: a fraction of whole matrices, the rest state-free.

A leaf of stacked layers ``(layers..., n, m)`` keeps ``k = round(L · density)``
of its ``L`` matrices in the subspace; ``down`` gathers them into
``(k, n, m)`` and ``up`` scatters back with zeros elsewhere. So the inner
optimizer holds state for the chosen matrices only, and with
``combine.frugal_sign`` the other matrices take the state-free step.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jax.sharding import PartitionSpec as P

from optax_lowrank import shapes
from optax_lowrank.projectors.base import Projector

ORDERS = ("random", "ascending", "descending")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockBasis:
  """The chosen matrices of one stacked leaf.

  Attributes:
    indices: ``int32`` ``(k,)``, sorted positions in the flattened stack.
    start: ``int32`` scalar, where the next deterministic window begins.
    batch_shape: Shape of the stack (static).

  Nothing here depends on a device mesh (shardings are read off the arrays
  at run time).
  """

  indices: jax.Array
  start: jax.Array
  batch_shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))


def blocks(density: float = 0.25, *, order: str = "random") -> Projector:
  """FRUGAL's ``blocks``: ``round(L·density)`` of a leaf's ``L`` stacked matrices.

  At each refresh a new set of matrices of every stacked leaf becomes the
  subspace: a random subset (``random``, FRUGAL's class default) or the next
  window of consecutive layers walking up (``ascending``) or down from the
  last layer (``descending``, FRUGAL's LLaMA scripts), wrapping around.

  Difference from the reference: FRUGAL chooses ``round(T·density)`` of all
  ``T`` weight tensors of the model, a window over the sequence q, k, v, o,
  gate, down, up of consecutive layers. Here each stacked leaf (one weight
  type across layers) chooses its own ``round(L·density)`` layers, so the
  state has a static shape and the same size (``density`` of the projected
  weights), but the active tensors are the same layers of every type. Needs a
  batch (stacked-layer) axis: 2-D leaves cannot be split into blocks.

  Args:
    density: Fraction of each leaf's matrices in the subspace, in [0, 1].
    order: ``random``, ``ascending`` or ``descending``.

  Returns:
    A ``Projector`` whose basis is a ``BlockBasis``.

  Example:
    >>> import optax, optax_lowrank
    >>> tx = optax_lowrank.lowrank_project(
    ...     optax_lowrank.inner.scale_by_adam_leafwise(), rank=1,
    ...     projector=optax_lowrank.projectors.blocks(0.25),
    ...     dimension_numbers=optax_lowrank.DimensionNumbers(1, 2))

  References:
    Zmushko et al., `FRUGAL: Memory-Efficient Optimization by Reducing State
    Overhead for Scalable Training <https://arxiv.org/abs/2411.07837>`_, ICML
    2025; code: github.com/fzmushko/FRUGAL (``BlockOptimizer``).
  """
  if not 0.0 <= density <= 1.0:
    raise ValueError(f"`density` must be in [0, 1], got {density!r}")
  if order not in ORDERS:
    raise ValueError(f"`order` must be one of {ORDERS}, got {order!r}")

  def init(info, dtype):
    del dtype
    if not info.batch_shape:
      raise ValueError(
          "projector `blocks` needs stacked matrices (a batch axis, e.g. "
          "scanned layers named by `dimension_numbers`); this leaf is a "
          "single matrix. Stack the layers or use another subspace."
      )
    size = math.prod(info.batch_shape)
    k = int(round(size * density))
    start = size - 1 if order == "descending" else 0
    if len(info.batch_shape) > 1 and info.spec is not None and any(
        info.spec[:len(info.batch_shape)]):
      raise ValueError(
          "projector `blocks` needs a single batch axis when the stack is "
          "sharded along its batch axes"
      )
    return BlockBasis(jnp.zeros((k,), jnp.int32),
                      jnp.asarray(start, jnp.int32), info.batch_shape)

  def refresh(ctx, g, basis):
    del g
    key = ctx.key
    size = math.prod(basis.batch_shape)
    k = basis.indices.shape[0]
    if order == "random":
      idx = jnp.argsort(jax.random.uniform(key, (size,)))[:k]
      start = basis.start
    elif order == "ascending":
      idx = (basis.start + jnp.arange(k)) % size
      start = (basis.start + k) % size
    else:
      idx = (basis.start - jnp.arange(k)) % size
      start = (basis.start - k) % size
    return dataclasses.replace(
        basis, indices=jnp.sort(idx).astype(jnp.int32),
        start=jnp.asarray(start, jnp.int32))

  # A sharded stack is sharded along its single batch axis (see init), so the
  # flattening reshape below only ever merges unsharded axes. Shardings are
  # read off the gradient (down) and the projected array (up).
  def down(basis, g):
    flat = g.reshape((-1,) + g.shape[-2:])
    spec = shapes.explicit_spec(g)
    if spec is None:
      return jnp.take(flat, basis.indices, axis=0)
    # The chosen layers leave the layer axis unsharded; matrix axes keep theirs.
    return flat.at[basis.indices].get(out_sharding=P(None, *spec[-2:]))

  def up(basis, r):
    size = math.prod(basis.batch_shape)
    shape = (size,) + r.shape[-2:]
    spec = shapes.explicit_spec(r)
    if spec is None:
      out = jnp.zeros(shape, r.dtype).at[basis.indices].set(r)
    else:
      # The layer axis unsharded (the core reshards the update like the
      # gradient, a local slice); matrix axes as r's.
      spec = P(None, *spec[-2:])
      out = jnp.zeros(shape, r.dtype, out_sharding=spec)
      out = out.at[basis.indices].set(r, out_sharding=spec)
    return out.reshape(basis.batch_shape + r.shape[-2:])

  return Projector(init, refresh, down, up)
