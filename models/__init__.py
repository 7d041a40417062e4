"""Flax NNX LLaMA used by the trainer and the benchmarks (not part of the installed library)."""

from models.config import LlamaConfig
from models.hf import from_pretrained, save_pretrained
from models.llama import Llama
from models.lowrank import lowrank_spec

__all__ = ["LlamaConfig", "Llama", "from_pretrained", "lowrank_spec", "save_pretrained"]
