"""Train-step activation memory with and without VeLoRA, from the compiled memory analysis.

For the GaLore paper's LLaMA 60M and 1B shapes (``models.LlamaConfig.preset``), the
trainer's train step (``train.steps.make_train_step`` with ``optax.adamw``, state donated)
is lowered on abstract inputs (``jax.eval_shape`` of the init; nothing is allocated) and
compiled, and ``compiled.memory_analysis().temp_size_in_bytes`` (XLA's buffer
assignment: every intermediate of the step, packed by liveness) is read for the plain
model and for VeLoRA on the value projection, the down projection and both (the
authors' ``vd``), without and with full remat (``jax.checkpoint`` per block). The
arguments (parameters, optimizer state, tokens) are the same for every variant; only the
temporaries differ.

VeLoRA groups: 60M as the authors' script (``--num_groups 64,86``: 8 features per value
sub-token, 16 per down sub-token); 1B the same 8 features per value sub-token (256
groups) and 43 per down sub-token (127 groups: d_ff = 5461 = 43 · 127).

    nice python benchmarks/activation_memory.py --out benchmarks/results/activation_memory.json

Each row also gives ``expected``: what the residual of the VeLoRA layers alone would
save if the layer's input had no other use in the backward pass,
``layers · tokens · (D - G) · bytes`` per VeLoRA projection.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models.config import LlamaConfig  # noqa: E402
from train import steps  # noqa: E402

GROUPS = {"60m": {"v": 64, "down": 86}, "1b": {"v": 256, "down": 127}}
VARIANTS = {"plain": (), "v": ("v",), "down": ("down",), "v+down": ("v", "down")}


def config(size: str, layers: tuple[str, ...], remat: str, seq_len: int) -> LlamaConfig:
  groups = tuple(GROUPS[size][name] for name in layers)
  return LlamaConfig.preset(size, max_seq_len=seq_len, scan_layers=True, remat=remat,
                            velora_layers=layers, velora_groups=groups)


def temp_bytes(cfg: LlamaConfig, batch: int) -> dict:
  """Compiles the train step on abstract inputs; its memory analysis in bytes."""
  tx = optax.adamw(1e-3)
  graphdef, _ = steps.abstract_model(cfg)
  state = jax.eval_shape(steps.make_init_fn(cfg, tx), jax.random.key(0))
  tokens = jax.ShapeDtypeStruct((1, batch, cfg.max_seq_len + 1), jnp.int32)
  start = time.perf_counter()
  compiled = jax.jit(steps.make_train_step(graphdef, tx), donate_argnums=0).lower(
      state, tokens).compile()
  mem = compiled.memory_analysis()
  return {"temp_bytes": int(mem.temp_size_in_bytes),
          "argument_bytes": int(mem.argument_size_in_bytes),
          "compile_s": round(time.perf_counter() - start, 1)}


def expected_saving(cfg: LlamaConfig, layers, batch: int) -> int:
  tokens = batch * cfg.max_seq_len
  itemsize = jnp.dtype(cfg.dtype).itemsize
  return sum(cfg.num_layers * tokens * itemsize
             * (cfg.velora_in_features(name) - cfg.velora_groups_of(name)) for name in layers)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sizes", default="60m,1b")
  p.add_argument("--batch", type=int, default=16, help="sequences per step")
  p.add_argument("--seq-len", type=int, default=256)
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--remat", default="none,full")
  p.add_argument("--out", default=None, help="JSON file of the rows")
  args = p.parse_args(argv)
  rows = []
  for size in args.sizes.split(","):
    for remat in args.remat.split(","):
      base = None
      for name in args.variants.split(","):
        cfg = config(size, VARIANTS[name], remat, args.seq_len)
        row = {"size": size, "remat": remat, "velora": name, "batch": args.batch,
               "seq_len": args.seq_len, **temp_bytes(cfg, args.batch)}
        base = row["temp_bytes"] if name == "plain" else base
        if base is not None:
          row["saved_bytes"] = base - row["temp_bytes"]
        row["expected_bytes"] = expected_saving(cfg, VARIANTS[name], args.batch)
        rows.append(row)
        mib = lambda n: f"{n / 2**20:10.1f}"
        print(f"{size:4} remat={remat:4} velora={name:7} temp {mib(row['temp_bytes'])} MiB"
              f"  saved {mib(row.get('saved_bytes', 0))} MiB  (residual alone: "
              f"{mib(row['expected_bytes'])} MiB)  compile {row['compile_s']} s", flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"device": jax.devices()[0].device_kind, "platform": platform.platform(),
                 "jax": jax.__version__, "rows": rows}, f, indent=1)
  return rows


if __name__ == "__main__":
  main()
