"""GUM: GaLore made unbiased by layer-wise sampling, with Muon in both branches.

Per period (``update_proj_gap`` steps) each projected leaf takes an SVD
basis ``P`` of its gradient, and ``k`` of its model's ``L`` layers are drawn
(``sampling.choose_layers``, the same draw for every leaf) to take a
full-rank step, ``q = k / L``. With ``NS`` the Newton–Schulz
orthogonalization (``newton_schulz``) and ``β`` the momentum:

- a layer not drawn (low-rank branch): ``R ← βR + PᵀG / (1 − q)``, update
  ``P · NS(R)``;
- a drawn layer (full-rank branch): ``F ← βF + (G − PPᵀG) / q``, update
  ``NS(F)``.

Two pieces plug into ``lowrank_project``: ``projector`` (the SVD basis plus
the period's draw) and ``combine`` (both momenta and both updates, in the
combine rule's state, so a layer in the full-rank branch leaves its
low-rank momentum untouched). The inner optimizer is ``optax.identity()``.

Where the draw lives: a stacked leaf ``(L, ..., n, m)`` (scanned layers,
first batch axis = layers) keeps the full-rank momentum of the ``k`` drawn
layers only, ``(k, ..., n, m)``; a leaf of one layer (unscanned blocks)
keeps one ``(n, m)`` buffer, used in the periods its layer is drawn, and its
layer is its ``lowrank_project`` group (``group_fn``: one label per layer).
The draw's key is ``fold_in(key(seed), step)`` on the refresh step, so every
leaf, whatever its group, sees the same layers.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from optax_lowrank import sampling
from optax_lowrank import shapes
from optax_lowrank.combine import CombineRule
from optax_lowrank.newton_schulz import MUON_COEFFS, newton_schulz
from optax_lowrank.projectors import matmul
from optax_lowrank.projectors import svd as svd_projector
from optax_lowrank.projectors.base import Projector


class GumBasis(NamedTuple):
  """The basis of one leaf for one period.

  Attributes:
    subspace: The SVD projector's basis (``P``).
    slots: int32 ``(s,)``: the drawn layers along a stacked leaf's first axis
      (``s = k``); ``(1,)`` zeros for a leaf of one layer.
    active: bool ``(s,)``: whether each slot takes a full-rank step this
      period (all for a stacked leaf; whether its layer was drawn for a leaf
      of one layer).
    period: int32 scalar: refreshes so far (a new period resets the full-rank
      momentum).
  """

  subspace: Any
  slots: jax.Array
  active: jax.Array
  period: jax.Array


class GumState(NamedTuple):
  """The combine rule's state of one leaf.

  Attributes:
    low: The low-rank momentum ``R``, ``down``'s layout, float32.
    full: The full-rank momentum ``F`` of the slots, ``(s, ..., n, m)``
      float32 (``s = k`` for a stacked leaf, 1 for a leaf of one layer).
    period: int32 scalar: the period ``full`` belongs to.
  """

  low: jax.Array
  full: jax.Array
  period: jax.Array


def _num_layers(info, num_layers: Optional[int]) -> int:
  """``L``: a stacked leaf's first batch axis, else ``num_layers``."""
  if info.batch_shape:
    return info.batch_shape[0]
  if num_layers is None:
    raise ValueError(
        "GUM: a leaf of one layer (no stacked layers axis) needs `num_layers` "
        "(the model's layer count) and a `group_fn` labelling each leaf with "
        "its layer")
  return num_layers


def _check_draw(full_rank_layers: int, num_layers: int) -> None:
  if not 0 < full_rank_layers < num_layers:
    raise ValueError(
        f"`full_rank_layers` must be in [1, L - 1] for L = {num_layers} "
        f"layers (q = k/L in (0, 1)), got {full_rank_layers}")


def projector(full_rank_layers: int, *, num_layers: Optional[int] = None,
              proj_type: str = "std", seed: int = 0) -> Projector:
  """GUM's basis: an SVD subspace and the period's full-rank layers.

  Args:
    full_rank_layers: ``k`` (the paper's ``γ``), layers drawn per period.
    num_layers: ``L`` for leaves of one layer each (unscanned blocks); a
      stacked leaf's ``L`` is its first batch axis.
    proj_type: The SVD side (``projectors.svd``).
    seed: Seed of the draws.

  Returns:
    A ``Projector`` whose basis is a ``GumBasis``.

  Example:
    >>> import optax, optax_lowrank
    >>> from optax_lowrank import unbiased as gum
    >>> tx = optax_lowrank.lowrank_project(
    ...     optax.identity(), rank=4, projector=gum.projector(1),
    ...     combine=gum.combine(1))

  References:
    Pan et al., `Unbiased Gradient Low-Rank Projection
    <https://arxiv.org/abs/2510.17802>`_, 2025.
  """
  svd = svd_projector(proj_type)

  def init(info, dtype):
    num = _num_layers(info, num_layers)
    _check_draw(full_rank_layers, num)
    s = full_rank_layers if info.batch_shape else 1
    return GumBasis(
        subspace=svd.init(info, dtype),
        slots=jnp.zeros((s,), jnp.int32),
        active=jnp.zeros((s,), bool),
        period=jnp.zeros([], jnp.int32),
    )

  def refresh(ctx, g, basis):
    key = jax.random.fold_in(jax.random.key(seed), ctx.step)
    if g.ndim > 2:  # stacked: the drawn layers of this leaf
      drawn = sampling.choose_layers(key, g.shape[0], full_rank_layers)
      slots = jnp.nonzero(drawn, size=full_rank_layers)[0].astype(jnp.int32)
      active = jnp.ones_like(basis.active)
    else:  # one layer: its group's entry of the draw
      drawn = sampling.choose_layers(key, num_layers, full_rank_layers)
      layer = ctx.group
      active = jnp.reshape(
          (layer < num_layers) & drawn[jnp.minimum(layer, num_layers - 1)],
          (1,))
      slots = basis.slots
    return GumBasis(svd.refresh(ctx, g, basis.subspace), slots, active,
                    basis.period + 1)

  def down(basis, g):
    return svd.down(basis.subspace, g)

  def up(basis, r):
    return svd.up(basis.subspace, r)

  return Projector(init, refresh, down, up)


def _whole_layers(x: jax.Array) -> jax.Array:
  """``x`` with its first (layers) axis unsharded, so slots can be gathered."""
  spec = shapes.explicit_spec(x)
  return x if spec is None else shapes.reshard_to(x, (None,) + tuple(spec[1:]))


def shape_scale(m: int, n: int, consistent_rms: Optional[float]) -> Any:
  """Muon's factor for an ``m × n`` update (of the full matrix).

  Args:
    m: Output size (rows of the references' ``G``).
    n: Input size.
    consistent_rms: ``c`` gives ``c · √max(m, n)`` (Liu et al.'s: updates
      of RMS about ``c``, like AdamW's, so one learning rate serves both; may
      be an array); ``None`` gives ``√max(1, m / n)`` (Keller Jordan's,
      ``optax.contrib.muon``'s default).

  Returns:
    The factor (a float, or an array for an array ``consistent_rms``).

  Example:
    >>> from optax_lowrank import unbiased
    >>> round(unbiased.shape_scale(64, 16, 0.2), 4)
    1.6
    >>> unbiased.shape_scale(64, 16, None)
    2.0

  References:
    Liu et al., `Muon is Scalable for LLM Training
    <https://arxiv.org/abs/2502.16982>`_, 2025.
  """
  if consistent_rms is None:
    return math.sqrt(max(1.0, m / n))
  return consistent_rms * math.sqrt(max(m, n))


def combine(full_rank_layers: int, *, num_layers: Optional[int] = None,
            proj_type: str = "std", beta: float = 0.95, ns_steps: int = 5,
            ns_coeffs: tuple[float, float, float] = MUON_COEFFS,
            eps: float = 1e-8,
            consistent_rms: Optional[float] = 0.2) -> CombineRule:
  """GUM's two branches: Muon on ``PᵀG`` or on ``G − PPᵀG``, debiased.

  Per layer of a leaf, with ``q = k / L``: not drawn, ``R ← βR + PᵀG/(1−q)``
  and ``U = P·NS(R)`` (``R`` left untouched while the layer is drawn);
  drawn, ``F ← βF + (G − PPᵀG)/q`` and ``U = NS(F)`` (``F`` from zero each
  period). Both are multiplied by ``scale · shape_scale(m, n,
  consistent_rms)``. Reads the full gradient; ignores the inner optimizer's
  output (use ``optax.identity()``).

  Args:
    full_rank_layers: ``k``, as given to ``projector``.
    num_layers: ``L`` for leaves of one layer, as given to ``projector``.
    proj_type: The SVD side, as given to ``projector``.
    beta: Momentum of both branches (no Nesterov, as the paper writes it).
    ns_steps: Newton–Schulz iterations.
    ns_coeffs: Newton–Schulz coefficients.
    eps: Added to the Frobenius norm before Newton–Schulz.
    consistent_rms: See ``shape_scale``.

  Returns:
    A ``CombineRule`` with ``GumState`` per leaf.

  Example:
    >>> from optax_lowrank import unbiased as gum
    >>> rule = gum.combine(2, beta=0.95)

  References:
    Pan et al., `Unbiased Gradient Low-Rank Projection
    <https://arxiv.org/abs/2510.17802>`_, 2025.
  """
  if isinstance(beta, (int, float)) and not 0.0 <= beta < 1.0:
    raise ValueError(f"`beta` must be in [0, 1), got {beta!r}")
  if (isinstance(ns_steps, bool) or not isinstance(ns_steps, int)
      or ns_steps < 1):
    raise ValueError(f"`ns_steps` must be a positive int, got {ns_steps!r}")
  if isinstance(consistent_rms, (int, float)) and not consistent_rms > 0:
    raise ValueError(
        f"`consistent_rms` must be positive or None, got {consistent_rms!r}")
  orthogonalize = lambda x: newton_schulz(x, ns_steps, ns_coeffs, eps)
  svd = svd_projector(proj_type)  # ``up`` of the slots' own bases

  def init(info):
    _check_draw(full_rank_layers, _num_layers(info, num_layers))
    batch, spec = info.batch_shape, info.spec
    side = matmul.side(proj_type, info.m, info.n, info.std_side)
    # The slots replace a stacked leaf's layers axis (or come in front of a
    # leaf of one layer), unsharded.
    slot_info = info._replace(
        batch_shape=(full_rank_layers if batch else 1,) + tuple(batch[1:]),
        spec=None if spec is None
        else (None,) + tuple(spec[1 if batch else 0:]))
    return GumState(
        low=info.zeros("rm" if side == "right" else "nr", jnp.float32),
        full=slot_info.zeros("nm", jnp.float32),
        period=jnp.zeros([], jnp.int32),
    )

  def apply(proj, basis, g, r, n, scale, state):
    del n
    *_, cols, rows = g.shape  # layout (batch..., n, m)
    stacked = g.ndim > 2
    q = full_rank_layers / (g.shape[0] if stacked else num_layers)
    expand = lambda x, like: x.reshape(x.shape + (1,) * (like.ndim - x.ndim))
    # Which layers of the leaf take the full-rank branch this period.
    if stacked:
      drawn = jnp.zeros((g.shape[0],), bool).at[basis.slots].set(basis.active)
    else:
      drawn = basis.active[0]

    # Step 1: the low-rank branch, R ← βR + PᵀG/(1−q), frozen where drawn.
    low = beta * state.low + r.astype(jnp.float32) / (1.0 - q)
    low = jnp.where(expand(drawn, low), state.low, low)
    low_rank_update = lambda low: shapes.reshard_like(
        proj.up(basis, orthogonalize(low)).astype(jnp.float32), g)

    # Step 2: the full-rank branch on the slots, F ← βF + (G − PPᵀG)/q.
    if stacked:
      take = lambda x: jnp.take(_whole_layers(x), basis.slots, axis=0)
      sub = jax.tree.map(take, basis.subspace)
      g_s, r_s = take(g), take(r)
    else:
      sub, g_s, r_s = basis.subspace, g, r
    residual = (g_s.astype(jnp.float32)
                - svd.up(sub, r_s).astype(jnp.float32)).reshape(
                    state.full.shape)
    old = jnp.where(basis.period == state.period, state.full, 0.0)
    full = jnp.where(expand(basis.active, old), beta * old + residual / q, old)

    # Step 3: Newton–Schulz where each branch runs. A stack orthogonalizes
    # every layer's R (the drawn ones' are overwritten) and the k slots'
    # F; a leaf of one layer takes one branch, under a lax.cond.
    if stacked:
      u = _whole_layers(low_rank_update(low)).at[basis.slots].set(
          orthogonalize(full))
    else:
      u = jax.lax.cond(
          drawn,
          lambda low, full: shapes.reshard_like(orthogonalize(full)[0], g),
          lambda low, full: low_rank_update(low),
          low, full)
    factor = scale * shape_scale(rows, cols, consistent_rms)
    return factor * u, GumState(low, full, basis.period)

  return CombineRule(init, apply)
