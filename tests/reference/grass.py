"""float64 NumPy reference of GRASS (Muhamed et al., 2024) with Adam, for ONE 2-D weight.

No authors' code exists to follow: github.com/aashiqmuhamed/GRASS (checked at its head,
commit bc1cb621, "Update README.md") holds a LICENSE and a README only. This reference is
written from the method as the paper states it (arXiv:2406.17660) and as summarized, with the
same equations, in junaidaliop/zij ``canon/math/grass.md`` (commit 00728ec2; quoted with its
LaTeX transcribed to plain text, the equation lines joined)::

    P^T = rho B, where B is a row-selection matrix and rho is a diagonal scaling. Rows are
    chosen by gradient row norm (top-r deterministically, or sampled with
    rho_jj = 1/sqrt(r q_{sigma_j}) for an unbiased estimator).
    g_t = P^T grad;  m_t = b1 m + (1-b1) g_t;  v_t = b2 v + (1-b2) g_t^2
    m_hat = m_t / (1 - b1^t);  v_hat = v_t / (1 - b2^t);  Delta_t = m_hat / (sqrt(v_hat) + eps)
    theta_{t+1} = theta_t - alpha eta P Delta_t
    The projection is refreshed every K steps, at which point the moments are reset.

Torch orientation ``G: (m, n) = (out, in)``. ``side="left"`` is the paper's ``P^T G``
(``r`` rows kept); ``side="right"`` keeps ``r`` columns (``G P``), for the library's other
``proj_type``s. One step, ``t`` counted from 1 and never restarted (the equations index it
globally; only the moments are said to reset)::

    if (t - 1) % K == 0:  choose sigma, rho from this step's G;  m = v = 0
    g = down(G) = rho * G[sigma, :];  Adam as above;  return up(Delta) (alpha = eta = 1, no sign)
    up(D): zeros (m, n), then row sigma_j += rho_j D_j   (a repeated sigma_j adds up: P rho B)

Selection:
  * ``top_norm``: the ``r`` largest row ``l2`` norms (indices ascending), ``rho = 1``.
  * ``norm_sampling``: ``sigma`` drawn i.i.d. (with replacement) with ``q_i ∝ ||G_i||_2^power``
    (uniform for an all-zero G); the draw is injected by the caller (``step(..., sigma=)``),
    ``rho_j = 1 / sqrt(r q_{sigma_j})`` computed here in float64 from this ``G``. Which power
    the authors used (norm or squared norm) could not be checked against code.
"""

import numpy as np

SELECTIONS = ("top_norm", "norm_sampling")


def sampling_probabilities(sq_norms, power):
  """``q_i ∝ ||G_i||^power`` from squared norms (uniform if they are all zero)."""
  w = np.asarray(sq_norms, np.float64) ** (0.5 * power)
  total = w.sum()
  return w / total if total > 0 else np.full(w.shape, 1.0 / w.size)


class RefGrass:
  """GRASS + Adam on one ``(m, n)`` weight; ``step`` returns the Adam direction (float64)."""

  def __init__(self, m, n, rank, *, side="left", selection="top_norm", power=1.0,
               update_proj_gap=1, reset_moments=True, b1=0.9, b2=0.999, eps=1e-8):
    assert side in ("left", "right") and selection in SELECTIONS
    self.m_rows, self.n_cols, self.rank, self.side = m, n, rank, side
    self.selection, self.power, self.gap = selection, power, update_proj_gap
    self.reset = reset_moments  # False only for negative controls
    self.b1, self.b2, self.eps = b1, b2, eps
    self.t = 0
    self.sigma = self.rho = self.q = self.mu = self.nu = None

  def _sq_norms(self, g):
    return (g * g).sum(axis=1 if self.side == "left" else 0)

  def _choose(self, g, sigma):
    sq = self._sq_norms(g)
    if self.selection == "top_norm":
      assert sigma is None
      self.sigma = np.sort(np.argsort(-sq, kind="stable")[:self.rank])
      self.rho = np.ones(self.rank)
    else:
      self.sigma = np.asarray(sigma, np.int64)
      assert self.sigma.shape == (self.rank,), self.sigma.shape
      self.q = sampling_probabilities(sq, self.power)
      self.rho = 1.0 / np.sqrt(self.rank * self.q[self.sigma])

  def down(self, g):
    if self.side == "left":
      return self.rho[:, None] * g[self.sigma, :]
    return g[:, self.sigma] * self.rho[None, :]

  def up(self, d):
    full = np.zeros((self.m_rows, self.n_cols))
    if self.side == "left":
      np.add.at(full, self.sigma, self.rho[:, None] * d)
    else:
      np.add.at(full.T, self.sigma, (d * self.rho[None, :]).T)
    return full

  def step(self, grad, sigma=None):
    g = np.asarray(grad, np.float64)
    assert g.shape == (self.m_rows, self.n_cols)
    if self.t % self.gap == 0:
      self._choose(g, sigma)
      if self.mu is None or self.reset:
        shape = self.down(g).shape
        self.mu, self.nu = np.zeros(shape), np.zeros(shape)
    self.t += 1
    low = self.down(g)
    self.mu = self.b1 * self.mu + (1 - self.b1) * low
    self.nu = self.b2 * self.nu + (1 - self.b2) * low * low
    m_hat = self.mu / (1 - self.b1 ** self.t)
    v_hat = self.nu / (1 - self.b2 ** self.t)
    return self.up(m_hat / (np.sqrt(v_hat) + self.eps))
