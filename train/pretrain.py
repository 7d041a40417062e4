"""Pretrain a LLaMA with any registered optimizer (AdamW, GaLore, ...).

    python -m train.pretrain --model tiny --optimizer galore --steps 300 --out runs/tiny

Setup follows MaxText: mesh → abstract state (`jax.eval_shape`) → logical specs → mesh
shardings → `jax.jit(init, out_shardings)` (or an Orbax restore into the same abstract
state) → `jax.jit(step, in/out shardings, donated state)` → `lower().compile()` with its
memory analysis → loop. Flags may also come from `--config file.json` (keys are flag
names); the command line wins. Bad flags fail with one line before anything compiles.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import shutil
import time
from typing import Sequence

from models.config import PRESETS, REMAT_POLICIES, LlamaConfig


def _rank(text: str) -> int | float:
  """`128` (an int rank) or `0.25` (a fraction of the smaller matrix dimension)."""
  value = float(text)
  fraction = "." in text or (math.isfinite(value) and value != int(value))
  if not math.isfinite(value) or value <= 0 or (fraction and value >= 1):
    raise argparse.ArgumentTypeError(f"expected a positive int or a fraction in (0, 1), "
                                     f"got {text!r}")
  return value if fraction else int(value)


def _opt_args(text: str) -> dict:
  """`density=0.5,projector='random'` → {"density": 0.5, "projector": "random"}."""
  out = {}
  for item in filter(None, text.split(",")):
    key, sep, value = item.partition("=")
    if not sep or not key.strip().isidentifier():
      raise argparse.ArgumentTypeError(f"expected K=V pairs separated by commas, got {item!r}")
    try:
      out[key.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      out[key.strip()] = value.strip()  # a bare word is a string
  return out


def _names(text: str) -> tuple[str, ...]:
  """`v,down` → ("v", "down")."""
  return tuple(name.strip() for name in text.split(",") if name.strip())


def _ints(text: str) -> tuple[int, ...]:
  """`16,22` → (16, 22)."""
  try:
    return tuple(int(item) for item in text.split(",") if item.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}")


def model_config(args, **overrides) -> LlamaConfig:
  """The model's config from the model flags (and `overrides`, e.g. the data's vocab)."""
  return LlamaConfig.preset(args.model, scan_layers=args.scan_layers, remat=args.remat,
                            dtype=args.dtype, param_dtype=args.param_dtype,
                            velora_layers=tuple(args.velora),
                            velora_groups=tuple(args.velora_groups),
                            velora_scale=args.velora_scale, **overrides)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m train.pretrain", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  add = p.add_argument
  add("--config", default=None, help="JSON file of flag values (command line wins)")
  g = p.add_argument_group("model")
  g.add_argument("--model", default="tiny", help=f"size: {', '.join(PRESETS)}")
  g.add_argument("--seq-len", type=int, default=None, help="context (default: preset's)")
  g.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=False)
  g.add_argument("--remat", default="none", help=f"one of {', '.join(REMAT_POLICIES)}")
  g.add_argument("--dtype", default="float32", help="activation dtype: float32, bfloat16")
  g.add_argument("--param-dtype", default="float32")
  g.add_argument("--velora", type=_names, default=(), metavar="LAYER,...",
                 help="VeLoRA on these projections (q,k,v,o,gate,up,down; the authors use "
                 "v,down): their weight gradients from rank-1 sub-token projections of the "
                 "inputs, which are all the backward pass keeps of them")
  g.add_argument("--velora-groups", type=_ints, default=(), metavar="G,...",
                 help="sub-tokens per token, one count per --velora layer (each divides "
                 "that layer's input width), e.g. 16,22 for v,down on tiny")
  g.add_argument("--velora-scale", type=float, default=1.0,
                 help="multiplies the VeLoRA weight gradients")
  g.add_argument("--weight-quant", default="none",
                 help="int8: store the projected matrices as int8 blocks of 256, rounded "
                 "stochastically after each update (Q-GaLore's weights); none: as "
                 "--param-dtype")
  g = p.add_argument_group("optimizer")
  g.add_argument("--optimizer", default="adamw")
  g.add_argument("--lr", type=float, default=1e-3)
  g.add_argument("--warmup", type=float, default=0.1, help="warmup fraction of --steps")
  g.add_argument("--final-lr-fraction", type=float, default=0.1)
  g.add_argument("--weight-decay", type=float, default=0.0)
  g.add_argument("--b1", type=float, default=None, help="default: the optimizer's")
  g.add_argument("--b2", type=float, default=None, help="default: the optimizer's")
  g.add_argument("--eps", type=float, default=None, help="default: the optimizer's")
  g.add_argument("--clip", type=float, default=1.0, help="global-norm clip (0: off)")
  g.add_argument("--rank", type=_rank, default=None,
                 help="low-rank: int or fraction (default: the optimizer's)")
  g.add_argument("--update-proj-gap", type=int, default=None,
                 help="steps between subspace refreshes (default: the optimizer's)")
  g.add_argument("--scale", type=float, default=None, help="default: the optimizer's")
  g.add_argument("--proj-type", default=None, help="default: the optimizer's")
  g.add_argument("--opt-args", type=_opt_args, default={}, metavar="K=V,...",
                 help="more keyword arguments of the optimizer, e.g. density=0.5")
  g = p.add_argument_group("run")
  g.add_argument("--steps", type=int, default=1000)
  g.add_argument("--batch-size", type=int, default=32, help="global sequences per step")
  g.add_argument("--micro-batches", type=int, default=1, help="gradient accumulation")
  g.add_argument("--accumulate", choices=("auto", "subspace", "full"), default="auto",
                 help="where micro-batch gradients are summed: in each projected leaf's "
                 "subspace (optax_lowrank.MultiSteps), or at full size; auto: the subspace "
                 "when the optimizer allows it")
  g.add_argument("--eval-every", type=int, default=100)
  g.add_argument("--eval-batches", type=int, default=8)
  g.add_argument("--eval-batch-size", type=int, default=None, help="default: micro-batch")
  g.add_argument("--mesh", default="data=1,fsdp=-1,tensor=1",
                 help="data=D,fsdp=F,tensor=T; one size may be -1 (remaining devices)")
  g.add_argument("--shard-mode", choices=("explicit", "auto"), default="explicit",
                 help="mesh axis types: explicit (shardings in the types) or auto (the "
                 "compiler propagates them; MaxText's default)")
  g.add_argument("--seed", type=int, default=0)
  g.add_argument("--out", default="runs/latest", help="run directory")
  g.add_argument("--ckpt-dir", default=None, help="Orbax checkpoints; resumes from latest")
  g.add_argument("--ckpt-every", type=int, default=1000)
  g.add_argument("--keep", type=int, default=3, help="checkpoints kept")
  g.add_argument("--stop-at", type=int, default=None,
                 help="checkpoint and exit at this step, as on SIGTERM (time-sliced jobs)")
  g = p.add_argument_group("faults")
  g.add_argument("--max-nonfinite-steps", type=int, default=5,
                 help="stop after this many consecutive steps with a non-finite loss or "
                 "gradient (each one's update is skipped)")
  g.add_argument("--skip-spikes", action=argparse.BooleanOptionalAction, default=False,
                 help="also skip a step whose loss or gradient norm exceeds the mean of the "
                 "last --spike-window steps by --spike-factor standard deviations "
                 "(MaxText's skip_step_on_spikes)")
  g.add_argument("--spike-window", type=int, default=128, help="steps in the window")
  g.add_argument("--spike-factor", type=float, default=6.0, help="standard deviations")
  g = p.add_argument_group("data")
  g.add_argument("--data", default=None, help=".txt, .jsonl (field text) or .bin tokens; "
                 "default: the Python standard library's sources + pydoc topics")
  g.add_argument("--data-dtype", default="uint16", help="token dtype of .bin files")
  g.add_argument("--vocab-size", type=int, default=None, help=".bin data: model vocab")
  g.add_argument("--tokenizer", default=None, help="tokenizer.json (needs `tokenizers`)")
  g.add_argument("--corpus-bytes", type=int, default=None, help="cap of the default corpus")
  g.add_argument("--val-fraction", type=float, default=0.05)
  return p


def parse_args(argv: Sequence[str] | None = None, num_devices: int | None = None):
  """Parses and validates flags; every error names its flag (argparse exits with 2)."""
  from train import optimizers, validate, weight_quant
  from models import sharding as shd
  parser = build_parser()
  pre, _ = parser.parse_known_args(argv)
  if pre.config:
    if not os.path.isfile(pre.config):
      parser.error(f"--config: file not found: {pre.config}")
    try:
      with open(pre.config) as f:
        values = json.load(f)
    except json.JSONDecodeError as e:
      parser.error(f"--config: {pre.config}:{e.lineno}: invalid JSON ({e.msg}, column "
                   f"{e.colno})")
    except (OSError, UnicodeDecodeError) as e:
      parser.error(f"--config: cannot read {pre.config}: {e}")
    if not isinstance(values, dict):
      parser.error(f"--config: {pre.config} must hold a JSON object of flag names")
    values = {k.replace("-", "_"): v for k, v in values.items()}
    known = {a.dest for a in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
      parser.error(f"--config: unknown keys {unknown}")
    parser.set_defaults(**values)
  args = parser.parse_args(argv)
  error = parser.error
  if args.model not in PRESETS:
    error(f"--model: unknown size {args.model!r}; choose from {', '.join(PRESETS)}")
  names = optimizers.available()
  if args.optimizer not in names:
    error(f"--optimizer: unknown {args.optimizer!r}; choose from {', '.join(sorted(names))}")
  if args.remat not in REMAT_POLICIES:
    error(f"--remat: unknown {args.remat!r}; choose from {', '.join(REMAT_POLICIES)}")
  if args.weight_quant not in weight_quant.MODES:
    error(f"--weight-quant: unknown {args.weight_quant!r}; choose from "
          f"{', '.join(weight_quant.MODES)}")
  for flag in ("dtype", "param_dtype"):
    if getattr(args, flag) not in ("float32", "bfloat16", "float16"):
      error(f"--{flag.replace('_', '-')}: choose from float32, bfloat16, float16")
  if args.data_dtype not in ("uint16", "uint32"):
    error(f"--data-dtype: choose from uint16, uint32, got {args.data_dtype!r}")
  validate.check(args, error)
  if args.velora or args.velora_groups:
    try:
      model_config(args)
    except ValueError as e:
      error(f"--velora: {e}")
  if num_devices is None:
    import jax
    num_devices = jax.device_count()
  try:
    args.mesh_shape = shd.parse_mesh(args.mesh, num_devices)
  except ValueError as e:
    error(f"--mesh: {e}")
  shards = args.mesh_shape["data"] * args.mesh_shape["fsdp"]
  if args.batch_size % args.micro_batches:
    error(f"--batch-size ({args.batch_size}) must be divisible by --micro-batches "
          f"({args.micro_batches})")
  micro = args.batch_size // args.micro_batches
  if micro % shards:
    error(f"--batch-size: each micro-batch ({micro} sequences) must be divisible by the "
          f"mesh's data*fsdp = {shards} (see --mesh, --micro-batches)")
  args.eval_batch_size = args.eval_batch_size or micro
  if args.eval_batch_size % shards:
    error(f"--eval-batch-size ({args.eval_batch_size}) must be divisible by data*fsdp = "
          f"{shards}")
  context = LlamaConfig.preset(args.model).max_seq_len
  args.seq_len = context if args.seq_len is None else args.seq_len
  if not 0 < args.seq_len <= context:
    error(f"--seq-len: must be in [1, {context}] for --model {args.model}")
  return args


def maybe_initialize_distributed() -> None:
  """`jax.distributed.initialize()` when launched as one of several processes."""
  env = os.environ
  multi = (env.get("JAX_COORDINATOR_ADDRESS")
           or int(env.get("SLURM_NTASKS", "1")) > 1
           or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
           or len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1)
  if multi:
    import jax
    jax.distributed.initialize()


def _mib(n) -> str:
  return f"{(n or 0) / 2**20:,.1f} MiB"


def fail(message: str):
  """Ends the program with one line on stderr and exit code 1."""
  raise SystemExit(f"python -m train.pretrain: error: {message}")


class MetricsLog:
  """metrics.jsonl in the run dir; a resumed run first drops records past its step, and
  unreadable lines (a write torn by a kill or a full disk), saying so. The kept lines are
  rewritten to a temporary file that then replaces the log. Only the lead process writes
  (`enabled`); a failed write ends the run with one line naming the file."""

  def __init__(self, path: str, resume_step: int | None, enabled: bool = True,
               say=print):
    self.path = path if enabled else os.devnull
    kept, torn = [], []
    if resume_step is not None and enabled and os.path.exists(path):
      with open(path, errors="replace") as f:
        for number, line in enumerate(f, 1):
          if not line.strip():
            continue
          try:
            record = json.loads(line)
            step = record["step"]
          except (json.JSONDecodeError, TypeError, KeyError):
            torn.append(number)
            continue
          if step <= resume_step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if torn:
      say(f"{path}: dropped {len(torn)} unreadable line(s) (line {', '.join(map(str, torn))}"
          "; a torn write?)")
    try:
      if enabled:
        with open(path + ".tmp", "w") as f:
          f.writelines(kept)
        os.replace(path + ".tmp", path)
      self._file = open(self.path, "a")
    except OSError as e:
      fail(f"--out: cannot write {e.filename or path}: {e.strerror or e}")

  def write(self, record: dict) -> None:
    try:
      self._file.write(json.dumps(record) + "\n")
      self._file.flush()
    except OSError as e:
      fail(f"--out: cannot write {self.path}: {e.strerror or e}")

  def close(self) -> None:
    try:
      self._file.close()
    except OSError as e:
      fail(f"--out: cannot write {self.path}: {e.strerror or e}")


def _write_json(path: str, value) -> None:
  try:
    with open(path, "w") as f:
      json.dump(value, f, indent=2, default=str)
  except OSError as e:
    fail(f"--out: cannot write {path}: {e.strerror or e}")


def main(argv: Sequence[str] | None = None) -> dict:
  maybe_initialize_distributed()
  args = parse_args(argv)

  import jax
  import numpy as np
  from flax import nnx
  from tqdm import tqdm
  from models import sharding as shd
  from models.lowrank import lowrank_spec, pure_dict
  from train import data, faults, optimizers, steps, validate, weight_quant
  from train.plot import plot_runs

  refused = optimizers.refused_flags(args.optimizer, args)
  if refused:  # the flags' fit to the optimizer (its signature), before anything loads
    fail(f"--optimizer {args.optimizer}: {refused}")
  lead = jax.process_index() == 0
  say = print if lead else (lambda *a, **k: None)
  ckpt = resume = None
  flags = validate.flags_of(args)
  if args.ckpt_dir:
    from train.checkpoint import Checkpointer, ResumeError, SaveError
    ckpt = Checkpointer(args.ckpt_dir, keep=args.keep, every=args.ckpt_every, lead=lead)
    try:  # the newest intact step, its flags compared with this run's
      resume = ckpt.resume_step(flags, say)
    except ResumeError as e:
      fail(str(e))
  tokenizer = data.BPETokenizer(args.tokenizer) if args.tokenizer else None
  try:
    corpus = data.load_corpus(args.data, tokenizer=tokenizer, data_dtype=args.data_dtype,
                              val_fraction=args.val_fraction, vocab_size=args.vocab_size,
                              max_bytes=args.corpus_bytes or data.DEFAULT_CORPUS_BYTES)
  except data.DataError as e:
    fail(f"--data: {e}")
  need = args.seq_len + 1
  if len(corpus.train) <= need:
    fail(f"--data: the training split has {len(corpus.train)} tokens, too few for "
         f"--seq-len {args.seq_len}")
  if len(corpus.val) <= need:
    fail(f"--val-fraction {args.val_fraction}: the validation split has "
         f"{len(corpus.val)} tokens, too few for --seq-len {args.seq_len} (raise "
         "--val-fraction, or give more --data)")
  top = int(max(corpus.train.max(), corpus.val.max()))
  if top >= corpus.vocab_size:
    fail(f"--vocab-size: the data has token id {top}, so the vocabulary needs "
         f"at least {top + 1} entries (got {corpus.vocab_size})")
  cfg = model_config(args, vocab_size=corpus.vocab_size, max_seq_len=args.seq_len)
  baseline = data.unigram_entropy(corpus.val, corpus.vocab_size)
  say(f"data: {corpus.description}; train {len(corpus.train):,} / validation "
      f"{len(corpus.val):,} tokens")
  say(f"unigram baseline on validation: loss {baseline:.4f}, perplexity "
      f"{data.perplexity(baseline):.2f}")

  # mesh → abstract state → logical specs → shardings
  mesh = shd.make_mesh(args.mesh_shape, explicit=args.shard_mode == "explicit")
  schedule = optimizers.make_schedule(args.lr, args.steps, args.warmup, args.final_lr_fraction)
  graphdef, abstract = steps.abstract_model(cfg)
  # VeLoRA changes only the backward pass: evaluation runs the plain model.
  eval_graphdef = steps.abstract_model(cfg.replace(velora_layers=(), velora_groups=()))[0]
  abstract_params = pure_dict(nnx.state(abstract, nnx.Param))
  mask, dims = lowrank_spec(abstract_params, cfg)
  if isinstance(args.rank, int):
    sides = [min(x.shape[-2:]) for x, m in zip(jax.tree.leaves(abstract_params),
                                               jax.tree.leaves(mask)) if m]
    if sides and max(sides) <= args.rank:
      fail(f"--rank {args.rank}: no projected matrix of --model {args.model} has a smaller "
           f"side above it (the largest is {max(sides)}), so nothing would be projected")
  guard = faults.Guard(args.spike_factor if args.skip_spikes else None, args.spike_window)
  try:  # bad optimizer arguments surface here, as one line naming the parameter
    tx = optimizers.build(args.optimizer, args, schedule, mask, dims)
    with shd.set_mesh(mesh):
      accumulating = optimizers.build_accumulating(
          args.optimizer, args, schedule, mask, dims, abstract_params)
    if accumulating is not None:
      tx = accumulating
    weights = (weight_quant.Int8Weights(mask, seed=args.seed)
               if args.weight_quant == "int8" else None)
    init, abstract_state, shardings, _ = steps.state_shardings(
        cfg, tx, mesh, store=weights.store if weights else None, guard=guard)
  except ValueError as e:
    fail(f"--optimizer {args.optimizer}: {e}")
  sizes = jax.tree.leaves(jax.tree.map(lambda x: x.size, abstract_params))
  projected = sum(x.size for x, m in zip(jax.tree.leaves(abstract_params),
                                         jax.tree.leaves(mask)) if m)
  say(f"model {args.model}: {sum(sizes):,} parameters ({projected:,} in projected "
      f"matrices), d={cfg.d_model} layers={cfg.num_layers} vocab={cfg.vocab_size} "
      f"context={cfg.max_seq_len}; mesh {dict(args.mesh_shape)} ({args.shard_mode}) on "
      f"{jax.device_count()} {jax.devices()[0].platform} devices")
  param_bytes = weight_quant.nbytes(abstract_state["params"])
  if weights:
    say(f"int8 weights (projected matrices, blocks of {weights.block_size}, stochastic "
        f"rounding): parameters stored in {_mib(param_bytes)} instead of "
        f"{_mib(weight_quant.nbytes(abstract_params))}")
  if args.micro_batches > 1:
    say(f"gradient accumulation over {args.micro_batches} micro-batches: "
        + ("full size" if accumulating is None else
           "in the subspace (projected leaves), each micro-batch clipped"
           if args.clip else "in the subspace (projected leaves)"))
  if ckpt:
    need_bytes = weight_quant.nbytes(abstract_state)
    free = shutil.disk_usage(ckpt.directory).free
    if free < need_bytes:
      fail(f"--ckpt-dir: {_mib(free)} free on its device, but a checkpoint of this run "
           f"takes about {_mib(need_bytes)}")

  os.makedirs(args.out, exist_ok=True)
  batch_sharding = steps.batch_sharding(mesh)
  eval_sharding = steps.batch_sharding(mesh, micro_batched=False)

  with shd.set_mesh(mesh):
    if resume is not None:
      try:
        state, resume = ckpt.restore_fitting(
            abstract_state, resume, flags, say,
            health=lambda: jax.device_put(guard.init(), shardings["health"]))
      except ResumeError as e:
        fail(str(e))
      say(f"resumed from {args.ckpt_dir} at step {resume}")
    else:
      state = jax.jit(init, out_shardings=shardings)(jax.random.key(args.seed))
    if lead:
      _write_json(os.path.join(args.out, "config.json"),
                  {"args": vars(args), "model": cfg.to_dict(), "unigram_baseline": baseline})
    log = MetricsLog(os.path.join(args.out, "metrics.jsonl"), resume, enabled=lead, say=say)
    micro = args.batch_size // args.micro_batches
    batch_shape = (args.micro_batches, micro, args.seq_len + 1)
    abstract_batch = jax.ShapeDtypeStruct(batch_shape, np.int32, sharding=batch_sharding)
    make_step = (steps.make_train_step(graphdef, tx, schedule, guard) if accumulating is None
                 else steps.make_subspace_train_step(graphdef, tx, schedule, args.clip, guard))
    eval_fn = steps.make_eval_step(eval_graphdef)
    if weights:
      make_step, eval_fn = weights.wrap_step(make_step), weights.wrap_eval(eval_fn)
    train_step = jax.jit(make_step,
                         in_shardings=(shardings, batch_sharding),
                         out_shardings=(shardings, None), donate_argnums=0)
    compiled = train_step.lower(abstract_state, abstract_batch).compile()
    mem = compiled.memory_analysis()
    if mem is not None:
      say(f"train step memory per device: arguments {_mib(mem.argument_size_in_bytes)}, "
          f"outputs {_mib(mem.output_size_in_bytes)} (aliased "
          f"{_mib(mem.alias_size_in_bytes)}), temporaries {_mib(mem.temp_size_in_bytes)}")
    eval_step = jax.jit(eval_fn, in_shardings=(shardings["params"], eval_sharding))
    finite = jax.jit(faults.all_finite)

    def put(batch, sharding):
      return jax.make_array_from_callback(batch.shape, sharding, lambda idx: batch[idx])

    def evaluate(params) -> tuple[float, float]:
      total = count = 0.0
      for j in range(args.eval_batches):
        tokens = data.eval_batch(corpus.val, j, args.eval_batch_size, args.seq_len)
        s, n = eval_step(params, put(tokens, eval_sharding))
        total, count = total + float(s), count + float(n)
      loss = total / count
      return loss, data.perplexity(loss)

    start = int(jax.device_get(state["step"]))
    watch = faults.Watch(args.max_nonfinite_steps, start, corpus.vocab_size)
    tokens_per_step = args.batch_size * args.seq_len
    val_loss = val_ppl = None
    bar = tqdm(total=args.steps, initial=start, disable=not lead, dynamic_ncols=True,
               desc=f"{args.optimizer}")
    note = bar.write if lead else (lambda *a, **k: None)
    pending, last_time = None, time.perf_counter()

    def report(step_done: int, metrics) -> None:
      nonlocal last_time
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      now = time.perf_counter()
      dt, last_time = now - last_time, now
      record = {"step": step_done, **metrics, "step_time": dt,
                "tokens_per_s": tokens_per_step / dt}
      log.write(record)
      for line in watch.observe(step_done, metrics):
        note(line)
      if ckpt and watch.healthy:
        ckpt.confirm(step_done)
      bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{tokens_per_step / dt:,.0f}",
                      step_s=f"{dt:.2f}")
      bar.update(1)

    def save(step_done: int) -> bool:
      """Checkpoints a healthy state (its last step finite, every array finite); a save
      that fails (a full disk) is one line, the earlier checkpoints left in place."""
      if not watch.healthy:
        note(f"step {step_done}: checkpoint not saved: the last {watch.streak} step(s) "
             "were not finite")
        return False
      if not bool(finite(state)):
        note(f"step {step_done}: checkpoint not saved: the train state is not finite")
        return False
      try:
        ckpt.save(step_done, state, flags)
      except SaveError as e:
        note(f"warning: {e}")
        return e.step != step_done  # else only the previous save failed
      return True

    step, stop, saved = start, None, True
    with faults.Signals() as signals:
      try:
        while step < args.steps:
          batch = data.sample_batch(corpus.train, args.seed, step, args.batch_size,
                                    args.seq_len).reshape(batch_shape)
          state, metrics = compiled(state, put(batch, batch_sharding))
          if pending is not None:
            report(*pending)
          step += 1
          pending = (step, metrics)
          if step == args.stop_at:
            stop = f"--stop-at {step}"
          if not stop and signals.requested:
            stop = signals.requested
            note(f"{stop}: checkpointing and stopping at step {step}"
                 + (" (Ctrl-C again exits at once, without a checkpoint)"
                    if stop == "SIGINT" else ""))
          due = ckpt is not None and (ckpt.due(step) or stop)
          if step % args.eval_every == 0 or step == args.steps or stop or due:
            report(*pending)
            pending = None
          if watch.diverged:
            break
          if step % args.eval_every == 0 and step < args.steps:
            val_loss, val_ppl = evaluate(state["params"])
            log.write({"step": step, "val_loss": val_loss, "val_ppl": val_ppl})
            note(f"step {step}: validation loss {val_loss:.4f}, perplexity {val_ppl:.2f}")
          if due:
            saved = save(step)
          if stop:
            break
        if pending is not None:
          report(*pending)
      finally:
        bar.close()
      if watch.diverged:
        _diverged(ckpt, watch, step, log)
      problem = None
      if stop:
        if ckpt and not saved:
          problem = f"stopped ({stop}) at step {step} without a checkpoint (see above)"
      elif not watch.healthy:
        problem = (f"step {step}: the last {watch.streak} step(s) were not finite (updates "
                   "skipped); no final checkpoint")
      else:
        val_loss, val_ppl = evaluate(state["params"])
        log.write({"step": step, "val_loss": val_loss, "val_ppl": val_ppl})
        if not math.isfinite(val_loss):
          problem = f"step {step}: the final validation loss is {val_loss}; no checkpoint"
        elif ckpt and not save(step):
          problem = f"step {step}: the final checkpoint was not saved (see above)"
      close_checkpoints(ckpt, log)
      if problem:
        fail(problem + _last_healthy(ckpt))
      if stop:
        say(f"stopped ({stop}) at step {step}"
            + (f"; checkpoint saved in {args.ckpt_dir}" if ckpt else ""))
        return {"step": step, "interrupted": True}

  plot = os.path.join(args.out, "loss.png")
  if lead:
    plot_runs([args.out], plot, labels=[args.optimizer], baseline=baseline)
  summary = {"step": step, "val_loss": val_loss, "val_ppl": val_ppl,
             "unigram_loss": baseline, "unigram_ppl": data.perplexity(baseline),
             "param_bytes": param_bytes, "plot": plot,
             "skipped_steps": int(jax.device_get(state["health"]["skipped_steps"]))}
  if lead:
    _write_json(os.path.join(args.out, "summary.json"), summary)
  say(f"final validation loss {val_loss:.4f}, perplexity {val_ppl:.2f} "
      f"(unigram baseline: loss {baseline:.4f}, perplexity {data.perplexity(baseline):.2f})")
  say(f"loss curves: {plot}")
  return summary


def close_checkpoints(ckpt, log) -> None:
  """Finishes the pending save (a failure is one line and exit code 1) and the log."""
  log.close()
  if ckpt is None:
    return
  from train.checkpoint import SaveError
  try:
    ckpt.close()
  except SaveError as e:
    fail(str(e))


def _last_healthy(ckpt) -> str:
  if ckpt is None:
    return "; no --ckpt-dir to resume from"
  step = ckpt.latest_step()
  return (f"; last healthy checkpoint: step {step} in {ckpt.directory}" if step is not None
          else f"; no checkpoint in {ckpt.directory}")


def _diverged(ckpt, watch, step, log) -> None:
  """Ends a run whose last `--max-nonfinite-steps` steps were all non-finite. Skipped
  steps leave the state as it was, so these steps all ran from the state of step
  `first_bad - 1`: a checkpoint of that step is moved to `damaged/`."""
  close_checkpoints(ckpt, log)
  moved = ""
  if ckpt is not None and watch.first_bad - 1 in ckpt.steps():
    dest = ckpt.quarantine(watch.first_bad - 1)
    moved = f"; its checkpoint of step {watch.first_bad - 1} was moved to {dest}"
  fail(f"step {step}: {watch.streak} consecutive steps with a non-finite loss or gradient "
       f"(from step {watch.first_bad}; updates skipped): stopped without saving{moved}"
       f"{_last_healthy(ckpt)} (lower --lr?)")


if __name__ == "__main__":
  main()
