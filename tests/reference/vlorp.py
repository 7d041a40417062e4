"""Float64 NumPy reference of VLoRP + ProjFactor (arXiv 2505.01744), one matrix at a time.

Written from the authors' PyTorch code, BIGKnight/VLoRP ``optim/projfactor.py`` (commit
93da5b6; classes ``ProjFactor``, ``SingleParameterRandomAdaFactor``,
``SingleParameterAdamW``), not from this library. Orientation is torch's: a weight W is
(R, C) = (out, in), the ``nn.Linear.weight`` layout (``self.r_num, self.c_num =
self.params_shape``). ``c`` is the granularity, the code's ``factor`` (``--factor``).

Projection (``project`` / ``project_back``):

* Side: ``if self.r_num >= self.c_num: ... self.multiplier_pos = "right"`` else ``"left"``.
* Right: ``random_matrix = torch.randn(self.rank, int(self.c_num / self.factor))``,
  ``low_rank_grad = torch.matmul(full_rank_grad.reshape(int(self.r_num * self.factor),
  int(self.c_num / self.factor)), random_matrix.t())`` -> (R*c, rank);
  ``full_rank_grad = (torch.matmul(low_rank_grad, random_matrix) / self.rank)
  .reshape(self.r_num, self.c_num)``.
* Left: ``random_matrix = torch.randn(int(self.r_num / self.factor), self.rank)``,
  ``low_rank_grad = torch.matmul(random_matrix.t(), full_rank_grad.reshape(
  int(self.r_num / self.factor), int(self.c_num * self.factor)))`` -> (rank, C*c);
  ``full_rank_grad = (torch.matmul(random_matrix, low_rank_grad) / self.rank)
  .reshape(self.r_num, self.c_num)``.
* Both: ``return full_rank_grad * self.scale``. Reshapes are torch's, i.e. row-major
  (NumPy C order). The matrix is N(0, 1) (``proj_matrix_dist="normal"``; "rademacher" is
  +-1), NOT divided by sqrt(rank): the ``/ self.rank`` is in ``project_back``.
* Refresh: ``if self.update_step % self.update_proj_gap == 0: self.random_seed = ...``
  inside ``project``, with ``update_step`` the number of optimizer steps already taken; so
  a new matrix on the 1st, (gap+1)-th, (2 gap+1)-th ... step. ``project_back`` regenerates
  the matrix from the stored seed. Here the caller INJECTS the matrix instead
  (``RefProjFactor.needs_new_matrix()`` says when one is read; shape ``proj_shape``).

Step (``SingleParameterRandomAdaFactor.step``), t = ``self.update_step`` after ``+= 1``:

* ``proj_grad``: the sum of the projected micro-batch gradients (the post-accumulate-grad
  hook does ``self.optimizer_dict[p].proj_grad += proj_grad`` and ``p.grad = None``; the
  step runs when ``accumulate_count % gradient_accumulation == 0``). The optimizer does
  not divide by the number of micro-batches; ``torchrun_main.py`` does it in the loss
  (``scaled_loss = loss / args.gradient_accumulation``). Here ``average=False`` (default)
  sums the projected micro gradients as the optimizer does; ``average=True`` divides the
  sum by ``len(grads)`` (what an optax.MultiSteps-style mean of raw gradients gives, and
  what the code gives with the script's loss scaling).
* ``state["exp_avg"] = torch.zeros_like(self.proj_grad)`` at the first step only (KEPT
  across refreshes, never transported); ``exp_avg_sq_row = torch.zeros(self.r_num)``,
  ``exp_avg_sq_col = torch.zeros(self.c_num)`` (fp32 in the code, float64 here).
* ``exp_avg.mul_(beta1).add_(self.proj_grad, alpha=(1.0 - beta1))``
* ``proj_back_grad = self.project_back(self.proj_grad)`` (so including ``* scale``)
* ``exp_avg_sq_row.mul_(beta2).add_((proj_back_grad ** 2).sum(dim=1), alpha=1.0 - beta2)``
* ``exp_avg_sq_col.mul_(beta2).add_((proj_back_grad ** 2).sum(dim=0), alpha=1.0 - beta2)``
* ``step_size = group["lr"]``; if ``correct_bias``: ``step_size = step_size *
  math.sqrt(bias_correction2) / bias_correction1`` with ``1.0 - beta ** self.update_step``.
* ``approx_V = torch.mul(exp_avg_sq_row.reshape(-1, 1), exp_avg_sq_col.reshape(1, -1))
  / (exp_avg_sq_row.sum())``
* ``norm_grad = self.project_back(exp_avg) / approx_V.sqrt().add_(group["eps"])``
* ``p.add_(norm_grad, alpha=-step_size)``
* ``if group["weight_decay"] > 0.0: p.add_(p, alpha=(-group["lr"] * group["weight_decay"]))``
  (decays the ALREADY-UPDATED weight, by the scheduled lr, not step_size).

So with P = project_back: W' = (W - lr sqrt(bc2)/bc1 P(m) / (sqrt(r c^T / sum r) + eps))
(1 - lr wd). Note ``scale`` multiplies both P(m) and sqrt(approx_V), so it cancels except
against eps.

Non-projected leaves (``SingleParameterAdamW(torch.optim.AdamW)``, eps=1e-6 from
``ProjFactor``): ``p.mul_(1 - lr * weight_decay)`` on the old weight first, then
``exp_avg.lerp_(grad, 1 - beta1)``, ``exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 -
beta2)``, ``denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)``,
``p.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)``. ``p.grad`` accumulates the
micro-batch gradients (a sum), same ``average`` option here.

Learning rate: each parameter has its own ``LambdaLR`` stepped after its optimizer step,
so the t-th step (1-based) uses ``init_lr * lr_lambda(t - 1)``. ``lr`` here is a float
or a callable of the 1-based t; pass ``lambda t: init_lr * lr_lambda(t - 1)`` to mirror it.

Differences from the code, all deliberate:

* Matrices are injected rather than drawn from ``torch.Generator().manual_seed(seed)``.
* Per-micro-batch redraw: ``update_step`` is only incremented in ``step``, so on a refresh
  step EVERY micro-batch's ``project`` call draws a fresh seed; with several micro-batches
  the projected micro gradients of that step use different matrices, and the last one is
  kept (used by ``project_back`` for the statistics and the update, and by the following
  steps). This library uses one matrix per accumulated step, and so does this reference:
  the one injected matrix projects all micro-batches of the step.
* Everything in float64 (the code projects in the parameter's dtype, e.g. bfloat16, and
  keeps the row/col statistics in fp32).
* ``granular_shape`` raises ValueError unless the reshape is exact. The code's own check
  in ``__init__`` tests the other direction (right: ``(self.r_num / self.factor)`` and
  ``(self.c_num * self.factor)`` integral, while ``project`` reshapes to
  ``(r_num * factor, c_num / factor)``; left likewise swapped) and ``int()`` truncates, so
  a non-divisible c fails there only at the reshape.

Checked against the code's classes (run in float64 with ``torch.set_default_dtype``, the
seeded draws replaced by the same injected matrices, through ``ProjFactor``'s hooks with
``loss / gradient_accumulation``): max relative weight error ~6e-16 over 13 steps, gap 5,
(48, 16) and (16, 48), c in {1, 4, 0.5}, rank in {1, 3}, scale 0.25, wd 0.1, 1 and 3
micro-batches.
"""

import math

import numpy as np


def side(R, C):
  """The code's ``multiplier_pos``: "right" if R >= C else "left"."""
  return "right" if R >= C else "left"


def _as_int(x, what):
  if x <= 0 or x != int(x):
    raise ValueError(f"{what} = {x} is not a positive integer")
  return int(x)


def granular_shape(R, C, c):
  """Shape the gradient is reshaped to: (R*c, C/c) on the right, (R/c, C*c) on the left."""
  if side(R, C) == "right":
    return _as_int(R * c, "R*c"), _as_int(C / c, "C/c")
  return _as_int(R / c, "R/c"), _as_int(C * c, "C*c")


def proj_shape(R, C, rank, c):
  """Shape of the random matrix: (rank, C/c) on the right, (R/c, rank) on the left."""
  a, b = granular_shape(R, C, c)
  return (rank, b) if side(R, C) == "right" else (a, rank)


def lowrank_shape(R, C, rank, c):
  """Shape of ``proj_grad`` / ``exp_avg``: (R*c, rank) on the right, (rank, C*c) on the left."""
  a, b = granular_shape(R, C, c)
  return (a, rank) if side(R, C) == "right" else (rank, b)


def project(G, M, c):
  """``project``: right ``G.reshape(R*c, C/c) @ M.T``; left ``M.T @ G.reshape(R/c, C*c)``."""
  G = np.asarray(G, np.float64)
  M = np.asarray(M, np.float64)
  R, C = G.shape
  gs = G.reshape(granular_shape(R, C, c))  # C order, as torch
  if side(R, C) == "right":
    return gs @ M.T
  return M.T @ gs


def project_back(Gs, M, c, rank, scale, shape):
  """``project_back``: right ``(Gs @ M / rank)``, left ``(M @ Gs / rank)``, reshaped to
  ``shape`` = (R, C), times ``scale``."""
  Gs = np.asarray(Gs, np.float64)
  M = np.asarray(M, np.float64)
  R, C = shape
  granular_shape(R, C, c)  # validates c
  if side(R, C) == "right":
    full = (Gs @ M / rank).reshape(R, C)
  else:
    full = (M @ Gs / rank).reshape(R, C)
  return full * scale


def _lr_at(lr, t):
  return float(lr(t)) if callable(lr) else float(lr)


def _as_list(grads, shape):
  if isinstance(grads, np.ndarray) and grads.ndim == len(shape):
    grads = [grads]
  gs = [np.asarray(g, np.float64) for g in grads]
  if not gs:
    raise ValueError("need at least one micro-batch gradient")
  for g in gs:
    assert g.shape == tuple(shape), (g.shape, shape)
  return gs


class RefProjFactor:
  """One (R, C) weight under ``SingleParameterRandomAdaFactor``.

  ``step(w, grads, matrix)`` -> the new weight. ``grads`` is a list of micro-batch
  gradients (R, C) (a single array is taken as a list of one); ``matrix`` (shape
  ``proj_shape(R, C, rank, c)``) is read only when ``needs_new_matrix()`` is True before
  the call (the 1st, (gap+1)-th, ... step) and ignored otherwise (may be None). The same
  matrix projects every micro-batch of the step (the code redraws per micro-batch on a
  refresh step; see the module docstring).
  """

  def __init__(self, shape, rank, c=1.0, *, lr=1e-3, b1=0.9, b2=0.999, eps=1e-6,
               weight_decay=0.0, scale=1.0, gap=100, correct_bias=True, average=False):
    self.R, self.C = (int(d) for d in shape)
    self.rank, self.c = int(rank), c
    self.lr, self.b1, self.b2, self.eps, self.wd = lr, b1, b2, eps, weight_decay
    self.scale, self.gap, self.correct_bias, self.average = float(scale), gap, correct_bias, average
    self.side = side(self.R, self.C)
    self.pshape = proj_shape(self.R, self.C, self.rank, c)
    self.update_step = 0
    self.matrix = None
    self.exp_avg = None
    self.exp_avg_sq_row = None
    self.exp_avg_sq_col = None
    self.proj_grad = None
    self.refreshed = False  # whether the last step read a new matrix

  def needs_new_matrix(self):
    """Whether the next ``step`` reads a new matrix (``update_step % gap == 0``)."""
    return self.update_step % self.gap == 0

  def _project(self, g):
    return project(g, self.matrix, self.c)

  def _project_back(self, x):
    return project_back(x, self.matrix, self.c, self.rank, self.scale, (self.R, self.C))

  def step(self, w, grads, matrix=None):
    shape = (self.R, self.C)
    w = np.asarray(w, np.float64)
    assert w.shape == shape, w.shape
    gs = _as_list(grads, shape)
    self.refreshed = self.needs_new_matrix()
    if self.refreshed:
      m = np.asarray(matrix, np.float64)
      assert m.shape == self.pshape, (m.shape, self.pshape)
      self.matrix = m.copy()

    # hook: proj_grad = project(g) per micro-batch, summed
    proj_grad = None
    for g in gs:
      pg = self._project(g)
      proj_grad = pg if proj_grad is None else proj_grad + pg
    if self.average:
      proj_grad = proj_grad / len(gs)
    self.proj_grad = proj_grad

    self.update_step += 1
    t = self.update_step
    if self.exp_avg is None:
      self.exp_avg = np.zeros_like(proj_grad)
      self.exp_avg_sq_row = np.zeros(self.R)
      self.exp_avg_sq_col = np.zeros(self.C)
    b1, b2 = self.b1, self.b2
    self.exp_avg = self.exp_avg * b1 + (1.0 - b1) * proj_grad
    pbg = self._project_back(proj_grad)
    self.exp_avg_sq_row = self.exp_avg_sq_row * b2 + (1.0 - b2) * (pbg ** 2).sum(axis=1)
    self.exp_avg_sq_col = self.exp_avg_sq_col * b2 + (1.0 - b2) * (pbg ** 2).sum(axis=0)
    lr = _lr_at(self.lr, t)
    step_size = lr
    if self.correct_bias:
      step_size = step_size * math.sqrt(1.0 - b2 ** t) / (1.0 - b1 ** t)
    approx_v = np.outer(self.exp_avg_sq_row, self.exp_avg_sq_col) / self.exp_avg_sq_row.sum()
    norm_grad = self._project_back(self.exp_avg) / (np.sqrt(approx_v) + self.eps)
    p = w - step_size * norm_grad
    if self.wd > 0.0:
      p = p + p * (-lr * self.wd)
    return p


class RefAdamW:
  """``SingleParameterAdamW`` = ``torch.optim.AdamW`` (eps 1e-6 as ``ProjFactor`` passes).

  ``step(w, grads)`` -> the new weight; ``grads`` a list of micro-batch gradients, summed
  (``average=True`` divides by their number).
  """

  def __init__(self, shape=None, *, lr=1e-3, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.0,
               average=False):
    self.shape = None if shape is None else tuple(int(d) for d in shape)
    self.lr, self.b1, self.b2, self.eps, self.wd = lr, b1, b2, eps, weight_decay
    self.average = average
    self.t = 0
    self.exp_avg = None
    self.exp_avg_sq = None

  def step(self, w, grads):
    w = np.asarray(w, np.float64)
    gs = _as_list(grads, w.shape if self.shape is None else self.shape)
    g = gs[0].copy()
    for x in gs[1:]:
      g = g + x
    if self.average:
      g = g / len(gs)
    self.t += 1
    t = self.t
    lr = _lr_at(self.lr, t)
    if self.exp_avg is None:
      self.exp_avg, self.exp_avg_sq = np.zeros_like(g), np.zeros_like(g)
    p = w * (1.0 - lr * self.wd)
    self.exp_avg = self.exp_avg + (g - self.exp_avg) * (1.0 - self.b1)  # lerp_
    self.exp_avg_sq = self.exp_avg_sq * self.b2 + (1.0 - self.b2) * g * g
    bc1 = 1.0 - self.b1 ** t
    bc2_sqrt = math.sqrt(1.0 - self.b2 ** t)
    denom = np.sqrt(self.exp_avg_sq) / bc2_sqrt + self.eps
    return p - (lr / bc1) * self.exp_avg / denom
