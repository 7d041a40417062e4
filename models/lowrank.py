"""Which weights a low-rank gradient projector should act on, derived from the model.

GaLore (Zhao et al., 2024, https://arxiv.org/abs/2403.03507) projects the gradients of the
attention (q, k, v, o) and MLP (gate, up, down) matrices; embeddings, norms and the LM head
are updated in full. Kernels here are plain (in, out) matrices, so the input axis is the
reduction axis and the output axis the output axis; with scanned layers the leading
`layers` axis is named in neither and is therefore a batch axis.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
from flax import nnx

from models.config import LlamaConfig

try:  # the library's own spec type once it imports; the same fields otherwise
  from optax_lowrank import DimensionNumbers
except Exception:  # noqa: BLE001 - the library may be absent or mid-edit
  class DimensionNumbers(NamedTuple):  # type: ignore[no-redef]
    """Stand-in for `optax_lowrank.DimensionNumbers` (same fields)."""
    reduction_axes: int | Sequence[int] = 0
    output_axes: int | Sequence[int] = 1

PROJECTED = {"attn": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down")}


def pure_dict(state: Any) -> Any:
  """Nested dict of arrays from an `nnx.State` (across Flax versions)."""
  if hasattr(nnx, "to_pure_dict"):
    return nnx.to_pure_dict(state)
  return state.to_pure_dict()


def params_tree(model_or_params: Any) -> Any:
  """The pure-dict parameter tree the trainer differentiates (from a model or a State)."""
  if isinstance(model_or_params, nnx.Module):
    model_or_params = nnx.state(model_or_params, nnx.Param)
  if isinstance(model_or_params, nnx.State):
    return pure_dict(model_or_params)
  return model_or_params


def _key(entry) -> Any:
  return getattr(entry, "key", getattr(entry, "idx", getattr(entry, "name", entry)))


def is_projected(path: tuple) -> bool:
  """True for `.../attn/{q,k,v,o}/kernel` and `.../mlp/{gate,up,down}/kernel`."""
  return (len(path) >= 3 and path[-1] == "kernel" and path[-3] in PROJECTED
          and path[-2] in PROJECTED[path[-3]])


def lowrank_spec(model_or_params: Any, cfg: LlamaConfig) -> tuple[Any, Any]:
  """`(mask, dimension_numbers)` pytrees with the structure of the parameter tree.

  Args:
    model_or_params: a `Llama`, its `nnx.State`, or the pure-dict parameter tree (arrays
      or `jax.ShapeDtypeStruct`s) that the train step differentiates.
    cfg: the model's config (whether layers are stacked).

  Returns:
    `mask`: True on the attention and MLP kernels, False elsewhere;
    `dimension_numbers`: `DimensionNumbers(reduction_axes, output_axes)` on those kernels
    (shifted by one past the `layers` axis when `cfg.scan_layers`), None elsewhere.
  """
  params = params_tree(model_or_params)
  lead = 1 if cfg.scan_layers else 0

  def mask_fn(path, leaf):
    selected = is_projected(tuple(_key(p) for p in path))
    if selected and len(leaf.shape) != 2 + lead:
      raise ValueError(f"{jax.tree_util.keystr(path)} has shape {leaf.shape}, expected "
                       f"{2 + lead} axes (scan_layers={cfg.scan_layers})")
    return selected

  mask = jax.tree_util.tree_map_with_path(mask_fn, params)
  dims = jax.tree.map(
      lambda m: DimensionNumbers(reduction_axes=lead, output_axes=lead + 1) if m else None,
      mask)
  return mask, dims
