"""Newton–Schulz orthogonalization (Muon's), batched over leading axes, and the
dimension numbers that let optax's Muon run on trees of stacked or projected
matrices."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_lowrank import shapes

# Keller Jordan's quintic coefficients, also optax.contrib.scale_by_muon's.
MUON_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(x: jax.Array, steps: int = 5,
                  coeffs: Sequence[float] = MUON_COEFFS,
                  eps: float = 1e-8) -> jax.Array:
  """Approximately orthogonalizes each matrix of ``x`` (``U Vᵀ`` of its SVD).

  ``x`` is divided by its Frobenius norm (plus ``eps``) per matrix, then
  ``steps`` quintic iterations ``X ← a X + (b A + c A²) X`` with
  ``A = X Xᵀ`` are taken on the wide orientation (``X`` transposed when it
  has more rows than columns), exactly as ``optax.contrib.scale_by_muon``
  does with its default ``preconditioning="frobenius"``; the singular values
  come out in about ``[0.7, 1.2]``, not exactly 1. Leading axes are batch
  axes (stacked layers), each matrix orthogonalized on its own. Computed in
  float32; under explicit mesh axes the matrices are gathered (batch axes
  stay sharded) and the result is sharded like ``x``.

  optax keeps its own function in a private module
  (``optax.contrib._muon``) and takes one matrix or dimension numbers; this
  one is the same arithmetic on ``(batch..., p, q)`` stacks.

  Args:
    x: An array ``(batch..., p, q)``.
    steps: Number of iterations (static).
    coeffs: The quintic's ``(a, b, c)``.
    eps: Added to the Frobenius norm.

  Returns:
    An array of ``x``'s shape, float32.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from optax_lowrank.newton_schulz import newton_schulz
    >>> o = newton_schulz(jax.random.normal(jax.random.key(0), (3, 8, 16)))
    >>> s = jnp.linalg.svd(o, compute_uv=False)
    >>> bool(jnp.all((s > 0.6) & (s < 1.3)))
    True

  References:
    Jordan et al., `Muon: An optimizer for hidden layers in neural networks
    <https://kellerjordan.github.io/posts/muon/>`_, 2024.
  """
  if x.ndim < 2:
    raise ValueError(f"newton_schulz needs matrices, got shape {x.shape}")
  a, b, c = (float(v) for v in coeffs)
  y = shapes.gather_matrices(x.astype(jnp.float32))
  wide = y.shape[-2] <= y.shape[-1]
  if not wide:
    y = jnp.swapaxes(y, -1, -2)
  norm = jnp.sqrt(jnp.sum(jnp.square(y), axis=(-2, -1), keepdims=True))
  y = y / (norm + eps)
  for _ in range(steps):
    gram = y @ jnp.swapaxes(y, -1, -2)
    y = a * y + (b * gram + c * gram @ gram) @ y
  if not wide:
    y = jnp.swapaxes(y, -1, -2)
  return shapes.reshard_like(y, x)


def matrix_dimension_numbers(updates: Any) -> Any:
  """Dimension numbers for ``optax.contrib.scale_by_muon``: each leaf's last
  two axes are the matrix.

  ``scale_by_muon`` with ``weight_dimension_numbers=None`` takes a single
  matrix only (on a dict of parameters optax 0.2.8 raises a pytree structure
  error), and stacked layers need their leading axes marked as batch axes.
  Pass this function as ``weight_dimension_numbers``: every leaf of rank
  ``d`` is orthogonalized over its axes ``(d − 2, d − 1)``, the others are
  batch axes. Inside ``lowrank_project`` the leaves are the projected
  gradients (``(batch..., n, r)`` or ``(batch..., r, m)``), so this is what
  Muon in the subspace needs; give ``lowrank_project`` an ``unprojected``
  transform for the leaves Muon should not see (vectors, embeddings), which
  then reach ``scale_by_muon`` as ``optax.MaskedNode``s.

  Args:
    updates: A pytree of arrays (``optax.MaskedNode`` leaves are kept).

  Returns:
    A pytree like ``updates`` of ``optax.contrib.MuonDimensionNumbers``.

  Example:
    >>> import jax.numpy as jnp, optax, optax_lowrank
    >>> from optax_lowrank.newton_schulz import matrix_dimension_numbers
    >>> matrix_dimension_numbers(
    ...     {"w": jnp.ones((4, 8)), "s": jnp.ones((2, 8, 4))})
    {'s': MuonDimensionNumbers(reduction_axis=1, output_axis=2), 'w': ...}
    >>> tx = optax_lowrank.lowrank_project(
    ...     optax.contrib.scale_by_muon(
    ...         weight_dimension_numbers=matrix_dimension_numbers),
    ...     rank=4, unprojected=optax.scale_by_adam())

  References:
    Jordan et al., `Muon: An optimizer for hidden layers in neural networks
    <https://kellerjordan.github.io/posts/muon/>`_, 2024.
  """
  return jax.tree.map(
      lambda x: optax.contrib.MuonDimensionNumbers(x.ndim - 2, x.ndim - 1),
      updates)
