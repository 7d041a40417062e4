"""Float64 NumPy references: Muon's Newton–Schulz and GUM (Pan et al. 2025, arXiv 2510.17802).

Written from the paper's update rules (no code of the authors is public), not from this
library. Orientation is torch's: W is (m, n) = (out, in), G likewise. For one layer in period
t with basis ``P`` (left singular vectors ``U[:, :r]`` of the period's first gradient, each
column's largest entry made positive) and ``q = k / L``:

* low-rank branch (layer not drawn): ``R ← βR + PᵀG / (1 − q)``, update ``P · NS(R)``;
* full-rank branch (layer drawn): ``F ← βF + (G − PPᵀG) / q``, update ``NS(F)``.

``NS`` is Keller Jordan's quintic Newton–Schulz (``X / (‖X‖_F + eps)``, then 5 steps of
``X ← aX + (bA + cA²)X``, ``A = XXᵀ``, on the wide orientation). The choices the paper leaves
open are the library's documented ones: ``R`` is kept across periods and untouched while the
layer is drawn, ``F`` starts from zero each period. ``debias=False`` drops the ``1/(1−q)`` and
``1/q`` factors and ``residual=False`` feeds ``G`` instead of ``G − PPᵀG`` to the full-rank
branch (negative controls).
"""

import numpy as np

MUON_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(x, steps=5, coeffs=MUON_COEFFS, eps=1e-8):
  """Newton–Schulz on one float64 matrix."""
  x = np.asarray(x, np.float64)
  tall = x.shape[0] > x.shape[1]
  y = x.T if tall else x
  y = y / (np.linalg.norm(y) + eps)
  a, b, c = coeffs
  for _ in range(steps):
    gram = y @ y.T
    y = a * y + (b * gram + c * gram @ gram) @ y
  return y.T if tall else y


def left_basis(g, rank):
  """``U[:, :r]`` of ``g`` (m, n), each column's largest-magnitude entry positive."""
  u = np.linalg.svd(np.asarray(g, np.float64), full_matrices=False)[0][:, :rank]
  idx = np.argmax(np.abs(u), axis=0)
  sign = np.sign(u[idx, np.arange(rank)])
  return u * np.where(sign == 0, 1.0, sign)


class RefGum:
  """GUM on ``L`` layers of one (m, n) matrix each, float64."""

  def __init__(self, num_layers, m, n, rank, k, *, gap, beta=0.95, debias=True,
               residual=True):
    self.L, self.rank, self.k, self.gap, self.beta = num_layers, rank, k, gap, beta
    self.q = k / num_layers
    self.debias, self.residual = debias, residual
    self.low = np.zeros((num_layers, rank, n))
    self.full = np.zeros((num_layers, m, n))
    self.p = None
    self.drawn = None
    self.step = 0

  def update(self, grads, drawn):
    """``grads`` (L, m, n); ``drawn`` (L,) bool, read on the period's first step.

    Returns the orthogonalized updates (L, m, n), before any scale or learning rate.
    """
    grads = np.asarray(grads, np.float64)
    if self.step % self.gap == 0:
      self.p = [left_basis(g, self.rank) for g in grads]
      self.drawn = np.asarray(drawn, bool)
      self.full[:] = 0.0
    low_w = 1.0 / (1.0 - self.q) if self.debias else 1.0
    full_w = 1.0 / self.q if self.debias else 1.0
    out = np.empty_like(grads)
    for i, (g, p) in enumerate(zip(grads, self.p)):
      if self.drawn[i]:
        target = g - p @ (p.T @ g) if self.residual else g
        self.full[i] = self.beta * self.full[i] + full_w * target
        out[i] = newton_schulz(self.full[i])
      else:
        self.low[i] = self.beta * self.low[i] + low_w * (p.T @ g)
        out[i] = p @ newton_schulz(self.low[i])
    self.step += 1
    return out
