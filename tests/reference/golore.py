"""Float64 NumPy reference of GoLore-AdamW (He et al. 2024, arXiv 2410.11289), one matrix.

Written from the authors' code, pkumelon/Golore ``peft_pretraining/golore_torch/adamw.py``
(class ``AdamW``) and ``golore_projector.py`` (``GoLoreProjector``), not from this library.
Orientation is torch's: W is (m, n) = (out, in). With ``step`` counted from 0 before its
increment:

* Projector (``std``): m >= n → right, ``B = Vh[:r]`` (r, n), ``R = G Bᵀ`` (m, r); m < n →
  left, ``A = U[:, :r]`` (m, r), ``R = Aᵀ G`` (r, n). A new matrix when
  ``iter % update_proj_gap == 0``; ``rand = step >= rand_epoch`` (``rand_epoch =
  rand_ratio · num_training_steps``) draws a random matrix with orthonormal rows (right)
  or columns (left) instead of the SVD (``get_random_orthogonal_matrix``: the polar factor
  of a Gaussian); those are injected by the caller here (JAX draws them).
* On every new matrix after the first, the first moment is moved into the new subspace:
  left ``exp_avg = Aₙᵀ (Aₒ exp_avg)``, right ``exp_avg = (exp_avg Bₒ) Bₙᵀ``; the second
  moment is kept.
* Adam on R, Hugging Face style: ``denom = sqrt(exp_avg_sq) + eps``, ``N = exp_avg /
  denom``, ``step_size = lr · sqrt(1 − b2ᵗ) / (1 − b1ᵗ)``; back-projection ``P N`` (left)
  or ``N P`` (right) times ``scale``; ``p -= step_size · U``; then decoupled weight decay
  ``p -= lr · wd · p`` on the updated weight (tests here use wd = 0).
"""

import math

import numpy as np


class RefGoLore:
  """GoLore-AdamW on one (m, n) matrix, float64."""

  def __init__(self, m, n, rank, *, gap, switch_step, lr, scale=1.0, b1=0.9,
               b2=0.999, eps=1e-6, rotate=True):
    self.right = m >= n
    self.rank, self.gap, self.switch = rank, gap, switch_step
    self.lr, self.scale, self.b1, self.b2, self.eps = lr, scale, b1, b2, eps
    self.rotate = rotate
    self.p = None
    self.m = self.v = None
    self.step = 0

  def is_random(self):
    """Whether this step's refresh (if any) draws a random matrix."""
    return self.step >= self.switch

  def _svd_matrix(self, g):
    u, _, vh = np.linalg.svd(g, full_matrices=False)
    return vh[:self.rank] if self.right else u[:, :self.rank]

  def _project(self, g):
    return g @ self.p.T if self.right else self.p.T @ g

  def update(self, g, random_matrix=None):
    """One step on gradient ``g`` (m, n); returns the update ``−step_size · U``.

    ``random_matrix``: the random basis (right: (r, n), left: (m, r)) when this step
    refreshes after the switch.
    """
    g = np.asarray(g, np.float64)
    if self.step % self.gap == 0:
      new = (np.asarray(random_matrix, np.float64) if self.is_random()
             else self._svd_matrix(g))
      if self.p is not None and self.rotate:
        self.m = (self.m @ self.p) @ new.T if self.right else new.T @ (self.p @ self.m)
      self.p = new
    r = self._project(g)
    if self.m is None:
      self.m, self.v = np.zeros_like(r), np.zeros_like(r)
    self.step += 1
    t = self.step
    self.m = self.b1 * self.m + (1 - self.b1) * r
    self.v = self.b2 * self.v + (1 - self.b2) * r * r
    n = self.m / (np.sqrt(self.v) + self.eps)
    back = (n @ self.p if self.right else self.p @ n) * self.scale
    step_size = self.lr * math.sqrt(1 - self.b2 ** t) / (1 - self.b1 ** t)
    return -step_size * back
