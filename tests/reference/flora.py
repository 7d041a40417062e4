"""Float64 NumPy reference of Flora (Hao et al. 2024, arXiv 2402.03293), one 2-D weight.

Written from the authors' OPTAX code, BorealisAI/flora-opt
``flora_opt/optimizers/optax/flora.py`` (``flora``, ``scale_by_flora``), which chains
optax's own ``optax._src.factorized.scale_by_factored_rms`` — not from this library.
Orientation: the array as stored (Flax kernels are (in, out)); every rule below reads
``shape[0]`` / ``shape[-1]`` of that array. ``flora()`` builds, in this order
(``tx = tx[::-1]`` puts the second moment first), with ``t = count`` = 0, 1, 2, ...:

1. ``scale_by_factored_rms(factored, decay_rate=b2, epsilon=eps, min_dim_size_to_factor)``
   on the raw gradient G: ``rho = 1 - (t + 1) ** (-b2)`` (``_decay_rate_pow``: b2 is an
   EXPONENT, not an EMA rate; rho = 0 at t = 0); ``G2 = G**2 + eps``. Factored iff
   ``ndim >= 2`` and the second-largest dim >= ``min_dim_size_to_factor``, with
   ``d1, d0 = argsort(shape)[-2:]`` (d0 = largest axis):
   ``v_row = rho v_row + (1-rho) mean(G2, d0)``; ``v_col = rho v_col + (1-rho) mean(G2, d1)``;
   ``U = G * expand(v_row / mean(v_row), d0) ** -0.5 * expand(v_col, d1) ** -0.5``.
   Otherwise ``v = rho v + (1-rho) G2``; ``U = G * v ** -0.5``.
2. ``scale_by_flora(beta=b1, tau=rank, kappa)`` on U (the momentum accumulates the
   Adafactor-NORMALIZED update, not G). Compressed iff ``ndim == 2``, ``max(shape) <=
   4 min(shape)`` and ``min(shape) >= min_dim_size_to_factor``. Projection
   ``random_generate``: ``normal(key, s) / sqrt(min(s))``; ``s = (rank, shape[0])`` if
   ``shape[0] < shape[-1]`` (``down(X) = P @ X``, ``up(M) = P.T @ M``, M is (rank, n)),
   else ``s = (shape[-1], rank)`` (``down(X) = X @ P``, ``up(M) = M @ P.T``, M is (m, rank)).
   ``_maybe_switch_proj_fn``: when ``count % kappa == 0`` (t = 0, kappa, 2 kappa, ...),
   BEFORE adding the current U:
   ``data = down_project(dcomp.proj, up_project(dcomp.proj, dcomp.data))`` — the OLD key
   on both sides, i.e. ``M <- P_old P_old^T M`` (left) / ``M P_old^T P_old`` (right), not
   the paper's ``down(new, up(old, M))`` — then ``proj = next_rng_key(proj)``. Then
   ``M = b1 M + (1-b1) down(P, U)`` and the output is Nesterov-like:
   ``O = b1 up(P, M) + (1-b1) U`` (``m * beta + g * (1 - beta)`` in ``update_fn``).
   Not compressed: ``m = b1 m + (1-b1) U``; ``O = b1 m + (1-b1) U``. No bias correction.
3. ``clip_by_block_rms(clipping_threshold)``: ``O /= max(1, rms(O) / threshold)``.
4. ``scale_by_learning_rate(lr, flip_sign=False)``: ``O *= lr(t)``.
5. ``scale_by_param_block_rms()`` if ``multiply_by_parameter_scale``:
   ``O *= max(rms(W), 1e-3)`` (W = the weight before this update).
6. ``add_decayed_weights(weight_decay)`` if not None: ``O += wd W`` (not times lr).
7. ``scale(-1)``: update = -O.

Deviations of the reference code kept out of this float64 model: the momentum is stored
in bfloat16 (``mu_dtype``), U is cast to bfloat16 before ``down``, and the projection is
drawn in that dtype; optax computes ``rho`` in float32 (pass ``decay_rate_fn`` to mimic).
``transfer="paper"`` replaces step 2's transfer by ``M <- down(P_new, up(P_old, M))``
(the paper's Algorithm 2 and the authors' torch code); ``"optax"`` (default) is the code.
"""

import numpy as np

PARAM_SCALE_MIN = 1e-3  # optax scale_by_param_block_rms(min_scale=1e-3)


def decay_rate_pow(count, exponent):
  """optax ``_decay_rate_pow``: ``1 - (count + 1) ** -exponent`` (here in float64)."""
  return 1.0 - (count + 1.0) ** (-exponent)


def factored_dims(shape, factored, min_dim_size_to_factor):
  """optax ``_factored_dims``: (d1, d0) = (second-largest, largest) axis, or None."""
  if not factored or len(shape) < 2:
    return None
  sorted_dims = np.argsort(shape)
  if shape[sorted_dims[-2]] < min_dim_size_to_factor:
    return None
  return int(sorted_dims[-2]), int(sorted_dims[-1])


def is_compressed(shape, rank, min_dim_size_to_factor=128):
  """``scale_by_flora.should_factorize`` (``factored = tau is not None``)."""
  if rank is None or len(shape) != 2:
    return False
  if max(shape) > min(shape) * 4:  # "do not factorize embeddings"
    return False
  return min(shape) >= min_dim_size_to_factor


def proj_shape(shape, rank):
  """Shape of the projection matrix for a (shape[0], shape[-1]) weight."""
  return (rank, shape[0]) if shape[0] < shape[-1] else (shape[-1], rank)


def sample_projection(rng, shape, rank):
  """A matrix distributed as ``random_generate``: N(0, 1) / sqrt(min(proj_shape))."""
  s = proj_shape(shape, rank)
  return rng.standard_normal(s) / np.sqrt(min(s))


def down(p, x, shape):
  return p @ x if shape[0] < shape[-1] else x @ p


def up(p, m, shape):
  return p.T @ m if shape[0] < shape[-1] else m @ p.T


def _rms(x):
  return float(np.sqrt(np.mean(np.square(x))))


class RefFlora:
  """One 2-D weight under optax ``flora(...)``. ``step(grad, weight, proj_matrix)``
  returns new_weight - weight (float64).

  ``proj_matrix``: the matrix the reference holds from this step on, i.e.
  ``random_generate(key_k, proj_shape(shape, rank))`` with ``key_k`` the k-th
  ``next_rng_key`` of the leaf's key; shape ``(rank, m)`` if m < n else ``(n, rank)``.
  Read only at t % kappa == 0 (t = 0 included), ignored otherwise and for leaves that
  are not compressed. Defaults are those of ``flora()`` (its ``tau`` is ``rank``).
  """

  def __init__(self, shape, rank=4, *, kappa=1000, b1=0.9, b2=0.99, eps=1e-30,
               clipping_threshold=1.0, multiply_by_parameter_scale=True,
               weight_decay=None, min_dim_size_to_factor=128,
               factorized_second_moment=True, lr=1e-3, transfer="optax",
               decay_rate_fn=None):
    if len(shape) != 2:
      raise ValueError("one 2-D weight")
    if transfer not in ("optax", "paper"):
      raise ValueError(transfer)
    self.shape, self.rank, self.kappa = tuple(shape), rank, kappa
    self.b1, self.b2, self.eps = b1, b2, eps
    self.clip, self.mbps, self.wd = clipping_threshold, multiply_by_parameter_scale, weight_decay
    self.lr = lr if callable(lr) else (lambda t, _lr=lr: _lr)
    self.transfer = transfer
    self.decay_rate_fn = decay_rate_fn or decay_rate_pow
    self.fdims = factored_dims(self.shape, factorized_second_moment, min_dim_size_to_factor)
    self.compressed = is_compressed(self.shape, rank, min_dim_size_to_factor)
    self.count = 0
    if self.fdims is not None:
      d1, d0 = self.fdims
      self.v_row = np.zeros(self.shape[d1])  # shape with axis d0 removed
      self.v_col = np.zeros(self.shape[d0])  # shape with axis d1 removed
    else:
      self.v = np.zeros(self.shape)
    m, n = self.shape
    if self.compressed:
      self.mom = np.zeros((rank, n) if m < n else (m, rank))
    else:
      self.mom = np.zeros(self.shape)
    self.proj = None  # P in use; None before step 0 (the init key's matrix multiplies M = 0)

  def second_moment(self, g):
    """Step 1: optax ``scale_by_factored_rms`` on the raw gradient."""
    rho = self.decay_rate_fn(self.count, self.b2)
    g2 = np.square(g) + self.eps
    if self.fdims is not None:
      d1, d0 = self.fdims
      self.v_row = rho * self.v_row + (1.0 - rho) * g2.mean(axis=d0)
      self.v_col = rho * self.v_col + (1.0 - rho) * g2.mean(axis=d1)
      reduced_d1 = d1 - 1 if d1 > d0 else d1
      row_col_mean = self.v_row.mean(axis=reduced_d1, keepdims=True)
      row_factor = (self.v_row / row_col_mean) ** -0.5
      col_factor = self.v_col ** -0.5
      return g * np.expand_dims(row_factor, d0) * np.expand_dims(col_factor, d1)
    self.v = rho * self.v + (1.0 - rho) * g2
    return g * self.v ** -0.5

  def momentum(self, u, proj_matrix):
    """Step 2: ``scale_by_flora`` on the normalized update U."""
    b1, s = self.b1, self.shape
    if not self.compressed:
      self.mom = b1 * self.mom + (1.0 - b1) * u
      return b1 * self.mom + (1.0 - b1) * u
    if self.count % self.kappa == 0:
      if proj_matrix is None:
        raise ValueError(f"step {self.count}: the projection is resampled; pass proj_matrix")
      new = np.asarray(proj_matrix, np.float64)
      if new.shape != proj_shape(s, self.rank):
        raise ValueError(f"proj_matrix {new.shape} != {proj_shape(s, self.rank)}")
      if self.proj is not None:
        target = self.proj if self.transfer == "optax" else new
        self.mom = down(target, up(self.proj, self.mom, s), s)
      self.proj = new
    self.mom = b1 * self.mom + (1.0 - b1) * down(self.proj, u, s)
    return b1 * up(self.proj, self.mom, s) + (1.0 - b1) * u

  def step(self, grad, weight, proj_matrix=None):
    g = np.asarray(grad, np.float64)
    w = np.asarray(weight, np.float64)
    if g.shape != self.shape or w.shape != self.shape:
      raise ValueError(f"expected {self.shape}, got grad {g.shape}, weight {w.shape}")
    t = self.count
    o = self.momentum(self.second_moment(g), proj_matrix)
    if self.clip is not None:
      o = o / max(1.0, _rms(o) / self.clip)
    o = self.lr(t) * o
    if self.mbps:
      o = o * max(_rms(w), PARAM_SCALE_MIN)
    if self.wd is not None:
      o = o + self.wd * w
    self.count += 1
    return -o
