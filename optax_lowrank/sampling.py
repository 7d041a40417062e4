"""Layer-wise sampling: which layers of a model take a step this period.

OwLore and GUM pick ``k`` of a model's ``L`` layers per period (without
replacement, uniformly or in proportion to a per-layer weight) and treat the
chosen layers differently from the rest. Every matrix of a layer must see the
same choice: draw it from a key that all of them share (a group key of
``lowrank_project``'s ``group_fn``, or one key per step), so that each leaf,
stacked ``(L, ...)`` or one of a list of unscanned blocks, reads the same mask.

- ``choose_layers``: the draw (Gumbel-top-k).
- ``layer_of_path``: which layer a leaf belongs to, from its path.
- ``outlier_ratios``: OWL's per-layer outlier ratio of the weights (OwLore's
  sampling weights).
- ``layerwise``: a wrapper (like ``optax.masked``) that trains the drawn
  layers with any inner optimizer and freezes the others, their state kept
  bit for bit (LISA, OwLore).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_lowrank import memory
from optax_lowrank import shapes


def choose_layers(key: jax.Array, num_layers: int, k: int,
                  weights: Optional[jax.Array] = None) -> jax.Array:
  """``k`` of ``num_layers`` layers, drawn without replacement.

  With ``weights``, layers are drawn one after another with probability
  proportional to their weight among those not yet drawn (``numpy``'s
  ``choice(L, k, replace=False, p=w/w.sum())``, as OwLore's code samples),
  here by the Gumbel-top-k trick in one pass, so it runs under ``jit``
  and ``vmap``. Layers of weight zero are drawn only when fewer than ``k``
  layers have a positive weight.

  Args:
    key: A PRNG key. The same key gives the same layers.
    num_layers: ``L``, the number of layers (static).
    k: How many to choose, ``0 <= k <= L`` (static).
    weights: Non-negative ``(L,)`` weights, or ``None`` for uniform.

  Returns:
    A ``bool`` array of shape ``(L,)`` with exactly ``k`` entries ``True``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from optax_lowrank import sampling
    >>> mask = sampling.choose_layers(jax.random.key(0), 8, 2)
    >>> int(mask.sum())
    2

  References:
    Kool et al., `Stochastic Beams and Where to Find Them: The Gumbel-Top-k
    Trick for Sampling Sequences Without Replacement
    <https://arxiv.org/abs/1903.06059>`_, ICML 2019.
  """
  if not isinstance(num_layers, int) or num_layers < 1:
    raise ValueError(
        f"`num_layers` must be a positive int, got {num_layers!r}")
  if not isinstance(k, int) or not 0 <= k <= num_layers:
    raise ValueError(
        f"`k` must be an int in [0, num_layers={num_layers}], got {k!r}")
  gumbel = jax.random.gumbel(key, (num_layers,), jnp.float32)
  if weights is None:
    scores = gumbel
  else:
    weights = jnp.asarray(weights, jnp.float32)
    if weights.shape != (num_layers,):
      raise ValueError(
          f"`weights` must have shape ({num_layers},), got {weights.shape}")
    # A positive weight's log is above log(1e-38) = -87.5 and a float32
    # Gumbel draw lies in about [-4.5, 17], so an offset of -1e4 ranks every
    # zero-weight layer below every positive one while their own order stays
    # random.
    log_w = jnp.where(weights > 0, jnp.log(jnp.maximum(weights, 1e-38)),
                      jnp.float32(-1e4))
    scores = log_w + gumbel
  _, chosen = jax.lax.top_k(scores, k)
  return jnp.zeros((num_layers,), bool).at[chosen].set(True)


# ---------------------------------------------------------------------------
# Which layer each leaf belongs to.
# ---------------------------------------------------------------------------

# ``layer_of(path)`` returns this for a leaf whose leading axis is the layer
# axis (scanned layers).
STACKED = "stacked"

_NUMBERED = re.compile(r"(?:layers|layer|blocks|block|h)_(\d+)")
_CONTAINERS = ("layers", "layer", "blocks", "block", "h")

LayerOf = Callable[[str], Union[None, int, str]]


def layer_of_path(path: str) -> Union[None, int, str]:
  """The layer of a leaf, read from its ``path_name``.

  ``"layers/3/attn/q/kernel"`` and ``"blocks_3/mlp/up"`` (a list or numbered
  attributes of unscanned blocks) are in layer 3; a leaf under a ``layers``
  or ``blocks`` component not followed by a number (``"layers/attn/q/kernel"``,
  scanned layers) is ``STACKED``: its leading axis is the layer axis. Any other
  leaf (embeddings, the final norm, the LM head) is in no layer (``None``).

  Args:
    path: A leaf's ``shapes.path_name``.

  Returns:
    ``None``, a layer index, or ``STACKED``.

  Example:
    >>> from optax_lowrank import sampling
    >>> sampling.layer_of_path("layers/3/attn/q/kernel")
    3
    >>> sampling.layer_of_path("layers/mlp/up/kernel")
    'stacked'
    >>> sampling.layer_of_path("lm_head/kernel") is None
    True

  References:
    Pan et al., `LISA: Layerwise Importance Sampling for Memory-Efficient Large
    Language Model Fine-Tuning <https://arxiv.org/abs/2403.17919>`_, 2024 (the
    layers are the decoder blocks, ``model.layers``).
  """
  parts = path.split("/")
  for i, part in enumerate(parts):
    numbered = _NUMBERED.fullmatch(part)
    if numbered:
      return int(numbered.group(1))
    if part in _CONTAINERS:
      if i + 1 < len(parts) and parts[i + 1].isdigit():
        return int(parts[i + 1])
      if part in ("layers", "blocks"):
        return STACKED
  return None


class _Layers(NamedTuple):
  """Each parameter leaf's layer (``None``, an index or ``STACKED``) and L."""

  names: list[str]
  of: list[Union[None, int, str]]
  num_layers: int


def _layers(tree, layer_of: LayerOf) -> tuple[_Layers, Any]:
  """Assigns the leaves of ``tree`` to layers; checks that the layers agree."""
  leaves_with_path, treedef = jax.tree.flatten_with_path(tree)
  names = [shapes.path_name(path) for path, _ in leaves_with_path]
  of, depth = [], set()
  for name, (_, leaf) in zip(names, leaves_with_path):
    layer = layer_of(name)
    if layer == STACKED:
      if jnp.ndim(leaf) < 1:
        raise ValueError(f"Leaf {name!r} is stacked (layer_of) but a scalar")
      depth.add(leaf.shape[0])
    elif layer is not None and (isinstance(layer, bool)
                                or not isinstance(layer, int) or layer < 0):
      raise ValueError(
          f"`layer_of` must return None, a layer index >= 0 or "
          f"sampling.STACKED; for {name!r} it returned {layer!r}")
    of.append(layer)
  numbered = [x for x in of if x is not None and x != STACKED]
  if numbered:
    depth.add(max(numbered) + 1)
  if len(depth) > 1:
    raise ValueError(
        f"The leaves disagree on the number of layers: stacked leading axes "
        f"and block indices give {sorted(depth)}")
  return _Layers(names, of, depth.pop() if depth else 0), treedef


def _state_layers(state, params, layers: _Layers) -> list[Union[None, int, str]]:
  """The layer of each state leaf: its parameter's (``None`` when shared).

  A state leaf belongs to the parameter whose key path it contains, or, under
  ``lowrank_project``'s bases, whose path name keys it (``memory.state_bytes``
  attributes memory by the same rule).
  """
  param_paths = [tuple(p) for p, _ in jax.tree.flatten_with_path(params)[0]]
  names = {name: i for i, name in enumerate(layers.names)}
  out = []
  for path, leaf in jax.tree.flatten_with_path(state)[0]:
    i = memory.param_owner(tuple(path), param_paths, names)
    layer = None if i is None else layers.of[i]
    if layer == STACKED and (jnp.ndim(leaf) < 1
                             or leaf.shape[0] != layers.num_layers):
      raise ValueError(
          f"The optimizer state leaf {shapes.path_name(path)!r} (shape "
          f"{jnp.shape(leaf)}) of the stacked leaf {layers.names[i]!r} has no "
          f"leading layer axis of size {layers.num_layers}, so its layers "
          "cannot be kept apart; use an inner optimizer whose state keeps the "
          "parameters' batch axes (as lowrank_project and optax.scale_by_adam "
          "do).")
    out.append(layer)
  return out


def _where_layer(active, layer, new, old):
  """``new`` in the active layers of a leaf, ``old`` in the others."""
  if layer is None:
    return new
  if layer == STACKED:
    keep = active.reshape(active.shape + (1,) * (jnp.ndim(new) - 1))
  else:
    keep = active[layer]
  return shapes.reshard_like(jnp.where(keep, new, old), old)


# ---------------------------------------------------------------------------
# OWL: each layer's outlier ratio.
# ---------------------------------------------------------------------------


def outlier_ratios(params, *, threshold: float = 13.0,
                   layer_of: LayerOf = layer_of_path) -> jax.Array:
  """Each layer's outlier ratio (OWL), in percent, from the weights.

  For layer ``l``, with ``A`` the magnitudes ``|W|`` of all its matrices (the
  leaves of at least two axes per layer, e.g. q, k, v, o, gate, up, down)
  taken together, ``D_l = 100 · #{A > threshold · mean(A)} / size(A)``: OWL's
  ``check_outlier_mean`` on the layer's concatenated scores. OWL and OwLore
  score ``|W_ij| · ‖X_j‖₂`` with input activations from calibration data;
  an optimizer has no activations, so this scores the weights alone.

  Args:
    params: The parameters (a pytree; stacked or unscanned layers).
    threshold: ``M``, how many times the layer's mean magnitude makes an
      outlier (OwLore's cached ratios use 13).
    layer_of: ``layer_of(path_name)``: the layer of each leaf (see
      ``layer_of_path``).

  Returns:
    A float32 ``(L,)`` array; ``(0,)`` when no leaf is in a layer.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from optax_lowrank import sampling
    >>> params = {"layers": {"w": jnp.ones((2, 4, 4)).at[1, 0, 0].set(99.)}}
    >>> sampling.outlier_ratios(params, threshold=5.0).tolist()
    [0.0, 6.25]

  References:
    Yin et al., `Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret
    Sauce for Pruning LLMs to High Sparsity <https://arxiv.org/abs/2310.05175>`_,
    ICML 2024; Li et al., `OwLore <https://arxiv.org/abs/2405.18380>`_, 2024.
  """
  layers, treedef = _layers(params, layer_of)
  num_layers = layers.num_layers
  leaves = treedef.flatten_up_to(params)
  # Per layer: the matrices' sums, sizes, and their magnitudes.
  total = jnp.zeros((num_layers,), jnp.float32)
  size = np.zeros((num_layers,), np.float64)
  parts = []
  for leaf, layer in zip(leaves, layers.of):
    if layer is None:
      continue
    a = jnp.abs(jnp.asarray(leaf, jnp.float32))
    if layer == STACKED:
      if a.ndim < 3:
        continue
      axes = tuple(range(1, a.ndim))
      total = total + jnp.sum(a, axis=axes)
      size += math.prod(a.shape[1:])
    else:
      if a.ndim < 2:
        continue
      total = total.at[layer].add(jnp.sum(a))
      size[layer] += a.size
    parts.append((a, layer))
  safe = np.maximum(size, 1)
  limit = threshold * total / safe.astype(np.float32)
  count = jnp.zeros((num_layers,), jnp.int32)  # exact past 2**24
  for a, layer in parts:
    if layer == STACKED:
      over = a > limit.reshape((num_layers,) + (1,) * (a.ndim - 1))
      count = count + jnp.sum(over, axis=tuple(range(1, a.ndim)),
                              dtype=jnp.int32)
    else:
      count = count.at[layer].add(jnp.sum(a > limit[layer], dtype=jnp.int32))
  return 100.0 * count.astype(jnp.float32) / safe.astype(np.float32)


# ---------------------------------------------------------------------------
# Layer-wise sampled training: a wrapper like optax.masked.
# ---------------------------------------------------------------------------


class LayerwiseState(NamedTuple):
  """State of ``layerwise``.

  Attributes:
    count: Number of updates taken (int32, saturating).
    weights: ``(L,)`` float32 sampling weights (computed at the first update
      when ``weights`` is a function of the parameters).
    active: ``(L,)`` bool, the layers trained in the current period.
    layer_counts: ``(L,)`` int32, the updates each layer has taken.
    inner_state: The inner transform's state.
    then_state: The ``then`` transform's state.
  """

  count: jax.Array
  weights: jax.Array
  active: jax.Array
  layer_counts: jax.Array
  inner_state: Any
  then_state: Any


def _num_active(active_layers: Union[int, float], num_layers: int) -> int:
  if num_layers == 0:
    return 0
  if isinstance(active_layers, float):
    return max(1, min(num_layers, round(active_layers * num_layers)))
  if active_layers > num_layers:
    raise ValueError(
        f"`active_layers`={active_layers} exceeds the model's {num_layers} "
        "layers")
  return active_layers


def _bias_correction(b1, b2, t):
  """Hugging Face AdamW's step-size factor ``√(1 − b2ᵗ) / (1 − b1ᵗ)``."""
  t = jnp.maximum(t, 1).astype(jnp.float32)
  return jnp.sqrt(1 - jnp.power(b2, t)) / (1 - jnp.power(b1, t))


def layerwise(
    inner: optax.GradientTransformation,
    active_layers: Union[int, float],
    *,
    interval: int,
    weights: Union[None, jax.Array, Callable[[Any], jax.Array]] = None,
    layer_of: LayerOf = layer_of_path,
    bias_correction: Optional[tuple[Any, Any]] = None,
    then: Optional[optax.GradientTransformation] = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  """Trains ``active_layers`` of the model's layers at a time (LISA, OwLore).

  At step 0 and every ``interval`` steps, ``k`` of the ``L`` layers are drawn
  without replacement (``choose_layers``: uniformly, or one after another
  with probability proportional to ``weights``), from one key per step that
  every leaf shares, so that all matrices of a layer, stacked ``(L, ...)``
  or in a list of unscanned blocks, see the same choice. For the rest of the
  period only those layers are trained; leaves in no layer (embeddings,
  final norm, LM head) are trained every step. A frozen layer is as a
  parameter without a gradient in PyTorch: its update is zero, its gradient
  is hidden from ``inner`` (zeros), and every state leaf of ``inner`` and
  ``then`` that belongs to it keeps its value bit for bit (bases, moments,
  its own step count ``layer_counts``).

  State leaves are matched to parameters by path (a state leaf belongs to
  the parameter whose path it contains: ``mu/layers/attn/q/kernel``, or
  ``lowrank_project``'s bases keyed ``"layers/attn/q/kernel"``); a state leaf
  of a stacked parameter must keep the layer axis first (``lowrank_project``
  does). Shared leaves (a global step count) advance every step.

  Args:
    inner: The optimizer of the trained layers, e.g.
      ``lowrank_project(inner.scale_by_adam_uncorrected(), rank)``.
    active_layers: ``k``: an int, or a float in (0, 1] as a fraction of the
      layers (``max(1, round(f·L))``).
    interval: Steps between draws of the layers (static).
    weights: ``None`` (uniform, LISA), non-negative ``(L,)`` weights, or a
      function of the parameters returning them, evaluated once, at the
      first update (e.g. ``outlier_ratios``; ``update`` then needs
      ``params``). Layers of weight zero are drawn only when fewer than
      ``k`` have a positive weight (all zero: uniform).
    layer_of: ``layer_of(path_name)``: each leaf's layer, ``None`` or
      ``STACKED`` (default ``layer_of_path``).
    bias_correction: ``(b1, b2)`` of an ``inner`` Adam without bias
      correction (``inner.scale_by_adam_uncorrected``): each layer's update
      is multiplied by ``√(1 − b2ᵗ) / (1 − b1ᵗ)`` with ``t`` that layer's
      own step count (always-trained leaves: ``count``), as PyTorch's
      per-parameter ``step`` does. ``None``: nothing.
    then: A transform after the bias correction whose output is also kept
      to the trained layers (weight decay: a frozen layer is not decayed).
    seed: Seed of the draws.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from optax_lowrank import sampling
    >>> params = {"embed": jnp.ones((8, 4)), "layers": {"w": jnp.ones((4, 4, 4))}}
    >>> tx = sampling.layerwise(optax.adam(1e-2), 1, interval=5)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> int((jnp.abs(updates["layers"]["w"]).sum(axis=(1, 2)) > 0).sum())
    1

  References:
    Pan et al., `LISA: Layerwise Importance Sampling for Memory-Efficient Large
    Language Model Fine-Tuning <https://arxiv.org/abs/2403.17919>`_, 2024; Li
    et al., `OwLore: Outlier-weighed Layerwise Sampled Low-Rank Projection for
    LLM Fine-tuning <https://arxiv.org/abs/2405.18380>`_, 2024.
  """
  if not isinstance(inner, optax.GradientTransformation):
    raise ValueError(
        f"`inner` must be an optax GradientTransformation, got {inner!r}")
  if isinstance(active_layers, bool) or not (
      (isinstance(active_layers, int) and active_layers >= 1)
      or (isinstance(active_layers, float) and 0.0 < active_layers <= 1.0)):
    raise ValueError(
        f"`active_layers` must be an int >= 1 or a float fraction in (0, 1], "
        f"got {active_layers!r}")
  if isinstance(interval, bool) or not isinstance(interval, int) or (
      interval < 1):
    raise ValueError(f"`interval` must be an int >= 1, got {interval!r}")
  if not callable(layer_of):
    raise ValueError(f"`layer_of` must be callable, got {layer_of!r}")
  if then is not None and not isinstance(then, optax.GradientTransformation):
    raise ValueError(
        f"`then` must be an optax GradientTransformation or None, got {then!r}")
  if bias_correction is not None and len(bias_correction) != 2:
    raise ValueError(
        f"`bias_correction` must be None or (b1, b2), got {bias_correction!r}")
  fixed = None
  if weights is not None and not callable(weights):
    fixed = np.asarray(weights, np.float32)
    if fixed.ndim != 1 or not np.all(fixed >= 0):
      raise ValueError(
          f"`weights` must be None, a function of the parameters or "
          f"non-negative (L,) weights, got {weights!r}")
  inner = optax.with_extra_args_support(inner)
  then = optax.identity() if then is None else then

  def init_fn(params):
    layers, _ = _layers(params, layer_of)
    num_layers = layers.num_layers
    _num_active(active_layers, num_layers)
    if fixed is not None and num_layers and fixed.shape != (num_layers,):
      raise ValueError(
          f"`weights` has shape {fixed.shape}; the model has {num_layers} "
          "layers")
    inner_state, then_state = inner.init(params), then.init(params)
    _state_layers((inner_state, then_state), params, layers)  # checks
    if fixed is not None and num_layers:
      start = jnp.asarray(fixed)
    else:
      start = jnp.ones((num_layers,), jnp.float32)
    return LayerwiseState(
        count=jnp.zeros([], jnp.int32),
        weights=start,
        active=jnp.zeros((num_layers,), bool),
        layer_counts=jnp.zeros((num_layers,), jnp.int32),
        inner_state=inner_state,
        then_state=then_state,
    )

  def update_fn(updates, state, params=None, **extra_args):
    layers, treedef = _layers(updates, layer_of)
    num_layers = layers.num_layers
    k = _num_active(active_layers, num_layers)
    step = state.count
    # Step 1: the sampling weights (once) and this period's layers.
    layer_weights = state.weights
    if callable(weights) and num_layers:
      if params is None:
        raise ValueError(
            "layerwise: `weights` is a function of the parameters; pass "
            "`params` to update")
      layer_weights = jax.lax.cond(
          step == 0,
          lambda p: shapes.reshard_like(jnp.asarray(
              weights(p), jnp.float32).reshape(num_layers), state.weights),
          lambda p: state.weights, params)
    active = state.active
    if num_layers:
      drawn = choose_layers(
          jax.random.fold_in(jax.random.key(seed), step), num_layers, k,
          None if weights is None else layer_weights)
      active = jnp.where(step % interval == 0, drawn, state.active)

    def only_active(x, layer):
      return _where_layer(active, layer, x, jnp.zeros_like(x))

    # Step 2: the inner optimizer on the gradients of the trained layers.
    grads = treedef.flatten_up_to(updates)
    hidden = treedef.unflatten(
        [only_active(g, layer) for g, layer in zip(grads, layers.of)])
    out, inner_state = inner.update(hidden, state.inner_state, params,
                                    **extra_args)
    count = optax.safe_int32_increment(step)
    layer_counts = jnp.where(
        active, optax.safe_int32_increment(state.layer_counts),
        state.layer_counts)

    # Step 3: each layer's bias correction by its own step count.
    if bias_correction is not None:
      b1, b2 = bias_correction
      per_layer = _bias_correction(b1, b2, layer_counts)
      shared = _bias_correction(b1, b2, count)

      def corrected(u, layer):
        if layer is None:
          factor = shared
        elif layer == STACKED:
          factor = per_layer.reshape((num_layers,) + (1,) * (u.ndim - 1))
        else:
          factor = per_layer[layer]
        return shapes.reshard_like((factor * u).astype(u.dtype), u)

      out = treedef.unflatten([
          corrected(u, layer)
          for u, layer in zip(treedef.flatten_up_to(out), layers.of)])
    out, then_state = then.update(out, state.then_state, params)

    # Step 4: frozen layers get no update and keep their state bit for bit.
    out = treedef.unflatten([
        only_active(u, layer)
        for u, layer in zip(treedef.flatten_up_to(out), layers.of)])
    new, old = (inner_state, then_state), (state.inner_state, state.then_state)
    new_leaves, state_def = jax.tree.flatten(new)
    kept = state_def.unflatten([
        _where_layer(active, layer, n, o) for n, o, layer in zip(
            new_leaves, state_def.flatten_up_to(old),
            _state_layers(new, updates, layers))])
    return out, LayerwiseState(
        count=count,
        weights=layer_weights,
        active=active,
        layer_counts=layer_counts,
        inner_state=kept[0],
        then_state=kept[1],
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
