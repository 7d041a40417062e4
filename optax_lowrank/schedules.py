"""When a leaf renews its subspace."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

# refresh(step, leaf_index, num_leaves) -> bool scalar
RefreshSchedule = Callable[[jax.Array, int, int], jax.Array]


def every(update_proj_gap: int, *, stagger: bool = False) -> RefreshSchedule:
  """Refresh at step 0, then every ``update_proj_gap`` steps.

  With ``stagger``, projected leaf ``i`` of ``k`` is shifted by
  ``i * gap // k`` steps, so the refreshes (and their SVDs) are spread over
  the gap instead of all landing on one step. Every leaf still refreshes at
  step 0, since it has no basis before.

  Args:
    update_proj_gap: Steps between two refreshes of a leaf (positive int).
    stagger: Whether to spread leaves over the gap (deterministic).

  Returns:
    ``refresh(step, leaf_index, num_leaves) -> bool`` array.

  References:
    Zhao et al., `GaLore <https://arxiv.org/abs/2403.03507>`_, 2024 (the
    schedule ``iter % update_proj_gap == 0`` of galore-torch).
  """
  if not isinstance(update_proj_gap, int) or update_proj_gap < 1:
    raise ValueError(
        f"`update_proj_gap` must be a positive int, got {update_proj_gap!r}"
    )

  def refresh(step, leaf_index, num_leaves):
    offset = (leaf_index * update_proj_gap) // num_leaves if stagger else 0
    shifted = step - offset
    return (step == 0) | ((shifted >= 0) & (shifted % update_proj_gap == 0))

  return refresh
