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
``shard_map``, and gathers the results (small: the callers keep only rank-``r``
bases) back to the input's batch layout; the core then reshards each basis to
its own sharding. A single matrix (an unstacked model's leaf) is factorized by
one device chosen by the caller, so that a model's leaves are shared out among
the devices.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
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
  when no axis of more than one device divides any batch axis (every device
  then factorizes every matrix).

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


def map_matrices(fn: Callable[[jax.Array], Any], x: jax.Array, *,
                 owner: Optional[jax.Array] = None) -> Any:
  """``fn`` of each matrix of ``x``, each device computing only its share.

  Under an explicit mesh, ``x`` is resharded so that one batch axis is split
  over the mesh axes ``spread_axes`` picks (its matrix axes whole), and each
  device applies ``fn`` to its own matrices inside a ``jax.shard_map``. A
  single matrix (an unstacked model's leaf) given an ``owner`` is factorized
  by that device only (``owner`` modulo the device count, the others skip
  ``fn`` in a per-device ``lax.cond``) and its result summed over the mesh, so
  that leaves with different owners are factorized on different devices.
  Otherwise (no mesh, ``Auto`` axes, where XLA's propagation lays the program
  out, or a stack no mesh axis divides), ``fn`` runs where ``x`` is, its
  matrix axes gathered.

  Args:
    fn: A function of one ``(p, q)`` matrix returning a pytree of arrays
      (e.g. ``jnp.linalg.svd``); it must also accept a stack ``(k, p, q)``
      and map over it, as ``jnp.linalg`` functions do.
    x: ``(batch..., p, q)``.
    owner: For a single matrix, the (int scalar, possibly traced) index of
      the device that factorizes it, e.g. the leaf's ordinal; ``None``: every
      device does.

  Returns:
    ``fn``'s outputs with ``x``'s batch axes in front, sharded along them as
    ``x`` was (the results gathered back from the devices that computed
    them) and replicated along their own axes.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from optax_lowrank import spread
    >>> s = spread.map_matrices(lambda a: jnp.linalg.svd(a)[1], jnp.ones((4, 3, 2)))
    >>> s.shape
    (4, 2)
  """
  spec = shapes.explicit_spec(x)
  batch = x.shape[:-2]
  if spec is None:
    return _one_at_a_time(fn, x)
  mesh = jax.typeof(x).sharding.mesh
  if not batch and owner is not None:
    return _on_owner(fn, x, owner, mesh)
  axis, names = spread_axes(batch, dict(mesh.shape))
  if axis is None:  # every device factorizes every matrix
    out = _one_at_a_time(fn, jax.sharding.reshard(x, P()))
  else:
    entries = [None] * x.ndim
    entries[axis] = names if len(names) > 1 else names[0]
    # One spec for every output (a pytree prefix): split like x's batch axes.
    out = jax.shard_map(lambda local: _one_at_a_time(fn, local), mesh=mesh,
                        in_specs=P(*entries), out_specs=P(*entries[:len(batch)]))(
                            jax.sharding.reshard(x, P(*entries)))
  return jax.tree.map(lambda o: jax.sharding.reshard(o, P(*spec[:len(batch)])), out)


def _on_owner(fn, x: jax.Array, owner: jax.Array, mesh) -> Any:
  """``fn(x)`` computed on device ``owner`` (modulo the device count) only."""
  names = tuple(n for n in mesh.axis_names if mesh.shape[n] > 1)
  x = jax.sharding.reshard(x, P())
  if not names:  # one device
    return fn(x)

  def local(x, owner):
    index, devices = 0, 1
    for name in reversed(names):  # the device's position, row-major
      index = index + jax.lax.axis_index(name) * devices
      devices *= mesh.shape[name]
    one = jax.eval_shape(fn, x)
    zeros = lambda x: jax.tree.map(lambda o: jnp.zeros(o.shape, o.dtype), one)
    out = jax.lax.cond(index == owner % devices, fn, zeros, x)
    return jax.lax.psum(out, names)

  # check_vma=False: the branches' results vary by device (one computes,
  # the others give zeros) until the psum, which the type system can't see.
  return jax.shard_map(local, mesh=mesh, in_specs=(P(), P()), out_specs=P(),
                       check_vma=False)(x, jnp.asarray(owner, jnp.int32))
