"""Random projections regenerated from a key: the matrix is never stored."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp

from optax_lowrank import shapes
from optax_lowrank.projectors import matmul
from optax_lowrank.projectors.base import Projector

DISTRIBUTIONS = ("gaussian", "rademacher")
SCALES = ("rank", "unit", "orthonormal")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KeyBasis:
  """A random subspace, stored as the raw data of the key that draws it.

  Attributes:
    key: ``uint32`` key data (``jax.random.key_data``). One key per leaf: the
      matrices of stacked layers are drawn from it together.
    side: ``left`` or ``right`` (static).
    shape: Shape of the drawn matrix, ``(batch..., m, r)`` on the left or
      ``(batch..., r, n)`` on the right (static).
    distribution: ``gaussian`` or ``rademacher`` (static).
    std: ``rank``, ``unit`` or ``orthonormal`` (static).

  Nothing here depends on a device mesh: ``down`` and ``up`` pass the
  sharding to draw with (``matrix(spec)``), read off the gradient.
  """

  key: jax.Array
  side: str = dataclasses.field(metadata=dict(static=True))
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  distribution: str = dataclasses.field(metadata=dict(static=True))
  std: str = dataclasses.field(metadata=dict(static=True))

  def matrix(self, spec: Optional[tuple[Any, ...]] = None) -> jax.Array:
    """The float32 matrix this key draws (what ``down`` and ``up`` use).

    Args:
      spec: Partition spec entries to draw it with under an explicit mesh
        (the values do not depend on them), or ``None``.
    """
    key = jax.random.wrap_key_data(self.key)
    rank = self.shape[-1] if self.side == "left" else self.shape[-2]
    sharding = None if self.std == "orthonormal" else shapes.out_sharding(
        spec)
    draw = (jax.random.normal if self.distribution == "gaussian"
            else jax.random.rademacher)
    x = draw(key, self.shape, jnp.float32, out_sharding=sharding)
    if self.std == "rank":
      return x / math.sqrt(rank)
    if self.std == "orthonormal":  # orthonormal columns (left) or rows (right)
      tall = x if self.side == "left" else jnp.swapaxes(x, -1, -2)
      q, r = jnp.linalg.qr(tall)
      q = q * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[..., None, :]
      x = q if self.side == "left" else jnp.swapaxes(q, -1, -2)
      x = shapes.reshard_to(x, spec)
    return x


def random(
    proj_type: str = "std",
    *,
    distribution: str = "gaussian",
    std: str = "rank",
) -> Projector:
  """A random projection drawn from a key at every refresh, never stored.

  The matrix has the shape of a GaLore basis for the same ``proj_type``
  (``(r, n)`` on the right, ``(m, r)`` on the left, references' orientation)
  and i.i.d. entries. It is regenerated in ``down`` and ``up`` from the key
  kept in the state, so the state is one key per leaf whatever the matrix
  size. It is drawn in float32, sharded like the gradient along the axis it
  contracts, so neither ``down`` nor ``up`` gathers anything; the values do not
  depend on the sharding.

  Args:
    proj_type: ``std`` (compress the smaller side), ``reverse_std``,
      ``smaller`` (as ``std``, but the rows on a tie: Flora), ``left`` or
      ``right``; see ``matmul.side``.
    distribution: ``gaussian`` (normal entries) or ``rademacher`` (±1).
    std: Entry scale: ``rank`` gives ``1/√r`` (APOLLO, Flora), ``unit``
      gives 1 (VLoRP); ``orthonormal`` orthonormalizes the Gaussian draw by
      QR (FRUGAL's ``random``, torch's ``orthogonal_`` init), which needs the
      matrix unsharded while it is drawn.

  Returns:
    A ``Projector`` whose basis is a ``KeyBasis``.

  Example:
    >>> import optax, optax_lowrank
    >>> tx = optax_lowrank.lowrank_project(
    ...     optax.scale_by_adam(), rank=4,
    ...     projector=optax_lowrank.projectors.random())

  References:
    Zhu et al., `APOLLO: SGD-like Memory, AdamW-level Performance
    <https://arxiv.org/abs/2412.05270>`_, MLSys 2025.
  """
  matmul.check_proj_type(proj_type, (*matmul.ONE_SIDED, "smaller"))
  if distribution not in DISTRIBUTIONS:
    raise ValueError(
        f"`distribution` must be one of {DISTRIBUTIONS}, got {distribution!r}"
    )
  if std not in SCALES:
    raise ValueError(f"`std` must be one of {SCALES}, got {std!r}")
  if std == "orthonormal" and distribution != "gaussian":
    raise ValueError("`std='orthonormal'` needs `distribution='gaussian'`")

  def init(info, dtype):
    del dtype
    side = matmul.side(proj_type, info.m, info.n, info.std_side)
    dims = "mr" if side == "left" else "rn"
    data = jax.random.key_data(jax.random.key(0))
    return KeyBasis(
        jnp.zeros(data.shape, data.dtype), side, info.shape(dims),
        distribution, std,
    )

  def refresh(ctx, g, basis):
    del g
    return dataclasses.replace(basis, key=jax.random.key_data(ctx.key))

  # Drawn sharded like the gradient along the axis it contracts (down), or
  # like the projected array along the axes it keeps (up; the core reshards
  # up's output like the gradient, a local slice).
  def down(basis, g):
    spec = shapes.partition(shapes.explicit_spec(g),
                            "mr" if basis.side == "left" else "rn")
    if basis.side == "left":
      return matmul.down_left(basis.matrix(spec), g)
    return matmul.down_right(basis.matrix(spec), g)

  def up(basis, r):
    spec = shapes.explicit_spec(r)
    if spec is not None:  # batch axes as r, the drawn side unsharded
      spec = (*spec[:-2], None, None)
    if basis.side == "left":
      return matmul.up_left(basis.matrix(spec), r)
    return matmul.up_right(basis.matrix(spec), r)

  return Projector(init, refresh, down, up)
