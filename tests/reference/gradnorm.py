"""Float64 NumPy reference of GradNormLoRP (Huang et al. 2025, arXiv 2412.19616), one matrix.

Written from the authors' code, Jhhuangkay/Gradient-Weight-normalized-Low-rank-Projection-
for-Efficient-LLM-Training ``GradNormLoRP/LowRankWeightNormAdamW.py`` (class
``LowRankWeightNormAdamW``) and ``GradNormLoRP/galore_projector.py`` (``GaLoreProjector``,
``proj_type='std'``), not from this library. Orientation is torch's: W is (m, n) =
(out, in), and the norms run over ``dim=1`` (the input axis, one per output row). With
``step`` counted from 0 before its increment, one ``step`` does:

* on the first call: ``v = W``, ``g = ‖v‖``;
* ``g = ‖v‖`` (``state['g'].data = norm_v``: the magnitude restarts from the direction's
  norm every step; ``reset=False`` skips this line, the paper's reparameterisation);
* ``grad_v = G · g / ‖v‖``, ``grad_g = Σ_in G ⊙ v / ‖v‖`` (``exact=True``: ``grad_v =
  g/‖v‖ · (G − grad_g · v/‖v‖)``, the exact gradient, which is an option here);
* GaLore's projector on ``grad_v``: a new matrix when ``step % gap == 0``; m >= n → right,
  ``B = Vh[:r]``, ``R = grad_v Bᵀ``; m < n → left, ``A = U[:, :r]``, ``R = Aᵀ grad_v``;
* Adam on ``R`` and on ``grad_g``, Hugging Face style: ``denom = sqrt(exp_avg_sq) + eps``,
  ``step_size = lr · sqrt(1 − b2ᵗ) / (1 − b1ᵗ)``; the direction's ``exp_avg / denom``
  back-projected (``N B`` or ``A N``) times ``scale``;
* ``v -= step_size · U_v``, ``g -= step_size · U_g``; weight decay ``v -= lr·wd·v``,
  ``g -= lr·wd·g`` (on the updated values);
* ``W = g · v / ‖v‖``.

Singular vectors get the sign convention the library documents (each left singular
vector's largest-magnitude entry positive); torch's signs are arbitrary.
"""

import math

import numpy as np


def svd_basis(g, rank, right):
  """GaLore's ``std`` matrix of ``g`` (m, n), with canonical signs."""
  u, _, vh = np.linalg.svd(g, full_matrices=False)
  idx = np.argmax(np.abs(u), axis=0)
  sign = np.sign(u[idx, np.arange(u.shape[1])])
  sign[sign == 0] = 1.0
  u, vh = u * sign, vh * sign[:, None]
  return vh[:rank] if right else u[:, :rank]


class RefGradNormLoRP:
  """``LowRankWeightNormAdamW`` on one (m, n) matrix, float64."""

  def __init__(self, w, rank, *, gap, lr, scale=1.0, b1=0.9, b2=0.999, eps=1e-6,
               wd=0.0, exact=False, reset=True):
    self.v = np.asarray(w, np.float64).copy()
    self.g = np.linalg.norm(self.v, axis=1, keepdims=True)
    self.right = self.v.shape[0] >= self.v.shape[1]
    self.rank, self.gap, self.lr, self.scale = rank, gap, lr, scale
    self.b1, self.b2, self.eps, self.wd = b1, b2, eps, wd
    self.exact, self.reset = exact, reset
    self.p = None
    self.m_v = self.s_v = None
    self.m_g = np.zeros_like(self.g)
    self.s_g = np.zeros_like(self.g)
    self.step = 0

  def weight(self):
    return self.g * self.v / np.linalg.norm(self.v, axis=1, keepdims=True)

  def update(self, grad):
    """One step on the weight gradient (m, n); returns the new weight."""
    grad = np.asarray(grad, np.float64)
    norm_v = np.linalg.norm(self.v, axis=1, keepdims=True)
    if self.reset:
      self.g = norm_v
    unit = self.v / norm_v
    grad_g = np.sum(grad * unit, axis=1, keepdims=True)
    grad_v = (grad - grad_g * unit if self.exact else grad) * self.g / norm_v
    if self.step % self.gap == 0:
      self.p = svd_basis(grad_v, self.rank, self.right)
    r = grad_v @ self.p.T if self.right else self.p.T @ grad_v
    if self.m_v is None:
      self.m_v, self.s_v = np.zeros_like(r), np.zeros_like(r)
    self.step += 1
    t = self.step
    b1, b2 = self.b1, self.b2
    self.m_v = b1 * self.m_v + (1 - b1) * r
    self.s_v = b2 * self.s_v + (1 - b2) * r * r
    self.m_g = b1 * self.m_g + (1 - b1) * grad_g
    self.s_g = b2 * self.s_g + (1 - b2) * grad_g * grad_g
    step_size = self.lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
    n_v = self.m_v / (np.sqrt(self.s_v) + self.eps)
    n_g = self.m_g / (np.sqrt(self.s_g) + self.eps)
    u_v = (n_v @ self.p if self.right else self.p @ n_v) * self.scale
    self.v = self.v - step_size * u_v
    self.g = self.g - step_size * n_g
    if self.wd:
      self.v = self.v - self.lr * self.wd * self.v
      self.g = self.g - self.lr * self.wd * self.g
    return self.weight()


class RefGaLoreOnW:
  """GaLore-AdamW (the same projector and Adam) on W itself: the negative control."""

  def __init__(self, w, rank, *, gap, lr, scale=1.0, b1=0.9, b2=0.999, eps=1e-6):
    self.w = np.asarray(w, np.float64).copy()
    self.right = self.w.shape[0] >= self.w.shape[1]
    self.rank, self.gap, self.lr, self.scale = rank, gap, lr, scale
    self.b1, self.b2, self.eps = b1, b2, eps
    self.p = self.m = self.s = None
    self.step = 0

  def update(self, grad):
    grad = np.asarray(grad, np.float64)
    if self.step % self.gap == 0:
      self.p = svd_basis(grad, self.rank, self.right)
    r = grad @ self.p.T if self.right else self.p.T @ grad
    if self.m is None:
      self.m, self.s = np.zeros_like(r), np.zeros_like(r)
    self.step += 1
    t = self.step
    self.m = self.b1 * self.m + (1 - self.b1) * r
    self.s = self.b2 * self.s + (1 - self.b2) * r * r
    n = self.m / (np.sqrt(self.s) + self.eps)
    u = (n @ self.p if self.right else self.p @ n) * self.scale
    self.w = self.w - self.lr * math.sqrt(1 - self.b2 ** t) / (1 - self.b1 ** t) * u
    return self.w
