"""float64 NumPy reference of DCT-AdamW (Modoranu et al., 2025) for ONE 2-D weight.

Written from the authors' code, github.com/IST-DASLab/ISTA-DASLab-Optimizers at commit
4c98e6e7 (``ista_daslab_optimizers/fft_low_rank/dct_adamw.py``, ``fft_projector.py``,
``utils/dct.py``), torch orientation ``W, G: (R, C) = (out, in)`` (the library's ``m × n``).
Defaults of ``DCTAdamW``: ``proj="dct"``, ``sim_type="matmul"``, ``ell_norm=1``,
``update_proj_gap=1``, ``rotate_subspace=False``, ``betas=(0.9, 0.999)``, ``eps=1e-8``.

Quoted below, statements joined by ``;`` where the code has several lines; ``#`` comments,
``(right)``/``(left)`` labels and ``...`` are ours.

The matrix (``utils/dct.py``; ``setup_Q`` keeps it as ``self.Q`` for ``sim_type="matmul"``)::

    lin = torch.arange(n); I = lin.repeat(n, 1).to(torch.float)
    Q = math.sqrt(2 / n) * torch.cos(torch.pi * (I.t() * (2. * I + 1.)) / (2. * n))
    Q[0, :] *= math.sqrt(0.5)

i.e. ``Q[j, k] = w_j √(2/n) cos(π j (2k+1) / 2n)``: the orthonormal DCT-II matrix (``dct3_matrix``).

Side (``FFTLowRankProjector._setup``)::

    n, m = p.shape
    if n >= m: self.is_right_proj = True; self.size = min(n, m)
    else:
        if n in [512, 1024] and m in [3584, 4096]: self.is_right_proj = True; self.size = m
        else: self.is_right_proj = False; self.size = min(n, m)

Refresh (``change_subspace`` via ``compute_similarity_matmul``), when
``self.steps == 1 or self.steps % self.update_proj_gap == 0`` (``steps`` 1-based)::

    if self.is_right_proj: S = A @ Q;   norms = S.norm(p=self.ell_norm, dim=0)
    else:                  S = Q.T @ A; norms = S.norm(p=self.ell_norm, dim=1)
    indices = torch.topk(input=norms, k=self.rank, sorted=False).indices
    return S[:, self.indices_crt]  (right)  /  S[self.indices_crt, :]  (left)

Projection (``from_higher_to_lower_dimensions`` / ``from_lower_to_higher_dimensions``)::

    right: X @ Q[:, icrt]    /  x @ Q[:, icrt].T
    left:  Q[:, icrt].T @ X  /  Q[:, icrt] @ x

Moments (``dct_low_rank_step``)::

    if self.steps > 1 and self.rotate_subspace and self.should_update_projection():
        R = clrp.get_subspace_rotation_matrix(self.Q)  # right: Q[:, iprev].T @ Q[:, icrt]
        # left: Q[:, icrt].T @ Q[:, iprev]
        clrp.rotate_subspace(R, mt); clrp.rotate_subspace(R, vt); vt.abs_()
    mt.mul_(beta1).add_(a, alpha=1 - beta1)
    vt.mul_(beta2).addcmul_(a, a, value=1 - beta2)
    u = mt / (self.eps * sqrt_bc2 + vt.sqrt())
    clrp.from_lower_to_higher_dimensions(self.Q, u, out=p.grad)
    p.add_(p.grad, alpha=adjusted_lr)  # -lr * sqrt_bc2 / bc1, bc1 = 1 - beta1 ** steps

``rotate_subspace`` maps ``w ← w R`` (right) / ``R w`` (left). Without it the moments are kept
as they are when the indices change. The step count is global (never restarted).

Choices of this reference (documented differences, see ``optax_lowrank.projectors.dct``):

- ``torch.topk(sorted=False)`` returns the indices in a backend-defined order; here they are
  sorted ascending (ties broken towards the lower index), as the library does.
- ``step`` returns the direction with ``lr = 1`` and without the minus sign, i.e. what
  ``optax.scale_by_adam`` returns (weight decay and the learning rate are applied outside).
- ``rotate_second=False`` rotates the first moment only (the library's ``on_refresh="rotate"``);
  the authors' ``True`` also rotates ``v``.
- Each instance has its own ``Q`` of its weight's size (the authors keep one ``Q`` for all).
"""

import numpy as np


def dct3_matrix(n):
  """``utils/dct.py: dct3_matrix`` in float64 (the orthonormal DCT-II matrix)."""
  i = np.tile(np.arange(n, dtype=np.float64), (n, 1))  # I[a, b] = b
  q = np.sqrt(2.0 / n) * np.cos(np.pi * (i.T * (2.0 * i + 1.0)) / (2.0 * n))
  q[0, :] *= np.sqrt(0.5)
  return q


def is_right_proj(rows, cols):
  """``FFTLowRankProjector._setup``: ``(is_right_proj, size)``."""
  if rows >= cols:
    return True, min(rows, cols)
  if rows in (512, 1024) and cols in (3584, 4096):
    return True, cols
  return False, min(rows, cols)


def top_indices(norms, rank):
  """The ``rank`` largest ``norms``, indices ascending."""
  return np.sort(np.argsort(-np.asarray(norms), kind="stable")[:rank])


class RefDCTAdamW:
  """``DCTAdamW`` on one ``(R, C)`` weight; ``step`` returns the Adam direction (float64)."""

  def __init__(self, rows, cols, rank, *, update_proj_gap=1, ell_norm=1, rotate_subspace=False,
               rotate_second=True, b1=0.9, b2=0.999, eps=1e-8):
    self.right, size = is_right_proj(rows, cols)
    self.q = dct3_matrix(size)
    self.rank, self.gap, self.ell = rank, update_proj_gap, ell_norm
    self.rotate, self.rotate_second = rotate_subspace, rotate_second
    self.b1, self.b2, self.eps = b1, b2, eps
    shape = (rows, rank) if self.right else (rank, cols)
    self.m, self.v = np.zeros(shape), np.zeros(shape)
    self.steps = 0
    self.idx = self.prev = None

  def norms(self, g):
    """Column (right) / row (left) ``ell_norm`` norms of ``S``."""
    s = g @ self.q if self.right else self.q.T @ g  # S.norm(p=ell, dim=0 / dim=1)
    return np.sum(np.abs(s) ** self.ell, axis=0 if self.right else 1) ** (1.0 / self.ell)

  def down(self, x):
    qc = self.q[:, self.idx]
    return x @ qc if self.right else qc.T @ x

  def up(self, x):
    qc = self.q[:, self.idx]
    return x @ qc.T if self.right else qc @ x

  def step(self, grad):
    g = np.asarray(grad, np.float64)
    self.steps += 1
    refresh = self.steps == 1 or self.steps % self.gap == 0
    if refresh:
      self.prev = self.idx
      self.idx = top_indices(self.norms(g), self.rank)
    a = self.down(g)
    if self.steps > 1 and self.rotate and refresh:
      qp, qc = self.q[:, self.prev], self.q[:, self.idx]
      if self.right:
        rot = qp.T @ qc
        self.m = self.m @ rot
        if self.rotate_second:
          self.v = np.abs(self.v @ rot)
      else:
        rot = qc.T @ qp
        self.m = rot @ self.m
        if self.rotate_second:
          self.v = np.abs(rot @ self.v)
    self.m = self.b1 * self.m + (1 - self.b1) * a
    self.v = self.b2 * self.v + (1 - self.b2) * a * a
    bc1 = 1 - self.b1 ** self.steps
    sqrt_bc2 = np.sqrt(1 - self.b2 ** self.steps)
    u = self.m / (self.eps * sqrt_bc2 + np.sqrt(self.v))
    return self.up(u) * (sqrt_bc2 / bc1)
