"""When a leaf renews its subspace, and how much of it it keeps.

``every`` is the schedule ``lowrank_project`` runs; ``lazy`` (Q-GaLore) and
``adaptive_rank`` (AdaRankGrad) wrap a projector, keeping per-matrix state
(its own gap, its own rank) in the basis, so that they compose with any
SVD-type projector and need nothing from the core. ``on_convergence``
(AdaRankGrad) replaces the schedule: it decides from the gradient, every
step and per matrix, through the projector's ``due`` hook.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from optax_lowrank import shapes
from optax_lowrank.projectors.base import Projector, check_wrappable
from optax_lowrank.projectors.svd import LeftBasis, RightBasis

# refresh(step, leaf_index, num_leaves) -> bool scalar
RefreshSchedule = Callable[[jax.Array, int, int], jax.Array]


def every(update_proj_gap: int, *, stagger: bool = False) -> RefreshSchedule:
  """Refresh at step 0, then every ``update_proj_gap`` steps.

  With ``stagger``, projected leaf ``i`` of ``k`` is shifted by
  ``i * gap // k`` steps, so the refreshes (and their SVDs) are spread over
  the gap instead of all landing on one step. Every leaf still refreshes at
  step 0, since it has no basis before.

  Args:
    update_proj_gap: Steps between two refreshes of a leaf (positive int).
    stagger: Whether to spread leaves over the gap (deterministic).

  Returns:
    ``refresh(step, leaf_index, num_leaves) -> bool`` array.

  References:
    Zhao et al., `GaLore <https://arxiv.org/abs/2403.03507>`_, 2024 (the
    schedule ``iter % update_proj_gap == 0`` of galore-torch).
  """
  if not isinstance(update_proj_gap, int) or update_proj_gap < 1:
    raise ValueError(
        f"`update_proj_gap` must be a positive int, got {update_proj_gap!r}"
    )

  def refresh(step, leaf_index, num_leaves):
    offset = (leaf_index * update_proj_gap) // num_leaves if stagger else 0
    shifted = step - offset
    return (step == 0) | ((shifted >= 0) & (shifted % update_proj_gap == 0))

  return refresh


def _first_vector(basis) -> jax.Array:
  """The leading singular vector of an SVD-type basis, ``(batch..., length)``."""
  if isinstance(basis, RightBasis):
    return basis.vh[..., 0, :]
  if isinstance(basis, LeftBasis):
    return basis.u[..., :, 0]
  raise ValueError(
      "lazy refresh needs an SVD-type basis (projectors.svd or "
      f"randomized_svd with proj_type other than 'full'), got {type(basis)}"
  )


def _per_matrix(mask: jax.Array, leaf: jax.Array) -> jax.Array:
  """``mask`` (batch...) broadcast against a basis leaf (batch..., p, q)."""
  return mask.reshape(mask.shape + (1,) * (leaf.ndim - mask.ndim))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LazyBasis:
  """State of ``lazy``: the wrapped basis and, per matrix, its own refresh gap.

  Attributes:
    basis: The wrapped projector's basis.
    gap: Current refresh gap of each matrix (int32, ``(batch...)``).
    similarities: The last ``queue_size`` cosine similarities between
      consecutive leading singular vectors, newest last (``(batch..., q)``).
    count: How many of them are filled (int32, ``(batch...)``).
    previous: Leading singular vector of the last refresh (``(batch..., l)``).
    calls: How many times ``lowrank_project`` has asked for a refresh
      (int32): ``calls · update_proj_gap`` is the leaf's step on its own
      (possibly staggered) schedule.
  """

  basis: Any
  gap: jax.Array
  similarities: jax.Array
  count: jax.Array
  previous: jax.Array
  calls: jax.Array


def lazy(
    projector: Projector,
    update_proj_gap: int,
    *,
    cos_threshold: float = 0.4,
    queue_size: int = 5,
    gamma: int = 2,
) -> Projector:
  """Q-GaLore's lazy subspace refresh: a stable subspace is renewed less often.

  Each matrix keeps its own gap, starting at ``update_proj_gap``. At every
  refresh the cosine similarity between the new and the previous leading
  singular vector joins a queue of the last ``queue_size``; once the queue is
  full and its mean reaches ``cos_threshold``, the gap is multiplied by
  ``gamma`` (again at each later refresh while that holds, as in the code). A
  matrix refreshes on steps that are multiples of its gap; ``lowrank_project``
  asks on multiples of ``update_proj_gap`` (give it the same gap), and the
  SVD runs only when some matrix of the leaf is due. Steps are counted on the
  leaf's own schedule (``calls · update_proj_gap``), which is the global
  step without ``stagger`` and the step less the leaf's offset with it.

  The similarity is signed, as in the code; our SVD signs are deterministic
  (``projectors.svd``), where torch's are not. Use it with
  ``on_refresh="keep"`` (Q-GaLore) or ``rotate``: ``lowrank_project`` sees a
  refresh on every multiple of ``update_proj_gap``, and ``reset`` would reset
  moments that a skipped matrix still uses.

  Args:
    projector: An SVD-type projector (``projectors.svd`` or
      ``randomized_svd``, not ``proj_type="full"``).
    update_proj_gap: The initial gap (and ``lowrank_project``'s).
    cos_threshold: Mean similarity above which the gap grows.
    queue_size: How many consecutive similarities are averaged.
    gamma: Factor by which the gap grows (an int >= 2).

  Returns:
    A ``Projector`` whose basis is a ``LazyBasis``.

  Example:
    >>> import optax, optax_lowrank
    >>> from optax_lowrank import projectors, schedules
    >>> tx = optax_lowrank.lowrank_project(
    ...     optax.scale_by_adam(), rank=4, update_proj_gap=50,
    ...     projector=schedules.lazy(projectors.svd(), 50))

  References:
    Zhang et al., `Q-GaLore: Quantized GaLore with INT4 Projection and
    Layer-Adaptive Low-Rank Gradients <https://arxiv.org/abs/2407.08296>`_,
    2024; code: github.com/VITA-Group/Q-GaLore
    (``q_galore_projector.py``).
  """
  check_wrappable(projector, "schedules.lazy")
  if not isinstance(update_proj_gap, int) or update_proj_gap < 1:
    raise ValueError(
        f"`update_proj_gap` must be a positive int, got {update_proj_gap!r}")
  if not isinstance(queue_size, int) or queue_size < 1:
    raise ValueError(f"`queue_size` must be a positive int, got {queue_size!r}")
  if not isinstance(gamma, int) or gamma < 2:
    raise ValueError(f"`gamma` must be an int >= 2, got {gamma!r}")
  if isinstance(cos_threshold, (int, float)) and not (
      -1.0 <= cos_threshold <= 1.0):  # arrays (inject_hyperparams) pass
    raise ValueError(
        f"`cos_threshold` must be in [-1, 1], got {cos_threshold!r}")

  def init(info, dtype):
    basis = projector.init(info, dtype)
    count = info.zeros("", jnp.int32)  # (batch...), sharded like the stack
    batch_spec = None if info.spec is None else (
        *info.spec[:len(info.batch_shape)], None)
    return LazyBasis(
        basis=basis,
        gap=count + update_proj_gap,
        similarities=jnp.zeros(
            info.batch_shape + (queue_size,), jnp.float32,
            out_sharding=shapes.out_sharding(batch_spec)),
        count=count,
        previous=jnp.zeros_like(_first_vector(basis), jnp.float32),
        calls=jnp.zeros([], jnp.int32),
    )

  def refresh(ctx, g, state):
    due = (state.calls * update_proj_gap) % state.gap == 0

    def renew(g, state):
      new = projector.refresh(ctx, g, state.basis)
      first = _first_vector(new).astype(jnp.float32)
      norms = (jnp.linalg.norm(first, axis=-1)
               * jnp.linalg.norm(state.previous, axis=-1))
      cos = jnp.sum(first * state.previous, axis=-1) / jnp.where(
          norms > 0, norms, 1.0)
      has_previous = norms > 0
      pushed = jnp.concatenate(
          [state.similarities[..., 1:], cos[..., None]], axis=-1)
      push = due & has_previous
      similarities = jnp.where(push[..., None], pushed, state.similarities)
      count = jnp.where(push, jnp.minimum(state.count + 1, queue_size),
                        state.count)
      stable = (count == queue_size) & (
          jnp.mean(similarities, axis=-1) >= cos_threshold)
      gap = jnp.where(push & stable, state.gap * gamma, state.gap)
      basis = jax.tree.map(
          lambda n, o: jnp.where(_per_matrix(due, o), n.astype(o.dtype), o),
          new, state.basis)
      previous = jnp.where(due[..., None], first, state.previous)
      return jax.tree.map(
          shapes.reshard_like,
          LazyBasis(basis, gap, similarities, count, previous, state.calls),
          state)

    state = jax.lax.cond(jnp.any(due), renew, lambda g, s: s, g, state)
    return dataclasses.replace(state, calls=state.calls + 1)

  def down(state, g):
    return projector.down(state.basis, g)

  def up(state, r):
    return projector.up(state.basis, r)

  return Projector(init, refresh, down, up)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AdaptiveRankBasis:
  """State of ``adaptive_rank``: the wrapped basis at the maximum rank and the
  rank in use per matrix (directions beyond it are zeroed)."""

  basis: Any
  rank: jax.Array  # int32 (batch...)


def adaptive_rank(projector: Projector, threshold: float = 0.9) -> Projector:
  """AdaRankGrad-style adaptive rank: the smallest rank capturing ``threshold``.

  The rule (the paper states the idea, its code is not public): at each
  refresh the wrapped projector finds a basis at the maximum rank ``r`` (the
  ``rank`` of ``lowrank_project``, ordered by importance as SVD bases are);
  with ``eᵢ = ‖down(G)ᵢ‖²`` the energy of the gradient along direction ``i``,
  the matrix keeps the smallest ``k`` with ``Σ_{i<k} eᵢ ≥ threshold·‖G‖²``
  (``k = r`` if none does), never more than its previous ``k``: ranks only
  decrease, as the gradient's effective rank does during training. Directions
  ``≥ k`` are zeroed in the basis, so shapes stay static (state is sized for
  ``r``) and the zeroed coordinates contribute nothing to the update.

  Args:
    projector: A projector whose basis vectors are ordered by importance
      (``projectors.svd``, ``randomized_svd``; not ``proj_type="full"``).
    threshold: Fraction of ``‖G‖²`` to capture, in (0, 1].

  Returns:
    A ``Projector`` whose basis is an ``AdaptiveRankBasis``.

  Example:
    >>> import optax, optax_lowrank
    >>> from optax_lowrank import projectors, schedules
    >>> tx = optax_lowrank.lowrank_project(
    ...     optax.scale_by_adam(), rank=16,
    ...     projector=schedules.adaptive_rank(projectors.svd(), 0.9))

  References:
    Refael et al., `AdaRankGrad: Adaptive Gradient-Rank and Moments for
    Memory-Efficient LLMs Training and Fine-Tuning
    <https://arxiv.org/abs/2410.17881>`_, ICLR 2025.
  """
  check_wrappable(projector, "schedules.adaptive_rank")
  if isinstance(threshold, (int, float)) and not 0.0 < threshold <= 1.0:
    # Arrays (optax.inject_hyperparams) are not checked.
    raise ValueError(f"`threshold` must be in (0, 1], got {threshold!r}")

  def masked(basis, keep):
    """Zeroes the directions ``i >= keep`` (``keep``: (batch...))."""
    if isinstance(basis, RightBasis):
      r = basis.vh.shape[-2]
      on = jnp.arange(r) < keep[..., None]
      return RightBasis(basis.vh * on[..., :, None].astype(basis.vh.dtype))
    if isinstance(basis, LeftBasis):
      r = basis.u.shape[-1]
      on = jnp.arange(r) < keep[..., None]
      return LeftBasis(basis.u * on[..., None, :].astype(basis.u.dtype))
    raise ValueError(
        "adaptive_rank needs an SVD-type basis (projectors.svd or "
        f"randomized_svd, not proj_type='full'), got {type(basis)}")

  def init(info, dtype):
    basis = projector.init(info, dtype)
    return AdaptiveRankBasis(basis, info.zeros("", jnp.int32) + info.rank)

  def refresh(ctx, g, state):
    new = projector.refresh(ctx, g, state.basis)
    r_axis = -1 if isinstance(new, LeftBasis) else -2
    energy = jnp.sum(jnp.square(projector.down(new, g)),
                     axis=-2 if r_axis == -1 else -1)  # (batch..., r)
    total = jnp.sum(jnp.square(g), axis=(-2, -1))
    captured = jnp.cumsum(energy, axis=-1) >= threshold * total[..., None]
    r = energy.shape[-1]
    k = jnp.where(jnp.any(captured, axis=-1),
                  jnp.argmax(captured, axis=-1) + 1, r).astype(jnp.int32)
    k = jnp.minimum(shapes.reshard_like(k, state.rank), state.rank)
    return jax.tree.map(shapes.reshard_like,
                        AdaptiveRankBasis(masked(new, k), k), state)

  def down(state, g):
    return projector.down(state.basis, g)

  def up(state, r):
    return projector.up(state.basis, r)

  return Projector(init, refresh, down, up)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ConvergenceBasis:
  """State of ``on_convergence``: the wrapped basis and each matrix's switch.

  Attributes:
    basis: The wrapped projector's basis.
    switched_at: The step at which each matrix last renewed its subspace
      (int32, ``(batch...)``; ``-1`` before the first).
  """

  basis: Any
  switched_at: jax.Array


def on_convergence(
    projector: Projector,
    switch_threshold: float,
    max_gap: int,
) -> Projector:
  """AdaRankGrad's switch: a new subspace once the current one has converged.

  Each matrix keeps its subspace while the gradient still has weight in it:
  it switches at the first step where ``‖down(basis, G)‖_F ≤
  switch_threshold`` (the optimisation inside the subspace has converged),
  or once it has taken ``max_gap`` steps in it, and at step 0. The decision
  is made every step, per matrix, inside the compiled update (the
  projector's ``due`` hook; no host round trip): the leaf's ``lax.cond`` runs
  the wrapped ``refresh`` when any of its matrices is due, and only the due
  matrices take the new basis. The step of each matrix's last switch is
  kept in the state, so the decision is checkpointed with it.

  With ``switch_threshold=0`` (and a gradient never exactly zero in the
  subspace) this is GaLore's schedule: a switch every ``max_gap`` steps.

  Args:
    projector: A projector whose basis holds one entry per matrix (SVD-type
      bases, ``adaptive_rank``); one key or one choice for a whole stacked
      leaf cannot switch per matrix and is refused at ``init``.
    switch_threshold: ``ς``, the Frobenius norm of the projected gradient at
      or below which a matrix switches (non-negative; may be an array).
    max_gap: ``T``, the most steps a matrix stays in one subspace.

  Returns:
    A ``Projector`` with a ``due`` hook, whose basis is a
    ``ConvergenceBasis``.

  Example:
    >>> import optax, optax_lowrank
    >>> from optax_lowrank import projectors, schedules
    >>> tx = optax_lowrank.lowrank_project(
    ...     optax.scale_by_adam(), rank=4,
    ...     projector=schedules.on_convergence(projectors.svd(), 1e-3, 200))

  References:
    Refael et al., `AdaRankGrad: Adaptive Gradient-Rank and Moments for
    Memory-Efficient LLMs Training and Fine-Tuning
    <https://arxiv.org/abs/2410.17881>`_, ICLR 2025.
  """
  check_wrappable(projector, "schedules.on_convergence")
  if not isinstance(max_gap, int) or isinstance(max_gap, bool) or max_gap < 1:
    raise ValueError(f"`max_gap` must be a positive int, got {max_gap!r}")
  if isinstance(switch_threshold, bool) or (
      isinstance(switch_threshold, (int, float))
      and not 0.0 <= switch_threshold < float("inf")):
    # Arrays (optax.inject_hyperparams) are not checked.
    raise ValueError(
        f"`switch_threshold` must be a non-negative finite number, got "
        f"{switch_threshold!r}")

  def init(info, dtype):
    basis = projector.init(info, dtype)
    batch = info.batch_shape
    for leaf in jax.tree.leaves(basis):
      if leaf.shape[:len(batch)] != batch:
        raise ValueError(
            "on_convergence switches each matrix on its own, so the wrapped "
            "basis needs one entry per matrix of the stack "
            f"{batch}; it has a leaf of shape {leaf.shape} (a key or one "
            "choice for the whole leaf). Use an SVD-type projector.")
    return ConvergenceBasis(basis, info.zeros("", jnp.int32) - 1)

  def due(step, r, state):
    r = r.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(r), axis=(-2, -1)))
    norm = shapes.reshard_like(norm, state.switched_at)
    return ((state.switched_at < 0)
            | (step - state.switched_at >= max_gap)
            | (norm <= switch_threshold))

  def refresh(ctx, g, state):
    switch = ctx.due
    if switch is None:  # called without the hook (``lowrank_project`` asks)
      switch = due(ctx.step, projector.down(state.basis, g), state)
    new = projector.refresh(ctx, g, state.basis)
    basis = jax.tree.map(
        lambda n, o: jnp.where(_per_matrix(switch, o), n.astype(o.dtype), o),
        new, state.basis)
    switched_at = jnp.where(switch, ctx.step.astype(jnp.int32),
                            state.switched_at)
    return jax.tree.map(shapes.reshard_like,
                        ConvergenceBasis(basis, switched_at), state)

  def down(state, g):
    return projector.down(state.basis, g)

  def up(state, r):
    return projector.up(state.basis, r)

  return Projector(init, refresh, down, up, due=due)
