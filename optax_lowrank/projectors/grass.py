"""GRASS: structured sparse projections keeping ``r`` rows (or columns) of G.

The projection is ``Pᵀ = ρ B``: ``B`` selects ``r`` rows of the gradient and
``ρ`` is a diagonal ``r × r`` scaling, so ``down`` is a gather of ``r`` scaled
rows and ``up`` a scatter-add of them (no matmul, no dense basis). The state
is ``r`` ``int32`` indices and ``r`` float32 scales per matrix.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from optax_lowrank import shapes
from optax_lowrank.projectors import matmul
from optax_lowrank.projectors.base import Projector

SELECTIONS = ("top_norm", "norm_sampling")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SparseBasis:
  """Kept rows (or columns) of each matrix and their scales.

  Attributes:
    indices: ``int32`` ``(batch..., r)``, ascending: positions along the
      projected axis; norm sampling draws with replacement, so a position
      may repeat (its contributions then add up in ``up``).
    scales: float32 ``(batch..., r)``: ``ρ``, 1 for ``top_norm``,
      ``1/√(r·q_i)`` for a position ``i`` drawn with probability ``q_i``.
    side: ``left`` (rows ``m`` of the references' ``G`` kept, ``size = m``)
      or ``right`` (columns ``n``, ``size = n``) (static).
    size: Length of the projected axis (static).

  Nothing here depends on a device mesh: indices and scales are sharded like
  the leaf's batch axes, and under an explicit mesh ``down`` shards ``P``
  like the gradient.
  """

  indices: jax.Array
  scales: jax.Array
  side: str = dataclasses.field(metadata=dict(static=True))
  size: int = dataclasses.field(metadata=dict(static=True))

  def matrix(self, leaf_spec: Optional[tuple[Any, ...]] = None) -> jax.Array:
    """``P = (ρ B)ᵀ`` as a dense float32 matrix: ``(batch..., size, r)`` on
    the left, its transpose ``(batch..., r, size)`` on the right (used under
    an explicit mesh).

    Args:
      leaf_spec: The partition spec entries of the leaf's ``(batch..., n,
        m)`` view, to shard ``P`` like it along ``size``; ``None``: as the
        indices (batch axes only).
    """
    iota = jnp.arange(self.size, dtype=jnp.int32)
    if self.side == "left":
      x = jnp.where(iota[:, None] == self.indices[..., None, :],
                    self.scales[..., None, :], 0.0)
    else:
      x = jnp.where(self.indices[..., :, None] == iota[None, :],
                    self.scales[..., :, None], 0.0)
    return shapes.reshard_to(x.astype(jnp.float32), shapes.partition(
        leaf_spec, "mr" if self.side == "left" else "rn"))


# In the array layout (batch..., n, m): columns n are axis -2, rows m axis -1.
_AXIS = {"right": -2, "left": -1}


def _gather(basis: SparseBasis, g: jax.Array) -> jax.Array:
  """``ρ ⊙`` the kept slices of ``g``: its layout, the kept axis cut to r."""
  axis = _AXIS[basis.side]
  other = -1 if axis == -2 else -2  # the kept axis' partner, broadcast
  idx = jnp.expand_dims(basis.indices, other)
  scales = jnp.expand_dims(basis.scales, other).astype(g.dtype)
  return jnp.take_along_axis(g, idx, axis=axis) * scales


def _scatter_add(basis: SparseBasis, r: jax.Array) -> jax.Array:
  """Adds ``ρ ⊙ r`` into zeros at the kept positions, ``(batch..., n, m)``."""
  axis = _AXIS[basis.side]
  batch = r.shape[:-2]
  scales = jnp.expand_dims(basis.scales, -1 if axis == -2 else -2)
  x = r * scales.astype(r.dtype)
  if axis == -1:  # rows m: move them in front so both sides scatter axis 0
    x = jnp.swapaxes(x, -1, -2)
  flat_x = x.reshape((-1,) + x.shape[-2:])
  flat_idx = basis.indices.reshape((-1, basis.indices.shape[-1]))

  def one(idx, v):
    return jnp.zeros((basis.size, v.shape[-1]), v.dtype).at[idx].add(v)

  out = jax.vmap(one)(flat_idx, flat_x)
  out = out.reshape(batch + (basis.size, x.shape[-1]))
  return jnp.swapaxes(out, -1, -2) if axis == -1 else out


def grass(
    proj_type: str = "std",
    *,
    selection: str = "top_norm",
    power: float = 1.0,
) -> Projector:
  """GRASS's structured sparse projection: ``r`` rows (or columns) of ``G``.

  At a refresh the ``ℓ2`` norm of every row (``left``) or column (``right``)
  of ``G`` (``m × n``, references' orientation) is computed and ``r``
  positions are chosen:

  - ``top_norm`` (the paper's Top-r): the ``r`` largest norms, ``ρ = 1``.
    Biased (rows outside the top ``r`` never move).
  - ``norm_sampling``: ``r`` i.i.d. draws with replacement (multinomial)
    with ``q_i ∝ ‖G_i‖₂^power`` (all-zero matrices: uniform), scaled by
    ``ρ_j = 1/√(r·q_{σ_j})``, so that ``E[P Pᵀ] = I`` and
    ``E[up(down(G))] = G``: an unbiased sketch. ``power=1`` is
    norm-proportional sampling (the ``q`` minimizing
    ``E‖up(down(G)) − G‖²_F``), ``power=2`` length-squared sampling,
    ``power=0`` uniform.

  ``down(G) = ρ ⊙ G[σ]`` and ``up(N)`` adds ``ρ_j N_j`` into row ``σ_j``
  of zeros. The paper resets the optimizer moments at each refresh: pair it with
  ``lowrank_project(..., on_refresh="reset")``.

  The authors' repository (github.com/aashiqmuhamed/GRASS) holds a README
  only, no code, so this follows the paper; unverified against code: the
  exponent of the sampling distribution (``power``), and whether the Adam
  step count restarts with the moments (it does not here, as in every
  ``on_refresh="reset"``). Unbiasedness and the scales hold for any
  ``power``. The paper writes ``Pᵀ G`` (rows); ``proj_type`` chooses the
  side as for GaLore (``left`` always keeps rows).

  Args:
    proj_type: ``std`` (keep ``r`` of the smaller side: columns when
      ``m >= n``), ``reverse_std``, ``left`` (rows) or ``right`` (columns);
      see ``matmul.side``.
    selection: ``top_norm`` or ``norm_sampling``.
    power: Exponent of the row norms in the sampling probabilities
      (``norm_sampling`` only), ``>= 0``.

  Returns:
    A ``Projector`` whose basis is a ``SparseBasis``. Under an explicit
    mesh ``down`` and ``up`` become matmuls with ``P``
    (``SparseBasis.matrix``): one reduction of the ``r`` kept rows instead of
    gathering the whole gradient.

  Example:
    >>> import optax, optax_lowrank
    >>> from optax_lowrank.projectors.grass import grass
    >>> tx = optax_lowrank.lowrank_project(
    ...     optax.scale_by_adam(), rank=4, update_proj_gap=50,
    ...     projector=grass(selection="norm_sampling"), on_refresh="reset")
    >>> params = {"w": jnp.ones((32, 16))}
    >>> updates, state = tx.update(params, tx.init(params))
    >>> state.bases["w"].basis.indices.shape
    (4,)

  References:
    Muhamed et al., `Grass: Compute Efficient Low-Memory LLM Training with
    Structured Sparse Gradients <https://arxiv.org/abs/2406.17660>`_, EMNLP
    2024; repository: github.com/aashiqmuhamed/GRASS.
  """
  matmul.check_proj_type(proj_type)
  if selection not in SELECTIONS:
    raise ValueError(
        f"`selection` must be one of {SELECTIONS}, got {selection!r}")
  if (isinstance(power, bool) or not isinstance(power, (int, float))
      or not math.isfinite(power) or power < 0):
    raise ValueError(f"`power` must be a finite number >= 0, got {power!r}")

  def init(info, dtype):
    del dtype
    side = matmul.side(proj_type, info.m, info.n, info.std_side)
    size = info.m if side == "left" else info.n
    indices = info.zeros("r", jnp.int32) + jnp.arange(info.rank,
                                                      dtype=jnp.int32)
    scales = info.zeros("r", jnp.float32) + 1.0
    return SparseBasis(indices, scales, side, size)

  def refresh(ctx, g, basis):
    key = ctx.key
    spec = shapes.explicit_spec(g)
    sq = jnp.sum(g * g, axis=-1 if basis.side == "right" else -2)
    if spec is not None:  # tiny (batch..., size): choose on every device
      sq = jax.sharding.reshard(sq, P())
    r = basis.indices.shape[-1]
    if selection == "top_norm":
      _, idx = jax.lax.top_k(sq, r)
      idx = jnp.sort(idx, axis=-1)
      scales = jnp.ones(idx.shape, jnp.float32)
    else:
      w = sq ** (0.5 * power)
      total = jnp.sum(w, axis=-1, keepdims=True)
      q = jnp.where(total > 0, w / jnp.where(total > 0, total, 1.0),
                    1.0 / basis.size)
      # r i.i.d. draws by inverse CDF: the first position whose cumulative
      # probability exceeds a uniform u in [0, 1) (zero-probability positions
      # are never drawn; the last cumulative value is exactly 1).
      cdf = jnp.cumsum(q, axis=-1)
      cdf = cdf / cdf[..., -1:]
      u = jax.random.uniform(key, q.shape[:-1] + (r,))
      idx = jnp.sum(cdf[..., None, :] <= u[..., :, None], axis=-1)
      idx = jnp.sort(jnp.minimum(idx, basis.size - 1), axis=-1)
      scales = jax.lax.rsqrt(r * jnp.take_along_axis(q, idx, axis=-1))
    idx = idx.astype(jnp.int32)
    if spec is not None:
      out = P(*spec[:-2], None)
      idx = jax.sharding.reshard(idx, out)
      scales = jax.sharding.reshard(scales, out)
    return dataclasses.replace(basis, indices=idx, scales=scales)

  # Under an explicit mesh (read off the arrays) the matmul forms, without one
  # (or under Auto axes) the gather and scatter.
  def down(basis, g):
    spec = shapes.explicit_spec(g)
    if spec is None:
      return _gather(basis, g)
    if basis.side == "left":
      return matmul.down_left(basis.matrix(spec), g)
    return matmul.down_right(basis.matrix(spec), g)

  def up(basis, r):
    if shapes.explicit_spec(r) is None:
      return _scatter_add(basis, r)
    if basis.side == "left":
      return matmul.up_left(basis.matrix(), r)
    return matmul.up_right(basis.matrix(), r)

  return Projector(init, refresh, down, up)
