"""Float64 NumPy reference of COAP (Xiao et al. 2025, arXiv 2412.00071), AdamW, one matrix.

Written from the authors' code, bytedance/coap (commit deabc3a, "initial commit")
``coap_torch/optimizer/adamw.py`` (``AdamW``, exported as ``CoapAdamW``, and
``COAPAdamProjector``), ``coap_torch/projection/coap_matrix.py`` (``MatrixCOAP``) and
``coap_torch/utils/orthogonal.py`` (``compute_orthogonal``), not from this library.
Orientation is torch's: W and G are (m, n) = (out, in). With ``iter = state["step"]``
read BEFORE this step's increment (0 at the first step):

* Side (``COAPAdamProjector.project``): ``if full_rank_grad.shape[0] >=
  full_rank_grad.shape[1]: _type = "right"`` → P is (r, n), ``R = G @ P.T`` (m, r);
  else ``"left"`` → P is (m, r), ``R = P.T @ G`` (r, n). ``project_back`` (and
  ``restore``) pick the side from the LOW-RANK tensor's shape: ``N @ P`` if
  ``N.shape[0] >= N.shape[1]`` else ``P @ N``, times ``self.scale``; for r <= min(m, n)
  this is always the same side as above.
* Basis (``get_orthogonal_matrix`` + ``compute_orthogonal``): right: ``Vh =
  compute_orthogonal(G, r, omega)``; left: ``Vh = compute_orthogonal(G.T, r, omega)``,
  ``P = Vh.T``. ``compute_orthogonal(A, r, omega)``: ``Y = A @ omega``; ``Q, _ =
  torch.linalg.qr(Y, "reduced")``; ``B = Q.T @ A``; ``_, _, Vh = torch.linalg.svd(B,
  full_matrices=False)``; return Vh. ``omega`` is the previous basis (``P.T``, shape (n, r),
  for right; ``P``, shape (m, r), for left) — a warm start — or, the very first time,
  ``torch.randn([A.shape[1], r], generator=torch.Generator().manual_seed(3407))``; here
  that first Ω is supplied by the caller (``initial_omega``, shape ``omega_shape``).
* Schedule: ``if self.ortho_matrix is None`` → basis from the random Ω (first step);
  ``elif iter % update_interval == 0``: ``if iter % (update_interval * reproject_factor)
  == 0`` → basis warm-started from the current P, ``else`` → ``P = update_proj(P,
  state["exp_avg"], _type, G)`` with the LOW-RANK first moment as it was before this
  step's moment update. Then ``R`` is formed with the new P.
* ``update_proj(proj, proj_M, proj_type, grad, lr=0.1)``: right ``exp_avg = proj_M @
  proj``, ``loss = F.mse_loss(grad @ proj.T @ proj, grad)``; left ``exp_avg = proj @
  proj_M``, ``loss = F.mse_loss(proj @ proj.T @ grad, grad)``; ``loss *= 1 -
  F.cosine_similarity(exp_avg, grad, dim=1).mean()``; ``loss.backward()``;
  ``clip_grad_norm_(proj, max_norm=1.0)``; ``proj -= proj.grad * lr``. The gradient flows
  through BOTH factors (``exp_avg`` depends on proj). Gradient here: analytic, see
  ``coap_reconstruction_loss_and_grad``.
* ``restore_state`` (default False, the LLaMA setting): if True, on a basis change
  ``exp_avg ← restore(exp_avg) @ P_new.T`` (right) / ``P_new.T @ restore(exp_avg)`` (left)
  and ``exp_avg_sq ← (same map of restore(exp_avg_sq ** 0.5)) ** 2``, ``restore`` using the
  OLD P. If False the moments are kept as they are, in the old basis's coordinates.
* Adam, HF style: ``state["step"] += 1``; ``exp_avg.mul_(beta1).add_(R, alpha=1 -
  beta1)``; ``exp_avg_sq.mul_(beta2).addcmul_(R, R, value=1 - beta2)``; ``denom =
  exp_avg_sq.sqrt().add_(eps)``; ``step_size = lr * math.sqrt(1 - beta2 ** t) / (1 -
  beta1 ** t)``; ``p.add_(project_back(exp_avg / denom), alpha=-step_size)``; then ``if
  weight_decay > 0: p.add_(p, alpha=-lr * weight_decay)`` (decays the ALREADY-UPDATED
  weight, by the scheduled lr, not step_size).

So W' = (W − lr·√(1−β2ᵗ)/(1−β1ᵗ) · scale · back(exp_avg / (√exp_avg_sq + eps))) · (1 − lr·wd).

Which leaves are projected (``coap_torch/utils/params.py`` ``setup_params``): 2-D with
``rank < min(shape)`` (with ``rank >= min(shape)`` they go to a group without
``proj_method``: plain HF AdamW, ``RefAdamW`` below); 1-D and other ranks: plain AdamW;
4-D with more than 32·32·3·3 elements: Tucker COAP (not modelled here).

Learning rate: ``lr`` is a float or a callable of the 1-based step t (the value of
``state["step"]`` after its increment), used for both step_size and the weight decay; a
torch ``LambdaLR`` stepped after each optimizer step is ``lambda t: lr0 * lr_lambda(t - 1)``.

Differences from the code, all deliberate:

* Everything is float64. The code computes every basis in float32 unless the parameter is
  float32: ``get_orthogonal_matrix`` does ``matrix = module_params.data.float()`` when
  ``dtype != torch.float`` (so also for float64 and bfloat16 params) and casts Vh back;
  ``compute_orthogonal`` does ``omega = omega.data.float()`` for a non-float32 Ω. The SGD
  step, the moments and the update stay in the parameter's dtype.
* The first Ω is injected instead of drawn from seed 3407.
* SVD signs. LAPACK may return any sign per singular vector, and the code does not fix
  it. With ``restore_state=False`` the FIRST basis's signs do not matter (the moments are
  zero; P's rows and the moments' rank axis flip together and Adam is odd in its input),
  nor does the SGD step (equivariant). But at a warm-started RECOMPUTE the
  moments are carried over unchanged, in the old basis's coordinates: a new basis vector
  whose sign differs from that of the old one it replaces reverses that component of the
  carried first moment in full space (v is unaffected). So the weights after the first
  recompute depend on the LAPACK build's sign choice (numpy's OpenBLAS and torch's MKL
  differ in practice, and torch's code flips at least one vector relative to the previous
  basis at most recomputes). With ``restore_state=True`` every basis change is sign-dependent
  (``restore(exp_avg_sq ** 0.5)`` is not equivariant). ``basis_signs`` picks the rule:
  ``None`` — as numpy's SVD returns them (the code's behaviour with that LAPACK);
  ``"previous"`` — each recomputed vector flipped to a non-negative inner product with the
  previous basis's vector of the same index (the first basis as returned); or a callable
  ``f(P_new, event) -> P_new`` (event "init" or "recompute"), e.g. to copy the signs of
  another implementation (``align_signs``). Compare ``ortho_matrix`` / ``exp_avg`` up to
  signs with ``align_signs``.
"""

import math

import numpy as np

COS_EPS = 1e-8   # torch.nn.functional.cosine_similarity default eps
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_: clip_coef = max_norm / (total_norm + 1e-6)


def projection_side(m, n):
  """COAP's side for an (m, n) gradient: ``right`` (P is (r, n)) if m >= n, else ``left``."""
  return "right" if m >= n else "left"


def proj_shape(m, n, rank):
  """Shape of ``ortho_matrix``: (rank, n) for right, (m, rank) for left."""
  return (rank, n) if projection_side(m, n) == "right" else (m, rank)


def omega_shape(m, n, rank):
  """Shape of the first random Ω: (n, rank) for right (m >= n), (m, rank) for left."""
  return (n, rank) if projection_side(m, n) == "right" else (m, rank)


def _rowwise_cos_and_grad(x, g, eps=COS_EPS):
  """Row cosines ``c_i`` of x and g (dim=1) and d(mean_i c_i)/dx, torch semantics.

  torch (ATen ``cosine_similarity``, torch 2.x; checked on 2.13.0):
  ``x1_norm = linalg_vector_norm(x1, 2, dim, keepdim=True).clone()`` (same for x2), then
  under ``NoGradGuard`` ``x1_norm.clamp_min_(eps)``, and ``((x1 / x1_norm) * (x2 /
  x2_norm)).sum(dim)``. So c_i = <x_i, g_i> / (max(|x_i|, eps) max(|g_i|, eps)), and since
  the clamp is not recorded, the backward differentiates the norm as if unclamped:
  dc_i/dx_i = g_i / (a_i b_i) − c_i / a_i · x_i / |x_i| with a_i = max(|x_i|, eps),
  b_i = max(|g_i|, eps) (and x_i / |x_i| := 0 where |x_i| = 0, as vector_norm's backward).
  """
  xn = np.linalg.norm(x, axis=1, keepdims=True)
  gn = np.linalg.norm(g, axis=1, keepdims=True)
  a = np.maximum(xn, eps)
  b = np.maximum(gn, eps)
  cos = np.sum((x / a) * (g / b), axis=1, keepdims=True)
  unit = np.divide(x, xn, out=np.zeros_like(x), where=xn > 0)
  dcos_dx = (g / (a * b) - (cos / a) * unit) / x.shape[0]
  return cos[:, 0], dcos_dx


def coap_reconstruction_loss_and_grad(P, M, G, proj_type):
  """(loss, dloss/dP) of ``MatrixCOAP.update_proj``'s loss, float64.

  right: P (r, n), M (m, r): loss = mean((G PᵀP − G)²) · (1 − mean_i cos_i(M P, G));
  left:  P (m, r), M (r, n): loss = mean((P Pᵀ G − G)²) · (1 − mean_i cos_i(P M, G));
  cos_i along dim=1 (row i of the (m, n) matrices). With E the residual and N = m n:
  d mse/dP = (2/N)(P EᵀG + P GᵀE) (right), (2/N)(E GᵀP + G EᵀP) (left); d(1 − C)/dP =
  −Mᵀ dC/dX (right, X = M P), −dC/dX Mᵀ (left, X = P M). Product rule for the total.
  """
  P, M, G = (np.asarray(a, np.float64) for a in (P, M, G))
  size = G.size
  if proj_type == "right":
    E = G @ P.T @ P - G
    dmse = (2.0 / size) * (P @ E.T @ G + P @ G.T @ E)
    X = M @ P
  elif proj_type == "left":
    E = P @ P.T @ G - G
    dmse = (2.0 / size) * (E @ G.T @ P + G @ E.T @ P)
    X = P @ M
  else:
    raise ValueError(proj_type)
  mse = np.mean(E * E)
  cos, dcos_dx = _rowwise_cos_and_grad(X, G)
  factor = 1.0 - np.mean(cos)
  dfactor = -(M.T @ dcos_dx) if proj_type == "right" else -(dcos_dx @ M.T)
  return mse * factor, dmse * factor + mse * dfactor


def clip_grad_norm(grad, max_norm=1.0):
  """``torch.nn.utils.clip_grad_norm_`` on one tensor: grad · min(max_norm/(‖grad‖+1e-6), 1)."""
  total_norm = np.linalg.norm(grad)
  return grad * min(max_norm / (total_norm + CLIP_EPS), 1.0)


def coap_update_proj(P, M, G, proj_type, lr=0.1):
  """``MatrixCOAP.update_proj``: one clipped SGD step on P (returns the new P)."""
  _, grad = coap_reconstruction_loss_and_grad(P, M, G, proj_type)
  return np.asarray(P, np.float64) - lr * clip_grad_norm(grad, 1.0)


def compute_orthogonal(A, rank, omega):
  """``utils/orthogonal.py``: Y = A Ω, Q = qr(Y) reduced, B = QᵀA, return Vh of svd(B).

  A (m, n), omega (n, rank) given by the caller; returns Vh (rank, n).
  """
  A = np.asarray(A, np.float64)
  omega = np.asarray(omega, np.float64)
  assert omega.shape == (A.shape[1], rank), (omega.shape, A.shape, rank)
  Q, _ = np.linalg.qr(A @ omega, mode="reduced")
  _, _, Vh = np.linalg.svd(Q.T @ A, full_matrices=False)
  return Vh


def coap_orthogonal_matrix(G, rank, proj_type, omega):
  """``MatrixCOAP.get_orthogonal_matrix``: (rank, n) Vh for right, (m, rank) Vh.T for left."""
  G = np.asarray(G, np.float64)
  if proj_type == "right":
    return compute_orthogonal(G, rank, omega)
  if proj_type == "left":
    return compute_orthogonal(G.T, rank, omega).T
  raise ValueError(proj_type)


def align_signs(P, P_ref, proj_type):
  """Flip P's basis vectors (rows for right, columns for left) to match P_ref's signs.

  Returns (aligned P, sign vector s of length rank); the moments of the implementation
  that produced P map to P_ref's by multiplying their rank axis by s.
  """
  P = np.asarray(P, np.float64)
  P_ref = np.asarray(P_ref, np.float64)
  if proj_type == "right":
    s = np.sign(np.sum(P * P_ref, axis=1))
    s[s == 0] = 1.0
    return P * s[:, None], s
  s = np.sign(np.sum(P * P_ref, axis=0))
  s[s == 0] = 1.0
  return P * s[None, :], s


class RefAdamW:
  """The code's path for unprojected leaves (HF AdamW, decay after the update)."""

  def __init__(self, lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
    self.lr_fn = lr if callable(lr) else (lambda t, _lr=float(lr): _lr)
    self.b1, self.b2 = betas
    self.eps, self.wd = eps, weight_decay
    self.t = 0
    self.exp_avg = self.exp_avg_sq = None

  def _adam(self, r):
    """Moment update on r; returns (exp_avg / denom, step_size, lr)."""
    if self.exp_avg is None:
      self.exp_avg, self.exp_avg_sq = np.zeros_like(r), np.zeros_like(r)
    self.t += 1
    lr = float(self.lr_fn(self.t))
    self.exp_avg = self.b1 * self.exp_avg + (1.0 - self.b1) * r
    self.exp_avg_sq = self.b2 * self.exp_avg_sq + (1.0 - self.b2) * r * r
    denom = np.sqrt(self.exp_avg_sq) + self.eps
    step_size = lr * math.sqrt(1.0 - self.b2 ** self.t) / (1.0 - self.b1 ** self.t)
    return self.exp_avg / denom, step_size, lr

  def _finish(self, W, u, step_size, lr):
    W = W - step_size * u
    if self.wd > 0.0:
      W = W - lr * self.wd * W
    return W

  def step(self, W, G):
    """One optimizer step; returns the new W."""
    W = np.asarray(W, np.float64)
    u, step_size, lr = self._adam(np.asarray(G, np.float64))
    return self._finish(W, u, step_size, lr)


class RefCOAPAdamW(RefAdamW):
  """One (m, n) weight under coap_torch's ``AdamW(proj_method="coap")``.

  ``initial_omega`` (shape ``omega_shape(m, n, rank)``) is the Ω of the very first basis.
  ``step(W, G)`` returns the new W. Inspect ``ortho_matrix``, ``exp_avg``, ``exp_avg_sq``
  (low-rank moments), ``t`` (steps taken) and ``last_event`` (what the projector did on
  the last step: "init", "recompute", "sgd" or None). ``basis_signs``: see the module
  docstring (None, "previous" or a callable).
  """

  def __init__(self, rank, lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
               update_interval=32, reproject_factor=5, scale=1.0, initial_omega=None,
               restore_state=False, basis_signs=None):
    super().__init__(lr, betas=betas, eps=eps, weight_decay=weight_decay)
    self.rank, self.update_interval = rank, update_interval
    self.reproject_factor, self.scale = reproject_factor, float(scale)
    self.restore_state = restore_state
    if not (basis_signs is None or basis_signs == "previous" or callable(basis_signs)):
      raise ValueError(basis_signs)
    self.basis_signs = basis_signs
    self.initial_omega = None if initial_omega is None else np.asarray(initial_omega,
                                                                       np.float64)
    self.ortho_matrix = None
    self.last_event = None

  def _restore(self, low):
    # MatrixCOAP.restore / project_back: side from the low-rank tensor's shape.
    return low @ self.ortho_matrix if low.shape[0] >= low.shape[1] else self.ortho_matrix @ low

  def _new_basis(self, G, side, omega, event):
    P = coap_orthogonal_matrix(G, self.rank, side, omega)
    if callable(self.basis_signs):
      P = np.asarray(self.basis_signs(P, event), np.float64)
    elif self.basis_signs == "previous" and event == "recompute":
      P, _ = align_signs(P, self.ortho_matrix, side)
    return P

  def _project(self, G):
    m, n = G.shape
    side = projection_side(m, n)
    it = self.t
    self.last_event = None
    if self.ortho_matrix is None:
      if self.initial_omega is None:
        raise ValueError("initial_omega is needed for the first basis")
      assert self.initial_omega.shape == omega_shape(m, n, self.rank), self.initial_omega.shape
      self.ortho_matrix = self._new_basis(G, side, self.initial_omega, "init")
      self.last_event = "init"
    elif it % self.update_interval == 0:
      restore = self.restore_state and self.exp_avg is not None
      if restore:
        full_avg = self._restore(self.exp_avg)
        full_sq = self._restore(self.exp_avg_sq ** 0.5)
      if it % (self.update_interval * self.reproject_factor) == 0:
        omega = self.ortho_matrix.T if side == "right" else self.ortho_matrix
        self.ortho_matrix = self._new_basis(G, side, omega, "recompute")
        self.last_event = "recompute"
      else:
        self.ortho_matrix = coap_update_proj(self.ortho_matrix, self.exp_avg, G, side)
        self.last_event = "sgd"
      if restore:
        P = self.ortho_matrix
        if side == "right":
          self.exp_avg, self.exp_avg_sq = full_avg @ P.T, (full_sq @ P.T) ** 2
        else:
          self.exp_avg, self.exp_avg_sq = P.T @ full_avg, (P.T @ full_sq) ** 2
    return G @ self.ortho_matrix.T if side == "right" else self.ortho_matrix.T @ G

  def step(self, W, G):
    """One optimizer step (projector, Adam on R, project back, decay); returns the new W."""
    W = np.asarray(W, np.float64)
    G = np.asarray(G, np.float64)
    assert W.shape == G.shape and G.ndim == 2, (W.shape, G.shape)
    assert self.rank <= min(G.shape), (self.rank, G.shape)
    r = self._project(G)
    u, step_size, lr = self._adam(r)
    return self._finish(W, self._restore(u) * self.scale, step_size, lr)
