"""Coordinate subspaces: a random subset of columns, rows or entries.

The basis is integer indices, so the state is ``k`` ints per matrix and
``down``/``up`` are a gather and a scatter (no matmul). The projected gradient
keeps the gradient's layout ``(batch..., n, m)`` with the chosen axis cut to
``k`` (``random_k`` flattens to ``(batch..., k)``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jax.sharding import PartitionSpec as P

from optax_lowrank import shapes
from optax_lowrank.projectors import matmul
from optax_lowrank.projectors.base import Projector

KINDS = ("columns", "rows", "random_k")
# Reference orientation (m, n) = (output, reduction); arrays are (n, m):
# columns of G are the reduction axis (-2), rows the output axis (-1).
_AXIS = {"columns": -2, "rows": -1}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class IndexBasis:
  """Kept coordinates of each matrix.

  Attributes:
    indices: ``int32`` ``(batch..., k)``, sorted: positions along the kept
      axis, or row-major positions ``i·n + j`` in the reference-oriented
      ``m × n`` matrix for ``random_k``.
    kind: ``columns``, ``rows`` or ``random_k`` (static).
    nm: The matrix size ``(n, m)`` in the array layout (static).

  Nothing here depends on a device mesh (shardings are read off the arrays
  at run time).
  """

  indices: jax.Array
  kind: str = dataclasses.field(metadata=dict(static=True))
  nm: tuple[int, int] = dataclasses.field(metadata=dict(static=True))


def _random_subset(key, batch_shape, size, k):
  """``k`` distinct sorted positions in ``range(size)`` per batch element."""
  noise = jax.random.uniform(key, batch_shape + (size,))
  return jnp.sort(jnp.argsort(noise, axis=-1)[..., :k], axis=-1).astype(
      jnp.int32)


def _index_projector(kind_of, count_of) -> Projector:
  """A projector keeping ``count_of(info)`` coordinates of ``kind_of(info)``."""

  def init(info, dtype):
    del dtype
    kind, k = kind_of(info), count_of(info)
    return IndexBasis(
        jnp.zeros(info.batch_shape + (k,), jnp.int32), kind, (info.n, info.m))

  def refresh(ctx, g, basis):
    key = ctx.key
    n, m = basis.nm
    size = {"columns": n, "rows": m, "random_k": n * m}[basis.kind]
    k = basis.indices.shape[-1]
    return dataclasses.replace(
        basis, indices=_random_subset(key, g.shape[:-2], size, k))

  # Under an explicit mesh (read off the gradient, or the projected array)
  # the gather and the scatter run on replicated arrays; down's result is
  # resharded like the gradient, up's stays replicated (the core reshards it
  # like the gradient, a local slice). A sharded gradient pays one all-gather
  # per step here (indices are data-dependent).
  def replicated(spec, x):
    return x if spec is None else shapes.reshard_to(x, (None,) * x.ndim)

  def down(basis, g):
    spec = shapes.explicit_spec(g)
    r = gather(dataclasses.replace(basis, indices=replicated(
        spec, basis.indices)), replicated(spec, g))
    if spec is None:
      return r
    keep = {"columns": (None, spec[-1]), "rows": (spec[-2], None),
            "random_k": (None,)}[basis.kind]
    return jax.sharding.reshard(r, P(*spec[:-2], *keep))

  def up(basis, r):
    spec = shapes.explicit_spec(r)
    return scatter(dataclasses.replace(basis, indices=replicated(
        spec, basis.indices)), replicated(spec, r))

  def gather(basis, g):
    idx = basis.indices
    if basis.kind == "random_k":  # row-major over the reference's (m, n)
      flat = jnp.swapaxes(g, -1, -2).reshape(g.shape[:-2] + (-1,))
      return jnp.take_along_axis(flat, idx, axis=-1)
    if basis.kind == "columns":
      return jnp.take_along_axis(g, idx[..., :, None], axis=-2)
    return jnp.take_along_axis(g, idx[..., None, :], axis=-1)

  def scatter(basis, r):
    n, m = basis.nm
    idx = basis.indices
    batch = idx.shape[:-1]
    if basis.kind == "random_k":
      flat = jnp.zeros(batch + (m * n,), r.dtype)
      flat = jnp.put_along_axis(flat, idx, r, axis=-1, inplace=False)
      return jnp.swapaxes(flat.reshape(batch + (m, n)), -1, -2)
    out = jnp.zeros(batch + (n, m), r.dtype)
    if basis.kind == "columns":
      idx = jnp.broadcast_to(idx[..., :, None], r.shape)
      return jnp.put_along_axis(out, idx, r, axis=-2, inplace=False)
    idx = jnp.broadcast_to(idx[..., None, :], r.shape)
    return jnp.put_along_axis(out, idx, r, axis=-1, inplace=False)

  return Projector(init, refresh, down, up)


def _count(size: int, density: float) -> int:
  return int(math.floor(size * density))


def coordinates(kind: str = "columns", *, density: float = 0.25) -> Projector:
  """FRUGAL's coordinate subspaces: random columns, rows or entries.

  A fresh random subset of ``floor(size · density)`` coordinates per matrix
  at each refresh: ``columns`` of ``G`` (``m × n``, references' orientation;
  the reduction axis), ``rows`` (the output axis) or ``random_k`` (entries,
  counted over all ``m·n``). The count comes from ``density``, as in
  FRUGAL's ``CoordinateProjector``, not from the wrapper's ``rank`` (which
  then only decides which leaves are projected).

  Args:
    kind: ``columns``, ``rows`` or ``random_k``.
    density: Fraction of the coordinates kept, in (0, 1].

  Returns:
    A ``Projector`` whose basis is an ``IndexBasis``.

  Example:
    >>> import optax, optax_lowrank
    >>> tx = optax_lowrank.lowrank_project(
    ...     optax.scale_by_adam(), rank=1,
    ...     projector=optax_lowrank.projectors.coordinates("rows", density=0.5))

  References:
    Zmushko et al., `FRUGAL: Memory-Efficient Optimization by Reducing State
    Overhead for Scalable Training <https://arxiv.org/abs/2411.07837>`_, ICML
    2025; code: github.com/fzmushko/FRUGAL.
  """
  if kind not in KINDS:
    raise ValueError(f"`kind` must be one of {KINDS}, got {kind!r}")
  if not 0.0 < density <= 1.0:
    raise ValueError(f"`density` must be in (0, 1], got {density!r}")
  size = {"columns": lambda i: i.n, "rows": lambda i: i.m,
          "random_k": lambda i: i.n * i.m}[kind]
  return _index_projector(lambda info: kind,
                          lambda info: _count(size(info), density))


def randperm(proj_type: str = "std") -> Projector:
  """FRUGAL's ``randperm``: the rows of a random permutation matrix.

  Projecting by ``r`` rows of a permutation keeps ``r`` random columns of
  ``G`` on the right side and ``r`` random rows on the left (side chosen by
  ``proj_type`` as for GaLore); ``r`` is the wrapper's ``rank``. Stored as
  indices, applied as a gather.

  Args:
    proj_type: ``std``, ``reverse_std``, ``left`` or ``right``.

  Returns:
    A ``Projector`` whose basis is an ``IndexBasis``.

  Example:
    >>> import optax, optax_lowrank
    >>> tx = optax_lowrank.lowrank_project(
    ...     optax.scale_by_adam(), rank=4,
    ...     projector=optax_lowrank.projectors.randperm())

  References:
    Zmushko et al., `FRUGAL <https://arxiv.org/abs/2411.07837>`_, ICML 2025.
  """
  matmul.check_proj_type(proj_type)

  def kind(info):
    side = matmul.side(proj_type, info.m, info.n, info.std_side)
    return "columns" if side == "right" else "rows"

  return _index_projector(kind, lambda info: info.rank)
