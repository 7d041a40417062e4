"""Layer-wise sampling: which layers of a model take a step this period.

OwLore and GUM pick ``k`` of a model's ``L`` layers per period (without
replacement, uniformly or in proportion to a per-layer weight) and treat the
chosen layers differently from the rest. Every matrix of a layer must see the
same choice: draw it from a key that all of them share (a group key of
``lowrank_project``'s ``group_fn``, or one key per step), so that each leaf,
stacked ``(L, ...)`` or one of a list of unscanned blocks, reads the same mask.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def choose_layers(key: jax.Array, num_layers: int, k: int,
                  weights: Optional[jax.Array] = None) -> jax.Array:
  """``k`` of ``num_layers`` layers, drawn without replacement.

  With ``weights``, layers are drawn one after another with probability
  proportional to their weight among those not yet drawn (``numpy``'s
  ``choice(L, k, replace=False, p=w/w.sum())``, as OwLore's code samples),
  here by the Gumbel-top-k trick in one pass, so it runs under ``jit``
  and ``vmap``. Layers of weight zero are drawn only when fewer than ``k``
  layers have a positive weight.

  Args:
    key: A PRNG key. The same key gives the same layers.
    num_layers: ``L``, the number of layers (static).
    k: How many to choose, ``0 <= k <= L`` (static).
    weights: Non-negative ``(L,)`` weights, or ``None`` for uniform.

  Returns:
    A ``bool`` array of shape ``(L,)`` with exactly ``k`` entries ``True``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from optax_lowrank import sampling
    >>> mask = sampling.choose_layers(jax.random.key(0), 8, 2)
    >>> int(mask.sum())
    2

  References:
    Kool et al., `Stochastic Beams and Where to Find Them: The Gumbel-Top-k
    Trick for Sampling Sequences Without Replacement
    <https://arxiv.org/abs/1903.06059>`_, ICML 2019.
  """
  if not isinstance(num_layers, int) or num_layers < 1:
    raise ValueError(
        f"`num_layers` must be a positive int, got {num_layers!r}")
  if not isinstance(k, int) or not 0 <= k <= num_layers:
    raise ValueError(
        f"`k` must be an int in [0, num_layers={num_layers}], got {k!r}")
  gumbel = jax.random.gumbel(key, (num_layers,), jnp.float32)
  if weights is None:
    scores = gumbel
  else:
    weights = jnp.asarray(weights, jnp.float32)
    if weights.shape != (num_layers,):
      raise ValueError(
          f"`weights` must have shape ({num_layers},), got {weights.shape}")
    # A positive weight's log is above log(1e-38) = -87.5 and a float32
    # Gumbel draw lies in about [-4.5, 17], so an offset of -1e4 ranks every
    # zero-weight layer below every positive one while their own order stays
    # random.
    log_w = jnp.where(weights > 0, jnp.log(jnp.maximum(weights, 1e-38)),
                      jnp.float32(-1e4))
    scores = log_w + gumbel
  _, chosen = jax.lax.top_k(scores, k)
  return jnp.zeros((num_layers,), bool).at[chosen].set(True)
