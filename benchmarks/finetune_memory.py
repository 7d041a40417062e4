"""Memory of fine-tuning LLaMA-2-7B and LLaMA-3-8B, from `jax.eval_shape` (no run).

    python benchmarks/finetune_memory.py [--out benchmarks/results/finetune_memory.json]

For each model and optimizer this builds exactly what `python -m train.finetune` builds
(`train.loop.Setup`: the registered optimizer with the model's projection mask, global-norm
clipping, the fault guard) and reads the bytes of the abstract train state: weights
(bfloat16), optimizer state, and one gradient the size of the weights (bfloat16), which
the step holds at its peak. Activations depend on batch, length and remat, and are not
counted. The model configurations are the Hugging Face ones (no weights are read).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from models import sharding as shd  # noqa: E402
from models.config import LlamaConfig  # noqa: E402
from train import finetune, loop  # noqa: E402

# config.json of meta-llama/Llama-2-7b-hf and meta-llama/Meta-Llama-3-8B.
MODELS = {
    "llama-2-7b": LlamaConfig(vocab_size=32000, d_model=4096, d_ff=11008, num_heads=32,
                              num_kv_heads=32, num_layers=32, max_seq_len=4096,
                              rope_theta=10000.0, norm_eps=1e-5, param_dtype="bfloat16",
                              dtype="bfloat16", remat="full"),
    "llama-3-8b": LlamaConfig(vocab_size=128256, d_model=4096, d_ff=14336, num_heads=32,
                              num_kv_heads=8, num_layers=32, max_seq_len=8192,
                              rope_theta=500000.0, norm_eps=1e-5, param_dtype="bfloat16",
                              dtype="bfloat16", remat="full"),
}
# name → the optimizer flags of the documented command
OPTIMIZERS = {
    "adamw": [],
    "galore": ["--rank", "128", "--update-proj-gap", "200", "--scale", "0.25"],
    "vlorp": ["--rank", "1", "--update-proj-gap", "200", "--opt-args", "granularity=256"],
}


def _bytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def measure(model: str, optimizer: str) -> dict:
  cfg = MODELS[model]
  args = finetune.build_parser().parse_args(
      ["--init-from", ".", "--data", "-", "--optimizer", optimizer, *OPTIMIZERS[optimizer]])
  args.mesh_shape = {"data": 1, "fsdp": 1, "tensor": 1}
  mesh = shd.make_mesh(args.mesh_shape, devices=jax.devices()[:1])
  setup = loop.Setup(args, cfg, mesh, say=lambda *a: None)
  state = setup.abstract_state
  weights, opt = _bytes(state["params"]), _bytes(state["opt_state"])
  return {"model": model, "optimizer": optimizer, "flags": " ".join(OPTIMIZERS[optimizer]),
          "parameters": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"])),
          "weights_bytes": weights, "gradient_bytes": weights, "optimizer_bytes": opt,
          "total_bytes": 2 * weights + opt}


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                               "finetune_memory.json"))
  args = p.parse_args(argv)
  rows = [measure(m, o) for m in MODELS for o in OPTIMIZERS]
  gib = lambda n: f"{n / 2**30:.2f}"
  print("| model | optimizer | weights (GiB) | gradient (GiB) | optimizer state (GiB) | "
        "total (GiB) |")
  print("| --- | --- | ---: | ---: | ---: | ---: |")
  for r in rows:
    print(f"| {r['model']} | {r['optimizer']} {r['flags']} | {gib(r['weights_bytes'])} | "
          f"{gib(r['gradient_bytes'])} | {gib(r['optimizer_bytes'])} | "
          f"{gib(r['total_bytes'])} |")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(rows, f, indent=2)
  return rows


if __name__ == "__main__":
  main()
