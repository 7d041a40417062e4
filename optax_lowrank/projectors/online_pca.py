"""Online Subspace Descent: the basis follows the gradient by online PCA steps."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Optional

import jax
import jax.numpy as jnp

from optax_lowrank import shapes
from optax_lowrank.inner import adam as adam_lib
from optax_lowrank.projectors import matmul
from optax_lowrank.projectors.base import Projector
from optax_lowrank.projectors.svd import (
    one_sided_like, one_sided_matrix, svd)



@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class OnlinePCABasis:
  """State of ``online_pca``.

  Attributes:
    basis: The basis used at this step (``RightBasis`` or ``LeftBasis``).
    next: The basis after this step's update (used from the next step on).
    mu: AdamW first moment of the basis matrix.
    nu: AdamW second moment.
    count: AdamW steps taken (int32).
  """

  basis: Any
  next: Any
  mu: jax.Array
  nu: jax.Array
  count: jax.Array


def reconstruction_error(
    p: jax.Array, g: jax.Array, side: str
) -> tuple[jax.Array, jax.Array]:
  """``‖G PᵀP − G‖²`` (right) or ``‖P Pᵀ G − G‖²`` (left), and its gradient in ``p``.

  ``g`` is ``Gᵀ`` in the parameter's layout ``(batch..., n, m)``, ``p`` the
  basis matrix (``(r, n)`` right, ``(m, r)`` left; orthonormal or not). With
  ``E`` the residual, the gradient is ``2(P Eᵀ G + P Gᵀ E)`` on the right and
  ``2(E Gᵀ P + G Eᵀ P)`` on the left. Written with explicit contractions so
  that a gradient sharded along either axis is never gathered.

  Returns:
    ``(error, grad)``: the squared error per matrix, ``(batch...)``, and its
    gradient, shaped like ``p``.
  """
  spec = shapes.explicit_spec(p)
  out = shapes.out_sharding(spec)
  if side == "right":  # g = Gᵀ (n, m), P (r, n): E = PᵀP g − g
    a = matmul.down_right(p, g)                      # P g, (r, m)
    e = matmul.up_right(p, a) - g                    # (n, m)
    pe = matmul.down_right(p, e)                     # P E, (r, m)
    grad = 2.0 * (jnp.einsum("...rm,...nm->...rn", a, e, out_sharding=out)
                  + jnp.einsum("...rm,...nm->...rn", pe, g, out_sharding=out))
  else:  # left: g (n, m), U = P (m, r): E = g U Uᵀ − g
    a = matmul.down_left(p, g)                       # g U, (n, r)
    e = matmul.up_left(p, a) - g                     # (n, m)
    eu = matmul.down_left(p, e)                      # E U, (n, r)
    grad = 2.0 * (jnp.einsum("...nm,...nr->...mr", g, eu, out_sharding=out)
                  + jnp.einsum("...nm,...nr->...mr", e, a, out_sharding=out))
  return jnp.sum(jnp.square(e), axis=(-2, -1)), grad


def online_pca(
    update_proj_gap: int,
    proj_type: str = "std",
    *,
    lr_ratio: Optional[Callable[[jax.Array], jax.Array]] = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
) -> Projector:
  """Online Subspace Descent: one AdamW step on the basis per update.

  The basis starts as GaLore's (exact SVD of the first gradient, step 0). From
  then on, every step uses the current basis ``P`` and then moves it by one
  AdamW step (torch's defaults: ``b1 = 0.9``, ``b2 = 0.999``, ``eps = 1e-8``,
  decoupled ``weight_decay = 0.01``) on the online-PCA loss
  ``‖Ĝ PᵀP − Ĝ‖²`` (``‖P Pᵀ Ĝ − Ĝ‖²`` on the left), ``Ĝ = G/‖G‖``, with
  learning rate ``lr_ratio(step) / update_proj_gap``: the reference code's
  ``1/update_proj_gap`` times the ratio of the optimizer's current to initial
  learning rate. As in the code, the step uses ``P`` before its update (the
  update is kept for the next step). Needs ``lowrank_project(...,
  update_proj_gap=1)``, so that the basis moves every step; this projector's
  own ``update_proj_gap`` only sets the basis learning rate.

  Args:
    update_proj_gap: GaLore's gap; the basis learning rate is its inverse.
    proj_type: ``std``, ``reverse_std``, ``left`` or ``right``.
    lr_ratio: ``step -> lr(step) / lr_peak`` of the model's optimizer, or
      ``None`` for a constant 1.
    b1: AdamW first-moment decay for the basis.
    b2: AdamW second-moment decay for the basis.
    eps: AdamW epsilon for the basis.
    weight_decay: AdamW decoupled weight decay for the basis.

  Returns:
    A ``Projector`` whose basis is an ``OnlinePCABasis``.

  Example:
    >>> import optax, optax_lowrank
    >>> from optax_lowrank.projectors import online_pca
    >>> tx = optax_lowrank.lowrank_project(
    ...     optax.scale_by_adam(), rank=4, update_proj_gap=1,
    ...     projector=online_pca(200))

  References:
    Liang et al., `Memory-Efficient LLM Training with Online Subspace Descent
    <https://arxiv.org/abs/2408.12857>`_, NeurIPS 2024; code:
    github.com/kyleliang919/Online-Subspace-Descent
    (``galore_projector.py``, ``proj_type="continuous"``).
  """
  if not isinstance(update_proj_gap, int) or update_proj_gap < 1:
    raise ValueError(
        f"`update_proj_gap` must be a positive int, got {update_proj_gap!r}")
  matmul.check_proj_type(proj_type)
  adam_lib.validate(b1, b2, eps)
  if not weight_decay >= 0.0:
    raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay!r}")
  exact = svd(proj_type)

  def init(info, dtype):
    basis = exact.init(info, jnp.float32)
    m = one_sided_matrix(basis)
    # Separate arrays (not one array twice), so the state can be donated.
    return OnlinePCABasis(basis, jax.tree.map(jnp.copy, basis),
                          jnp.zeros_like(m), jnp.zeros_like(m),
                          jnp.zeros([], jnp.int32))

  def first(ctx, g, state):
    basis = exact.refresh(ctx, g, state.basis)
    return dataclasses.replace(state, basis=basis,
                               next=jax.tree.map(jnp.copy, basis))

  def descend(ctx, g, state):
    step = ctx.step
    basis = state.next
    p = one_sided_matrix(basis)
    side = basis.side
    # The online-PCA loss ``‖Ĝ PᵀP − Ĝ‖²`` of the normalized gradient.
    norm = jnp.sqrt(jnp.sum(jnp.square(g), axis=(-2, -1), keepdims=True))
    _, grad = reconstruction_error(p, g / jnp.where(norm > 0, norm, 1.0), side)
    ratio = 1.0 if lr_ratio is None else jnp.asarray(lr_ratio(step), jnp.float32)
    lr = ratio / update_proj_gap
    count = state.count + 1
    mu = b1 * state.mu + (1.0 - b1) * grad
    nu = b2 * state.nu + (1.0 - b2) * jnp.square(grad)
    decayed = p * (1.0 - lr * weight_decay)
    denom = jnp.sqrt(nu) / jnp.sqrt(adam_lib.bias_correction(b2, count)) + eps
    new = decayed - lr / adam_lib.bias_correction(b1, count) * mu / denom
    return OnlinePCABasis(basis, one_sided_like(basis, new.astype(p.dtype)),
                          mu, nu, count)

  def refresh(ctx, g, state):
    def keep_sharding(branch):
      return lambda *args: jax.tree.map(shapes.reshard_like, branch(*args), state)
    return jax.lax.cond(ctx.step == 0, keep_sharding(first),
                        keep_sharding(descend), ctx, g, state)

  def down(state, g):
    return exact.down(state.basis, g)

  def up(state, r):
    return exact.up(state.basis, r)

  return Projector(init, refresh, down, up)
