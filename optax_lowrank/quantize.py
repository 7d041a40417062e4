"""Block-wise int8/int4 storage for optimizer moments and projection bases.

An array is cut into blocks of ``block_size`` consecutive elements (row-major
order) and each block is stored as unsigned integer codes with its own float32
``scale`` and ``zero`` (the block minimum, what code 0 decodes to)::

    scale = (max − min) / (2^bits − 1)
    code  = round((x − min) / scale)          ∈ [0, 2^bits − 1]
    x̂     = min + code · scale,   so  |x − x̂| ≤ scale / 2

(plus float32 rounding, a few ulps of the block's largest magnitude). A
constant block (``max == min``) has ``scale = 0``, codes 0, and decodes to
itself exactly; nothing is divided by zero. A non-finite element makes its
block decode to non-finite values. int4 packs two codes per byte (element
``2i`` in the low nibble, ``2i + 1`` in the high one). ``scale`` and ``zero``
are float32, 8 bytes a block (a quarter bit per element at 256): bfloat16
would save half of that, but its 8-bit mantissa moves ``min + 255·scale`` by up
to about half a step, which breaks the ``scale/2`` bound.

**Block layout.** Blocks run over the flattened trailing axes of the array; the
leading axes are kept as they are (so they keep their sharding) wherever that
costs no extra block: ``QuantizedArray.codes`` has shape
``shape[:k] + (num_blocks, bytes_per_block)`` with ``k`` the most leading axes
whose rows need no more blocks in total than the flattened array. A
``(512, 256)`` moment keeps its rows (one block per row), a stacked
``(layers, 40, 96)`` one keeps ``layers`` (3840 = 15 blocks per layer), and a
GaLore moment ``(n, r)`` with ``r`` far below ``block_size`` is blocked over
its flattening (keeping ``n`` would pad every row of ``r`` to a whole block).
Where a row does not fill its last block, that block is padded with the row's
last element, which changes neither its minimum nor its maximum. Under an
explicit-sharding mesh the kept axes keep their shardings, the first blocked
axis keeps its own where blocks tile it evenly, and other shardings of blocked
axes are gathered for quantization. ``dequantize`` returns the array sharded
as the codes allow; the state stores no sharding (it does not depend on the
mesh), so where the original's sharding matters it is read off other arrays
(``quantize_state`` reads it off ``init``'s abstract evaluation, projectors
off the gradient).

**Maps.** ``linear`` is the map above. ``sqrt`` applies it to
``sign(x)·√|x|`` (decoded as ``y·|y|``): signed square-root companding, which
spends the codes where a heavy-tailed moment has most of its entries.
``quantize_state`` uses ``sqrt`` for every moment: measured on 50 Adam steps
(see its docstring), a linear second moment is poor, since entries below one
code step decode to the block minimum and their ``m/√v`` explodes.

References:
  Dettmers et al., `8-bit Optimizers via Block-wise Quantization
  <https://arxiv.org/abs/2110.02861>`_, ICLR 2022.

  Zhang et al., `Q-GaLore: Quantized GaLore with INT4 Projection and
  Layer-Adaptive Low-Rank Gradients <https://arxiv.org/abs/2407.08296>`_, 2024.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from optax_lowrank import shapes
from optax_lowrank.projectors.base import Projector, check_wrappable

BITS = (4, 8)
MAPS = ("linear", "sqrt")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
  """An array stored as block-wise quantized codes (a pytree of arrays).

  Attributes:
    codes: ``uint8``, ``shape[:k] + (num_blocks, block_size·bits/8)``: one
      code per element, or two per byte for int4 (low nibble first).
    scale: float32 ``shape[:k] + (num_blocks,)``, each block's code step.
    zero: float32, same shape: each block's minimum, what code 0 decodes to.
      For ``mapping="sqrt"`` both are in the mapped domain ``sign(x)·√|x|``.
    shape: The original shape (static).
    dtype: The original dtype, which ``dequantize`` returns (static).
    bits: 4 or 8 (static).
    block_size: Elements per block (static).
    mapping: ``linear`` or ``sqrt`` (static), see the module docstring.

  Nothing here depends on a device mesh: the codes, scales and zeros carry
  the shardings the block layout keeps, and ``dequantize`` returns an array
  sharded as they allow (see the module docstring).
  """

  codes: jax.Array
  scale: jax.Array
  zero: jax.Array
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  dtype: Any = dataclasses.field(metadata=dict(static=True))
  bits: int = dataclasses.field(metadata=dict(static=True))
  block_size: int = dataclasses.field(metadata=dict(static=True))
  mapping: str = dataclasses.field(default="linear",
                                   metadata=dict(static=True))

  @property
  def kept_axes(self) -> int:
    """How many leading axes of ``shape`` the codes keep (``k``)."""
    return self.codes.ndim - 2


def _validate(bits, block_size, mapping) -> None:
  if isinstance(bits, bool) or bits not in BITS:
    raise ValueError(f"`bits` must be one of {BITS}, got {bits!r}")
  if (isinstance(block_size, bool) or not isinstance(block_size, int)
      or block_size < 1):
    raise ValueError(
        f"`block_size` must be a positive int, got {block_size!r}")
  if bits == 4 and block_size % 2:
    raise ValueError(
        f"`block_size` must be even for `bits`=4 (two codes per byte), got "
        f"{block_size!r}")
  if mapping not in MAPS:
    raise ValueError(f"`mapping` must be one of {MAPS}, got {mapping!r}")


def kept_axes(shape: tuple[int, ...], block_size: int, batch_dims: int = 0) -> int:
  """The number of leading axes ``k`` a quantized array of ``shape`` keeps.

  The largest ``k >= batch_dims`` whose rows ``shape[k:]`` need, padded to
  whole blocks, no more blocks in total than ``k = batch_dims`` does.
  """
  def num_blocks(k):
    return math.prod(shape[:k]) * -(-math.prod(shape[k:]) // block_size)

  fewest = num_blocks(batch_dims)
  return max(k for k in range(batch_dims, max(len(shape), batch_dims + 1))
             if num_blocks(k) == fewest)


def _mesh_size(entry) -> int:
  if entry is None:
    return 1
  mesh = jax.sharding.get_abstract_mesh()
  names = (entry,) if isinstance(entry, str) else tuple(entry)
  return math.prod(mesh.shape[n] for n in names)


def _pad_edge(y, pad):
  """Pads the last axis with ``pad`` copies of its last element."""
  if not pad:
    return y
  edge = jnp.broadcast_to(y[..., -1:], y.shape[:-1] + (pad,))
  return jnp.concatenate([y, edge], axis=-1)


def _to_blocks(y, spec, k, block_size):
  """``y`` (float32, original shape) as ``shape[:k] + (num_blocks, block_size)``."""
  lead, length = y.shape[:k], math.prod(y.shape[k:])
  num_blocks = -(-length // block_size)
  pad = num_blocks * block_size - length
  if spec is None:
    return _pad_edge(y.reshape(lead + (length,)), pad).reshape(
        lead + (num_blocks, block_size))
  tail = spec[k:] if k < len(spec) else (None,)
  major = tail[0]
  if pad or any(s is not None for s in tail[1:]) or num_blocks % _mesh_size(major):
    major = None
  if tuple(tail) != (major,) + (None,) * (len(tail) - 1):
    y = jax.sharding.reshard(y, P(*spec[:k], major, *(None,) * (len(tail) - 1)))
  y = _pad_edge(y.reshape(lead + (length,)), pad)
  return jax.lax.reshape(y, lead + (num_blocks, block_size),
                         out_sharding=P(*spec[:k], major, None))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _quantize(x, bits, block_size, mapping, batch_dims, stochastic, key):
  """``quantize`` after validation, compiled once per shape and setting."""
  shape = tuple(x.shape)
  spec = shapes.explicit_spec(x)
  k = kept_axes(shape, block_size, batch_dims)
  y = _to_blocks(x.astype(jnp.float32), spec, k, block_size)
  if mapping == "sqrt":
    y = jnp.sign(y) * jnp.sqrt(jnp.abs(y))
  lo = jnp.min(y, axis=-1)
  hi = jnp.max(y, axis=-1)
  qmax = 2**bits - 1
  scale = (hi - lo) / qmax
  constant = (scale > 0)[..., None]
  t = (y - lo[..., None]) / jnp.where(constant, scale[..., None], 1.0)
  if stochastic:
    u = jax.random.uniform(key, t.shape, jnp.float32, out_sharding=(
        shapes.out_sharding(shapes.explicit_spec(t))))
    t = jnp.floor(t + u)
  else:
    t = jnp.round(t)
  codes = jnp.clip(jnp.where(constant, t, 0.0), 0, qmax).astype(jnp.uint8)
  if bits == 4:
    pairs = codes.reshape(codes.shape[:-1] + (block_size // 2, 2))
    codes = pairs[..., 0] | (pairs[..., 1] << 4)
  return QuantizedArray(codes, scale, lo, shape, np.dtype(x.dtype), bits,
                        block_size, mapping)


def quantize(
    x: jax.Array,
    *,
    bits: int = 8,
    block_size: int = 256,
    mapping: str = "linear",
    batch_dims: int = 0,
    stochastic: bool = False,
    key: Optional[jax.Array] = None,
) -> QuantizedArray:
  """Block-wise asymmetric quantization of a floating array.

  Per block of ``block_size`` elements (see the module docstring for the
  layout): ``scale = (max − min)/(2^bits − 1)``, ``code = round((x − min)/
  scale)``, so that ``dequantize`` is within ``scale/2`` of ``x`` (plus float32
  rounding). With ``stochastic=True`` the code is ``floor((x − min)/scale +
  u)``, ``u ~ U[0, 1)``: unbiased, ``E[dequantize(q)] = x``, each draw within
  one ``scale`` (Q-GaLore's stochastic rounding of int8 weights).

  Args:
    x: A floating array of any shape (blocks are computed in float32).
    bits: 8 (one code per byte) or 4 (two per byte).
    block_size: Elements per block; even for ``bits=4``.
    mapping: ``linear`` (the map above) or ``sqrt`` (the linear map of
      ``sign(x)·√|x|``; the bound then holds for that quantity).
    batch_dims: Leading axes never merged into blocks: each of their slices
      is quantized on its own (one matrix of a stack, one layer).
    stochastic: Round stochastically instead of to the nearest code.
    key: A PRNG key, required when ``stochastic``.

  Returns:
    A ``QuantizedArray``.

  Raises:
    ValueError: for ``bits`` not in ``(4, 8)``, a ``block_size`` that is not a
      positive int (or odd with ``bits=4``), an unknown ``mapping``, a
      ``batch_dims`` out of range, a non-floating ``x``, or a missing ``key``.

  Example:
    >>> import jax.numpy as jnp
    >>> from optax_lowrank import quantize
    >>> x = jnp.linspace(-1.0, 1.0, 512).reshape(2, 256)
    >>> q = quantize.quantize(x, bits=4, block_size=256)
    >>> q.codes.shape, q.codes.dtype, q.scale.shape
    ((2, 1, 128), dtype('uint8'), (2, 1))
    >>> bool(jnp.all(jnp.abs(quantize.dequantize(q) - x) <= q.scale[0] / 2))
    True

  References:
    Dettmers et al., `8-bit Optimizers via Block-wise Quantization
    <https://arxiv.org/abs/2110.02861>`_, ICLR 2022; Zhang et al., `Q-GaLore
    <https://arxiv.org/abs/2407.08296>`_, 2024.
  """
  _validate(bits, block_size, mapping)
  if stochastic and key is None:
    raise ValueError("`key` must be given when `stochastic`=True")
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"`x` must be a floating array, got dtype {x.dtype}")
  shape = tuple(x.shape)
  if (isinstance(batch_dims, bool) or not isinstance(batch_dims, int)
      or not 0 <= batch_dims <= len(shape)):
    raise ValueError(
        f"`batch_dims` must be an int in [0, {len(shape)}] (x.ndim), got "
        f"{batch_dims!r}")
  return _quantize(x, bits, block_size, mapping, batch_dims, stochastic, key)


def requantize(like: QuantizedArray, x: jax.Array, **kwargs) -> QuantizedArray:
  """Quantizes ``x`` (shaped like ``like``'s original) with ``like``'s settings.

  Args:
    like: A ``QuantizedArray`` whose bits, block size, map and layout to use.
    x: An array of shape ``like.shape``.
    **kwargs: ``stochastic`` and ``key``, passed to ``quantize``.

  Returns:
    A ``QuantizedArray`` with the same static fields as ``like`` (so the
    pytree structure is unchanged, as ``jit`` and ``lax.cond`` need): under
    an explicit mesh its codes, scales and zeros are resharded as ``like``'s
    (so the types are unchanged too).
  """
  q = quantize(
      x.astype(like.dtype), bits=like.bits, block_size=like.block_size,
      mapping=like.mapping, batch_dims=like.kept_axes, **kwargs)
  return jax.tree.map(shapes.reshard_like, q, like)


def unpack_codes(q: QuantizedArray) -> jax.Array:
  """The codes, one ``uint8`` per element: ``shape[:k] + (num_blocks, block_size)``."""
  if q.bits == 8:
    return q.codes
  nibbles = jnp.stack([q.codes & 0xF, q.codes >> 4], axis=-1)
  return nibbles.reshape(q.codes.shape[:-1] + (q.block_size,))


@jax.jit
def dequantize(q: QuantizedArray) -> jax.Array:
  """The array ``q`` stores: ``zero + code·scale`` (then ``y·|y|`` for ``sqrt``).

  Args:
    q: A ``QuantizedArray``.

  Returns:
    An array of ``q.shape`` and ``q.dtype``. Under an explicit mesh it keeps
    the shardings the codes kept (the kept axes', and the first blocked
    axis' where blocks tile it evenly); other axes are unsharded
    (``shapes.reshard_like`` it to the original's sharding where that is
    needed).

  Example:
    >>> import jax.numpy as jnp
    >>> from optax_lowrank import quantize
    >>> x = jnp.full((4, 300), 0.3)  # constant blocks round-trip exactly
    >>> bool(jnp.all(quantize.dequantize(quantize.quantize(x)) == x))
    True

  References:
    Dettmers et al., `8-bit Optimizers via Block-wise Quantization
    <https://arxiv.org/abs/2110.02861>`_, ICLR 2022.
  """
  y = q.zero[..., None] + unpack_codes(q).astype(jnp.float32) * q.scale[..., None]
  if q.mapping == "sqrt":
    y = y * jnp.abs(y)
  k = q.kept_axes
  lead, length = q.shape[:k], math.prod(q.shape[k:])
  y = y.reshape(lead + (-1,))
  if y.shape[-1] != length:
    y = y[..., :length]
  spec = shapes.explicit_spec(y)
  if spec is None:
    return y.reshape(q.shape).astype(q.dtype)
  # The blocked axes: the first keeps the sharding the blocks kept, if any.
  tail = (spec[k],) + (None,) * (len(q.shape) - k - 1) if k < len(q.shape) else ()
  y = jax.lax.reshape(y, q.shape, out_sharding=P(*spec[:k], *tail))
  return y.astype(q.dtype)


def _is_quantized(x) -> bool:
  return isinstance(x, QuantizedArray)


def _is_float_array(x) -> bool:
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def dequantize_tree(tree: Any) -> Any:
  """``tree`` with every ``QuantizedArray`` in it dequantized.

  Args:
    tree: Any pytree.

  Returns:
    The same tree, ``QuantizedArray`` nodes replaced by the arrays they store.
  """
  return jax.tree.map(
      lambda x: dequantize(x) if _is_quantized(x) else x, tree,
      is_leaf=_is_quantized)


def quantize_state(
    tx: optax.GradientTransformation,
    *,
    bits: int = 8,
    block_size: int = 256,
    min_size: int = 4096,
    mapping: str = "sqrt",
) -> optax.GradientTransformationExtraArgs:
  """Stores ``tx``'s floating state block-wise quantized (8-bit Adam).

  Every floating leaf of ``tx``'s state with at least ``min_size`` elements is
  kept as a ``QuantizedArray``; ``update`` dequantizes the state, runs
  ``tx.update`` in the state's own dtype, and quantizes the new state.
  Counts, keys and small leaves (biases, norms) are kept as they are. The
  state is a pytree of arrays of fixed shapes and dtypes (Orbax saves it, a
  restored run continues bit for bit) built by ``jax.eval_shape``-able code.
  8-bit GaLore and 8-bit APOLLO are
  ``lowrank_project(quantize_state(optax.scale_by_adam()), ...)``.

  Map: ``sqrt`` (default) quantizes ``sign(x)·√|x|`` linearly per block, for
  every moment: Adam's ``m`` and ``v`` alike (for ``v >= 0`` that is storing
  ``√v``). Measured with Adam (lr 1e-2, 50 steps) on least squares
  ``W ∈ ℝ^{256×512}``, 1024 samples, targets whose output columns have equal
  or log-normal scales (so each 256-block, a row of ``W``, is heavy-tailed):
  ``‖W − W_f32‖ / ‖W_f32 − W₀‖`` with 8-bit state and 256-element blocks:

  ====================================  =====  ===================
  column scales                         equal  log-normal (σ = 1)
  ====================================  =====  ===================
  ``linear`` for m and v                0.27   1.15
  ``linear`` m, ``sqrt`` v              0.0067 0.105
  ``sqrt`` m and v (this default)       0.0060 0.037
  bitsandbytes' dynamic maps (sim.)     0.0089 0.036
  bfloat16 state                        0.0008 0.0016
  ====================================  =====  ===================

  A linear ``v`` fails because entries below one code step decode to the
  block minimum (about 0), and ``m/(√v + eps)`` explodes there. 8-bit GaLore
  and Q-GaLore use bitsandbytes' 8-bit Adam: absmax blocks (256) with its
  signed (``m``) and unsigned (``v``) dynamic tree maps. This is not that
  map (the codes stay linear in ``√|x|``, with a per-block zero point, so
  ``quantize``'s error bound holds), but it matches a simulation of it above;
  with five decades of scale inside a block (σ = 2) both reach about 0.5.
  Blocks must be small where scales vary across a tensor: one block for a
  whole heavy-tailed tensor, or blocks of 2048 spanning rows of different
  scales, diverge. ``bits=4`` state is far worse (errors above 1 on the
  problems above) and is not advised.

  Inside ``lowrank_project``, moment policies (``on_refresh="reset"``,
  ``"rotate"``) and projectors that read the first moment (COAP) see the
  dequantized moments; a moment they change is quantized again, on refresh
  steps only (``moments``).

  Args:
    tx: Any optax transform, e.g. ``optax.scale_by_adam()``.
    bits: 8 or 4 bits per element.
    block_size: Elements per block (bitsandbytes: 256; 2048 in its first
      version); even for ``bits=4``.
    min_size: Leaves with fewer elements are not quantized (bitsandbytes:
      4096).
    mapping: ``sqrt`` (default) or ``linear``, for every quantized leaf.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax, optax_lowrank
    >>> from optax_lowrank.quantize import quantize_state
    >>> params = {"w": jnp.zeros((512, 256)), "b": jnp.zeros(256)}
    >>> tx = quantize_state(optax.scale_by_adam(), bits=8)
    >>> optax_lowrank.memory.state_bytes(tx, params).total_bytes
    272388
    >>> optax_lowrank.memory.state_bytes(optax.scale_by_adam(), params).total_bytes
    1050628

  References:
    Dettmers et al., `8-bit Optimizers via Block-wise Quantization
    <https://arxiv.org/abs/2110.02861>`_, ICLR 2022; Zhang et al., `Q-GaLore
    <https://arxiv.org/abs/2407.08296>`_, 2024.
  """
  if not isinstance(tx, optax.GradientTransformation):
    raise ValueError(
        f"`tx` must be an optax GradientTransformation, got {tx!r}")
  _validate(bits, block_size, mapping)
  if (isinstance(min_size, bool) or not isinstance(min_size, int)
      or min_size < 0):
    raise ValueError(f"`min_size` must be an int >= 0, got {min_size!r}")
  tx = optax.with_extra_args_support(tx)

  def compress(state):
    return jax.tree.map(
        lambda x: quantize(x, bits=bits, block_size=block_size,
                           mapping=mapping)
        if _is_float_array(x) and x.size >= min_size else x,
        state)

  def init_fn(params):
    return compress(tx.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    view = dequantize_tree(state)
    if any(shapes.explicit_spec(u) is not None
           for u in jax.tree.leaves(updates)) and any(
               _is_quantized(x)
               for x in jax.tree.leaves(state, is_leaf=_is_quantized)):
      # Dequantized leaves keep only the shardings their codes kept; give
      # them back those ``init`` gives (read off its abstract evaluation on
      # the updates, which are sharded like the parameters).
      like = jax.eval_shape(tx.init, updates)
      view = jax.tree.map(
          lambda q, x, l: shapes.reshard_like(x, l) if _is_quantized(q) else x,
          state, view, like, is_leaf=_is_quantized)
    updates, new_state = tx.update(updates, view, params, **extra_args)
    new_state = jax.tree.map(
        lambda old, x: requantize(old, x) if _is_quantized(old) else x,
        state, new_state, is_leaf=_is_quantized)
    return updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def quantize_basis(
    projector: Projector, *, bits: int = 4, block_size: int = 256
) -> Projector:
  """Stores a projector's basis block-wise quantized (Q-GaLore's int4 basis).

  The floating matrices of ``projector``'s basis (an SVD's singular vectors;
  not per-matrix vectors or scalars, such as ``schedules.lazy``'s
  bookkeeping) are kept as ``QuantizedArray`` with the ``linear`` map; ``down``, ``up``
  and ``refresh`` (which receives the old basis) see them dequantized, in
  the basis's own dtype. Integer bases (indices) and keys are kept as they
  are. Each matrix of a stack (leading batch axes) is quantized on its own,
  and a refresh that finds a non-finite gradient keeps that matrix's old
  basis, as for unquantized bases. Blocks run over each matrix's flattening:
  a ``(m, r)`` basis with ``m·r`` a multiple of 256 is exactly Q-GaLore's
  ``reshape(-1, 256)`` groups.

  Q-GaLore's code rounds the zero point to an integer code and clamps scales
  at ``1e-5``; here the zero point is the block minimum in float32, which
  keeps every element within ``scale/2``, and a constant block is exact.

  Args:
    projector: Any ``Projector``, e.g. ``projectors.svd()``.
    bits: 4 (Q-GaLore) or 8.
    block_size: Elements per block (Q-GaLore's group size: 256).

  Returns:
    A ``Projector``.

  Example:
    >>> import jax.numpy as jnp, optax, optax_lowrank
    >>> from optax_lowrank.quantize import quantize_basis
    >>> tx = optax_lowrank.lowrank_project(
    ...     optax.scale_by_adam(), rank=8,
    ...     projector=quantize_basis(optax_lowrank.projectors.svd(), bits=4))
    >>> params = {"w": jnp.ones((512, 256))}
    >>> updates, state = tx.update(params, tx.init(params), params)

  References:
    Zhang et al., `Q-GaLore: Quantized GaLore with INT4 Projection and
    Layer-Adaptive Low-Rank Gradients <https://arxiv.org/abs/2407.08296>`_,
    2024; Dettmers et al., `8-bit Optimizers via Block-wise Quantization
    <https://arxiv.org/abs/2110.02861>`_, ICLR 2022.
  """
  check_wrappable(projector, "quantize_basis")
  _validate(bits, block_size, "linear")

  def init(info, dtype):
    nb = len(info.batch_shape)

    def compress(x):
      # Matrices only: per-matrix vectors and scalars a wrapped projector keeps
      # (lazy refresh's previous singular vector and similarities) stay exact.
      if not _is_float_array(x) or x.ndim < nb + 2:
        return x
      batch = nb if tuple(x.shape[:nb]) == tuple(info.batch_shape) else 0
      return quantize(x, bits=bits, block_size=block_size, batch_dims=batch)

    return jax.tree.map(compress, projector.init(info, dtype))

  def refresh(ctx, g, basis):
    new = projector.refresh(ctx, g, dequantize_tree(basis))
    return jax.tree.map(
        lambda old, x: requantize(old, x) if _is_quantized(old) else x,
        basis, new, is_leaf=_is_quantized)

  def down(basis, g):
    return projector.down(dequantize_tree(basis), g)

  def up(basis, r):
    return projector.up(dequantize_tree(basis), r)

  return Projector(init, refresh, down, up)
