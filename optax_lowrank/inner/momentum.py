"""Momentum with a Nesterov-style output, as Flora's code writes it."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class EmaNesterovState(NamedTuple):
  """State of ``ema_nesterov``: the momentum (a first moment)."""

  momentum: Any


def ema_nesterov(
    b1: float = 0.9, *, momentum_dtype: Any = None
) -> optax.GradientTransformation:
  """``M ← b1·M + (1 − b1)·u``; outputs ``b1·M + (1 − b1)·u``.

  The current input enters twice, as in Flora's optax code (no bias
  correction).

  Args:
    b1: Momentum decay, in [0, 1).
    momentum_dtype: Storage dtype of ``M`` (Flora keeps it in bfloat16);
      ``None`` keeps the input's dtype. Arithmetic is in the input's dtype.

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> import optax_lowrank
    >>> tx = optax_lowrank.inner.ema_nesterov(0.9)

  References:
    Hao et al., `Flora: Low-Rank Adapters Are Secretly Gradient Compressors
    <https://arxiv.org/abs/2402.03293>`_, ICML 2024; code:
    github.com/BorealisAI/flora-opt (``optax`` version).
  """
  if isinstance(b1, (int, float)) and not 0.0 <= b1 < 1.0:
    raise ValueError(f"`b1` must be in [0, 1), got {b1!r}")

  def init(params):
    return EmaNesterovState(
        optax.tree.zeros_like(params, dtype=momentum_dtype))

  def update(updates, state, params=None):
    del params
    new = jax.tree.map(
        lambda m, u: b1 * m.astype(u.dtype) + (1 - b1) * u,
        state.momentum, updates)
    out = jax.tree.map(lambda m, u: b1 * m + (1 - b1) * u, new, updates)
    stored = jax.tree.map(lambda m, old: m.astype(old.dtype), new,
                          state.momentum)
    return out, EmaNesterovState(stored)

  return optax.GradientTransformation(init, update)
