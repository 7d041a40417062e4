"""Published low-rank methods as ready optimizers."""

from __future__ import annotations

from typing import Any, Optional, Union

import jax
import optax

from optax_lowrank import shapes
from optax_lowrank.core import lowrank_project


def galore(
    learning_rate: optax.ScalarOrSchedule,
    rank: Union[int, float] = 128,
    *,
    update_proj_gap: int = 200,
    scale: Union[float, jax.Array] = 0.25,
    proj_type: str = "std",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    weight_decay_mask: Optional[Any] = None,
    mask: shapes.MaskOrFn = None,
    dimension_numbers: shapes.DimensionNumbersOrFn = None,
    on_refresh: str = "keep",
    stagger: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """GaLore-AdamW: Adam in a low-rank SVD subspace of each weight gradient.

  ``chain(lowrank_project(scale_by_adam), add_decayed_weights,
  scale_by_learning_rate)``, like ``optax.adamw``. Reproduces galore-torch's
  ``GaLoreAdamW``: exact SVD of the float32 gradient at step 0 and every
  ``update_proj_gap`` steps; ``std`` orientation (the smaller side is
  compressed; matrices oriented as ``nn.Linear.weight``, see
  ``DimensionNumbers``); the back-projected Adam direction multiplied by
  ``scale``; Adam moments kept across a refresh.

  Two documented differences from galore-torch, both of order ``eps`` or
  ``lr · weight_decay``: (1) ``eps`` is placed as in ``optax.scale_by_adam``,
  ``m̂ / (√v̂ + eps)``, whereas galore-torch adds it to the uncorrected
  ``√v`` (``m̂ / (√v̂ + eps / √(1 - b2^t))``); (2) weight decay is decoupled
  and uses the parameter before the step (``optax.add_decayed_weights``),
  whereas galore-torch decays the already-updated parameter.

  Args:
    learning_rate: A float or an optax schedule.
    rank: Subspace rank (int) or fraction of each matrix's smaller side.
    update_proj_gap: Steps between SVD refreshes.
    scale: GaLore's ``alpha`` on the back-projected update.
    proj_type: ``std``, ``reverse_std``, ``left``, ``right`` or ``full``.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon (see above for placement).
    weight_decay: Decoupled weight decay, in the full space.
    weight_decay_mask: Which leaves are decayed (as ``optax.adamw``'s mask).
    mask: Which leaves may be projected (the GaLore paper projects the
      attention and MLP matrices only).
    dimension_numbers: ``DimensionNumbers`` for leaves of more than two axes.
    on_refresh: ``keep`` (reference), ``reset`` or ``rotate``.
    stagger: Spread the leaves' refreshes over the gap.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax, jax.numpy as jnp, optax_lowrank
    >>> params = {"w": jnp.ones((64, 32)), "b": jnp.zeros(32)}
    >>> tx = optax_lowrank.galore(1e-2, rank=8, update_proj_gap=50)
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)

  References:
    Zhao et al., `GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
    Projection <https://arxiv.org/abs/2403.03507>`_, ICML 2024; code:
    github.com/jiaweizzhao/GaLore.
  """
  for name, value in (("b1", b1), ("b2", b2)):
    if isinstance(value, (int, float)) and not 0.0 <= value < 1.0:
      raise ValueError(f"`{name}` must be in [0, 1), got {value!r}")
  for name, value in (("eps", eps), ("weight_decay", weight_decay)):
    if isinstance(value, (int, float)) and value < 0.0:
      raise ValueError(f"`{name}` must be >= 0, got {value!r}")
  return optax.chain(
      lowrank_project(
          optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
          rank,
          update_proj_gap=update_proj_gap,
          scale=scale,
          proj_type=proj_type,
          mask=mask,
          dimension_numbers=dimension_numbers,
          on_refresh=on_refresh,
          stagger=stagger,
      ),
      optax.add_decayed_weights(weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate),
  )
