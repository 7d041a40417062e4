"""Gradient accumulation in the subspace: ``optax.MultiSteps`` for low-rank methods.

With ``k`` micro-batches per step, ``optax.MultiSteps`` keeps a full-size
running mean of the gradients. Projection is linear, so a low-rank method can
keep the mean of the *projected* micro-gradients instead: ``down(B, ΣGᵢ)/k =
Σ down(B, Gᵢ)/k`` for the step's basis ``B``. ``MultiSteps`` here does that
for every ``lowrank_project`` inside the wrapped optimizer (through
``optax.chain``, ``optax.masked``, ``optax.partition``,
``optax.inject_hyperparams``, ...): projected leaves are accumulated at their
projected size, the others at full size, and the optimizer runs once per ``k``
micro-batches on the mean.

Protocol: each micro-batch calls the wrapped optimizer with the extra argument
``core.ACCUMULATION_ARG`` set to ``AccumulationStep("project", first)``; each
``lowrank_project`` then refreshes its subspace if the step is due for one
(only on the first micro-batch, from that micro-batch's gradient), projects,
and hands the projected gradients back in ``LowRankState.projected``; nothing
else of that call is kept, so XLA removes the rest of the optimizer from it.
The last micro-batch then calls it with ``AccumulationStep("apply")`` and
the means.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_lowrank import core


class MultiStepsState(NamedTuple):
  """State of ``MultiSteps``.

  Attributes:
    mini_step: Micro-batches accumulated in the current step (int32).
    gradient_step: Optimizer steps taken (int32).
    inner_opt_state: The wrapped optimizer's state.
    acc_grads: Running mean of the gradients of leaves no ``lowrank_project``
      projects (``optax.MaskedNode`` at projected leaves).
    acc_projected: For each ``lowrank_project`` in the wrapped optimizer (in
      the order of its state), the running mean of its projected gradients,
      a tree like the parameters with ``optax.MaskedNode`` where it does not
      project.
  """

  mini_step: jax.Array
  gradient_step: jax.Array
  inner_opt_state: Any
  acc_grads: Any
  acc_projected: tuple[Any, ...]


def _is_lowrank(x) -> bool:
  return isinstance(x, core.LowRankState)


def _lowrank_states(state) -> list[core.LowRankState]:
  return [x for x in jax.tree.leaves(state, is_leaf=_is_lowrank)
          if _is_lowrank(x)]


def _replace_lowrank_states(state, new_states):
  it = iter(new_states)
  return jax.tree.map(lambda x: next(it) if _is_lowrank(x) else x, state,
                      is_leaf=_is_lowrank)


def _running_mean(acc, x, n):
  return (acc + (x.astype(acc.dtype) - acc) / (n + 1)).astype(acc.dtype)


class MultiSteps:
  """Accumulates ``k`` micro-batches per step, projected leaves in their subspace.

  Same calling convention as ``optax.MultiSteps``: ``update`` returns zero
  updates on the first ``k − 1`` micro-batches and the wrapped optimizer's
  update for the mean gradient on the ``k``-th. Leaves projected by a
  ``lowrank_project`` are accumulated at projected size (``down(B, Gᵢ)``,
  summed into a running mean), so no full-size gradient accumulator exists
  for them; the result equals the wrapped optimizer applied to the mean
  gradient, with the step's subspace ``B``. On a step due for a refresh,
  ``B`` is found from the first micro-batch's gradient (SVD projectors) or
  drawn once for the whole step (random projectors).

  Needs combine rules that build the update from the projected gradient
  alone (``back_project``: GaLore; ``projfactor``: VLoRP); rules that read
  the full gradient (APOLLO, Fira, FRUGAL, Flora) raise at ``init``: use
  ``optax.MultiSteps`` for them. Transforms placed before a
  ``lowrank_project`` in a chain see each micro-gradient, not the mean.

  Args:
    opt: The optimizer, any ``optax`` transformation (with or without
      ``lowrank_project`` inside; without, this is ``optax.MultiSteps``).
    every_k_schedule: ``k``, the number of micro-batches per step (a
      positive int).
    accumulator_dtype: dtype of the full-size accumulators; projected ones
      keep the dtype of the projected gradient.

  Example:
    >>> import jax.numpy as jnp, optax_lowrank
    >>> params = {"w": jnp.ones((64, 32))}
    >>> opt = optax_lowrank.MultiSteps(
    ...     optax_lowrank.vlorp(1e-3, rank=1, granularity=8), every_k_schedule=4)
    >>> state = opt.init(params)
    >>> for _ in range(4):
    ...   updates, state = opt.update(params, state, params)
    >>> bool(opt.has_updated(state))
    True

  References:
    Wang et al., `Memory-Efficient LLM Training by Various-Grained Low-Rank
    Projection of Gradients <https://arxiv.org/abs/2505.01744>`_, ICML 2025
    (ProjFactor under gradient accumulation).
  """

  def __init__(
      self,
      opt: optax.GradientTransformation,
      every_k_schedule: int,
      accumulator_dtype: Any = jnp.float32,
  ):
    if (isinstance(every_k_schedule, bool)
        or not isinstance(every_k_schedule, int) or every_k_schedule < 1):
      raise ValueError(
          f"`every_k_schedule` must be a positive int, got "
          f"{every_k_schedule!r}"
      )
    self._opt = optax.with_extra_args_support(opt)
    self._k = every_k_schedule
    self._accumulator_dtype = jnp.dtype(accumulator_dtype)

  @property
  def inner_opt(self) -> optax.GradientTransformationExtraArgs:
    return self._opt

  def _project(self, grads, opt_state, params, first, extra_args):
    """Each ``lowrank_project``'s projected gradients and refreshed states."""
    _, state = self._opt.update(
        grads, opt_state, params,
        **extra_args,
        **{core.ACCUMULATION_ARG: core.AccumulationStep("project", first)},
    )
    return _lowrank_states(state)

  def init(self, params) -> MultiStepsState:
    """Initial state; accumulators are shaped by one traced projection."""
    opt_state = self._opt.init(params)
    zeros = optax.tree.zeros_like(params)
    lowrank = self._project(zeros, opt_state, params, jnp.bool_(False), {})
    treedef = jax.tree.structure(params)
    acc_projected, projected_leaf = [], [False] * treedef.num_leaves
    for s in lowrank:
      try:
        leaves = treedef.flatten_up_to(s.projected)
      except (ValueError, TypeError) as e:
        raise ValueError(
            "MultiSteps needs each lowrank_project inside the optimizer to see "
            f"the whole parameter tree (masked leaves allowed): {e}"
        ) from None
      for i, leaf in enumerate(leaves):
        projected_leaf[i] |= not isinstance(leaf, optax.MaskedNode)
      acc_projected.append(jax.tree.map(jnp.zeros_like, s.projected))
    acc_grads = treedef.unflatten([
        optax.MaskedNode() if projected
        else jnp.zeros_like(p, dtype=self._accumulator_dtype)
        for p, projected in zip(treedef.flatten_up_to(params), projected_leaf)
    ])
    state = MultiStepsState(
        mini_step=jnp.zeros([], jnp.int32),
        gradient_step=jnp.zeros([], jnp.int32),
        inner_opt_state=opt_state,
        acc_grads=acc_grads,
        acc_projected=tuple(acc_projected),
    )
    # Trace the final step once, so that unsupported combine rules fail here.
    jax.eval_shape(self._apply, state, zeros, params, {})
    return state

  def _apply(self, state, grads, params, extra_args):
    """The wrapped optimizer on the accumulated means."""
    full = jax.tree.map(
        lambda acc, g: (jnp.zeros_like(g) if isinstance(acc, optax.MaskedNode)
                        else acc.astype(g.dtype)),
        state.acc_grads, grads,
        is_leaf=lambda x: isinstance(x, optax.MaskedNode),
    )
    opt_state = _replace_lowrank_states(
        state.inner_opt_state,
        [s._replace(projected=acc) for s, acc in zip(
            _lowrank_states(state.inner_opt_state), state.acc_projected)],
    )
    updates, opt_state = self._opt.update(
        full, opt_state, params, **extra_args,
        **{core.ACCUMULATION_ARG: core.AccumulationStep("apply")},
    )
    return updates, opt_state

  def accumulate(self, updates, state: MultiStepsState, params=None,
                 **extra_args) -> MultiStepsState:
    """Adds one micro-batch to the means, never emitting an update.

    For a training step that scans its micro-batches: call this on the first
    ``k − 1`` and ``update`` on the last (the optimizer is then compiled
    once, outside the scan).

    Args:
      updates: The micro-batch's gradients.
      state: The current state.
      params: The parameters (as for ``update``).
      **extra_args: Extra arguments of the wrapped optimizer.

    Returns:
      The new state.
    """
    n = state.mini_step
    lowrank = self._project(updates, state.inner_opt_state, params, n == 0,
                            extra_args)
    inner_opt_state = _replace_lowrank_states(
        state.inner_opt_state, [s._replace(projected=()) for s in lowrank])
    acc_projected = tuple(
        jax.tree.map(lambda acc, r: _running_mean(acc, r, n), acc, s.projected)
        for acc, s in zip(state.acc_projected, lowrank)
    )
    acc_grads = jax.tree.map(
        lambda acc, g: acc if isinstance(acc, optax.MaskedNode)
        else _running_mean(acc, g, n),
        state.acc_grads, updates,
        is_leaf=lambda x: isinstance(x, optax.MaskedNode),
    )
    return state._replace(
        mini_step=optax.safe_int32_increment(n),
        inner_opt_state=inner_opt_state,
        acc_grads=acc_grads,
        acc_projected=acc_projected,
    )

  def update(self, updates, state: MultiStepsState, params=None,
             **extra_args) -> tuple[Any, MultiStepsState]:
    """Accumulates one micro-batch; the real update on every ``k``-th."""
    emitting = state.mini_step == self._k - 1
    state = self.accumulate(updates, state, params, **extra_args)

    def emit(state):
      new_updates, opt_state = self._apply(state, updates, params, extra_args)
      opt_state = _replace_lowrank_states(
          opt_state,
          [s._replace(projected=()) for s in _lowrank_states(opt_state)])
      return new_updates, MultiStepsState(
          mini_step=jnp.zeros([], jnp.int32),
          gradient_step=optax.safe_int32_increment(state.gradient_step),
          inner_opt_state=opt_state,
          acc_grads=optax.tree.zeros_like(state.acc_grads),
          acc_projected=optax.tree.zeros_like(state.acc_projected),
      )

    def hold(state):
      return optax.tree.zeros_like(updates), state

    return jax.lax.cond(emitting, emit, hold, state)

  def has_updated(self, state: MultiStepsState) -> jax.Array:
    """True right after a step that produced a real update."""
    return jnp.logical_and(state.mini_step == 0, state.gradient_step > 0)

  def gradient_transformation(self) -> optax.GradientTransformationExtraArgs:
    """This wrapper as an ``optax.GradientTransformationExtraArgs``."""
    return optax.GradientTransformationExtraArgs(self.init, self.update)
