"""Combine rules: how the full-space update is built from the subspace one.

A rule sees, per projected leaf, the matricized gradient ``g``
``(batch..., n, m)``, its projection ``r = down(basis, g)``, the inner
optimizer's output ``n`` (same shape as ``r``) and the leaf's basis, and
returns the update in ``g``'s layout. A rule may keep a small state of its own
per leaf (the norm-growth limiter's last norm, a factored second moment).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import optax

from optax_lowrank import numerics
from optax_lowrank.inner import adam as adam_lib
from optax_lowrank.projectors.base import Projector
from optax_lowrank.shapes import MatrixInfo


class CombineRule(NamedTuple):
  """A combine rule: two pure functions.

  Attributes:
    init: ``init(info: MatrixInfo) -> state``, the rule's per-leaf state
      (a pytree of arrays; ``()`` for stateless rules).
    apply: ``apply(projector, basis, g, r, n, scale, state) -> (u, state)``,
      the update ``u`` in ``g``'s layout ``(batch..., n, m)``.
    reads_gradient: Whether ``apply`` reads the full gradient ``g``. Rules
      that do not (``back_project``, ``projfactor``) build the update from
      ``r`` and ``n`` alone, so gradients can be accumulated in the subspace
      (``accumulation.MultiSteps``); they receive ``g = None`` there.
  """

  init: Callable[[MatrixInfo], Any]
  apply: Callable[
      [Projector, Any, jax.Array, jax.Array, jax.Array, Any, Any],
      tuple[jax.Array, Any],
  ]
  reads_gradient: bool = True


def back_project() -> CombineRule:
  """``U = scale · up(basis, N)``: GaLore's back-projection (stateless).

  Returns:
    A ``CombineRule``.

  Example:
    >>> import optax, optax_lowrank
    >>> tx = optax_lowrank.lowrank_project(
    ...     optax.scale_by_adam(), rank=4,
    ...     combine=optax_lowrank.combine.back_project())

  References:
    Zhao et al., `GaLore <https://arxiv.org/abs/2403.03507>`_, 2024, Alg. 2.
  """

  def apply(projector, basis, g, r, n, scale, state):
    del g, r
    return scale * projector.up(basis, n), state

  return CombineRule(lambda info: (), apply, reads_gradient=False)


class ProjFactorState(NamedTuple):
  """Per-leaf state of ``projfactor``: a second moment factored as in Adafactor.

  Attributes:
    count: Updates taken (int32), for the bias correction ``√(1 − b2ᵗ)``.
    row: EMA of the back-projected gradient's squares summed over each row,
      ``(batch..., m)`` (float32).
    col: The same summed over each column, ``(batch..., n)`` (float32).
  """

  count: jax.Array
  row: jax.Array
  col: jax.Array


def _factored_squares(g_hat: jax.Array, row: jax.Array, col: jax.Array,
                      b2: float) -> tuple[jax.Array, jax.Array]:
  """``b2·row + (1 − b2)·Σⱼ Ĝ²`` and the same for ``col``, overflow-safe.

  ``Ĝ²`` overflows float32 from ``|Ĝ|`` of 1.8e19 and its sums earlier. The
  squares are taken of ``Ĝ / s`` (``s`` a power of two near ``max |Ĝ|`` per
  matrix) and each sum is multiplied back by ``s`` twice after the factor
  ``1 − b2``: exact rescalings, so the result is the plain formula's bit for
  bit wherever that one is finite, and finite wherever the statistics
  themselves are (``(1 − b2)·Σⱼ Ĝ² < 3.4e38``).
  """
  s = numerics.power_of_two_scale(g_hat)  # (batch..., 1, 1)
  sq = jnp.square(g_hat / s)  # (batch..., n, m)
  s_row, s_col = s[..., 0, :], s[..., 0]  # (batch..., 1)
  new_row = b2 * row + ((1.0 - b2) * jnp.sum(sq, axis=-2) * s_row) * s_row
  new_col = b2 * col + ((1.0 - b2) * jnp.sum(sq, axis=-1) * s_col) * s_col
  return new_row, new_col


def _factored_second_moment(row: jax.Array, col: jax.Array) -> jax.Array:
  """``V̂ = col rowᵀ / Σ row``, ``(batch..., n, m)``, overflow-safe.

  ``col·row`` overflows float32 once both are ~1.8e19 (gradients of ~1e11
  for a 512-wide matrix), although ``V̂ <= col`` entrywise. Both are divided
  by powers of two near their maxima first, which is exact, so the result is
  the plain formula's bit for bit wherever that one is finite. A matrix whose
  gradients were all zero has ``V̂ = 0`` (the reference: 0/0). A matrix one of
  whose statistics overflowed to ``inf`` (``(1 − b2)·Σⱼ Ĝ²`` beyond 3.4e38:
  ``|Ĝ|`` of ~2.6e19 over 512 columns) has lost its normalization, so it gets
  ``V̂ = inf`` and a zero update, as optax's Adam gives a zero update where its
  ``v`` overflows, instead of ``inf/inf`` = NaN.
  """
  s_row = numerics.power_of_two_scale(row, axis=-1)  # (batch..., 1)
  s_col = numerics.power_of_two_scale(col, axis=-1)
  row_s, col_s = row / s_row, col / s_col
  total = jnp.sum(row_s, axis=-1)[..., None, None]
  total = jnp.where(total > 0, total, 1.0)
  v_hat = col_s[..., :, None] * row_s[..., None, :] / total * s_col[..., None]
  saturated = jnp.any(jnp.isinf(col), axis=-1) | jnp.any(jnp.isinf(row),
                                                         axis=-1)
  return jnp.where(saturated[..., None, None], jnp.inf, v_hat)


def projfactor(b2: float = 0.999, eps: float = 1e-6) -> CombineRule:
  """ProjFactor's full-space factored second moment (VLoRP).

  With ``Ĝ = scale·up(R)`` the back-projected gradient (``m × n``,
  references' orientation) and the inner output ``N`` (VLoRP: the debiased
  first moment ``m / (1 − b1ᵗ)`` of ``R``):

  ``row ← b2·row + (1 − b2)·Σⱼ Ĝ²``, ``col ← b2·col + (1 − b2)·Σᵢ Ĝ²``,
  ``V̂ = row colᵀ / Σ row`` and
  ``U = √(1 − b2ᵗ) · scale·up(N) / (√V̂ + eps)``.

  Only ``m + n`` numbers per matrix; the first moment lives in the subspace.
  ``eps`` is added to ``√V̂`` before the bias correction, as in the
  reference code (whose step size is ``lr·√(1 − b2ᵗ)/(1 − b1ᵗ)``).

  Args:
    b2: Decay of the factored second moment, in [0, 1).
    eps: Added to ``√V̂``.

  Returns:
    A ``CombineRule`` with ``ProjFactorState`` per leaf.

  Example:
    >>> import optax, optax_lowrank
    >>> tx = optax_lowrank.lowrank_project(
    ...     optax.ema(0.9), rank=1, granularity=4,
    ...     projector=optax_lowrank.projectors.random(std="rank"),
    ...     combine=optax_lowrank.combine.projfactor(0.999, 1e-6))

  References:
    Wang et al., `Memory-Efficient LLM Training by Various-Grained Low-Rank
    Projection of Gradients <https://arxiv.org/abs/2505.01744>`_, ICML 2025
    (Alg. 2; reference code ``optim/projfactor.py``).
  """
  # Arrays (optax.inject_hyperparams) are not checked.
  if isinstance(b2, (int, float)) and not 0.0 <= b2 < 1.0:
    raise ValueError(f"`b2` must be in [0, 1), got {b2!r}")
  if isinstance(eps, (int, float)) and not eps >= 0.0:
    raise ValueError(f"`eps` must be >= 0, got {eps!r}")

  def init(info):
    return ProjFactorState(
        count=jnp.zeros([], jnp.int32),
        row=info.zeros("m", jnp.float32),
        col=info.zeros("n", jnp.float32),
    )

  def apply(projector, basis, g, r, n, scale, state):
    del g
    g_hat = scale * projector.up(basis, r).astype(jnp.float32)
    row, col = _factored_squares(g_hat, state.row, state.col, b2)
    v_hat = _factored_second_moment(row, col)
    count = optax.safe_int32_increment(state.count)
    correction = jnp.sqrt(adam_lib.bias_correction(b2, count))
    u = scale * projector.up(basis, n).astype(jnp.float32)
    u = correction * u / (jnp.sqrt(v_hat) + eps)
    u = jnp.where(jnp.isinf(v_hat), 0.0, u)  # saturated: no inf/inf
    return u.astype(n.dtype), ProjFactorState(count, row, col)

  return CombineRule(init, apply, reads_gradient=False)


class NormGrowthLimiter(NamedTuple):
  """Caps the growth of an update's norm between consecutive steps.

  Attributes:
    init: ``init(info: MatrixInfo) -> state``, the last norm of each matrix
      (zeros: nothing to compare with yet).
    apply: ``apply(u, state) -> (u, state)`` on ``u`` of shape
      ``(batch..., n, m)``.
  """

  init: Callable[[MatrixInfo], jax.Array]
  apply: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def norm_growth_limiter(gamma: float = 1.01) -> NormGrowthLimiter:
  """Fira's and APOLLO's limiter: ``‖Sₜ‖ ≤ γ·‖Sₜ₋₁‖`` per matrix.

  As in both reference codes: the first step is not limited; afterwards
  ``S ← S / λ`` with ``λ = max(‖S‖ / (c + 1e-8), γ) / γ``, where ``c`` is
  the previous step's norm after limiting, and ``c ← ‖S‖ / λ``. A stored
  norm of exactly zero counts as "no previous step".

  Args:
    gamma: Largest allowed growth factor of the norm per step (> 1).

  Returns:
    A ``NormGrowthLimiter``.

  Example:
    >>> import jax.numpy as jnp, optax_lowrank
    >>> limiter = optax_lowrank.combine.norm_growth_limiter(1.01)
    >>> s, c = limiter.apply(jnp.ones((2, 3)), jnp.float32(1.0))
    >>> round(float(jnp.linalg.norm(s)), 4)  # capped at 1.01 · (1 + 1e-8)
    1.01

  References:
    Chen et al., `Fira: Can We Achieve Full-rank Training of LLMs Under
    Low-rank Constraint? <https://arxiv.org/abs/2410.01623>`_, 2024, Eq. 9.
  """
  if not gamma > 1.0:
    raise ValueError(f"`gamma` must be > 1, got {gamma!r}")

  def init(info):
    return info.zeros("", jnp.float32)

  def apply(u, last):
    norm = jnp.sqrt(jnp.sum(jnp.square(u.astype(jnp.float32)), axis=(-2, -1)))
    limit = jnp.maximum(norm / (last + 1e-8), gamma) / gamma
    limit = jnp.where(last > 0, limit, 1.0)
    return u / limit[..., None, None].astype(u.dtype), norm / limit

  return NormGrowthLimiter(init, apply)


def _channel_norm_axis(g: jax.Array, r: jax.Array) -> int:
  """The axis of ``r`` the projection shortened (its norm runs along it).

  Channels are the other axis, the one ``r`` keeps at full size: rows ``m``
  for a right projection, columns ``n`` for a left one, which is the
  references' ``norm_dim`` rule for the ``std`` orientation.
  """
  if r.shape[-1] == g.shape[-1] and r.shape[-2] != g.shape[-2]:
    return -2
  if r.shape[-2] == g.shape[-2] and r.shape[-1] != g.shape[-1]:
    return -1
  raise ValueError(
      "Channel-wise scaling needs a one-sided projection (R keeps one side of "
      f"G at full size); got G of layout shape {g.shape} and R {r.shape}. "
      "Use a one-sided projector or tensor-wise scaling."
  )


def _norm(x, axis):
  return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axis,
                          keepdims=True))


def _ratio(n, r, axis):
  """``‖N‖ / (‖R‖ + 1e-8)`` along ``axis``, as both references compute it."""
  return _norm(n, axis) / (_norm(r, axis) + 1e-8)


SCALE_TYPES = ("channel", "tensor")


def apollo_scale(
    scale_type: str = "channel",
    *,
    limiter: bool = True,
    gamma: float = 1.01,
    scale_front: bool = False,
) -> CombineRule:
  """APOLLO: the raw gradient scaled by the subspace optimizer's gain.

  ``U = √scale · limit(G ⊙ s)`` with ``s = ‖N‖ / (‖R‖ + 1e-8)`` per channel
  (the side the projection keeps: rows for a right projection, columns for a
  left one) or per matrix (``tensor``, APOLLO-Mini). As in apollo-torch,
  ``scale`` enters as its square root, after the limiter unless
  ``scale_front`` (the reference's flag of the same name, used for its 60M and
  130M APOLLO-Mini runs). The back-projection of ``N`` is never formed.

  Args:
    scale_type: ``channel`` or ``tensor``.
    limiter: Apply the norm-growth limiter (on in all the paper's runs).
    gamma: The limiter's growth bound.
    scale_front: Multiply by ``√scale`` before the limiter instead of after.

  Returns:
    A ``CombineRule``.

  Example:
    >>> import optax, optax_lowrank
    >>> tx = optax_lowrank.lowrank_project(
    ...     optax_lowrank.inner.scale_by_adam_uncorrected(), rank=4,
    ...     projector=optax_lowrank.projectors.random(),
    ...     combine=optax_lowrank.combine.apollo_scale("channel"))

  References:
    Zhu et al., `APOLLO: SGD-like Memory, AdamW-level Performance
    <https://arxiv.org/abs/2412.05270>`_, MLSys 2025; code:
    github.com/zhuhanqing/APOLLO (``apollo_torch/apollo.py``).
  """
  if scale_type not in SCALE_TYPES:
    raise ValueError(
        f"`scale_type` must be one of {SCALE_TYPES}, got {scale_type!r}"
    )
  limit = norm_growth_limiter(gamma) if limiter else None

  def init(info):
    return limit.init(info) if limit else ()

  def apply(projector, basis, g, r, n, scale, state):
    del projector, basis
    if scale_type == "channel":
      s = _ratio(n, r, _channel_norm_axis(g, r))
    else:
      s = _ratio(n, r, (-2, -1))
    u = g.astype(jnp.float32) * s
    root = jnp.sqrt(jnp.asarray(scale, jnp.float32))
    if scale_front:
      u = root * u
    if limit:
      u, state = limit.apply(u, state)
    if not scale_front:
      u = root * u
    return u, state

  return CombineRule(init, apply)


def fira_residual(*, limiter: bool = True, gamma: float = 1.01) -> CombineRule:
  """Fira: back-projection plus the scaled residual outside the subspace.

  ``U = scale·up(N) + limit(φ ⊙ (G − scale·up(R)))`` with
  ``φ = ‖N‖ / (‖R‖ + 1e-8)`` per channel (the side the projection keeps).
  As in Fira's code, ``scale`` (GaLore's ``alpha``) multiplies the
  back-projection inside the residual too, so for ``scale != 1`` the residual
  is not the orthogonal complement; the paper writes ``G − P R``.

  Args:
    limiter: Apply the norm-growth limiter to the residual term.
    gamma: The limiter's growth bound.

  Returns:
    A ``CombineRule``.

  Example:
    >>> import optax, optax_lowrank
    >>> tx = optax_lowrank.lowrank_project(
    ...     optax_lowrank.inner.scale_by_adam_uncorrected(), rank=4,
    ...     combine=optax_lowrank.combine.fira_residual())

  References:
    Chen et al., `Fira: Can We Achieve Full-rank Training of LLMs Under
    Low-rank Constraint? <https://arxiv.org/abs/2410.01623>`_, 2024; code:
    github.com/xichen-fy/Fira (``fira_adamw.py``).
  """
  limit = norm_growth_limiter(gamma) if limiter else None

  def init(info):
    return limit.init(info) if limit else ()

  def apply(projector, basis, g, r, n, scale, state):
    phi = _ratio(n, r, _channel_norm_axis(g, r))
    residual = phi * (g.astype(jnp.float32)
                      - scale * projector.up(basis, r).astype(jnp.float32))
    if limit:
      residual, state = limit.apply(residual, state)
    return scale * projector.up(basis, n) + residual, state

  return CombineRule(init, apply)


RESIDUAL_RULES = ("sign", "sgd")


def frugal_sign(lr_scale: float = 1.0, *, rule: str = "sign") -> CombineRule:
  """FRUGAL: state-full update in the subspace, state-free outside it.

  ``U = scale · (up(N) + lr_scale · sign(G − up(R)))``: the inner optimizer's
  output back in the full space, plus signSGD on the residual. ``scale`` is
  FRUGAL's ``proj_params_lr_scale`` (it multiplies both parts) and
  ``lr_scale`` its ``inactive_lr_scale``; the outer learning rate multiplies
  everything.

  Args:
    lr_scale: Learning-rate multiplier of the state-free part.
    rule: ``sign`` (signSGD, the paper's) or ``sgd`` (plain SGD on the
      residual).

  Returns:
    A ``CombineRule``.

  Example:
    >>> import optax, optax_lowrank
    >>> tx = optax_lowrank.lowrank_project(
    ...     optax_lowrank.inner.scale_by_adam_leafwise(), rank=4,
    ...     on_refresh="reset", combine=optax_lowrank.combine.frugal_sign())

  References:
    Zmushko et al., `FRUGAL: Memory-Efficient Optimization by Reducing State
    Overhead for Scalable Training <https://arxiv.org/abs/2411.07837>`_, ICML
    2025; code: github.com/fzmushko/FRUGAL.
  """
  if rule not in RESIDUAL_RULES:
    raise ValueError(f"`rule` must be one of {RESIDUAL_RULES}, got {rule!r}")
  if isinstance(lr_scale, (int, float)) and lr_scale < 0:
    raise ValueError(f"`lr_scale` must be >= 0, got {lr_scale!r}")

  def apply(projector, basis, g, r, n, scale, state):
    residual = g - projector.up(basis, r).astype(g.dtype)
    if rule == "sign":
      residual = jnp.sign(residual)
    return scale * (projector.up(basis, n) + lr_scale * residual), state

  return CombineRule(lambda info: (), apply)


def add_residual(weight: Union[float, jax.Array]) -> CombineRule:
  """``U = scale · up(N) + weight · (G − up(R))`` (stateless).

  With ``inner.ema_nesterov(b1)`` (``N = b1·M + (1 − b1)·R``) and
  ``weight = 1 − b1`` this is Flora's output ``b1·up(M) + (1 − b1)·G``, whatever
  the projection: the current gradient enters at full rank, the momentum
  through the subspace.

  Args:
    weight: Multiplier of the residual the subspace misses.

  Returns:
    A ``CombineRule``.

  Example:
    >>> import optax_lowrank
    >>> rule = optax_lowrank.combine.add_residual(0.1)

  References:
    Hao et al., `Flora: Low-Rank Adapters Are Secretly Gradient Compressors
    <https://arxiv.org/abs/2402.03293>`_, ICML 2024; code:
    github.com/BorealisAI/flora-opt (``optax`` version).
  """

  def apply(projector, basis, g, r, n, scale, state):
    residual = g - projector.up(basis, r).astype(g.dtype)
    return scale * projector.up(basis, n) + weight * residual, state

  return CombineRule(lambda info: (), apply)
