"""Float64 NumPy reference of Fira-AdamW (Chen et al. 2024, arXiv 2410.01623), one matrix.

Written from the authors' code, xichen-fy/Fira ``optimizer_torch/fira_adamw.py`` and
``optimizer_torch/gradient_projection.py`` (byte-identical to PyPI ``fira==1.0.2``),
not from this library. Orientation is torch's: W is (m, n) = (out, in). With
``t = state["step"]`` after its increment and ``alpha = scale``:

* Projector (GaLore's): ``if iter % self.update_proj_gap == 0`` with ``iter = t - 1`` →
  SVD of the current G at the first step and every ``gap``. ``std``: m >= n →
  ``P = Vh[:r]``, ``R = G Pᵀ``; m < n → ``P = U[:, :r]``, ``R = Pᵀ G``. Moments and the
  limiter state are kept across refreshes. ``project_back(X)`` returns
  ``(X P or P X) * self.alpha`` (side chosen from X's shape).
* Adam on R, HF style: ``denom = exp_avg_sq.sqrt().add_(group["eps"])``,
  ``norm_grad = exp_avg / denom`` (N, uncorrected), ``step_size = lr *
  math.sqrt(bias_correction2) / bias_correction1``.
* Residual and scaling: ``subgrad = project_back(grad)`` (= alpha·up(R), so alpha
  enters the residual); ``norm_dim = 0 if norm_grad.shape[0] < norm_grad.shape[1] else 1``;
  ``phi = ‖N‖/(‖R‖ + 1e-8)`` along norm_dim; ``S = (p.grad - subgrad) * phi``.
* Limiter (γ = 1.01, scalar state c): first step ``c = ‖S‖``; then ``limiter =
  max(‖S‖/(c + 1e-8), 1.01)/1.01; S /= limiter; c = ‖S‖_before/limiter``.
* ``norm_grad = project_back(norm_grad) + scaling_grad`` → U = alpha·up(N) + S;
  ``p.add_(norm_grad, alpha=-step_size)``; then ``p.add_(p, alpha=-lr*weight_decay)``
  (decay of the already-updated weight by lr·wd).

``rank=None`` gives the non-projected path (plain HF AdamW of the same class).
SVD signs: each left singular vector's largest-|entry| is made positive (pair flipped),
the library's convention (signs matter only through moments kept across a refresh).
"""

import numpy as np

GAMMA = 1.01


def canonical_svd(g):
  """Reduced SVD with the largest-|entry| of each left singular vector positive."""
  u, s, vh = np.linalg.svd(np.asarray(g, np.float64), full_matrices=False)
  idx = np.argmax(np.abs(u), axis=0)
  sign = np.sign(u[idx, np.arange(u.shape[1])])
  sign[sign == 0] = 1.0
  return u * sign[None, :], s, vh * sign[:, None]


class RefFira:
  """One (m, n) weight under Fira-AdamW. ``step(grad, weight)`` returns new_weight - weight."""

  def __init__(self, m, n, rank, *, scale, update_proj_gap, b1=0.9, b2=0.999, eps=1e-6,
               weight_decay=0.0, lr=1e-3, proj_type="std", bias_correction=None):
    if proj_type not in ("std", "reverse_std", "left", "right"):
      # "full" gives R (r, r) and phi (r, 1), which does not broadcast against (m, n)
      # in the authors' code unless r == m.
      raise NotImplementedError(proj_type)
    self.m, self.n, self.rank, self.alpha = m, n, rank, float(scale)
    self.gap, self.proj_type = update_proj_gap, proj_type
    self.b1, self.b2, self.eps, self.wd, self.lr = b1, b2, eps, weight_decay, lr
    # bias_correction(beta, t) -> 1 - beta**t (override to mimic float32 scalars).
    self.bc = bias_correction or (lambda b, t: 1.0 - b ** t)
    self.t = 0
    self.p = None            # ortho_matrix
    self.exp_avg = self.exp_avg_sq = None
    self.c = None            # state["scaling_grad"], the limiter's previous norm
    self.direction = None    # U before -step_size, for debugging

  # --- projector (GradientProjector.project / project_back) -------------------------
  def _side(self):
    wide = self.m >= self.n
    return {"std": "right" if wide else "left", "reverse_std": "left" if wide else "right",
            "right": "right", "left": "left"}[self.proj_type]

  def _project(self, g):
    side = self._side()
    if self.p is None or (self.t % self.gap) == 0:   # iter = step before increment
      u, _, vh = canonical_svd(g)
      self.p = vh[:self.rank, :] if side == "right" else u[:, :self.rank]
    return g @ self.p.T if side == "right" else self.p.T @ g

  def _project_back(self, x):
    if self.proj_type == "std":
      right = x.shape[0] >= x.shape[1]
    elif self.proj_type == "reverse_std":
      right = not x.shape[0] <= x.shape[1]
    else:
      right = self.proj_type == "right"
    return (x @ self.p if right else self.p @ x) * self.alpha

  # --- one optimizer step -----------------------------------------------------------
  def step(self, grad, weight=None):
    g = np.asarray(grad, np.float64)
    assert g.shape == (self.m, self.n), g.shape
    r = g if self.rank is None else self._project(g)
    if self.exp_avg is None:
      self.exp_avg, self.exp_avg_sq = np.zeros_like(r), np.zeros_like(r)
    self.t += 1
    self.exp_avg = self.b1 * self.exp_avg + (1.0 - self.b1) * r
    self.exp_avg_sq = self.b2 * self.exp_avg_sq + (1.0 - self.b2) * r * r
    denom = np.sqrt(self.exp_avg_sq) + self.eps
    step_size = self.lr * np.sqrt(self.bc(self.b2, self.t)) / self.bc(self.b1, self.t)
    n = self.exp_avg / denom

    if self.rank is not None:
      subgrad = self._project_back(r)                       # alpha * up(R)
      norm_dim = 0 if n.shape[0] < n.shape[1] else 1
      phi = (np.linalg.norm(n, axis=norm_dim, keepdims=True)
             / (np.linalg.norm(r, axis=norm_dim, keepdims=True) + 1e-8))
      s = (g - subgrad) * phi
      s_norm = np.linalg.norm(s)
      if self.c is not None:
        limiter = max(s_norm / (self.c + 1e-8), GAMMA) / GAMMA
        s = s / limiter
        self.c = s_norm / limiter
      else:
        self.c = s_norm
      n = self._project_back(n) + s
    self.direction = n

    upd = -step_size * n
    if self.wd > 0.0:
      w = np.asarray(weight, np.float64)
      upd = upd - self.lr * self.wd * (w + upd)             # decay of the updated weight
    return upd
