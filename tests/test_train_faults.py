"""Faults of the pretraining program (train/faults.py, checkpoint.py, validate.py):
divergence and spikes, damaged checkpoints and metrics, signals, changed and bad flags, a
full disk. The trainer runs share one checkpointed run (tiny model, 8 simulated CPU
devices, stopped at step 6 of 8) and one compilation cache, so most reuse its programs."""

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from models.config import LlamaConfig
from train import data, faults, pretrain, steps, validate
from train.checkpoint import MANIFEST, Checkpointer
from tests.compile_cache import compilation_cache

BASE = ["--model", "tiny", "--seq-len", "32", "--batch-size", "8", "--steps", "8",
        "--eval-every", "4", "--eval-batches", "1", "--corpus-bytes", "100000",
        "--lr", "3e-3", "--ckpt-every", "2", "--keep", "3"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(out, ckpt, *extra):
  argv = [*BASE, "--out", str(out), *extra]
  return pretrain.main(argv + (["--ckpt-dir", str(ckpt)] if ckpt else []))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A run stopped at step 6 (checkpoints 2, 4 and 6, metrics of steps 1-6), with the
  compilation cache its programs are in."""
  root = tmp_path_factory.mktemp("trained")
  with compilation_cache(root / "xla_cache"):
    result = _run(root / "out", root / "ckpt", "--stop-at", "6")
    assert result == {"step": 6, "interrupted": True}
    yield root


def _copy(trained, tmp_path):
  """A private copy of the trained run: (out, ckpt)."""
  for name in ("out", "ckpt"):
    shutil.copytree(trained / name, tmp_path / name)
  return tmp_path / "out", tmp_path / "ckpt"


def _train_records(out):
  with open(out / "metrics.jsonl") as f:
    return [r for r in map(json.loads, f) if "loss" in r]


def _largest_file(step_dir):
  files = [os.path.join(d, n) for d, _, names in os.walk(step_dir) for n in names]
  return max((f for f in files if not f.endswith(MANIFEST)), key=os.path.getsize)


# the guard inside the step


def _maxtext_skips(losses, norms, factor, window):
  """MaxText's skip_step_on_spikes in NumPy (float64): a step is skipped when its loss or
  gradient norm exceeds mean + factor·std (ddof=1) of the last `window` steps, once
  max(2, window // 2) - 1 earlier steps are in; non-finite steps are skipped and, unlike
  MaxText's, kept out of the window."""
  seen_l, seen_n, skipped = [], [], []
  for loss, norm in zip(losses, norms):
    finite = bool(np.isfinite(loss) and np.isfinite(norm))
    spike = False
    if finite and len(seen_l) + 1 >= max(2, window // 2):
      ls, ns = np.array(seen_l[-window:]), np.array(seen_n[-window:])
      std = lambda a: float(np.std(a, ddof=1)) if len(a) > 1 else 0.0
      spike = loss - ls.mean() > factor * std(ls) or norm - ns.mean() > factor * std(ns)
    skipped.append(not finite or spike)
    if finite:
      seen_l.append(loss)
      seen_n.append(norm)
  return skipped


def _scan(guard, xs):
  """Runs `guard` over rows (loss, gradient norm) of `xs`: (health, (ok, nonfinite))."""
  def run(health, x):
    ok, health, metrics = guard(health, x[0], x[1])
    return health, (ok, metrics["nonfinite"])
  return jax.jit(lambda h: jax.lax.scan(run, h, xs))(guard.init())


def test_guard_skips_nonfinite_steps_and_spikes_as_maxtext_defines_them():
  rng = np.random.default_rng(0)
  n, window, factor = 60, 8, 3.0
  losses = 3.0 - 0.01 * np.arange(n) + 0.05 * rng.standard_normal(n)
  norms = 1.0 + 0.1 * rng.standard_normal(n)
  losses[[10, 30]] += 2.0           # loss spikes
  norms[[20, 45]] *= 5.0            # gradient-norm spikes
  losses[[15, 40]] = np.nan         # non-finite steps
  norms[[16, 50]] = np.inf
  xs = jnp.asarray(np.stack([losses, norms], 1), jnp.float32)
  health, (ok, nonfinite) = _scan(faults.Guard(spike_factor=factor, window=window), xs)
  want = _maxtext_skips(losses.astype(np.float32).astype(np.float64),
                        norms.astype(np.float32).astype(np.float64), factor, window)
  assert list(~np.asarray(ok)) == want
  assert np.flatnonzero(np.asarray(nonfinite)).tolist() == [15, 16, 40, 50]
  assert {10, 20, 30, 45} <= set(np.flatnonzero(want)) and sum(want) < 15
  assert int(health["skipped_steps"]) == sum(want)
  assert int(health["seen"]) == n - 4
  # without a spike factor only the non-finite steps are skipped
  _, (ok, _) = _scan(faults.Guard(window=window), xs)
  assert np.flatnonzero(~np.asarray(ok)).tolist() == [15, 16, 40, 50]


def test_a_nonfinite_step_leaves_parameters_and_optimizer_state_as_they_were():
  cfg = LlamaConfig.tiny(num_layers=1, d_model=32, d_ff=64, num_heads=2, num_kv_heads=1,
                         max_seq_len=16)
  tx = optax.adamw(1e-2)
  guard = faults.Guard()
  graphdef, _ = steps.abstract_model(cfg)
  state = jax.jit(steps.make_init_fn(cfg, tx, guard=guard))(jax.random.key(0))
  tokens = np.random.default_rng(0).integers(0, 256, (1, 4, 17)).astype(np.int32)
  guarded = jax.jit(steps.make_train_step(graphdef, tx, guard=guard))
  # a healthy step is the unguarded step (an independent reference: no guard at all)
  new, metrics = jax.device_get(guarded(state, tokens))
  plain = {k: v for k, v in state.items() if k != "health"}
  want, _ = jax.device_get(jax.jit(steps.make_train_step(graphdef, tx))(plain, tokens))
  assert metrics["skipped"] == 0 and metrics["nonfinite"] == 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               (new["params"], new["opt_state"]), (want["params"], want["opt_state"]))
  assert np.abs(new["params"]["lm_head"]["kernel"]
                - np.asarray(state["params"]["lm_head"]["kernel"])).max() > 1e-3
  # one NaN weight (the embedding row of a token in the batch): NaN loss, update skipped
  poisoned = jax.tree.map(jnp.asarray, new)
  poisoned["params"]["embed"] = poisoned["params"]["embed"].at[int(tokens[0, 0, 0]), 0].set(
      jnp.nan)
  after, metrics = jax.device_get(guarded(poisoned, tokens))
  assert np.isnan(metrics["loss"]) and metrics["nonfinite"] == 1 and metrics["skipped"] == 1
  before = jax.device_get(poisoned)
  jax.tree.map(np.testing.assert_array_equal, (after["params"], after["opt_state"]),
               (before["params"], before["opt_state"]))  # bit for bit (NaN == NaN here)
  assert int(after["step"]) == int(before["step"]) + 1
  assert int(after["health"]["skipped_steps"]) == 1
  assert int(after["health"]["seen"]) == int(before["health"]["seen"])


def test_watch_stops_after_the_limit_and_warns_once_on_a_collapse():
  watch = faults.Watch(limit=3, start=10, vocab_size=260)
  finite = {"loss": 2.0, "grad_norm": 1.0, "skipped": 0.0, "nonfinite": 0.0}
  bad = {"loss": float("nan"), "grad_norm": float("nan"), "skipped": 1.0, "nonfinite": 1.0}
  assert watch.observe(11, finite) == [] and watch.healthy
  lines = watch.observe(12, bad) + watch.observe(13, bad)
  assert len(lines) == 1, lines
  assert lines[0] == ("step 12: non-finite loss or gradient (loss nan, gradient norm nan); "
                      "update skipped")
  assert not watch.healthy and not watch.diverged
  assert watch.observe(14, finite) == [] and watch.healthy  # a finite step ends the streak
  for step in (15, 16, 17):
    watch.observe(step, bad)
  assert watch.diverged and watch.first_bad == 15 and watch.last_finite == 14
  spike = {**finite, "skipped": 1.0}
  assert "is a spike" in faults.Watch(3, 0, 260).observe(1, spike)[0]
  collapse = faults.Watch(limit=3, start=0, vocab_size=260)
  zero = {**finite, "loss": math.log(260), "grad_norm": 0.0}
  lines = [line for step in range(1, 8) for line in collapse.observe(step, zero)]
  assert len(lines) == 1 and lines[0].startswith("warning: step 3: the gradient norm has")
  assert "ln 260 = 5.5607" in lines[0]


# divergence


def test_divergence_stops_keeps_the_healthy_checkpoint_and_a_sane_resume_ends_finite(
    trained, tmp_path, capsys):
  """Resumed at step 6 with --lr 1e30 (and 14 steps), checkpointing every step and
  keeping one: step 7 is finite (its update blows the weights up to ~1e30) and is
  checkpointed, then the loss is NaN; after 5 such steps (the default limit) the run
  stops with one line. The checkpoint of step 7, whose state gave the NaNs, is moved
  aside, and rotation kept step 6 although --keep is 1. A resume with a sane --lr starts
  from step 6 and ends finite."""
  out, ckpt = _copy(trained, tmp_path)
  with pytest.raises(SystemExit) as e:
    _run(out, ckpt, "--lr", "1e30", "--steps", "14", "--ckpt-every", "1", "--keep", "1")
  message = str(e.value)
  assert e.value.code != 0 and "\n" not in message, message
  assert "non-finite" in message and "from step 8" in message, message
  assert "last healthy checkpoint: step 6" in message, message
  printed = capsys.readouterr().out
  assert ("resuming step 6 with changed flags: --ckpt-every 2 → 1; --keep 3 → 1; "
          "--lr 0.003 → 1e+30; --steps 8 → 14") in printed
  assert "step 8: checkpoint not saved" in printed
  records = _train_records(out)
  assert [r["step"] for r in records] == list(range(1, 13))
  assert np.isfinite(records[6]["loss"]) and np.isnan(records[7]["loss"])
  assert [r["skipped"] for r in records[6:]] == [0.0] + [1.0] * 5
  kept = Checkpointer(ckpt)
  assert kept.steps() == [6] and kept.verify(6) is None
  assert os.listdir(ckpt / "damaged") == ["7"]
  summary = _run(out, ckpt)
  assert f"resumed from {ckpt} at step 6" in capsys.readouterr().out
  assert math.isfinite(summary["val_loss"]) and summary["skipped_steps"] == 0
  records = _train_records(out)
  assert [r["step"] for r in records] == list(range(1, 9))
  assert all(np.isfinite(r["loss"]) for r in records)


# damaged metrics and checkpoints


def test_a_torn_last_metrics_line_is_dropped_on_resume(trained, tmp_path, capsys):
  out, ckpt = _copy(trained, tmp_path)
  with open(out / "metrics.jsonl", "a") as f:
    f.write('{"step": 7, "loss": 4.1')  # a write cut short by a kill or a full disk
  result = _run(out, ckpt, "--stop-at", "7")
  assert result == {"step": 7, "interrupted": True}
  lines = [l for l in capsys.readouterr().out.splitlines() if "unreadable" in l]
  assert len(lines) == 1 and "metrics.jsonl: dropped 1 unreadable line(s) (line 8" in lines[0]
  assert [r["step"] for r in _train_records(out)] == list(range(1, 8))


def _flip(path):
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0x01]))


def test_damaged_latest_checkpoints_fall_back_to_the_newest_intact_step(trained, tmp_path,
                                                                       capsys):
  """A data file of step 6 deleted, and one byte of a data file of step 4 flipped (which
  Orbax restores without a word): the resume says which step and why in one line each,
  moves them to damaged/, resumes from step 2 and checkpoints step 4 anew."""
  out, ckpt = _copy(trained, tmp_path)
  os.remove(_largest_file(ckpt / "6"))
  _flip(_largest_file(ckpt / "4"))
  result = _run(out, ckpt, "--stop-at", "4")
  printed = capsys.readouterr().out
  lines = [l for l in printed.splitlines() if l.startswith("checkpoint step")]
  assert len(lines) == 2, lines
  assert lines[0].startswith("checkpoint step 6 ") and "is missing" in lines[0]
  assert lines[1].startswith("checkpoint step 4 ") and "does not match its sha256" in lines[1]
  assert all("is damaged" in l and "fell back" in l for l in lines)
  assert f"resumed from {ckpt} at step 2" in printed
  assert result == {"step": 4, "interrupted": True}
  assert sorted(os.listdir(ckpt / "damaged")) == ["4", "6"]
  assert Checkpointer(ckpt).steps() == [2, 4] and Checkpointer(ckpt).verify(4) is None


def _truncate(step_dir):
  path = _largest_file(step_dir)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize("damage,why", [
    (_truncate, "does not match its sha256"),
    (lambda d: os.remove(d / "default" / "_METADATA"), "default/_METADATA is missing"),
    (lambda d: os.remove(d / "_CHECKPOINT_METADATA"), "no commit"),
    (lambda d: (shutil.rmtree(d), os.mkdir(d)), "directory is empty"),
], ids=["truncated", "no_METADATA", "no_CHECKPOINT_METADATA", "empty"])
def test_verification_finds_damage_orbax_crashes_on_or_misses(trained, tmp_path, damage,
                                                               why):
  _, ckpt = _copy(trained, tmp_path)
  damage(ckpt / "6")
  lines = []
  kept = Checkpointer(ckpt)
  assert kept.newest_intact(lines.append) == 4
  assert len(lines) == 1 and why in lines[0], lines
  assert kept.steps() == [2, 4] and os.listdir(ckpt / "damaged") == ["6"]


def test_a_full_disk_during_a_save_keeps_the_earlier_checkpoints(trained, tmp_path, capsys,
                                                                 monkeypatch):
  """Resumed at step 6 checkpointing every step, the save of step 7 fails with ENOSPC after
  writing part of its temporary directory: one line says so, steps 2, 4 and 6 stay,
  nothing of step 7 is left, training goes on and step 8 is saved (rotation then keeps 4,
  6 and 8)."""
  out, ckpt = _copy(trained, tmp_path)
  save = ocp.CheckpointManager.save

  def full_disk(self, step, *args, **kwargs):
    if step == 7:
      partial = os.path.join(str(self.directory), "7.orbax-checkpoint-tmp-0")
      os.makedirs(partial)
      with open(os.path.join(partial, "part"), "wb") as f:
        f.write(b"\0" * 100)
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
  result = _run(out, ckpt, "--ckpt-every", "1")
  lines = [l for l in capsys.readouterr().out.splitlines() if "not saved" in l]
  assert len(lines) == 1, lines
  assert "checkpoint step 7 not saved (" in lines[0]
  assert os.strerror(errno.ENOSPC) in lines[0] and "steps: 2, 4, 6 in" in lines[0]
  assert math.isfinite(result["val_loss"])
  assert sorted(os.listdir(ckpt)) == ["4", "6", "8"]


# signals


def test_sigint_checkpoints_and_stops(trained, tmp_path, capsys, monkeypatch):
  """A real SIGINT to this process while step 3 is prepared: the run checkpoints step 3
  and returns, and the previous handler is back."""
  sample = data.sample_batch

  def interrupt_at_step_2(tokens, seed, step, *args):
    if step == 2:
      os.kill(os.getpid(), signal.SIGINT)
    return sample(tokens, seed, step, *args)

  monkeypatch.setattr(data, "sample_batch", interrupt_at_step_2)
  # Whatever this process started with (Python's default handler, or SIG_IGN when the
  # suite runs in the background): the run must put it back.
  previous = signal.getsignal(signal.SIGINT)
  try:
    result = _run(tmp_path / "out", tmp_path / "ckpt")
  except KeyboardInterrupt:
    pytest.fail("SIGINT was not handled")
  assert result == {"step": 3, "interrupted": True}
  assert "SIGINT: checkpointing and stopping at step 3" in capsys.readouterr().out
  saved = Checkpointer(tmp_path / "ckpt")
  assert saved.steps() == [2, 3] and saved.verify(3) is None and saved.checksummed(3)
  assert signal.getsignal(signal.SIGINT) is previous


def test_a_second_sigint_exits_at_once():
  code = ("import os, signal, time\n"
          "from train.faults import Signals\n"
          "with Signals() as s:\n"
          "  os.kill(os.getpid(), signal.SIGINT)\n"
          "  time.sleep(0.1)\n"
          "  print(s.requested, flush=True)\n"
          "  os.kill(os.getpid(), signal.SIGINT)\n"
          "  time.sleep(30)\n"
          "  print('still running', flush=True)\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == -signal.SIGINT, (proc.returncode, proc.stderr[-500:])
  assert proc.stdout.split() == ["SIGINT"]


# changed flags on resume


def test_resume_refuses_a_changed_optimizer_or_rank_in_one_line(trained, tmp_path):
  out, ckpt = _copy(trained, tmp_path)
  with pytest.raises(SystemExit) as e:  # the trained run's own checkpoint (adamw)
    _run(out, ckpt, "--optimizer", "galore", "--rank", "0.25")
  message = str(e.value)
  assert "\n" not in message and message.count("--optimizer") == 3, message
  assert "--optimizer adamw" in message and "--optimizer galore" in message, message
  # a GaLore run's checkpoint (its flags as the trainer stores them), resumed with a
  # different rank: refused before anything loads or compiles
  galore = ["--optimizer", "galore", "--update-proj-gap", "4"]
  args = pretrain.parse_args([*BASE, *galore, "--rank", "0.25", "--out", str(out),
                              "--ckpt-dir", str(tmp_path / "galore")])
  stored = Checkpointer(tmp_path / "galore")
  stored.save(4, {"step": jnp.int32(4)}, validate.flags_of(args))
  stored.close()
  with pytest.raises(SystemExit) as e:
    _run(out, tmp_path / "galore", *galore, "--rank", "0.5")
  message = str(e.value)
  assert "\n" not in message and e.value.code != 0, message
  assert "--rank 0.25" in message and "--rank 0.5" in message, message


def test_resume_changes_split_shape_flags_from_schedule_flags():
  parse = lambda *a: validate.flags_of(pretrain.parse_args([*BASE, *a], num_devices=8))
  old = parse("--optimizer", "galore", "--rank", "0.25")
  error, changes = validate.resume_changes(old, parse("--optimizer", "galore", "--rank",
                                                      "0.25", "--lr", "1e-2", "--steps",
                                                      "20", "--out", "elsewhere"))
  assert error is None and changes == ["--lr 0.003 → 0.01", "--steps 8 → 20"]
  error, _ = validate.resume_changes(old, parse("--optimizer", "galore", "--rank", "8"))
  assert error.startswith("--rank: ") and "--rank 0.25" in error and "--rank 8" in error
  error, _ = validate.resume_changes(old, parse("--rank", "0.25", "--scan-layers"))
  assert error.startswith("--optimizer: ")  # the first of several, alphabetically


# bad flags and files


@pytest.mark.parametrize("argv,flag", [
    (["--lr", "nan"], "--lr"), (["--lr", "-1"], "--lr"), (["--seq-len", "0"], "--seq-len"),
    (["--clip", "-1"], "--clip"), (["--ckpt-every", "0"], "--ckpt-every"),
    (["--ckpt-every", "-10"], "--ckpt-every"), (["--stop-at", "-1"], "--stop-at"),
    (["--b1", "1.5"], "--b1"), (["--weight-decay", "-1"], "--weight-decay"),
    (["--rank", "1.0"], "--rank"), (["--val-fraction", "0"], "--val-fraction"),
    (["--max-nonfinite-steps", "0"], "--max-nonfinite-steps"),
    (["--spike-factor", "inf"], "--spike-factor"),
    (["--data", "{dir}/x.txt"], "--data"), (["--data", "{dir}/empty.bin"], "--data"),
    (["--data", "{dir}/odd.bin"], "--data-dtype"),
    (["--config", "{dir}/bad.json"], "bad.json:2"), (["--out", "{dir}/file/run"], "--out"),
])
def test_bad_flags_and_files_fail_with_one_line(argv, flag, tmp_path, capsys):
  (tmp_path / "x.txt").mkdir()
  (tmp_path / "empty.bin").write_bytes(b"")
  (tmp_path / "odd.bin").write_bytes(b"\1\2\3")
  (tmp_path / "bad.json").write_text('{"lr": 0.1,\n "steps": }\n')
  (tmp_path / "file").write_text("")
  with pytest.raises(SystemExit) as e:
    pretrain.parse_args([a.format(dir=tmp_path) for a in argv], num_devices=8)
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert "Traceback" not in err
  assert flag in err.strip().splitlines()[-1], err


def test_a_full_output_disk_is_refused_before_anything_loads(tmp_path, monkeypatch, capsys):
  free = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(validate.shutil, "disk_usage", lambda p: free._replace(free=4096))
  with pytest.raises(SystemExit):
    pretrain.parse_args(["--out", str(tmp_path / "run")], num_devices=8)
  message = capsys.readouterr().err.strip().splitlines()[-1]
  assert "--out" in message and "no space left" in message, message


@pytest.mark.parametrize("argv,match", [
    (["--rank", "8"], r"^python -m train.pretrain: error: --optimizer adamw: .*--rank"),
    (["--data", "{dir}/bad.jsonl"], r"--data: .*bad\.jsonl:2: invalid JSON"),
    (["--data", "{dir}/notext.jsonl"], r"--data: .*notext\.jsonl:3: .*\"text\""),
])
def test_runtime_checks_fail_with_one_line_before_compiling(argv, match, tmp_path):
  (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": "b\n')
  (tmp_path / "notext.jsonl").write_text('{"text": "a"}\n\n{"body": "b"}\n')
  with pytest.raises(SystemExit, match=match) as e:
    pretrain.main([*(a.format(dir=tmp_path) for a in argv), "--out", str(tmp_path / "o")])
  assert "\n" not in str(e.value)
