"""Published low-rank methods as ready optimizers."""

from __future__ import annotations

from typing import Any, Optional, Union

import jax
import optax

from optax_lowrank import blockwise
from optax_lowrank import combine as combine_lib
from optax_lowrank import inner as inner_lib
from optax_lowrank import projectors as projectors_lib
from optax_lowrank import quantize as quantize_lib
from optax_lowrank import schedules as schedules_lib
from optax_lowrank import shapes
from optax_lowrank.core import lowrank_project
from optax_lowrank.inner import adam as adam_lib
from optax_lowrank.projectors import Projector


def _validate_nonnegative(**values):
  for name, value in values.items():
    if isinstance(value, (int, float)) and value < 0.0:
      raise ValueError(f"`{name}` must be >= 0, got {value!r}")


def _validate_adam(b1, b2, eps, weight_decay):
  adam_lib.validate(b1, b2, eps)
  _validate_nonnegative(weight_decay=weight_decay)


def _validate_state_dtype(state_dtype):
  if state_dtype not in (None, "int8"):
    raise ValueError(
        f"`state_dtype` must be None (the parameter's) or 'int8', got "
        f"{state_dtype!r}")


def _hf_adamw_in_subspace(
    learning_rate, rank, *, b1, b2, eps, weight_decay, weight_decay_mask,
    state_dtype=None, **wrapper_kwargs,
) -> optax.GradientTransformationExtraArgs:
  """AdamW as galore-torch, APOLLO and Fira write it, Adam in the subspace.

  The uncorrected Adam direction runs inside ``lowrank_project`` (whose
  combine rule sees it on that scale); the bias correction, decoupled weight
  decay and learning rate follow in the full space. ``state_dtype="int8"``
  stores the moments as ``galore``'s does.
  """
  _validate_state_dtype(state_dtype)
  inner = inner_lib.scale_by_adam_uncorrected(b1, b2, eps)
  if state_dtype == "int8":
    inner = quantize_lib.quantize_state(inner, bits=8, block_size=256)
  return optax.chain(
      lowrank_project(inner, rank, **_projection_kwargs(wrapper_kwargs)),
      inner_lib.scale_by_bias_correction(b1, b2),
      optax.add_decayed_weights(weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate),
  )


def _projection_kwargs(kwargs: dict) -> dict:
  """The aliases' ``mask`` is ``lowrank_project``'s ``projection_mask``."""
  kwargs = dict(kwargs)
  if "mask" in kwargs:
    kwargs["projection_mask"] = kwargs.pop("mask")
  return kwargs


def _projector(projector, names: dict) -> Projector:
  """``projector`` given by name (one of ``names``) or as a ``Projector``."""
  if isinstance(projector, Projector):
    return projector
  if projector in names:
    return names[projector]()
  raise ValueError(
      f"`projector` must be one of {tuple(names)} or a Projector instance, "
      f"got {projector!r}"
  )


def galore(
    learning_rate: optax.ScalarOrSchedule,
    rank: Union[int, float] = 128,
    *,
    update_proj_gap: int = 200,
    scale: Union[float, jax.Array] = 0.25,
    proj_type: str = "std",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    weight_decay_mask: Optional[Any] = None,
    mask: shapes.MaskOrFn = None,
    dimension_numbers: shapes.DimensionNumbersOrFn = None,
    on_refresh: str = "keep",
    stagger: bool = False,
    projector: Union[str, Projector] = "svd",
    state_dtype: Optional[str] = None,
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
    proj_type: ``std``, ``reverse_std``, ``left``, ``right`` or ``full``.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon (see above for placement).
    weight_decay: Decoupled weight decay, in the full space.
    weight_decay_mask: Which leaves are decayed (as ``optax.adamw``'s mask).
    mask: Which leaves may be projected (the GaLore paper projects the
      attention and MLP matrices only).
    dimension_numbers: ``DimensionNumbers`` for leaves of more than two axes.
    on_refresh: ``keep`` (reference), ``reset`` or ``rotate``.
    stagger: Spread the leaves' refreshes over the gap.
    projector: ``"svd"`` (exact SVD with ``proj_type``) or any ``Projector``
      (then ``proj_type`` is not used), e.g. ``projectors.randomized_svd()``.
    state_dtype: ``None`` keeps Adam's moments in the gradient's dtype;
      ``"int8"`` stores them block-wise quantized (blocks of 256, signed
      square-root map; ``quantize.quantize_state``), as 8-bit GaLore does with
      bitsandbytes' 8-bit Adam (whose map differs); ``reset`` and
      ``rotate`` act on the dequantized moments.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax, jax.numpy as jnp, optax_lowrank
    >>> params = {"w": jnp.ones((64, 32)), "b": jnp.zeros(32)}
    >>> tx = optax_lowrank.galore(1e-2, rank=8, update_proj_gap=50)
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)

  References:
    Zhao et al., `GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
    Projection <https://arxiv.org/abs/2403.03507>`_, ICML 2024; code:
    github.com/jiaweizzhao/GaLore.
  """
  _validate_adam(b1, b2, eps, weight_decay)
  _validate_state_dtype(state_dtype)
  inner = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
  if state_dtype == "int8":
    inner = quantize_lib.quantize_state(inner, bits=8, block_size=256)
  return optax.chain(
      lowrank_project(
          inner,
          rank,
          update_proj_gap=update_proj_gap,
          scale=scale,
          proj_type=None if isinstance(projector, Projector) else proj_type,
          projector=projector,
          projection_mask=mask,
          dimension_numbers=dimension_numbers,
          on_refresh=on_refresh,
          stagger=stagger,
      ),
      optax.add_decayed_weights(weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate),
  )


def apollo(
    learning_rate: optax.ScalarOrSchedule,
    rank: Union[int, float] = 256,
    *,
    update_proj_gap: int = 200,
    scale: Union[float, jax.Array] = 1.0,
    scale_type: str = "channel",
    scale_front: bool = False,
    limiter: bool = True,
    proj_type: str = "std",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    weight_decay_mask: Optional[Any] = None,
    mask: shapes.MaskOrFn = None,
    dimension_numbers: shapes.DimensionNumbersOrFn = None,
    projector: Union[str, Projector] = "random",
    seed: int = 0,
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
    proj_type: Side of the projection, as GaLore's (``std``: the smaller).
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon, on the uncorrected ``√v``.
    weight_decay: Decoupled weight decay.
    weight_decay_mask: Which leaves are decayed.
    mask: Which leaves may be projected (the paper: attention and MLP).
    dimension_numbers: ``DimensionNumbers`` for leaves of more than two axes.
    projector: ``"random"``, ``"svd"`` or any ``Projector`` (e.g. fixed
      matrices).
    seed: Seed of the random projections.

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
  _validate_adam(b1, b2, eps, weight_decay)
  projector = _projector(projector, {
      "random": lambda: projectors_lib.random(proj_type),
      "svd": lambda: projectors_lib.svd(proj_type),
  })
  return _hf_adamw_in_subspace(
      learning_rate, rank, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
      weight_decay_mask=weight_decay_mask, update_proj_gap=update_proj_gap,
      scale=scale, projector=projector,
      combine=combine_lib.apollo_scale(
          scale_type, limiter=limiter, scale_front=scale_front),
      mask=mask, dimension_numbers=dimension_numbers, seed=seed,
  )


def apollo_mini(
    learning_rate: optax.ScalarOrSchedule,
    rank: Union[int, float] = 1,
    *,
    update_proj_gap: int = 200,
    scale: Union[float, jax.Array] = 128.0,
    scale_type: str = "tensor",
    scale_front: bool = False,
    limiter: bool = True,
    proj_type: str = "std",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    weight_decay_mask: Optional[Any] = None,
    mask: shapes.MaskOrFn = None,
    dimension_numbers: shapes.DimensionNumbersOrFn = None,
    projector: Union[str, Projector] = "random",
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  """APOLLO-Mini: rank-1 random projection with tensor-wise scaling.

  ``apollo`` with the paper's APOLLO-Mini settings as defaults: ``rank=1``,
  ``scale_type="tensor"`` and ``scale=128`` (its runs from 350M up; the 60M
  and 130M runs use ``scale`` 128 and 192 with ``scale_front=True``). The
  state per projected matrix is a rank-1 first and second moment, one key and
  one limiter norm. Arguments as for ``apollo``.

  Args:
    learning_rate: A float or an optax schedule.
    rank: Projection rank (1 in the paper).
    update_proj_gap: Steps between redraws of the projection.
    scale: APOLLO's ``scale`` (its square root multiplies the update).
    scale_type: ``tensor`` (APOLLO-Mini) or ``channel``.
    scale_front: Apply ``√scale`` before the limiter.
    limiter: Norm-growth limiter with γ = 1.01.
    proj_type: Side of the projection, as GaLore's.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon, on the uncorrected ``√v``.
    weight_decay: Decoupled weight decay.
    weight_decay_mask: Which leaves are decayed.
    mask: Which leaves may be projected.
    dimension_numbers: ``DimensionNumbers`` for leaves of more than two axes.
    projector: ``"random"``, ``"svd"`` or any ``Projector``.
    seed: Seed of the random projections.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import optax_lowrank
    >>> tx = optax_lowrank.apollo_mini(1e-2)

  References:
    Zhu et al., `APOLLO: SGD-like Memory, AdamW-level Performance
    <https://arxiv.org/abs/2412.05270>`_, MLSys 2025.
  """
  return apollo(
      learning_rate, rank, update_proj_gap=update_proj_gap, scale=scale,
      scale_type=scale_type, scale_front=scale_front, limiter=limiter,
      proj_type=proj_type, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
      weight_decay_mask=weight_decay_mask, mask=mask,
      dimension_numbers=dimension_numbers, projector=projector, seed=seed)


def fira(
    learning_rate: optax.ScalarOrSchedule,
    rank: Union[int, float] = 128,
    *,
    update_proj_gap: int = 200,
    scale: Union[float, jax.Array] = 0.25,
    proj_type: str = "std",
    limiter: bool = True,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    weight_decay_mask: Optional[Any] = None,
    mask: shapes.MaskOrFn = None,
    dimension_numbers: shapes.DimensionNumbersOrFn = None,
    projector: Union[str, Projector] = "svd",
    seed: int = 0,
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
    proj_type: GaLore's projection type (one-sided: ``std``,
      ``reverse_std``, ``left`` or ``right``).
    limiter: Norm-growth limiter (γ = 1.01) on the residual.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon, on the uncorrected ``√v``.
    weight_decay: Decoupled weight decay.
    weight_decay_mask: Which leaves are decayed.
    mask: Which leaves may be projected (the paper: attention and MLP).
    dimension_numbers: ``DimensionNumbers`` for leaves of more than two axes.
    projector: ``"svd"``, ``"random"`` or any one-sided ``Projector``.
    seed: Seed for random projectors.

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
  _validate_adam(b1, b2, eps, weight_decay)
  if proj_type == "full":
    raise ValueError(
        "`proj_type` 'full' has no channel for Fira's scaling factor; use "
        "'std', 'reverse_std', 'left' or 'right'"
    )
  projector = _projector(projector, {
      "svd": lambda: projectors_lib.svd(proj_type),
      "random": lambda: projectors_lib.random(proj_type),
  })
  return _hf_adamw_in_subspace(
      learning_rate, rank, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
      weight_decay_mask=weight_decay_mask, update_proj_gap=update_proj_gap,
      scale=scale, projector=projector,
      combine=combine_lib.fira_residual(limiter=limiter),
      mask=mask, dimension_numbers=dimension_numbers, seed=seed,
  )


FRUGAL_SUBSPACES = ("blocks", "svd", "random", "randperm", "columns", "rows",
                    "random_k")


def frugal(
    learning_rate: optax.ScalarOrSchedule,
    density: float = 0.25,
    *,
    subspace: Union[str, Projector] = "blocks",
    update_proj_gap: int = 200,
    proj_type: str = "std",
    order: str = "descending",
    proj_lr_scale: Union[float, jax.Array] = 1.0,
    state_free_lr_scale: float = 1.0,
    state_free_rule: str = "sign",
    reset_statistics: bool = True,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    weight_decay_mask: Optional[Any] = None,
    mask: shapes.MaskOrFn = None,
    dimension_numbers: shapes.DimensionNumbersOrFn = None,
    seed: int = 0,
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
  with ``round(density · side)`` directions on the side ``proj_type``
  picks; ``columns``, ``rows``, ``random_k`` (``floor(density · size)``
  random coordinates); or any ``Projector``.

  Args:
    learning_rate: A float or an optax schedule (the paper: 1e-3, cosine with
      10% warmup).
    density: Fraction of each projected weight kept in the state-full
      subspace (0.25 in the paper's pre-training runs).
    subspace: One of ``FRUGAL_SUBSPACES`` or a ``Projector``.
    update_proj_gap: Steps between subspace changes (200).
    proj_type: Side for ``svd``, ``random`` and ``randperm``: ``std`` only
      (the subspace rank is ``round(density · min(m, n))``, which is FRUGAL's
      ``round(density · projected side)`` for this side alone).
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
    weight_decay: Decoupled weight decay (every parameter).
    weight_decay_mask: Which leaves are decayed.
    mask: Which leaves may be projected (the paper: attention and MLP).
    dimension_numbers: ``DimensionNumbers`` for leaves of more than two axes
      (``blocks`` needs the stacked-layer axis as a batch axis).
    seed: Seed of random subspaces.

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
  _validate_adam(b1, b2, eps, weight_decay)
  if not (isinstance(density, (int, float)) and 0.0 < density <= 1.0):
    raise ValueError(f"`density` must be in (0, 1], got {density!r}")
  if proj_type != "std":
    # The rank is round(density · smaller side), FRUGAL's only for ``std``.
    raise ValueError(
        f"`proj_type` must be 'std' (the side FRUGAL's scripts use), got "
        f"{proj_type!r}"
    )
  projector = _projector(subspace, {
      "blocks": lambda: projectors_lib.blocks(density, order=order),
      "svd": lambda: projectors_lib.svd(proj_type),
      "random": lambda: projectors_lib.random(proj_type, std="orthonormal"),
      "randperm": lambda: projectors_lib.randperm(proj_type),
      "columns": lambda: projectors_lib.coordinates("columns", density=density),
      "rows": lambda: projectors_lib.coordinates("rows", density=density),
      "random_k": lambda: projectors_lib.coordinates(
          "random_k", density=density),
  })
  reset = reset_statistics or subspace == "blocks"
  return optax.chain(
      lowrank_project(
          inner_lib.scale_by_adam_leafwise(b1, b2, eps),
          float(density),
          update_proj_gap=update_proj_gap,
          scale=proj_lr_scale,
          projector=projector,
          combine=combine_lib.frugal_sign(
              state_free_lr_scale, rule=state_free_rule),
          on_refresh="reset" if reset else "keep",
          projection_mask=mask,
          dimension_numbers=dimension_numbers,
          seed=seed,
      ),
      optax.add_decayed_weights(weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate),
  )


def flora(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    *,
    kappa: int = 1000,
    b1: float = 0.9,
    b2: float = 0.8,
    eps: float = 1e-30,
    clipping_threshold: Optional[float] = 1.0,
    multiply_by_parameter_scale: bool = True,
    min_dim_size_to_factor: int = 128,
    factorized_second_moment: bool = True,
    momentum_dtype: Any = jax.numpy.bfloat16,
    weight_decay: float = 0.0,
    weight_decay_mask: Optional[Any] = None,
    mask: shapes.MaskOrFn = None,
    dimension_numbers: shapes.DimensionNumbersOrFn = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  """Flora: Adafactor with momentum compressed by a resampled random projection.

  As the authors' optax code, per step: Adafactor's factored second moment of
  the raw gradient normalizes it (``U = G / √V̂``, ``optax.scale_by_factored_rms``
  with decay ``1 − (t+1)^(−b2)``); the momentum of ``U`` is kept compressed,
  ``M ← b1·M + (1 − b1)·down(U)`` in a random subspace (entries
  ``N(0, 1/r)``, the smaller side of each matrix, redrawn every ``kappa``
  steps from a key, never stored); the output ``b1·up(M) + (1 − b1)·U`` is
  clipped to RMS ``clipping_threshold`` per matrix, multiplied by the
  learning rate and by ``max(rms(W), 1e-3)``, then weight decay ``wd·W`` is
  added (not multiplied by the learning rate) and the sign flipped. Only
  matrices with ``min(m, n) >= min_dim_size_to_factor`` and
  ``max(m, n) <= 4·min(m, n)`` are compressed; the others keep a full
  momentum.

  Differences from the optax code, by choice: on a redraw the momentum is
  transferred as in the paper and the torch code,
  ``M ← down(new, up(old, M))`` (``on_refresh="transfer"``); the optax code
  maps it through the old projection twice, which multiplies it by about
  ``min(m, n)/r`` at every redraw. The momentum is stored in
  ``momentum_dtype`` (bfloat16, as there) but the arithmetic is float32. Block
  RMS values are per matrix for stacked layers (``blockwise``). The random
  draws come from JAX keys split differently from the reference's.

  Args:
    learning_rate: A float or an optax schedule.
    rank: Rank ``tau`` of the compressed momentum (the authors' configs: 128).
    kappa: Steps between redraws of the projection (1000).
    b1: Momentum decay.
    b2: Exponent of Adafactor's decay ``1 − (t+1)^(−b2)`` (the configs: 0.8).
    eps: Adafactor's epsilon, added to ``G²``.
    clipping_threshold: Update clipping by RMS; ``None`` turns it off.
    multiply_by_parameter_scale: Scale by ``max(rms(W), 1e-3)``.
    min_dim_size_to_factor: Smallest side for factoring and compressing.
    factorized_second_moment: Factor the second moment (else full).
    momentum_dtype: Storage dtype of the momentum.
    weight_decay: Added as ``wd·W`` after the learning rate.
    weight_decay_mask: Which leaves are decayed.
    mask: Which leaves may be compressed.
    dimension_numbers: ``DimensionNumbers`` for leaves of more than two axes.
    seed: Seed of the random projections.

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
  # b1 is checked by inner.ema_nesterov, below.
  if not (isinstance(b2, (int, float)) and b2 > 0.0):
    raise ValueError(f"`b2` (a decay exponent) must be > 0, got {b2!r}")
  _validate_nonnegative(eps=eps, weight_decay=weight_decay)
  if clipping_threshold is not None and not clipping_threshold > 0:
    raise ValueError(
        f"`clipping_threshold` must be positive or None, got "
        f"{clipping_threshold!r}")

  def compressed(params):
    plans, treedef = shapes.plan_leaves(
        params, rank=rank, mask=mask, dimension_numbers=dimension_numbers)
    return treedef.unflatten([
        p is not None
        and min(p.layout.m, p.layout.n) >= min_dim_size_to_factor
        and max(p.layout.m, p.layout.n) <= 4 * min(p.layout.m, p.layout.n)
        for p in plans
    ])

  return optax.chain(
      optax.scale_by_factored_rms(
          factored=factorized_second_moment, decay_rate=b2, epsilon=eps,
          min_dim_size_to_factor=min_dim_size_to_factor),
      lowrank_project(
          inner_lib.ema_nesterov(b1, momentum_dtype=momentum_dtype),
          rank,
          update_proj_gap=kappa,
          projector=projectors_lib.random("smaller"),
          combine=combine_lib.add_residual(1.0 - b1),
          on_refresh="rotate",
          projection_mask=compressed,
          dimension_numbers=dimension_numbers,
          seed=seed,
      ),
      (blockwise.clip_by_matrix_rms(clipping_threshold, dimension_numbers)
       if clipping_threshold is not None else optax.identity()),
      optax.scale_by_learning_rate(learning_rate, flip_sign=False),
      (blockwise.scale_by_param_matrix_rms(1e-3, dimension_numbers)
       if multiply_by_parameter_scale else optax.identity()),
      optax.add_decayed_weights(weight_decay, weight_decay_mask),
      optax.scale(-1.0),
  )


def vlorp(
    learning_rate: optax.ScalarOrSchedule,
    rank: Union[int, float] = 1,
    *,
    granularity: Union[int, float] = 256,
    update_proj_gap: int = 30,
    scale: Union[float, jax.Array] = 0.25,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    weight_decay_mask: Optional[Any] = None,
    distribution: str = "gaussian",
    projector: Optional[Projector] = None,
    mask: shapes.MaskOrFn = None,
    dimension_numbers: shapes.DimensionNumbersOrFn = None,
    stagger: bool = False,
    seed: int = 0,
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
  corrections computed to float32 accuracy). Gradients can be accumulated in the subspace with
  ``optax_lowrank.MultiSteps``.

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
      every projected matrix (an error names the leaf otherwise). The
      paper's best at budget ``c·r = 256`` is ``c = 256, r = 1``.
    update_proj_gap: Steps between redraws of the projection.
    scale: Multiplier of the back-projection (the paper: 0.25).
    b1: First-moment decay.
    b2: Second-moment decay (factored for projected leaves).
    eps: Added to the square root of the second moment.
    weight_decay: Decoupled weight decay.
    weight_decay_mask: Which leaves are decayed.
    distribution: ``gaussian`` or ``rademacher`` entries.
    projector: Any ``Projector`` to use instead of the random one (applied
      with the same granularity).
    mask: Which leaves may be projected (the paper: attention and MLP).
    dimension_numbers: ``DimensionNumbers`` for leaves of more than two axes.
    stagger: Spread the leaves' redraws over the gap.
    seed: Seed of the random projections.

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
  _validate_adam(b1, b2, eps, weight_decay)
  if projector is None:
    projector = projectors_lib.random(distribution=distribution, std="rank")
  elif not isinstance(projector, Projector):
    raise ValueError(
        f"`projector` must be None (random) or a Projector instance, got "
        f"{projector!r}"
    )
  return optax.chain(
      lowrank_project(
          optax.ema(b1, debias=True), rank,
          update_proj_gap=update_proj_gap, scale=scale, projector=projector,
          granularity=granularity, projection_mask=mask,
          dimension_numbers=dimension_numbers, on_refresh="keep",
          stagger=stagger, combine=combine_lib.projfactor(b2, eps),
          unprojected=inner_lib.scale_by_adam_leafwise(b1, b2, eps), seed=seed,
      ),
      optax.add_decayed_weights(weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate),
  )


def osd(
    learning_rate: optax.ScalarOrSchedule,
    rank: Union[int, float] = 128,
    *,
    update_proj_gap: int = 200,
    scale: Union[float, jax.Array] = 0.25,
    proj_type: str = "std",
    peak_learning_rate: Optional[float] = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    weight_decay_mask: Optional[Any] = None,
    mask: shapes.MaskOrFn = None,
    dimension_numbers: shapes.DimensionNumbersOrFn = None,
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
    proj_type: ``std``, ``reverse_std``, ``left`` or ``right``.
    peak_learning_rate: ``lr_peak`` (the reference's initial ``lr`` argument)
      when ``learning_rate`` is a schedule; needed then.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon.
    weight_decay: Decoupled weight decay.
    weight_decay_mask: Which leaves are decayed.
    mask: Which leaves may be projected.
    dimension_numbers: ``DimensionNumbers`` for leaves of more than two axes.

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
  if callable(learning_rate):
    if peak_learning_rate is None or not peak_learning_rate > 0:
      raise ValueError(
          "`peak_learning_rate` must be a positive float when `learning_rate` "
          f"is a schedule (the basis step follows lr_t/lr_peak), got "
          f"{peak_learning_rate!r}"
      )
    lr_ratio = lambda step: learning_rate(step) / peak_learning_rate
  else:
    lr_ratio = None
  projector = projectors_lib.online_pca(update_proj_gap, proj_type,
                                        lr_ratio=lr_ratio)
  return galore(
      learning_rate, rank, update_proj_gap=1, scale=scale, b1=b1, b2=b2,
      eps=eps, weight_decay=weight_decay, weight_decay_mask=weight_decay_mask,
      mask=mask, dimension_numbers=dimension_numbers, projector=projector,
  )


def dct_adamw(
    learning_rate: optax.ScalarOrSchedule,
    rank: Union[int, float] = 256,
    *,
    update_proj_gap: int = 1,
    norm: str = "l1",
    on_refresh: str = "keep",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    weight_decay_mask: Optional[Any] = None,
    mask: shapes.MaskOrFn = None,
    dimension_numbers: shapes.DimensionNumbersOrFn = None,
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
    on_refresh: ``keep`` (the code) or ``rotate``.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon (the code: 1e-8).
    weight_decay: Decoupled weight decay.
    weight_decay_mask: Which leaves are decayed.
    mask: Which leaves may be projected (the code: 2-D leaves with both
      sides below 32000, i.e. not embeddings or the LM head).
    dimension_numbers: ``DimensionNumbers`` for leaves of more than two axes.

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
  _validate_adam(b1, b2, eps, weight_decay)
  return optax.chain(
      lowrank_project(
          inner_lib.scale_by_adam_leafwise(b1, b2, eps), rank,
          update_proj_gap=update_proj_gap, projector=projectors_lib.dct(norm=norm),
          on_refresh=on_refresh, projection_mask=mask, dimension_numbers=dimension_numbers,
      ),
      optax.add_decayed_weights(weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate),
  )


def grass(
    learning_rate: optax.ScalarOrSchedule,
    rank: Union[int, float] = 128,
    *,
    update_proj_gap: int = 200,
    selection: str = "norm_sampling",
    scale: Union[float, jax.Array] = 1.0,
    proj_type: str = "std",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    weight_decay_mask: Optional[Any] = None,
    mask: shapes.MaskOrFn = None,
    dimension_numbers: shapes.DimensionNumbersOrFn = None,
    seed: int = 0,
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
    proj_type: Side whose coordinates are selected, as GaLore's.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon.
    weight_decay: Decoupled weight decay.
    weight_decay_mask: Which leaves are decayed.
    mask: Which leaves may be projected.
    dimension_numbers: ``DimensionNumbers`` for leaves of more than two axes.
    seed: Seed of the row sampling.

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
  _validate_adam(b1, b2, eps, weight_decay)
  return optax.chain(
      lowrank_project(
          inner_lib.scale_by_adam_leafwise(b1, b2, eps), rank,
          update_proj_gap=update_proj_gap, scale=scale,
          projector=projectors_lib.grass(proj_type, selection=selection),
          on_refresh="reset", projection_mask=mask, dimension_numbers=dimension_numbers,
          seed=seed,
      ),
      optax.add_decayed_weights(weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate),
  )


def adarankgrad(
    learning_rate: optax.ScalarOrSchedule,
    rank: Union[int, float] = 128,
    *,
    threshold: float = 0.9,
    update_proj_gap: int = 200,
    scale: Union[float, jax.Array] = 0.25,
    proj_type: str = "std",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    weight_decay_mask: Optional[Any] = None,
    mask: shapes.MaskOrFn = None,
    dimension_numbers: shapes.DimensionNumbersOrFn = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  """AdaRankGrad-style GaLore: a randomized-SVD subspace whose rank only shrinks.

  GaLore-AdamW (``galore``) with ``schedules.adaptive_rank`` over
  ``projectors.randomized_svd``: at each refresh each matrix keeps the
  smallest rank ``k ≤ rank`` whose directions capture ``threshold`` of
  ``‖G‖²``, never more than its previous ``k``; state stays sized for
  ``rank`` (directions beyond ``k`` are zeroed). The first moment is carried
  into the new basis on a refresh (``on_refresh="rotate"``). The authors'
  code is not public: the rank rule is the one documented in
  ``schedules.adaptive_rank``; the paper also rotates the second moment,
  which this alias keeps as is; ``threshold`` defaults to 0.9 (ours).

  Args:
    learning_rate: A float or an optax schedule.
    rank: The largest rank (int or fraction).
    threshold: Fraction of the gradient's energy the subspace must capture.
    update_proj_gap: Steps between refreshes.
    scale: GaLore's scale of the back-projected update.
    proj_type: ``std``, ``reverse_std``, ``left`` or ``right``.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon.
    weight_decay: Decoupled weight decay.
    weight_decay_mask: Which leaves are decayed.
    mask: Which leaves may be projected.
    dimension_numbers: ``DimensionNumbers`` for leaves of more than two axes.
    seed: Seed of the randomized SVD's starting block.

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
  _validate_adam(b1, b2, eps, weight_decay)
  projector = schedules_lib.adaptive_rank(
      projectors_lib.randomized_svd(proj_type), threshold)
  return optax.chain(
      lowrank_project(
          optax.scale_by_adam(b1=b1, b2=b2, eps=eps), rank,
          update_proj_gap=update_proj_gap, scale=scale, projector=projector,
          on_refresh="rotate", projection_mask=mask, dimension_numbers=dimension_numbers,
          seed=seed,
      ),
      optax.add_decayed_weights(weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate),
  )


def galore_8bit(
    learning_rate: optax.ScalarOrSchedule,
    rank: Union[int, float] = 128,
    *,
    update_proj_gap: int = 200,
    scale: Union[float, jax.Array] = 0.25,
    proj_type: str = "std",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    weight_decay_mask: Optional[Any] = None,
    mask: shapes.MaskOrFn = None,
    dimension_numbers: shapes.DimensionNumbersOrFn = None,
    stagger: bool = False,
    projector: Union[str, Projector] = "svd",
) -> optax.GradientTransformationExtraArgs:
  """8-bit GaLore: ``galore`` with Adam's moments stored in int8 blocks of 256.

  ``galore(..., state_dtype="int8")``: the moments are quantized with a
  signed square-root map per block of 256 (``quantize.quantize_state``),
  where galore-torch's ``GaLoreAdamW8bit`` uses bitsandbytes' dynamic map.
  Moments are kept across refreshes (``on_refresh="keep"``), as there.

  Args:
    learning_rate: A float or an optax schedule.
    rank: Subspace rank (int or fraction).
    update_proj_gap: Steps between SVD refreshes.
    scale: GaLore's scale of the back-projected update.
    proj_type: galore-torch's ``proj_type``.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon.
    weight_decay: Decoupled weight decay.
    weight_decay_mask: Which leaves are decayed.
    mask: Which leaves may be projected.
    dimension_numbers: ``DimensionNumbers`` for leaves of more than two axes.
    stagger: Spread the leaves' refreshes over the gap.
    projector: ``"svd"`` or any ``Projector``.

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
  return galore(
      learning_rate, rank, update_proj_gap=update_proj_gap, scale=scale,
      proj_type=proj_type, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
      weight_decay_mask=weight_decay_mask, mask=mask,
      dimension_numbers=dimension_numbers, stagger=stagger,
      projector=projector, state_dtype="int8",
  )


def q_galore(
    learning_rate: optax.ScalarOrSchedule,
    rank: Union[int, float] = 256,
    *,
    update_proj_gap: int = 200,
    scale: Union[float, jax.Array] = 0.25,
    proj_bits: int = 4,
    proj_group_size: int = 256,
    cos_threshold: float = 0.4,
    gamma_proj: int = 2,
    queue_size: int = 5,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    weight_decay_mask: Optional[Any] = None,
    mask: shapes.MaskOrFn = None,
    dimension_numbers: shapes.DimensionNumbersOrFn = None,
) -> optax.GradientTransformationExtraArgs:
  """Q-GaLore: int4 SVD basis, lazy layer-wise refresh, 8-bit Adam moments.

  GaLore (``std`` orientation, exact SVD in float32) with three changes from
  the authors' code: the basis is stored block-wise in ``proj_bits`` bits
  (groups of ``proj_group_size``; ``quantize.quantize_basis``); each matrix
  refreshes lazily (``schedules.lazy``: after ``queue_size`` refreshes whose
  leading singular vectors average a cosine similarity of at least
  ``cos_threshold``, its gap is multiplied by ``gamma_proj``); Adam's moments
  are int8 blocks of 256 (``quantize.quantize_state``, signed square-root
  map, where the code uses bitsandbytes' 8-bit Adam). Q-GaLore's int8
  weights with stochastic rounding are a training-program option, not part of
  this optimizer (``train.pretrain --weight-quant int8``, built on
  ``quantize.quantize(..., stochastic=True)``).

  Args:
    learning_rate: A float or an optax schedule (the authors: 0.015 for
      130M, 10% warmup, cosine).
    rank: Subspace rank (the authors: 256 for 130M, 1024 for 7B).
    update_proj_gap: Initial refresh gap (the authors: 200; 500 for 7B).
    scale: GaLore's scale.
    proj_bits: Bits of the stored basis (4).
    proj_group_size: Elements per quantization group of the basis (256).
    cos_threshold: Mean similarity above which a matrix's gap grows (0.4).
    gamma_proj: Growth factor of the gap (2).
    queue_size: Refreshes averaged (5).
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon.
    weight_decay: Decoupled weight decay.
    weight_decay_mask: Which leaves are decayed.
    mask: Which leaves may be projected.
    dimension_numbers: ``DimensionNumbers`` for leaves of more than two axes.

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
  projector = quantize_lib.quantize_basis(
      schedules_lib.lazy(projectors_lib.svd("std"), update_proj_gap,
                         cos_threshold=cos_threshold, queue_size=queue_size,
                         gamma=gamma_proj),
      bits=proj_bits, block_size=proj_group_size)
  return galore(
      learning_rate, rank, update_proj_gap=update_proj_gap, scale=scale,
      b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
      weight_decay_mask=weight_decay_mask, mask=mask,
      dimension_numbers=dimension_numbers, projector=projector,
      state_dtype="int8",
  )


def coap(
    learning_rate: optax.ScalarOrSchedule,
    rank: Union[int, float] = 128,
    *,
    update_proj_gap: int = 32,
    reproject_factor: int = 5,
    scale: Union[float, jax.Array] = 0.25,
    proj_type: str = "std",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    weight_decay_mask: Optional[Any] = None,
    mask: shapes.MaskOrFn = None,
    dimension_numbers: shapes.DimensionNumbersOrFn = None,
    stagger: bool = False,
    state_dtype: Optional[str] = None,
    seed: int = 0,
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
  and keeps it in the parameter's dtype; so does this.

  Args:
    learning_rate: A float or an optax schedule (the authors' LLaMA-1B: 0.01,
      10% warmup, cosine).
    rank: Subspace rank (int) or fraction of each matrix's smaller side (the
      authors: 512 for LLaMA-1B, 1024 for 7B).
    update_proj_gap: Steps between basis updates, the code's
      ``update_interval`` (its default 32; its LLaMA scripts use 40 for 1B
      and 100 for 7B).
    reproject_factor: Every how many updates the basis is recomputed (5).
    scale: Multiplier of the back-projected update (the code's class default
      is 1.0; its LLaMA scripts use 0.25).
    proj_type: ``std`` (the code: the smaller side), ``reverse_std``,
      ``left`` or ``right``.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon, on the uncorrected ``√v``.
    weight_decay: Decoupled weight decay.
    weight_decay_mask: Which leaves are decayed.
    mask: Which leaves may be projected (the authors: the attention and MLP
      linear layers).
    dimension_numbers: ``DimensionNumbers`` for leaves of more than two axes.
    stagger: Spread the leaves' basis updates over the interval.
    state_dtype: ``None``, or ``"int8"`` for Adam's moments in int8 blocks of
      256 (as ``galore``'s; the authors' ``CoapAdamW8bit``, their 7B setting,
      uses bitsandbytes' map). The basis step reads the dequantized first
      moment.
    seed: Seed of the first Gaussian blocks.

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
  _validate_adam(b1, b2, eps, weight_decay)
  projector = projectors_lib.coap(reproject_factor, proj_type)
  return _hf_adamw_in_subspace(
      learning_rate, rank, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
      weight_decay_mask=weight_decay_mask, update_proj_gap=update_proj_gap,
      scale=scale, projector=projector, mask=mask,
      dimension_numbers=dimension_numbers, stagger=stagger,
      state_dtype=state_dtype, seed=seed,
  )


def golore(
    learning_rate: optax.ScalarOrSchedule,
    rank: Union[int, float] = 128,
    *,
    switch_step: int = 0,
    update_proj_gap: int = 200,
    scale: Union[float, jax.Array] = 1.0,
    proj_type: str = "std",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    weight_decay_mask: Optional[Any] = None,
    mask: shapes.MaskOrFn = None,
    dimension_numbers: shapes.DimensionNumbersOrFn = None,
    stagger: bool = False,
    seed: int = 0,
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
      ``rand_ratio · num_training_steps``. ``0`` (default) is the paper's
      GoLore, random throughout; its pretraining recipe runs GaLore for the
      first 80% of the steps (``switch_step = 0.8 · steps``). (The code's own
      default ratio, 2, never switches: plain GaLore.)
    update_proj_gap: Steps between refreshes.
    scale: Multiplier of the back-projected update (the code's default 1).
    proj_type: ``std``, ``reverse_std``, ``left`` or ``right``.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon, on the uncorrected ``√v``.
    weight_decay: Decoupled weight decay.
    weight_decay_mask: Which leaves are decayed.
    mask: Which leaves may be projected.
    dimension_numbers: ``DimensionNumbers`` for leaves of more than two axes.
    stagger: Spread the leaves' refreshes over the gap.
    seed: Seed of the random subspaces.

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
  _validate_adam(b1, b2, eps, weight_decay)
  return _hf_adamw_in_subspace(
      learning_rate, rank, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
      weight_decay_mask=weight_decay_mask, update_proj_gap=update_proj_gap,
      scale=scale, projector=projectors_lib.golore(switch_step, proj_type),
      on_refresh="rotate", mask=mask, dimension_numbers=dimension_numbers,
      stagger=stagger, seed=seed,
  )
