"""Model configuration: a frozen dataclass with the GaLore paper's LLaMA sizes as presets."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

# Byte-level vocabulary: 256 byte values followed by these special tokens.
BYTE_SPECIALS = ("<bos>", "<eos>", "<pad>", "<unk>")
BYTE_VOCAB_SIZE = 256 + len(BYTE_SPECIALS)

REMAT_POLICIES = ("none", "full", "dots")
DTYPES = ("float32", "bfloat16", "float16")
ROPE_TYPES = ("default", "llama3")
VELORA_LAYERS = ("q", "k", "v", "o", "gate", "up", "down")  # models/velora.py

# name -> (d_model, d_ff, num_heads, num_layers); vocab 32000 and context 256 as in the
# GaLore paper (Zhao et al., 2024, Table 9).
_PRESETS = {
    "60m": (512, 1376, 8, 8),
    "130m": (768, 2048, 12, 12),
    "350m": (1024, 2736, 16, 24),
    "1b": (2048, 5461, 32, 24),
    "7b": (4096, 11008, 32, 32),
}


@dataclasses.dataclass(frozen=True, slots=True)
class LlamaConfig:
  """Sizes and numerics of a LLaMA decoder. Derived sizes are properties."""

  vocab_size: int = 32000
  d_model: int = 512
  d_ff: int = 1376
  num_heads: int = 8
  num_kv_heads: int = 8
  num_layers: int = 8
  max_seq_len: int = 256
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  head_dim_override: int | None = None  # per-head width when not d_model // num_heads
  tie_embeddings: bool = False  # the LM head is the input embedding, transposed
  # RoPE frequencies: `default`, or `llama3` (LLaMA-3.1/3.2): wavelengths longer than
  # rope_original_max_len / rope_low_freq_factor are stretched by rope_factor, those
  # shorter than rope_original_max_len / rope_high_freq_factor are kept, and those in
  # between interpolated. The four rope_* fields below are read only by `llama3`.
  rope_type: str = "default"
  rope_factor: float = 8.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  init_std: float = 0.02
  dtype: str = "float32"        # activations and matmul inputs
  param_dtype: str = "float32"  # stored weights
  scan_layers: bool = False     # stack the blocks on a leading `layers` axis and lax.scan
  remat: str = "none"           # none | full | dots (jax.checkpoint policy per block)
  # VeLoRA (models/velora.py): the projections whose weight gradient uses rank-1
  # sub-token projections of their input (names from VELORA_LAYERS, e.g. ("v", "down")),
  # the number of sub-tokens per token for each, and the weight-gradient scale.
  velora_layers: tuple[str, ...] = ()
  velora_groups: tuple[int, ...] = ()
  velora_scale: float = 1.0

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "d_ff", "num_heads", "num_kv_heads",
                 "num_layers", "max_seq_len"):
      if getattr(self, name) <= 0:
        raise ValueError(f"`{name}` must be positive, got {getattr(self, name)}")
    if self.head_dim_override is not None and self.head_dim_override <= 0:
      raise ValueError(f"`head_dim_override` must be positive or None, got "
                       f"{self.head_dim_override}")
    if self.head_dim_override is None and self.d_model % self.num_heads:
      raise ValueError(f"`d_model` ({self.d_model}) must be divisible by `num_heads` "
                       f"({self.num_heads})")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"`num_heads` ({self.num_heads}) must be divisible by "
                       f"`num_kv_heads` ({self.num_kv_heads})")
    if self.head_dim % 2:
      raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"`rope_type` must be one of {ROPE_TYPES}, got {self.rope_type!r}")
    if self.rope_type == "llama3" and not (
        self.rope_factor > 0 and self.rope_original_max_len > 0
        and 0 < self.rope_low_freq_factor < self.rope_high_freq_factor):
      raise ValueError("`rope_type='llama3'` needs rope_factor > 0, rope_original_max_len > 0 "
                       "and 0 < rope_low_freq_factor < rope_high_freq_factor, got "
                       f"{self.rope_factor}, {self.rope_original_max_len}, "
                       f"{self.rope_low_freq_factor}, {self.rope_high_freq_factor}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"`remat` must be one of {REMAT_POLICIES}, got {self.remat!r}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"`{name}` must be one of {DTYPES}, got {getattr(self, name)!r}")
    self._check_velora()

  def _check_velora(self):
    layers, groups = tuple(self.velora_layers), tuple(self.velora_groups)
    object.__setattr__(self, "velora_layers", layers)  # lists (from JSON) → tuples
    object.__setattr__(self, "velora_groups", groups)
    unknown = [name for name in layers if name not in VELORA_LAYERS]
    if unknown or len(set(layers)) != len(layers):
      raise ValueError(f"`velora_layers` must be distinct names from {VELORA_LAYERS}, "
                       f"got {layers}")
    if len(groups) != len(layers):
      raise ValueError(f"`velora_groups` needs one group count per entry of "
                       f"`velora_layers` {layers}, got {groups}")
    for name, g in zip(layers, groups):
      width = self.velora_in_features(name)
      if not isinstance(g, int) or g <= 0 or width % g:
        raise ValueError(f"`velora_groups` for {name!r} must be a positive divisor of its "
                         f"input width {width}, got {g!r}")
    if not self.velora_scale > 0:
      raise ValueError(f"`velora_scale` must be positive, got {self.velora_scale}")

  def velora_in_features(self, name: str) -> int:
    """The input width of projection `name` (one of VELORA_LAYERS)."""
    if name == "o":
      return self.num_heads * self.head_dim
    return self.d_ff if name == "down" else self.d_model

  def velora_groups_of(self, name: str) -> int | None:
    """VeLoRA's group count for projection `name`, or None where VeLoRA is off."""
    if name not in self.velora_layers:
      return None
    return self.velora_groups[self.velora_layers.index(name)]

  @property
  def head_dim(self) -> int:
    if self.head_dim_override is not None:
      return self.head_dim_override
    return self.d_model // self.num_heads

  @property
  def num_groups(self) -> int:
    """Query heads per key/value head (1 = multi-head, num_heads = multi-query)."""
    return self.num_heads // self.num_kv_heads

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def jnp_param_dtype(self):
    return jnp.dtype(self.param_dtype)

  def replace(self, **changes: Any) -> "LlamaConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def tiny(cls, **overrides: Any) -> "LlamaConfig":
    """A CPU-sized model over the byte vocabulary (about 0.9M parameters)."""
    base = dict(vocab_size=BYTE_VOCAB_SIZE, d_model=128, d_ff=352, num_heads=4,
                num_kv_heads=2, num_layers=4, max_seq_len=256)
    return cls(**{**base, **overrides})

  @classmethod
  def preset(cls, name: str, **overrides: Any) -> "LlamaConfig":
    """`tiny`, `60m`, `130m`, `350m`, `1b` or `7b`, with optional field overrides."""
    if name == "tiny":
      return cls.tiny(**overrides)
    if name not in _PRESETS:
      raise ValueError(f"unknown model size {name!r}; choose from {', '.join(PRESETS)}")
    d, f, h, n = _PRESETS[name]
    base = dict(vocab_size=32000, d_model=d, d_ff=f, num_heads=h, num_kv_heads=h,
                num_layers=n, max_seq_len=256)
    return cls(**{**base, **overrides})


PRESETS = ("tiny",) + tuple(_PRESETS)
