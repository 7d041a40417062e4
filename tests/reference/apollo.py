"""Float64 NumPy reference of APOLLO / APOLLO-Mini (Zhu et al. 2025, arXiv 2412.05270), one matrix.

Written from the authors' code, zhuhanqing/APOLLO ``apollo_torch/apollo.py`` (class
``AdamW``, exported as ``APOLLOAdamW``) and ``apollo_torch/random_projector.py``
(``GradientProjector``), apollo-torch 1.0.3, not from this library. Orientation is torch's:
W is (m, n) = (out, in). With ``t = state["step"]`` after its increment:

* Projector: ``if self.ortho_matrix is None or iter % self.update_proj_gap == 0`` with
  ``iter = t - 1`` → a new matrix at the first step and every ``gap``. ``std``: m >= n →
  right, ``proj = stable_randn((rank, n), seed) / math.sqrt(rank)``, ``R = G @ proj.t()``
  (m, r); m < n → left, ``proj = stable_randn((m, rank), seed) / math.sqrt(rank)``,
  ``R = proj.t() @ G`` (r, n). Not orthogonalized; ``self.seed = next_seed(self.seed)``
  after each draw. The matrix is injected by the caller (see ``proj_shape``).
  Moments and the limiter state are kept across refreshes.
* Adam on R, HF style: ``denom = exp_avg_sq.sqrt().add_(group["eps"])``,
  ``norm_grad = exp_avg / denom`` (N, not bias-corrected), ``step_size = step_size *
  math.sqrt(bias_correction2) / bias_correction1``.
* Scaling: ``norm_dim = 0 if grad.shape[0] < grad.shape[1] else 1`` (full G's shape);
  channel: ``torch.norm(norm_grad, dim=norm_dim) / (torch.norm(grad, dim=norm_dim) + 1e-8)``
  (unsqueezed to (m, 1) when norm_dim == 1, else (n,) broadcasts per column); tensor:
  ``torch.norm(norm_grad) / (torch.norm(grad) + 1e-8)``. ``scaled_grad = p.grad * s``.
* ``scale_front``: ``scaled_grad *= np.sqrt(group["scale"])`` before the limiter, else
  ``norm_grad *= np.sqrt(group["scale"])`` after it (default scale_front=False).
* Limiter (γ = 1.01, scalar state c): first step ``c = ‖S‖``; then ``limiter =
  max(‖S‖/(c + 1e-8), 1.01)/1.01; S /= limiter; c = ‖S‖_before/limiter``.
* ``p.add_(norm_grad, alpha=-step_size)``; then ``p.add_(p, alpha=(-lr*weight_decay))``
  (decoupled decay of the already-updated weight, by lr·wd, no bias correction).

So U = √scale · limit(G ⊙ ‖N‖/(‖R‖ + 1e-8)) and new W = (W − lr·√bc2/bc1 · U)(1 − lr·wd).
"""

import math

import numpy as np

GAMMA = 1.01


def projection_side(m, n, proj_type="std"):
  """Side the reference projects: ``right`` (R = G Pᵀ, m×r) or ``left`` (R = Pᵀ G, r×n)."""
  wide = m >= n
  return {"std": "right" if wide else "left", "reverse_std": "left" if wide else "right",
          "right": "right", "left": "left"}[proj_type]


def proj_shape(m, n, rank, proj_type="std"):
  """Shape of the reference's ``ortho_matrix``: (rank, n) for right, (m, rank) for left."""
  return (rank, n) if projection_side(m, n, proj_type) == "right" else (m, rank)


def random_proj(m, n, rank, proj_type="std", rng=None):
  """A matrix distributed like the reference's: N(0, 1) / sqrt(rank), shape ``proj_shape``."""
  rng = np.random.default_rng(0) if rng is None else rng
  return rng.standard_normal(proj_shape(m, n, rank, proj_type)) / math.sqrt(rank)


class RefAdamW:
  """The same class's path for params without ``rank`` (HF AdamW). Returns new_w - w."""

  def __init__(self, *, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.0, lr=1e-3,
               bias_correction=None):
    self.b1, self.b2, self.eps, self.wd, self.lr = b1, b2, eps, weight_decay, lr
    self.bc = bias_correction or (lambda b, t: 1.0 - b ** t)
    self.t, self.exp_avg, self.exp_avg_sq = 0, None, None

  def _adam(self, r, lr):
    if self.exp_avg is None:
      self.exp_avg, self.exp_avg_sq = np.zeros_like(r), np.zeros_like(r)
    self.t += 1
    self.exp_avg = self.b1 * self.exp_avg + (1.0 - self.b1) * r
    self.exp_avg_sq = self.b2 * self.exp_avg_sq + (1.0 - self.b2) * r * r
    step_size = lr * math.sqrt(self.bc(self.b2, self.t)) / self.bc(self.b1, self.t)
    return self.exp_avg / (np.sqrt(self.exp_avg_sq) + self.eps), step_size

  def _finish(self, u, step_size, weight, lr):
    upd = -step_size * u
    if self.wd > 0.0:
      upd = upd - lr * self.wd * (np.asarray(weight, np.float64) + upd)  # decays updated W
    return upd

  def step(self, grad, weight=None, lr=None):
    lr = self.lr if lr is None else lr
    n, step_size = self._adam(np.asarray(grad, np.float64), lr)
    return self._finish(n, step_size, weight, lr)


class RefApollo(RefAdamW):
  """One (m, n) weight under APOLLOAdamW. ``step(grad, weight, proj_matrix)`` → new_w - w.

  ``proj_matrix`` (shape ``proj_shape(m, n, rank, proj_type)``) is read only on refresh
  steps (the first step and every ``update_proj_gap``); otherwise the stored one is used
  and the argument may be None. ``scale_type="tensor", rank=1`` is APOLLO-Mini.
  """

  def __init__(self, m, n, rank, *, scale=1.0, scale_type="channel", update_proj_gap=200,
               b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.0, lr=1e-3, limiter=True,
               proj_type="std", scale_front=False, bias_correction=None):
    super().__init__(b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, lr=lr,
                     bias_correction=bias_correction)
    if scale_type not in ("channel", "tensor"):
      raise ValueError(scale_type)
    self.m, self.n, self.rank, self.scale = m, n, rank, float(scale)
    self.scale_type, self.gap, self.proj_type = scale_type, update_proj_gap, proj_type
    self.limiter, self.scale_front = limiter, scale_front
    self.side = projection_side(m, n, proj_type)
    self.p = None            # ortho_matrix
    self.c = None            # state["scaled_grad"], the limiter's previous norm
    self.refreshed = False   # whether the last step drew a new matrix

  def step(self, grad, weight=None, proj_matrix=None, lr=None):
    lr = self.lr if lr is None else lr
    g = np.asarray(grad, np.float64)
    assert g.shape == (self.m, self.n), g.shape
    norm_dim = 0 if self.m < self.n else 1
    self.refreshed = self.p is None or self.t % self.gap == 0   # iter = step before +1
    if self.refreshed:
      p = np.asarray(proj_matrix, np.float64)
      assert p.shape == proj_shape(self.m, self.n, self.rank, self.proj_type), p.shape
      self.p = p
    r = g @ self.p.T if self.side == "right" else self.p.T @ g
    n, step_size = self._adam(r, lr)

    if self.scale_type == "channel":
      s = (np.linalg.norm(n, axis=norm_dim, keepdims=True)
           / (np.linalg.norm(r, axis=norm_dim, keepdims=True) + 1e-8))
    else:
      s = np.linalg.norm(n) / (np.linalg.norm(r) + 1e-8)
    u = g * s
    if self.scale_front:
      u = u * math.sqrt(self.scale)
    if self.limiter:
      u_norm = np.linalg.norm(u)
      if self.c is not None:
        lim = max(u_norm / (self.c + 1e-8), GAMMA) / GAMMA
        u = u / lim
        self.c = u_norm / lim
      else:
        self.c = u_norm
    if not self.scale_front:
      u = u * math.sqrt(self.scale)
    return self._finish(u, step_size, weight, lr)
