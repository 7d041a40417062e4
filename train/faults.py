"""Faults of a running job: non-finite and spiking steps, collapse, signals.

Inside the jitted step, `Guard` decides from the step's loss and gradient norm (one fused
check, no host sync) whether the update is applied: a step with a non-finite loss or
gradient norm is skipped as `optax.apply_if_finite` skips it (parameters and optimizer
state unchanged, the step counter advances), and with `spike_factor` so is a loss or
gradient-norm spike, as MaxText's `skip_step_on_spikes` defines one. Its counters and
rolling window live in the train state (`state["health"]`), so they are checkpointed and a
resumed run repeats the uninterrupted one.

On the host, `Watch` reads the metrics the loop fetches anyway (one step late): it stops
the run after `limit` consecutive non-finite steps and warns once when the gradient norm
has been exactly zero for `limit` steps (a collapsed model). `Signals` turns SIGTERM and
SIGINT into a request to checkpoint and stop; a second SIGINT ends the process at once.
"""

from __future__ import annotations

import math
import signal
from typing import Any

import jax
import jax.numpy as jnp


class Guard:
  """Skips a train step's update when its loss or gradient norm is bad.

  Spikes (MaxText's `skip_step_on_spikes`): a step is a spike when its loss or its
  gradient norm exceeds the mean of the window by more than `spike_factor` standard
  deviations (Bessel-corrected), once the window holds at least `max(2, window // 2)`
  earlier steps. A spike's values enter the window (so a lasting level shift becomes the
  new baseline); unlike MaxText's, non-finite values never do.

  Args:
    spike_factor: Standard deviations above the window's mean that make a spike; None
      skips only non-finite steps (the window is kept up to date either way, so that
      detection can be turned on when a run is resumed).
    window: Finite steps in the rolling window (MaxText's `skip_step_interval`).
  """

  def __init__(self, spike_factor: float | None = None, window: int = 128):
    self.spike_factor = spike_factor
    self.window = window

  def init(self) -> dict[str, jax.Array]:
    """The health part of the train state: counters and the window of finite steps."""
    return {"skipped_steps": jnp.zeros((), jnp.int32), "seen": jnp.zeros((), jnp.int32),
            "losses": jnp.zeros(self.window, jnp.float32),
            "norms": jnp.zeros(self.window, jnp.float32)}

  def __call__(self, health: dict[str, jax.Array], loss: jax.Array, norm: jax.Array):
    """Returns (apply the update?, the new health, metrics `skipped`, `nonfinite` (0 or
    1 this step) and `skipped_steps` (all so far))."""
    loss, norm = loss.astype(jnp.float32), norm.astype(jnp.float32)
    finite = jnp.isfinite(loss) & jnp.isfinite(norm)
    ok = finite
    if self.spike_factor is not None:
      ok = ok & ~self.is_spike(health, loss, norm)
    slot = health["seen"] % self.window
    keep = lambda buf, x: jnp.where(finite, buf.at[slot].set(x), buf)
    new = {"skipped_steps": health["skipped_steps"] + (~ok).astype(jnp.int32),
           "seen": health["seen"] + finite.astype(jnp.int32),
           "losses": keep(health["losses"], loss), "norms": keep(health["norms"], norm)}
    metrics = {"skipped": (~ok).astype(jnp.float32),
               "nonfinite": (~finite).astype(jnp.float32),
               "skipped_steps": new["skipped_steps"].astype(jnp.float32)}
    return ok, new, metrics

  def is_spike(self, health, loss, norm) -> jax.Array:
    """Whether `loss` or `norm` is a spike against the window in `health`."""
    seen = health["seen"]
    loss_mean, loss_std = _window_stats(health["losses"], seen)
    norm_mean, norm_std = _window_stats(health["norms"], seen)
    enforced = seen + 1 >= max(2, self.window // 2)
    high = ((loss - loss_mean > self.spike_factor * loss_std)
            | (norm - norm_mean > self.spike_factor * norm_std))
    return enforced & high


def _window_stats(values: jax.Array, seen: jax.Array):
  """Mean and Bessel-corrected standard deviation of the first min(seen, len) values."""
  n = jnp.minimum(seen, values.shape[0])
  mask = jnp.arange(values.shape[0]) < n
  mean = jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(n, 1)
  var = jnp.sum(jnp.where(mask, (values - mean) ** 2, 0.0)) / jnp.maximum(n - 1, 1)
  return mean, jnp.sqrt(var)


def all_finite(tree: Any) -> jax.Array:
  """True when every floating-point leaf of `tree` is finite (integer leaves pass)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


class Watch:
  """The host's view of the step metrics: non-finite streaks, spikes and collapse.

  Args:
    limit: Consecutive non-finite steps that stop the run; also the number of steps of
      exactly-zero gradient norm that earn the collapse warning.
    start: The step the run starts from (its state came from a finite step).
    vocab_size: For the collapse warning (uniform prediction loses ln(vocab_size)).
  """

  def __init__(self, limit: int, start: int, vocab_size: int):
    self.limit = limit
    self.vocab_size = vocab_size
    self.streak = 0          # consecutive non-finite steps up to the last observed one
    self.first_bad = None    # the first step of the current streak
    self.last_finite = start  # the newest step whose update was computed from finite values
    self.zero_norms = 0
    self.warned_collapse = False

  @property
  def healthy(self) -> bool:
    """Whether the newest observed step was finite (its state may be checkpointed)."""
    return self.streak == 0

  @property
  def diverged(self) -> bool:
    return self.streak >= self.limit

  def observe(self, step: int, metrics: dict[str, float]) -> list[str]:
    """Takes step `step`'s metrics (host floats); returns lines worth printing."""
    lines = []
    if metrics.get("nonfinite", 0.0):
      if self.streak == 0:
        self.first_bad = step
        norm = metrics.get("grad_norm", metrics.get("micro_grad_norm"))
        lines.append(f"step {step}: non-finite loss or gradient (loss {metrics['loss']:.4g}, "
                     f"gradient norm {norm:.4g}); update skipped")
      self.streak += 1
      return lines
    self.streak, self.first_bad, self.last_finite = 0, None, step
    if metrics.get("skipped", 0.0):
      lines.append(f"step {step}: loss {metrics['loss']:.4f} or gradient norm is a spike "
                   "(--skip-spikes); update skipped")
    norm = metrics.get("grad_norm", metrics.get("micro_grad_norm"))
    self.zero_norms = self.zero_norms + 1 if norm == 0.0 else 0
    if self.zero_norms >= self.limit and not self.warned_collapse:
      self.warned_collapse = True
      uniform = math.log(self.vocab_size)
      lines.append(f"warning: step {step}: the gradient norm has been exactly 0 for "
                   f"{self.zero_norms} steps (loss {metrics['loss']:.4f}; uniform "
                   f"prediction: ln {self.vocab_size} = {uniform:.4f}): the model has "
                   "collapsed; restart from an earlier checkpoint with a lower --lr")
    return lines


class Signals:
  """SIGTERM and SIGINT request a checkpoint and a stop (`requested` names the first
  signal); after a SIGINT a second one ends the process at once (the default action).

  Use as a context manager (main thread); the previous handlers are restored on exit. The
  handler only records the signal: printing from it could deadlock on the progress bar's
  lock.
  """

  def __init__(self):
    self.requested: str | None = None
    self._previous = {}

  def _handle(self, num, _frame) -> None:
    self.requested = self.requested or signal.Signals(num).name
    if num == signal.SIGINT:
      signal.signal(signal.SIGINT, signal.SIG_DFL)

  def __enter__(self) -> "Signals":
    for num in (signal.SIGTERM, signal.SIGINT):
      self._previous[num] = signal.signal(num, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for num, handler in self._previous.items():
      signal.signal(num, handler)
