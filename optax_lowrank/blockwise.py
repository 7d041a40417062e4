"""Per-matrix versions of optax's block-RMS transforms, for stacked layers.

``optax.clip_by_block_rms`` and ``optax.scale_by_param_block_rms`` take one
RMS per leaf. For a leaf of stacked layers that mixes the layers; here the RMS
runs over the matrix axes only (those named by the leaf's
``DimensionNumbers``), one value per layer, so a stacked model is updated as
its unstacked twin. Leaves without dimension numbers use the whole leaf.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_lowrank import shapes


def _matrix_axes(params, dimension_numbers) -> list[tuple[int, ...] | None]:
  """Per leaf, the axes an RMS runs over (``None``: all of them)."""
  dims = shapes.resolve_per_leaf(
      dimension_numbers, params,
      lambda x: x is None or isinstance(x, shapes.DimensionNumbers))
  out = []
  for leaf, d in zip(jax.tree.leaves(params), dims):
    if d is None or jnp.ndim(leaf) < 2:
      out.append(None)
      continue
    layout = shapes.MatrixLayout.from_dimension_numbers(
        tuple(leaf.shape), d, "<leaf>")
    out.append(layout.output_axes + layout.reduction_axes)
  return out


def _rms(x, axes):
  return jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32)), axis=axes,
                           keepdims=axes is not None))


def clip_by_matrix_rms(
    threshold: float, dimension_numbers: shapes.DimensionNumbersOrFn = None
) -> optax.GradientTransformation:
  """``u / max(1, rms(u) / threshold)``, one RMS per matrix.

  Args:
    threshold: The largest RMS left unchanged.
    dimension_numbers: As for ``lowrank_project``; axes they do not name are
      batch axes (stacked layers), each layer clipped on its own.

  Returns:
    An ``optax.GradientTransformation`` (stateless).

  Example:
    >>> import optax_lowrank
    >>> tx = optax_lowrank.blockwise.clip_by_matrix_rms(1.0)

  References:
    Shazeer & Stern, `Adafactor: Adaptive Learning Rates with Sublinear
    Memory Cost <https://arxiv.org/abs/1804.04235>`_, ICML 2018 (update
    clipping).
  """
  if isinstance(threshold, (int, float)) and not threshold > 0:  # arrays pass
    raise ValueError(f"`threshold` must be positive, got {threshold!r}")

  def update(updates, state, params=None):
    del params
    leaves, treedef = jax.tree.flatten(updates)
    axes = _matrix_axes(updates, dimension_numbers)
    out = [(u / jnp.maximum(1.0, _rms(u, a) / threshold)).astype(u.dtype)
           for u, a in zip(leaves, axes)]
    return treedef.unflatten(out), state

  return optax.GradientTransformation(
      lambda params: optax.EmptyState(), update)


def scale_by_param_matrix_rms(
    min_scale: float = 1e-3,
    dimension_numbers: shapes.DimensionNumbersOrFn = None,
) -> optax.GradientTransformation:
  """``u · max(rms(W), min_scale)``, one RMS of the parameter per matrix.

  Args:
    min_scale: Floor of the parameter scale.
    dimension_numbers: As for ``clip_by_matrix_rms``.

  Returns:
    An ``optax.GradientTransformation`` (stateless; needs ``params``).

  Example:
    >>> import optax_lowrank
    >>> tx = optax_lowrank.blockwise.scale_by_param_matrix_rms()

  References:
    Shazeer & Stern, `Adafactor <https://arxiv.org/abs/1804.04235>`_, ICML
    2018 (relative step sizes).
  """

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("scale_by_param_matrix_rms needs `params`")
    leaves, treedef = jax.tree.flatten(updates)
    axes = _matrix_axes(params, dimension_numbers)
    out = [(u * jnp.maximum(_rms(w, a), min_scale)).astype(u.dtype)
           for u, w, a in zip(leaves, treedef.flatten_up_to(params), axes)]
    return treedef.unflatten(out), state

  return optax.GradientTransformation(
      lambda params: optax.EmptyState(), update)
