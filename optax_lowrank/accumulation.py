"""Gradient accumulation with ``optax.MultiSteps``'s meaning, in the subspace.

``optax.MultiSteps(tx, k)`` keeps a full-size running mean ``Ḡ`` of ``k``
micro-batch gradients and calls ``tx`` once on it. ``MultiSteps`` here gives
the same trajectory (to float rounding) while keeping, for every leaf that a
``lowrank_project`` inside ``tx`` projects, only the mean of the *projected*
micro-gradients: projection is linear, so ``down(B, Ḡ) = mean down(B, Gᵢ)``
for the window's basis ``B``.

Protocol (``core.AccumulationStep``, passed as the extra argument
``core.ACCUMULATION_ARG``; ``MultiSteps`` never looks for a ``lowrank_project``
in ``tx`` or its state):

1. ``project``, on every micro-batch: ``tx.update`` runs with a request; each
   ``lowrank_project`` met, wherever it sits (``optax.chain``, ``masked``,
   ``partition``, ``inject_hyperparams``, ...), takes the next slot, refreshes
   its bases if due (first micro-batch only), and posts a
   ``core.LowRankAccumulator``: the projected gradient at projected leaves,
   its *input* at the others, and the window's bases. Everything else that
   call computes is discarded (XLA removes it). ``MultiSteps`` adds the posted
   values into one running mean per slot, at their size.
2. ``apply``, on the ``k``-th micro-batch: ``tx.update`` runs once on the
   means. Each ``lowrank_project`` takes its slot's means as its input and
   ignores the incoming updates; leaves that reach the result otherwise (no
   ``lowrank_project`` handles them, or a transform reads them besides one)
   get ``MultiSteps``'s own full-size running mean of the raw gradient.

For this to equal ``optax.MultiSteps``, what precedes a ``lowrank_project``
must commute with the mean: be linear in the gradient (scaling by a constant
or a schedule, ``masked``/``partition`` routing), or affine (adding decayed
weights) when averaging. ``init`` checks it on the traced program (the
``jaxpr`` from the gradients to each ``lowrank_project``'s input) and refuses
a non-linear one, such as a global-norm clip before the projection, naming
the equation and the transform that applies it. It also finds which raw
gradients the ``apply`` call reads, from the same kind of trace, and checks
that no ``lax.cond``, ``scan``, ``vmap`` or ``jit`` between ``MultiSteps`` and
a ``lowrank_project`` traps the posted values in an inner trace.

The one difference from ``optax.MultiSteps``: on a refresh step an SVD-type
projector finds the basis from the first micro-batch's gradient (the mean is
not known yet); random projectors draw the same basis either way.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.extend import core as jex_core

from optax_lowrank import core


class MultiStepsState(NamedTuple):
  """State of ``MultiSteps``.

  Attributes:
    mini_step: Micro-batches accumulated in the current window (int32).
    gradient_step: Optimizer steps taken (int32).
    inner_opt_state: The wrapped optimizer's state.
    acc_grads: Running mean (or sum) of the raw gradients of the leaves the
      wrapped optimizer reads directly at the apply step (leaves no
      ``lowrank_project`` handles), in ``accumulator_dtype``;
      ``optax.MaskedNode()`` at the others.
    acc_projected: One ``core.LowRankAccumulator`` per ``lowrank_project``
      met in the wrapped optimizer (call order): running means of its
      projected gradients (projected size, their dtype) and of its input at
      the leaves it does not project (``accumulator_dtype``), and the bases
      of the current window.
    skip_state: What ``should_skip_update_fn`` returned last.
  """

  mini_step: jax.Array
  gradient_step: jax.Array
  inner_opt_state: Any
  acc_grads: Any
  acc_projected: tuple[core.LowRankAccumulator, ...]
  skip_state: Any = ()


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


# ---------------------------------------------------------------------------
# What the traced program does with the gradients (init-time checks).

_CONST, _LINEAR, _AFFINE, _NONLINEAR = range(4)

# One operand carries the gradient, linearly; the others (indices) must not.
_STRUCTURAL = frozenset({
    "neg", "reshape", "broadcast_in_dim", "transpose", "squeeze",
    "expand_dims", "slice", "rev", "copy", "copy_p", "reduce_sum", "cumsum",
    "real", "imag", "conj", "reduce_precision", "sharding_constraint",
    "reshard", "mesh_cast", "dynamic_slice", "gather", "convert_element_type",
    "split",
})
# Each output is its operand (n to n).
_ELEMENTWISE_IDENTITY = frozenset({"device_put", "optimization_barrier"})
# Sums or pieces of their operands (a constant operand makes them affine).
_SUM_LIKE = frozenset({"add", "sub", "add_any", "concatenate", "select_n",
                       "dynamic_update_slice", "pad"})
# Bilinear: linear when one operand is constant.
_PRODUCT_LIKE = frozenset({"mul", "dot_general"})


class _Value(NamedTuple):
  """What a traced value is, as a function of the gradient leaves."""

  deps: int  # bit i: depends on gradient leaf i
  level: int  # _CONST, _LINEAR, _AFFINE or _NONLINEAR in the gradient
  origin: Any = None  # the equation that raised the level above linear
  zero: bool = False  # a constant known to be zero


_CONSTANT = _Value(0, _CONST)


def _is_zero_literal(value) -> bool:
  try:
    return bool(np.all(np.asarray(value) == 0))
  except Exception:  # noqa: BLE001 - an opaque literal is not known to be zero
    return False


def _sub_jaxpr(eqn):
  """The sub-jaxpr of a call-like equation (jit, custom_jvp, remat), or None."""
  found = []
  for value in eqn.params.values():
    for v in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(v, jex_core.ClosedJaxpr):
        found.append(v.jaxpr)
      elif isinstance(v, jex_core.Jaxpr):
        found.append(v)
  if len(found) != 1:
    return None
  sub = found[0]
  if (len(sub.invars) != len(eqn.invars)
      or len(sub.outvars) != len(eqn.outvars)):
    return None
  return sub


def _raise_to(level, origin, operands, eqn):
  """``level`` with the origin of the operand that had it, or ``eqn``."""
  for x in operands:
    if x.level == level and level > _LINEAR:
      return level, x.origin
  return level, (eqn if level > _LINEAR else origin)


def _transfer(eqn, xs: list[_Value]) -> list[_Value]:
  name = eqn.primitive.name
  n_out = len(eqn.outvars)
  deps = 0
  for x in xs:
    deps |= x.deps
  if all(x.level == _CONST for x in xs):
    zero = bool(xs) and (
        (name in _STRUCTURAL and xs[0].zero)
        or (name == "mul" and any(x.zero for x in xs)))
    return [_Value(0, _CONST, zero=zero)] * n_out
  sub = _sub_jaxpr(eqn)
  if sub is not None:
    return _walk(sub, xs)

  def nonlinear():
    worst = next((x for x in xs if x.level == _NONLINEAR), None)
    return [_Value(deps, _NONLINEAR, eqn if worst is None else worst.origin)
            ] * n_out

  if name in _ELEMENTWISE_IDENTITY and n_out == len(xs):
    return list(xs)
  if name in _STRUCTURAL:
    if any(x.level != _CONST for x in xs[1:]):
      return nonlinear()
    if name == "convert_element_type" and not jnp.issubdtype(
        eqn.params.get("new_dtype", jnp.float32), jnp.inexact):
      return nonlinear()
    x = xs[0]
    return [_Value(deps, x.level, x.origin)] * n_out
  if name in _SUM_LIKE:
    if name == "select_n":
      control, parts = xs[:1], xs[1:]
    elif name == "dynamic_update_slice":
      control, parts = xs[2:], xs[:2]
    else:
      control, parts = [], xs
    if any(x.level != _CONST for x in control):
      return nonlinear()
    level = max(x.level for x in parts)
    if level == _NONLINEAR:
      return nonlinear()
    if any(x.level == _CONST and not x.zero for x in parts):
      level = max(level, _AFFINE)
    level, origin = _raise_to(level, None, parts, eqn)
    return [_Value(deps, level, origin)] * n_out
  if name in _PRODUCT_LIKE or name == "div":
    varying = [x for x in xs if x.level != _CONST]
    if name == "div" and xs[1].level != _CONST:
      return nonlinear()
    if len(varying) != 1 or varying[0].level == _NONLINEAR:
      return nonlinear()
    x = varying[0]
    return [_Value(deps, x.level, x.origin)] * n_out
  return nonlinear()


def _walk(jaxpr, inputs: list[_Value]) -> list[_Value]:
  """Each output of ``jaxpr`` as a ``_Value`` of its inputs' ``_Value``s."""
  env: dict[Any, _Value] = dict(zip(jaxpr.invars, inputs))

  def read(v) -> _Value:
    if isinstance(v, jex_core.Literal):
      return _Value(0, _CONST, zero=_is_zero_literal(v.val))
    return env.get(v, _CONSTANT)  # constvars are constants

  for eqn in jaxpr.eqns:
    outs = _transfer(eqn, [read(v) for v in eqn.invars])
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


def _short_path(file_name: str) -> str:
  marker = "site-packages" + os.sep
  if marker in file_name:
    return file_name.split(marker, 1)[1]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return os.path.relpath(file_name, root) if file_name.startswith(root) else (
      file_name)


def _where(eqn) -> str:
  """``eqn``'s primitive and where it was applied, innermost first."""
  frames = []
  try:
    traceback = eqn.source_info.traceback
    frames = list(traceback.frames) if traceback is not None else []
  except Exception:  # noqa: BLE001 - no traceback kept: name the primitive only
    pass
  jax_dir = os.path.dirname(os.path.abspath(jax.__file__)) + os.sep
  here = os.path.abspath(__file__)
  shown = []
  for f in frames:  # innermost first
    path = os.path.abspath(f.file_name)
    if path == here:
      break
    if not path.startswith(jax_dir):
      shown.append(f)
  prim = f"`{eqn.primitive.name}`"
  if not shown:
    return prim
  owner = next((f.function_name.split(".<locals>")[0] for f in shown
                if ".<locals>.update" in f.function_name), None)
  trail = " ← ".join(
      f"{f.function_name} ({_short_path(f.file_name)}:{f.line_num})"
      for f in shown[:6])
  head = f"{owner}: " if owner else ""
  return f"{head}{prim} at {trail}"


def _tracer_type():
  return getattr(jax.core, "Tracer", None)


def _trapped(closed, outvars) -> bool:
  """Whether an output is a tracer of another trace (a leaked inner value)."""
  tracer = _tracer_type()
  consts = dict(zip(closed.jaxpr.constvars, closed.consts))
  for v in outvars:
    if isinstance(v, jex_core.Literal) or v not in consts:
      continue
    c = consts[v]
    if (isinstance(c, tracer) if tracer is not None
        else type(c).__name__.endswith("Tracer")):
      return True
  return False


# ---------------------------------------------------------------------------


def _constant_k(k):
  if (isinstance(k, bool) or not isinstance(k, (int, np.integer))
      or k < 1):
    raise ValueError(
        f"`every_k_schedule` must be a positive int or a callable of the "
        f"gradient step, got {k!r}")
  return int(k)


class MultiSteps:
  """``optax.MultiSteps``, with projected leaves accumulated in their subspace.

  Same arguments, methods and trajectory as ``optax.MultiSteps(opt,
  every_k_schedule)``: ``update`` returns zeros on the first ``k − 1``
  micro-batches of a window and, on the ``k``-th, ``opt``'s update for the
  mean (or sum) of the window's gradients. For every leaf that a
  ``lowrank_project`` inside ``opt`` projects, only the mean of the projected
  micro-gradients is kept (projected size), plus the window's basis; a
  full-size running mean exists only for the other leaves. ``opt`` may be
  any chain around one or more ``lowrank_project``: weight decay and
  learning-rate schedules after it, ``optax.masked`` / ``optax.partition`` /
  ``optax.inject_hyperparams`` around it; see the module docstring for the
  protocol.

  Trajectory: equal to ``optax.MultiSteps`` to float rounding, except on a
  step where an SVD-type projector refreshes: its basis is then found from
  the window's first micro-batch, where ``optax.MultiSteps`` would use the
  mean (random projectors draw the same basis either way).

  Refused at ``init`` (``ValueError``): a transform before a
  ``lowrank_project`` that is not linear in the gradient (e.g.
  ``optax.clip_by_global_norm``: the mean's norm needs the full-size mean;
  put the clip inside ``lowrank_project``'s inner optimizer, clip each
  micro-batch yourself, or use ``optax.MultiSteps``), affine ones with
  ``use_grad_mean=False`` (a sum adds the constant ``k`` times), and a
  ``lax.cond``, ``scan``, ``vmap`` or ``jit`` between this wrapper and a
  ``lowrank_project``.

  Combine rules that read the full gradient (APOLLO, Fira, FRUGAL, Flora)
  cannot work from projected means: their ``lowrank_project`` takes no part
  in the protocol, and the raw gradients it reads are accumulated at full
  size. This is ``optax.MultiSteps`` exactly (refresh steps included, any
  transform before it allowed, e.g. Flora's factored normalization), with no
  memory saved; refusing them instead would only send the user to
  ``optax.MultiSteps`` for the same result.

  Args:
    opt: The optimizer to wrap, any optax transformation.
    every_k_schedule: Micro-batches per step: a positive int, or a function
      of the gradient step returning one (as ``optax.MultiSteps``).
    use_grad_mean: Average the micro-batch gradients (default) or sum them.
    should_skip_update_fn: As ``optax.MultiSteps``: ``fn(updates,
      gradient_step, params) -> (skip, skip_state)``; a skipped micro-batch
      is neither accumulated nor counted, and ``skip_state`` is stored.
    accumulator_dtype: dtype of the full-size accumulators (float32); the
      projected ones keep the projected gradient's dtype.

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_lowrank
    >>> params = {"w": jnp.ones((64, 32)), "b": jnp.zeros(32)}
    >>> tx = optax.chain(
    ...     optax_lowrank.lowrank_project(optax.scale_by_adam(), rank=4),
    ...     optax.add_decayed_weights(1e-2), optax.scale_by_learning_rate(1e-3))
    >>> opt = optax_lowrank.MultiSteps(tx, every_k_schedule=4)
    >>> state = opt.init(params)
    >>> for _ in range(4):
    ...   updates, state = opt.update(params, state, params)
    >>> bool(opt.has_updated(state))
    True
    >>> jax.tree.map(jnp.shape, state.acc_projected[0].projected)
    {'b': MaskedNode(), 'w': (64, 4)}

  References:
    Wang et al., `Memory-Efficient LLM Training by Various-Grained Low-Rank
    Projection of Gradients <https://arxiv.org/abs/2505.01744>`_, ICML 2025
    (ProjFactor under gradient accumulation); optax's ``MultiSteps``.
  """

  def __init__(
      self,
      opt: optax.GradientTransformation,
      every_k_schedule: Union[int, Callable[[jax.Array], jax.Array]],
      use_grad_mean: bool = True,
      should_skip_update_fn: Optional[Callable[..., Any]] = None,
      accumulator_dtype: Any = jnp.float32,
  ):
    if callable(every_k_schedule):
      self._every_k_schedule = every_k_schedule
    else:
      k = _constant_k(every_k_schedule)
      self._every_k_schedule = lambda step: k
    self._opt = optax.with_extra_args_support(opt)
    self._use_grad_mean = bool(use_grad_mean)
    self._may_skip = should_skip_update_fn is not None
    if should_skip_update_fn is None:

      def should_skip_update_fn(*unused_args, **unused_kwargs):
        return jnp.array(False, dtype=jnp.bool_), ()

    self._should_skip_update_fn = should_skip_update_fn
    self._accumulator_dtype = jnp.dtype(accumulator_dtype)

  @property
  def inner_opt(self) -> optax.GradientTransformationExtraArgs:
    """The wrapped optimizer."""
    return self._opt

  # -- the two phases ------------------------------------------------------

  def _project(self, grads, opt_state, params, first, inbox, extra_args, *,
               record_inputs=False) -> core.AccumulationStep:
    request = core.AccumulationStep("project", first, inbox, record_inputs)
    self._opt.update(grads, opt_state, params, **extra_args,
                     **{core.ACCUMULATION_ARG: request})
    return request

  def _apply_raw(self, grads, opt_state, params, inbox, extra_args):
    return self._opt.update(
        grads, opt_state, params, **extra_args,
        **{core.ACCUMULATION_ARG: core.AccumulationStep("apply", inbox=inbox)})

  # -- init ----------------------------------------------------------------

  def _check_program(self, zeros, opt_state, params):
    """Refuses, from the traced project phase, programs whose accumulation at
    projected size would not have ``optax.MultiSteps``'s meaning."""
    counts = {}

    def probe(grads, opt_state, params):
      request = self._project(grads, opt_state, params, False, (), {},
                              record_inputs=True)
      inputs = [jax.tree.leaves(x) for x in request.inputs]
      posted = [jax.tree.leaves(m) for m in request.outbox]
      counts["inputs"] = [len(x) for x in inputs]
      counts["posted"] = sum(len(x) for x in posted)
      return inputs, posted

    try:
      closed = jax.make_jaxpr(probe)(zeros, opt_state, params)
      posted = sum(counts["inputs"]) + counts["posted"]
      trapped = _trapped(closed, closed.jaxpr.outvars[:posted])
    except jax.errors.UnexpectedTracerError:  # a JAX that catches it itself
      trapped = True
    if trapped:
      raise ValueError(
          "MultiSteps: a lowrank_project inside the optimizer runs under a "
          "lax.cond, lax.scan, vmap or jit placed between it and MultiSteps "
          "(e.g. optax.conditionally_transform, or a jitted update), so the "
          "projected gradients it hands back are trapped in that inner "
          "trace. Call the lowrank_project directly from the chain, or use "
          "optax.MultiSteps (full-size accumulation).")
    num_grads = len(jax.tree.leaves(zeros))
    inputs = [_Value(1 << i, _LINEAR) for i in range(num_grads)]
    inputs += [_CONSTANT] * (len(closed.jaxpr.invars) - num_grads)
    found = _walk(closed.jaxpr, inputs)[:sum(counts["inputs"])]
    start = 0
    for slot, n in enumerate(counts["inputs"]):
      for value in found[start:start + n]:
        bad = value.level == _NONLINEAR or (
            value.level == _AFFINE and not self._use_grad_mean)
        if bad:
          what = ("is not linear in the gradient"
                  if value.level == _NONLINEAR else
                  "adds a constant to the gradient (affine), which a sum "
                  "(use_grad_mean=False) would add k times")
          origin = ("" if value.origin is None
                    else f": {_where(value.origin)}")
          raise ValueError(
              f"MultiSteps: the input of lowrank_project #{slot + 1} "
              f"{what}{origin}. Gradients are accumulated at projected size "
              "after the transforms before a lowrank_project, so these must "
              "commute with the mean (scaling, schedules, masking and "
              "partitioning do; a global-norm clip of the mean gradient "
              "needs its full-size norm). Move the transform after the "
              "lowrank_project or into its inner optimizer, apply it to each "
              "micro-batch before MultiSteps, or use optax.MultiSteps.")
      start += n

  def _raw_leaves(self, zeros, opt_state, params, inbox) -> list[bool]:
    """Which gradient leaves the apply step reads (besides the means)."""
    closed = jax.make_jaxpr(
        lambda g, s, p, i: self._apply_raw(g, s, p, i, {}))(
            zeros, opt_state, params, inbox)
    num_grads = len(jax.tree.leaves(zeros))
    inputs = [_Value(1 << i, _LINEAR) for i in range(num_grads)]
    inputs += [_CONSTANT] * (len(closed.jaxpr.invars) - num_grads)
    deps = 0
    for value in _walk(closed.jaxpr, inputs):
      deps |= value.deps
    return [bool(deps >> i & 1) for i in range(num_grads)]

  def init(self, params) -> MultiStepsState:
    """The initial state.

    Traces the wrapped optimizer (no computation): refuses, with a
    ``ValueError``, programs whose accumulation at projected size would not
    have ``optax.MultiSteps``'s meaning (see the class docstring), and shapes
    the accumulators.

    Args:
      params: The parameters.

    Returns:
      A ``MultiStepsState``.
    """
    opt_state = self._opt.init(params)
    zeros = optax.tree.zeros_like(params)
    self._check_program(zeros, opt_state, params)
    # The window's bases start as the stored ones (first=False: no refresh).
    outbox = self._project(zeros, opt_state, params, False, (), {}).outbox
    acc_projected = tuple(
        core.LowRankAccumulator(
            projected=optax.tree.zeros_like(m.projected),
            unprojected=optax.tree.zeros_like(
                m.unprojected, dtype=self._accumulator_dtype),
            bases=m.bases)
        for m in outbox)
    raw = self._raw_leaves(zeros, opt_state, params, acc_projected)
    treedef = jax.tree.structure(params)
    acc_grads = treedef.unflatten([
        jnp.zeros_like(p, dtype=self._accumulator_dtype) if r
        else optax.MaskedNode()
        for p, r in zip(treedef.flatten_up_to(params), raw)
    ])
    gradient_step = jnp.zeros([], jnp.int32)
    _, skip_state = self._should_skip_update_fn(zeros, gradient_step, params)
    return MultiStepsState(
        mini_step=jnp.zeros([], jnp.int32),
        gradient_step=gradient_step,
        inner_opt_state=opt_state,
        acc_grads=acc_grads,
        acc_projected=acc_projected,
        skip_state=skip_state,
    )

  # -- update --------------------------------------------------------------

  def _add(self, acc, x, n):
    x = x.astype(acc.dtype)
    new = acc + (x - acc) / (n + 1) if self._use_grad_mean else acc + x
    return new.astype(acc.dtype)

  def _accumulated(self, updates, state, params, extra_args):
    """``state`` with this micro-batch added (``mini_step`` + 1), and the
    posted values (their dtypes are the apply step's)."""
    n = state.mini_step
    outbox = self._project(updates, state.inner_opt_state, params, n == 0,
                           state.acc_projected, extra_args).outbox
    want = jax.tree.structure(tuple(
        (a.projected, a.unprojected) for a in state.acc_projected))
    got = jax.tree.structure(tuple(
        (m.projected, m.unprojected) for m in outbox))
    if want != got:
      raise ValueError(
          "MultiSteps: the lowrank_project transforms inside the optimizer "
          "posted other values than at init (a jit between them and "
          "MultiSteps, or a different parameter tree?): expected "
          f"{want}, got {got}. Re-run init.")
    acc_projected = tuple(
        core.LowRankAccumulator(
            projected=jax.tree.map(lambda a, x: self._add(a, x, n),
                                   acc.projected, m.projected),
            unprojected=jax.tree.map(lambda a, x: self._add(a, x, n),
                                     acc.unprojected, m.unprojected),
            bases=m.bases)
        for acc, m in zip(state.acc_projected, outbox))
    acc_grads = jax.tree.map(
        lambda a, g: a if _is_masked(a) else self._add(a, g, n),
        state.acc_grads, updates, is_leaf=_is_masked)
    return state._replace(
        mini_step=optax.safe_int32_increment(n),
        acc_grads=acc_grads,
        acc_projected=acc_projected,
    ), outbox

  def _apply(self, state, updates, params, outbox, extra_args):
    """The wrapped optimizer, once, on the accumulated means."""
    inbox = tuple(
        core.LowRankAccumulator(
            projected=optax.tree.cast_like(acc.projected, m.projected),
            unprojected=optax.tree.cast_like(acc.unprojected, m.unprojected),
            bases=acc.bases)
        for acc, m in zip(state.acc_projected, outbox))
    grads = jax.tree.map(
        lambda a, g: jnp.zeros_like(g) if _is_masked(a) else a.astype(g.dtype),
        state.acc_grads, updates, is_leaf=_is_masked)
    return self._apply_raw(grads, state.inner_opt_state, params, inbox,
                           extra_args)

  def _skip(self, updates, state, params):
    skip, skip_state = self._should_skip_update_fn(
        updates, state.gradient_step, params)
    skip = jnp.asarray(skip)
    if (skip.dtype, skip.shape) != (jnp.bool_, ()):
      raise ValueError(
          "The `should_skip_update_fn` function should return a boolean "
          f"scalar array, but it returned an array of dtype {skip.dtype} and "
          f"shape {skip.shape}")
    return skip, skip_state

  def accumulate(self, updates, state: MultiStepsState, params=None,
                 **extra_args) -> MultiStepsState:
    """Adds one micro-batch to the window, never emitting an update.

    For a training step that scans its micro-batches: call this on the first
    ``k − 1`` and ``update`` on the last (the optimizer is then compiled
    once, outside the scan). ``should_skip_update_fn`` applies as in
    ``update``.

    Args:
      updates: The micro-batch's gradients.
      state: The current state.
      params: The parameters (as for ``update``).
      **extra_args: Extra arguments of the wrapped optimizer.

    Returns:
      The new state.

    Example:
      >>> import jax.numpy as jnp, optax, optax_lowrank
      >>> params = {"w": jnp.ones((16, 8))}
      >>> opt = optax_lowrank.MultiSteps(optax_lowrank.galore(1e-2, rank=2), 2)
      >>> state = opt.accumulate(params, opt.init(params), params)
      >>> updates, state = opt.update(params, state, params)
      >>> bool(opt.has_updated(state))
      True
    """
    skip, skip_state = self._skip(updates, state, params)
    added, _ = self._accumulated(updates, state, params, extra_args)
    added = added._replace(skip_state=skip_state)
    if not self._may_skip:
      return added
    return jax.lax.cond(skip, lambda old, new: old, lambda old, new: new,
                        state._replace(skip_state=skip_state), added)

  def update(self, updates, state: MultiStepsState, params=None,
             **extra_args) -> tuple[Any, MultiStepsState]:
    """Accumulates one micro-batch; the real update on every ``k``-th.

    Args:
      updates: The micro-batch's gradients.
      state: The current state.
      params: The parameters.
      **extra_args: Extra arguments of the wrapped optimizer.

    Returns:
      Zeros, or on the window's last micro-batch the wrapped optimizer's
      update for the accumulated gradients; and the new state.
    """
    k = self._every_k_schedule(state.gradient_step)
    skip, skip_state = self._skip(updates, state, params)
    # Projected outside any lax.cond, so that the posted values stay in
    # this trace.
    added, outbox = self._accumulated(updates, state, params, extra_args)
    added = added._replace(skip_state=skip_state)
    emit = state.mini_step == k - 1
    out_shape = jax.eval_shape(
        lambda s: self._apply(s, updates, params, outbox, extra_args)[0],
        added)

    def skipped(added):
      del added
      return (optax.tree.zeros_like(out_shape),
              state._replace(skip_state=skip_state))

    def held(added):
      return (optax.tree.zeros_like(out_shape),
              added._replace(mini_step=added.mini_step % k))

    def emitted(added):
      new_updates, opt_state = self._apply(added, updates, params, outbox,
                                           extra_args)
      # As optax.MultiSteps: the state keeps its dtypes (e.g. float32
      # moments of bfloat16 gradients).
      opt_state = jax.tree.map(
          lambda new, old: new if new.dtype == old.dtype
          else new.astype(old.dtype), opt_state, added.inner_opt_state)
      return new_updates, added._replace(
          mini_step=jnp.zeros([], jnp.int32),
          gradient_step=optax.safe_int32_increment(added.gradient_step),
          inner_opt_state=opt_state,
          acc_grads=optax.tree.zeros_like(added.acc_grads),
          acc_projected=tuple(
              a._replace(projected=optax.tree.zeros_like(a.projected),
                         unprojected=optax.tree.zeros_like(a.unprojected))
              for a in added.acc_projected),
      )

    if not self._may_skip:
      return jax.lax.cond(emit, emitted, held, added)
    branch = jnp.where(skip, 0, jnp.where(emit, 2, 1))
    return jax.lax.switch(branch, (skipped, held, emitted), added)

  def has_updated(self, state: MultiStepsState) -> jax.Array:
    """True right after a step that produced a real update."""
    return jnp.logical_and(state.mini_step == 0, state.gradient_step > 0)

  def gradient_transformation(self) -> optax.GradientTransformationExtraArgs:
    """This wrapper as an ``optax.GradientTransformationExtraArgs``."""
    return optax.GradientTransformationExtraArgs(self.init, self.update)

  @staticmethod
  def accumulates_projected(state: MultiStepsState) -> bool:
    """Whether any leaf is accumulated at projected size in ``state``.

    Args:
      state: A ``MultiStepsState`` (or its ``jax.eval_shape``).

    Returns:
      False when every accumulator is full-size: nothing is projected, or
      only combine rules that read the full gradient are used.
    """
    return any(jax.tree.leaves(a.projected) for a in state.acc_projected)
