"""Adafactor's factored second moment, finite for any finite gradient."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_lowrank import numerics


def _decay_rate_pow(i, exponent=0.8):
  """optax's default schedule ``1 − (i + 1)^(−exponent)`` (copied: private)."""
  t = jnp.array(i + 1, jnp.float32)
  return 1.0 - t ** (-exponent)


def _factored_dims(shape, factored, min_dim_size_to_factor
                   ) -> Optional[tuple[int, int]]:
  """optax's choice of the two largest axes to factor over (copied: private)."""
  if not factored or len(shape) < 2:
    return None
  sorted_dims = np.argsort(shape)
  if shape[sorted_dims[-2]] < min_dim_size_to_factor:
    return None
  return int(sorted_dims[-2]), int(sorted_dims[-1])


def _all_finite(*arrays) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in arrays]))


def _safe_update(grad, v_row, v_col, v, decay_rate_t, epsilon, factored_dims):
  """optax's per-leaf update with every square and product rescaled.

  ``G² + ε`` is formed from ``G / s`` (``s >= 1`` a power of two near
  ``max |G|``), its means are multiplied back by ``s`` twice after the factor
  ``1 − decay``, and the row and column statistics are divided by powers of
  two before they are combined. Where a statistic overflows (beyond float32
  itself) or vanishes, the update is zero rather than ``0·inf`` or
  ``inf/inf``; an entry whose gradient is zero gets a zero update, as in
  optax.

  Returns:
    ``(update, v_row, v_col, v)`` as optax's ``_update``.
  """
  tiny = jnp.finfo(jnp.float32).tiny
  one_minus = 1.0 - decay_rate_t
  if factored_dims is not None:
    d1, d0 = factored_dims
    s = jnp.maximum(numerics.power_of_two_scale(grad, axis=(d0, d1)), 1.0)
    sq = jnp.square(grad / s) + epsilon / s / s
    s_row, s_col = jnp.squeeze(s, d0), jnp.squeeze(s, d1)
    new_v_row = (decay_rate_t * v_row
                 + ((one_minus * jnp.mean(sq, axis=d0)) * s_row) * s_row)
    new_v_col = (decay_rate_t * v_col
                 + ((one_minus * jnp.mean(sq, axis=d1)) * s_col) * s_col)
    new_v_row = new_v_row.astype(v_row.dtype)
    new_v_col = new_v_col.astype(v_col.dtype)
    reduced_d1 = d1 - 1 if d1 > d0 else d1
    r = numerics.power_of_two_scale(new_v_row, axis=reduced_d1)
    row_s = new_v_row / r
    row_col_mean = jnp.mean(row_s, axis=reduced_d1, keepdims=True)
    row_factor = jnp.maximum(row_s / row_col_mean, tiny) ** -0.5
    c = numerics.power_of_two_scale(new_v_col, axis=d0 if d0 < d1 else d0 - 1)
    col_factor = jnp.maximum(new_v_col / c, tiny) ** -0.5
    update = (grad / jnp.sqrt(jnp.expand_dims(c, d1))
              * jnp.expand_dims(row_factor, axis=d0)
              * jnp.expand_dims(col_factor, axis=d1))
    saturated = ~(jnp.all(jnp.isfinite(new_v_row))
                  & jnp.all(jnp.isfinite(new_v_col)))
    update = jnp.where(saturated | (grad == 0), 0.0, update)
    return update.astype(grad.dtype), new_v_row, new_v_col, v
  s = jnp.maximum(numerics.power_of_two_scale(grad, axis=None), 1.0)
  sq = jnp.square(grad / s) + epsilon / s / s
  new_v = (decay_rate_t * v + ((one_minus * sq) * s) * s).astype(v.dtype)
  update = grad / jnp.sqrt(new_v)
  update = jnp.where((grad == 0) | ~jnp.isfinite(new_v), 0.0, update)
  return update.astype(grad.dtype), v_row, v_col, new_v


def scale_by_factored_rms(
    factored: bool = True,
    decay_rate: float = 0.8,
    step_offset: int = 0,
    min_dim_size_to_factor: int = 128,
    epsilon: float = 1e-30,
    decay_rate_fn: Optional[Callable] = None,
) -> optax.GradientTransformation:
  """``optax.scale_by_factored_rms``, finite for any finite gradient.

  optax's transform squares the gradient and averages the squares, so from
  gradients of about 1e18 its statistics overflow and the update is
  ``inf/inf`` = NaN (Flora's first transform), where ``optax.adamw`` is
  still finite. This one runs optax's own transform and, for each leaf whose
  new statistics or update are not all finite, recomputes that leaf with the
  squares and products rescaled by powers of two (``_safe_update``, under a
  ``lax.cond``: nothing extra is computed for ordinary leaves). So ordinary
  inputs give optax's results bit for bit, the state is optax's
  ``FactoredState`` (checkpoints interchange), and a gradient of any finite
  size gives a finite update: the right one while the statistics fit in
  float32, zero where they do not (as ``optax.adamw``'s update is zero where
  its ``v`` overflows).

  Args:
    factored: Whether to factor the second moment of matrices.
    decay_rate: Exponent of the decay schedule ``1 − (t + 1)^(−decay_rate)``.
    step_offset: Subtracted from the step for the schedule.
    min_dim_size_to_factor: Factor only when two axes are at least this long.
    epsilon: Added to the squared gradient.
    decay_rate_fn: The schedule ``f(step, decay_rate)``; optax's power decay
      by default.

  Returns:
    An ``optax.GradientTransformation`` with optax's ``FactoredState``.

  Example:
    >>> import jax.numpy as jnp, optax, optax_lowrank
    >>> params = {"w": jnp.ones((512, 128))}
    >>> g = {"w": jnp.full((512, 128), 1e18)}
    >>> tx = optax_lowrank.inner.scale_by_factored_rms()
    >>> u, _ = tx.update(g, tx.init(params), params)
    >>> round(float(u["w"][0, 0]), 4)  # G / √V̂ with V̂ = G² = 1e36
    1.0
    >>> plain = optax.scale_by_factored_rms()
    >>> v, _ = plain.update(g, plain.init(params), params)
    >>> bool(jnp.isnan(v["w"][0, 0]))
    True

  References:
    Shazeer & Stern, `Adafactor: Adaptive Learning Rates with Sublinear
    Memory Cost <https://arxiv.org/abs/1804.04235>`_, ICML 2018.
  """
  decay_rate_fn = decay_rate_fn or _decay_rate_pow
  plain = optax.scale_by_factored_rms(
      factored=factored, decay_rate=decay_rate, step_offset=step_offset,
      min_dim_size_to_factor=min_dim_size_to_factor, epsilon=epsilon,
      decay_rate_fn=decay_rate_fn)

  def update(grads, state, params=None):
    updates, new_state = plain.update(grads, state, params)
    decay_rate_t = decay_rate_fn(state.count - step_offset, decay_rate)

    def per_leaf(grad, v_row, v_col, v, u, new_row, new_col, new_v):
      dims = _factored_dims(grad.shape, factored, min_dim_size_to_factor)
      ok = _all_finite(u, new_row, new_col, new_v)
      return jax.lax.cond(
          ok, lambda: (u, new_row, new_col, new_v),
          lambda: _safe_update(grad, v_row, v_col, v, decay_rate_t, epsilon,
                               dims))

    out = jax.tree.map(per_leaf, grads, state.v_row, state.v_col, state.v,
                       updates, new_state.v_row, new_state.v_col, new_state.v)
    treedef = jax.tree.structure(grads)
    flat = treedef.flatten_up_to(out)
    pick = lambda i: treedef.unflatten([o[i] for o in flat])
    return pick(0), optax.FactoredState(
        count=new_state.count, v_row=pick(1), v_col=pick(2), v=pick(3))

  return optax.GradientTransformation(plain.init, update)
