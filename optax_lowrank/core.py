"""``lowrank_project``: run any optax transform in a low-rank gradient subspace.

Design: one ``inner`` state over the whole tree. The inner transform sees a
tree shaped like the parameters in which every projected leaf is replaced by
its projected gradient ``R``. This keeps tree-global inner transforms
meaningful (``clip_by_global_norm`` clips the norm of everything the inner
optimizer sees; one shared step count drives bias correction) and makes
``lowrank_project(inner)`` with nothing projected exactly ``inner``. Per-leaf
refresh policies (``reset``, ``rotate``) reach one leaf's moments with
``optax.tree.map_params``; leaves may refresh at different steps (``stagger``).

Each projected leaf decides its refresh with one ``lax.cond`` over the whole
stack of its matrices (batch axes are handled inside the branch by batched
linear algebra, never by a ``vmap`` around the ``cond``), so the subspace
computation runs on refresh steps only.

A projector that declares ``reads_first_moment`` (COAP) gets the leaf's first
moment from the inner state (``moments.first_moments``) as an extra operand
of its refresh; the core knows nothing else about the method.

Gradient accumulation in the subspace (``accumulation.MultiSteps``) splits an
update in two phases, asked for through the extra argument
``ACCUMULATION_ARG``: ``project`` (refresh if due, on the first micro-batch
only, and project) and ``apply`` (inner optimizer and combine rule on the
accumulated projected gradients); the projected gradients travel in
``LowRankState.projected``.
"""

from __future__ import annotations

import dataclasses
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
from optax_lowrank.projectors import Projector, svd


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
    bases: A tree like the parameters: ``LeafBasis`` for projected leaves,
      ``optax.MaskedNode`` for the others.
    combine_states: A tree like the parameters: the combine rule's state of
      each projected leaf (empty for stateless rules), ``optax.MaskedNode``
      for the others.
    inner_state: The inner transform's state over the projected tree.
    projected: ``()``, except while ``MultiSteps`` accumulates gradients in
      the subspace: then it carries projected gradients between it and this
      transform (a tree like ``bases``), never stored across steps.
  """

  count: jax.Array
  bases: Any
  combine_states: Any
  inner_state: optax.OptState
  projected: Any = ()


ACCUMULATION_ARG = "lowrank_accumulation"


class AccumulationStep(NamedTuple):
  """What ``MultiSteps`` asks of ``lowrank_project`` (passed as an extra arg).

  Attributes:
    phase: ``project``: refresh the subspace if due (only when ``first``),
      project the gradient and return it in ``LowRankState.projected``
      without updating anything else; ``apply``: run the inner optimizer and
      the combine rule on the projected gradients found in
      ``LowRankState.projected`` (no refresh, the full gradient unused).
    first: A bool scalar: this is the first micro-batch of the step.
  """

  phase: str
  first: Any = True


def _validate_scale(scale):
  if isinstance(scale, (int, float)) and not scale > 0:
    raise ValueError(f"`scale` must be positive, got {scale!r}")


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


def lowrank_project(
    inner: optax.GradientTransformation,
    rank: Union[int, float],
    *,
    update_proj_gap: int = 200,
    scale: Union[float, jax.Array] = 1.0,
    proj_type: str = "std",
    projector: Union[str, Projector] = "svd",
    granularity: Union[int, float] = 1,
    mask: shapes.MaskOrFn = None,
    dimension_numbers: shapes.DimensionNumbersOrFn = None,
    on_refresh: str = "keep",
    stagger: bool = False,
    combine: combine_lib.CombineRule = combine_lib.back_project(),
    unprojected: Optional[optax.GradientTransformation] = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  """Wraps ``inner`` so that it runs in a low-rank subspace of each gradient.

  For every projected leaf, the gradient ``G`` (viewed as matrices, see
  ``DimensionNumbers`` and ``shapes``) is projected to
  ``R = down(basis, G)``; ``inner`` updates the tree of projected gradients;
  its output ``N`` is combined back, by default ``U = scale · up(basis, N)``.
  The basis is renewed from ``G`` at step 0 and every ``update_proj_gap``
  steps. Leaves not projected (not selected by ``mask``, fewer than two axes,
  or smaller side ``<= rank``) go through ``inner`` at full shape, so with
  nothing projected this is exactly ``inner``.

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
    proj_type: For ``projector="svd"``: ``std``, ``reverse_std``, ``left``,
      ``right`` or ``full`` (galore-torch's meanings).
    projector: ``"svd"`` or a ``Projector`` instance.
    granularity: VLoRP's projection unit ``c``, a power of two: the
      projector works on each matrix regrouped row-major to ``(m·c, n/c)``
      (``m >= n``) or ``(m/c, n·c)``, see ``projectors.granular``. ``1``
      projects the matrix itself.
    mask: Which leaves may be projected: a bool pytree like the parameters, or a
      function of them returning one (like ``optax.masked``).
    dimension_numbers: ``DimensionNumbers`` for leaves with more than two axes
      (one for all, a pytree with ``None`` leaves, or a function of the
      parameters). Axes they do not name are batch axes.
    on_refresh: What happens to the inner moments of a refreshed leaf:
      ``keep`` (galore-torch), ``reset``, ``transfer`` (Flora: the first
      moment becomes ``down(new, up(old, M))``) or ``rotate`` (the same map;
      for orthonormal bases it re-expresses the moment in the new basis).
    stagger: Spread the leaves' refreshes over the gap (see
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
  if on_refresh not in moments.ON_REFRESH:
    raise ValueError(
        f"`on_refresh` must be one of {moments.ON_REFRESH}, got {on_refresh!r}"
    )
  if isinstance(projector, str):
    if projector != "svd":
      raise ValueError(
          f"`projector` must be 'svd' or a Projector instance, got "
          f"{projector!r}"
      )
    projector = svd(proj_type)
  elif not isinstance(projector, Projector):
    raise ValueError(
        f"`projector` must be 'svd' or a Projector instance, got {projector!r}"
    )
  if not isinstance(combine, combine_lib.CombineRule):
    raise ValueError(
        f"`combine` must be a combine.CombineRule (e.g. "
        f"combine.back_project()), got {combine!r}"
    )
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

  def plan(tree):
    return shapes.plan_leaves(
        tree, rank=rank, mask=mask, dimension_numbers=dimension_numbers
    )

  def inner_for(plans, treedef) -> optax.GradientTransformationExtraArgs:
    """``inner``, or ``inner`` and ``unprojected`` side by side."""
    if unprojected is None:
      return inner
    labels = treedef.unflatten(
        ["projected" if p is not None else "unprojected" for p in plans])
    return optax.partition(
        {"projected": inner, "unprojected": unprojected}, labels)

  def init_fn(params):
    plans, treedef = plan(params)
    bases, combine_states, proxies = [], [], []
    for leaf, p in zip(treedef.flatten_up_to(params), plans):
      if p is None:
        bases.append(optax.MaskedNode())
        combine_states.append(optax.MaskedNode())
        proxies.append(leaf)
        continue
      g = p.layout.matricize(jnp.zeros_like(leaf))
      info = shapes.MatrixInfo(
          p.layout.batch_shape, p.layout.m, p.layout.n, p.rank,
          shapes.explicit_spec(g),
      )
      try:
        basis = projector.init(info, leaf.dtype)
        combine_state = combine.init(info)
      except ValueError as e:
        raise ValueError(f"Leaf {p.path} of shape {leaf.shape}: {e}") from None
      bases.append(LeafBasis(basis, p.rank, p.layout.matrix_shape))
      combine_states.append(combine_state)
      proxies.append(projector.down(basis, g))
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
    return LowRankState(
        count=jnp.zeros([], jnp.int32),
        bases=treedef.unflatten(bases),
        combine_states=treedef.unflatten(combine_states),
        inner_state=inner_state,
    )

  def refresh_leaf(g, basis, key, step, *first_moment):
    first_moment = [quantize.dequantize_tree(m) for m in first_moment]
    new = projector.refresh(g.astype(jnp.float32), basis, key, step,
                            *first_moment)
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

  def update_fn(updates, state, params=None, **extra_args):
    accumulation = extra_args.pop(ACCUMULATION_ARG, None)
    applying = accumulation is not None and accumulation.phase == "apply"
    plans, treedef = plan(updates)
    inner_tx = inner_for(plans, treedef)
    num_projected = sum(p is not None for p in plans)
    if applying and combine.reads_gradient and num_projected:
      raise ValueError(
          "This lowrank_project's combine rule reads the full gradient (as "
          "APOLLO, Fira, FRUGAL and Flora do), so its gradients cannot be "
          "accumulated in the subspace; use optax.MultiSteps instead."
      )
    grads = treedef.flatten_up_to(updates)
    old_bases = treedef.flatten_up_to(state.bases)
    stored = (treedef.flatten_up_to(state.projected) if applying
              else [None] * len(grads))
    params_leaves = (
        [None] * len(grads) if params is None
        else treedef.flatten_up_to(params)
    )
    step = state.count
    base_key = jax.random.fold_in(jax.random.key(seed), step)
    first_moments = (
        moments.first_moments(inner_tx, state.inner_state, treedef)
        if projector.reads_first_moment and not applying
        else [None] * len(grads))

    matrices, new_bases, reduced, inner_params = [], [], [], []
    refreshed, rotations = [], []
    for g, old, w, r_acc, m, p in zip(
        grads, old_bases, params_leaves, stored, first_moments, plans):
      if p is None:
        matrices.append(None)
        new_bases.append(old)
        reduced.append(g)
        inner_params.append(w)
        refreshed.append(None)
        rotations.append(None)
        continue
      if applying:  # the subspace was set by the accumulation's first step
        basis = old.basis
        matrices.append(None)
        reduced.append(r_acc)
        refreshed.append(None)
        rotations.append(None)
      else:
        g2 = p.layout.matricize(g)
        do_refresh = refresh_schedule(step, p.index, num_projected)
        if accumulation is not None:
          do_refresh = jnp.logical_and(do_refresh, accumulation.first)
        key = jax.random.fold_in(base_key, p.index)
        basis = jax.lax.cond(
            do_refresh,
            refresh_leaf,
            lambda g, b, *_: b,
            g2, old.basis, key, step, *(() if m is None else (m,)),
        )
        matrices.append(g2)
        reduced.append(projector.down(basis, g2))
        refreshed.append(do_refresh)
        rotations.append(
            lambda m, old=old.basis, new=basis: projector.down(
                new, projector.up(old, m)
            ).astype(m.dtype)
        )
      new_bases.append(dataclasses.replace(old, basis=basis))
      inner_params.append(
          None if w is None else projector.down(basis, p.layout.matricize(w))
      )
    reduced_tree = treedef.unflatten(reduced)
    inner_state = moments.apply_on_refresh(
        on_refresh,
        inner=inner_tx,
        inner_state=state.inner_state,
        treedef=treedef,
        refreshed=[None] * len(plans) if applying else refreshed,
        rotate=rotations,
        fresh_state_fn=lambda: inner_tx.init(reduced_tree),
    )
    if accumulation is not None and accumulation.phase == "project":
      projected = [
          optax.MaskedNode() if p is None else r
          for r, p in zip(reduced, plans)
      ]
      return updates, state._replace(
          bases=treedef.unflatten(new_bases),
          inner_state=inner_state,
          projected=treedef.unflatten(projected),
      )

    inner_updates, inner_state = inner_tx.update(
        reduced_tree,
        inner_state,
        None if params is None else treedef.unflatten(inner_params),
        **extra_args,
    )

    out, new_combine_states = [], []
    for g, g2, r, n, b, c, p in zip(
        grads, matrices, reduced, treedef.flatten_up_to(inner_updates),
        new_bases, treedef.flatten_up_to(state.combine_states), plans,
    ):
      if p is None:
        out.append(n)
        new_combine_states.append(c)
        continue
      u, c = combine.apply(projector, b.basis, g2, r, n, scale, c)
      out.append(p.layout.unmatricize(u).astype(g.dtype))
      new_combine_states.append(c)

    new_state = LowRankState(
        count=optax.safe_int32_increment(step),
        bases=treedef.unflatten(new_bases),
        combine_states=treedef.unflatten(new_combine_states),
        inner_state=inner_state,
    )
    return treedef.unflatten(out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
