"""Tests of launching and reporting (train/pretrain.py, models/sharding.py,
train/telemetry.py): --dcn-mesh and the hybrid device order, the distributed launch's
environment, two processes against one, TensorBoard events, MFU's FLOP count, the
profiler trace and redirected logs. One tiny run (8 simulated CPU devices) serves the
reporting tests and is the reference of the two-process run."""

import contextlib
import io
import json
import os
import pathlib
import socket
import struct
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import sharding as shd
from models.config import LlamaConfig
from models.lowrank import pure_dict
from train import pretrain, steps, telemetry

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The flags of the tiny run; the mesh is data=2 × fsdp=4 (flags added per run).
RUN = ["--model", "tiny", "--seq-len", "32", "--batch-size", "8", "--steps", "3",
       "--eval-every", "3", "--eval-batches", "1", "--corpus-bytes", "100000", "--scan-layers"]
PEAK_TFLOPS = 0.5


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """The tiny run with TensorBoard, a trace of step 2, a given peak (so MFU is logged on
  CPU) and stdout and stderr redirected to a file: (summary, run dir, the log's text)."""
  out = tmp_path_factory.mktemp("tiny")
  log = io.StringIO()
  with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
    summary = pretrain.main([*RUN, "--mesh", "data=2,fsdp=4", "--out", str(out),
                             "--tensorboard", "--profile-steps", "2,2", "--log-every", "2",
                             "--peak-tflops", str(PEAK_TFLOPS)])
  return summary, out, log.getvalue()


def _records(out):
  with open(os.path.join(out, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.parametrize("argv,flag,words", [
    (["--dcn-mesh", "data=3"], "--dcn-mesh", "does not divide the 8 devices"),
    (["--dcn-mesh", "pipeline=2"], "--dcn-mesh", "tensor"),
    (["--dcn-mesh", "data=-1"], "--dcn-mesh", "positive"),
    (["--mesh", "fsdp=8", "--dcn-mesh", "data=2"], "--mesh", "must multiply to 8"),
    (["--profile-steps", "3,2"], "--profile-steps", "START <= END"),
    (["--profile-steps", "5,5", "--steps", "4"], "--profile-steps", "--steps (4)"),
    (["--log-every", "0"], "--log-every", "positive"),
    (["--peak-tflops", "0"], "--peak-tflops", "positive"),
])
def test_bad_launch_flags_fail_with_one_line_naming_the_flag(argv, flag, words, capsys):
  with pytest.raises(SystemExit) as e:
    pretrain.parse_args(argv, num_devices=8)
  assert e.value.code == 2
  message = capsys.readouterr().err.strip().splitlines()[-1]
  assert flag in message and words in message, message


def test_dcn_mesh_multiplies_into_the_mesh_shape():
  args = pretrain.parse_args(["--mesh", "fsdp=-1,tensor=2", "--dcn-mesh", "data=2"],
                             num_devices=8)
  assert args.dcn_shape == {"data": 2, "fsdp": 1, "tensor": 1}
  assert args.mesh_shape == {"data": 2, "fsdp": 2, "tensor": 2}  # dcn × ici
  # one process, no slices: the plain mesh of those sizes
  mesh = shd.make_mesh(args.mesh_shape, dcn=args.dcn_shape)
  assert dict(zip(mesh.axis_names, mesh.axis_sizes)) == args.mesh_shape


def _fake_devices(n, per_granule, attribute):
  """`n` stand-ins for devices, `per_granule` to a slice (or process), shuffled."""
  devices = [types.SimpleNamespace(id=i, platform="cpu", device_kind="cpu",
                                   process_index=0, slice_index=0) for i in range(n)]
  for d in devices:
    setattr(d, attribute, d.id // per_granule)
  return [devices[i] for i in np.random.default_rng(0).permutation(n)]


@pytest.mark.parametrize("attribute", ["slice_index", "process_index"])
def test_hybrid_mesh_puts_each_granule_in_one_block(attribute):
  """8 devices in 2 slices (or processes) of 4: DCN data=2 gives each slice one index of
  the data axis; DCN tensor=2 with ICI data=2, fsdp=2 one index of the tensor axis."""
  devices = _fake_devices(8, 4, attribute)
  assert shd.granule_attribute(devices, 2) == attribute
  grid = shd.hybrid_devices((2, 4, 1), (2, 1, 1), devices, attribute)
  assert grid.shape == (2, 4, 1)
  for i in range(2):
    assert {getattr(d, attribute) for d in grid[i].flat} == {i}
  grid = shd.hybrid_devices((2, 2, 2), (1, 1, 2), devices, attribute)
  assert grid.shape == (2, 2, 2)
  for k in range(2):
    assert {getattr(d, attribute) for d in grid[:, :, k].flat} == {k}
  assert sorted(d.id for d in grid.flat) == list(range(8))


def test_granules_that_do_not_match_the_slices_are_refused():
  devices = _fake_devices(8, 2, "slice_index")  # 4 slices
  with pytest.raises(ValueError, match="4 slices"):
    shd.granule_attribute(devices, 2)
  one = _fake_devices(8, 8, "slice_index")  # one slice, one process: a plain mesh
  assert shd.granule_attribute(one, 2) is None


@pytest.mark.parametrize("env,expected", [
    ({}, None),
    ({"JAX_COORDINATOR_ADDRESS": "h:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"},
     {"coordinator_address": "h:1234", "num_processes": 2, "process_id": 1}),
    ({"SLURM_NTASKS": "4", "SLURM_STEP_NODELIST": "node[1-2]"}, {}),
    ({"SLURM_NTASKS": "4"}, None),  # the batch script itself, not an srun step
    ({"SLURM_NTASKS": "1", "SLURM_STEP_NODELIST": "node1"}, None),
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_MCA_orte_hnp_uri": "1.2.3.4"}, {}),
    ({"TPU_WORKER_HOSTNAMES": "w0,w1"}, {}),
    ({"TPU_WORKER_HOSTNAMES": "w0"}, None),
])
def test_distributed_arguments_from_the_environment(env, expected):
  assert pretrain.distributed_arguments(env) == expected
  with pytest.raises(ValueError, match="JAX_PROCESS_ID: expected an integer, got 'one'"):
    pretrain.distributed_arguments({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_PROCESS_ID": "one"})


def _crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
  return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _read_events(path):
  """The Event records of a TFRecord file, each frame's two CRCs checked."""
  from tensorboardX.proto import event_pb2
  data, events, at = pathlib.Path(path).read_bytes(), [], 0
  while at < len(data):
    header = data[at:at + 8]
    (length,), (header_crc,) = struct.unpack("<Q", header), struct.unpack(
        "<I", data[at + 8:at + 12])
    payload = data[at + 12:at + 12 + length]
    (payload_crc,) = struct.unpack("<I", data[at + 12 + length:at + 16 + length])
    assert header_crc == _masked(_crc32c(header))
    assert payload_crc == _masked(_crc32c(payload))
    event = event_pb2.Event()
    event.ParseFromString(payload)
    events.append(event)
    at += 16 + length
  return events


def test_tensorboard_events_hold_every_metric(tiny_run):
  _, out, _ = tiny_run
  files = list((out / "tensorboard").glob("events.out.tfevents.*"))
  assert len(files) == 1
  scalars = {(v.tag, e.step): v.simple_value for e in _read_events(files[0])
             for v in e.summary.value}
  expected = {(k, r["step"]): v for r in _records(out) for k, v in r.items() if k != "step"}
  assert {"loss", "grad_norm", "lr", "step_time", "tokens_per_s", "mfu",
          "tokens_per_s_per_device", "val_loss"} <= {tag for tag, _ in expected}
  assert scalars.keys() == expected.keys()
  for key, value in expected.items():
    assert scalars[key] == np.float32(value), key  # stored as float32


def test_tensorboard_hides_the_steps_a_resumed_run_repeats(tmp_path):
  """A resumed run's writer marks a restart at the step after the checkpoint's (TensorBoard
  then hides the earlier file's events from there on, as metrics.jsonl drops them)."""
  from tensorboardX.proto import event_pb2
  log = types.SimpleNamespace(write=lambda record: None, close=lambda: None)
  writer = telemetry.TensorBoardLog(log, str(tmp_path), resume_step=2)
  writer.write({"step": 3, "loss": 1.5})
  writer.close()
  (path,) = tmp_path.glob("events.out.tfevents.*")
  events = _read_events(path)
  assert [(e.step, e.session_log.status) for e in events if e.HasField("session_log")] == [
      (3, event_pb2.SessionLog.START)]
  assert [(e.step, v.tag, v.simple_value) for e in events for v in e.summary.value] == [
      (3, "loss", 1.5)]


def test_throughput_per_device_and_mfu(tiny_run):
  _, out, _ = tiny_run
  cfg = LlamaConfig.tiny(max_seq_len=32)
  train = [r for r in _records(out) if "loss" in r]
  assert [r["step"] for r in train] == [1, 2, 3]
  for r in train:
    tokens = 8 * 32
    assert r["tokens_per_s"] == pytest.approx(tokens / r["step_time"])
    assert r["tokens_per_s_per_device"] == pytest.approx(r["tokens_per_s"] / 8)
    assert r["mfu"] == pytest.approx(telemetry.flops_per_token(cfg, 32) * tokens
                                     / r["step_time"] / (8 * PEAK_TFLOPS * 1e12))


def test_peak_flops_by_device_kind():
  assert telemetry.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert telemetry.peak_flops("TPU v5 lite") == 197e12
  assert telemetry.peak_flops("TPU v5") == 459e12
  assert telemetry.peak_flops("TPU v6 lite") == 918e12
  assert telemetry.peak_flops("cpu") is None
  assert telemetry.peak_flops("cpu", 2.0) == 2e12


def test_flops_per_token_matches_the_compiled_forward_and_backward():
  """PaLM's count against XLA's count of the tiny loss's value and gradient. Here each
  term is over 10% of the total (attention with T=128, grouped K/V heads, the LM head),
  so a wrong term shows; XLA also counts the elementwise work the formula leaves out
  (softmax, norms, SiLU, RoPE, the loss), about 2% here, hence [1, 1.04]."""
  cfg = LlamaConfig.tiny(d_model=128, d_ff=256, num_heads=4, num_kv_heads=1, num_layers=1,
                         max_seq_len=128)
  graphdef, abstract = steps.abstract_model(cfg)
  params = pure_dict(nnx.state(abstract, nnx.Param))
  tokens = jax.ShapeDtypeStruct((1, cfg.max_seq_len + 1), jnp.int32)
  compiled = jax.jit(jax.value_and_grad(steps.make_loss_fn(graphdef))).lower(
      params, tokens).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  ratio = cost["flops"] / (telemetry.flops_per_token(cfg, cfg.max_seq_len)
                           * cfg.max_seq_len)
  assert 1.0 <= ratio <= 1.04, ratio


def test_profile_trace_of_the_chosen_step(tiny_run):
  _, out, _ = tiny_run
  assert list((out / "profile").glob("plugins/profile/*/*.xplane.pb"))


def test_redirected_log_has_progress_lines_and_no_bar(tiny_run):
  _, _, log = tiny_run
  assert "\r" not in log
  assert "step 2/3: loss" in log and "step 3/3: loss" in log and "MFU" in log
  assert "step 1/3" not in log  # --log-every 2 (and the last step)


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_train_as_one(tiny_run, tmp_path):
  """`python -m train.pretrain` as 2 processes of 4 CPU devices each (jax.distributed
  over gloo, our JAX_* variables), their 8 devices a hybrid mesh (DCN data=2 across the
  processes, fsdp=4 in each), one run directory: both end with the single-process
  8-device run's losses; the lead alone writes the metrics."""
  summary, out, _ = tiny_run
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
             JAX_COORDINATOR_ADDRESS=f"localhost:{_free_port()}", JAX_NUM_PROCESSES="2",
             XLA_FLAGS="--xla_force_host_platform_device_count=4"
             " --xla_cpu_enable_concurrency_optimized_scheduler=false"
             " --xla_backend_optimization_level=0")
  code = ("import json, sys; from train import pretrain; "
          "print('summary', json.dumps(pretrain.main(sys.argv[1:])))")
  logs = [(tmp_path / f"{i}.out", tmp_path / f"{i}.err") for i in range(2)]
  with contextlib.ExitStack() as files:  # files, not pipes: a full pipe would block one
    procs = [subprocess.Popen(
        [sys.executable, "-c", code, *RUN, "--mesh", "fsdp=4", "--dcn-mesh", "data=2",
         "--out", str(tmp_path)], cwd=ROOT, env=dict(env, JAX_PROCESS_ID=str(i)),
        stdout=files.enter_context(open(o, "w")), stderr=files.enter_context(open(e, "w")))
        for i, (o, e) in enumerate(logs)]
    try:
      for p in procs:
        p.wait(timeout=180)
    finally:
      for p in procs:
        p.kill()
  results = [(o.read_text(), e.read_text()) for o, e in logs]
  for p, (stdout, stderr) in zip(procs, results):
    assert p.returncode == 0, stderr[-3000:]
    assert "\r" not in stdout + stderr
  lead = results[0][0]
  assert "a hybrid mesh over 2 processes, each holding {'data': 1, 'fsdp': 4" in lead
  summaries = [json.loads(s.split("summary ", 1)[1]) for s, _ in results]
  assert summaries[0]["val_loss"] == summaries[1]["val_loss"]
  assert summaries[0]["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-5)
  ours = [(r["step"], r["loss"]) for r in _records(tmp_path) if "loss" in r]
  want = [(r["step"], r["loss"]) for r in _records(out) if "loss" in r]
  assert [s for s, _ in ours] == [s for s, _ in want] == [1, 2, 3]  # written once
  np.testing.assert_allclose([l for _, l in ours], [l for _, l in want], rtol=1e-5)
