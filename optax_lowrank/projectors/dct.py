"""SVD-free subspaces: ``r`` columns of the orthonormal DCT matrix per gradient.

One fixed orthonormal matrix ``Q`` per size (the DCT matrix, never stored:
its entries are a closed formula of their indices) and a per-matrix choice of
``r`` of its columns: the ones along which the gradient has the largest L1
norm (the "dynamic column selection" of Modoranu et al.). The basis state is
``r`` integer indices per matrix; ``down`` and ``up`` are matmuls with the
``r`` chosen columns ``Q[:, idx]``, rebuilt from the indices in float32
(a ``size × r`` elementwise formula, no gather), so they shard like a dense
GaLore basis.
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

NORMS = ("l1", "l2")
# Largest size whose phase index j·(2k+1) <= (size-1)·(2·size-1) fits uint32.
MAX_SIZE = 46341


def _entries(j: jax.Array, k: jax.Array, size: int) -> jax.Array:
  """``Q[j, k] = w_j √(2/N) cos(π j (2k+1) / (2N))`` in float32, broadcast.

  ``w_0 = 1/√2``, else 1: the orthonormal DCT-II matrix (``Q @ x`` is the
  orthonormal DCT-II of ``x``). The phase ``j(2k+1) mod 4N`` is reduced
  exactly in integers and folded into ``[0, π/4]`` (cosine or sine of a small
  angle), so every entry is accurate to float32 rounding at any size.

  Args:
    j: Row (frequency) indices, an integer array.
    k: Column (sample) indices, an integer array broadcastable with ``j``.
    size: ``N``.

  Returns:
    The entries, float32, of the broadcast shape of ``j`` and ``k``.
  """
  n4 = 4 * size
  ju, ku = j.astype(jnp.uint32), k.astype(jnp.uint32)
  p = (ju * (2 * ku + 1)) % n4  # θ = π p / (2N) in [0, 2π)
  p = jnp.where(p > 2 * size, n4 - p, p)  # cos(2π - θ) = cos θ: p in [0, 2N]
  sign = jnp.where(p > size, -1.0, 1.0).astype(jnp.float32)
  p = jnp.where(p > size, 2 * size - p, p)  # cos(π - θ) = -cos θ: [0, N]
  small = 2 * p <= size  # θ <= π/4: cos θ; else sin(π/2 - θ)
  angle = jnp.where(small, p, size - p).astype(jnp.float32) * (
      math.pi / (2 * size))
  c = sign * jnp.where(small, jnp.cos(angle), jnp.sin(angle))
  scale = jnp.where(j == 0, math.sqrt(1.0 / size), math.sqrt(2.0 / size))
  return c * scale.astype(jnp.float32)


def dct_matrix(size: int) -> jax.Array:
  """The orthonormal DCT-II matrix ``Q`` (``size × size``, float32).

  ``Q[j, k] = w_j √(2/N) cos(π j (2k+1) / (2N))`` with ``w_0 = 1/√2``: row
  ``j`` is the ``j``-th cosine basis vector, ``Q @ x`` the orthonormal DCT-II
  of ``x`` (scipy's ``dct(x, norm="ortho")``) and ``Qᵀ Q = I``. This is the
  authors' ``dct3_matrix`` (``utils/dct.py``; named after ``x @ Q``, a
  DCT-III of the rows), the ``Q`` of their default ``sim_type="matmul"``.

  Args:
    size: ``N``, at most ``MAX_SIZE``.

  Returns:
    A float32 array of shape ``(size, size)``, computed in the program (it
    is never stored in the optimizer state).

  Example:
    >>> from optax_lowrank.projectors.dct import dct_matrix
    >>> q = dct_matrix(8)
    >>> bool(abs(q.T @ q - jnp.eye(8)).max() < 1e-6)
    True
  """
  idx = jnp.arange(size, dtype=jnp.int32)
  return _entries(idx[:, None], idx[None, :], size)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DCTBasis:
  """Chosen columns of the DCT matrix, per matrix.

  Attributes:
    indices: ``int32`` ``(batch..., r)``, ascending: the columns ``k`` of
      ``Q`` (``size × size``) spanning the subspace.
    side: ``left`` (rows ``m`` projected, ``size = m``) or ``right``
      (columns ``n``, ``size = n``), in the references' orientation (static).
    size: Size of ``Q`` (static).

  Nothing here depends on a device mesh: the indices are sharded like the
  leaf's batch axes, and ``down`` shards ``Q[:, indices]`` like the gradient.
  """

  indices: jax.Array
  side: str = dataclasses.field(metadata=dict(static=True))
  size: int = dataclasses.field(metadata=dict(static=True))

  def matrix(self, leaf_spec: Optional[tuple[Any, ...]] = None) -> jax.Array:
    """``Q[:, indices]`` in float32: ``(batch..., size, r)`` on the left (a
    GaLore ``U``), its transpose ``(batch..., r, size)`` on the right (a
    ``Vh``).

    Args:
      leaf_spec: Under an explicit mesh, the partition spec entries of the
        leaf's ``(batch..., n, m)`` view, to shard the matrix like it along
        ``size``; ``None``: as the indices (batch axes only).
    """
    iota = jnp.arange(self.size, dtype=jnp.int32)
    if self.side == "left":
      x = _entries(iota[:, None], self.indices[..., None, :], self.size)
    else:
      x = _entries(iota[None, :], self.indices[..., :, None], self.size)
    return shapes.reshard_to(x, shapes.partition(
        leaf_spec, "mr" if self.side == "left" else "rn"))


def dct(proj_type: str = "std", *, norm: str = "l1") -> Projector:
  """DCT subspaces with dynamic column selection (SVD-free low rank).

  With ``Q`` the orthonormal DCT-II matrix of the projected side (see
  ``dct_matrix``), a refresh computes ``S = G Q`` (right side; ``Qᵀ G`` on
  the left, ``G`` being ``m × n`` in the references' orientation), ranks its
  columns (rows) by their L1 norm and keeps the top ``r`` indices, sorted
  ascending. Then ``down(G) = G Q[:, idx]`` (``Q[:, idx]ᵀ G`` on the left)
  and ``up`` multiplies back by ``Q[:, idx]ᵀ``: an orthonormal basis, like
  GaLore's, found by one matmul instead of an SVD. The state is ``r``
  ``int32`` indices per matrix; ``Q`` is rebuilt in float32 from its size.

  This follows the authors' ``DCTAdamW`` with its defaults (``proj="dct"``,
  ``sim_type="matmul"``, ``ell_norm=1``, ``update_proj_gap=1``,
  ``rotate_subspace=False``): pair it with ``lowrank_project(
  optax.scale_by_adam(), update_proj_gap=1, on_refresh="keep")`` (moments
  are kept, unrotated, when the indices change); ``on_refresh="rotate"`` maps
  the first moment as their ``rotate_subspace=True`` does. Differences from
  their code:

  - ``torch.topk(sorted=False)`` leaves the order of the kept indices (so
    which moment slot follows which column under "keep") to the backend;
    here they are sorted ascending.
  - One ``Q`` per size, so leaves of different sizes work (the authors keep
    a single ``Q`` sized from the first parameter); not their
    Llama-3/Qwen special case (``m ∈ {512, 1024}``, ``n ∈ {3584, 4096}``
    projected on the right), which ``proj_type="right"`` gives.
  - Refreshes at steps ``0, gap, 2·gap, ...`` (theirs: 1-based ``1, gap,
    2·gap``), the same for their default ``gap = 1``.
  - Their ``rotate_subspace`` also rotates the second moment (then
    ``abs``); ``on_refresh="rotate"`` keeps it.
  - Not implemented: the FFT ("makhoul") similarity (it uses ``Qᵀ``, a
    different basis), the column-norm-weighted similarity (negative
    ``ell_norm``), error feedback, and their embedding/``max_shape`` rule
    (use ``mask``).

  Args:
    proj_type: ``std`` (project the smaller side: columns when ``m >= n``,
      as the authors' ``is_right_proj = rows >= cols``), ``reverse_std``,
      ``left`` or ``right``; see ``matmul.side``.
    norm: How columns of ``G Q`` are ranked: ``l1`` (the authors' default)
      or ``l2``.

  Returns:
    A ``Projector`` whose basis is a ``DCTBasis``.

  Example:
    >>> import optax, optax_lowrank
    >>> from optax_lowrank.projectors.dct import dct
    >>> tx = optax_lowrank.lowrank_project(
    ...     optax.scale_by_adam(), rank=4, projector=dct(),
    ...     update_proj_gap=1, on_refresh="keep")
    >>> params = {"w": jnp.ones((32, 16))}
    >>> updates, state = tx.update(params, tx.init(params))
    >>> updates["w"].shape
    (32, 16)

  References:
    Modoranu et al., `SVD-Free Low-Rank Adaptive Gradient Optimization for
    Large Language Models <https://arxiv.org/abs/2505.17967>`_ (FFT-based
    Dynamic Subspace Selection), 2025; code:
    github.com/IST-DASLab/ISTA-DASLab-Optimizers
    (``ista_daslab_optimizers/fft_low_rank``).
  """
  matmul.check_proj_type(proj_type)
  if norm not in NORMS:
    raise ValueError(f"`norm` must be one of {NORMS}, got {norm!r}")

  def init(info, dtype):
    del dtype
    side = matmul.side(proj_type, info.m, info.n, info.std_side)
    size = info.m if side == "left" else info.n
    if size > MAX_SIZE:
      raise ValueError(
          f"`dct` projects a side of size {size}; at most {MAX_SIZE} is "
          "supported. Exclude the leaf with `mask` or use another `proj_type`."
      )
    # The lowest frequencies until the first refresh (always at step 0).
    indices = info.zeros("r", jnp.int32) + jnp.arange(info.rank,
                                                      dtype=jnp.int32)
    return DCTBasis(indices, side, size)

  def refresh(ctx, g, basis):
    del ctx
    q = dct_matrix(basis.size)
    spec = shapes.explicit_spec(g)
    right = basis.side == "right"
    if spec is not None:  # Q sharded like the axis of g it contracts
      q = jax.sharding.reshard(q, P(spec[-2 if right else -1], None))
    # Sᵀ in g's layout: Qᵀ g (batch..., k, m) on the right, g Q (batch...,
    # n, k) on the left; the k are ranked by the norm over the other axis.
    out, hi = shapes.out_sharding(spec), jax.lax.Precision.HIGHEST
    if right:
      s = jnp.einsum("jk,...jm->...km", q, g, out_sharding=out, precision=hi)
    else:
      s = jnp.einsum("...nj,jk->...nk", g, q, out_sharding=out, precision=hi)
    scores = jnp.sum(jnp.abs(s) if norm == "l1" else s * s,
                     axis=-1 if right else -2)
    if spec is not None:
      scores = jax.sharding.reshard(scores, P(*spec[:-2], None))
    _, idx = jax.lax.top_k(scores, basis.indices.shape[-1])
    return dataclasses.replace(
        basis, indices=jnp.sort(idx, axis=-1).astype(jnp.int32))

  def down(basis, g):
    q = basis.matrix(shapes.explicit_spec(g))
    if basis.side == "left":
      return matmul.down_left(q, g)
    return matmul.down_right(q, g)

  def up(basis, r):
    if basis.side == "left":
      return matmul.up_left(basis.matrix(), r)
    return matmul.up_right(basis.matrix(), r)

  return Projector(init, refresh, down, up)
