"""Randomized truncated-SVD subspaces (Halko, Martinsson & Tropp), matmuls only.

An exact SVD needs each matrix whole on one device (``jnp.linalg.svd`` refuses
inputs sharded on their matrix axes). The randomized range finder touches the
gradient only through matrix products with thin ``(side, k)`` blocks, so a
gradient sharded along either matrix axis stays where it is: every contraction
over a sharded axis ends in a small all-reduce of a ``(side, k)`` or ``k × k``
result, and the remaining linear algebra (Cholesky, triangular inverse,
``eigh``) runs on replicated ``k × k`` matrices.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from optax_lowrank import shapes
from optax_lowrank import spread
from optax_lowrank.projectors import matmul
from optax_lowrank.projectors.svd import LeftBasis, RightBasis, svd
from optax_lowrank.projectors.base import Projector


# Shift of the ``k × k`` Gram matrix in each CholeskyQR pass:
# ``chol(YᵀY + s·I)`` with ``s = SHIFT · k · eps · max(diag(YᵀY))`` (float32
# ``eps = 2⁻²⁴``). A float32 Gram matrix of a (numerically) rank-deficient
# ``Y`` is indefinite by rounding and Cholesky fails; on rank-deficient blocks
# of up to 16384 rows and ``k`` up to 520 the smallest shift that never failed
# was at most ``0.2 · k · eps`` of the largest diagonal entry, and this is
# twenty times that. A shift never changes the span of ``Q = Y L⁻ᵀ``: it only
# leaves ``Q`` short of orthonormal along directions of ``Y`` weaker than
# ``√s``, which the second pass of CholeskyQR2 restores (shifted CholeskyQR,
# Fukaya et al. 2020), and the final basis vectors are normalized.
SHIFT = 4.0
_HIGHEST = jax.lax.Precision.HIGHEST


def _einsum(subscripts: str, *operands, out=None) -> jax.Array:
  """A float32 ``einsum`` at full precision with an explicit output sharding.

  ``HIGHEST`` keeps the products float32 on TPUs (whose default multiplies
  float32 in bfloat16); CholeskyQR squares the condition of its block and
  would lose the small directions otherwise.
  """
  return jnp.einsum(subscripts, *operands, precision=_HIGHEST,
                    out_sharding=out)


def _spec(batch: Optional[tuple[Any, ...]], *entries) -> Optional[P]:
  """``P(*batch, *entries)``, or ``None`` when nothing is sharded explicitly."""
  return None if batch is None else P(*batch, *entries)


def _per_matrix(fn, x: jax.Array) -> jax.Array:
  """``fn`` (a LAPACK-backed map of one ``k × k`` matrix) over a stack, each
  device computing only its share (``spread.map_matrices``), the result laid
  out as ``x`` was (``jnp.linalg.cholesky`` refuses a batch axis sharded under
  an explicit mesh, so the stack is never factorized in place)."""
  return shapes.reshard_like(spread.map_matrices(fn, x), x)


def _inverse_cholesky_factor(gram: jax.Array) -> jax.Array:
  """``L⁻¹`` for ``L Lᵀ = gram + s·I`` (shifted, see ``SHIFT``)."""
  k = gram.shape[-1]
  eye = jnp.eye(k, dtype=gram.dtype)
  largest = jnp.max(jnp.diagonal(gram, axis1=-2, axis2=-1), axis=-1)
  finfo = jnp.finfo(gram.dtype)
  shift = SHIFT * k * finfo.eps / 2 * largest + finfo.tiny
  shift = shift[..., None, None]
  gram = gram + shift * eye

  def one(c):  # closes over no array: it runs inside a shard_map
    factor = jnp.linalg.cholesky(c)
    identity = jnp.broadcast_to(jnp.eye(k, dtype=c.dtype), c.shape)
    return jax.scipy.linalg.solve_triangular(factor, identity, lower=True)

  return _per_matrix(one, gram)


def _cholesky_qr2(y: jax.Array, batch) -> jax.Array:
  """Orthonormal columns spanning ``Y``'s, ``(batch..., p, k)``: CholeskyQR2.

  Two shifted CholeskyQR passes ``Y ← Y L⁻ᵀ``, ``L Lᵀ = YᵀY + s·I``. Only the
  ``k × k`` Gram matrices are reduced across devices; ``Y``'s rows keep their
  sharding.
  """
  out = None if batch is None else P(*shapes.explicit_spec(y))
  for _ in range(2):
    gram = _einsum("...pk,...pl->...kl", y, y, out=_spec(batch, None, None))
    y = _einsum("...pk,...lk->...pl", y, _inverse_cholesky_factor(gram),
                out=out)
  return y


def _first_maxabs_signs(x: jax.Array) -> jax.Array:
  """Sign of each column's first largest-magnitude entry, ``(batch..., 1, r)``.

  ``svd._canonical_signs`` reads that entry with ``argmax`` and
  ``take_along_axis``, and the gather is refused on an axis sharded under an
  explicit mesh. The same entry is found here with reductions only (max, then
  the smallest index attaining it, then a masked sum), which run sharded and
  give the same sign. Zero columns get ``+1``.
  """
  mag = jnp.abs(x)
  top = jnp.max(mag, axis=-2, keepdims=True)
  index = jnp.arange(x.shape[-2], dtype=jnp.int32)[:, None]
  first = jnp.min(jnp.where(mag == top, index, x.shape[-2]), axis=-2,
                  keepdims=True)
  entry = jnp.sum(jnp.where(index == first, x, 0.0), axis=-2, keepdims=True)
  return jnp.where(entry < 0, -1.0, 1.0).astype(x.dtype)


def randomized_subspace(
    a: jax.Array, omega: jax.Array, rank: int, *, power_iters: int = 2
) -> tuple[jax.Array, jax.Array]:
  """Top-``rank`` left singular subspace of ``a`` by a randomized range finder.

  Halko, Martinsson & Tropp's Algorithm 4.4 (subspace iteration) followed by
  their Algorithm 5.1 (direct SVD of the small projection), with every QR a
  shifted CholeskyQR2 (``orth``, see ``SHIFT``) and the small SVD an
  eigendecomposition:

  1. ``Q = orth(A Ω)``;
  2. ``power_iters`` times: ``Q = orth(A orth(Aᵀ Q))``;
  3. ``B = Qᵀ A`` (``k × q``) and ``B Bᵀ = W Λ Wᵀ`` (``k × k``);
  4. the basis is ``Q W_r`` for the ``r`` largest eigenvalues, columns
     normalized, and ``Bᵀ W_r`` (``= Aᵀ Q W_r``, the right singular vectors
     scaled by the singular values) comes along to fix signs.

  ``A`` appears only in the products of steps 1 to 3. Signs are not fixed
  here. Eigenvectors come from ``B Bᵀ``, whose eigenvalues are the squared
  singular values: a vector whose singular value is below ``√eps ≈ 2.4e-4``
  (float32) of the largest is only as accurate as ``eps·σ₁² / gap(σ²)``.

  Args:
    a: ``(batch..., p, q)`` float32 matrices, possibly sharded on any axis.
    omega: ``(batch..., q, k)`` starting block, ``rank <= k <= min(p, q)``.
    rank: ``r``, the number of basis vectors returned.
    power_iters: Number of power (subspace) iterations.

  Returns:
    ``(basis, image)``: ``basis`` ``(batch..., p, r)`` with orthonormal
    columns, ordered by decreasing singular value, sharded like ``a``'s rows;
    ``image ≈ Aᵀ basis`` ``(batch..., q, r)``, sharded like ``a``'s columns.
  """
  spec = shapes.explicit_spec(a)
  batch = None if spec is None else spec[:-2]
  rows, cols = (None, None) if spec is None else spec[-2:]
  on_rows = _spec(batch, rows, None)
  on_cols = _spec(batch, cols, None)
  y = _einsum("...pq,...qk->...pk", a, omega, out=on_rows)
  q = _cholesky_qr2(y, batch)

  def power_iteration(_, q):
    z = _cholesky_qr2(_einsum("...pq,...pk->...qk", a, q, out=on_cols), batch)
    return _cholesky_qr2(_einsum("...pq,...qk->...pk", a, z, out=on_rows),
                         batch)

  q = jax.lax.fori_loop(0, power_iters, power_iteration, q)
  b = _einsum("...pk,...pq->...kq", q, a, out=_spec(batch, None, cols))
  small = _einsum("...kq,...lq->...kl", b, b, out=_spec(batch, None, None))
  k = small.shape[-1]
  w = _per_matrix(lambda c: jnp.linalg.eigh(c)[1], small)
  w = w[..., :, k - rank:][..., ::-1]  # eigh is ascending
  basis = _einsum("...pk,...kr->...pr", q, w, out=on_rows)
  image = _einsum("...kq,...kr->...qr", b, w, out=on_cols)
  # The shifts leave columns short of unit norm by O(k·eps); normalize the
  # real ones (a rank-deficient ``A`` leaves near-zero columns, kept as such).
  norm = jnp.sqrt(jnp.sum(jnp.square(basis), axis=-2, keepdims=True))
  basis = basis / jnp.where(norm > 0.5, norm, 1.0)
  return basis, image


def _validate(proj_type, power_iters, oversample, warm_start, basis_dtype):
  matmul.check_proj_type(
      proj_type,
      hint=(" (`full` needs both sides: use projectors.svd('full'))"
            if proj_type == "full" else ""))
  for name, value in (("power_iters", power_iters), ("oversample", oversample)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      raise ValueError(
          f"`{name}` must be a non-negative int (0, 1, 2, ...), got {value!r}"
      )
  if not isinstance(warm_start, bool):
    raise ValueError(
        f"`warm_start` must be True or False, got {warm_start!r}"
    )
  if basis_dtype is not None:
    try:
      floating = jnp.issubdtype(jnp.dtype(basis_dtype), jnp.floating)
    except TypeError:
      floating = False
    if not floating:
      raise ValueError(
          "`basis_dtype` must be None or a floating dtype (e.g. jnp.float32, "
          f"jnp.bfloat16), got {basis_dtype!r}"
      )


def randomized_svd(
    proj_type: str = "std",
    *,
    power_iters: int = 2,
    oversample: int = 8,
    warm_start: bool = False,
    basis_dtype: Optional[jnp.dtype] = None,
) -> Projector:
  """GaLore's SVD subspace by a randomized range finder, without gathering.

  The same basis as ``projectors.svd`` (top-``r`` singular vectors of the
  float32 gradient ``G``, ``m × n`` in the references' orientation; the same
  ``proj_type`` sides, state types ``svd.RightBasis`` / ``svd.LeftBasis``,
  shapes, shardings, ``down`` and ``up``), computed approximately by Halko,
  Martinsson & Tropp's range finder with ``k = min(r + oversample, m, n)``
  columns and ``power_iters`` subspace iterations (``randomized_subspace``).

  It is built from matrix products with thin ``k``-column blocks, CholeskyQR2
  (Cholesky factorizations of ``k × k`` Gram matrices, each shifted by
  ``SHIFT · k · eps`` of its largest diagonal entry so that it cannot fail,
  then products) and an ``eigh`` of
  the ``k × k`` matrix ``B Bᵀ``; so a gradient sharded along either matrix
  axis (or both) is never gathered: only ``k``-column blocks and ``k × k``
  matrices are reduced across devices. Each matrix is first divided by its
  largest magnitude (the subspace does not change, and nothing overflows).

  The starting block ``Ω`` is Gaussian, drawn from the refresh key (values
  independent of the sharding). With ``warm_start``, the iteration instead
  starts in the basis's own space from ``X₀ = [previous basis, k - r Gaussian
  columns]`` (``Ω = Aᵀ X₀``, one extra product), which converges faster when
  the subspace moves slowly; a matrix whose previous basis is all zeros (before
  the first refresh) starts from ``k`` Gaussian columns there.

  Signs follow ``svd``'s convention (the largest-magnitude entry of each left
  singular vector of ``G`` positive; for a right basis the left vectors are
  ``G vᵢ / σᵢ``, available from the small projection), found with reductions
  that run on sharded axes instead of ``svd._canonical_signs``' gather.
  Up to the approximation, the basis equals ``svd``'s, signs included (a
  near-tie between largest entries may flip one); a gradient of
  rank below ``r`` gives (near-)zero basis vectors for its null directions,
  where the exact SVD gives arbitrary orthonormal ones (the projected gradient
  is zero along them either way).

  Args:
    proj_type: ``std``, ``reverse_std``, ``left`` or ``right`` (galore-torch's
      sides, see ``svd``). ``full`` is refused.
    power_iters: ``q``, subspace iterations (each two more products with the
      gradient); raise it for slowly decaying spectra.
    oversample: ``p``, extra columns beyond the rank.
    warm_start: Start from the previous basis instead of a Gaussian block.
    basis_dtype: Storage dtype of the basis; ``None`` stores it in the
      parameter's dtype, as ``svd`` does.

  Returns:
    A ``Projector`` whose basis is an ``svd.RightBasis`` or ``svd.LeftBasis``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_lowrank
    >>> from optax_lowrank.projectors.randomized_svd import randomized_svd
    >>> tx = optax_lowrank.lowrank_project(
    ...     optax.scale_by_adam(), rank=4, projector=randomized_svd())
    >>> params = {"w": jnp.ones((32, 16))}
    >>> state = tx.init(params)
    >>> grads = {"w": jax.random.normal(jax.random.key(0), (32, 16))}
    >>> updates, state = jax.jit(tx.update)(grads, state)
    >>> updates["w"].shape
    (32, 16)

  References:
    Halko, Martinsson & Tropp, `Finding Structure with Randomness:
    Probabilistic Algorithms for Constructing Approximate Matrix
    Decompositions <https://arxiv.org/abs/0909.4061>`_, SIAM Review 2011.

    Zhao et al., `GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
    Projection <https://arxiv.org/abs/2403.03507>`_, ICML 2024.
  """
  _validate(proj_type, power_iters, oversample, warm_start, basis_dtype)
  exact = svd(proj_type, basis_dtype=basis_dtype)

  def refresh(ctx, g, basis):
    key = ctx.key
    right = basis.side == "right"
    # The subspace is the left singular subspace of ``a`` (``p × q``): for a
    # right basis (V, n-space) that is ``g`` itself, for a left one (U,
    # m-space) its transpose.
    a = g.astype(jnp.float32)
    if not right:
      a = jnp.swapaxes(a, -1, -2)
    spec = shapes.explicit_spec(a)
    batch = None if spec is None else spec[:-2]
    rows, cols = (None, None) if spec is None else spec[-2:]
    scale = jnp.max(jnp.abs(a), axis=(-2, -1), keepdims=True)
    a = a / jnp.maximum(scale, jnp.finfo(jnp.float32).tiny)
    p, q = a.shape[-2:]
    rank = basis.vh.shape[-2] if right else basis.u.shape[-1]
    k = min(rank + oversample, p, q)
    if warm_start:
      prev = (jnp.swapaxes(basis.vh, -1, -2) if right else basis.u)
      prev = prev.astype(jnp.float32)
      draw = jax.random.normal(key, a.shape[:-2] + (p, k), jnp.float32,
                               out_sharding=_spec(batch, rows, None))
      cold = jnp.all(prev == 0, axis=(-2, -1), keepdims=True)
      start = jnp.where(cold, draw,
                        jnp.concatenate([prev, draw[..., rank:]], axis=-1))
      omega = _einsum("...pq,...pk->...qk", a, start,
                      out=_spec(batch, cols, None))
    else:
      omega = jax.random.normal(key, a.shape[:-2] + (q, k), jnp.float32,
                                out_sharding=_spec(batch, cols, None))
    vectors, image = randomized_subspace(a, omega, rank,
                                         power_iters=power_iters)
    # Signs from the left singular vectors of G: ``vectors`` themselves for a
    # left basis, ``image ∝ G V`` for a right one.
    vectors = vectors * _first_maxabs_signs(image if right else vectors)
    if right:
      return RightBasis(
          jnp.swapaxes(vectors, -1, -2).astype(basis.vh.dtype))
    return LeftBasis(vectors.astype(basis.u.dtype))

  return Projector(exact.init, refresh, exact.down, exact.up)
