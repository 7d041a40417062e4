"""``lowrank_project``: run any optax transform in a low-rank gradient subspace.

The pipeline, per projected leaf (see ``lowrank_project``)::

  G ─ matricize ─ refresh? (projector, one lax.cond) ─ down ─▶ R
  R ─ inner optimizer (one state over the whole tree) ─▶ N
  (G, R, N, basis) ─ combine rule ─ unmatricize ─▶ update

It is written as small pure functions of one leaf (``_project_leaf``,
``_combine_leaf``) mapped over the leaves, with an opaque per-leaf result
(``_Projected``), and one call of the inner optimizer on the tree in between.
The inner optimizer sees a tree shaped like the parameters in which every
projected leaf is replaced by its projected gradient ``R``. This keeps
tree-global inner transforms meaningful (``clip_by_global_norm`` clips the
norm of everything the inner optimizer sees; one shared step count drives bias
correction) and makes ``lowrank_project(inner)`` with nothing projected exactly
``inner``.

Methods plug in without edits here: a ``Projector`` (how the subspace is found
and used; its ``refresh`` receives a ``RefreshContext`` with the step, a key
shared by the leaf's group, the leaf's parameters and, when it asks, the inner
first moment), a ``moments.RefreshPolicy`` (what a refresh does to the inner
moments) and a ``combine.CombineRule`` (how the update is built).

Each projected leaf decides its refresh with one ``lax.cond`` over the whole
stack of its matrices (batch axes are handled inside the branch by batched
linear algebra, never by a ``vmap`` around the ``cond``), so the subspace
computation runs on refresh steps only.

State holds arrays only, keyed by each projected leaf's path (``path_name``),
so that it does not depend on the parameters' container types (Flax NNX wraps
every parameter in a ``Variable``; a per-leaf basis inside one is not an
array) nor on a device mesh.

Gradient accumulation in the subspace (``accumulation.MultiSteps``) splits an
update in two phases, asked for through the extra argument
``ACCUMULATION_ARG`` (an ``AccumulationStep`` request): ``project`` (refresh
if due, on the first micro-batch only, project, and hand the request a
``LowRankAccumulator`` with the projected gradients, the input at the other
leaves and the window's bases; nothing else is computed or updated) and
``apply`` (the accumulated means replace this transform's input: inner
optimizer, refresh policy and combine rule run once, with the window's
bases).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from optax_lowrank import combine as combine_lib
from optax_lowrank import moments
from optax_lowrank import projectors
from optax_lowrank import quantize
from optax_lowrank import schedules
from optax_lowrank import shapes
from optax_lowrank.projectors import Projector, RefreshContext, svd


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LeafBasis:
  """The basis state of one projected leaf, with its static description.

  Attributes:
    basis: The projector's basis pytree (arrays).
    rank: Rank of the subspace (static).
    matrix_shape: ``(batch..., m, n)`` in the references' orientation (static).
  """

  basis: Any
  rank: int = dataclasses.field(metadata=dict(static=True))
  matrix_shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))


class LowRankState(NamedTuple):
  """State of ``lowrank_project``.

  Attributes:
    count: Number of updates taken (int32, saturating).
    bases: ``{path: LeafBasis}`` for the projected leaves, keyed by
      ``shapes.path_name`` of the leaf's key path (``"layers/mlp/up/kernel"``).
    combine_states: ``{path: state}``: the combine rule's state of each
      projected leaf (empty for stateless rules).
    inner_state: The inner transform's state over the projected tree.
  """

  count: jax.Array
  bases: dict[str, LeafBasis]
  combine_states: dict[str, Any]
  inner_state: optax.OptState


ACCUMULATION_ARG = "lowrank_accumulation"


class LowRankAccumulator(NamedTuple):
  """One ``lowrank_project``'s share of a micro-batch, under ``MultiSteps``.

  Handed to the ``AccumulationStep`` request in the ``project`` phase (one
  micro-batch), and back in the ``apply`` phase (``projected`` and
  ``unprojected`` then hold the accumulated means, or sums). Trees are
  shaped like the transform's input, with ``optax.MaskedNode()`` where the
  other field holds the leaf.

  Attributes:
    projected: The projected gradient ``down(basis, G)`` of each projected
      leaf (``MaskedNode`` at the other leaves).
    unprojected: The input itself at the leaves that are not projected
      (``MaskedNode`` at projected leaves).
    bases: ``{path: basis}``: the basis each projected leaf uses in this
      accumulation window (refreshed on its first micro-batch when due).
  """

  projected: Any
  unprojected: Any
  bases: dict[str, Any]


class AccumulationStep:
  """What ``MultiSteps`` asks of each ``lowrank_project`` (an extra arg).

  Passed as ``**{ACCUMULATION_ARG: request}`` to the wrapped optimizer's
  ``update``; every ``lowrank_project`` inside it, wherever it sits, takes
  the next slot (``take``, in call order) and:

  - ``project``: refreshes its bases if due (only when ``first``; later
    micro-batches use the window's bases from its inbox slot), projects, and
    ``post``s a ``LowRankAccumulator``; it returns its input and its state
    unchanged, so nothing else of that call is kept.
  - ``apply``: takes the accumulated ``LowRankAccumulator`` from its inbox
    slot as its input (the incoming updates are ignored, only their
    structure is read), and runs the inner optimizer, the refresh policy and
    the combine rule once, with the window's bases.

  A ``lowrank_project`` whose combine rule reads the full gradient (APOLLO,
  Fira, FRUGAL, Flora) takes no slot: it returns at once in ``project`` and
  updates as without a request in ``apply``, on the raw gradients that
  ``MultiSteps`` then accumulates at full size.

  A request lives inside one trace: the posted values are read by
  ``MultiSteps`` right after the call (it checks at ``init`` that no
  ``lax.cond``, ``scan``, ``vmap`` or ``jit`` between them traps a value in
  an inner trace).

  Attributes:
    phase: ``"project"`` or ``"apply"``.
    first: A bool scalar: the first accumulated micro-batch of the window.
    inbox: One ``LowRankAccumulator`` per ``lowrank_project`` (call order):
      the window's bases (``project``) or the accumulated means (``apply``);
      empty at ``init``, where each uses its stored bases.
    record_inputs: Also record each transform's input (``inputs``), for the
      linearity check at ``init``.
    outbox: The posted ``LowRankAccumulator`` values (``project``).
    inputs: The recorded inputs.
  """

  def __init__(self, phase: str, first: Any = False,
               inbox: tuple[LowRankAccumulator, ...] = (),
               record_inputs: bool = False):
    if phase not in ("project", "apply"):
      raise ValueError(f"phase must be 'project' or 'apply', got {phase!r}")
    self.phase = phase
    self.first = first
    self.inbox = tuple(inbox)
    self.record_inputs = record_inputs
    self.outbox: list[LowRankAccumulator] = []
    self.inputs: list[Any] = []
    self._taken = 0

  def take(self) -> Optional[LowRankAccumulator]:
    """The calling transform's inbox slot (``None`` past the inbox's end)."""
    i, self._taken = self._taken, self._taken + 1
    return self.inbox[i] if i < len(self.inbox) else None

  def post(self, mail: LowRankAccumulator, inputs: Any) -> None:
    """Hands back one transform's share of the micro-batch (``project``)."""
    self.outbox.append(mail)
    if self.record_inputs:
      self.inputs.append(inputs)


def _validate_scale(scale):
  if isinstance(scale, bool) or (
      isinstance(scale, (int, float)) and not 0 < scale < float("inf")):
    raise ValueError(f"`scale` must be a positive finite number, got {scale!r}")


def _validate_rank(rank):
  if isinstance(rank, bool) or not isinstance(rank, (int, float)):
    raise ValueError(
        f"`rank` must be a positive int or a float fraction in (0, 1], got "
        f"{rank!r}"
    )
  if isinstance(rank, int) and rank < 1:
    raise ValueError(f"`rank` must be a positive int, got {rank}")
  if isinstance(rank, float) and not 0.0 < rank <= 1.0:
    raise ValueError(
        f"`rank` given as a float is a fraction and must be in (0, 1], got "
        f"{rank}"
    )


def _resolve_projector(projector, proj_type) -> Projector:
  if isinstance(projector, Projector):
    if proj_type is not None:
      raise ValueError(
          "`proj_type` configures the 'svd' projector only; a Projector "
          f"instance carries its own side (got proj_type={proj_type!r} with "
          f"{projector!r}). Pass the side to the projector's factory, e.g. "
          "projectors.random(proj_type='left').")
    return projector
  if projector != "svd":
    raise ValueError(
        f"`projector` must be 'svd' or a Projector instance, got {projector!r}")
  return svd("std" if proj_type is None else proj_type)


class _Projected(NamedTuple):
  """One projected leaf after the project stage (opaque to the pipeline)."""

  g: Optional[jax.Array]  # the gradient, matricized (batch..., n, m)
  basis: Any  # the basis used this step
  r: jax.Array  # down(basis, g)
  # bool scalar, or per matrix (batch...) for a projector with ``due``;
  # None when no refresh is asked
  refreshed: Optional[jax.Array]


def _refresh(projector: Projector, ctx: RefreshContext, g, basis):
  """The refresh branch: a new basis, kept per matrix where ``g`` is not finite."""
  if ctx.first_moment is not None:
    moment = quantize.dequantize_tree(ctx.first_moment).astype(jnp.float32)
    if isinstance(ctx.first_moment, quantize.QuantizedArray):
      # Sharded like the projected gradient it averages (a dequantized
      # moment keeps only the shardings its codes kept).
      moment = shapes.reshard_like(
          moment, jax.eval_shape(projector.down, basis, g))
    ctx = ctx._replace(first_moment=moment)
  new = projector.refresh(ctx, g.astype(jnp.float32), basis)
  finite = jnp.all(jnp.isfinite(g), axis=(-2, -1))
  batch = finite.shape

  def keep_if_not_finite(new_leaf, old_leaf):
    # Per matrix where the basis has one entry per matrix (SVD vectors,
    # indices); otherwise (one key, a block choice) for the whole leaf.
    if old_leaf.ndim > len(batch) and old_leaf.shape[:len(batch)] == batch:
      ok = finite.reshape(batch + (1,) * (old_leaf.ndim - len(batch)))
    else:
      ok = jnp.all(finite)
    new_leaf = shapes.reshard_like(new_leaf.astype(old_leaf.dtype), old_leaf)
    return shapes.reshard_like(jnp.where(ok, new_leaf, old_leaf), old_leaf)

  return jax.tree.map(keep_if_not_finite, new, basis)


def _project_leaf(projector: Projector, plan: shapes.LeafPlan, g, basis, *,
                  refresh: Optional[jax.Array], ctx: RefreshContext
                  ) -> _Projected:
  """Refreshes the leaf's basis if ``refresh`` (under one ``lax.cond``) and
  projects its gradient.

  A projector with a ``due`` hook decides per matrix (where ``refresh``
  allows): the ``cond`` runs when any matrix is due, and ``refreshed`` is
  the matrices that took a new basis.
  """
  g2 = plan.layout.matricize(g)
  if refresh is not None and projector.due is not None:
    r = projector.down(basis, g2)
    due = projector.due(ctx.step, r, basis) & refresh
    refresh = jnp.any(due)
    ctx = ctx._replace(due=due)
    # A matrix with a non-finite gradient keeps its basis (``_refresh``).
    finite = jnp.all(jnp.isfinite(g2), axis=(-2, -1))
    refreshed = due & shapes.reshard_like(finite, due)
    basis = jax.lax.cond(
        refresh,
        lambda ctx, g, b: _refresh(projector, ctx, g, b),
        lambda ctx, g, b: b,
        ctx, g2, basis)
    # ``r`` again only where a basis changed.
    r = jax.lax.cond(refresh, projector.down, lambda b, g: r, basis, g2)
    return _Projected(g2, basis, r, refreshed)
  if refresh is not None:
    basis = jax.lax.cond(
        refresh,
        lambda ctx, g, b: _refresh(projector, ctx, g, b),
        lambda ctx, g, b: b,
        ctx, g2, basis)
  return _Projected(g2, basis, projector.down(basis, g2), refresh)


def _changed_matrices(old, new, batch_shape) -> jax.Array:
  """Per matrix (``batch_shape``), whether any basis entry differs."""
  changed = jnp.zeros(batch_shape, bool)
  for o, n in zip(jax.tree.leaves(old), jax.tree.leaves(new)):
    axes = tuple(range(len(batch_shape), o.ndim))
    changed = changed | jnp.any(o != n, axis=axes)
  return changed


def _combine_leaf(rule: combine_lib.CombineRule, projector: Projector,
                  plan: shapes.LeafPlan, like, p: _Projected, n, scale, state):
  """The full-size update of one projected leaf, in the parameter's layout.

  Under explicit mesh axes the rule sees ``up``'s output resharded like the
  gradient: a basis that holds no array along an axis (a key, indices) does
  not know that axis' sharding, so ``up`` leaves it unsharded, and resharding
  is then a local slice (no collective). ``like`` is the gradient leaf
  (accumulated, in the ``apply`` phase, where ``p.g`` is ``None``).
  """
  view = p.g if p.g is not None else plan.layout.matricize(like)
  sharded = projector._replace(
      up=lambda basis, r: shapes.reshard_like(projector.up(basis, r), view))
  u, state = rule.apply(sharded, p.basis, p.g, p.r, n, scale, state)
  u = plan.layout.unmatricize(u).astype(like.dtype)
  return shapes.reshard_like(u, like), state


def _groups(plans, group_fn) -> list[Optional[int]]:
  """Each projected leaf's group index (groups numbered by first leaf)."""
  if group_fn is None:
    return [None if p is None else p.index for p in plans]
  index: dict[Hashable, int] = {}
  out = []
  for p in plans:
    if p is None:
      out.append(None)
      continue
    label = group_fn(p.name)
    try:
      out.append(index.setdefault(label, len(index)))
    except TypeError:
      raise ValueError(
          f"`group_fn` must return a hashable label for each path; for "
          f"{p.name!r} it returned {label!r}") from None
  return out


def lowrank_project(
    inner: optax.GradientTransformation,
    rank: Union[int, float],
    *,
    update_proj_gap: int = 200,
    scale: Union[float, jax.Array] = 1.0,
    proj_type: Optional[str] = None,
    projector: Union[str, Projector] = "svd",
    granularity: Union[int, float] = 1,
    projection_mask: shapes.MaskOrFn = None,
    dimension_numbers: shapes.DimensionNumbersOrFn = None,
    on_refresh: Union[str, moments.RefreshPolicy] = "keep",
    stagger: bool = False,
    combine: combine_lib.CombineRule = combine_lib.back_project(),
    unprojected: Optional[optax.GradientTransformation] = None,
    group_fn: Optional[Callable[[str], Hashable]] = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  """Wraps ``inner`` so that it runs in a low-rank subspace of each gradient.

  For every projected leaf, the gradient ``G`` (viewed as matrices, see
  ``DimensionNumbers`` and ``shapes``) is projected to
  ``R = down(basis, G)``; ``inner`` updates the tree of projected gradients;
  its output ``N`` is combined back, by default ``U = scale · up(basis, N)``.
  The basis is renewed from ``G`` at step 0 and every ``update_proj_gap``
  steps. Leaves not projected (not selected by ``projection_mask``, fewer
  than two axes, more than two without dimension numbers, or smaller side
  ``<= rank``) go through ``inner`` at full shape, so with nothing projected
  this is exactly ``inner``.

  Why a wrapper and not a link of a chain: ``optax.chain(project, adam)``
  would leave Adam's output in the subspace, with no way back to the
  parameter's shape, since the basis lives in another transform's state.
  ``lowrank_project(inner)`` wraps ``inner`` as ``optax.masked`` or
  ``optax.MultiSteps`` do, and itself composes in ``optax.chain`` with
  weight decay and learning-rate schedules.

  ``inner`` may be any optax transform. If it reads ``params``, it receives the
  parameters projected into each leaf's subspace (``down(basis, W)``) for
  projected leaves; apply full-space weight decay outside this wrapper, as the
  aliases do.

  Args:
    inner: The optimizer to run on projected gradients, e.g.
      ``optax.scale_by_adam()``.
    rank: Subspace rank: an int, or a float in (0, 1] as a fraction of each
      leaf's smaller side.
    update_proj_gap: Steps between subspace refreshes.
    scale: Multiplier of the back-projected update (GaLore's ``alpha``); may be
      an array (e.g. from ``optax.inject_hyperparams``).
    proj_type: For ``projector="svd"``: ``std`` (default), ``reverse_std``,
      ``left``, ``right`` or ``full`` (galore-torch's meanings). An error
      with a ``Projector`` instance, which carries its own side.
    projector: ``"svd"`` or a ``Projector`` instance (``projectors``).
    granularity: VLoRP's projection unit ``c``, a power of two: the
      projector works on each matrix regrouped row-major to ``(m·c, n/c)``
      (``m >= n``) or ``(m/c, n·c)``, see ``projectors.granular``. ``1``
      projects the matrix itself.
    projection_mask: Which leaves may be projected: a bool pytree like the
      parameters, or a function of them returning one (e.g.
      ``match_paths("attn|mlp")``). Default: all.
    dimension_numbers: ``DimensionNumbers`` (or optax's
      ``GaLoreDimensionNumbers`` / ``MuonDimensionNumbers``) for leaves with
      more than two axes: one for all, a pytree with ``None`` leaves, or a
      function of the parameters. Axes they do not name are batch axes.
      Leaves of more than two axes without them are not projected (one
      warning at ``init`` lists them), as in ``optax.contrib.galore``.
    on_refresh: What a refresh does to the leaf's inner moments: a
      ``moments.RefreshPolicy`` or one of the names ``keep`` (galore-torch),
      ``reset``, ``rotate`` (= ``rotate_first_moment``) and
      ``rotate_moments``.
    stagger: Spread the groups' refreshes over the gap (see
      ``schedules.every``).
    combine: The combine rule building the full-space update from the
      subspace one (a ``combine.CombineRule``); ``combine.back_project()``
      by default.
    unprojected: The transform for leaves that are not projected, or
      ``None`` (default): ``inner`` updates them too, at full shape. When
      given, the two run side by side as ``optax.partition`` does (each on
      its own leaves, so a global-norm clip inside ``inner`` then sees the
      projected leaves only), as in reference codes that pair a subspace
      method with full AdamW for embeddings, norms and the LM head (VLoRP).
    group_fn: ``group_fn(path) -> label``, with ``path`` a projected leaf's
      ``path_name`` (``"layers/attn/q/kernel"``). Leaves with the same label
      form a group: they refresh on the same steps and their projectors
      receive the same key, so a random choice (e.g. of layers) is the same
      for all of them. ``None``: every leaf is its own group.
    seed: Seed for projectors that draw random bases.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax, optax_lowrank
    >>> params = {"w": jnp.ones((64, 32)), "b": jnp.zeros(32)}
    >>> tx = optax.chain(
    ...     optax_lowrank.lowrank_project(optax.scale_by_adam(), rank=8),
    ...     optax.scale_by_learning_rate(1e-2))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)

  References:
    Zhao et al., `GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
    Projection <https://arxiv.org/abs/2403.03507>`_, ICML 2024.
  """
  _validate_rank(rank)
  _validate_scale(scale)
  policy = moments.as_policy(on_refresh)
  projector = _resolve_projector(projector, proj_type)
  if not isinstance(combine, combine_lib.CombineRule):
    raise ValueError(
        f"`combine` must be a combine.CombineRule (e.g. "
        f"combine.back_project()), got {combine!r}"
    )
  if group_fn is not None and not callable(group_fn):
    raise ValueError(f"`group_fn` must be callable or None, got {group_fn!r}")
  shapes.validate_granularity(granularity)
  if granularity != 1:
    projector = projectors.granular(projector, granularity)
  refresh_schedule = schedules.every(update_proj_gap, stagger=stagger)
  inner = optax.with_extra_args_support(inner)
  if unprojected is not None and not isinstance(
      unprojected, optax.GradientTransformation):
    raise ValueError(
        f"`unprojected` must be an optax GradientTransformation or None, got "
        f"{unprojected!r}"
    )

  def plan(tree, *, warn=False):
    return shapes.plan_leaves(
        tree, rank=rank, mask=projection_mask,
        dimension_numbers=dimension_numbers, warn=warn)

  def inner_for(plans, treedef) -> optax.GradientTransformationExtraArgs:
    """``inner``, or ``inner`` and ``unprojected`` side by side."""
    if unprojected is None:
      return inner
    labels = treedef.unflatten(
        ["projected" if p is not None else "unprojected" for p in plans])
    # A function, so that a callable labels tree (an Equinox module) is not
    # mistaken for one by optax.partition.
    return optax.partition(
        {"projected": inner, "unprojected": unprojected}, lambda _: labels)

  def init_fn(params):
    plans, treedef = plan(params, warn=True)
    leaves = treedef.flatten_up_to(params)
    bases, combine_states, proxies = {}, {}, []
    # Step 1: each projected leaf's basis and combine state, and the
    # projected stand-in the inner optimizer is initialized with.
    for leaf, p in zip(leaves, plans):
      if p is None:
        proxies.append(leaf)
        continue
      g = p.layout.matricize(jnp.zeros_like(leaf))
      info = shapes.MatrixInfo(
          p.layout.batch_shape, p.layout.m, p.layout.n, p.rank,
          shapes.explicit_spec(g),
      )
      try:
        basis = projector.init(info, leaf.dtype)
        combine_states[p.name] = combine.init(info)
      except ValueError as e:
        raise ValueError(f"Leaf {p.path} of shape {leaf.shape}: {e}") from None
      bases[p.name] = LeafBasis(basis, p.rank, p.layout.matrix_shape)
      proxies.append(projector.down(basis, g))
    # Step 2: the inner optimizer's state over the projected tree.
    inner_tx = inner_for(plans, treedef)
    inner_state = inner_tx.init(treedef.unflatten(proxies))
    if projector.reads_first_moment:
      found = moments.first_moments(inner_tx, inner_state, treedef)
      for p, m, r in zip(plans, found, proxies):
        if p is not None and (m is None or m.shape != r.shape):
          raise ValueError(
              f"Leaf {p.path}: the projector reads the inner optimizer's "
              f"first moment, but the inner state has no parameter-shaped "
              f"field named one of {moments.FIRST_MOMENT_FIELDS} for it; use "
              "an inner optimizer that keeps one, e.g. optax.scale_by_adam.")
    if bases and all(jnp.size(x) <= 1 for x in jax.tree.leaves(inner_state)):
      warnings.warn(
          "lowrank_project: the inner transform keeps no per-parameter state, "
          "so projecting saves no memory. A stateful optimizer chained after "
          "lowrank_project (optax.chain(lowrank_project(optax.identity(), "
          "...), optax.adam(...))) keeps full-size moments; wrap it instead: "
          "optax.chain(lowrank_project(optax.scale_by_adam(), ...), "
          "optax.scale_by_learning_rate(...)).", stacklevel=2)
    return LowRankState(
        count=jnp.zeros([], jnp.int32),
        bases=bases,
        combine_states=combine_states,
        inner_state=inner_state,
    )

  def update_fn(updates, state, params=None, **extra_args):
    request = extra_args.pop(ACCUMULATION_ARG, None)
    plans, treedef = plan(updates)
    inner_tx = inner_for(plans, treedef)
    groups = _groups(plans, group_fn)
    num_groups = 1 + max((g for g in groups if g is not None), default=-1)
    grads = treedef.flatten_up_to(updates)
    for g, p in zip(grads, plans):
      _check_leaf(p, g, state.bases)
    if request is not None and combine.reads_gradient and num_groups:
      # The rule reads the full gradient, so nothing can be accumulated at
      # projected size: this transform takes no part, and MultiSteps
      # accumulates the raw gradients it reads (optax.MultiSteps's way).
      if request.phase == "project":
        return updates, state
      request = None
    slot = None if request is None else request.take()
    projecting = request is not None and request.phase == "project"
    applying = (request is not None and request.phase == "apply"
                and slot is not None)
    params_leaves = (
        [None] * len(grads) if params is None
        else treedef.flatten_up_to(params))
    step = state.count
    base_key = jax.random.fold_in(jax.random.key(seed), step)
    first_moments = (
        moments.first_moments(inner_tx, state.inner_state, treedef)
        if projector.reads_first_moment and not applying
        else [None] * len(grads))
    accumulated = [None] * len(grads)
    if applying:  # the window's means replace the incoming updates
      accumulated = treedef.flatten_up_to(slot.projected)
      grads = [g if p is not None else u for g, u, p in zip(
          grads, treedef.flatten_up_to(slot.unprojected), plans)]

    # Step 1: refresh the bases that are due and project the gradients.
    def project(p, group, g, w, first_moment, r):
      old = state.bases[p.name].basis
      if projector.due is None:
        refresh = refresh_schedule(step, group, num_groups)
      else:  # the projector decides, every step (``_project_leaf``)
        refresh = jnp.asarray(True)
      if applying:  # the window's basis, refreshed on its first micro-batch
        if projector.due is not None:  # the matrices whose basis changed
          refresh = _changed_matrices(old, slot.bases[p.name],
                                      p.layout.batch_shape)
        return _Projected(None, slot.bases[p.name], r, refresh)
      if projecting:
        refresh = jnp.logical_and(refresh, request.first)
        if slot is not None:  # later micro-batches keep the window's basis
          old = jax.tree.map(
              lambda stored, window: jnp.where(request.first, stored, window),
              old, slot.bases[p.name])
      ctx = RefreshContext(
          step=step,
          key=jax.random.fold_in(base_key, group),
          params=None if w is None else p.layout.matricize(w),
          first_moment=first_moment,
          group=jnp.asarray(group, jnp.int32),
      )
      return _project_leaf(projector, p, g, old, refresh=refresh, ctx=ctx)

    projected = [
        None if p is None else project(p, group, g, w, m, r)
        for p, group, g, w, m, r in zip(
            plans, groups, grads, params_leaves, first_moments, accumulated)
    ]
    if projecting:
      request.post(LowRankAccumulator(
          projected=treedef.unflatten([
              optax.MaskedNode() if x is None else x.r for x in projected]),
          unprojected=treedef.unflatten([
              g if x is None else optax.MaskedNode()
              for g, x in zip(grads, projected)]),
          bases={p.name: x.basis for p, x in zip(plans, projected)
                 if p is not None},
      ), updates)
      return updates, state
    bases = {
        p.name: dataclasses.replace(state.bases[p.name], basis=x.basis)
        for p, x in zip(plans, projected) if p is not None
    }
    reduced = [g if x is None else x.r for g, x in zip(grads, projected)]
    reduced_tree = treedef.unflatten(reduced)

    # Step 2: the refresh policy on the moments of refreshed leaves.
    inner_state = moments.apply_on_refresh(
        policy,
        inner=inner_tx,
        inner_state=state.inner_state,
        treedef=treedef,
        changes=[
            None if x is None or x.refreshed is None else (
                x.refreshed,
                moments.SubspaceChange(
                    projector, state.bases[p.name].basis, x.basis))
            for p, x in zip(plans, projected)
        ],
        fresh_state_fn=lambda: inner_tx.init(reduced_tree),
    )

    # Step 3: the inner optimizer on the tree of projected gradients, with
    # the parameters projected alike.
    inner_params = None if params is None else treedef.unflatten([
        w if x is None else projector.down(x.basis, p.layout.matricize(w))
        for p, x, w in zip(plans, projected, params_leaves)
    ])
    inner_updates, inner_state = inner_tx.update(
        reduced_tree, inner_state, inner_params, **extra_args)

    # Step 4: each projected leaf's update back at full size.
    out, combine_states = [], {}
    for p, g, x, n in zip(plans, grads, projected,
                          treedef.flatten_up_to(inner_updates)):
      if x is None:
        out.append(n)
        continue
      u, combine_states[p.name] = _combine_leaf(
          combine, projector, p, g, x, n, scale,
          state.combine_states[p.name])
      out.append(u)

    return treedef.unflatten(out), LowRankState(
        count=optax.safe_int32_increment(step),
        bases=bases,
        combine_states=combine_states,
        inner_state=inner_state,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_leaf(plan, g, bases) -> None:
  """Raises, naming the leaf, if ``update`` sees a leaf ``init`` did not plan."""
  if plan is None:
    return
  stored = bases.get(plan.name)
  if stored is None or stored.matrix_shape != plan.layout.matrix_shape:
    raise ValueError(
        f"Leaf {plan.path} of shape {tuple(g.shape)} does not match the "
        f"optimizer state (built by init for "
        f"{'no such leaf' if stored is None else stored.matrix_shape}); "
        "re-run init for the new parameters.")
