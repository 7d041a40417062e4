"""Deterministic test gradients whose low-rank subspace drifts smoothly with the step."""

from typing import Callable

import jax.numpy as jnp
import numpy as np


def drifting_low_rank(shapes: dict, steps: int, *, seed: int, top: float, decay: float,
                      rank: int, rate: float, noise: float,
                      amplitude: Callable[[int], float] = lambda t: 1.0) -> list:
  """Float32 gradient trees ``amp_t · (Qx diag(s) Qyᵀ + noise · N)`` for ``steps`` steps.

  Each matrix has singular values ``s = top · decay^i`` (``i < rank``), well separated so
  that float32 and float64 SVDs agree closely (i.i.d. Gaussian matrices have near-ties);
  its factors ``Qx``, ``Qy`` rotate smoothly, ``cos(rate·t)·F₀ + sin(rate·t)·F₁``
  orthonormalized, so the subspace drifts. 1-D leaves are the same mix of two fixed
  vectors plus ``0.1 · N``. Leading axes of a matrix leaf are batch axes.
  """
  rs = np.random.RandomState(seed)
  s = top * decay ** np.arange(rank)
  fac = {k: (rs.randn(2, *shape) if len(shape) == 1 else
             [rs.randn(2, *shape[:-2], d, rank) for d in shape[-2:]])
         for k, shape in shapes.items()}
  seq = []
  for t in range(steps):
    c, sn, amp = np.cos(rate * t), np.sin(rate * t), amplitude(t)
    g = {}
    for k, shape in shapes.items():
      if len(shape) == 1:
        x = c * fac[k][0] + sn * fac[k][1] + 0.1 * rs.randn(*shape)
      else:
        qx, qy = (np.linalg.qr(c * f[0] + sn * f[1])[0] for f in fac[k])
        x = (qx * s) @ np.swapaxes(qy, -1, -2) + noise * rs.randn(*shape)
      g[k] = jnp.asarray(amp * x, jnp.float32)
    seq.append(g)
  return seq
