"""Tests of the pretraining program (train/): sharded step, accumulation, resume, flags,
data and plotting. Uses the tiny model and a few steps (8 simulated CPU devices)."""

import json
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from models import sharding as shd
from models.config import LlamaConfig
from models.llama import Llama
from models.lowrank import lowrank_spec, pure_dict
from train import data, optimizers, pretrain, steps
from train.plot import main as plot_main

CFG = LlamaConfig.tiny(num_layers=2, max_seq_len=32, scan_layers=True)
SEQ = 32


def _batch(n, seed=0, k=1):
  tokens = np.random.default_rng(seed).integers(0, 256, (n, SEQ + 1)).astype(np.int32)
  return tokens.reshape(k, n // k, SEQ + 1)


def _run_step(cfg, tx, mesh, batch, params=None):
  """One jitted, sharded train step on `mesh`; `params` (host arrays) replace the init."""
  graphdef, _ = steps.abstract_model(cfg)
  init, abstract, shardings, _ = steps.state_shardings(cfg, tx, mesh)
  bs = steps.batch_sharding(mesh)
  with shd.set_mesh(mesh):
    state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
    if params is not None:
      state["params"] = jax.device_put(params, shardings["params"])
      state["opt_state"] = jax.jit(tx.init, out_shardings=shardings["opt_state"])(
          state["params"])
    step = jax.jit(steps.make_train_step(graphdef, tx), in_shardings=(shardings, bs),
                   out_shardings=(shardings, None), donate_argnums=0)
    before = jax.device_get(state["params"])
    new_state, metrics = step(state, jax.device_put(batch, bs))
    return before, jax.device_get(new_state), jax.device_get(metrics), new_state


def _record_grads():
  """Passes gradients through unchanged and keeps the last ones in its state."""
  return optax.GradientTransformation(
      lambda p: jax.tree.map(jnp.zeros_like, p), lambda g, s, p=None: (g, g))


def test_galore_scanned_step_on_8_devices_equals_one_device():
  """One train step of GaLore (its gradients recorded first) on stacked layers, sharded
  fsdp×tensor, equals the same step on one device: loss, gradients, weights. GaLore's
  unprojected leaves (embedding, norms, LM head) take plain Adam steps with moments
  sharded like the parameters, so this also covers the sharded AdamW step. The 8-device
  step runs twice: on a mesh of Explicit axes (the trainer's default) and on one of Auto
  axes (MaxText's default, `--shard-mode auto`), where the compiler propagates the specs
  the trainer gives the state."""
  import optax_lowrank
  assert jax.device_count() == 8, "conftest must simulate 8 CPU devices"
  abstract = pure_dict(nnx.state(steps.abstract_model(CFG)[1], nnx.Param))
  mask, dims = lowrank_spec(abstract, CFG)
  tx = optax.chain(_record_grads(), optax_lowrank.galore(
      1e-2, rank=0.25, update_proj_gap=5, eps=1e-4, projection_mask=mask,
      dimension_numbers=dims))
  batch = _batch(8, seed=3)
  one = shd.make_mesh({}, devices=jax.devices()[:1])
  params, single, m1, _ = _run_step(CFG, tx, one, batch)
  for explicit in (True, False):
    mesh = shd.make_mesh({"fsdp": 4, "tensor": 2}, explicit=explicit)
    _check_sharded_step(tx, mesh, batch, params, single, m1, mask)


def _check_sharded_step(tx, mesh, batch, params, single, m1, mask):
  """The step on `mesh` from `params` equals the one-device step (`single`, `m1`)."""
  _, sharded, m8, live = _run_step(CFG, tx, mesh, batch, params=params)
  # the 8-device state really is sharded along both mesh axes: weights and moments
  q = live["params"]["layers"]["attn"]["q"]["kernel"]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert q.addressable_shards[0].data.shape == (CFG.num_layers, CFG.d_model // 4,
                                                CFG.d_model // 2)
  lowrank = live["opt_state"][1][0]
  mu = lowrank.inner_state.mu["layers"]["attn"]["q"]["kernel"]
  assert "fsdp" in tuple(mu.sharding.spec) or "tensor" in tuple(mu.sharding.spec)
  head_mu = lowrank.inner_state.mu["lm_head"]["kernel"]  # Adam's, parameter-shaped
  assert head_mu.sharding.spec == live["params"]["lm_head"]["kernel"].sharding.spec
  np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
               sharded["opt_state"][0], single["opt_state"][0])  # the gradients
  # Adam's first update lr·g/(|g|+eps) amplifies float32 noise in small gradients by up
  # to lr/eps = 100, so ~1e-8 gradient noise allows ~1e-6 (rarely 1e-5) in the weights;
  # a sharding mistake would show up at the size of the update itself, lr = 1e-2.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               sharded["params"], single["params"])
  # the step moved every weight, so the equality is not vacuous: by about lr where Adam
  # steps, and GaLore's projected kernels by a visible amount
  moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), single["params"], params)
  for m, projected in zip(jax.tree.leaves(moved), jax.tree.leaves(mask), strict=True):
    assert m > (1e-4 if projected else 1e-3), (m, projected)


def test_micro_batch_accumulation_equals_one_big_batch():
  tx = _record_grads()
  mesh = shd.make_mesh({}, devices=jax.devices()[:1])
  tokens = _batch(32, seed=1)
  params, acc, m4, _ = _run_step(CFG, tx, mesh, tokens.reshape(4, 8, SEQ + 1))
  # independent reference: plain value_and_grad of the mean loss over the whole batch
  graphdef, _ = steps.abstract_model(CFG)
  loss, grads = jax.jit(jax.value_and_grad(steps.make_loss_fn(graphdef)))(params, tokens[0])
  np.testing.assert_allclose(m4["loss"], loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
               acc["opt_state"], jax.device_get(grads))


def test_subspace_accumulation_step_equals_one_big_batch():
  """vlorp through optax_lowrank.MultiSteps over 4 micro-batches (no clipping) gives the
  same step as vlorp on the whole batch: projection is linear and the matrix is drawn
  once per step."""
  import optax_lowrank as ol
  cfg = CFG.replace(d_model=64, d_ff=160)
  graphdef, abstract = steps.abstract_model(cfg)
  mask, dims = lowrank_spec(pure_dict(nnx.state(abstract, nnx.Param)), cfg)
  make = lambda: ol.vlorp(1e-2, rank=2, granularity=4, projection_mask=mask,
                          dimension_numbers=dims)
  mesh = shd.make_mesh({}, devices=jax.devices()[:1])
  tokens = _batch(16, seed=3)
  params, whole, m1, _ = _run_step(cfg, make(), mesh, tokens.reshape(1, 16, SEQ + 1))
  acc = ol.MultiSteps(make(), 4)
  init, _, shardings, _ = steps.state_shardings(cfg, acc, mesh)
  with shd.set_mesh(mesh):
    state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
    step = jax.jit(steps.make_subspace_train_step(graphdef, acc, clip=0.0))
    new, m4 = jax.device_get(step(state, tokens.reshape(4, 4, SEQ + 1)))
  np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)
  for path in (("layers", "attn", "q", "kernel"), ("layers", "mlp", "down", "kernel"),
               ("embed",)):
    a, b, p = new["params"], whole["params"], params
    for k in path:
      a, b, p = a[k], b[k], p[k]
    assert np.abs(a - b).max() <= 1e-4 * np.abs(b - p).max(), path  # step ~1e-2


def test_accumulate_flag_picks_the_path():
  # auto falls back to full-size accumulation for APOLLO, whose update reads the full
  # gradient; --accumulate subspace refuses it with one line naming the flag.
  cfg = CFG.replace(d_model=64, d_ff=160)
  abstract = pure_dict(nnx.state(steps.abstract_model(cfg)[1], nnx.Param))
  mask, dims = lowrank_spec(abstract, cfg)
  schedule = optax.constant_schedule(1e-2)
  for mode, expected in (("auto", None), ("full", None)):
    args = pretrain.parse_args(["--optimizer", "apollo", "--rank", "4", "--micro-batches",
                                "2", "--batch-size", "16", "--accumulate", mode],
                               num_devices=8)
    assert optimizers.build_accumulating("apollo", args, schedule, mask, dims,
                                         abstract) is expected
  args = pretrain.parse_args(["--optimizer", "apollo", "--rank", "4", "--micro-batches", "2",
                              "--batch-size", "16", "--accumulate", "subspace"], num_devices=8)
  with pytest.raises(ValueError, match="--accumulate subspace"):
    optimizers.build_accumulating("apollo", args, schedule, mask, dims, abstract)
  args = pretrain.parse_args(["--optimizer", "galore", "--rank", "4", "--micro-batches", "2",
                              "--batch-size", "16"], num_devices=8)
  assert optimizers.build_accumulating("galore", args, schedule, mask, dims,
                                       abstract) is not None
  args = pretrain.parse_args(["--micro-batches", "2", "--batch-size", "16"], num_devices=8)
  assert optimizers.build_accumulating("adamw", args, schedule, mask, dims,
                                       abstract) is None  # nothing projected: full path


def _train(tmp_path, name, *extra):
  out = str(tmp_path / name)
  argv = ["--model", "tiny", "--seq-len", "32", "--batch-size", "8", "--steps", "6",
          "--eval-every", "3", "--eval-batches", "1", "--corpus-bytes", "100000",
          "--lr", "3e-3", "--out", out, *extra]
  return pretrain.main(argv), out


def _losses(out):
  with open(os.path.join(out, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return ([(r["step"], r["loss"]) for r in records if "loss" in r],
          [(r["step"], r["val_loss"]) for r in records if "val_loss" in r])


@pytest.fixture
def compilation_cache(tmp_path):
  """A persistent compilation cache for tests that run the same program several times."""
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  saved = {name: getattr(jax.config, name) for name in names}
  jax.config.update("jax_compilation_cache_dir", str(tmp_path / "xla_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  yield
  for name, value in saved.items():
    jax.config.update(name, value)
  try:  # forget the cache object bound to this test's directory
    from jax._src import compilation_cache as cc
    cc.reset_cache()
  except (ImportError, AttributeError):
    pass


def _sigterm_after(metrics, lines):
  """Sends this process SIGTERM once `metrics` has `lines` records (training is on)."""
  def wait_and_kill():
    while not (metrics.exists() and metrics.read_text().count("\n") >= lines):
      time.sleep(0.02)
    os.kill(os.getpid(), signal.SIGTERM)
  threading.Thread(target=wait_and_kill, daemon=True).start()


def test_checkpoint_resume_is_bit_exact(tmp_path, compilation_cache, monkeypatch):
  """GaLore's train state (SVD bases, the moments of projected and of plain-Adam leaves,
  step) round-trips through the trainer's checkpoints: interrupted by SIGTERM, stopped
  by --stop-at, resumed twice, it logs exactly the uninterrupted run's losses, with an
  SVD refresh after each resume (at step 20, then 30; every 10 steps). The two resumed
  runs have --out and --ckpt-dir on gs:// (a fake one, tests/fake_gcs.py, to which the
  first run's directories are moved), and write nothing under the working directory."""
  from tests.fake_gcs import fake_gcs
  from train.checkpoint import Checkpointer
  run = ("--optimizer", "galore", "--rank", "0.25", "--update-proj-gap", "10",
         "--steps", "40", "--eval-every", "10")
  straight, out_a = _train(tmp_path, "straight", *run)
  ckpt = str(tmp_path / "ckpt")
  # 1) SIGTERM mid-run: a checkpoint at the step where it stopped
  _sigterm_after(tmp_path / "resumed" / "metrics.jsonl", 2)
  first, _ = _train(tmp_path, "resumed", *run, "--ckpt-dir", ckpt)
  assert first["interrupted"] and 2 <= first["step"] <= 20, first
  assert Checkpointer(ckpt).latest_step() == first["step"]
  # 2) resume from gs://, stop again at a fixed step; 3) resume to the end
  bucket = tmp_path / "gcs" / "bucket"
  bucket.mkdir(parents=True)
  for name in ("resumed", "ckpt"):
    os.rename(tmp_path / name, bucket / name)
  (tmp_path / "cwd").mkdir()
  monkeypatch.chdir(tmp_path / "cwd")
  remote = ("--out", "gs://bucket/resumed", "--ckpt-dir", "gs://bucket/ckpt")
  with fake_gcs(tmp_path / "gcs", monkeypatch):
    second, _ = _train(tmp_path, "resumed", *run, *remote, "--stop-at", "25")
    assert second["interrupted"] and second["step"] == 25
    third, _ = _train(tmp_path, "resumed", *run, *remote)
    assert Checkpointer("gs://bucket/ckpt").steps() == [first["step"], 25, 40]
  assert os.listdir(tmp_path / "cwd") == []
  out_b = bucket / "resumed"
  train_a, val_a = _losses(out_a)
  train_b, val_b = _losses(out_b)
  assert [s for s, _ in train_a] == list(range(1, 41))
  assert train_b == train_a  # exact float equality, step for step
  assert val_b == val_a
  assert third["val_loss"] == straight["val_loss"]
  assert train_a[-1][1] < train_a[0][1]  # and it trained


def test_end_to_end_outputs_and_baseline(tmp_path, capsys):
  """The whole program on a 2x2x2 mesh with scanned, rematerialized layers, VLoRP and two
  micro-batches accumulated in the subspace (`--accumulate auto`)."""
  summary, out = _train(tmp_path, "e2e", "--micro-batches", "2", "--mesh",
                        "data=2,fsdp=2,tensor=2", "--scan-layers", "--remat", "full",
                        "--optimizer", "vlorp", "--opt-args", "granularity=4")
  assert "in the subspace" in capsys.readouterr().out
  for name in ("metrics.jsonl", "config.json", "summary.json", "loss.png"):
    assert os.path.exists(os.path.join(out, name)), name
  with open(os.path.join(out, "metrics.jsonl")) as f:
    assert any("micro_grad_norm" in json.loads(line) for line in f)
  assert np.isfinite(summary["val_loss"])
  assert summary["val_ppl"] == pytest.approx(np.exp(summary["val_loss"]))
  assert 2.0 < summary["unigram_loss"] < np.log(260)


def test_galore_from_the_registry_projects_exactly_the_model_spec():
  pytest.importorskip("optax_lowrank")
  args = pretrain.parse_args(["--optimizer", "galore", "--rank", "0.25",
                              "--update-proj-gap", "5"], num_devices=8)
  assert args.rank == 0.25
  cfg = CFG.replace(d_model=64, d_ff=160)  # small matrices: exact SVDs stay cheap on CPU
  abstract = pure_dict(nnx.state(steps.abstract_model(cfg)[1], nnx.Param))
  mask, dims = lowrank_spec(abstract, cfg)
  tx = optimizers.build("galore", args, optax.constant_schedule(1e-2), mask, dims)
  one = shd.make_mesh({}, devices=jax.devices()[:1])
  params, new, metrics, _ = _run_step(cfg, tx, one, _batch(4, seed=2))
  assert np.isfinite(metrics["loss"]) and int(new["step"]) == 1
  rank = int(0.25 * cfg.d_model)
  for name in ("q", "o"):  # projected: every layer's update has rank <= 0.25·64
    delta = new["params"]["layers"]["attn"][name]["kernel"] - params["layers"]["attn"][name]["kernel"]
    for layer in delta:
      assert 0 < np.linalg.matrix_rank(layer, tol=1e-7) <= rank
  # not projected (LM head): a full-rank Adam update
  delta = new["params"]["lm_head"]["kernel"] - params["lm_head"]["kernel"]
  assert np.linalg.matrix_rank(delta, tol=1e-7) > rank


_OPT_ARGS = {"galore": "rank=4", "fira": "rank=4", "apollo": "rank=4",
             "flora": "rank=4,min_dim_size_to_factor=16",
             "osd": "rank=4", "dct_adamw": "rank=4", "grass": "rank=4",
             "adarankgrad": "rank=4", "galore_8bit": "rank=4", "q_galore": "rank=4",
             "coap": "rank=4", "golore": "rank=4", "gradnorm_lorp": "rank=4",
             "vlorp": "granularity=4",
             "gum": "rank=4,full_rank_layers=1",
             "owlore": "rank=4"}  # the test model's sides are 64 and 160


@pytest.mark.parametrize("name", sorted(__import__("optax_lowrank").optimizers))
def test_every_registered_optimizer_is_built_by_name_with_the_model_spec(name):
  """`--optimizer <name>` builds every alias of the library's registry through the
  trainer with the model's mask and dimension numbers (scanned layers): the projected
  MLP kernel has a basis, the LM head none, and the update has the parameters' shapes
  (traced only; each alias's numbers are tested in test_aliases.py, and one full train
  step by name runs in `test_a_registered_optimizer_trains_by_name`)."""
  import optax_lowrank as ol
  args = pretrain.parse_args(["--optimizer", name, "--opt-args", _OPT_ARGS.get(name, "")],
                             num_devices=8)
  cfg = CFG.replace(d_model=64, d_ff=160)
  abstract = pure_dict(nnx.state(steps.abstract_model(cfg)[1], nnx.Param))
  mask, dims = lowrank_spec(abstract, cfg)
  tx = optimizers.build(name, args, optax.constant_schedule(1e-2), mask, dims)
  state = jax.eval_shape(tx.init, abstract)
  updates = jax.eval_shape(lambda s, p: tx.update(p, s, p)[0], state, abstract)
  assert jax.tree.map(lambda u, p: (u.shape, u.dtype) == (p.shape, p.dtype),
                      updates, abstract) == jax.tree.map(lambda _: True, abstract)
  lowrank = [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(
      x, ol.LowRankState)) if isinstance(x, ol.LowRankState)]
  assert len(lowrank) == 1, name
  bases = lowrank[0].bases
  assert isinstance(bases["layers/mlp/up/kernel"], ol.LeafBasis), name
  assert "lm_head/kernel" not in bases, name


def test_adamw_lr_scaled_scales_the_projected_leaves_update():
  """`--optimizer adamw_lr_scaled` (GaLore's per-group rates): the update of every
  projected leaf is `--scale` times plain `optax.adamw`'s, every other leaf's is equal;
  it refuses the flags it does not take."""
  args = pretrain.parse_args(["--optimizer", "adamw_lr_scaled", "--scale", "0.3",
                              "--weight-decay", "0.1"], num_devices=8)
  cfg = CFG.replace(d_model=64, d_ff=160)
  abstract = pure_dict(nnx.state(steps.abstract_model(cfg)[1], nnx.Param))
  mask, dims = lowrank_spec(abstract, cfg)
  tx = optimizers.build("adamw_lr_scaled", args, optax.constant_schedule(1e-2), mask, dims,
                        clip=False)
  rng = np.random.default_rng(0)
  params, grads = (jax.tree.map(lambda x: rng.standard_normal(x.shape, np.float32),
                                abstract) for _ in range(2))
  first_update = lambda t: jax.jit(lambda g, p: t.update(g, t.init(p), p)[0])(grads, params)
  expected = first_update(optax.adamw(1e-2, eps=1e-6, weight_decay=0.1))
  updates = first_update(tx)
  assert any(jax.tree.leaves(mask)) and not all(jax.tree.leaves(mask))
  jax.tree.map(lambda u, e, m: np.testing.assert_allclose(u, e * (0.3 if m else 1.0),
                                                          rtol=1e-6, atol=1e-9),
               updates, expected, mask)
  args = pretrain.parse_args(["--optimizer", "adamw_lr_scaled", "--rank", "4"],
                             num_devices=8)
  with pytest.raises(ValueError, match="adamw_lr_scaled takes no --rank"):
    optimizers.build("adamw_lr_scaled", args, optax.constant_schedule(1e-2), mask, dims)


def test_a_registered_optimizer_trains_by_name():
  """One full jitted train step of a library alias picked by name (its own defaults)."""
  args = pretrain.parse_args(["--optimizer", "q_galore", "--opt-args", "rank=4"],
                             num_devices=8)
  cfg = CFG.replace(d_model=64, d_ff=160)
  abstract = pure_dict(nnx.state(steps.abstract_model(cfg)[1], nnx.Param))
  mask, dims = lowrank_spec(abstract, cfg)
  tx = optimizers.build("q_galore", args, optax.constant_schedule(1e-2), mask, dims)
  one = shd.make_mesh({}, devices=jax.devices()[:1])
  params, new, metrics, _ = _run_step(cfg, tx, one, _batch(4, seed=2))
  assert np.isfinite(metrics["loss"]) and int(new["step"]) == 1
  for path in (("layers", "mlp", "up", "kernel"), ("lm_head", "kernel")):
    before, after = params, new["params"]
    for k in path:
      before, after = before[k], after[k]
    assert np.all(np.isfinite(after)) and not np.array_equal(after, before), path


def test_optimizer_flags_it_does_not_take_are_refused():
  args = pretrain.parse_args(["--optimizer", "flora", "--update-proj-gap", "5"],
                             num_devices=8)
  with pytest.raises(ValueError, match="--update-proj-gap"):
    optimizers.build("flora", args, optax.constant_schedule(1e-2), None, None)
  args = pretrain.parse_args(["--optimizer", "frugal", "--opt-args", "rank=3"],
                             num_devices=8)
  with pytest.raises(ValueError, match="rank"):
    optimizers.build("frugal", args, optax.constant_schedule(1e-2), None, None)


@pytest.mark.parametrize("argv,flag,allowed", [
    (["--model", "huge"], "--model", "60m"),
    (["--optimizer", "nope"], "--optimizer", "adamw"),
    (["--remat", "some"], "--remat", "dots"),
    (["--batch-size", "12", "--mesh", "fsdp=8"], "--batch-size", "8"),
    (["--batch-size", "16", "--micro-batches", "3"], "--micro-batches", None),
    (["--data", "/no/such/file.txt"], "--data", None),
    (["--mesh", "data=3"], "--mesh", None),
    (["--mesh", "pipeline=8"], "--mesh", "tensor"),
    (["--steps", "0"], "--steps", None),
    (["--rank", "-2"], "--rank", None),
    (["--seq-len", "4096"], "--seq-len", None),
    (["--config", "/no/such.json"], "--config", None),
])
def test_bad_flags_fail_with_one_line_naming_the_flag(argv, flag, allowed, capsys):
  with pytest.raises(SystemExit) as e:
    pretrain.parse_args(argv, num_devices=8)
  assert e.value.code == 2
  message = capsys.readouterr().err.strip().splitlines()[-1]
  assert flag in message, message
  if allowed:
    assert allowed in message, message


def test_config_file_sets_flags_and_command_line_wins(tmp_path):
  path = tmp_path / "run.json"
  path.write_text(json.dumps({"lr": 0.5, "batch-size": 64, "optimizer": "adamw"}))
  args = pretrain.parse_args(["--config", str(path), "--lr", "0.1"], num_devices=8)
  assert args.lr == 0.1 and args.batch_size == 64
  path.write_text(json.dumps({"learning_rate": 0.5}))
  with pytest.raises(SystemExit):
    pretrain.parse_args(["--config", str(path)], num_devices=8)


def test_sampler_is_a_pure_function_of_seed_and_step():
  tokens = np.arange(10_000, dtype=np.uint16)
  a = data.sample_batch(tokens, seed=1, step=7, batch_size=4, seq_len=16)
  assert a.shape == (4, 17)
  np.testing.assert_array_equal(a, data.sample_batch(tokens, 1, 7, 4, 16))
  assert not np.array_equal(a, data.sample_batch(tokens, 1, 8, 4, 16))
  assert not np.array_equal(a, data.sample_batch(tokens, 2, 7, 4, 16))
  np.testing.assert_array_equal(np.diff(a, axis=1), 1)  # contiguous windows
  e0, e1 = data.eval_batch(tokens, 0, 4, 16), data.eval_batch(tokens, 1, 4, 16)
  starts = np.concatenate([e0[:, 0], e1[:, 0]])
  assert len(set(starts)) == 8 and np.all(np.diff(np.sort(starts)) >= 16)  # no overlap


def test_default_corpus_is_deterministic_and_split_disjointly():
  docs = data.stdlib_documents(1_500_000)
  assert docs == data.stdlib_documents(1_500_000)
  train, val = data.split_documents(docs, 0.2)
  names_t, names_v = {n for n, _ in train}, {n for n, _ in val}
  assert names_t.isdisjoint(names_v) and len(names_t) + len(names_v) == len(docs)
  assert val and len(val) < len(train)
  assert "pydoc_data/topics" in names_t | names_v
  corpus = data.load_corpus(max_bytes=1_500_000, val_fraction=0.2)
  text = bytes(corpus.train[corpus.train < 256].astype(np.uint8))
  checked = 0
  for _, doc in val:
    raw = doc.encode()
    if len(raw) > 1000:
      middle = raw[len(raw) // 2: len(raw) // 2 + 300]
      assert middle not in text
      checked += 1
  assert checked >= 3
  again = data.load_corpus(max_bytes=1_500_000, val_fraction=0.2)
  np.testing.assert_array_equal(corpus.val, again.val)
  np.testing.assert_array_equal(corpus.train, again.train)


def test_file_corpora(tmp_path):
  docs = [f"document number {i} " * (i + 1) for i in range(40)]
  jsonl = tmp_path / "d.jsonl"
  jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
  c = data.load_corpus(str(jsonl), val_fraction=0.25)
  assert len(c.train) + len(c.val) == sum(len(d) + 1 for d in docs)  # bytes + one EOS each
  assert 0 < len(c.val) < len(c.train)
  txt = tmp_path / "d.txt"
  txt.write_text("\n".join(docs))
  c = data.load_corpus(str(txt), val_fraction=0.0)
  assert bytes(c.train[c.train < 256].astype(np.uint8)).decode() == "\n".join(docs)
  tokens = np.arange(3 * data.BIN_BLOCK_TOKENS, dtype=np.uint32) % 50_000
  tokens.tofile(tmp_path / "t.bin")
  c = data.load_corpus(str(tmp_path / "t.bin"), data_dtype="uint32", val_fraction=0.0)
  np.testing.assert_array_equal(c.train, tokens)
  assert c.vocab_size == 50_000


def test_token_ids_beyond_the_vocabulary_are_refused(tmp_path):
  path = tmp_path / "tokens.bin"
  (np.arange(3 * data.BIN_BLOCK_TOKENS, dtype=np.uint16) % 300).tofile(path)
  with pytest.raises(SystemExit, match="--vocab-size.*299"):
    pretrain.main(["--data", str(path), "--vocab-size", "260", "--seq-len", "16",
                   "--batch-size", "8", "--val-fraction", "0.5", "--out", str(tmp_path)])


def test_cross_entropy_matches_optax():
  logits = jax.random.normal(jax.random.key(0), (2, 5, 11)) * 3
  labels = jax.random.randint(jax.random.key(1), (2, 5), 0, 11)
  want = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  np.testing.assert_allclose(steps.cross_entropy(logits, labels), want, rtol=1e-6)


def test_unigram_entropy_and_schedule():
  assert data.unigram_entropy(np.array([0, 0, 1, 1]), 4) == pytest.approx(np.log(2))
  assert data.unigram_entropy(np.array([3, 3, 3]), 4) == pytest.approx(0.0)
  sched = optimizers.make_schedule(1.0, 100, 0.1, 0.1)
  assert float(sched(0)) == 0.0 and float(sched(5)) == pytest.approx(0.5)
  assert float(sched(10)) == pytest.approx(1.0)
  assert float(sched(100)) == pytest.approx(0.1)
  assert float(sched(55)) == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-6)  # cosine midpoint


def test_plot_cli_overlays_runs(tmp_path):
  for name, offset in (("a", 0.0), ("b", 0.5)):
    run = tmp_path / name
    run.mkdir()
    with open(run / "metrics.jsonl", "w") as f:
      for s in range(1, 6):
        f.write(json.dumps({"step": s, "loss": 5 - s + offset}) + "\n")
      f.write(json.dumps({"step": 5, "val_loss": 1.0 + offset, "val_ppl": 3.0}) + "\n")
  out = tmp_path / "cmp.png"
  plot_main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)])
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(SystemExit):
    plot_main([str(tmp_path / "missing"), "--out", str(out)])
