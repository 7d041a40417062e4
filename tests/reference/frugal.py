"""float64 NumPy reference of FRUGAL (Zmushko et al., 2024) for ONE 2-D weight.

Written from the authors' code, github.com/fzmushko/FRUGAL (``frugal/proj_optimizer_templates.py``,
``adamw.py``, ``galore_projector.py``, ``coordinate_projector.py``), torch orientation
``W, G: (m, n) = (out, in)``. Subspaces are injected by the caller (the reference draws nothing).
Checked when written against the original torch classes (GaloreAdamW, CoordAdamW, BlockAdamW,
every kind/side/order, reset on and off, per-step lr, weight decay): equal to 1e-10 in float64.

One step (``ProjOptimizer.step``), with ``lr`` the group (scheduled) lr::

    if refresh: renew the subspace from this step's G; reset (see below)   # steps 0, T, 2T, ...
    W <- W * (1 - lr * weight_decay)          # p.mul_(1 - group["lr"] * group["weight_decay"])
    t += 1
    matrix kinds:  R = down(G);  U = up(Adam_{lr*s}(R));  U -= lr*s*c * sign(G - up(R))
    blocks:        active ? Adam_{lr*s}(G) : -lr*s*c * sign(G)
    dense:         Adam_lr(G)                 # regular group: embeddings, norms, lm_head

``s = proj_params_lr_scale``, ``c = inactive_lr_scale`` (``inactive_lr = lr * s * c``).
Adam (``AdamW._compute_update``, PyTorch eps placement)::

    m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
    denom = sqrt(v) / sqrt(1 - b2^t) + eps;  return m / denom * (-(lr / (1 - b1^t)))

Reset on refresh (``_init_state``: ``step = 0; exp_avg.zero_(); exp_avg_sq.zero_()``): moments
AND the counter t restart, so bias correction runs t = 1..T in every period. Matrix kinds honour
``reset_statistics`` (False: moments kept unrotated, t global); blocks always reset.

Subspace kinds (``subspace`` argument of ``step``, read only on refresh steps):
  * ``svd``      None (computed here: ``U, s, Vh = svd(G)``; right ``Vh[:r]``, left ``U[:, :r]``)
                 or an explicit basis like ``random``.
  * ``random``   right: P (r, n) with orthonormal rows; left: P (m, r) orthonormal columns;
                 full: (A (m, r), B (r, n)). The code draws ``nn.init.orthogonal_`` (no 1/sqrt(r)).
  * ``randperm`` a permutation of range(n) (right) / range(m) (left), or the matrix itself;
                 see ``randperm_basis``.
  * ``columns`` / ``rows``  int index array (length k) of kept columns (axis 1) / rows (axis 0).
  * ``randk``    int array of flat row-major indices into m*n (``(flat // n, flat % n)``).
  * ``blocks``   bool: this tensor is state-full during the coming period.
  * ``dense``    ignored (plain AdamW, never reset).
Side for svd/random/randperm: ``projection_side``. down/up: right ``G P^T`` / ``R P``;
left ``P^T G`` / ``P R``; full ``A^T G B^T`` / ``A R B``.
"""

import numpy as np

MATRIX_KINDS = ("svd", "random", "randperm")
COORD_KINDS = ("columns", "rows", "randk")
KINDS = MATRIX_KINDS + COORD_KINDS + ("blocks", "dense")


def projection_side(m, n, proj_side="std"):
  """``GaLoreProjector.__init__``: 'std' reduces the smaller dim (right if m >= n)."""
  if proj_side == "right" or (proj_side == "std" and m >= n) or (proj_side == "reverse_std" and m < n):
    return "right"
  if proj_side == "left" or (proj_side == "reverse_std" and m >= n) or (proj_side == "std" and m < n):
    return "left"
  return "full"


def subspace_size(m, n, kind, rank_or_density, proj_side="std"):
  """r (matrix kinds: Python ``round`` of the reduced dim * density) or k (coordinate kinds:
  ``int``, i.e. floor, of total * density). An ``int`` argument is taken as the count itself."""
  if isinstance(rank_or_density, (int, np.integer)):
    return int(rank_or_density)
  d = float(rank_or_density)
  if kind in MATRIX_KINDS:
    side = projection_side(m, n, proj_side)
    return round({"right": n, "left": m, "full": min(m, n)}[side] * d)
  return int({"columns": n, "rows": m, "randk": m * n}[kind] * d)


def randperm_basis(perm, r, side):
  """``_get_randperm_matrix``: right ``Vh[arange(n), perm] = 1; Vh[:r]`` (r, n) -> selects
  columns perm[:r]; left ``U[arange(m), perm] = 1; U[:, :r]`` (m, r) -> selects rows
  argsort(perm)[:r]."""
  perm = np.asarray(perm)
  q = np.zeros((perm.size, perm.size))
  q[np.arange(perm.size), perm] = 1.0
  return q[:r, :] if side == "right" else q[:, :r]


def block_indices(num_tensors, density, order, refresh_index):
  """Active tensor indices chosen by ``BlockOptimizer._update_states`` on refresh number
  ``refresh_index`` (0-based) for the deterministic orders ascending/descending/mirror."""
  L, k = num_tensors, round(num_tensors * density)
  start = {"ascending": 0, "descending": L - 1, "mirror": 0}[order]
  for _ in range(refresh_index + 1):
    if order == "ascending":
      idx = [i % L for i in range(start, start + k)]
      start = start + k - (L if start + k >= L else 0)
    elif order == "descending":
      idx = [i % L for i in range(start, start - k, -1)]
      start = start - k + (L if start - k < 0 else 0)
    else:
      h = L // 2
      idx = []
      for i in range(start, start + k // 2):
        idx += [i % h, L - 1 - i % h]
      start = start + k // 2 - (h if start + k // 2 >= h else 0)
  return sorted(idx)


class RefFrugal:
  """FRUGAL(AdamW, signSGD) on one (m, n) weight; ``step`` returns ``W_new - W`` (float64)."""

  def __init__(self, m, n, *, kind, rank_or_density=0.25, update_proj_gap=200, b1=0.9,
               b2=0.999, eps=1e-8, weight_decay=0.0, lr=1e-3, proj_params_lr_scale=1.0,
               inactive_lr_scale=1.0, inactive_update_rule="sign_sgd", reset_statistics=True,
               proj_side="std"):
    assert kind in KINDS, kind
    assert inactive_update_rule in ("no", "sgd", "sign_sgd")
    self.m, self.n, self.kind, self.gap = m, n, kind, update_proj_gap
    self.b1, self.b2, self.eps, self.wd, self.lr = b1, b2, eps, weight_decay, lr
    self.s, self.c, self.rule = proj_params_lr_scale, inactive_lr_scale, inactive_update_rule
    self.reset, self.side = reset_statistics, projection_side(m, n, proj_side)
    self.size = None if kind in ("blocks", "dense") else subspace_size(m, n, kind, rank_or_density, proj_side)
    self.t = None  # state["step"]; None = empty state
    self.mu = self.nu = self.basis = None
    self.active = True

  # ---- projection (GaLoreProjector / CoordinateProjector)
  def down(self, g):
    k, b = self.kind, self.basis
    if k == "columns":
      return g[:, b]
    if k == "rows":
      return g[b, :]
    if k == "randk":
      return g[b // self.n, b % self.n]
    if self.side == "right":
      return g @ b.T
    if self.side == "left":
      return b.T @ g
    return b[0].T @ g @ b[1].T

  def up(self, low):
    k, b = self.kind, self.basis
    if k in COORD_KINDS:
      full = np.zeros((self.m, self.n))
      if k == "columns":
        full[:, b] = low
      elif k == "rows":
        full[b, :] = low
      else:
        full[b // self.n, b % self.n] = low
      return full
    if self.side == "right":
      return low @ b
    if self.side == "left":
      return b @ low
    return b[0] @ low @ b[1]

  def _new_basis(self, grad, subspace):
    r = self.size
    if self.kind in COORD_KINDS:
      idx = np.asarray(subspace, dtype=np.int64).ravel()
      assert idx.size == r, (idx.size, r)
      return idx
    if self.kind == "svd" and subspace is None:
      u, _, vh = np.linalg.svd(grad, full_matrices=False)
      return {"right": vh[:r], "left": u[:, :r], "full": (u[:, :r], vh[:r])}[self.side]
    if self.kind == "randperm" and np.ndim(subspace[0] if self.side == "full" else subspace) == 1:
      if self.side == "full":
        return randperm_basis(subspace[0], r, "left"), randperm_basis(subspace[1], r, "right")
      return randperm_basis(subspace, r, self.side)
    if self.side == "full":
      a, b = (np.asarray(x, np.float64) for x in subspace)
      assert a.shape == (self.m, r) and b.shape == (r, self.n)
      return a, b
    p = np.asarray(subspace, np.float64)
    assert p.shape == ((r, self.n) if self.side == "right" else (self.m, r)), p.shape
    return p

  def _refresh(self, grad, subspace):
    if self.kind == "blocks":  # _deactivate_param on all, then _activate_param on chosen
      self.active = bool(subspace)
      self.t = 0
      self.mu = np.zeros((self.m, self.n)) if self.active else None
      self.nu = np.zeros((self.m, self.n)) if self.active else None
      return
    self.basis = self._new_basis(grad, subspace)
    if self.t is None or self.reset:
      shape = self.down(grad).shape
      self.t, self.mu, self.nu = 0, np.zeros(shape), np.zeros(shape)

  def _adam(self, g, lr):
    self.mu = self.b1 * self.mu + (1.0 - self.b1) * g
    self.nu = self.b2 * self.nu + (1.0 - self.b2) * g * g
    denom = np.sqrt(self.nu) / np.sqrt(1.0 - self.b2 ** self.t) + self.eps
    return self.mu / denom * (-(lr / (1.0 - self.b1 ** self.t)))

  def _free(self, g, lr):
    if self.rule == "no":
      return np.zeros_like(g)
    return -lr * (g if self.rule == "sgd" else np.sign(g))

  def step(self, grad, weight, subspace=None, lr=None):
    grad = np.asarray(grad, np.float64)
    weight = np.asarray(weight, np.float64)
    assert grad.shape == weight.shape == (self.m, self.n)
    lr = self.lr if lr is None else lr
    if self.kind == "dense":
      if self.t is None:
        self.t, self.mu, self.nu = 0, np.zeros_like(grad), np.zeros_like(grad)
    elif self.t is None or self.t % self.gap == 0:
      self._refresh(grad, subspace)
    decay = -lr * self.wd * weight
    self.t += 1
    if self.kind == "dense":
      return decay + self._adam(grad, lr)
    a_lr, f_lr = lr * self.s, lr * self.s * self.c
    if self.kind == "blocks":
      return decay + (self._adam(grad, a_lr) if self.active else self._free(grad, f_lr))
    low = self.down(grad)
    upd = self.up(self._adam(low, a_lr))
    if self.rule != "no":
      upd = upd + self._free(grad - self.up(low), f_lr)
    return decay + upd
