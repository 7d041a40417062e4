"""Published low-rank methods as ready optimizers.

Each alias is a chain like ``optax.adamw``'s: ``lowrank_project`` around the
method's inner optimizer, then weight decay and the learning rate. Its
signature lists the method's own hyper-parameters, then the shared options
that every alias takes with the same names, defaults and checks (their
documentation, ``SHARED_OPTIONS``, is written once and appended to each
alias's Args):

- ``mask``: the weight-decay mask, exactly as in ``optax.adamw`` and
  ``optax.contrib.galore`` (a port of ``optax.adamw(lr, mask=decay_mask)``
  keeps its meaning);
- ``projection_mask``: which leaves may be projected (``lowrank_project``'s
  name);
- ``dimension_numbers``, ``stagger``, ``seed``, ``group_fn``: as
  ``lowrank_project``'s;
- ``state_dtype``: ``None``, or ``"int8"`` for block-wise quantized inner
  moments;
- ``on_refresh``: on the aliases whose method leaves the choice open (GaLore,
  8-bit GaLore, APOLLO, Fira, DCT-AdamW, AdaRankGrad); the others fix it.

Every argument is checked when the alias is called, by name (one check per
name, shared by all aliases), and an error names the argument as passed.
Integers may be numpy or JAX integer scalars; bools are refused where a
number is expected, and so are ``inf`` and ``nan``.

``optax.inject_hyperparams``: numbers that do not fix shapes (the learning
rate, ``b1``, ``b2``, ``eps``, ``weight_decay``, ``scale``, ...) may be arrays
or schedules (arrays are not checked). Arguments that fix shapes or
schedules, and callables that are not schedules (masks, dimension numbers),
must be static: ``STATIC_ARGS[name]`` (or ``static_args(alias)``) lists them
for each alias::

  tx = optax.inject_hyperparams(
      optax_lowrank.galore, static_args=optax_lowrank.STATIC_ARGS["galore"])(
      learning_rate=schedule, rank=128, mask=decay_mask_fn)

Without them, ``inject_hyperparams`` takes a callable ``mask`` for a schedule
and turns every other number into an array. So that optax's own recipe
(``static_args=("rank", "update_proj_gap")``, as in its contrib tests) still
works, integer arguments that fix shapes other than ``rank`` and
``update_proj_gap`` default to ``None``, standing for the value their
description gives: left at their default, they are not numbers and stay
static. An array given for one of them is an error naming ``STATIC_ARGS``.

Variants are ``functools.partial`` objects with documentation of their own,
as ``optax.nadamw`` is: ``apollo_mini`` and ``galore_8bit``.
"""

from __future__ import annotations

import functools
import inspect
import math
import operator
import warnings
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_lowrank import blockwise
from optax_lowrank import combine as combine_lib
from optax_lowrank import inner as inner_lib
from optax_lowrank import moments
from optax_lowrank import projectors as projectors_lib
from optax_lowrank import quantize as quantize_lib
from optax_lowrank import sampling
from optax_lowrank import schedules as schedules_lib
from optax_lowrank import shapes
from optax_lowrank import unbiased as gum_lib
from optax_lowrank import weight_norm as weight_norm_lib
from optax_lowrank.core import lowrank_project
from optax_lowrank.projectors import Projector
from optax_lowrank.projectors import matmul
from optax_lowrank.projectors.blocks import ORDERS
from optax_lowrank.projectors.dct import NORMS
from optax_lowrank.projectors.grass import SELECTIONS
from optax_lowrank.projectors.random import DISTRIBUTIONS

# ---------------------------------------------------------------------------
# Checks, one per argument name.
# ---------------------------------------------------------------------------

_INF = float("inf")


def _is_array(value) -> bool:
  """An array (possibly traced, from ``inject_hyperparams``): not checked."""
  return isinstance(value, (jax.Array, np.ndarray))


def _real(value) -> Optional[float]:
  """``value`` as a float if it is a real number (not a bool), else ``None``."""
  if isinstance(value, (bool, np.bool_)):
    return None
  if isinstance(value, (int, float, np.integer, np.floating)):
    return float(value)
  return None


def _number(lo: float = -_INF, hi: float = _INF, *, lo_open: bool = False,
            hi_open: bool = False, optional: bool = False):
  """A finite real number in a range; arrays pass unchecked."""
  if hi == _INF:
    what = f"a finite number {'>' if lo_open else '>='} {lo:g}"
  else:
    what = (f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}"
            f"{')' if hi_open else ']'}")
  what += " or None" if optional else ""

  def check(name, value):
    if (optional and value is None) or _is_array(value):
      return value
    x = _real(value)
    ok = (x is not None and math.isfinite(x)
          and (x > lo if lo_open else x >= lo)
          and (x < hi if hi_open else x <= hi))
    if not ok:
      raise ValueError(f"`{name}` must be {what}, got {value!r}")
    return value

  return check


def _integer(lo: int, *, optional: bool = False,
             choices: Optional[tuple[int, ...]] = None):
  """A Python, numpy or JAX integer (not a bool), returned as an int."""
  what = (f"one of {choices}" if choices is not None
          else f"an int >= {lo}") + (" or None" if optional else "")

  def check(name, value):
    if optional and value is None:
      return None
    x = None
    if not isinstance(value, (bool, np.bool_)):
      try:
        x = operator.index(value)
      except TypeError:
        pass
    if x is None or x < lo or (choices is not None and x not in choices):
      raise ValueError(f"`{name}` must be {what}, got {value!r}")
    return x

  return check


def _rank(name, value):
  """A positive int, or a float fraction in (0, 1] of each smaller side."""
  if not isinstance(value, (bool, np.bool_)):
    try:
      x = operator.index(value)
    except TypeError:
      x = None
    if x is not None and x >= 1:
      return x
    if x is None and (isinstance(value, (float, np.floating)) or (
        _is_array(value) and np.ndim(value) == 0
        and jnp.issubdtype(value.dtype, jnp.floating))):
      f = float(value)
      if 0.0 < f <= 1.0:
        return f
  raise ValueError(
      f"`{name}` must be a positive int or a float fraction in (0, 1], got "
      f"{value!r}")


def _learning_rate(name, value):
  if callable(value) or _is_array(value):
    return value
  return _number()(name, value)


def _seed(name, value):
  if _is_array(value):  # injected: jax.random.key takes a traced int
    return value
  return _integer(-(2**63))(name, value)


def _flag(name, value):
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"`{name}` must be a bool, got {value!r}")
  return bool(value)


def _choice(options: tuple[Any, ...], *, optional: bool = False):
  def check(name, value):
    if (optional and value is None) or (
        isinstance(value, str) and value in options):
      return value
    raise ValueError(
        f"`{name}` must be one of {options}"
        f"{' or None' if optional else ''}, got {value!r}")

  return check


def _callable_or_none(name, value):
  if value is not None and not callable(value):
    raise ValueError(f"`{name}` must be callable or None, got {value!r}")
  return value


def _policy(name, value):
  try:
    moments.as_policy(value)
  except ValueError:
    raise ValueError(
        f"`{name}` must be one of {tuple(moments.POLICIES)} or a "
        f"moments.RefreshPolicy, got {value!r}") from None
  return value


def _dtype(name, value):
  if value is None:
    return None
  try:
    return jnp.dtype(value)
  except TypeError:
    raise ValueError(
        f"`{name}` must be a dtype (e.g. 'bfloat16') or None, got {value!r}"
    ) from None


def _granularity(name, value):
  if value is None:
    return None
  x = None
  if not isinstance(value, (bool, np.bool_)):
    try:
      x = operator.index(value)
    except TypeError:
      x = _real(value)
  try:
    shapes.validate_granularity(x)
  except ValueError:
    raise ValueError(
        f"`{name}` must be a power of two (e.g. 0.5, 1, 4 or 256) or None, "
        f"got {value!r}") from None
  return x


def _anything(name, value):
  del name
  return value


# The check of every argument of every alias, by name (an alias may override
# one, e.g. Flora's ``b2``, an exponent).
_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    # Shared by (nearly) all.
    "learning_rate": _learning_rate,
    "rank": _rank,
    "update_proj_gap": _integer(1),
    "scale": _number(0.0, lo_open=True),
    "proj_type": _choice(matmul.PROJ_TYPES, optional=True),
    "projector": _anything,  # by the alias, which knows its names
    "b1": _number(0.0, 1.0, hi_open=True),
    "b2": _number(0.0, 1.0, hi_open=True),
    "eps": _number(0.0),
    "weight_decay": _number(0.0),
    # The shared options.
    "mask": _anything,
    "projection_mask": _anything,
    "dimension_numbers": _anything,
    "stagger": _flag,
    "seed": _seed,
    "state_dtype": _choice(("int8",), optional=True),
    "group_fn": _callable_or_none,
    "on_refresh": _policy,
    # Method hyper-parameters.
    "scale_type": _choice(combine_lib.SCALE_TYPES),
    "scale_front": _flag,
    "limiter": _flag,
    "density": _number(0.0, 1.0, lo_open=True),
    "subspace": _anything,  # by frugal
    "order": _choice(ORDERS),
    "proj_lr_scale": _number(0.0, lo_open=True),
    "state_free_lr_scale": _number(0.0),
    "state_free_rule": _choice(combine_lib.RESIDUAL_RULES),
    "reset_statistics": _flag,
    "kappa": _integer(1, optional=True),
    "clipping_threshold": _number(0.0, lo_open=True, optional=True),
    "multiply_by_parameter_scale": _flag,
    "min_dim_size_to_factor": _integer(1, optional=True),
    "factorized_second_moment": _flag,
    "momentum_dtype": _dtype,
    "granularity": _granularity,
    "distribution": _choice(DISTRIBUTIONS),
    "peak_learning_rate": _number(0.0, lo_open=True, optional=True),
    "norm": _choice(NORMS),
    "selection": _choice(SELECTIONS),
    "threshold": _number(0.0, 1.0, lo_open=True),
    "proj_bits": _integer(1, optional=True, choices=quantize_lib.BITS),
    "proj_group_size": _integer(1, optional=True),
    "cos_threshold": _number(-1.0, 1.0),
    "gamma_proj": _integer(2, optional=True),
    "queue_size": _integer(1, optional=True),
    "reproject_factor": _integer(1, optional=True),
    "switch_step": _integer(0, optional=True),
    "full_rank_layers": _integer(1),
    "num_layers": _integer(2, optional=True),
    "beta": _number(0.0, 1.0, hi_open=True),
    "ns_steps": _integer(1),
    "consistent_rms": _number(0.0, lo_open=True, optional=True),
    "switch_threshold": _number(0.0),
}


# ---------------------------------------------------------------------------
# The shared options: one definition, one documentation, one way in.
# ---------------------------------------------------------------------------


class AliasOptions(NamedTuple):
  """The shared options of an alias call, checked (see ``SHARED_OPTIONS``).

  Attributes:
    mask: The weight-decay mask.
    projection_mask: Which leaves may be projected.
    dimension_numbers: ``DimensionNumbers`` for leaves of more than two axes.
    stagger: Spread the refreshes over the gap.
    seed: Seed of the random draws.
    state_dtype: ``None`` or ``"int8"``.
    group_fn: ``lowrank_project``'s ``group_fn``.
    on_refresh: The refresh policy, or ``None`` where the alias fixes it.
  """

  mask: Any
  projection_mask: Any
  dimension_numbers: Any
  stagger: bool
  seed: Any
  state_dtype: Optional[str]
  group_fn: Optional[Callable[[str], Hashable]]
  on_refresh: Any = None


_SHARED_DEFAULTS = {
    "mask": None,
    "projection_mask": None,
    "dimension_numbers": None,
    "stagger": False,
    "seed": 0,
    "state_dtype": None,
    "group_fn": None,
}

# As written in the signatures (strings, like the aliases' own annotations).
_SHARED_ANNOTATIONS = {
    "mask": "Optional[Union[Any, Callable[[optax.Params], Any]]]",
    "projection_mask": "shapes.MaskOrFn",
    "dimension_numbers": "shapes.DimensionNumbersOrFn",
    "stagger": "bool",
    "seed": "int",
    "state_dtype": "Optional[str]",
    "group_fn": "Optional[Callable[[str], Hashable]]",
    "on_refresh": "Union[str, moments.RefreshPolicy]",
}

# The Args entries of the shared options, as every alias's docstring shows
# them (``{default}`` is the alias's default).
SHARED_OPTIONS = {
    "mask": """\
    mask: Which leaves weight decay applies to, as ``optax.adamw``'s and
      ``optax.contrib.galore``'s ``mask``: a bool pytree like the parameters
      or a function of them returning one; ``None`` (default): all.""",
    "projection_mask": """\
    projection_mask: Which leaves may be projected (``lowrank_project``'s):
      a bool pytree like the parameters or a function of them, e.g.
      ``match_paths("attn|mlp")`` (the papers project the attention and MLP
      matrices); ``None`` (default): all. The other leaves get the method's
      full-size optimizer.""",
    "dimension_numbers": """\
    dimension_numbers: ``DimensionNumbers`` (or optax's
      ``GaLoreDimensionNumbers``) for leaves of more than two axes: one for
      all, a pytree with ``None`` leaves, or a function of the parameters;
      axes they do not name are batch axes (stacked layers). Leaves of more
      than two axes without them are not projected (one warning at
      ``init``).""",
    "stagger": """\
    stagger: Spread the refreshes of the projected leaves (their groups)
      over the gap instead of all on one step (default ``False``).""",
    "seed": """\
    seed: Seed of the random draws (random projections, sampled rows or
      blocks, first Gaussian blocks); default 0.""",
    "state_dtype": """\
    state_dtype: ``None`` keeps the inner optimizer's moments in the
      gradient's dtype; ``"int8"`` stores them block-wise quantized (blocks
      of 256, signed square-root map, ``quantize.quantize_state``; refresh
      policies act on the dequantized moments). Default ``{default!r}``.""",
    "group_fn": """\
    group_fn: ``group_fn(path) -> label`` for the projected leaves' paths
      (``"layers/attn/q/kernel"``): leaves with the same label refresh on the
      same steps and share random draws (``lowrank_project``); ``None``
      (default): each leaf alone.""",
    "on_refresh": """\
    on_refresh: What a refresh does to the inner moments of the leaf:
      ``keep``, ``reset``, ``rotate`` (the first moment re-expressed in the
      new basis), ``rotate_moments`` or a ``moments.RefreshPolicy``. Default
      ``{default!r}``.""",
}


def _with_shared_doc(doc: str, defaults: dict[str, Any]) -> str:
  """``doc`` with the shared options' entries at the end of its Args."""
  entries = "\n".join(SHARED_OPTIONS[name].format(default=default)
                      for name, default in defaults.items())
  head, sep, tail = doc.partition("\n\n  Returns:")
  if not sep:
    raise ValueError("an alias's docstring needs a Returns section")
  return f"{head}\n{entries}{sep}{tail}"


def _alias(*, static: tuple[str, ...], on_refresh: Optional[str] = None,
           checks: Optional[dict[str, Callable[[str, Any], Any]]] = None,
           defaults: Optional[dict[str, Any]] = None):
  """Makes ``body(..., options)`` an alias taking the shared options.

  The alias's signature is ``body``'s (without ``options``) followed by the
  shared options (and ``on_refresh``, with this default, when given). A call
  checks every argument by name (``_CHECKS``, then ``checks``), refuses a
  traced value for the arguments in ``static`` and the shared options, and
  calls ``body`` with the checked values and ``options=AliasOptions(...)``.
  """

  def decorate(body):
    signature = inspect.signature(body)
    # The learning rate's annotation as the object optax's tools compare
    # with (optax.ScalarOrSchedule: its contrib tests then pass schedules).
    own = [p.replace(annotation=optax.ScalarOrSchedule)
           if p.name == "learning_rate" else p
           for p in signature.parameters.values() if p.name != "options"]
    shared_defaults = {**_SHARED_DEFAULTS, **(defaults or {})}
    if on_refresh is not None:
      shared_defaults["on_refresh"] = on_refresh
    shared = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                          default=default,
                          annotation=_SHARED_ANNOTATIONS[name])
        for name, default in shared_defaults.items()
    ]
    signature = signature.replace(parameters=own + shared)
    all_checks = {**_CHECKS, **(checks or {})}
    unchecked = [n for n in signature.parameters if n not in all_checks]
    # The seed may be injected (jax.random.key takes a traced int).
    statics = tuple(static) + tuple(n for n in shared_defaults if n != "seed")
    if unchecked or not set(statics) <= set(signature.parameters):
      raise TypeError(f"{body.__name__}: no check for {unchecked}, or a "
                      f"static argument it does not take: {statics}")

    @functools.wraps(body)
    def alias(*args, **kwargs):
      bound = signature.bind(*args, **kwargs)
      bound.apply_defaults()
      values = {}
      for name, value in bound.arguments.items():
        if name in statics and isinstance(value, jax.core.Tracer):
          raise ValueError(
              f"`{name}` of {body.__name__} fixes shapes or the schedule and "
              f"cannot be traced; with optax.inject_hyperparams, list it in "
              f"static_args: optax_lowrank.STATIC_ARGS[{body.__name__!r}] = "
              f"{statics}")
        values[name] = all_checks[name](name, value)
      options = AliasOptions(**{n: values.pop(n) for n in shared_defaults})
      return body(**values, options=options)

    alias.__signature__ = signature
    alias.__doc__ = _with_shared_doc(body.__doc__, shared_defaults)
    alias._static_args = statics  # pylint: disable=protected-access
    return alias

  return decorate


def static_args(factory: Callable[..., Any]) -> tuple[str, ...]:
  """The arguments of an alias that ``inject_hyperparams`` must leave static.

  Those that fix shapes or schedules (``rank``, ``update_proj_gap``, ...),
  choices given by name, and the shared options (masks and dimension numbers
  may be callables, which ``inject_hyperparams`` would take for schedules).

  Args:
    factory: An alias (``optax_lowrank.galore``) or a ``functools.partial``
      of one (``optax_lowrank.apollo_mini``).

  Returns:
    A tuple of argument names, for ``static_args``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_lowrank
    >>> tx = optax.inject_hyperparams(
    ...     optax_lowrank.galore,
    ...     optax_lowrank.aliases.static_args(optax_lowrank.galore))(
    ...     learning_rate=1e-2, rank=4, mask=lambda p: {"w": True, "b": False})
    >>> params = {"w": jnp.ones((32, 16)), "b": jnp.zeros(16)}
    >>> state = tx.init(params)
    >>> updates, state = jax.jit(tx.update)(params, state, params)

  References:
    Optax's ``inject_hyperparams``:
    https://optax.readthedocs.io/en/latest/api/optimizer_schedules.html
  """
  while isinstance(factory, functools.partial):
    factory = factory.func
  try:
    return factory._static_args  # pylint: disable=protected-access
  except AttributeError:
    raise ValueError(f"{factory!r} is not an optax_lowrank alias") from None


# ---------------------------------------------------------------------------
# Building blocks.
# ---------------------------------------------------------------------------


def _side(proj_type: Optional[str]) -> str:
  return "std" if proj_type is None else proj_type


def _projector(value, proj_type,
               builders: dict[str, Callable[[str], Projector]], *,
               arg: str = "projector") -> Projector:
  """``value`` by name (``builders[value](side)``) or as a ``Projector``."""
  if isinstance(value, Projector):
    if proj_type is not None:
      raise ValueError(
          f"`proj_type` sets the side of the projectors `{arg}` names; the "
          f"Projector instance given as `{arg}` carries its own (got "
          f"proj_type={proj_type!r}). Pass the side to the projector's "
          "factory, e.g. projectors.random(proj_type='left').")
    return value
  if isinstance(value, str) and value in builders:
    return builders[value](_side(proj_type))
  raise ValueError(
      f"`{arg}` must be one of {tuple(builders)} or a Projector instance, got "
      f"{value!r}")


def _project(options: AliasOptions, inner, rank, *, update_proj_gap: int,
             projector: Projector, on_refresh, scale=1.0, combine=None,
             granularity=1, unprojected=None):
  """``lowrank_project`` of ``inner`` with the shared options."""
  if options.state_dtype == "int8":
    inner = quantize_lib.quantize_state(inner, bits=8, block_size=256)
    if unprojected is not None:
      unprojected = quantize_lib.quantize_state(
          unprojected, bits=8, block_size=256)
  return lowrank_project(
      inner, rank,
      update_proj_gap=update_proj_gap,
      scale=scale,
      projector=projector,
      granularity=granularity,
      projection_mask=options.projection_mask,
      dimension_numbers=options.dimension_numbers,
      on_refresh=on_refresh,
      stagger=options.stagger,
      combine=combine_lib.back_project() if combine is None else combine,
      unprojected=unprojected,
      group_fn=options.group_fn,
      seed=options.seed,
  )


def _decay_and_learning_rate(options: AliasOptions, weight_decay,
                             learning_rate):
  """Decoupled weight decay on ``options.mask``, then the learning rate."""
  return (optax.add_decayed_weights(weight_decay, options.mask),
          optax.scale_by_learning_rate(learning_rate))


# ---------------------------------------------------------------------------
# The aliases.
# ---------------------------------------------------------------------------


@_alias(static=("rank", "update_proj_gap", "proj_type", "projector"),
        on_refresh="keep")
def galore(
    learning_rate: optax.ScalarOrSchedule,
    rank: Union[int, float] = 128,
    *,
    update_proj_gap: int = 200,
    scale: Union[float, jax.Array] = 0.25,
    proj_type: Optional[str] = None,
    projector: Union[str, Projector] = "svd",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    options: AliasOptions,
) -> optax.GradientTransformationExtraArgs:
  """GaLore-AdamW: Adam in a low-rank SVD subspace of each weight gradient.

  ``chain(lowrank_project(scale_by_adam), add_decayed_weights,
  scale_by_learning_rate)``, like ``optax.adamw``. Reproduces galore-torch's
  ``GaLoreAdamW``: exact SVD of the float32 gradient at step 0 and every
  ``update_proj_gap`` steps; ``std`` orientation (the smaller side is
  compressed; matrices oriented as ``nn.Linear.weight``, see
  ``DimensionNumbers``); the back-projected Adam direction multiplied by
  ``scale``; Adam moments kept across a refresh.

  Two documented differences from galore-torch, both of order ``eps`` or
  ``lr · weight_decay``: (1) ``eps`` is placed as in ``optax.scale_by_adam``,
  ``m̂ / (√v̂ + eps)``, whereas galore-torch adds it to the uncorrected
  ``√v`` (``m̂ / (√v̂ + eps / √(1 - b2^t))``); (2) weight decay is decoupled
  and uses the parameter before the step (``optax.add_decayed_weights``),
  whereas galore-torch decays the already-updated parameter.

  Args:
    learning_rate: A float or an optax schedule.
    rank: Subspace rank (int) or fraction of each matrix's smaller side.
    update_proj_gap: Steps between SVD refreshes.
    scale: GaLore's ``alpha`` on the back-projected update.
    proj_type: ``std`` (``None``, the default), ``reverse_std``, ``left``,
      ``right`` or ``full`` (galore-torch's meanings). An error with a
      ``Projector`` instance, which carries its own side.
    projector: ``"svd"`` (exact SVD) or any ``Projector``, e.g.
      ``projectors.randomized_svd()``.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon (see above for placement).
    weight_decay: Decoupled weight decay, in the full space.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax, jax.numpy as jnp, optax_lowrank
    >>> params = {"w": jnp.ones((64, 32)), "b": jnp.zeros(32)}
    >>> tx = optax_lowrank.galore(1e-2, rank=8, update_proj_gap=50,
    ...                           weight_decay=0.1,
    ...                           mask={"w": True, "b": False})
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)

  References:
    Zhao et al., `GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
    Projection <https://arxiv.org/abs/2403.03507>`_, ICML 2024; code:
    github.com/jiaweizzhao/GaLore.
  """
  projector = _projector(projector, proj_type, {"svd": projectors_lib.svd})
  return optax.chain(
      _project(options, optax.scale_by_adam(b1=b1, b2=b2, eps=eps), rank,
               update_proj_gap=update_proj_gap, scale=scale,
               projector=projector, on_refresh=options.on_refresh),
      *_decay_and_learning_rate(options, weight_decay, learning_rate),
  )


def _hf_adam(b1, b2, eps):
  """Hugging Face's AdamW split in two: the uncorrected direction (inside
  ``lowrank_project``, where the combine rules see it on that scale) and the
  bias correction (after it), as galore-torch, APOLLO, Fira, COAP and GoLore
  write it."""
  return (inner_lib.scale_by_adam_uncorrected(b1, b2, eps),
          inner_lib.scale_by_bias_correction(b1, b2))


@_alias(static=("rank", "update_proj_gap", "scale_type", "scale_front",
                "limiter", "proj_type", "projector"),
        on_refresh="keep")
def apollo(
    learning_rate: optax.ScalarOrSchedule,
    rank: Union[int, float] = 256,
    *,
    update_proj_gap: int = 200,
    scale: Union[float, jax.Array] = 1.0,
    scale_type: str = "channel",
    scale_front: bool = False,
    limiter: bool = True,
    proj_type: Optional[str] = None,
    projector: Union[str, Projector] = "random",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    options: AliasOptions,
) -> optax.GradientTransformationExtraArgs:
  """APOLLO: SGD-like memory, AdamW-level performance.

  Adam runs on a random projection ``R`` of each weight gradient (Gaussian,
  entries ``N(0, 1/r)``, redrawn from a key at step 0 and every
  ``update_proj_gap`` steps and never stored; moments kept across redraws).
  Its gain ``‖N‖/‖R‖`` per channel (or per tensor) rescales the raw gradient:
  ``U = √scale · limit(G ⊙ ‖N‖/(‖R‖ + 1e-8))`` (``combine.apollo_scale``).
  Leaves that are not projected get the same Adam (Hugging Face AdamW).

  Follows apollo-torch, where it differs from the paper: ``scale`` enters as
  ``√scale``; Adam's bias correction is in the step size and ``eps`` on the
  uncorrected ``√v`` (``inner.scale_by_adam_uncorrected`` then
  ``inner.scale_by_bias_correction``), so the gain and the limiter see the
  uncorrected ``N`` as there. One difference remains, of order
  ``lr · weight_decay``: weight decay is decoupled on the parameter before the
  step (``optax.add_decayed_weights``), where apollo-torch decays the updated
  parameter. The random draws come from JAX keys, not torch's generator.

  Args:
    learning_rate: A float or an optax schedule (the paper: 0.01, cosine with
      10% warmup down to 10%).
    rank: Projection rank (int) or fraction of each matrix's smaller side
      (the paper: 128 for 60M, 192 for 130M, 256 from 350M up).
    update_proj_gap: Steps between redraws of the projection.
    scale: APOLLO's ``scale`` (its square root multiplies the update).
    scale_type: ``channel`` (APOLLO) or ``tensor`` (APOLLO-Mini).
    scale_front: Apply ``√scale`` before the limiter (apollo-torch's flag).
    limiter: Norm-growth limiter with γ = 1.01 (on in the paper's runs).
    proj_type: Side of the projection, as GaLore's (``None``: ``std``, the
      smaller side); an error with a ``Projector`` instance.
    projector: ``"random"``, ``"svd"`` or any ``Projector`` (e.g. fixed
      matrices).
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon, on the uncorrected ``√v``.
    weight_decay: Decoupled weight decay.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax, jax.numpy as jnp, optax_lowrank
    >>> params = {"w": jnp.ones((64, 32)), "b": jnp.zeros(32)}
    >>> tx = optax_lowrank.apollo(1e-2, rank=8)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)

  References:
    Zhu et al., `APOLLO: SGD-like Memory, AdamW-level Performance
    <https://arxiv.org/abs/2412.05270>`_, MLSys 2025; code:
    github.com/zhuhanqing/APOLLO.
  """
  projector = _projector(projector, proj_type, {
      "random": projectors_lib.random,
      "svd": projectors_lib.svd,
  })
  inner, bias_correction = _hf_adam(b1, b2, eps)
  return optax.chain(
      _project(options, inner, rank, update_proj_gap=update_proj_gap,
               scale=scale, projector=projector,
               combine=combine_lib.apollo_scale(
                   scale_type, limiter=limiter, scale_front=scale_front),
               on_refresh=options.on_refresh),
      bias_correction,
      *_decay_and_learning_rate(options, weight_decay, learning_rate),
  )


apollo_mini = functools.partial(apollo, rank=1, scale_type="tensor",
                                scale=128.0)
apollo_mini.__name__ = "apollo_mini"
apollo_mini.__doc__ = """APOLLO-Mini: rank-1 projection, tensor-wise scaling.

  ``functools.partial(apollo, rank=1, scale_type="tensor", scale=128.0)``:
  ``apollo`` with the paper's APOLLO-Mini settings as defaults (its runs from
  350M up; the 60M and 130M runs use ``scale`` 128 and 192 with
  ``scale_front=True``). The state per projected matrix is a rank-1 first
  and second moment, one key and one limiter norm.

  Args:
    learning_rate: A float or an optax schedule.
    rank: Projection rank (default 1, the paper's).
    scale_type: ``tensor`` (default) or ``channel``.
    scale: APOLLO's ``scale`` (default 128).
    **kwargs: Every other argument of ``apollo``, with its default there (the
      shared options among them).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import optax_lowrank
    >>> tx = optax_lowrank.apollo_mini(1e-2, projection_mask={"w": True})

  References:
    Zhu et al., `APOLLO: SGD-like Memory, AdamW-level Performance
    <https://arxiv.org/abs/2412.05270>`_, MLSys 2025.
  """


@_alias(static=("rank", "update_proj_gap", "limiter", "proj_type",
                "projector"),
        on_refresh="keep")
def fira(
    learning_rate: optax.ScalarOrSchedule,
    rank: Union[int, float] = 128,
    *,
    update_proj_gap: int = 200,
    scale: Union[float, jax.Array] = 0.25,
    limiter: bool = True,
    proj_type: Optional[str] = None,
    projector: Union[str, Projector] = "svd",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    options: AliasOptions,
) -> optax.GradientTransformationExtraArgs:
  """Fira: GaLore plus the gradient outside the subspace, rescaled.

  Adam in GaLore's SVD subspace (``std`` side, refresh at step 0 and every
  ``update_proj_gap`` steps, moments kept), and the residual the subspace
  misses, scaled per channel by Adam's gain and norm-growth limited:
  ``U = scale·up(N) + limit(φ ⊙ (G − scale·up(R)))``,
  ``φ = ‖N‖/(‖R‖ + 1e-8)`` (``combine.fira_residual``).

  Follows Fira's code where it differs from the paper: ``scale`` (GaLore's
  alpha) also multiplies the back-projection subtracted in the residual;
  ``φ`` runs along the side the projection keeps (rows for ``m >= n``);
  Adam's bias correction is in the step size (so it scales the residual too)
  and ``eps`` on the uncorrected ``√v``. Remaining difference, of order
  ``lr · weight_decay``: weight decay is decoupled on the parameter before the
  step, where Fira decays the updated parameter.

  Args:
    learning_rate: A float or an optax schedule (the paper: 0.01).
    rank: Subspace rank (128 for 60M, 256 for 130M/350M, 512 for 1B).
    update_proj_gap: Steps between SVD refreshes.
    scale: GaLore's alpha (0.25; 0.0625 for 1B and 7B).
    limiter: Norm-growth limiter (γ = 1.01) on the residual.
    proj_type: GaLore's projection type, one-sided: ``std`` (``None``, the
      default), ``reverse_std``, ``left`` or ``right``; an error with a
      ``Projector`` instance.
    projector: ``"svd"``, ``"random"`` or any one-sided ``Projector``.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon, on the uncorrected ``√v``.
    weight_decay: Decoupled weight decay.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import optax_lowrank
    >>> tx = optax_lowrank.fira(1e-2, rank=128)

  References:
    Chen et al., `Fira: Can We Achieve Full-rank Training of LLMs Under
    Low-rank Constraint? <https://arxiv.org/abs/2410.01623>`_, 2024; code:
    github.com/xichen-fy/Fira.
  """
  if proj_type == "full":
    raise ValueError(
        "`proj_type` 'full' has no channel for Fira's scaling factor; use "
        "'std', 'reverse_std', 'left' or 'right'"
    )
  projector = _projector(projector, proj_type, {
      "svd": projectors_lib.svd,
      "random": projectors_lib.random,
  })
  inner, bias_correction = _hf_adam(b1, b2, eps)
  return optax.chain(
      _project(options, inner, rank, update_proj_gap=update_proj_gap,
               scale=scale, projector=projector,
               combine=combine_lib.fira_residual(limiter=limiter),
               on_refresh=options.on_refresh),
      bias_correction,
      *_decay_and_learning_rate(options, weight_decay, learning_rate),
  )


FRUGAL_SUBSPACES = ("blocks", "svd", "random", "randperm", "columns", "rows",
                    "random_k")


@_alias(static=("density", "subspace", "update_proj_gap", "proj_type",
                "order", "state_free_rule", "reset_statistics"))
def frugal(
    learning_rate: optax.ScalarOrSchedule,
    density: float = 0.25,
    *,
    subspace: Union[str, Projector] = "blocks",
    update_proj_gap: int = 200,
    proj_type: Optional[str] = None,
    order: str = "descending",
    proj_lr_scale: Union[float, jax.Array] = 1.0,
    state_free_lr_scale: float = 1.0,
    state_free_rule: str = "sign",
    reset_statistics: bool = True,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    options: AliasOptions,
) -> optax.GradientTransformationExtraArgs:
  """FRUGAL: AdamW in a subspace, signSGD (state-free) outside it.

  ``U = proj_lr_scale · (up(N) + state_free_lr_scale · sign(G − up(R)))``
  (``combine.frugal_sign``), with ``N`` from AdamW on ``R = down(G)``. When
  the subspace changes (step 0 and every ``update_proj_gap`` steps) the
  subspace's Adam moments and step count restart (``reset_statistics``;
  always for ``blocks``), as in FRUGAL's code. Leaves that are not projected
  (embeddings, norms, LM head) get plain AdamW, never reset. Adam is
  PyTorch's (``eps`` on the corrected ``√v̂``); weight decay is decoupled on
  the parameter before the step, as in the reference.

  Subspaces (``subspace``): ``blocks`` (the default of FRUGAL's pre-training
  scripts: ``round(L·density)`` of each stacked leaf's ``L`` layers, walked in
  ``order``; needs stacked layers, see ``projectors.blocks`` for how this
  differs from the reference's choice over all tensors), ``svd`` (GaLore's),
  ``random`` (orthonormal random), ``randperm`` (random columns or rows),
  with ``round(density · side)`` directions on the smaller side; ``columns``,
  ``rows``, ``random_k`` (``floor(density · size)`` random coordinates); or
  any ``Projector``.

  Args:
    learning_rate: A float or an optax schedule (the paper: 1e-3, cosine with
      10% warmup).
    density: Fraction of each projected weight kept in the state-full
      subspace (0.25 in the paper's pre-training runs).
    subspace: One of ``FRUGAL_SUBSPACES`` or a ``Projector``.
    update_proj_gap: Steps between subspace changes (200).
    proj_type: ``std`` only (``None``, the default, is ``std``): the
      subspace rank is ``round(density · min(m, n))``, which is FRUGAL's
      ``round(density · projected side)`` for this side alone. An error with
      a ``Projector`` instance.
    order: ``descending`` (the scripts), ``ascending`` or ``random`` (the
      class default), for ``blocks``.
    proj_lr_scale: FRUGAL's ``proj_params_lr_scale``: multiplies both parts
      of the projected leaves' update.
    state_free_lr_scale: FRUGAL's ``inactive_lr_scale``.
    state_free_rule: ``sign`` (signSGD) or ``sgd``.
    reset_statistics: Restart Adam in a new subspace (ignored, always on, for
      ``blocks``).
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon (1e-8 in the scripts).
    weight_decay: Decoupled weight decay.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import optax_lowrank
    >>> tx = optax_lowrank.frugal(1e-3, 0.25, subspace="columns")

  References:
    Zmushko et al., `FRUGAL: Memory-Efficient Optimization by Reducing State
    Overhead for Scalable Training <https://arxiv.org/abs/2411.07837>`_, ICML
    2025; code: github.com/fzmushko/FRUGAL.
  """
  if proj_type not in (None, "std"):
    # The rank is round(density · smaller side), FRUGAL's only for ``std``.
    raise ValueError(
        f"`proj_type` must be 'std' (the side FRUGAL's scripts use) or None, "
        f"got {proj_type!r}"
    )
  projector = _projector(subspace, proj_type, {
      "blocks": lambda _: projectors_lib.blocks(density, order=order),
      "svd": projectors_lib.svd,
      "random": lambda side: projectors_lib.random(side, std="orthonormal"),
      "randperm": projectors_lib.randperm,
      "columns": lambda _: projectors_lib.coordinates(
          "columns", density=density),
      "rows": lambda _: projectors_lib.coordinates("rows", density=density),
      "random_k": lambda _: projectors_lib.coordinates(
          "random_k", density=density),
  }, arg="subspace")
  reset = reset_statistics or subspace == "blocks"
  return optax.chain(
      _project(options, inner_lib.scale_by_adam_leafwise(b1, b2, eps),
               float(density), update_proj_gap=update_proj_gap,
               scale=proj_lr_scale, projector=projector,
               combine=combine_lib.frugal_sign(
                   state_free_lr_scale, rule=state_free_rule),
               on_refresh="reset" if reset else "keep"),
      *_decay_and_learning_rate(options, weight_decay, learning_rate),
  )


@_alias(static=("rank", "kappa", "multiply_by_parameter_scale",
                "min_dim_size_to_factor", "factorized_second_moment",
                "momentum_dtype"),
        checks={"b2": _number(0.0, lo_open=True)})
def flora(
    learning_rate: optax.ScalarOrSchedule,
    rank: Union[int, float] = 128,
    *,
    kappa: Optional[int] = None,
    b1: float = 0.9,
    b2: float = 0.8,
    eps: float = 1e-30,
    clipping_threshold: Optional[float] = 1.0,
    multiply_by_parameter_scale: bool = True,
    min_dim_size_to_factor: Optional[int] = None,
    factorized_second_moment: bool = True,
    momentum_dtype: Any = "bfloat16",
    weight_decay: float = 0.0,
    options: AliasOptions,
) -> optax.GradientTransformationExtraArgs:
  """Flora: Adafactor with momentum compressed by a resampled random projection.

  As the authors' optax code, per step: Adafactor's factored second moment of
  the raw gradient normalizes it (``U = G / √V̂``, ``optax.scale_by_factored_rms``
  with decay ``1 − (t+1)^(−b2)``, as ``inner.scale_by_factored_rms`` computes:
  the same numbers, finite where the squares overflow); the momentum of ``U``
  is kept compressed, ``M ← b1·M + (1 − b1)·down(U)`` in a random subspace
  (entries ``N(0, 1/r)``, the smaller side of each matrix, redrawn every
  ``kappa`` steps from a key, never stored); the output
  ``b1·up(M) + (1 − b1)·U`` is clipped to RMS ``clipping_threshold`` per
  matrix, multiplied by the learning rate and by ``max(rms(W), 1e-3)``, then
  weight decay ``wd·W`` is added (not multiplied by the learning rate) and the
  sign flipped. Only
  matrices with ``min(m, n) >= min_dim_size_to_factor`` and
  ``max(m, n) <= 4·min(m, n)`` are compressed; the others keep a full
  momentum.

  Differences from the optax code, by choice: on a redraw the momentum is
  transferred as in the paper and the torch code,
  ``M ← down(new, up(old, M))`` (``on_refresh="rotate"``); the optax code
  maps it through the old projection twice, which multiplies it by about
  ``min(m, n)/r`` at every redraw. The momentum is stored in
  ``momentum_dtype`` (bfloat16, as there) but the arithmetic is float32. Block
  RMS values are per matrix for stacked layers (``blockwise``). The random
  draws come from JAX keys split differently from the reference's.

  Args:
    learning_rate: A float or an optax schedule.
    rank: Rank ``tau`` of the compressed momentum (the authors' configs: 128).
    kappa: Steps between redraws of the projection; ``None``: 1000 (the
      authors').
    b1: Momentum decay.
    b2: Exponent of Adafactor's decay ``1 − (t+1)^(−b2)`` (the configs: 0.8).
    eps: Adafactor's epsilon, added to ``G²``.
    clipping_threshold: Update clipping by RMS; ``None`` turns it off.
    multiply_by_parameter_scale: Scale by ``max(rms(W), 1e-3)``.
    min_dim_size_to_factor: Smallest side for factoring and compressing;
      ``None``: 128 (Adafactor's).
    factorized_second_moment: Factor the second moment (else full).
    momentum_dtype: Storage dtype of the momentum (``"bfloat16"``, as the
      authors'); ``None`` keeps the gradient's. With ``state_dtype="int8"``
      the momentum is stored quantized instead.
    weight_decay: Added as ``wd·W`` after the learning rate.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import optax_lowrank
    >>> tx = optax_lowrank.flora(1e-3, rank=128, kappa=1000)

  References:
    Hao et al., `Flora: Low-Rank Adapters Are Secretly Gradient Compressors
    <https://arxiv.org/abs/2402.03293>`_, ICML 2024; code:
    github.com/BorealisAI/flora-opt.
  """
  kappa = 1000 if kappa is None else kappa
  if min_dim_size_to_factor is None:
    min_dim_size_to_factor = 128
  projection_mask = options.projection_mask
  dimension_numbers = options.dimension_numbers

  def compressed(params):
    plans, treedef = shapes.plan_leaves(
        params, rank=rank, mask=projection_mask,
        dimension_numbers=dimension_numbers)
    return treedef.unflatten([
        p is not None
        and min(p.layout.m, p.layout.n) >= min_dim_size_to_factor
        and max(p.layout.m, p.layout.n) <= 4 * min(p.layout.m, p.layout.n)
        for p in plans
    ])

  return optax.chain(
      inner_lib.scale_by_factored_rms(
          factored=factorized_second_moment, decay_rate=b2, epsilon=eps,
          min_dim_size_to_factor=min_dim_size_to_factor),
      _project(options._replace(projection_mask=compressed),
               inner_lib.ema_nesterov(b1, momentum_dtype=momentum_dtype),
               rank, update_proj_gap=kappa,
               projector=projectors_lib.random("smaller"),
               combine=combine_lib.add_residual(1.0 - b1),
               on_refresh="rotate"),
      (blockwise.clip_by_matrix_rms(clipping_threshold, dimension_numbers)
       if clipping_threshold is not None else optax.identity()),
      optax.scale_by_learning_rate(learning_rate, flip_sign=False),
      (blockwise.scale_by_param_matrix_rms(1e-3, dimension_numbers)
       if multiply_by_parameter_scale else optax.identity()),
      optax.add_decayed_weights(weight_decay, options.mask),
      optax.scale(-1.0),
  )


@_alias(static=("rank", "granularity", "update_proj_gap", "distribution",
                "projector"))
def vlorp(
    learning_rate: optax.ScalarOrSchedule,
    rank: Union[int, float] = 1,
    *,
    granularity: Optional[Union[int, float]] = None,
    update_proj_gap: int = 30,
    scale: Union[float, jax.Array] = 0.25,
    distribution: str = "gaussian",
    projector: Optional[Projector] = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    options: AliasOptions,
) -> optax.GradientTransformationExtraArgs:
  """VLoRP with ProjFactor: fine-grained random projection, factored Adam.

  Each projected matrix ``G`` (``m × n``, references' orientation) is
  regrouped to ``(m·c, n/c)`` when ``m >= n`` and projected on the right, or
  to ``(m/c, n·c)`` and projected on the left (granularity ``c``,
  ``projectors.granular``), by a Gaussian (or Rademacher) matrix redrawn from
  a key at step 0 and every ``update_proj_gap`` steps and never stored. The
  first moment lives in that subspace (kept across redraws); the second
  moment is factored in the full space from the back-projected gradient
  (``combine.projfactor``). The update is
  ``√(1 − b2ᵗ)/(1 − b1ᵗ) · scale·up(m) / (√V̂ + eps)``. Per matrix the state is
  ``max(m, n)·c·r + m + n`` floats, so ``c·r`` is the memory budget: the paper
  finds finer units (large ``c``, small ``r``) better at a fixed budget.
  Leaves that are not projected (embeddings, norms, LM head) get AdamW
  (``inner.scale_by_adam_leafwise``: ``optax.scale_by_adam`` with its bias
  corrections computed to float32 accuracy). Gradients can be accumulated in
  the subspace with ``optax_lowrank.MultiSteps``.

  Follows the authors' ``optim/projfactor.py``: the matrix is ``N(0, 1)``
  there and the back-projection divides by ``r``; here it is drawn as
  ``N(0, 1/r)`` (``projectors.random(std="rank")``), which gives the same
  updates with the subspace moment scaled by ``1/√r``. Two differences: weight
  decay is decoupled on the parameter before the step
  (``optax.add_decayed_weights``, as the code's AdamW does for unprojected
  leaves) where the code decays projected matrices after it, a difference of
  order ``lr²·weight_decay``; and the draws come from JAX keys. With gradient
  accumulation the code draws a new matrix for every micro-batch of a refresh
  step; ``MultiSteps`` uses one matrix for the whole step.

  Args:
    learning_rate: A float or an optax schedule.
    rank: Rank ``r`` of each regrouped matrix's projection (int), or a
      fraction of each matrix's smaller side.
    granularity: ``c``, a power of two (``< 1`` for coarser units); must fit
      every projected matrix (an error names the leaf otherwise). ``None``:
      256, the paper's best at budget ``c·r = 256`` (with ``r = 1``).
    update_proj_gap: Steps between redraws of the projection.
    scale: Multiplier of the back-projection (the paper: 0.25).
    distribution: ``gaussian`` or ``rademacher`` entries.
    projector: Any ``Projector`` to use instead of the random one (applied
      with the same granularity); ``None``: the random one.
    b1: First-moment decay.
    b2: Second-moment decay (factored for projected leaves).
    eps: Added to the square root of the second moment.
    weight_decay: Decoupled weight decay.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax_lowrank
    >>> params = {"w": jnp.ones((64, 32)), "b": jnp.zeros(32)}
    >>> tx = optax_lowrank.vlorp(1e-3, rank=1, granularity=8)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)

  References:
    Wang et al., `Memory-Efficient LLM Training by Various-Grained Low-Rank
    Projection of Gradients <https://arxiv.org/abs/2505.01744>`_, ICML 2025;
    code: github.com/BIGKnight/VLoRP.
  """
  if projector is None:
    projector = projectors_lib.random(distribution=distribution, std="rank")
  elif not isinstance(projector, Projector):
    raise ValueError(
        f"`projector` must be None (random) or a Projector instance, got "
        f"{projector!r}"
    )
  return optax.chain(
      _project(options, optax.ema(b1, debias=True), rank,
               update_proj_gap=update_proj_gap, scale=scale,
               projector=projector,
               granularity=256 if granularity is None else granularity,
               on_refresh="keep", combine=combine_lib.projfactor(b2, eps),
               unprojected=inner_lib.scale_by_adam_leafwise(b1, b2, eps)),
      *_decay_and_learning_rate(options, weight_decay, learning_rate),
  )


@_alias(static=("rank", "update_proj_gap", "proj_type"))
def osd(
    learning_rate: optax.ScalarOrSchedule,
    rank: Union[int, float] = 128,
    *,
    update_proj_gap: int = 200,
    scale: Union[float, jax.Array] = 0.25,
    proj_type: Optional[str] = None,
    peak_learning_rate: Optional[float] = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    options: AliasOptions,
) -> optax.GradientTransformationExtraArgs:
  """Online Subspace Descent: GaLore whose basis follows the gradient by online PCA.

  GaLore-AdamW (``galore``) with ``projectors.online_pca``: the basis is the
  SVD of the first gradient and then, every step, takes one AdamW step on
  the reconstruction loss ``‖Ĝ PᵀP − Ĝ‖²`` with learning rate
  ``(1/update_proj_gap)·(lr_t/lr_peak)``, after it has been used (the
  authors' ``proj_type="continuous"``). No SVD after the first step. The
  basis costs three more basis-sized arrays (the next basis and its AdamW
  moments). Same documented differences from the reference AdamW as
  ``galore``.

  Args:
    learning_rate: A float or an optax schedule (the authors: 0.01 for 60M,
      1000 warmup steps, cosine).
    rank: Subspace rank (the authors: 128 for 60M).
    update_proj_gap: Sets the basis learning rate ``1/update_proj_gap``
      (the basis moves every step).
    scale: GaLore's scale of the back-projected update.
    proj_type: ``std`` (``None``, the default), ``reverse_std``, ``left`` or
      ``right``.
    peak_learning_rate: ``lr_peak`` (the reference's initial ``lr``
      argument), for a ``learning_rate`` schedule: without it the basis step
      does not follow the schedule (``lr_t/lr_peak`` is taken as 1, with a
      warning). Under ``optax.inject_hyperparams`` the alias receives the
      schedule's current value: give ``peak_learning_rate`` there too, or the
      ratio is 1. With a constant ``learning_rate`` the ratio is
      ``learning_rate / peak_learning_rate`` (1 without it).
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon.
    weight_decay: Decoupled weight decay.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax_lowrank
    >>> params = {"w": jnp.ones((64, 32))}
    >>> tx = optax_lowrank.osd(1e-2, rank=4)
    >>> updates, state = tx.update(params, tx.init(params), params)

  References:
    Liang et al., `Memory-Efficient LLM Training with Online Subspace Descent
    <https://arxiv.org/abs/2408.12857>`_, NeurIPS 2024; code:
    github.com/kyleliang919/Online-Subspace-Descent.
  """
  if callable(learning_rate) and peak_learning_rate is None:
    warnings.warn(
        "osd: `learning_rate` is a schedule but `peak_learning_rate` is None, "
        "so the basis step stays 1/update_proj_gap; give the schedule's peak "
        "as `peak_learning_rate` for the reference's lr_t/lr_peak.",
        stacklevel=3)
    lr_ratio = None
  elif callable(learning_rate):
    lr_ratio = lambda step: learning_rate(step) / peak_learning_rate
  elif peak_learning_rate is not None:
    lr_ratio = lambda step: learning_rate / peak_learning_rate
  else:
    lr_ratio = None
  projector = projectors_lib.online_pca(update_proj_gap, _side(proj_type),
                                        lr_ratio=lr_ratio)
  return optax.chain(
      _project(options, optax.scale_by_adam(b1=b1, b2=b2, eps=eps), rank,
               update_proj_gap=1, scale=scale, projector=projector,
               on_refresh="keep"),
      *_decay_and_learning_rate(options, weight_decay, learning_rate),
  )


@_alias(static=("rank", "update_proj_gap", "norm", "proj_type"),
        on_refresh="keep")
def dct_adamw(
    learning_rate: optax.ScalarOrSchedule,
    rank: Union[int, float] = 256,
    *,
    update_proj_gap: int = 1,
    norm: str = "l1",
    proj_type: Optional[str] = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    options: AliasOptions,
) -> optax.GradientTransformationExtraArgs:
  """DCT-AdamW: Adam in a subspace of DCT columns chosen by the gradient, no SVD.

  ``projectors.dct``: the ``r`` columns of the orthonormal DCT-II matrix
  ``Q`` with the largest L1 norm of ``G Q`` (``Qᵀ G`` on the left), chosen
  anew every ``update_proj_gap`` steps (every step by default); the basis
  state is ``r`` int32 indices per matrix, ``Q`` is rebuilt from them. Adam
  (bias-corrected, ``eps`` added to ``√v̂``, as the code's
  ``u = m/(eps·√bc2 + √v)`` with step ``lr·√bc2/bc1``) runs in the subspace;
  moments are kept on a change of columns (the code's default
  ``rotate_subspace=False``; ``on_refresh="rotate"`` maps the first moment).
  Weight decay is applied to the weight before the step, as there.

  Args:
    learning_rate: A float or an optax schedule.
    rank: Number of DCT columns kept per matrix (int or fraction).
    update_proj_gap: Steps between column selections (the code: 1).
    norm: ``l1`` (the code's default ``ell_norm=1``) or ``l2``.
    proj_type: The side whose DCT basis is searched: ``std`` (``None``, the
      default: the smaller side, columns when ``m >= n``), ``reverse_std``,
      ``left`` or ``right``.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon (the code: 1e-8).
    weight_decay: Decoupled weight decay.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax_lowrank
    >>> params = {"w": jnp.ones((64, 32))}
    >>> tx = optax_lowrank.dct_adamw(1e-3, rank=8)
    >>> updates, state = tx.update(params, tx.init(params), params)

  References:
    Modoranu et al., `FFT-based Dynamic Subspace Selection for Low-Rank
    Adaptive Optimization of Large Language Models
    <https://arxiv.org/abs/2505.17967>`_, 2025; code:
    github.com/IST-DASLab/ISTA-DASLab-Optimizers (``fft_low_rank``).
  """
  return optax.chain(
      _project(options, inner_lib.scale_by_adam_leafwise(b1, b2, eps), rank,
               update_proj_gap=update_proj_gap,
               projector=projectors_lib.dct(_side(proj_type), norm=norm),
               on_refresh=options.on_refresh),
      *_decay_and_learning_rate(options, weight_decay, learning_rate),
  )


@_alias(static=("rank", "update_proj_gap", "selection", "proj_type"))
def grass(
    learning_rate: optax.ScalarOrSchedule,
    rank: Union[int, float] = 128,
    *,
    update_proj_gap: int = 200,
    selection: str = "norm_sampling",
    scale: Union[float, jax.Array] = 1.0,
    proj_type: Optional[str] = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    options: AliasOptions,
) -> optax.GradientTransformationExtraArgs:
  """GRASS: Adam on a structured-sparse projection (r selected rows) of each gradient.

  ``projectors.grass``: every ``update_proj_gap`` steps, ``r`` rows (the
  projected side's coordinates) are kept, either sampled with probability
  proportional to their norm and rescaled by ``1/√(r·q)`` (unbiased:
  ``E[up(down(G))] = G``) or the ``r`` largest (``selection="top_norm"``);
  ``down`` is a gather and ``up`` a scatter-add, so projection costs no
  matmul. Adam's moments and step count restart with each new selection
  (``on_refresh="reset"``, per-leaf counts), as the paper prescribes. The
  authors have not published code, so this follows the paper; its default
  gap and rank are GaLore's, against which the paper compares.

  Args:
    learning_rate: A float or an optax schedule.
    rank: Rows kept per matrix (int or fraction).
    update_proj_gap: Steps between selections.
    selection: ``norm_sampling`` or ``top_norm``.
    scale: Multiplier of the back-projected update.
    proj_type: Side whose coordinates are selected, as GaLore's (``None``:
      ``std``).
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon.
    weight_decay: Decoupled weight decay.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax_lowrank
    >>> params = {"w": jnp.ones((64, 32))}
    >>> tx = optax_lowrank.grass(1e-3, rank=8)
    >>> updates, state = tx.update(params, tx.init(params), params)

  References:
    Muhamed et al., `GRASS: Compute Efficient Low-Memory LLM Training with
    Structured Sparse Gradients <https://arxiv.org/abs/2406.17660>`_, EMNLP
    2024.
  """
  return optax.chain(
      _project(options, inner_lib.scale_by_adam_leafwise(b1, b2, eps), rank,
               update_proj_gap=update_proj_gap, scale=scale,
               projector=projectors_lib.grass(_side(proj_type),
                                              selection=selection),
               on_refresh="reset"),
      *_decay_and_learning_rate(options, weight_decay, learning_rate),
  )


@_alias(static=("rank", "update_proj_gap", "proj_type"),
        on_refresh="rotate_moments")
def adarankgrad(
    learning_rate: optax.ScalarOrSchedule,
    rank: Union[int, float] = 128,
    *,
    threshold: float = 0.9,
    switch_threshold: float = 1e-3,
    update_proj_gap: int = 200,
    scale: Union[float, jax.Array] = 0.25,
    proj_type: Optional[str] = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    options: AliasOptions,
) -> optax.GradientTransformationExtraArgs:
  """AdaRankGrad: Adam in a subspace renewed when it has converged, whose rank only shrinks.

  Per matrix, Adam runs on the projected gradient ``R = down(P, G)`` (GaLore's
  sides and ``scale``) and the subspace ``P`` is renewed from the current
  gradient once the optimisation inside it has converged,
  ``‖R‖_F ≤ switch_threshold`` (``ς``), or after ``update_proj_gap`` steps in
  it (``T``), and at step 0 (``schedules.on_convergence``; decided every
  step inside the compiled update, matrix by matrix). On a switch the new
  basis comes from a randomized SVD (``projectors.randomized_svd``) and the
  matrix keeps the smallest rank ``k`` whose directions capture
  ``threshold`` of ``‖G‖²``, never more than its previous ``k``
  (``schedules.adaptive_rank``); both Adam moments of the switched matrices
  are carried into the new subspace (``on_refresh="rotate_moments"``:
  ``M ← T(M)``, ``V ← T(√V)²`` with ``T = Pₙᵀ Pₒ``), the other matrices'
  basis and moments stay as they were.

  State is sized for ``rank`` whatever ``k`` is (JAX shapes are static;
  directions beyond ``k`` are zero columns of the basis): the adaptive rank
  saves compute in nothing and memory in nothing; docs/methods.md says why
  no rank buckets. The authors' code is not public: ``switch_threshold``
  (ours, 1e-3), ``threshold`` (ours, 0.9) and ``update_proj_gap`` (GaLore's
  200) are not the paper's tuned values, and the second moment's transport
  is ours (it stays non-negative).

  Args:
    learning_rate: A float or an optax schedule.
    rank: The largest rank (int or fraction).
    threshold: Fraction of the gradient's energy the subspace must capture.
    switch_threshold: ``ς``: the projected gradient's Frobenius norm at or
      below which a matrix switches subspace.
    update_proj_gap: ``T``: the most steps a matrix stays in one subspace.
    scale: GaLore's scale of the back-projected update.
    proj_type: ``std`` (``None``, the default), ``reverse_std``, ``left`` or
      ``right``.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon.
    weight_decay: Decoupled weight decay.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax_lowrank
    >>> params = {"w": jnp.ones((64, 32))}
    >>> tx = optax_lowrank.adarankgrad(1e-3, rank=8)
    >>> updates, state = tx.update(params, tx.init(params), params)

  References:
    Refael et al., `AdaRankGrad: Adaptive Gradient-Rank and Moments for
    Memory-Efficient LLMs Training and Fine-Tuning
    <https://arxiv.org/abs/2410.17881>`_, ICLR 2025.
  """
  projector = schedules_lib.on_convergence(
      schedules_lib.adaptive_rank(
          projectors_lib.randomized_svd(_side(proj_type)), threshold),
      switch_threshold, update_proj_gap)
  return optax.chain(
      _project(options, optax.scale_by_adam(b1=b1, b2=b2, eps=eps), rank,
               update_proj_gap=update_proj_gap, scale=scale,
               projector=projector, on_refresh=options.on_refresh),
      *_decay_and_learning_rate(options, weight_decay, learning_rate),
  )


galore_8bit = functools.partial(galore, state_dtype="int8")
galore_8bit.__name__ = "galore_8bit"
galore_8bit.__doc__ = """8-bit GaLore: ``galore`` with int8 Adam moments.

  ``functools.partial(galore, state_dtype="int8")``: the moments are
  quantized with a signed square-root map per block of 256
  (``quantize.quantize_state``), where galore-torch's ``GaLoreAdamW8bit``
  uses bitsandbytes' dynamic map. Moments are kept across refreshes
  (``on_refresh="keep"``), as there.

  Args:
    learning_rate: A float or an optax schedule.
    state_dtype: ``"int8"`` (default).
    **kwargs: Every other argument of ``galore``, with its default there (the
      shared options among them).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax_lowrank
    >>> params = {"w": jnp.ones((512, 256))}
    >>> tx = optax_lowrank.galore_8bit(1e-3, rank=16)
    >>> updates, state = tx.update(params, tx.init(params), params)

  References:
    Zhao et al., `GaLore <https://arxiv.org/abs/2403.03507>`_, ICML 2024
    (8-bit GaLore); Dettmers et al., `8-bit Optimizers via Block-wise
    Quantization <https://arxiv.org/abs/2110.02861>`_, ICLR 2022.
  """


@_alias(static=("rank", "update_proj_gap", "proj_type", "proj_bits",
                "proj_group_size", "gamma_proj", "queue_size"),
        defaults={"state_dtype": "int8"})
def q_galore(
    learning_rate: optax.ScalarOrSchedule,
    rank: Union[int, float] = 256,
    *,
    update_proj_gap: int = 200,
    scale: Union[float, jax.Array] = 0.25,
    proj_type: Optional[str] = None,
    proj_bits: Optional[int] = None,
    proj_group_size: Optional[int] = None,
    cos_threshold: float = 0.4,
    gamma_proj: Optional[int] = None,
    queue_size: Optional[int] = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    options: AliasOptions,
) -> optax.GradientTransformationExtraArgs:
  """Q-GaLore: int4 SVD basis, lazy layer-wise refresh, 8-bit Adam moments.

  GaLore (``std`` orientation, exact SVD in float32) with three changes from
  the authors' code: the basis is stored block-wise in ``proj_bits`` bits
  (groups of ``proj_group_size``; ``quantize.quantize_basis``); each matrix
  refreshes lazily (``schedules.lazy``: after ``queue_size`` refreshes whose
  leading singular vectors average a cosine similarity of at least
  ``cos_threshold``, its gap is multiplied by ``gamma_proj``); Adam's moments
  are int8 blocks of 256 (``state_dtype="int8"``, ``quantize.quantize_state``,
  signed square-root map, where the code uses bitsandbytes' 8-bit Adam).
  Q-GaLore's int8 weights with stochastic rounding are a training-program
  option, not part of this optimizer (``train.pretrain --weight-quant
  int8``, built on ``quantize.quantize(..., stochastic=True)``).

  Args:
    learning_rate: A float or an optax schedule (the authors: 0.015 for
      130M, 10% warmup, cosine).
    rank: Subspace rank (the authors: 256 for 130M, 1024 for 7B).
    update_proj_gap: Initial refresh gap (the authors: 200; 500 for 7B).
    scale: GaLore's scale.
    proj_type: ``std`` (``None``, the default, the authors'),
      ``reverse_std``, ``left`` or ``right``.
    proj_bits: Bits of the stored basis, 4 or 8; ``None``: 4.
    proj_group_size: Elements per quantization group of the basis (even for
      4 bits); ``None``: 256.
    cos_threshold: Mean similarity above which a matrix's gap grows (0.4).
    gamma_proj: Growth factor of the gap, an int >= 2; ``None``: 2.
    queue_size: Refreshes averaged; ``None``: 5.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon.
    weight_decay: Decoupled weight decay.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax_lowrank
    >>> params = {"w": jnp.ones((512, 256))}
    >>> tx = optax_lowrank.q_galore(1e-3, rank=16)
    >>> updates, state = tx.update(params, tx.init(params), params)

  References:
    Zhang et al., `Q-GaLore: Quantized GaLore with INT4 Projection and
    Layer-Adaptive Low-Rank Gradients <https://arxiv.org/abs/2407.08296>`_,
    2024; code: github.com/VITA-Group/Q-GaLore.
  """
  proj_bits = 4 if proj_bits is None else proj_bits
  proj_group_size = 256 if proj_group_size is None else proj_group_size
  if proj_bits == 4 and proj_group_size % 2:
    raise ValueError(
        f"`proj_group_size` must be even for `proj_bits`=4 (two codes per "
        f"byte), got {proj_group_size!r}")
  projector = quantize_lib.quantize_basis(
      schedules_lib.lazy(projectors_lib.svd(_side(proj_type)),
                         update_proj_gap, cos_threshold=cos_threshold,
                         queue_size=5 if queue_size is None else queue_size,
                         gamma=2 if gamma_proj is None else gamma_proj),
      bits=proj_bits, block_size=proj_group_size)
  return optax.chain(
      _project(options, optax.scale_by_adam(b1=b1, b2=b2, eps=eps), rank,
               update_proj_gap=update_proj_gap, scale=scale,
               projector=projector, on_refresh="keep"),
      *_decay_and_learning_rate(options, weight_decay, learning_rate),
  )


@_alias(static=("rank", "update_proj_gap", "reproject_factor", "proj_type"))
def coap(
    learning_rate: optax.ScalarOrSchedule,
    rank: Union[int, float] = 128,
    *,
    update_proj_gap: int = 32,
    reproject_factor: Optional[int] = None,
    scale: Union[float, jax.Array] = 0.25,
    proj_type: Optional[str] = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    options: AliasOptions,
) -> optax.GradientTransformationExtraArgs:
  """COAP-AdamW: Adam in a subspace kept aligned with the first moment.

  Adam runs on ``R = down(P, G)`` as in GaLore. The basis ``P``
  (``projectors.coap``) is found at step 0 by a range finder from a Gaussian
  block. Every ``update_proj_gap`` steps (the code's ``update_interval``) it
  either takes one gradient step (learning rate 0.1, gradient norm clipped to
  1) on the reconstruction error of ``G`` times one minus the mean row
  cosine between the back-projected first moment and ``G``, or, every
  ``reproject_factor``-th time (step ``update_proj_gap · reproject_factor``
  and its multiples), is recomputed by the range finder seeded with the
  current basis. The moments are kept across every change of basis (the
  code's ``restore_state=False``, its setting for LLaMA). Leaves that are not
  projected get the same Adam.

  Follows the authors' ``coap_torch.AdamW``: the Hugging Face AdamW, whose
  ``eps`` is on the uncorrected ``√v`` and whose bias correction is in the
  step size (``inner.scale_by_adam_uncorrected`` then
  ``inner.scale_by_bias_correction``), with the back-projected direction
  multiplied by ``scale``. Two documented differences: weight decay uses the
  parameter before the step (the code decays the updated one, a difference
  of order ``lr² · weight_decay``), and the first Gaussian block is drawn
  from a JAX key (the code seeds a ``torch.Generator`` with 3407 for every
  matrix). The signs of a recomputed basis, which the code leaves to the SVD
  library although the kept moments depend on them, follow the basis they
  replace (see ``projectors.coap``). The code computes each basis in float32
  and keeps it in the parameter's dtype; so does this. With
  ``state_dtype="int8"`` (the authors' ``CoapAdamW8bit``, their 7B setting,
  uses bitsandbytes' map) the basis step reads the dequantized first moment.

  Args:
    learning_rate: A float or an optax schedule (the authors' LLaMA-1B: 0.01,
      10% warmup, cosine).
    rank: Subspace rank (int) or fraction of each matrix's smaller side (the
      authors: 512 for LLaMA-1B, 1024 for 7B).
    update_proj_gap: Steps between basis updates, the code's
      ``update_interval`` (its default 32; its LLaMA scripts use 40 for 1B
      and 100 for 7B).
    reproject_factor: Every how many updates the basis is recomputed;
      ``None``: 5 (the code's).
    scale: Multiplier of the back-projected update (the code's class default
      is 1.0; its LLaMA scripts use 0.25).
    proj_type: ``std`` (``None``, the default; the code: the smaller side),
      ``reverse_std``, ``left`` or ``right``.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon, on the uncorrected ``√v``.
    weight_decay: Decoupled weight decay.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax, jax.numpy as jnp, optax_lowrank
    >>> params = {"w": jnp.ones((64, 32)), "b": jnp.zeros(32)}
    >>> tx = optax_lowrank.coap(1e-2, rank=8)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)

  References:
    Xiao et al., `COAP: Memory-Efficient Training with Correlation-Aware
    Gradient Projection <https://arxiv.org/abs/2412.00071>`_, CVPR 2025;
    code: github.com/bytedance/coap.
  """
  projector = projectors_lib.coap(
      5 if reproject_factor is None else reproject_factor, _side(proj_type))
  inner, bias_correction = _hf_adam(b1, b2, eps)
  return optax.chain(
      _project(options, inner, rank, update_proj_gap=update_proj_gap,
               scale=scale, projector=projector, on_refresh="keep"),
      bias_correction,
      *_decay_and_learning_rate(options, weight_decay, learning_rate),
  )


@_alias(static=("rank", "switch_step", "update_proj_gap", "proj_type"))
def golore(
    learning_rate: optax.ScalarOrSchedule,
    rank: Union[int, float] = 128,
    *,
    switch_step: Optional[int] = None,
    update_proj_gap: int = 200,
    scale: Union[float, jax.Array] = 1.0,
    proj_type: Optional[str] = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    options: AliasOptions,
) -> optax.GradientTransformationExtraArgs:
  """GoLore-AdamW: GaLore until ``switch_step``, then random subspaces.

  Adam runs on ``R = down(P, G)`` as in GaLore, with ``P`` refreshed at step 0
  and every ``update_proj_gap`` steps: by the gradient's exact SVD before
  ``switch_step``, by a uniformly random orthonormal matrix from then on
  (``projectors.golore``). At every refresh the first moment is rotated into
  the new subspace (``on_refresh="rotate"``, the code's
  ``exp_avg = Pₙᵀ Pₒ exp_avg``); the second is kept.

  Follows the authors' ``golore_torch.AdamW``: the Hugging Face AdamW
  (``eps`` on the uncorrected ``√v``, bias correction in the step size), the
  back-projection multiplied by ``scale``. Documented differences: weight
  decay uses the parameter before the step (the code decays the updated one,
  a difference of order ``lr² · weight_decay``), and the random matrices are
  drawn from JAX keys.

  Args:
    learning_rate: A float or an optax schedule (the authors' 60M run: 1e-3,
      1000 warmup steps, cosine).
    rank: Subspace rank (int) or fraction of each matrix's smaller side.
    switch_step: The first step with random subspaces: the reference's
      ``rand_ratio · num_training_steps``. ``None`` (default) or ``0`` is the
      paper's GoLore, random throughout; its pretraining recipe runs GaLore
      for the first 80% of the steps (``switch_step = 0.8 · steps``). (The
      code's own default ratio, 2, never switches: plain GaLore.)
    update_proj_gap: Steps between refreshes.
    scale: Multiplier of the back-projected update (the code's default 1).
    proj_type: ``std`` (``None``, the default), ``reverse_std``, ``left`` or
      ``right``.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon, on the uncorrected ``√v``.
    weight_decay: Decoupled weight decay.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax_lowrank
    >>> params = {"w": jnp.ones((64, 32)), "b": jnp.zeros(32)}
    >>> tx = optax_lowrank.golore(1e-3, rank=8, switch_step=800)
    >>> updates, state = tx.update(params, tx.init(params), params)

  References:
    He et al., `Subspace Optimization for Large Language Models with
    Convergence Guarantees <https://arxiv.org/abs/2410.11289>`_, ICML 2025;
    code: github.com/pkumelon/Golore.
  """
  projector = projectors_lib.golore(
      0 if switch_step is None else switch_step, _side(proj_type))
  inner, bias_correction = _hf_adam(b1, b2, eps)
  return optax.chain(
      _project(options, inner, rank, update_proj_gap=update_proj_gap,
               scale=scale, projector=projector, on_refresh="rotate"),
      bias_correction,
      *_decay_and_learning_rate(options, weight_decay, learning_rate),
  )


@_alias(static=("rank", "update_proj_gap", "proj_type", "projector",
                "exact_gradient", "reset_magnitude"),
        on_refresh="keep",
        checks={"exact_gradient": _flag, "reset_magnitude": _flag})
def gradnorm_lorp(
    learning_rate: optax.ScalarOrSchedule,
    rank: Union[int, float] = 128,
    *,
    update_proj_gap: int = 250,
    scale: Union[float, jax.Array] = 0.25,
    proj_type: Optional[str] = None,
    projector: Union[str, Projector] = "svd",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    exact_gradient: bool = False,
    reset_magnitude: bool = True,
    options: AliasOptions,
) -> optax.GradientTransformationExtraArgs:
  """GradNormLoRP: GaLore-Adam on the direction of weight-normalized matrices.

  Each projected matrix is trained as ``W = g · v / ‖v‖`` per output unit
  (the norm over its input axes: a row of ``nn.Linear.weight``, a column of
  an ``(in, out)`` kernel): ``∂v = G · g / ‖v‖`` goes through GaLore's Adam
  (exact SVD subspace refreshed at step 0 and every ``update_proj_gap``
  steps, moments kept, the update times ``scale``), ``∂g = Σ G ⊙ v / ‖v‖``
  through Adam, and the update is ``g'·v'/‖v'‖ − W``
  (``weight_norm.weight_norm_project``; it needs ``params``). The other
  leaves get AdamW. Adam is Hugging Face's, as in the code (bias correction
  in the step size, ``eps`` on the uncorrected ``√v``).

  Follows the authors' ``LowRankWeightNormAdamW`` (the optimizer their
  fine-tuning recipe runs; the ``WeightNormGaLoreAdamW`` named in their
  pre-training recipe never writes the weights): each step starts from
  ``g = ‖v‖`` (``reset_magnitude=True``), so ``∂v`` is ``G``; weight decay
  multiplies the updated ``v`` and ``g`` by ``1 − lr · weight_decay``.
  Defaults are those of the README's pre-training command (rank 128, gap
  250, scale 0.25) and of the optimizer (betas, eps 1e-6, no decay).
  Differences: the state keeps ``g`` and ``‖v‖`` per output instead of a
  copy of ``v`` (the same arithmetic: ``v = (‖v‖/g) · W``); a zero column
  of ``W`` stays zero (the code divides by its zero norm); the leaves that
  are not projected get AdamW with the decay on the weight before the step,
  where the code weight-normalizes them too (embeddings, norm weights).

  Args:
    learning_rate: A float or an optax schedule (the README: 0.01).
    rank: Subspace rank (int) or fraction of each matrix's smaller side.
    update_proj_gap: Steps between SVD refreshes.
    scale: GaLore's ``alpha`` on the back-projected direction update.
    proj_type: ``std`` (``None``, the default), ``reverse_std``, ``left``,
      ``right`` or ``full``. An error with a ``Projector`` instance.
    projector: ``"svd"`` or any ``Projector``.
    b1: Adam's first-moment decay (direction and magnitude).
    b2: Adam's second-moment decay.
    eps: Adam's epsilon, on the uncorrected ``√v``.
    weight_decay: Decoupled weight decay.
    exact_gradient: ``∂v = g/‖v‖ · (G − ∂g · v/‖v‖)``, the exact gradient
      of the reparameterisation, instead of the authors' ``G · g / ‖v‖``.
    reset_magnitude: Start each step from ``g = ‖v‖`` (the code); ``False``
      keeps ``g`` as a parameter of its own (the paper).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_lowrank
    >>> params = {"w": jnp.ones((64, 32)) + jnp.eye(64, 32), "b": jnp.zeros(32)}
    >>> tx = optax_lowrank.gradnorm_lorp(1e-2, rank=8, update_proj_gap=50)
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = jax.jit(tx.update)(grads, state, params)
    >>> params = optax.apply_updates(params, updates)

  References:
    Huang et al., `Gradient Weight-normalized Low-rank Projection for
    Efficient LLM Training <https://arxiv.org/abs/2412.19616>`_, AAAI 2025;
    code: github.com/Jhhuangkay/Gradient-Weight-normalized-Low-rank-Projection-for-Efficient-LLM-Training.
  """
  projector = _projector(projector, proj_type, {"svd": projectors_lib.svd})
  inner, bias_correction = _hf_adam(b1, b2, eps)
  direction = optax.chain(
      _project(options, inner, rank, update_proj_gap=update_proj_gap,
               scale=scale, projector=projector,
               on_refresh=options.on_refresh),
      bias_correction)
  return weight_norm_lib.weight_norm_project(
      direction, optax.chain(*_hf_adam(b1, b2, eps)), learning_rate,
      rank=rank, projection_mask=options.projection_mask,
      dimension_numbers=options.dimension_numbers,
      weight_decay=weight_decay, mask=options.mask,
      exact_gradient=exact_gradient, reset_magnitude=reset_magnitude)


# doctest does not look into functools.partial objects: run their examples.
__test__ = {"apollo_mini": apollo_mini.__doc__,
            "galore_8bit": galore_8bit.__doc__}


@_alias(static=("rank", "full_rank_layers", "num_layers", "update_proj_gap",
                "proj_type", "ns_steps"))
def gum(
    learning_rate: optax.ScalarOrSchedule,
    rank: Union[int, float] = 128,
    *,
    full_rank_layers: int = 2,
    num_layers: Optional[int] = None,
    update_proj_gap: int = 200,
    beta: float = 0.95,
    ns_steps: int = 5,
    consistent_rms: Optional[float] = 0.2,
    scale: Union[float, jax.Array] = 1.0,
    proj_type: Optional[str] = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    options: AliasOptions,
) -> optax.GradientTransformationExtraArgs:
  """GUM: GaLore made unbiased by layer-wise sampling, Muon in both branches.

  Each period of ``update_proj_gap`` steps takes the exact SVD basis ``P`` of
  every projected gradient (GaLore's ``std`` side) and draws
  ``full_rank_layers`` (``k``, the paper's ``γ``) of the model's ``L`` layers,
  the same for every matrix of a layer (``sampling.choose_layers``); with
  ``q = k/L``, a layer not drawn steps ``P·NS(R)`` with
  ``R ← βR + PᵀG/(1−q)``, a drawn one ``NS(F)`` with
  ``F ← βF + (G − PPᵀG)/q`` (``gum.combine``). Both are multiplied by
  ``scale · consistent_rms · √max(m, n)``; the leaves not projected
  (embeddings, norms, head) take Adam (``b1``, ``b2``, ``eps``); then
  decoupled weight decay and the learning rate, shared by all.

  Layers: a stacked leaf's first batch axis is its layers axis (scanned
  models), and it keeps full-rank momentum for its ``k`` drawn layers only.
  Unscanned blocks (one layer per leaf) need ``num_layers`` and a
  ``group_fn`` labelling each projected leaf with its layer (one label per
  layer); each such leaf keeps an ``m × n`` buffer for the periods it is
  drawn, so only stacked layers save the full-rank branch's memory.

  No code of the authors is public; this follows the paper's update rules.
  Our choices where it is silent: the low-rank momentum is kept across
  periods (GaLore's rule) and left untouched while its layer is drawn; the
  full-rank momentum starts from zero each period; momentum without
  Nesterov, as the paper writes it; Muon's Newton–Schulz (5 steps, Keller
  Jordan's coefficients); the update scale ``0.2·√max(m, n)`` of Liu et al.
  (so that one learning rate serves Muon and Adam; ``consistent_rms=None``
  gives Keller Jordan's ``√max(1, m/n)``); ``k = 2`` as in LISA. Note that
  Newton–Schulz divides by the Frobenius norm first, so the factors
  ``1/(1−q)`` and ``1/q`` cancel (up to ``eps``) in both branches' updates.

  Args:
    learning_rate: A float or an optax schedule.
    rank: Subspace rank (int) or fraction of each matrix's smaller side.
    full_rank_layers: ``k``, layers drawn per period, ``1 <= k < L``.
    num_layers: ``L`` for unscanned blocks (leaves of one layer); ``None``
      for stacked layers, where ``L`` is the layers axis.
    update_proj_gap: Steps per period (SVD refresh and new draw).
    beta: Momentum of both branches.
    ns_steps: Newton–Schulz iterations.
    consistent_rms: The update's target RMS (see above), or ``None``.
    scale: Multiplier of the projected leaves' updates.
    proj_type: The SVD side: ``std`` (``None``, the default),
      ``reverse_std``, ``left`` or ``right``.
    b1: Adam's first-moment decay (leaves not projected).
    b2: Adam's second-moment decay (leaves not projected).
    eps: Adam's epsilon (leaves not projected).
    weight_decay: Decoupled weight decay, in the full space.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax_lowrank
    >>> params = {"layers": jnp.ones((4, 32, 16)), "b": jnp.zeros(16)}
    >>> tx = optax_lowrank.gum(
    ...     1e-3, rank=4, full_rank_layers=1,
    ...     dimension_numbers={"layers": optax_lowrank.DimensionNumbers(1, 2),
    ...                        "b": None})
    >>> updates, state = tx.update(params, tx.init(params), params)

  References:
    Pan et al., `Unbiased Gradient Low-Rank Projection
    <https://arxiv.org/abs/2510.17802>`_, 2025.
  """
  if options.stagger:
    raise ValueError(
        "`stagger` must be False for gum: every leaf starts its period (and "
        "reads the layer draw) on the same step")
  if num_layers is not None and options.group_fn is None:
    raise ValueError(
        "`num_layers` (unscanned blocks) needs a `group_fn` labelling each "
        "projected leaf with its layer")
  if num_layers is not None and not full_rank_layers < num_layers:
    raise ValueError(
        f"`full_rank_layers` must be < num_layers={num_layers}, got "
        f"{full_rank_layers}")
  side = _side(proj_type)
  draw = dict(num_layers=num_layers, proj_type=side)
  return optax.chain(
      _project(options, optax.identity(), rank,
               update_proj_gap=update_proj_gap, scale=scale,
               projector=gum_lib.projector(full_rank_layers, seed=options.seed,
                                           **draw),
               on_refresh="keep",
               combine=gum_lib.combine(
                   full_rank_layers, beta=beta, ns_steps=ns_steps,
                   consistent_rms=consistent_rms, **draw),
               unprojected=optax.scale_by_adam(b1=b1, b2=b2, eps=eps)),
      *_decay_and_learning_rate(options, weight_decay, learning_rate),
  )

# doctest does not look into functools.partial objects: run their examples.
__test__ = {"apollo_mini": apollo_mini.__doc__,
            "galore_8bit": galore_8bit.__doc__}


def _active_layers(name, value):
  if value is None:
    return value
  if isinstance(value, (bool, np.bool_)) or not (
      (isinstance(value, (int, np.integer)) and value >= 1)
      or (isinstance(value, float) and 0.0 < value <= 1.0)):
    raise ValueError(
        f"`{name}` must be an int >= 1 or a float fraction in (0, 1], got "
        f"{value!r}")
  return int(value) if isinstance(value, (int, np.integer)) else value


def _layer_weights(name, value):
  if isinstance(value, str):
    if value not in ("owl", "uniform"):
      raise ValueError(
          f"`{name}` must be 'owl', 'uniform' or non-negative per-layer "
          f"weights, got {value!r}")
    return value
  try:  # static (never traced): numbers, lists or arrays
    weights = np.asarray(value, np.float64)
  except (TypeError, ValueError):
    weights = np.zeros((0,))
  if (weights.ndim != 1 or weights.size == 0
      or not np.all(np.isfinite(weights)) or not np.all(weights >= 0)):
    raise ValueError(
        f"`{name}` must be 'owl', 'uniform' or non-negative per-layer "
        f"weights, got {value!r}")
  return value


def _layer_of(name, value):
  if value is not None and not callable(value):
    raise ValueError(f"`{name}` must be callable or None, got {value!r}")
  return value


@_alias(static=("rank", "update_proj_gap", "proj_type", "active_layers",
                "interval", "layer_weights", "layer_of"),
        checks={"active_layers": _active_layers,
                "interval": _integer(1, optional=True),
                "outlier_threshold": _number(0.0, lo_open=True),
                "layer_weights": _layer_weights,
                "layer_of": _layer_of})
def owlore(
    learning_rate: optax.ScalarOrSchedule,
    rank: Union[int, float] = 256,
    *,
    active_layers: Optional[Union[int, float]] = None,
    interval: Optional[int] = None,
    layer_weights: Union[str, Any] = "owl",
    outlier_threshold: float = 13.0,
    layer_of: Optional[Callable[[str], Any]] = None,
    update_proj_gap: int = 100,
    scale: Union[float, jax.Array] = 1.0,
    proj_type: Optional[str] = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    options: AliasOptions,
) -> optax.GradientTransformationExtraArgs:
  """OwLore: GaLore-AdamW in a few layers at a time, drawn by outlier ratio.

  At step 0 and every ``interval`` steps, ``active_layers`` of the model's
  layers are drawn without replacement with probability proportional to each
  layer's outlier ratio (OWL, ``sampling.outlier_ratios`` of the weights at
  the first update, ``M = outlier_threshold``), the same layers for every
  matrix of a layer, stacked or unscanned (``sampling.layerwise``). The drawn
  layers take GaLore-AdamW steps; the others are frozen, their optimizer
  state (bases, moments, step count) kept unchanged; leaves in no layer
  (embeddings, final norm, LM head) are trained every step.

  Follows the authors' code (pixeli99/OwLore: LMFlow's LISA callback with
  ``lisa_prob_mode=owl`` and galore-torch's ``GaLoreAdamW``; their script
  ``run_owlore_low_rank.sh``: 5 of LLaMA-2-7B's 32 layers, interval 50,
  rank 256, ``update_proj_gap`` 100, scale 1, lr 3e-4): the Hugging Face AdamW
  step (``eps`` on the uncorrected ``√v``) with each layer's bias correction
  by its own step count (PyTorch's per-parameter ``step`` advances only with
  a gradient). Documented differences: (1) the code reads cached ratios
  computed by OWL from weights times calibration activations; here they come
  from ``|W|`` alone (or pass ``layer_weights``); all-zero ratios (a freshly
  initialized model has no weight ``M`` times the mean) fall back to uniform
  where ``numpy`` would fail; (2) subspaces are refreshed every
  ``gcd(interval, update_proj_gap)`` steps (at every draw at least), where
  each galore-torch parameter refreshes every ``update_proj_gap`` of its own
  steps: with 50 and 100, every period a layer is drawn starts from a fresh
  SVD, instead of every second one; (3) weight decay (0 by default, as
  ``GaLoreAdamW``) uses the parameter before the step.

  Args:
    learning_rate: A float or an optax schedule (the authors': 3e-4, linear
      decay).
    rank: Subspace rank (int) or fraction of each matrix's smaller side.
    active_layers: Layers trained at a time, ``γ``: an int, or a float in
      (0, 1] as a fraction of the layers, ``max(1, round(f·L))``; ``None``
      (default): ``5/32``, the authors' 5 of 32.
    interval: Steps between draws of the layers, ``K``; ``None`` (default):
      50.
    layer_weights: ``"owl"`` (outlier ratios of the weights), ``"uniform"``
      (LISA) or fixed non-negative ``(L,)`` weights (e.g. the authors'
      cached ratios).
    outlier_threshold: OWL's ``M``: an outlier exceeds ``M`` times its
      layer's mean magnitude.
    layer_of: ``layer_of(path_name)``: each leaf's layer, ``None`` or
      ``sampling.STACKED``; ``None`` (default): ``sampling.layer_of_path``
      (``layers/3/...`` and ``blocks_3/...`` are layer 3, ``layers/...`` is
      stacked).
    update_proj_gap: Steps between SVD refreshes (see above).
    scale: GaLore's ``alpha`` on the back-projected update.
    proj_type: ``std`` (``None``, the default), ``reverse_std``, ``left``,
      ``right`` or ``full``.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon, on the uncorrected ``√v``.
    weight_decay: Decoupled weight decay of the trained leaves.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax, jax.numpy as jnp, optax_lowrank
    >>> params = {"embed": jnp.ones((64, 16)),
    ...           "layers": {"w": jnp.ones((4, 16, 32))}}
    >>> dims = {"embed": None,
    ...         "layers": {"w": optax_lowrank.DimensionNumbers(1, 2)}}
    >>> tx = optax_lowrank.owlore(3e-4, rank=4, active_layers=2,
    ...                           dimension_numbers=dims)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)

  References:
    Li et al., `OwLore: Outlier-weighed Layerwise Sampled Low-Rank Projection
    for LLM Fine-tuning <https://arxiv.org/abs/2405.18380>`_, 2024; code:
    github.com/pixeli99/OwLore.
  """
  if options.stagger:
    raise ValueError(
        "`stagger` must be False for owlore: a layer drawn at a step where its "
        "refresh is not due would start from a zero basis")
  active_layers = 5 / 32 if active_layers is None else active_layers
  interval = 50 if interval is None else interval
  layer_of = sampling.layer_of_path if layer_of is None else layer_of
  if isinstance(layer_weights, str):
    weights = None if layer_weights == "uniform" else functools.partial(
        sampling.outlier_ratios, threshold=outlier_threshold, layer_of=layer_of)
  else:
    weights = layer_weights
  inner = inner_lib.scale_by_adam_uncorrected(b1, b2, eps)
  return optax.chain(
      sampling.layerwise(
          _project(options, inner, rank,
                   update_proj_gap=math.gcd(interval, update_proj_gap),
                   scale=scale, projector=projectors_lib.svd(_side(proj_type)),
                   on_refresh="keep"),
          active_layers,
          interval=interval,
          weights=weights,
          layer_of=layer_of,
          bias_correction=(b1, b2),
          then=optax.add_decayed_weights(weight_decay, options.mask),
          seed=options.seed),
      optax.scale_by_learning_rate(learning_rate),
  )


# doctest does not look into functools.partial objects: run their examples.
__test__ = {"apollo_mini": apollo_mini.__doc__,
            "galore_8bit": galore_8bit.__doc__}
