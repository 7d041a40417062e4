"""Optimizer registry: name → factory(args, schedule, mask, dimension_numbers).

`args` is the trainer's parsed flags; `mask` (which leaves are projected) and
`dimension_numbers` come from `models.lowrank_spec` (derived from the model, never typed
by hand) and reach a library alias as `projection_mask` and `dimension_numbers` (its
`mask` is the weight-decay mask, as in `optax.adamw`). `optax_lowrank` is
imported lazily inside the factories, so `adamw` runs without it. Names from a registry
`optax_lowrank.optimizers` (dict name → factory), when the library has one, are added.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import optax

Factory = Callable[[Any, optax.Schedule, Any, Any], optax.GradientTransformation]
OPTIMIZERS: dict[str, Factory] = {}


def register(name: str):
  def wrap(factory: Factory) -> Factory:
    OPTIMIZERS[name] = factory
    return factory
  return wrap


# The low-rank flags: refused by optimizers that do not take them (adamw takes none).
LOWRANK_FLAGS = ("rank", "update_proj_gap", "scale", "proj_type")


# The low-rank flags each AdamW baseline takes (it refuses the others).
ADAMW_FLAGS = {"adamw": (), "adamw_lr_scaled": ("scale",)}
# GaLore's `scale` (optax_lowrank.galore's default), the default of adamw_lr_scaled.
GALORE_SCALE = 0.25


def _adamw(name, args, schedule):
  error = refused_flags(name, args)
  if error:
    raise ValueError(error)
  default = lambda value, fallback: fallback if value is None else value
  return optax.adamw(schedule, b1=default(args.b1, 0.9), b2=default(args.b2, 0.999),
                     eps=default(args.eps, 1e-6), weight_decay=args.weight_decay)


@register("adamw")
def adamw(args, schedule, mask, dims):
  del mask, dims
  return _adamw("adamw", args, schedule)


@register("adamw_lr_scaled")
def adamw_lr_scaled(args, schedule, mask, dims):
  """AdamW with GaLore's per-group learning rates: `lr · scale` on the matrices GaLore
  projects (`mask`), `lr` elsewhere, as galore-torch's param groups give them. The whole
  AdamW update of a masked leaf (weight decay included) is multiplied by `--scale`
  (default GaLore's 0.25), so the comparison with GaLore isolates the projection."""
  del dims
  scale = GALORE_SCALE if args.scale is None else args.scale
  if not scale > 0:
    raise ValueError(f"adamw_lr_scaled: --scale must be positive, got {scale}")
  return optax.chain(_adamw("adamw_lr_scaled", args, schedule),
                     optax.masked(optax.scale(scale), mask))


@register("galore")
def galore(args, schedule, mask, dims):
  import optax_lowrank
  return _from_library(optax_lowrank.galore)(args, schedule, mask, dims)


def _library_registry() -> dict[str, Callable]:
  try:
    import optax_lowrank
  except Exception:  # noqa: BLE001 - absent or broken: only the built-in names are offered
    return {}
  registry = getattr(optax_lowrank, "optimizers", None)
  return dict(registry) if isinstance(registry, dict) else {}


def _offered(args, mask=None, dims=None) -> dict[str, Any]:
  """The keyword arguments the flags offer a library factory (unset flags left out)."""
  offered = dict(rank=args.rank, update_proj_gap=args.update_proj_gap, scale=args.scale,
                 proj_type=args.proj_type, b1=args.b1, b2=args.b2, eps=args.eps,
                 weight_decay=args.weight_decay, projection_mask=mask,
                 dimension_numbers=dims, peak_learning_rate=args.lr)
  return {k: v for k, v in offered.items() if v is not None}


def _refused(factory: Callable, args) -> str | None:
  """Why the flags do not fit `factory` (a flag set that it does not take), or None."""
  takes = set(inspect.signature(factory).parameters) - {"learning_rate"}
  # Unset flags (None) leave the optimizer's own defaults in place; a flag the user
  # set that the optimizer does not take is an error, not silently dropped.
  dropped = sorted(k for k in _offered(args) if k not in takes and k not in _ALWAYS)
  if dropped:
    flags = ", ".join("--" + k.replace("_", "-") for k in dropped)
    return (f"{_name(factory)} takes no {flags}; its arguments are {sorted(takes)} "
            "(pass others with --opt-args K=V)")
  unknown = sorted(k for k in (getattr(args, "opt_args", None) or {}) if k not in takes)
  if unknown:
    return (f"--opt-args: {_name(factory)} takes no {unknown}; its arguments are "
            f"{sorted(takes)}")
  return None


def refused_flags(name: str, args) -> str | None:
  """Why the flags do not fit optimizer `name` (checked before anything is built)."""
  if name in ADAMW_FLAGS:
    given = [k for k in LOWRANK_FLAGS
             if k not in ADAMW_FLAGS[name] and getattr(args, k, None) is not None]
    given += ["opt_args"] if getattr(args, "opt_args", None) else []
    if given:
      flags = ", ".join("--" + k.replace("_", "-") for k in given)
      return f"{name} takes no {flags} (they are for the low-rank optimizers)"
    return None
  factory = _library_registry().get(name)
  if factory is None and name == "galore":  # the built-in wraps the library's galore
    import optax_lowrank
    factory = optax_lowrank.galore
  return None if factory is None else _refused(factory, args)


def _from_library(factory: Callable) -> Factory:
  """Adapts a library factory `f(learning_rate, **hyper)`: passes the flags it accepts."""
  def build(args, schedule, mask, dims):
    error = _refused(factory, args)
    if error:
      raise ValueError(error)
    takes = set(inspect.signature(factory).parameters)
    kwargs = {k: v for k, v in _offered(args, mask, dims).items() if k in takes}
    extra = dict(getattr(args, "opt_args", None) or {})
    return factory(schedule, **{**kwargs, **extra})
  return build


def _name(factory: Callable) -> str:
  """A factory's name, also for a `functools.partial` without one."""
  while not hasattr(factory, "__name__") and hasattr(factory, "func"):
    factory = factory.func
  return getattr(factory, "__name__", repr(factory))


# Offered to every factory; dropped without a word when it does not take them.
_ALWAYS = frozenset({"projection_mask", "dimension_numbers", "weight_decay",
                     "peak_learning_rate"})


def available() -> dict[str, Factory]:
  """Built-in names plus the library's registry (built-ins win on a name clash)."""
  names = {k: _from_library(f) for k, f in _library_registry().items()}
  names.update(OPTIMIZERS)
  return names


def make_schedule(lr: float, steps: int, warmup_fraction: float = 0.1,
                  final_fraction: float = 0.1) -> optax.Schedule:
  """Linear warmup over `warmup_fraction` of the steps, then cosine decay to
  `final_fraction · lr` (the GaLore paper's schedule: 10% warmup, decay to 10%)."""
  warmup = int(round(warmup_fraction * steps))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warmup,
      decay_steps=max(steps, warmup + 1), end_value=lr * final_fraction)


def build(name: str, args, schedule, mask, dims, *,
          clip: bool = True) -> optax.GradientTransformation:
  """The full transform: optional global-norm clipping (`clip` and `--clip`), then the
  named optimizer."""
  tx = available()[name](args, schedule, mask, dims)
  if clip and args.clip and args.clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(args.clip), tx)
  return tx



def build_accumulating(name: str, args, schedule, mask, dims, params):
  """`optax_lowrank.MultiSteps` over `--micro-batches` for `--accumulate` auto/subspace.

  Returns None where gradients are accumulated at full size instead: one micro-batch,
  `--accumulate full`, or `auto` with an optimizer that accumulates nothing at projected
  size: one that projects nothing (adamw), one whose update reads the full gradient
  (APOLLO, Fira, FRUGAL, Flora), or one that `MultiSteps` refuses. `--accumulate
  subspace` raises for those instead. `params` may be abstract
  (`jax.ShapeDtypeStruct`s).

  The optimizer is built without `--clip`: a global-norm clip before the projection
  cannot be applied to the mean at projected size (`MultiSteps` refuses it), so the
  subspace train step clips each micro-batch instead.
  """
  if args.micro_batches == 1 or args.accumulate == "full":
    return None
  import jax
  import optax_lowrank
  tx = optax_lowrank.MultiSteps(build(name, args, schedule, mask, dims, clip=False),
                                args.micro_batches)
  try:
    state = jax.eval_shape(tx.init, params)
  except ValueError as e:
    if args.accumulate == "subspace":
      raise ValueError(f"--accumulate subspace: {e}") from None
    return None
  if not tx.accumulates_projected(state):  # the plain full-size path
    if args.accumulate == "subspace":
      raise ValueError(
          f"--accumulate subspace: {name} accumulates nothing at projected size (it "
          "projects nothing, or its update reads the full gradient); use --accumulate "
          "full or auto")
    return None
  return tx
