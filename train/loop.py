"""The machinery pretraining and fine-tuning share: checkpoints to resume from, the
optimizer and train state on the mesh, the compiled step, the loop, the metrics log.

`python -m train.pretrain` and `python -m train.finetune` differ in where the weights and
the batches come from and in what they evaluate; everything from the optimizer to the
last checkpoint is here. A failure is raised as `RunError` (one line); each program ends
with it as `python -m train.<program>: error: <line>` and exit code 1.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
from tqdm import tqdm

from models import sharding as shd
from train import faults, optimizers, paths, steps, telemetry, weight_quant


class RunError(Exception):
  """A run that cannot go on; the message is one line naming the flag or file."""


def mib(n) -> str:
  return f"{(n or 0) / 2**20:,.1f} MiB"


class MetricsLog:
  """metrics.jsonl in the run dir; a resumed run first drops records past its step, and
  unreadable lines (a write torn by a kill or a full disk), saying so. The kept lines are
  rewritten to a temporary file that then replaces the log. Only the lead process writes
  (`enabled`); a failed write ends the run with one line naming the file.

  A remote log (`gs://...`; object stores cannot append) is held in memory and rewritten
  whole at most every `flush_seconds` and on `close`: a run killed without warning loses
  the records of its last `flush_seconds` (the log of a resumed run drops records past its
  checkpoint anyway)."""

  def __init__(self, path: str, resume_step: int | None, enabled: bool = True,
               say=print, flush_seconds: float = 30.0):
    self.path, self.enabled = paths.resolve(path), enabled
    self._remote, self._flush_seconds = paths.is_remote(path), flush_seconds
    kept, torn = [], []
    try:
      if resume_step is not None and enabled and self.path.exists():
        text = self.path.read_bytes().decode("utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(keepends=True), 1):
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
        say(f"{path}: dropped {len(torn)} unreadable line(s) (line "
            f"{', '.join(map(str, torn))}; a torn write?)")
      self._lines, self._flushed = kept, time.monotonic()
      if enabled and self._remote:
        self.path.write_text("".join(kept))
      elif enabled:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(self.path)
      self._file = open(self.path if enabled and not self._remote else os.devnull, "a")
    except OSError as e:
      raise RunError(f"--out: cannot write {e.filename or path}: {e.strerror or e}") from None

  def write(self, record: dict) -> None:
    line = json.dumps(record) + "\n"
    try:
      if not self._remote:
        self._file.write(line)
        self._file.flush()
      elif self.enabled:
        self._lines.append(line)
        if time.monotonic() - self._flushed >= self._flush_seconds:
          self._flush()
    except OSError as e:
      raise RunError(f"--out: cannot write {self.path}: {e.strerror or e}") from None

  def _flush(self) -> None:
    self.path.write_text("".join(self._lines))
    self._flushed = time.monotonic()

  def close(self) -> None:
    try:
      self._file.close()
      if self._remote and self.enabled:
        self._flush()
    except OSError as e:
      raise RunError(f"--out: cannot write {self.path}: {e.strerror or e}") from None


def write_json(path: str, value) -> None:
  """Writes `value` as indented JSON to `path` (local or remote)."""
  try:
    paths.resolve(path).write_text(json.dumps(value, indent=2, default=str))
  except OSError as e:
    raise RunError(f"--out: cannot write {path}: {e.strerror or e}") from None


def open_checkpoints(args, flags: dict, lead: bool, say):
  """(Checkpointer or None, the step to resume from or None) for `--ckpt-dir`."""
  if not args.ckpt_dir:
    return None, None
  from train.checkpoint import Checkpointer, ResumeError
  ckpt = Checkpointer(args.ckpt_dir, keep=args.keep, every=args.ckpt_every, lead=lead)
  try:  # the newest intact step, its flags compared with this run's
    return ckpt, ckpt.resume_step(flags, say)
  except ResumeError as e:
    raise RunError(str(e)) from None


class Setup:
  """The optimizer, the train state's abstract shapes and shardings, and the jitted step.

  Args:
    args: The parsed flags (optimizer, schedule, clipping, accumulation, weight-quant).
    cfg: The model's `LlamaConfig`.
    mesh: The device mesh.
    say: Prints a line (on the lead process).
  """

  def __init__(self, args, cfg, mesh, say=print):
    from flax import nnx
    from models.lowrank import lowrank_spec, pure_dict
    self.args, self.cfg, self.mesh = args, cfg, mesh
    self.schedule = optimizers.make_schedule(args.lr, args.steps, args.warmup,
                                             args.final_lr_fraction)
    self.graphdef, abstract = steps.abstract_model(cfg)
    # VeLoRA changes only the backward pass: evaluation runs the plain model.
    self.eval_graphdef = steps.abstract_model(
        cfg.replace(velora_layers=(), velora_groups=()))[0]
    params = pure_dict(nnx.state(abstract, nnx.Param))
    self.abstract_params = params
    self.mask, dims = lowrank_spec(params, cfg)
    if isinstance(args.rank, int):
      sides = [min(x.shape[-2:]) for x, m in zip(jax.tree.leaves(params),
                                                 jax.tree.leaves(self.mask)) if m]
      if sides and max(sides) <= args.rank:
        model = f"--model {args.model}" if hasattr(args, "model") else "the model"
        raise RunError(f"--rank {args.rank}: no projected matrix of {model} has a smaller "
                       f"side above it (the largest is {max(sides)}), so nothing would be "
                       "projected")
    self.guard = faults.Guard(args.spike_factor if args.skip_spikes else None,
                              args.spike_window)
    try:  # bad optimizer arguments surface here, as one line naming the parameter
      tx = optimizers.build(args.optimizer, args, self.schedule, self.mask, dims)
      with shd.set_mesh(mesh):
        self.accumulating = optimizers.build_accumulating(
            args.optimizer, args, self.schedule, self.mask, dims, params)
      self.tx = tx if self.accumulating is None else self.accumulating
      self.weights = (weight_quant.Int8Weights(self.mask, seed=args.seed)
                      if args.weight_quant == "int8" else None)
      store = self.weights.store if self.weights else None
      self.init, self.abstract_state, self.shardings, specs = steps.state_shardings(
          cfg, self.tx, mesh, store=store, guard=self.guard)
      self.from_params = steps.make_state_fn(self.tx, specs, store=store, guard=self.guard)
    except ValueError as e:
      raise RunError(f"--optimizer {args.optimizer}: {e}") from None
    self.param_bytes = weight_quant.nbytes(self.abstract_state["params"])
    if self.weights:
      say(f"int8 weights (projected matrices, blocks of {self.weights.block_size}, "
          f"stochastic rounding): parameters stored in {mib(self.param_bytes)} instead of "
          f"{mib(weight_quant.nbytes(params))}")
    if args.micro_batches > 1:
      say(f"gradient accumulation over {args.micro_batches} micro-batches: "
          + ("full size" if self.accumulating is None else
             "in the subspace (projected leaves), each micro-batch clipped"
             if args.clip else "in the subspace (projected leaves)"))

  def describe(self) -> str:
    sizes = jax.tree.leaves(jax.tree.map(lambda x: x.size, self.abstract_params))
    projected = sum(x.size for x, m in zip(jax.tree.leaves(self.abstract_params),
                                           jax.tree.leaves(self.mask)) if m)
    cfg = self.cfg
    return (f"{sum(sizes):,} parameters ({projected:,} in projected matrices), "
            f"d={cfg.d_model} layers={cfg.num_layers} vocab={cfg.vocab_size} "
            f"context={cfg.max_seq_len}")

  def prepare(self, ckpt, say=print) -> None:
    """Prints the model and mesh, checks that `ckpt`'s disk can hold a checkpoint, and
    makes the `--out` directory: what both programs do before they start the state."""
    args = self.args
    model = f"model {args.model}" if hasattr(args, "model") else "model"
    say(f"{model}: {self.describe()}; mesh {dict(args.mesh_shape)} ({args.shard_mode}) "
        f"on {jax.device_count()} {jax.devices()[0].platform} devices")
    self.check_disk(ckpt)
    paths.resolve(args.out).mkdir(parents=True, exist_ok=True)

  def check_disk(self, ckpt) -> None:
    """Fails if `ckpt`'s local disk cannot hold one checkpoint of this run (a remote
    directory is not checked: an object store reports no free space)."""
    if ckpt is None or paths.is_remote(ckpt.directory):
      return
    need = weight_quant.nbytes(self.abstract_state)
    free = shutil.disk_usage(ckpt.directory).free
    if free < need:
      raise RunError(f"--ckpt-dir: {mib(free)} free on its device, but a checkpoint of "
                     f"this run takes about {mib(need)}")

  def start_state(self, ckpt, resume, flags, say, fresh: Callable[[], Any]):
    """(state, resume step): restored from `ckpt` at `resume`, else `fresh()` (a jitted
    init laid out by `self.shardings`). Call under the mesh."""
    if resume is None:
      return fresh(), None
    from train.checkpoint import ResumeError
    try:
      state, resume = ckpt.restore_fitting(
          self.abstract_state, resume, flags, say,
          health=lambda: jax.device_put(self.guard.init(), self.shardings["health"]))
    except ResumeError as e:
      raise RunError(str(e)) from None
    say(f"resumed from {self.args.ckpt_dir} at step {resume}")
    return state, resume

  def compile_step(self, abstract_batch, batch_sharding, say):
    """The train step, jitted with the state's shardings and donation, and compiled for
    `abstract_batch` (tokens, or a `steps.masked_batch` dict); prints its memory."""
    make_step = (steps.make_train_step(self.graphdef, self.tx, self.schedule, self.guard)
                 if self.accumulating is None else
                 steps.make_subspace_train_step(self.graphdef, self.tx, self.schedule,
                                                self.args.clip, self.guard))
    if self.weights:
      make_step = self.weights.wrap_step(make_step)
    train_step = jax.jit(make_step, in_shardings=(self.shardings, batch_sharding),
                         out_shardings=(self.shardings, None), donate_argnums=0)
    compiled = train_step.lower(self.abstract_state, abstract_batch).compile()
    mem = compiled.memory_analysis()
    if mem is not None:
      say(f"train step memory per device: arguments {mib(mem.argument_size_in_bytes)}, "
          f"outputs {mib(mem.output_size_in_bytes)} (aliased "
          f"{mib(mem.alias_size_in_bytes)}), temporaries {mib(mem.temp_size_in_bytes)}")
    return compiled

  def jit_eval(self, eval_fn, *batch_shardings):
    """`eval_fn(params, *batch)` jitted on the stored params (dequantized if int8)."""
    if self.weights:
      load, fn = self.weights.load, eval_fn
      eval_fn = lambda params, *batch: fn(load(params), *batch)
    return jax.jit(eval_fn, in_shardings=(self.shardings["params"], *batch_shardings))


def put(batch, sharding):
  """A host array (or a dict of them) as a global array laid out by `sharding`."""
  return jax.tree.map(
      lambda x: jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx]), batch)


def local_rows(shape: tuple[int, ...], index_map) -> np.ndarray:
  """The rows (flat indices over all axes but the last) of a batch of `shape` that the
  device slices of `index_map` (`sharding.addressable_devices_indices_map(shape)`)
  hold, sorted: this process's share of the batch."""
  grid = np.arange(math.prod(shape[:-1])).reshape(shape[:-1])
  return np.unique(np.concatenate([grid[idx[:-1]].ravel() for idx in index_map.values()]))


def put_rows(rows_of: Callable[[np.ndarray], np.ndarray], shape: tuple[int, ...], sharding):
  """A global token batch of `shape` laid out by `sharding`, of which this process
  materialises only its own rows: `rows_of(rows)` gives those rows (flat indices over
  all axes but the last) as an array of shape (len(rows), shape[-1])."""
  grid = np.arange(math.prod(shape[:-1])).reshape(shape[:-1])
  rows = local_rows(shape, sharding.addressable_devices_indices_map(shape))
  local = rows_of(rows)
  return jax.make_array_from_callback(
      shape, sharding, lambda idx: local[np.searchsorted(rows, grid[idx[:-1]])][..., idx[-1]])


def train(args, state, compiled, batch_at: Callable[[int], Any],
          evaluate: Callable[[Any], dict], *, ckpt, flags: dict, log: MetricsLog,
          vocab_size: int, tokens_per_step: int, lead: bool, describe=None,
          flops_per_token: float | None = None):
  """Runs the loop from `state["step"]` to `--steps`: train steps on `batch_at(step)`
  (a device batch), metrics one step late, `evaluate(params)` (a dict of floats) every
  `--eval-every` steps and at the end, checkpoints when due, at the end and on SIGTERM or
  SIGINT, a non-finite streak ending the run. Call under the mesh.

  Progress is a bar on a terminal, else a line every `--log-every` steps; the metrics
  add tokens/s per device and, given `flops_per_token` (`telemetry.flops_per_token`)
  and a known peak (`--peak-tflops`), MFU; `--profile-steps` traces steps.

  Returns (state, step, evaluation or None, stop reason or None); the final checkpoint
  is finished. `describe(evaluation)` gives the words of the line printed after each
  evaluation.
  """
  from train.checkpoint import SaveError
  describe = describe or (lambda e: ", ".join(f"{k} {v:.4f}" for k, v in e.items()))
  finite = jax.jit(faults.all_finite)
  start = int(jax.device_get(state["step"]))
  watch = faults.Watch(args.max_nonfinite_steps, start, vocab_size)
  evaluation = None
  terminal = sys.stderr.isatty()  # where the bar goes; a redirected log gets lines
  bar = tqdm(total=args.steps, initial=start, disable=not (lead and terminal),
             dynamic_ncols=True, desc=f"{args.optimizer}")
  note = bar.write if lead else (lambda *a, **k: None)
  peak = telemetry.peak_flops(jax.devices()[0].device_kind, args.peak_tflops)
  if flops_per_token and not peak:
    note(f"MFU not logged: no peak FLOP/s known for {jax.devices()[0].device_kind} "
         "(see --peak-tflops)")
  profile = telemetry.Profile(args.profile_steps, os.path.join(  # one dir per process
      args.out, "profile", *([f"process_{jax.process_index()}"]
                             if jax.process_count() > 1 else [])))
  pending, last_time = None, time.perf_counter()

  def report(step_done: int, metrics) -> None:
    nonlocal last_time
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    now = time.perf_counter()
    dt, last_time = now - last_time, now
    record = {"step": step_done, **metrics, "step_time": dt,
              "tokens_per_s": tokens_per_step / dt,
              **telemetry.throughput(tokens_per_step, dt, jax.device_count(),
                                     flops_per_token, peak)}
    log.write(record)
    for line in watch.observe(step_done, metrics):
      note(line)
    if ckpt and watch.healthy:
      ckpt.confirm(step_done)
    bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{tokens_per_step / dt:,.0f}",
                    step_s=f"{dt:.2f}")
    bar.update(1)
    if not terminal and (step_done % args.log_every == 0 or step_done == args.steps):
      note(f"step {step_done}/{args.steps}: loss {metrics['loss']:.4f}, "
           f"{tokens_per_step / dt:,.0f} tokens/s, {dt:.3f} s/step"
           + (f", MFU {record['mfu']:.1%}" if "mfu" in record else ""))

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

  def run_eval(step_done: int) -> dict:
    result = evaluate(state["params"])
    log.write({"step": step_done, **result})
    return result

  step, stop, saved = start, None, True
  with faults.Signals() as signals:
    try:
      while step < args.steps:
        profile.before(step + 1, state)
        state, metrics = compiled(state, batch_at(step))
        profile.after(step + 1, state)
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
          evaluation = run_eval(step)
          note(f"step {step}: {describe(evaluation)}")
        if due:
          saved = save(step)
        if stop:
          break
      if pending is not None:
        report(*pending)
    finally:
      profile.close()
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
      evaluation = run_eval(step)
      bad = [k for k, v in evaluation.items() if not math.isfinite(v)]
      if bad:
        problem = f"step {step}: the final {bad[0]} is {evaluation[bad[0]]}; no checkpoint"
      elif ckpt and not save(step):
        problem = f"step {step}: the final checkpoint was not saved (see above)"
    close_checkpoints(ckpt, log)
    if problem:
      raise RunError(problem + _last_healthy(ckpt))
  return state, step, evaluation, stop


def close_checkpoints(ckpt, log) -> None:
  """Finishes the pending save (a failure is one line and exit code 1) and the log."""
  log.close()
  if ckpt is None:
    return
  from train.checkpoint import SaveError
  try:
    ckpt.close()
  except SaveError as e:
    raise RunError(str(e)) from None


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
  raise RunError(f"step {step}: {watch.streak} consecutive steps with a non-finite loss or "
                 f"gradient (from step {watch.first_bad}; updates skipped): stopped "
                 f"without saving{moved}{_last_healthy(ckpt)} (lower --lr?)")
