"""LLaMA building blocks: Dense, RMSNorm, RoPE, SwiGLU MLP, grouped-query causal attention.

Einsum letters: B batch, T query position, S key position, D model width, F MLP width,
E projected width (heads · head_dim), N query heads, K key/value heads, G query heads per
key/value head, H head dim, V vocabulary, L layers. Every weight carries logical axis
names (see `models.sharding`); with `stack=L` a weight gets a leading `layers` axis so the
blocks can be applied with `lax.scan`.
"""

from __future__ import annotations

from collections.abc import Sequence
import math

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import LlamaConfig
from models.sharding import activation_spec, constrain, no_eager_sharding
from models.velora import Projection

BATCH, LENGTH = "activation_batch", "activation_length"


def _param(rngs: nnx.Rngs, init, shape: Sequence[int], names: Sequence[str], dtype,
           stack: int | None) -> nnx.Param:
  if stack is not None:
    shape, names = (stack, *shape), ("layers", *names)
  with no_eager_sharding():  # placement comes later, from the names and the rules table
    return nnx.Param(nnx.with_partitioning(init, tuple(names))(rngs.params(), tuple(shape),
                                                               dtype))


class Dense(nnx.Module):
  """`y = x @ kernel` with a plain 2-D (in, out) kernel and logical names (in, out).

  With `velora_groups` (a group count G) the weight gradient is VeLoRA's, from rank-1
  projections of the input's G sub-tokens (`models.velora.Projection`); the output and
  the input gradient are unchanged.
  """

  def __init__(self, in_features: int, out_features: int, names: tuple[str, str], *,
               cfg: LlamaConfig, stack: int | None = None, rngs: nnx.Rngs,
               velora_groups: int | None = None):
    init = jax.nn.initializers.normal(cfg.init_std)
    self.kernel = _param(rngs, init, (in_features, out_features), names,
                         cfg.jnp_param_dtype, stack)
    self.dtype = cfg.jnp_dtype
    self.velora = (None if velora_groups is None else
                   Projection(in_features, velora_groups, cfg.velora_scale, stack=stack))

  def __call__(self, x: jax.Array, out_names: Sequence[str | None]) -> jax.Array:
    kernel = self.kernel[...].astype(self.dtype)
    out_shape = (*x.shape[:-1], kernel.shape[-1])
    out_sharding = activation_spec(out_shape, *out_names)
    if self.velora is not None:
      return self.velora(x.astype(self.dtype), kernel, out_sharding)
    return jnp.einsum("BTD,DF->BTF", x.astype(self.dtype), kernel,
                      out_sharding=out_sharding)


class RMSNorm(nnx.Module):
  """Root-mean-square layer norm (Zhang & Sennrich, 2019), computed in float32."""

  def __init__(self, dim: int, *, cfg: LlamaConfig, stack: int | None = None,
               rngs: nnx.Rngs):
    self.scale = _param(rngs, jax.nn.initializers.ones, (dim,), ("norm",),
                        cfg.jnp_param_dtype, stack)
    self.eps = cfg.norm_eps
    self.dtype = cfg.jnp_dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


def rope_frequencies(cfg: LlamaConfig) -> jax.Array:
  """The RoPE angular frequencies θ_i, i < head_dim/2, in float32 (`cfg.rope_type`).

  `default`: θ_i = rope_theta^(-2i/H). `llama3` (LLaMA-3.1/3.2, as Hugging Face's
  `_compute_llama3_parameters`): with wavelength λ_i = 2π/θ_i and L the original context
  `rope_original_max_len`, frequencies with λ_i > L/low_freq_factor are divided by
  `rope_factor`, those with λ_i < L/high_freq_factor kept, and in between
  θ_i·((1 − s)/factor + s) with s = (L/λ_i − low_freq_factor)/(high − low_freq_factor).
  """
  h = cfg.head_dim
  freq = cfg.rope_theta ** (-jnp.arange(h // 2, dtype=jnp.float32) * 2.0 / h)
  if cfg.rope_type == "default":
    return freq
  factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
  old_len = cfg.rope_original_max_len
  wavelen = 2 * math.pi / freq
  smooth = (old_len / wavelen - low) / (high - low)
  medium = (1 - smooth) * freq / factor + smooth * freq
  return jnp.where(wavelen > old_len / low, freq / factor,
                   jnp.where(wavelen < old_len / high, freq, medium))


def rope(x: jax.Array, positions: jax.Array, theta: float = 10000.0, *,
         freq: jax.Array | None = None) -> jax.Array:
  """Rotary position embedding (Su et al., 2021), LLaMA "rotate-half" layout.

  With half = H/2, the pair (x[i], x[i + half]) at position p is rotated by the angle
  p·θ_i where θ_i = theta^(-2i/H), or θ_i = freq[i] when `freq` is given.

  Args:
    x: (B, T, ..., H) queries or keys, e.g. (B, T, N, H) or grouped (B, T, K, G, H).
    positions: (T,) integer positions.
    theta: the base of the frequencies.
    freq: (H/2,) frequencies (e.g. `rope_frequencies(cfg)`), replacing `theta`'s.

  Returns:
    The rotated array, same shape and dtype as `x`.
  """
  half = x.shape[-1] // 2
  if freq is None:
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / x.shape[-1])
  angle = positions.astype(jnp.float32)[:, None] * freq[None, :]  # (T, half)
  angle = angle.reshape(angle.shape[0], *([1] * (x.ndim - 3)), half)  # (T, 1.., half)
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def _reshape(x: jax.Array, shape: tuple[int, ...], names: Sequence[str | None]):
  spec = activation_spec(shape, *names)
  if spec is None:
    return x.reshape(shape)
  return jnp.reshape(x, shape, out_sharding=spec)


class Attention(nnx.Module):
  """Causal grouped-query self-attention with RoPE."""

  def __init__(self, cfg: LlamaConfig, *, stack: int | None = None, rngs: nnx.Rngs):
    d, h = cfg.d_model, cfg.head_dim
    kw = dict(cfg=cfg, stack=stack, rngs=rngs)
    self.q = Dense(d, cfg.num_heads * h, ("embed", "heads"), **kw,
                   velora_groups=cfg.velora_groups_of("q"))
    self.k = Dense(d, cfg.num_kv_heads * h, ("embed", "kv_heads"), **kw,
                   velora_groups=cfg.velora_groups_of("k"))
    self.v = Dense(d, cfg.num_kv_heads * h, ("embed", "kv_heads"), **kw,
                   velora_groups=cfg.velora_groups_of("v"))
    self.o = Dense(cfg.num_heads * h, d, ("heads", "embed"), **kw,
                   velora_groups=cfg.velora_groups_of("o"))
    self.num_kv_heads, self.num_groups, self.head_dim = cfg.num_kv_heads, cfg.num_groups, h
    self.cfg = cfg  # static; `rope_frequencies` reads it when the module is applied
    self.dtype = cfg.jnp_dtype

  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    b, t, _ = x.shape
    k_, g, h = self.num_kv_heads, self.num_groups, self.head_dim
    kv_names = (BATCH, LENGTH, "activation_kv_heads", None)
    q = self.q(x, (BATCH, LENGTH, "activation_heads"))
    q = _reshape(q, (b, t, k_, g, h), (BATCH, LENGTH, "activation_kv_heads", None, None))
    k = _reshape(self.k(x, (BATCH, LENGTH, "activation_kv_heads")), (b, t, k_, h), kv_names)
    v = _reshape(self.v(x, (BATCH, LENGTH, "activation_kv_heads")), (b, t, k_, h), kv_names)
    freq = rope_frequencies(self.cfg)
    q = rope(q, positions, freq=freq)
    k = rope(k, positions, freq=freq)
    q = q * jnp.asarray(h ** -0.5, q.dtype)
    logits_names = (BATCH, "activation_kv_heads", None, None, None)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32,
                        out_sharding=activation_spec((b, k_, g, t, t), *logits_names))
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out_names = (BATCH, LENGTH, "activation_kv_heads", None, None)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v,
                     out_sharding=activation_spec((b, t, k_, g, h), *out_names))
    out = _reshape(out, (b, t, k_ * g * h), (BATCH, LENGTH, "activation_heads"))
    return self.o(out, (BATCH, LENGTH, "activation_embed"))


class MLP(nnx.Module):
  """SwiGLU feed-forward (Shazeer, 2020): down(silu(gate(x)) · up(x))."""

  def __init__(self, cfg: LlamaConfig, *, stack: int | None = None, rngs: nnx.Rngs):
    kw = dict(cfg=cfg, stack=stack, rngs=rngs)
    self.gate = Dense(cfg.d_model, cfg.d_ff, ("embed", "mlp"), **kw,
                      velora_groups=cfg.velora_groups_of("gate"))
    self.up = Dense(cfg.d_model, cfg.d_ff, ("embed", "mlp"), **kw,
                    velora_groups=cfg.velora_groups_of("up"))
    self.down = Dense(cfg.d_ff, cfg.d_model, ("mlp", "embed"), **kw,
                      velora_groups=cfg.velora_groups_of("down"))

  def __call__(self, x: jax.Array) -> jax.Array:
    names = (BATCH, LENGTH, "activation_mlp")
    hidden = jax.nn.silu(self.gate(x, names)) * self.up(x, names)
    return self.down(hidden, (BATCH, LENGTH, "activation_embed"))


class Block(nnx.Module):
  """Pre-norm decoder block: x + attn(norm(x)), then + mlp(norm(x))."""

  def __init__(self, cfg: LlamaConfig, *, stack: int | None = None, rngs: nnx.Rngs):
    kw = dict(stack=stack, rngs=rngs)
    self.attn_norm = RMSNorm(cfg.d_model, cfg=cfg, **kw)
    self.attn = Attention(cfg, **kw)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg=cfg, **kw)
    self.mlp = MLP(cfg, **kw)

  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    x = x + self.attn(self.attn_norm(x), positions)
    x = x + self.mlp(self.mlp_norm(x))
    return constrain(x, BATCH, LENGTH, "activation_embed")
