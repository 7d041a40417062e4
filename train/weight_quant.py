"""Q-GaLore's int8 weights (`--weight-quant int8`): the projected matrices are stored as
int8 blocks and rounded back stochastically after every update.

The train state keeps each selected matrix as an `optax_lowrank.quantize.QuantizedArray`:
one `uint8` code per element and a float32 scale and zero per block of `BLOCK_SIZE`
consecutive elements, `w = zero + code · scale` (`quantize`'s asymmetric block map).
Initial weights are rounded to the nearest code. Inside the jitted step the weights are
dequantized, the loss, gradients and optimizer update run on them in the weights' dtype,
and `dequant(q) + update` is quantized again with stochastic rounding,
`code = floor((w − zero)/scale + u)`, `u ~ U[0, 1)`: unbiased, within one step `scale` of
`w`, with the block's scale and zero recomputed from the new weights (as Q-GaLore's
`_quantize_stochastic_round` does). The rounding key is a function of `--seed` and the
step only, so runs are reproducible and resume bit for bit.

Which weights: those the optimizer projects (the model's `lowrank_spec` mask: attention
q, k, v, o and MLP gate, up, down), as Q-GaLore replaces exactly those `nn.Linear`s by
its int8 `QGaLoreLinear`; embeddings, norms and the LM head stay in full precision. Each
matrix of a stack of layers is quantized on its own.

References:
  Zhang et al., `Q-GaLore: Quantized GaLore with INT4 Projection and Layer-Adaptive
  Low-Rank Gradients <https://arxiv.org/abs/2407.08296>`_, 2024; code:
  github.com/VITA-Group/Q-GaLore (`q_galore_torch/utils/quantization.py`,
  `q_galore_torch/q_galore_adamw8bit.py`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from optax_lowrank import quantize as qlib

MODES = ("none", "int8")
BLOCK_SIZE = 256  # Q-GaLore's --weight_group_size
_STREAM = 0x5147  # folded into the seed: rounding draws apart from init and data


def _is_quantized(x) -> bool:
  return isinstance(x, qlib.QuantizedArray)


class Int8Weights:
  """Stores the leaves of `mask` as int8 blocks; `wrap_step` runs a train step on them.

  Args:
    mask: A tree of bools with the structure of the parameters (True: quantized).
    seed: The run's seed; step `s` rounds with a key folded from it and `s`.
    block_size: Elements per block of codes.
  """

  def __init__(self, mask: Any, *, seed: int, block_size: int = BLOCK_SIZE):
    self.mask = mask
    self.seed = seed
    self.block_size = block_size

  def store(self, params: Any) -> Any:
    """Float parameters → the stored tree (selected matrices to the nearest code)."""
    return jax.tree.map(
        lambda x, m: qlib.quantize(x, block_size=self.block_size,
                                   batch_dims=x.ndim - 2) if m else x,
        params, self.mask)

  def load(self, params: Any) -> Any:
    """The stored tree → float parameters (what the model and the optimizer see)."""
    return qlib.dequantize_tree(params)

  def key(self, step: jax.Array) -> jax.Array:
    """The rounding key of the update made at `step` (a traced int is fine)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed), _STREAM), step)

  def round(self, stored: Any, new: Any, step: jax.Array) -> Any:
    """`new` float parameters → stored like `stored`, quantized leaves rounded
    stochastically (one key per leaf, split from `key(step)`)."""
    leaves, treedef = jax.tree.flatten(stored, is_leaf=_is_quantized)
    keys = jax.random.split(self.key(step), len(leaves))
    new_leaves = treedef.flatten_up_to(new)
    return treedef.unflatten([
        qlib.requantize(old, x, stochastic=True, key=k) if _is_quantized(old) else x
        for old, x, k in zip(leaves, new_leaves, keys)])

  def wrap_step(self, step_fn: Callable) -> Callable:
    """A train step `(state, batch) → (state, metrics)` over float parameters → the same
    step over stored ones: dequantize, run it, round the new weights back (a step that
    its guard skipped, metric `skipped`, keeps the stored weights as they are)."""
    def step(state, batch):
      stored = state["params"]
      new, metrics = step_fn({**state, "params": self.load(stored)}, batch)
      rounded = lambda: self.round(stored, new["params"], state["step"])
      if "skipped" in metrics:
        params = jax.lax.cond(metrics["skipped"] > 0, lambda: stored, rounded)
      else:
        params = rounded()
      return {**new, "params": params}, metrics
    return step

  def wrap_eval(self, eval_fn: Callable) -> Callable:
    """`eval(params, tokens)` over float parameters → over stored ones."""
    return lambda params, tokens: eval_fn(self.load(params), tokens)


def nbytes(tree: Any) -> int:
  """Bytes of a tree of arrays or `jax.ShapeDtypeStruct`s (codes, scales and zeros
  included)."""
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))
