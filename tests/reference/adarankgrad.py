"""float64 NumPy reference of AdaRankGrad (Refael et al., ICLR 2025) for ONE 2-D weight.

No authors' code exists to follow (none is public for AdaRankGrad, arXiv:2410.17881). This
reference is written from the method as the paper describes its loop (and as its first
author's follow-up SUMO, arXiv:2505.24749, writes the subspace step and moment transform):
Adam runs in a subspace until the optimisation there has converged, then a new subspace is
taken from the gradient of that step, with an adaptive rank, and the moments are carried
into it::

    t = 0, 1, ...:  G = grad(W_t)
      if no subspace yet, or ||Q^T G||_F <= varsigma, or the subspace has served T steps:
        U S V^T = svd(G);  k = min(k_prev, smallest k with sum_{i<k} s_i^2 >= eta ||G||_F^2)
        Q_new = top-k singular vectors of the projected side;  R = Q_old^T Q_new (k_old × k_new)
        M <- R^T M,  V <- (R^T sqrt(V))^2        (both moments into the new subspace)
      g = Q^T G;  M = b1 M + (1-b1) g;  V = b2 V + (1-b2) g^2   (t counted globally)
      W <- W - lr * scale * Q (M/(1-b1^(t+1))) / (sqrt(V/(1-b2^(t+1))) + eps)

The moments keep their true sizes (``k`` columns), not the library's zero-padded ones. The
second moment is carried as a magnitude (the library's ``moments.rotate_moments``); the
paper writes the transform of the second moment with the same ``R`` without saying how it
stays non-negative. The projected side is the smaller one (GaLore's ``std``), written here
for a weight ``W`` of shape ``(a, b)`` with ``a >= b``: ``Q`` is ``b × k`` right singular
vectors and ``g = G Q`` is ``a × k``. Signs of singular vectors matter to the second
moment's transport only (it mixes magnitudes ``sqrt(V)`` with the signed entries of ``R``;
Adam itself is sign-equivariant per coordinate): each column of ``Q`` is signed so that its
largest-magnitude entry (the first such) is positive, the library's convention.

Ablations for negative controls: ``fixed_gap=True`` switches every ``T`` steps whatever the
norm (GaLore's schedule); ``rotate="first"`` carries only the first moment and keeps the
second as it was (coordinates beyond the old size start at zero).
"""

import numpy as np


class AdaRankGrad:
  """One weight's AdaRankGrad state and step, in float64."""

  def __init__(self, rank, *, threshold, switch_threshold, max_gap, lr, scale,
               b1=0.9, b2=0.999, eps=1e-6, fixed_gap=False, rotate="both"):
    self.rank, self.threshold = rank, threshold
    self.switch_threshold, self.max_gap = switch_threshold, max_gap
    self.lr, self.scale, self.b1, self.b2, self.eps = lr, scale, b1, b2, eps
    self.fixed_gap, self.rotate = fixed_gap, rotate
    self.t = 0
    self.q = None  # (b, k)
    self.k = rank
    self.m = self.v = None  # (a, k)
    self.switched_at = -1
    self.switches = []  # the steps at which the subspace was renewed
    self.ranks = []  # the rank chosen at each switch
    self.norms = []  # ||Q^T G|| each step, before the decision (for margins)
    self.captured = []  # per switch: cumulative energy fractions (for margins)
    self.gaps = []  # per switch: smallest relative gap s_i/s_{i+1} - 1, i <= k (margins)

  def _new_subspace(self, g):
    _, s, vt = np.linalg.svd(g, full_matrices=False)
    energy = np.cumsum(s ** 2) / np.sum(g ** 2)
    self.captured.append(energy[:self.rank])
    hit = np.nonzero(energy[:self.rank] >= self.threshold)[0]
    k = int(hit[0]) + 1 if hit.size else self.rank
    self.k = min(k, self.k)
    self.gaps.append(np.min(s[:self.k] / s[1:self.k + 1]) - 1)
    q = vt[:self.k].T
    top = q[np.argmax(np.abs(q), axis=0), np.arange(q.shape[1])]
    return q * np.where(top < 0, -1.0, 1.0)

  def step(self, g):
    """``g``: the ``(a, b)`` gradient. Returns the ``(a, b)`` update ``-lr·scale·Q N``."""
    g = np.asarray(g, np.float64)
    norm = np.inf if self.q is None else np.linalg.norm(g @ self.q)
    self.norms.append(norm)
    switch = (self.q is None or self.t - self.switched_at >= self.max_gap
              or (not self.fixed_gap and norm <= self.switch_threshold))
    if switch:
      q = self._new_subspace(g)
      if self.q is None:
        self.m = np.zeros((g.shape[0], q.shape[1]))
        self.v = np.zeros_like(self.m)
      else:
        r = self.q.T @ q  # (k_old, k_new)
        self.m = self.m @ r
        if self.rotate == "both":
          self.v = np.square(np.sqrt(self.v) @ r)
        else:  # second moment kept in its old coordinates
          v = np.zeros_like(self.m)
          keep = min(self.v.shape[1], v.shape[1])
          v[:, :keep] = self.v[:, :keep]
          self.v = v
      self.q = q
      self.switched_at = self.t
      self.switches.append(self.t)
      self.ranks.append(self.k)
    p = g @ self.q
    self.m = self.b1 * self.m + (1 - self.b1) * p
    self.v = self.b2 * self.v + (1 - self.b2) * p * p
    self.t += 1
    m_hat = self.m / (1 - self.b1 ** self.t)
    v_hat = self.v / (1 - self.b2 ** self.t)
    n = m_hat / (np.sqrt(v_hat) + self.eps)
    return -self.lr * self.scale * n @ self.q.T
