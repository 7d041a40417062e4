"""Adam as the reference codes write it, where that differs from ``optax``.

Two conventions meet in the published low-rank methods:

- **Hugging Face / galore-torch style** (APOLLO, Fira): the moments give
  ``N = m / (√v + eps)`` without bias correction, and the bias correction
  ``√(1 − b2ᵗ) / (1 − b1ᵗ)`` multiplies the step size afterwards. The methods
  compute their scaling factors and norm-growth limits on the *uncorrected*
  ``N``, so the split matters: ``scale_by_adam_uncorrected`` inside
  ``lowrank_project`` and ``scale_by_bias_correction`` after it reproduce them
  exactly (for leaves that are not projected the pair is exactly Hugging
  Face's AdamW).
- **PyTorch style with restarts** (FRUGAL): ``m̂ / (√v̂ + eps)`` as in optax, but
  a subspace change restarts the statistics *and* the step count of the
  leaves it touches. ``scale_by_adam_leafwise`` keeps one count per parameter
  leaf, so ``on_refresh="reset"`` restarts the bias correction too.

Bias corrections are computed as ``-expm1(t · log b)`` with ``log b`` taken in
double precision, accurate in float32 where ``1 - b**t`` loses digits to
cancellation and to the rounding of ``b`` itself.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


def validate(b1, b2, eps) -> None:
  """Raises ``ValueError`` naming ``b1``, ``b2`` or ``eps`` if out of range."""
  for name, value in (("b1", b1), ("b2", b2)):
    if isinstance(value, (int, float)) and not 0.0 <= value < 1.0:
      raise ValueError(f"`{name}` must be in [0, 1), got {value!r}")
  if isinstance(eps, (int, float)) and eps < 0.0:
    raise ValueError(f"`eps` must be >= 0, got {eps!r}")


def bias_correction(decay, count) -> jax.Array:
  """``1 - decay**count`` in float32, without cancellation.

  A Python float ``decay`` has its logarithm taken in double precision:
  ``float32(0.999)`` alone is off by 1.3e-5 relative in ``1 - 0.999``.
  """
  count = jnp.asarray(count, jnp.float32)
  if isinstance(decay, (int, float)):
    if decay == 0.0:
      return jnp.ones_like(count)
    return -jnp.expm1(count * jnp.float32(math.log(decay)))
  decay = jnp.asarray(decay, jnp.float32)
  return jnp.where(decay == 0.0, 1.0, -jnp.expm1(count * jnp.log(decay)))


def _moments(b1, b2, updates, mu, nu):
  mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, mu, updates)
  nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, nu, updates)
  return mu, nu


def scale_by_adam_uncorrected(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6
) -> optax.GradientTransformation:
  """Adam's direction ``m / (√v + eps)`` without bias correction.

  Pair it with ``scale_by_bias_correction`` after the low-rank wrapper: the two
  together are the Adam step of galore-torch, APOLLO and Fira (Hugging Face's
  ``AdamW``), with ``eps`` on the uncorrected ``√v``.

  Args:
    b1: First-moment decay.
    b2: Second-moment decay.
    eps: Added to ``√v``.

  Returns:
    An ``optax.GradientTransformation`` whose state is
    ``optax.ScaleByAdamState``.

  Example:
    >>> import optax, optax_lowrank
    >>> tx = optax.chain(
    ...     optax_lowrank.lowrank_project(
    ...         optax_lowrank.inner.scale_by_adam_uncorrected(), rank=4),
    ...     optax_lowrank.inner.scale_by_bias_correction(),
    ...     optax.scale_by_learning_rate(1e-3))

  References:
    Loshchilov & Hutter, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, ICLR 2019 (the Hugging Face AdamW
    that galore-torch, APOLLO and Fira build on).
  """
  validate(b1, b2, eps)

  def init(params):
    return optax.ScaleByAdamState(
        count=jnp.zeros([], jnp.int32),
        mu=optax.tree.zeros_like(params),
        nu=optax.tree.zeros_like(params),
    )

  def update(updates, state, params=None):
    del params
    mu, nu = _moments(b1, b2, updates, state.mu, state.nu)
    out = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu, nu)
    count = optax.safe_int32_increment(state.count)
    return out, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init, update)


class BiasCorrectionState(NamedTuple):
  """State of ``scale_by_bias_correction``: the step count."""

  count: jax.Array


def scale_by_bias_correction(
    b1: float = 0.9, b2: float = 0.999
) -> optax.GradientTransformation:
  """Multiplies the updates by ``√(1 − b2ᵗ) / (1 − b1ᵗ)`` (t counts from 1).

  Args:
    b1: First-moment decay of the Adam it corrects.
    b2: Second-moment decay.

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> import optax, optax_lowrank
    >>> adamw_hf = optax.chain(
    ...     optax_lowrank.inner.scale_by_adam_uncorrected(),
    ...     optax_lowrank.inner.scale_by_bias_correction(),
    ...     optax.scale_by_learning_rate(1e-3))

  References:
    Kingma & Ba, `Adam: A Method for Stochastic Optimization
    <https://arxiv.org/abs/1412.6980>`_, ICLR 2015 (Alg. 1, the efficient
    form with the corrections folded into the step size).
  """
  validate(b1, b2, 0.0)

  def init(params):
    del params
    return BiasCorrectionState(jnp.zeros([], jnp.int32))

  def update(updates, state, params=None):
    del params
    count = optax.safe_int32_increment(state.count)
    factor = jnp.sqrt(bias_correction(b2, count)) / bias_correction(b1, count)
    updates = jax.tree.map(lambda u: (factor * u).astype(u.dtype), updates)
    return updates, BiasCorrectionState(count)

  return optax.GradientTransformation(init, update)


class LeafwiseAdamState(NamedTuple):
  """State of ``scale_by_adam_leafwise``.

  Attributes:
    count: One step count per parameter leaf (int32 scalars).
    mu: First moments.
    nu: Second moments.
  """

  count: Any
  mu: Any
  nu: Any


def scale_by_adam_leafwise(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> optax.GradientTransformation:
  """``optax.scale_by_adam`` with one step count per parameter leaf.

  The counts live in a tree like the parameters, so a refresh policy that
  re-initializes one leaf's state (``on_refresh="reset"``) restarts its bias
  correction as well, as FRUGAL's reference code does when its subspace
  changes. Otherwise identical to ``optax.scale_by_adam``
  (``m̂ / (√v̂ + eps)``).

  Args:
    b1: First-moment decay.
    b2: Second-moment decay.
    eps: Added to ``√v̂``.

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> import optax, optax_lowrank
    >>> tx = optax_lowrank.lowrank_project(
    ...     optax_lowrank.inner.scale_by_adam_leafwise(), rank=4,
    ...     on_refresh="reset")

  References:
    Zmushko et al., `FRUGAL: Memory-Efficient Optimization by Reducing State
    Overhead for Scalable Training <https://arxiv.org/abs/2411.07837>`_, ICML
    2025 (its AdamW restarts with the subspace).
  """
  validate(b1, b2, eps)

  def init(params):
    return LeafwiseAdamState(
        count=jax.tree.map(lambda _: jnp.zeros([], jnp.int32), params),
        mu=optax.tree.zeros_like(params),
        nu=optax.tree.zeros_like(params),
    )

  def update(updates, state, params=None):
    del params
    mu, nu = _moments(b1, b2, updates, state.mu, state.nu)
    count = jax.tree.map(optax.safe_int32_increment, state.count)

    def direction(m, v, t):
      m_hat = m / bias_correction(b1, t)
      correction = bias_correction(b2, t)
      v_hat = v / correction
      out = m_hat / (jnp.sqrt(v_hat) + eps)
      # v / (1 − b2ᵗ) overflows where v is finite (gradients of ~1e19 at the
      # first step: v = (1 − b2)·g² < 3.4e38 to |g| = 5.8e20); there the root
      # is taken first. Elsewhere the plain formula (as compiled, it may move
      # by one ulp).
      safe = m_hat / (jnp.sqrt(v) / jnp.sqrt(correction) + eps)
      out = jnp.where(jnp.isinf(v_hat) & jnp.isfinite(v), safe, out)
      return out.astype(m.dtype)

    out = jax.tree.map(direction, mu, nu, count)
    return out, LeafwiseAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init, update)
