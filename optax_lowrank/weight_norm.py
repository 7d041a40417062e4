"""Weight-normalized low-rank training (GradNormLoRP) as one optax transform.

Each selected matrix is reparameterised per output as ``W = g · v / ‖v‖``,
the norm taken over its reduction (input) axes: ``g`` is the magnitude of
each output unit, ``v`` its direction. A step turns the weight gradient ``G``
into gradients of ``v`` and ``g``, lets one optimizer step ``v`` (GaLore's
Adam in a low-rank subspace, through ``lowrank_project``) and another step
``g`` (Adam), rebuilds ``W' = g' · v' / ‖v'‖`` and returns ``W' − W``, so the
result composes with ``optax.apply_updates``. The learning rate is applied
here, to ``v`` and ``g``, since the output is a weight difference.

``v`` is not stored. After every step ``W = g · v / ‖v‖`` holds, so
``v = (‖v‖ / g) · W``: the state keeps ``g`` and ``‖v‖`` (one number per
output each) and reads the direction from the parameters. The arithmetic is
the authors' (who keep ``v``, a second copy of the weight); the memory is
GaLore's plus four numbers per output (``g``, ``‖v‖`` and ``g``'s two Adam
moments).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import optax

from optax_lowrank import shapes
from optax_lowrank.core import ACCUMULATION_ARG


class WeightNormState(NamedTuple):
  """State of ``weight_norm_project``.

  Attributes:
    count: Number of updates taken (int32, saturating); drives the learning
      rate schedule, and step 0 reads ``g`` and ``‖v‖`` from the parameters.
    magnitude: ``g`` of each weight-normalized leaf, float32, shaped like the
      leaf with its reduction axes of size 1 (``optax.MaskedNode`` at the
      other leaves).
    direction_norm: ``‖v‖`` of each weight-normalized leaf, shaped as
      ``magnitude``.
    direction_state: The direction optimizer's state.
    magnitude_state: The magnitude optimizer's state.
  """

  count: jax.Array
  magnitude: Any
  direction_norm: Any
  direction_state: optax.OptState
  magnitude_state: optax.OptState


def _norm(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=axes, keepdims=True))


def _safe(x: jax.Array) -> jax.Array:
  """``x`` with zeros replaced by ones, for a division (a zero column stays 0)."""
  return jnp.where(x == 0, jnp.ones_like(x), x)


def weight_norm_gradients(grad: jax.Array, direction: jax.Array,
                          magnitude: jax.Array, axes: tuple[int, ...], *,
                          exact: bool = False) -> tuple[jax.Array, jax.Array]:
  """Gradients of ``v`` and ``g`` from the gradient ``G`` of ``W = g·v/‖v‖``.

  With ``v̂ = v / ‖v‖`` (norm over ``axes``, per output):
  ``∂g = Σ G ⊙ v̂`` over ``axes``, and ``∂v = G · g / ‖v‖`` (the authors'
  rule) or, with ``exact``, the gradient of the reparameterisation,
  ``∂v = g / ‖v‖ · (G − ∂g · v̂)``, which drops ``G``'s component along
  ``v``.

  Args:
    grad: ``G``, the gradient with respect to ``W``.
    direction: ``v``, shaped like ``G``.
    magnitude: ``g``, shaped like ``G`` with ``axes`` of size 1.
    axes: The reduction (input) axes the norm runs over.
    exact: The exact gradient instead of the authors' approximation.

  Returns:
    ``(∂v, ∂g)``, shaped like ``v`` and ``g``.

  Example:
    >>> import jax.numpy as jnp, optax_lowrank
    >>> v = jnp.array([[3.0, 0.0], [4.0, 2.0]])  # (in, out): norms 5 and 2
    >>> g = jnp.array([[10.0, 1.0]])
    >>> G = jnp.ones((2, 2))
    >>> dv, dg = optax_lowrank.weight_norm.weight_norm_gradients(G, v, g, (0,))
    >>> [round(float(x), 4) for x in dg[0]]  # Σ G ⊙ v/‖v‖ per output
    [1.4, 1.0]
    >>> [round(float(x), 4) for x in dv[:, 0]]  # G · g/‖v‖
    [2.0, 2.0]

  References:
    Salimans & Kingma, `Weight Normalization
    <https://arxiv.org/abs/1602.07868>`_, NeurIPS 2016 (eq. 3).
  """
  vn = _safe(_norm(direction, axes))
  unit = direction / vn
  grad_g = jnp.sum(grad * unit, axis=axes, keepdims=True)
  if exact:
    grad = grad - grad_g * unit
  return grad * (magnitude / vn), grad_g


class _Split(NamedTuple):
  """One leaf at the start of a step: ``v``, ``g`` and their gradients
  (the weight and the gradient themselves at leaves not weight-normalized)."""

  v: Any
  g: Any
  grad_v: Any
  grad_g: Any


def _split_leaf(plan: shapes.LeafPlan, grad, w, g0, vn0, first, *,
                exact: bool, reset_magnitude: bool) -> _Split:
  """``v = (‖v‖/g)·W`` and ``g`` from the weight and the stored norms (from
  ``W`` alone at step 0), and their gradients; float32, sharded as stored."""
  axes = plan.layout.reduction_axes
  w32 = w.astype(jnp.float32)
  wn = _norm(w32, axes)
  g0 = jnp.where(first, wn, g0)
  vn0 = jnp.where(first, wn, vn0)
  v = w32 * (vn0 / _safe(g0))
  g = shapes.reshard_like(vn0 if reset_magnitude else g0, g0)
  grad_v, grad_g = weight_norm_gradients(
      grad.astype(jnp.float32), v, g, axes, exact=exact)
  return _Split(v, g, shapes.reshard_like(grad_v.astype(grad.dtype), grad),
                shapes.reshard_like(grad_g, g0))


def _rebuild_leaf(plan: shapes.LeafPlan, w, x: _Split, u, a, lr, wd):
  """``(g'·v'/‖v'‖ − W, g', ‖v'‖)`` after the steps ``u`` of ``v`` and ``a``
  of ``g``, and the decay of both by ``1 − lr·wd`` (the authors' order)."""
  shrink = 1.0 - lr * wd
  v = (x.v - lr * u.astype(jnp.float32)) * shrink
  g = (x.g - lr * a) * shrink
  vn = _norm(v, plan.layout.reduction_axes)
  new = g * v / _safe(vn)
  update = (new - w.astype(jnp.float32)).astype(w.dtype)
  return shapes.reshard_like(update, w), g, vn


def weight_norm_project(
    direction: optax.GradientTransformation,
    magnitude: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank: Union[int, float],
    projection_mask: shapes.MaskOrFn = None,
    dimension_numbers: shapes.DimensionNumbersOrFn = None,
    weight_decay: Union[float, jax.Array] = 0.0,
    mask: Any = None,
    exact_gradient: bool = False,
    reset_magnitude: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """Trains each projected matrix as ``g · v / ‖v‖`` (GradNormLoRP's step).

  The weight-normalized leaves are those ``lowrank_project`` with the same
  ``rank``, ``projection_mask`` and ``dimension_numbers`` projects; ``g`` and
  ``‖v‖`` are taken per output, over the reduction axes (per row of a
  PyTorch ``nn.Linear.weight``, per column of a Flax ``(in, out)`` kernel;
  batch axes, such as stacked layers, are kept). Per step, for those leaves:

  1. ``v = (‖v‖ / g) · W`` (the direction, from the parameter); with
     ``reset_magnitude`` the step starts from ``g = ‖v‖``, as the authors'
     code does;
  2. ``∂v, ∂g = weight_norm_gradients(G, v, g)``;
  3. ``direction`` turns ``∂v`` into ``u`` and ``magnitude`` turns ``∂g``
     into ``a``; ``v' = (v − η·u)(1 − η·λ)`` and ``g' = (g − η·a)(1 − η·λ)``
     (``η`` the learning rate, ``λ`` the weight decay where ``mask``
     selects the leaf; the authors decay the updated ``v`` and ``g``);
  4. the update is ``g' · v' / ‖v'‖ − W``.

  The other leaves get ``−η · (u + λ·W)`` with ``u`` from ``direction``
  (decoupled weight decay as ``optax.adamw``'s).

  Args:
    direction: The optimizer of ``v`` (and of the other leaves), giving a
      descent direction to be scaled by the learning rate, e.g.
      ``lowrank_project(optax.scale_by_adam(), rank)``. It receives ``∂v``
      at weight-normalized leaves (in the gradient's dtype) and ``G``
      elsewhere, with ``v`` and the other parameters as ``params``.
    magnitude: The optimizer of ``g``, e.g. ``optax.scale_by_adam()``; it
      sees a tree shaped like the parameters, with float32 ``∂g`` at
      weight-normalized leaves and ``optax.MaskedNode`` elsewhere.
    learning_rate: A float or an optax schedule (of this transform's step).
    rank: The rank ``lowrank_project`` in ``direction`` is given (it
      decides which leaves are projected).
    projection_mask: As ``lowrank_project``'s.
    dimension_numbers: As ``lowrank_project``'s.
    weight_decay: Decoupled weight decay.
    mask: Which leaves weight decay applies to (``optax.adamw``'s ``mask``).
    exact_gradient: ``∂v`` as the exact gradient of the reparameterisation
      instead of the authors' ``G · g / ‖v‖``.
    reset_magnitude: Start each step from ``g = ‖v‖`` (the authors' code;
      the magnitude's step then lasts one step); ``False`` keeps ``g`` as a
      parameter of its own (the paper's reparameterisation).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
    ``params``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_lowrank
    >>> params = {"w": jnp.ones((32, 16)) + jnp.eye(32, 16), "b": jnp.zeros(16)}
    >>> tx = optax_lowrank.weight_norm.weight_norm_project(
    ...     optax_lowrank.lowrank_project(optax.scale_by_adam(), rank=4),
    ...     optax.scale_by_adam(), 1e-2, rank=4)
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = jax.jit(tx.update)(grads, state, params)
    >>> params = optax.apply_updates(params, updates)

  References:
    Huang et al., `Gradient Weight-normalized Low-rank Projection for
    Efficient LLM Training <https://arxiv.org/abs/2412.19616>`_, AAAI 2025;
    code: github.com/Jhhuangkay/Gradient-Weight-normalized-Low-rank-Projection-for-Efficient-LLM-Training
    (``LowRankWeightNormAdamW``).
  """
  for name, value in (("exact_gradient", exact_gradient),
                      ("reset_magnitude", reset_magnitude)):
    if not isinstance(value, bool):
      raise ValueError(f"`{name}` must be a bool, got {value!r}")
  direction = optax.with_extra_args_support(direction)

  def plan(tree):
    return shapes.plan_leaves(tree, rank=rank, mask=projection_mask,
                              dimension_numbers=dimension_numbers)

  def norm_shaped(plans, treedef, leaves):
    """float32 zeros per weight-normalized leaf, its reduction axes size 1."""
    return treedef.unflatten([
        optax.MaskedNode() if p is None else jnp.sum(
            jnp.zeros_like(x, dtype=jnp.float32),
            axis=p.layout.reduction_axes, keepdims=True)
        for p, x in zip(plans, leaves)])

  def init_fn(params):
    plans, treedef = plan(params)
    g = norm_shaped(plans, treedef, treedef.flatten_up_to(params))
    return WeightNormState(
        count=jnp.zeros([], jnp.int32),
        magnitude=g,
        direction_norm=g,
        direction_state=direction.init(params),
        magnitude_state=magnitude.init(g),
    )

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(
          "weight_norm_project (GradNormLoRP) rebuilds the weights: pass "
          "`params` to update, tx.update(grads, state, params).")
    if ACCUMULATION_ARG in extra_args:
      raise ValueError(
          "weight_norm_project (GradNormLoRP) reads the full gradient of every "
          "weight-normalized leaf (for the magnitude's gradient), so it cannot "
          "accumulate at projected size: use optax.MultiSteps (full-size "
          "accumulation; the trainer's --accumulate full or auto).")
    plans, treedef = plan(updates)
    grads = treedef.flatten_up_to(updates)
    weights = treedef.flatten_up_to(params)
    first = state.count == 0
    lr = (learning_rate(state.count) if callable(learning_rate)
          else learning_rate)
    decays = shapes.resolve_per_leaf(
        True if mask is None else mask, params, lambda x: isinstance(x, bool))
    old_g = treedef.flatten_up_to(state.magnitude)
    old_vn = treedef.flatten_up_to(state.direction_norm)

    # Step 1: the direction and magnitude of each weight-normalized leaf from
    # its weight, and their gradients.
    split = [
        _Split(w, optax.MaskedNode(), gr, optax.MaskedNode()) if p is None
        else _split_leaf(p, gr, w, g0, vn0, first, exact=exact_gradient,
                         reset_magnitude=reset_magnitude)
        for p, gr, w, g0, vn0 in zip(plans, grads, weights, old_g, old_vn)]

    # Step 2: the two optimizers.
    u_tree, direction_state = direction.update(
        treedef.unflatten([x.grad_v for x in split]), state.direction_state,
        treedef.unflatten([x.v for x in split]), **extra_args)
    a_tree, magnitude_state = magnitude.update(
        treedef.unflatten([x.grad_g for x in split]), state.magnitude_state,
        treedef.unflatten([x.g for x in split]))

    # Step 3: step v and g and rebuild the weights; plain steps elsewhere.
    out, new_g, new_vn = [], [], []
    for p, w, x, u, a, decay, like in zip(
        plans, weights, split, treedef.flatten_up_to(u_tree),
        treedef.flatten_up_to(a_tree), decays, old_g):
      wd = weight_decay if decay else 0.0
      if p is None:
        out.append((-lr * (u + wd * w)).astype(w.dtype))
        new_g.append(optax.MaskedNode())
        new_vn.append(optax.MaskedNode())
        continue
      update, g, vn = _rebuild_leaf(p, w, x, u, a, lr, wd)
      out.append(update)
      new_g.append(shapes.reshard_like(g, like))
      new_vn.append(shapes.reshard_like(vn, like))

    return treedef.unflatten(out), WeightNormState(
        count=optax.safe_int32_increment(state.count),
        magnitude=treedef.unflatten(new_g),
        direction_norm=treedef.unflatten(new_vn),
        direction_state=direction_state,
        magnitude_state=magnitude_state,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
