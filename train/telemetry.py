"""What a run reports besides its losses: throughput and MFU, TensorBoard scalars, and a
profiler trace of chosen steps (`--peak-tflops`, `--tensorboard`, `--profile-steps`).
"""

from __future__ import annotations

import os

import jax

# Dense bfloat16 peak TFLOP/s per device (a GPU, or a TPU chip), by a part of its
# `device_kind`; the first match wins (so "TPU v5 lite", v5e, comes before v5p's "TPU v5").
PEAK_TFLOPS = (
    ("H100", 989.0), ("H200", 989.0), ("A100", 312.0),
    ("TPU v4", 275.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0),
    ("TPU v5p", 459.0), ("TPU v5", 459.0), ("TPU v6 lite", 918.0), ("TPU v6e", 918.0),
)


def peak_flops(device_kind: str, tflops: float | None = None) -> float | None:
  """A device's peak FLOP/s: `tflops` (`--peak-tflops`) if given, else from
  `PEAK_TFLOPS` by `device_kind`; None when unknown (CPU)."""
  if tflops is not None:
    return tflops * 1e12
  for part, peak in PEAK_TFLOPS:
    if part.lower() in device_kind.lower():
      return peak * 1e12
  return None


def flops_per_token(cfg, seq_len: int) -> float:
  """Training FLOPs per token (forward and backward) as PaLM counts them (Chowdhery et
  al., 2022, appendix B): 6·N + 12·L·H·Q·T.

  N is the number of weights in matrix multiplications (attention q, k, v, o; MLP gate,
  up, down; the LM head, tied or not), not the embedding lookup nor the norms; H·Q the
  query heads' total width, L the layers, T `seq_len`. The attention term counts every
  score of the T×T matrix (the model computes them all, then masks). Elementwise work,
  `--remat` recomputation and VeLoRA's cheaper backward pass are not counted.

  Args:
    cfg: The model's `LlamaConfig`.
    seq_len: Tokens per sequence.

  Returns:
    The FLOPs of one token's forward and backward pass.
  """
  width = cfg.num_heads * cfg.head_dim
  attention = 2 * cfg.d_model * width + 2 * cfg.d_model * cfg.num_kv_heads * cfg.head_dim
  mlp = 3 * cfg.d_model * cfg.d_ff
  matmul_weights = cfg.num_layers * (attention + mlp) + cfg.d_model * cfg.vocab_size
  return 6.0 * matmul_weights + 12.0 * cfg.num_layers * width * seq_len


def throughput(tokens: int, seconds: float, num_devices: int,
               flops_per_token: float | None, peak: float | None) -> dict:
  """`tokens_per_s_per_device`, and `mfu` (model FLOPs utilization: the model's FLOPs
  per second over all devices' peak) when both FLOP counts are known."""
  rates = {"tokens_per_s_per_device": tokens / seconds / num_devices}
  if flops_per_token and peak:
    rates["mfu"] = flops_per_token * tokens / seconds / (num_devices * peak)
  return rates


class TensorBoardLog:
  """A metrics log that also writes every number of each record as a TensorBoard
  scalar (tag: the field's name, step: the record's), with tensorboardX.

  Args:
    log: The metrics log written first (`train.loop.MetricsLog`).
    directory: Where the event file goes.
    resume_step: The step a resumed run starts from: TensorBoard hides the earlier
      files' events past it (`purge_step`), as the metrics log drops its records.
  """

  def __init__(self, log, directory: str, resume_step: int | None = None):
    from tensorboardX import SummaryWriter
    self.log = log
    self.writer = SummaryWriter(directory, purge_step=None if resume_step is None
                                else resume_step + 1)

  def write(self, record: dict) -> None:
    self.log.write(record)
    for tag, value in record.items():
      if tag != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
        self.writer.add_scalar(tag, value, record["step"])
    self.writer.flush()

  def close(self) -> None:
    self.writer.close()
    self.log.close()


def with_tensorboard(log, args, lead: bool, resume_step: int | None = None):
  """`log`, also writing `<out>/tensorboard` if `--tensorboard` (on the lead process)."""
  if not (args.tensorboard and lead):
    return log
  return TensorBoardLog(log, os.path.join(args.out, "tensorboard"), resume_step)


class Profile:
  """A `jax.profiler` trace of steps START..END (counted from 1) into `directory`; the
  device work before START is finished first, that of END before the trace stops.

  Args:
    steps: (START, END), or None for no trace.
    directory: The trace's directory (`<out>/profile`).
  """

  def __init__(self, steps: tuple[int, int] | None, directory: str):
    self.start, self.end = steps or (None, None)
    self.directory = directory
    self.tracing = False

  def before(self, step: int, state) -> None:
    """Call before step number `step` runs."""
    if step == self.start:
      jax.block_until_ready(state)
      jax.profiler.start_trace(self.directory)
      self.tracing = True

  def after(self, step: int, state) -> None:
    """Call after step number `step` was dispatched (`state` its result)."""
    if self.tracing and step == self.end:
      jax.block_until_ready(state)
      self.close()

  def close(self) -> None:
    if self.tracing:
      jax.profiler.stop_trace()
      self.tracing = False
