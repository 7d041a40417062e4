"""The LLaMA decoder (Touvron et al., 2023) in Flax NNX.

Untied input embedding and LM head (with `cfg.tie_embeddings` the logits are the final
hidden states times the transposed embedding table, as in LLaMA-3.2); pre-norm blocks of
grouped-query attention with RoPE and a SwiGLU MLP; activation `dtype` separate from
`param_dtype`. With `cfg.scan_layers` the blocks are one `Block` whose weights carry a
leading `layers` axis, applied with plain `jax.lax.scan` over its split state; with
`cfg.remat` each block is wrapped in `jax.checkpoint` with the chosen policy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import LlamaConfig
from models.layers import BATCH, LENGTH, Block, Dense, RMSNorm, _param
from models.sharding import activation_spec, constrain
from models.velora import VeLoRAState

_List = getattr(nnx, "List", list)  # Flax < 0.12 keeps modules in plain lists

_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Llama(nnx.Module):
  """LLaMA language model: tokens (B, T) int → logits (B, T, V) in `cfg.dtype`."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = _param(rngs, jax.nn.initializers.normal(cfg.init_std),
                        (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                        cfg.jnp_param_dtype, None)
    if cfg.scan_layers:
      self.layers = Block(cfg, stack=cfg.num_layers, rngs=rngs)
    else:
      self.layers = _List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.d_model, cfg=cfg, rngs=rngs)
    if not cfg.tie_embeddings:
      self.lm_head = Dense(cfg.d_model, cfg.vocab_size, ("embed", "vocab"), cfg=cfg,
                           rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    cfg = self.cfg
    b, t = tokens.shape
    if t > cfg.max_seq_len:
      raise ValueError(f"sequence length {t} exceeds max_seq_len {cfg.max_seq_len}")
    table = self.embed[...].astype(cfg.jnp_dtype)
    spec = activation_spec((b, t, cfg.d_model), BATCH, LENGTH, "activation_embed")
    x = table.at[tokens].get(out_sharding=spec) if spec is not None else table[tokens]
    positions = jnp.arange(t, dtype=jnp.int32)
    x = self._apply_blocks(x, positions)
    x = self.final_norm(x)
    if not cfg.tie_embeddings:
      return self.lm_head(x, (BATCH, LENGTH, "activation_vocab"))
    out_spec = activation_spec((b, t, cfg.vocab_size), BATCH, LENGTH, "activation_vocab")
    return jnp.einsum("BTD,VD->BTV", x.astype(cfg.jnp_dtype), table, out_sharding=out_spec)

  def _apply_blocks(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    cfg = self.cfg

    def apply(graphdef, state, x):
      # Returns the block's VeLoRA buffers too: its first call sets them (empty without
      # VeLoRA), and a merged copy's updates would otherwise be lost.
      block = nnx.merge(graphdef, state)
      return block(x, positions), nnx.state(block, VeLoRAState)

    if cfg.remat != "none":
      apply = jax.checkpoint(apply, policy=_POLICIES[cfg.remat], static_argnums=(0,))

    if cfg.scan_layers:
      graphdef, state = nnx.split(self.layers)
      x, buffers = jax.lax.scan(lambda h, layer: apply(graphdef, layer, h), x, state)
      nnx.update(self.layers, buffers)
      return x
    for block in self.layers:
      graphdef, state = nnx.split(block)
      x, buffers = apply(graphdef, state, x)
      nnx.update(block, buffers)
    return constrain(x, BATCH, LENGTH, "activation_embed")


def stack_layers(blocks) -> nnx.State:
  """Stacks the states of unscanned blocks (a list) on a new leading `layers` axis."""
  states = [nnx.state(block) for block in blocks]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *states)
