"""Factorizations of a stack of matrices spread over the devices of a mesh.

A refresh factorizes each matrix of a leaf: an exact SVD (``projectors.svd``),
or the small Cholesky and ``eigh`` problems of the randomized range finder.
LAPACK and cuSOLVER need each matrix whole on one device, and a gradient
sharded along its matrix axes (FSDP, tensor parallelism) or replicated (data
parallelism) would otherwise be gathered so that every device factorizes every
matrix: on 8 devices a refresh would cost what it costs on one.

``map_matrices`` instead reshards a stacked ``(layers, p, q)`` array so that
its batch axis is split over the mesh (an all-to-all of the gradient, which
each device then holds ``layers / devices`` whole matrices of: the same bytes
as its FSDP shard), factorizes each device's matrices locally inside a
``shard_map``, and returns the results sharded along the batch axis; callers
reshard them to their own layout (the core does, to the basis's sharding).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
from jax.sharding import PartitionSpec as P

from optax_lowrank import shapes


def _one_at_a_time(fn: Callable[[jax.Array], Any], x: jax.Array) -> Any:
  """``fn`` over the matrices of ``x`` ``(batch..., p, q)``, on one device.

  On CPU the matrices go one at a time (``lax.map``): jaxlib's batched LAPACK
  kernels fan a batch out over the host's shared intra-op thread pool and block
  on it, which deadlocks once several simulated devices do so at once (seen
  with stacked layers on 8 CPU devices); CPU devices share the host's cores, so
  nothing is lost. Other platforms keep one batched call.
  """
  if x.ndim == 2:
    return fn(x)

  def mapped(x):
    flat = x.reshape((-1,) + x.shape[-2:])
    out = jax.lax.map(fn, flat)
    return jax.tree.map(lambda o: o.reshape(x.shape[:-2] + o.shape[1:]), out)

  return jax.lax.platform_dependent(x, cpu=mapped, default=fn)


def spread_axes(batch_shape: tuple[int, ...], mesh_shape: dict[str, int]
                ) -> tuple[Optional[int], tuple[str, ...]]:
  """Where to split a stack of matrices: ``(batch axis, mesh axes)``.

  The first batch axis that the most devices divide, and the mesh axes
  (greedily, in the mesh's order) whose product divides it; ``(None, ())``
  when no axis of more than one device divides any batch axis (the matrices
  are then factorized where they are).

  Args:
    batch_shape: The stack's batch axes (``(layers,)`` for scanned layers).
    mesh_shape: The mesh's axis sizes, in order.

  Returns:
    The batch axis index and the mesh axes to shard it over.
  """
  best, best_devices = (None, ()), 1
  for axis, size in enumerate(batch_shape):
    chosen, devices = [], 1
    for name, n in mesh_shape.items():
      if n > 1 and size % (devices * n) == 0:
        chosen.append(name)
        devices *= n
    if devices > best_devices:
      best, best_devices = (axis, tuple(chosen)), devices
  return best


def map_matrices(fn: Callable[[jax.Array], Any], x: jax.Array) -> Any:
  """``fn`` of each matrix of ``x``, each device computing only its share.

  Under an explicit mesh, ``x`` is resharded so that one batch axis is split
  over the mesh axes ``spread_axes`` picks (its matrix axes whole), and each
  device applies ``fn`` to its own matrices inside a ``jax.shard_map``. Without
  an explicit mesh (no mesh, or ``Auto`` axes, where XLA's propagation lays
  the program out) and for a single matrix, ``fn`` runs where ``x`` is, its
  matrix axes gathered.

  Args:
    fn: A function of one ``(p, q)`` matrix returning a pytree of arrays
      (e.g. ``jnp.linalg.svd``); it must also accept a stack ``(k, p, q)``
      and map over it, as ``jnp.linalg`` functions do.
    x: ``(batch..., p, q)``.

  Returns:
    ``fn``'s outputs with ``x``'s batch axes in front; under an explicit mesh
    they are sharded along the split batch axis and replicated elsewhere.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from optax_lowrank import spread
    >>> s = spread.map_matrices(lambda a: jnp.linalg.svd(a)[1], jnp.ones((4, 3, 2)))
    >>> s.shape
    (4, 2)
  """
  spec = shapes.explicit_spec(x)
  batch = x.shape[:-2]
  if spec is None or not batch:
    return _one_at_a_time(fn, shapes.gather_matrices(x))
  mesh = jax.typeof(x).sharding.mesh
  axis, names = spread_axes(batch, dict(mesh.shape))
  if axis is None:
    return _one_at_a_time(fn, shapes.gather_matrices(x))
  entries = [None] * x.ndim
  entries[axis] = names if len(names) > 1 else names[0]
  x = jax.sharding.reshard(x, P(*entries))
  one = jax.eval_shape(fn, jax.ShapeDtypeStruct(x.shape[-2:], x.dtype))
  batch_entries = entries[:len(batch)]
  out_specs = jax.tree.map(lambda o: P(*batch_entries, *(None,) * o.ndim), one)
  return jax.shard_map(lambda local: _one_at_a_time(fn, local), mesh=mesh,
                       in_specs=P(*entries), out_specs=out_specs)(x)
