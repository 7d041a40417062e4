"""Overflow-safe float32 arithmetic by exact power-of-two rescaling.

Squares of float32 numbers overflow from about 1.8e19, and products of two
second-moment statistics from about 1.8e19 each. Dividing by a power of two is
exact, so a computation run on ``x / 2ᵏ`` rounds exactly as the one on ``x``
(as long as neither overflows nor underflows), and multiplying the result
back by powers of two is exact too. The helpers here pick such scales, so that
an overflow-safe formula gives the plain formula's result on ordinary inputs
bit for bit, up to how the compiler contracts multiplies and adds into fused
multiply-adds (which can move a result by one ulp).
"""

from __future__ import annotations

from typing import Sequence, Union

import jax
import jax.numpy as jnp


def power_of_two_scale(
    x: jax.Array, axis: Union[int, Sequence[int]] = (-2, -1)
) -> jax.Array:
  """``2ᵏ`` with ``2ᵏ <= max |x| < 2ᵏ⁺¹`` over ``axis`` (kept), else ``1``.

  ``1`` where the maximum is zero or not finite. ``x / scale`` has its largest
  magnitude in ``[1, 2)``. ``k`` is clamped to ``[-126, 126]`` so that
  ``1 / scale`` is a normal float too: XLA may divide by multiplying with the
  reciprocal, and a subnormal reciprocal (``2⁻¹²⁷``) is flushed to zero on
  CPU. So for ``max |x|`` beyond ``2¹²⁷`` (1.7e38) the quotient lies in
  ``[2, 4)``, and below ``2⁻¹²⁶`` (1.2e-38) under 1.

  Args:
    x: A float array.
    axis: The axes reduced (kept with size 1).

  Returns:
    The scale, broadcastable against ``x``, in ``x``'s dtype.

  Example:
    >>> import jax.numpy as jnp
    >>> from optax_lowrank.numerics import power_of_two_scale
    >>> float(power_of_two_scale(jnp.array([[3.0, -5e20]]))[0, 0])
    2.9514790517935283e+20
  """
  top = jnp.max(jnp.abs(x), axis=axis, keepdims=True)
  _, exponent = jnp.frexp(top)  # top = f · 2^e with f in [0.5, 1)
  exponent = jnp.clip(exponent - 1, -126, 126)
  scale = jnp.ldexp(jnp.ones_like(top), exponent)
  return jnp.where((top > 0) & jnp.isfinite(top), scale, jnp.ones_like(top))
