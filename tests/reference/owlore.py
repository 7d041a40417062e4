"""Float64 NumPy reference of OwLore (Li et al. 2024, arXiv 2405.18380).

Written from the authors' code, pixeli99/OwLore, not from this library:

* ``src/lmflow/pipeline/finetuner.py``, ``DynamicLayerActivationCallback``: on every
  step with ``global_step % interval_steps == 0`` (step 0 included) all decoder layers
  are frozen (``requires_grad = False``) and ``n_layers`` of them are drawn with
  ``np.random.choice(range(L), n_layers, replace=False, p=ratio / ratio.sum())`` and
  unfrozen. Embeddings, the final norm and the LM head are never frozen. The draw
  itself is injected by the caller here (JAX draws it).
* The ratios are the per-layer outlier ratios of OWL (``check_outlier_mean`` in
  luuyin/OWL): the scores of all linear sub-layers of a decoder layer concatenated,
  ``100 · #{A > M · mean(A)} / size(A)``; the authors cache them with ``M = 13``.
* ``galore_torch.GaLoreAdamW`` (Hugging Face AdamW) over all parameters: the attention
  and MLP matrices in GaLore groups (rank, ``update_proj_gap``, ``scale``, ``std``
  projection), the rest plain. A frozen parameter has no gradient and is skipped:
  its ``state["step"]``, moments and projector do not change. Per parameter, with
  ``step`` counted from 0 before its increment: a new projection matrix when
  ``step % update_proj_gap == 0`` (``std``: torch shape (m, n), m >= n → right,
  ``Vh[:r]``; else left, ``U[:, :r]``), moments kept; ``step += 1``; Adam moments of the
  projected gradient; ``N = exp_avg / (sqrt(exp_avg_sq) + eps)``; back-projection times
  ``scale``; ``p -= lr · sqrt(1 − b2^step) / (1 − b1^step) · N`` (weight decay 0, the
  default).

``global_step_count=True`` bias-corrects by the global step and ``frozen=False`` trains
every layer (negative controls).
"""

import math

import numpy as np


def owl_outlier_ratio(matrices, threshold):
  """OWL's ``check_outlier_mean`` of one layer: its matrices' |W| concatenated."""
  a = np.concatenate([np.abs(np.asarray(w, np.float64)).ravel() for w in matrices])
  return 100.0 * np.sum(a > np.mean(a) * threshold) / a.size


class RefParam:
  """One parameter of ``GaLoreAdamW`` (``rank=None``: plain AdamW), float64."""

  def __init__(self, rank=None, *, gap=1, scale=1.0, b1=0.9, b2=0.999, eps=1e-6):
    self.rank, self.gap, self.scale = rank, gap, scale
    self.b1, self.b2, self.eps = b1, b2, eps
    self.step = 0
    self.p = self.right = None
    self.m = self.v = None

  def update(self, g, lr, count=None):
    """The update of one step on torch-oriented gradient ``g``; ``count`` overrides
    the step used in the bias correction."""
    g = np.asarray(g, np.float64)
    if self.rank is not None:
      if self.step % self.gap == 0:
        u, _, vh = np.linalg.svd(g, full_matrices=False)
        # Kept moments make the singular vectors' signs matter; torch leaves them to
        # LAPACK. The library's documented convention: each left singular vector's
        # largest-magnitude entry positive.
        s = np.sign(u[np.argmax(np.abs(u), axis=0), np.arange(u.shape[1])])
        u, vh = u * s, vh * s[:, None]
        self.right = g.shape[0] >= g.shape[1]
        self.p = vh[:self.rank] if self.right else u[:, :self.rank]
      g = g @ self.p.T if self.right else self.p.T @ g
    if self.m is None:
      self.m, self.v = np.zeros_like(g), np.zeros_like(g)
    self.step += 1
    t = self.step if count is None else count
    self.m = self.b1 * self.m + (1 - self.b1) * g
    self.v = self.b2 * self.v + (1 - self.b2) * g * g
    n = self.m / (np.sqrt(self.v) + self.eps)
    if self.rank is not None:
      n = (n @ self.p if self.right else self.p @ n) * self.scale
    return -lr * math.sqrt(1 - self.b2 ** t) / (1 - self.b1 ** t) * n


class RefOwLore:
  """OwLore on ``layers[l][name]`` (per-layer parameters) and ``always[name]``.

  ``galore``: the names (in both) given GaLore groups. ``step(grads, active)`` takes
  torch-oriented gradients shaped like the parameters and the drawn layer indices
  (used on steps where ``global_step % interval == 0``) and returns the updates
  (zeros for frozen layers).
  """

  def __init__(self, num_layers, layer_names, always_names, galore, *, rank, gap,
               interval, lr, scale=1.0, global_step_count=False, frozen=True):
    def make(name):
      return RefParam(rank if name in galore else None, gap=gap, scale=scale)
    self.layers = [{n: make(n) for n in layer_names} for _ in range(num_layers)]
    self.always = {n: make(n) for n in always_names}
    self.interval, self.gap, self.lr = interval, gap, lr
    self.global_step_count, self.frozen = global_step_count, frozen
    self.global_step = 0
    self.active = []

  def _update(self, param, g):
    count = self.global_step + 1 if self.global_step_count else None
    return param.update(g, self.lr, count=count)

  def step(self, layer_grads, always_grads, active):
    if self.global_step % self.interval == 0:
      self.active = sorted(active)
    trained = self.active if self.frozen else range(len(self.layers))
    out_layers = [{n: np.zeros_like(np.asarray(g, np.float64)) for n, g in grads.items()}
                  for grads in layer_grads]
    for l in trained:
      for n, g in layer_grads[l].items():
        out_layers[l][n] = self._update(self.layers[l][n], g)
    out_always = {n: self._update(self.always[n], g) for n, g in always_grads.items()}
    self.global_step += 1
    return out_layers, out_always
