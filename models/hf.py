"""Hugging Face LLaMA checkpoints: read a local directory into a `Llama`, write one back.

A directory holds `config.json` and the weights in safetensors, one `model.safetensors`
or several files listed by `model.safetensors.index.json`. Hugging Face stores each
projection as a PyTorch `(out, in)` weight; our kernels are `(in, out)`, so q, k, v, o,
gate, up, down and the LM head are transposed on the way in and out. Both use the
rotate-half RoPE layout and the same head order (query head n reads key/value head
n // G), so no permutation is needed. With `scan_layers` the per-layer tensors are
stacked on the leading `layers` axis.

Under a mesh every weight is built with `jax.make_array_from_callback`: each device
reads only its own block of the tensor from the file (safetensors' lazy slices), so no
host ever holds a full copy per device.
"""

from __future__ import annotations

from collections.abc import Mapping
import contextlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from models import sharding as shd
from models.config import DTYPES, LlamaConfig
from models.llama import Llama
from models.lowrank import pure_dict

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ARCHITECTURE = "LlamaForCausalLM"

# Our parameter path (below the layer index) -> (Hugging Face name, transposed?).
_LAYER_TENSORS = {
    ("attn_norm", "scale"): ("input_layernorm.weight", False),
    ("attn", "q", "kernel"): ("self_attn.q_proj.weight", True),
    ("attn", "k", "kernel"): ("self_attn.k_proj.weight", True),
    ("attn", "v", "kernel"): ("self_attn.v_proj.weight", True),
    ("attn", "o", "kernel"): ("self_attn.o_proj.weight", True),
    ("mlp_norm", "scale"): ("post_attention_layernorm.weight", False),
    ("mlp", "gate", "kernel"): ("mlp.gate_proj.weight", True),
    ("mlp", "up", "kernel"): ("mlp.up_proj.weight", True),
    ("mlp", "down", "kernel"): ("mlp.down_proj.weight", True),
}
_GLOBAL_TENSORS = {
    ("embed",): ("model.embed_tokens.weight", False),
    ("final_norm", "scale"): ("model.norm.weight", False),
    ("lm_head", "kernel"): ("lm_head.weight", True),
}
# Tensors some exports carry that the forward pass does not read.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ------------------------------------------------------------------------- config


def _refuse(field: str, value: Any, allowed: str) -> ValueError:
  return ValueError(f"unsupported Hugging Face config: `{field}` is {value!r}; {allowed}")


def _rope_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
  """Our rope_* fields from either config format: `rope_theta` and `rope_scaling` at the
  top level (transformers 4.x) or one `rope_parameters` dict (transformers 5.x)."""
  # transformers 5 reads `rope_scaling` first when both are present; so do we.
  params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
  field = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
  if not isinstance(params, Mapping) or any(isinstance(v, Mapping) for v in params.values()):
    raise _refuse(field, params, "expected one dict of RoPE parameters (not per layer type)")
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type not in ("default", "llama3"):
    raise _refuse(f"{field}.rope_type", rope_type, "supported: 'default', 'llama3'")
  partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if partial != 1.0:
    raise _refuse("partial_rotary_factor", partial, "only 1.0 (RoPE on the whole head)")
  if params.get("attention_factor", 1.0) != 1.0:
    raise _refuse(f"{field}.attention_factor", params["attention_factor"], "only 1.0")
  out = {"rope_type": rope_type,
         "rope_theta": float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))}
  if rope_type == "llama3":
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
      if key not in params:
        raise _refuse(f"{field}.{key}", None, "required by rope_type 'llama3'")
    out.update(
        rope_factor=float(params["factor"]),
        rope_low_freq_factor=float(params["low_freq_factor"]),
        rope_high_freq_factor=float(params["high_freq_factor"]),
        rope_original_max_len=int(params.get("original_max_position_embeddings",
                                             hf.get("max_position_embeddings", 2048))))
  return out


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> LlamaConfig:
  """A `LlamaConfig` from a Hugging Face LLaMA `config.json` (as a dict).

  Missing keys take transformers' `LlamaConfig` defaults. Anything this model cannot
  compute exactly (biases, an activation other than SiLU, RoPE types other than
  `default` and `llama3`, another architecture) raises a one-line ValueError naming
  the field.

  Args:
    hf: the parsed `config.json`.
    **overrides: `LlamaConfig` fields to set (e.g. `dtype`, `param_dtype`,
      `scan_layers`).

  Returns:
    The config.
  """
  if hf.get("model_type", "llama") != "llama":
    raise _refuse("model_type", hf["model_type"], "only 'llama' is supported")
  archs = hf.get("architectures")
  if archs is not None and list(archs) != [ARCHITECTURE]:
    raise _refuse("architectures", archs, f"only [{ARCHITECTURE!r}] is supported")
  for flag in ("attention_bias", "mlp_bias"):
    if hf.get(flag, False):
      raise _refuse(flag, hf[flag], "biases are not supported")
  if hf.get("hidden_act", "silu") != "silu":
    raise _refuse("hidden_act", hf["hidden_act"], "only 'silu' (SwiGLU) is supported")
  d_model = int(hf.get("hidden_size", 4096))
  heads = int(hf.get("num_attention_heads", 32))
  head_dim = hf.get("head_dim")
  fields = dict(
      vocab_size=int(hf.get("vocab_size", 32000)),
      d_model=d_model,
      d_ff=int(hf.get("intermediate_size", 11008)),
      num_heads=heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or heads),
      num_layers=int(hf.get("num_hidden_layers", 32)),
      max_seq_len=int(hf.get("max_position_embeddings", 2048)),
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      head_dim_override=(None if head_dim is None or d_model == int(head_dim) * heads
                         else int(head_dim)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      init_std=float(hf.get("initializer_range", 0.02)),
      **_rope_fields(hf),
  )
  return LlamaConfig(**{**fields, **overrides})


def config_to_hf(cfg: LlamaConfig) -> dict[str, Any]:
  """The `config.json` transformers' `LlamaForCausalLM` reads for `cfg` (4.x layout,
  which transformers 5 also reads)."""
  rope_scaling = None
  if cfg.rope_type == "llama3":
    rope_scaling = {"rope_type": "llama3", "factor": cfg.rope_factor,
                    "low_freq_factor": cfg.rope_low_freq_factor,
                    "high_freq_factor": cfg.rope_high_freq_factor,
                    "original_max_position_embeddings": cfg.rope_original_max_len}
  return {
      "architectures": [ARCHITECTURE],
      "model_type": "llama",
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.d_model,
      "intermediate_size": cfg.d_ff,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": cfg.max_seq_len,
      "rms_norm_eps": cfg.norm_eps,
      "rope_theta": cfg.rope_theta,
      "rope_scaling": rope_scaling,
      "tie_word_embeddings": cfg.tie_embeddings,
      "attention_bias": False,
      "mlp_bias": False,
      "initializer_range": cfg.init_std,
      "torch_dtype": cfg.param_dtype,
  }


# ------------------------------------------------------------------ tensor names


def _tensor_names(cfg: LlamaConfig) -> dict[tuple, tuple[str | list[str], bool]]:
  """Our parameter path -> (Hugging Face name, or one name per layer when stacked;
  whether the tensor is transposed)."""
  names = {path: spec for path, spec in _GLOBAL_TENSORS.items()
           if not (cfg.tie_embeddings and path[0] == "lm_head")}
  for sub, (name, transposed) in _LAYER_TENSORS.items():
    per_layer = [f"model.layers.{i}.{name}" for i in range(cfg.num_layers)]
    if cfg.scan_layers:
      names[("layers", *sub)] = (per_layer, transposed)
    else:
      names.update({("layers", i, *sub): (n, transposed) for i, n in enumerate(per_layer)})
  return names


def _weight_map(path: str) -> dict[str, str]:
  """Tensor name -> the safetensors file (inside `path`) that holds it."""
  index = os.path.join(path, INDEX_FILE)
  if os.path.exists(index):
    with open(index) as f:
      return dict(json.load(f)["weight_map"])
  single = os.path.join(path, WEIGHTS_FILE)
  if not os.path.exists(single):
    raise FileNotFoundError(f"{path} has neither {WEIGHTS_FILE} nor {INDEX_FILE}")
  with safe_open(single, framework="np") as f:
    return {name: WEIGHTS_FILE for name in f.keys()}


def _read_block(tensor, index: tuple[slice, ...], transposed: bool, dtype) -> np.ndarray:
  """The block `index` (of our layout) of one lazily opened tensor, as `dtype`."""
  if transposed:
    return tensor[tuple(reversed(index))].T.astype(dtype)
  return tensor[index].astype(dtype)


def _loader(tensors: Mapping[str, Any], names, transposed: bool, dtype):
  """make_array_from_callback's callback: the device's block of one parameter."""
  def block(index: tuple[slice, ...]) -> np.ndarray:
    if isinstance(names, str):
      return _read_block(tensors[names], index, transposed, dtype)
    layers = range(len(names))[index[0]]
    return np.stack([_read_block(tensors[names[i]], index[1:], transposed, dtype)
                     for i in layers])
  return block


def _normalize_index(index, shape) -> tuple[slice, ...]:
  """Full `slice(start, stop)` objects (no None, no step), one per axis."""
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))


# ---------------------------------------------------------------------- loading


def _dtype_name(dtype) -> str:
  name = jnp.dtype(dtype).name
  if name not in DTYPES:
    raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
  return name


def from_pretrained(path: str | os.PathLike, *, dtype=None, param_dtype=None,
                    scan_layers: bool = False, mesh=None) -> Llama:
  """A `Llama` with the weights of a local Hugging Face LLaMA checkpoint.

  Args:
    path: a directory with `config.json` and `model.safetensors` (or shards listed in
      `model.safetensors.index.json`).
    dtype: activation dtype (`float32`, `bfloat16`, `float16`); None: float32.
    param_dtype: weight dtype; None: float32 (as transformers loads by default). The
      file's values are cast to it: exactly when it is wider, to nearest when narrower.
    scan_layers: stack the blocks on a leading `layers` axis (`LlamaConfig.scan_layers`).
    mesh: a `jax.sharding.Mesh` over `models.sharding.MESH_AXES`: each weight is placed
      with the sharding its logical names give under `models.sharding.RULES`, each
      device reading only its block. None: the default device.

  Returns:
    The model; `model(tokens)` gives the logits (under `jax.set_mesh(mesh)` when
    sharded).

  Example:
    >>> model = models.from_pretrained("Llama-3.2-1B", param_dtype="bfloat16")  # doctest: +SKIP
    >>> logits = model(tokens)  # doctest: +SKIP
  """
  path = os.fspath(path)
  with open(os.path.join(path, CONFIG_FILE)) as f:
    hf = json.load(f)
  cfg = config_from_hf(hf, dtype=_dtype_name(dtype or "float32"),
                       param_dtype=_dtype_name(param_dtype or "float32"),
                       scan_layers=scan_layers)
  names = _tensor_names(cfg)
  files = _weight_map(path)
  wanted = {n for ns, _ in names.values() for n in ([ns] if isinstance(ns, str) else ns)}
  extra = sorted(n for n in files if n not in wanted and not n.endswith(_IGNORED_SUFFIXES)
                 and not (cfg.tie_embeddings and n == "lm_head.weight"))
  if extra:
    raise ValueError(f"unsupported tensor {extra[0]!r} in {path}: this LLaMA has no such "
                     f"weight ({len(extra)} unexpected in all)")
  missing = sorted(wanted - set(files))
  if missing:
    raise ValueError(f"tensor {missing[0]!r} missing from {path}")

  abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  graphdef, param_state, rest = nnx.split(abstract, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise ValueError("the model has variables other than parameters; from_pretrained "
                     "fills parameters only")
  params = pure_dict(param_state)
  if mesh is not None:
    specs = pure_dict(shd.param_specs(param_state, shd.RULES, mesh))
  np_dtype = np.dtype(cfg.jnp_param_dtype)

  with contextlib.ExitStack() as stack:
    handles = {}
    def tensor(name):
      file = files[name]
      if file not in handles:
        handles[file] = stack.enter_context(
            safe_open(os.path.join(path, file), framework="np"))
      return handles[file].get_slice(name)

    def load(key_path, leaf):
      key = tuple(_path_key(k) for k in key_path)
      hf_names, transposed = names[key]
      lazy = {n: tensor(n) for n in ([hf_names] if isinstance(hf_names, str) else hf_names)}
      _check_shape(lazy, not isinstance(hf_names, str), leaf.shape, transposed)
      if mesh is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      else:
        sharding = jax.sharding.NamedSharding(mesh, _lookup(specs, key))
      read = _loader(lazy, hf_names, transposed, np_dtype)
      return jax.make_array_from_callback(
          leaf.shape, sharding, lambda index: read(_normalize_index(index, leaf.shape)))

    arrays = jax.tree_util.tree_map_with_path(load, params)
  nnx.replace_by_pure_dict(param_state, arrays)
  return nnx.merge(graphdef, param_state, rest)


def _path_key(entry):
  return getattr(entry, "key", getattr(entry, "idx", entry))


def _lookup(tree, key):
  for k in key:
    tree = tree[k]
  return tree


def _check_shape(lazy, stacked: bool, shape, transposed):
  """Each file tensor has the shape the config gives (per layer when stacked)."""
  per_tensor = tuple(shape[1:] if stacked else shape)
  expected = per_tensor[::-1] if transposed else per_tensor
  for name, tensor in lazy.items():
    if tuple(tensor.get_shape()) != expected:
      raise ValueError(f"tensor {name!r} has shape {tuple(tensor.get_shape())}, the config "
                       f"gives {expected}")


# ----------------------------------------------------------------------- saving


def save_pretrained(model: Llama, path: str | os.PathLike, *,
                    max_shard_bytes: int = 5 * 2**30) -> None:
  """Writes `model` as a Hugging Face LLaMA directory that transformers loads.

  `config.json` (`config_to_hf`) and the weights in their stored dtype, in one
  `model.safetensors` or, past `max_shard_bytes`, several files with a
  `model.safetensors.index.json`. Weights are gathered to the host one at a time; on
  several hosts every array must be fully addressable (run it where that holds).

  Args:
    model: the `Llama`.
    path: the directory (created if needed; existing files of the same names are
      replaced).
    max_shard_bytes: the largest file, in bytes, before the weights are split.
  """
  path = os.fspath(path)
  cfg = model.cfg
  os.makedirs(path, exist_ok=True)
  params = pure_dict(nnx.state(model, nnx.Param))
  metadata = {"format": "pt"}  # transformers reads only files that say so
  files: list[str] = []  # written as each fills, renamed once their count is known
  weight_map: dict[str, str] = {}
  shard: dict[str, np.ndarray] = {}
  size = total = 0

  def flush():
    files.append(os.path.join(path, f".shard-{len(files):05d}.tmp"))
    save_file(shard, files[-1], metadata=metadata)
    weight_map.update({name: len(files) - 1 for name in shard})
    shard.clear()

  for key, (hf_names, transposed) in _tensor_names(cfg).items():
    value = np.asarray(jax.device_get(_lookup(params, key)))
    per_layer = ([(hf_names, value)] if isinstance(hf_names, str)
                 else list(zip(hf_names, value)))
    for name, array in per_layer:
      array = np.ascontiguousarray(array.T if transposed else array)
      if size and size + array.nbytes > max_shard_bytes:
        flush()
        size = 0
      shard[name] = array
      size += array.nbytes
      total += array.nbytes
  flush()

  if len(files) == 1:
    names = [WEIGHTS_FILE]
  else:
    names = [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    index = {"metadata": {"total_size": total},
             "weight_map": {name: names[i] for name, i in weight_map.items()}}
    with open(os.path.join(path, INDEX_FILE), "w") as f:
      json.dump(index, f, indent=2)
  for tmp, name in zip(files, names):
    os.replace(tmp, os.path.join(path, name))
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    json.dump(config_to_hf(cfg), f, indent=2)
