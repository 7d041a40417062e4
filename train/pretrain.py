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
  p.add_argument("--config", default=None, help="JSON file of flag values (command line wins)")
  g = p.add_argument_group("model")
  g.add_argument("--model", default="tiny", help=f"size: {', '.join(PRESETS)}")
  g.add_argument("--seq-len", type=int, default=None, help="context (default: preset's)")
  g.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=False)
  add_numerics_flags(g)
  add_optimizer_flags(p.add_argument_group("optimizer"))
  add_run_flags(p.add_argument_group("run"))
  add_fault_flags(p.add_argument_group("faults"))
  g = p.add_argument_group("data")
  g.add_argument("--data", default=None, help=".txt, .jsonl (field text) or .bin tokens; "
                 "default: the Python standard library's sources + pydoc topics")
  g.add_argument("--data-dtype", default=None,
                 help="token dtype of .bin files: uint16, uint32 (default: the .bin's "
                 "<data>.json from train.tokenize, else uint16)")
  g.add_argument("--vocab-size", type=int, default=None,
                 help=".bin data: model vocab (default: <data>.json's, else the largest "
                 "id + 1; may exceed <data>.json's, not fall below it)")
  g.add_argument("--tokenizer", default=None, help="tokenizer.json (needs `tokenizers`)")
  g.add_argument("--corpus-bytes", type=int, default=None, help="cap of the default corpus")
  g.add_argument("--val-fraction", type=float, default=0.05)
  return p


def add_numerics_flags(g) -> None:
  """--remat, --dtype, --param-dtype, --weight-quant (shared with train.finetune)."""
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


def add_optimizer_flags(g) -> None:
  """The optimizer and its schedule (shared with train.finetune)."""
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


def add_run_flags(g) -> None:
  """Steps, batches, evaluation, mesh, checkpoints (shared with train.finetune)."""
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
  g.add_argument("--dcn-mesh", default="", metavar="AXIS=SIZE,...",
                 help="multislice or multi-host: how many slices (TPU) or hosts (one process "
                 "each) each mesh axis spans over the data-center network, e.g. data=2; "
                 "--mesh then gives each slice's part (MaxText's dcn_*_parallelism)")
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
  g.add_argument("--log-every", type=int, default=10,
                 help="steps between progress lines when stderr is not a terminal (a "
                 "redirected log gets lines instead of the progress bar)")
  g.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=False,
                 help="also write the metrics as TensorBoard scalars in <out>/tensorboard")
  g.add_argument("--profile-steps", type=_ints, default=None, metavar="START,END",
                 help="trace steps START..END (counted from 1) with jax.profiler into "
                 "<out>/profile")
  g.add_argument("--peak-tflops", type=float, default=None,
                 help="each device's peak TFLOP/s for the logged MFU (default: by device "
                 "kind; none known on CPU)")


def add_fault_flags(g) -> None:
  """Non-finite steps and spikes (shared with train.finetune)."""
  g.add_argument("--max-nonfinite-steps", type=int, default=5,
                 help="stop after this many consecutive steps with a non-finite loss or "
                 "gradient (each one's update is skipped)")
  g.add_argument("--skip-spikes", action=argparse.BooleanOptionalAction, default=False,
                 help="also skip a step whose loss or gradient norm exceeds the mean of the "
                 "last --spike-window steps by --spike-factor standard deviations "
                 "(MaxText's skip_step_on_spikes)")
  g.add_argument("--spike-window", type=int, default=128, help="steps in the window")
  g.add_argument("--spike-factor", type=float, default=6.0, help="standard deviations")


def parse_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None):
  """Parses `argv` over the defaults that `--config file.json` sets (the command line
  wins); a bad config file is one line naming it (argparse exits with 2)."""
  pre, _ = parser.parse_known_args(argv)
  if pre.config:
    from train import paths
    config = paths.resolve(pre.config)
    if not config.is_file():
      parser.error(f"--config: file not found: {pre.config}")
    try:
      values = json.loads(config.read_text())
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
  return parser.parse_args(argv)


def check_common(args, error, num_devices: int | None = None) -> None:
  """The checks both programs share: optimizer, numerics, value ranges and files
  (`validate.check`), the mesh, and the batch's fit to it (sets `mesh_shape` and the
  default `eval_batch_size`)."""
  from train import optimizers, validate, weight_quant
  from models import sharding as shd
  names = optimizers.available()
  if args.optimizer not in names:
    error(f"--optimizer: unknown {args.optimizer!r}; choose from {', '.join(sorted(names))}")
  if args.remat not in REMAT_POLICIES:
    error(f"--remat: unknown {args.remat!r}; choose from {', '.join(REMAT_POLICIES)}")
  if args.weight_quant not in weight_quant.MODES:
    error(f"--weight-quant: unknown {args.weight_quant!r}; choose from "
          f"{', '.join(weight_quant.MODES)}")
  for flag in ("dtype", "param_dtype"):
    if getattr(args, flag) not in ("float32", "bfloat16", "float16", None):
      error(f"--{flag.replace('_', '-')}: choose from float32, bfloat16, float16")
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
    args.dcn_shape = shd.parse_dcn_mesh(args.dcn_mesh)
  except ValueError as e:
    error(f"--dcn-mesh: {e}")
  granules = math.prod(args.dcn_shape.values())
  if num_devices % granules:
    error(f"--dcn-mesh: its sizes multiply to {granules}, which does not divide the "
          f"{num_devices} devices")
  try:  # --mesh is each granule's part: dcn × ici sizes multiply to the device count
    ici = shd.parse_mesh(args.mesh, num_devices // granules)
  except ValueError as e:
    error(f"--mesh: {e}" + (f" per slice: --dcn-mesh {args.dcn_mesh} makes {granules} "
                            f"slices (or hosts) of {num_devices // granules}; the --mesh and "
                            f"--dcn-mesh sizes must multiply to {num_devices}"
                            if granules > 1 else ""))
  args.mesh_shape = {k: ici[k] * args.dcn_shape[k] for k in ici}
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


def parse_args(argv: Sequence[str] | None = None, num_devices: int | None = None):
  """Parses and validates flags; every error names its flag (argparse exits with 2)."""
  parser = build_parser()
  args = parse_with_config(parser, argv)
  error = parser.error
  if args.model not in PRESETS:
    error(f"--model: unknown size {args.model!r}; choose from {', '.join(PRESETS)}")
  if args.data is not None and args.data.endswith(".bin"):
    _apply_sidecar(args, error)
  args.data_dtype = args.data_dtype or "uint16"
  if args.data_dtype not in ("uint16", "uint32"):
    error(f"--data-dtype: choose from uint16, uint32, got {args.data_dtype!r}")
  check_common(args, error, num_devices)
  context = LlamaConfig.preset(args.model).max_seq_len
  args.seq_len = context if args.seq_len is None else args.seq_len
  if not 0 < args.seq_len <= context:
    error(f"--seq-len: must be in [1, {context}] for --model {args.model}")
  return args


def distributed_arguments(env) -> dict | None:
  """The keyword arguments of `jax.distributed.initialize` for a process launched with
  the environment `env`, or None when nothing shows other processes.

  JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES and JAX_PROCESS_ID: a launch by hand
  (jax itself reads only the address). Otherwise jax finds everything: an srun step of
  several SLURM tasks, mpirun (Open MPI) with several ranks, TPU workers on GKE.
  """
  if env.get("JAX_COORDINATOR_ADDRESS"):
    kwargs = {"coordinator_address": env["JAX_COORDINATOR_ADDRESS"]}
    for name, var in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
      if env.get(var):
        try:
          kwargs[name] = int(env[var])
        except ValueError:
          raise ValueError(f"{var}: expected an integer, got {env[var]!r}") from None
    return kwargs
  several = lambda var: int(env.get(var) or 1) > 1
  tpu_workers = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
  if (("SLURM_STEP_NODELIST" in env and several("SLURM_NTASKS"))
      or ("OMPI_MCA_orte_hnp_uri" in env and several("OMPI_COMM_WORLD_SIZE"))
      or len(tpu_workers.split(",")) > 1):
    return {}
  return None


def _apply_sidecar(args, error) -> None:
  """--data-dtype, --vocab-size and --tokenizer from what `train.tokenize` wrote beside
  the .bin (`<data>.json`) where the flags leave them unset; a flag that contradicts it
  (another dtype, a smaller vocabulary) is an error naming the flag."""
  from train import data, paths
  try:
    meta = data.read_sidecar(args.data)
  except data.DataError as e:
    error(f"--data: {e}")
  if meta is None:
    return
  where = f"{args.data}.json"
  if args.data_dtype not in (None, meta["dtype"]):
    error(f"--data-dtype: {args.data_dtype}, but {where} says the tokens are "
          f"{meta['dtype']}")
  if args.vocab_size is not None and args.vocab_size < meta["vocab_size"]:
    error(f"--vocab-size: {args.vocab_size} is below the vocabulary of the tokenizer that "
          f"wrote --data ({meta['vocab_size']}, per {where})")
  args.data_dtype = meta["dtype"]
  args.vocab_size = args.vocab_size or meta["vocab_size"]
  if args.tokenizer is None and meta.get("tokenizer") not in (None, "bytes"):
    if not paths.resolve(meta["tokenizer"]).is_file():
      error(f"--tokenizer: {where} names {meta['tokenizer']}, which is not found; pass "
            "--tokenizer with its tokenizer.json")
    args.tokenizer = meta["tokenizer"]  # so that fine-tuning from the run uses it too


def maybe_initialize_distributed() -> None:
  """`jax.distributed.initialize` when launched as one of several processes (see
  `distributed_arguments`), and on a Cloud TPU VM, where the TPU runtime joins a pod
  slice's hosts by itself and the call, which finds them from the metadata server, adds
  the coordination service that multi-host checkpointing uses (as MaxText does)."""
  import jax
  try:
    kwargs = distributed_arguments(os.environ)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None
  if kwargs is not None:
    jax.distributed.initialize(**kwargs)
    return
  try:  # set by `import jax` on a Cloud TPU VM (TPU chips and libtpu)
    from jax._src.cloud_tpu_init import running_in_cloud_tpu_vm
  except ImportError:
    running_in_cloud_tpu_vm = False
  if running_in_cloud_tpu_vm:
    try:
      jax.distributed.initialize()
    except (OSError, RuntimeError, ValueError) as e:  # e.g. no GCE metadata server
      why = (str(e).splitlines() or [type(e).__name__])[0]
      print(f"jax.distributed.initialize() failed on this TPU VM ({why}); going on with "
            "the TPU runtime alone")


def build_mesh(args, say=print):
  """The device mesh of `--mesh` and `--dcn-mesh` (a hybrid one across several slices or
  hosts, which `say` names); a mismatch with the slices raises `train.loop.RunError`
  naming the flag."""
  import jax
  from models import sharding as shd
  from train.loop import RunError
  granules = math.prod(args.dcn_shape.values())
  try:
    mesh = shd.make_mesh(args.mesh_shape, explicit=args.shard_mode == "explicit",
                         dcn=args.dcn_shape)
    granule = shd.granule_attribute(jax.devices(), granules)
  except ValueError as e:
    raise RunError(f"--dcn-mesh {args.dcn_mesh}: {e}") from None
  if granules > 1:
    part = {k: v // args.dcn_shape[k] for k, v in args.mesh_shape.items()}
    units = {"slice_index": "slices", "process_index": "processes"}.get(granule)
    say(f"--dcn-mesh {args.dcn_mesh}: " + (
        f"a hybrid mesh over {granules} {units}, each holding {part}" if units else
        f"one slice, and not {granules} processes: the plain mesh of these sizes"))
  return mesh


def fail(message: str):
  """Ends the program with one line on stderr and exit code 1."""
  raise SystemExit(f"python -m train.pretrain: error: {message}")


def main(argv: Sequence[str] | None = None) -> dict:
  from train.loop import RunError
  maybe_initialize_distributed()
  args = parse_args(argv)
  try:
    return run(args)
  except RunError as e:
    fail(str(e))


def run(args) -> dict:
  """Pretrains as the parsed flags `args` say; a failure raises `train.loop.RunError`."""
  import jax
  import numpy as np
  from models import sharding as shd
  from train import data, loop, optimizers, steps, telemetry, validate
  from train.plot import plot_runs

  refused = optimizers.refused_flags(args.optimizer, args)
  if refused:  # the flags' fit to the optimizer (its signature), before anything loads
    raise loop.RunError(f"--optimizer {args.optimizer}: {refused}")
  lead = jax.process_index() == 0
  say = print if lead else (lambda *a, **k: None)
  flags = validate.flags_of(args)
  ckpt, resume = loop.open_checkpoints(args, flags, lead, say)
  tokenizer = data.BPETokenizer(args.tokenizer) if args.tokenizer else None
  try:
    corpus = data.load_corpus(args.data, tokenizer=tokenizer, data_dtype=args.data_dtype,
                              val_fraction=args.val_fraction, vocab_size=args.vocab_size,
                              max_bytes=args.corpus_bytes or data.DEFAULT_CORPUS_BYTES)
  except data.DataError as e:
    raise loop.RunError(f"--data: {e}") from None
  need = args.seq_len + 1
  if len(corpus.train) <= need:
    raise loop.RunError(f"--data: the training split has {len(corpus.train)} tokens, too "
                        f"few for --seq-len {args.seq_len}")
  if len(corpus.val) <= need:
    raise loop.RunError(
        f"--val-fraction {args.val_fraction}: the validation split has {len(corpus.val)} "
        f"tokens, too few for --seq-len {args.seq_len} (raise --val-fraction, or give "
        "more --data)")
  if corpus.top >= corpus.vocab_size:
    raise loop.RunError(f"--vocab-size: the data has token id {corpus.top}, so the "
                        f"vocabulary needs at least {corpus.top + 1} entries (got "
                        f"{corpus.vocab_size})")
  cfg = model_config(args, vocab_size=corpus.vocab_size, max_seq_len=args.seq_len)
  baseline = data.unigram_entropy(corpus.val, corpus.vocab_size)
  say(f"data: {corpus.description}; train {len(corpus.train):,} / validation "
      f"{len(corpus.val):,} tokens")
  say(f"unigram baseline on validation: loss {baseline:.4f}, perplexity "
      f"{data.perplexity(baseline):.2f}")

  # mesh → abstract state → logical specs → shardings
  mesh = build_mesh(args, say)
  setup = loop.Setup(args, cfg, mesh, say)
  setup.prepare(ckpt, say)
  batch_sharding = steps.batch_sharding(mesh)
  eval_sharding = steps.batch_sharding(mesh, micro_batched=False)

  with shd.set_mesh(mesh):
    state, resume = setup.start_state(
        ckpt, resume, flags, say,
        lambda: jax.jit(setup.init, out_shardings=setup.shardings)(jax.random.key(args.seed)))
    if lead:
      loop.write_json(os.path.join(args.out, "config.json"),
                      {"args": vars(args), "model": cfg.to_dict(), "unigram_baseline": baseline})
    log = loop.MetricsLog(os.path.join(args.out, "metrics.jsonl"), resume, enabled=lead,
                          say=say)
    log = telemetry.with_tensorboard(log, args, lead, resume)
    micro = args.batch_size // args.micro_batches
    batch_shape = (args.micro_batches, micro, args.seq_len + 1)
    abstract_batch = jax.ShapeDtypeStruct(batch_shape, np.int32, sharding=batch_sharding)
    compiled = setup.compile_step(abstract_batch, batch_sharding, say)
    eval_step = setup.jit_eval(steps.make_eval_step(setup.eval_graphdef), eval_sharding)

    eval_shape = (args.eval_batch_size, args.seq_len + 1)

    def evaluate(params) -> dict:
      total = count = 0.0
      for j in range(args.eval_batches):
        tokens = loop.put_rows(lambda rows: data.eval_batch(
            corpus.val, j, args.eval_batch_size, args.seq_len, rows), eval_shape, eval_sharding)
        s, n = eval_step(params, tokens)
        total, count = total + float(s), count + float(n)
      loss = total / count
      return {"val_loss": loss, "val_ppl": data.perplexity(loss)}

    def batch_at(step: int):  # each process reads only its rows of the global batch
      return loop.put_rows(lambda rows: data.sample_batch(
          corpus.train, args.seed, step, args.batch_size, args.seq_len, rows),
                           batch_shape, batch_sharding)

    state, step, evaluation, stop = loop.train(
        args, state, compiled, batch_at, evaluate, ckpt=ckpt, flags=flags, log=log,
        vocab_size=corpus.vocab_size, tokens_per_step=args.batch_size * args.seq_len,
        flops_per_token=telemetry.flops_per_token(cfg, args.seq_len),
        lead=lead, describe=lambda e: (f"validation loss {e['val_loss']:.4f}, perplexity "
                                       f"{e['val_ppl']:.2f}"))
    if stop:
      say(f"stopped ({stop}) at step {step}"
          + (f"; checkpoint saved in {args.ckpt_dir}" if ckpt else ""))
      return {"step": step, "interrupted": True}

  val_loss, val_ppl = evaluation["val_loss"], evaluation["val_ppl"]
  plot = os.path.join(args.out, "loss.png")
  if lead:
    plot_runs([args.out], plot, labels=[args.optimizer], baseline=baseline)
  summary = {"step": step, "val_loss": val_loss, "val_ppl": val_ppl,
             "unigram_loss": baseline, "unigram_ppl": data.perplexity(baseline),
             "param_bytes": setup.param_bytes, "plot": plot,
             "skipped_steps": int(jax.device_get(state["health"]["skipped_steps"]))}
  if lead:
    loop.write_json(os.path.join(args.out, "summary.json"), summary)
  say(f"final validation loss {val_loss:.4f}, perplexity {val_ppl:.2f} "
      f"(unigram baseline: loss {baseline:.4f}, perplexity {data.perplexity(baseline):.2f})")
  say(f"loss curves: {plot}")
  return summary


if __name__ == "__main__":
  main()
