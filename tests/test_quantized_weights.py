"""Tests of `--weight-quant int8` (train/weight_quant.py): Q-GaLore's int8 projected
matrices with stochastic rounding, through the whole trainer on the tiny model (8
simulated CPU devices, scanned layers)."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from optax_lowrank import quantize as qlib
from train import pretrain, weight_quant
from tests.compile_cache import compilation_cache

BLOCK = weight_quant.BLOCK_SIZE


def _block_scale(x):
  """Each element's block step from the formula, in float64: (max − min)/255 over its
  block of 256 consecutive elements (row-major)."""
  blocks = np.asarray(x, np.float64).reshape(-1, BLOCK)
  scale = (blocks.max(axis=1) - blocks.min(axis=1)) / 255
  return np.repeat(scale, BLOCK).reshape(np.shape(x))


def test_stochastic_rounding_of_the_update_is_unbiased():
  weights = weight_quant.Int8Weights({"w": True, "b": False}, seed=0)
  rng = np.random.default_rng(0)
  w = rng.normal(0.0, 0.02, (8, 2 * BLOCK)).astype(np.float32)
  stored = weights.store({"w": jnp.asarray(w), "b": jnp.zeros(3)})
  q = stored["w"]
  assert q.codes.dtype == jnp.uint8 and q.codes.shape == (8, 2, BLOCK)
  assert isinstance(stored["b"], jax.Array)  # unselected leaves are left alone
  # an update of about a third of a code step: round-to-nearest would mostly drop it
  old = np.asarray(qlib.dequantize(q), np.float64)
  target = old + 0.3 * _block_scale(old) * rng.standard_normal(w.shape)  # float64
  new = {"w": jnp.asarray(target, jnp.float32), "b": jnp.ones(3)}
  n = 1000
  draw = jax.jit(jax.vmap(lambda s: weights.round(stored, new, s)["w"]))(jnp.arange(n))
  draws = np.asarray(jax.jit(jax.vmap(qlib.dequantize))(draw), np.float64)
  scale = _block_scale(target)
  np.testing.assert_allclose(draw.scale[0].reshape(-1), scale[:, ::BLOCK].reshape(-1),
                             rtol=1e-5)
  # each draw is within one step of the exact weight (float32 slack: 1e-6 of the step)
  assert np.all(np.abs(draws - target) <= scale * (1 + 1e-6) + 1e-9)
  # unbiased: a draw's variance is at most scale²/4, so the mean of n is within 5σ
  bias = np.abs(draws.mean(axis=0) - target)
  assert np.all(bias <= 5 * scale / (2 * np.sqrt(n)))
  # ... far below the error of rounding to nearest (up to half a step)
  nearest = np.asarray(jax.jit(lambda x: qlib.dequantize(qlib.requantize(q, x)))(new["w"]),
                       np.float64)
  assert np.max(np.abs(nearest - target) / scale) > 0.4
  assert np.max(bias / scale) < 0.1
  # the key is a function of the step: reproducible, different from step to step
  again = jax.jit(lambda s: weights.round(stored, new, s)["w"].codes)
  np.testing.assert_array_equal(again(5), draw.codes[5])
  assert not np.array_equal(draw.codes[5], draw.codes[6])


def _train(out, *extra):
  argv = ["--model", "tiny", "--seq-len", "32", "--batch-size", "8", "--steps", "6",
          "--eval-every", "3", "--eval-batches", "1", "--corpus-bytes", "100000",
          "--lr", "3e-3", "--scan-layers", "--out", str(out), *extra]
  return pretrain.main(argv)


def _losses(out):
  with open(os.path.join(out, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return ([(r["step"], r["loss"]) for r in records if "loss" in r],
          [(r["step"], r["val_loss"]) for r in records if "val_loss" in r])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The float run and the int8 run (6 steps each; the int8 one checkpointed at steps 3
  and 6), with a compilation cache that the resumed run below reuses."""
  root = tmp_path_factory.mktemp("runs")
  with compilation_cache(root / "xla_cache"):
    float_run = _train(root / "float")
    int8_run = _train(root / "int8", "--weight-quant", "int8", "--ckpt-dir",
                      str(root / "ckpt"), "--ckpt-every", "3")
    yield root, float_run, int8_run


def test_int8_run_stores_codes_trains_and_stays_close_to_float(runs):
  root, float_run, int8_run = runs
  # the checkpoint holds uint8 codes and float32 scales and zeros per block of the q
  # kernel (4 stacked layers of 128 x 128: 64 blocks each); the LM head stays float32
  saved = ocp.StandardCheckpointer().metadata(str(root / "ckpt" / "6" / "default"))
  params = saved.item_metadata["params"]
  q = params["layers"]["attn"]["q"]["kernel"]
  assert (q["codes"].dtype, tuple(q["codes"].shape)) == (np.uint8, (4, 64, BLOCK))
  assert tuple(q["codes"].sharding.partition_spec) == (None, "fsdp", None)  # still FSDP
  assert (q["scale"].dtype, tuple(q["scale"].shape)) == (np.float32, (4, 64))
  assert q["zero"].dtype == np.float32
  assert params["lm_head"]["kernel"].dtype == np.float32
  # bytes: 1 per element + 8 per block in the projected matrices, 4 per element elsewhere
  total = 804_992  # the tiny model's parameters (byte vocabulary)
  projected = 4 * (128 * 128 * 2 + 128 * 64 * 2 + 128 * 352 * 3)
  assert float_run["param_bytes"] == 4 * total
  assert int8_run["param_bytes"] == projected * (1 + 8 / BLOCK) + 4 * (total - projected)
  assert float_run["param_bytes"] / int8_run["param_bytes"] > 2.9  # 3.1 MiB → 1.0 MiB
  train, _ = _losses(root / "int8")
  assert train[-1][1] < train[0][1] - 0.5
  assert abs(int8_run["val_loss"] - float_run["val_loss"]) < 0.02


def test_int8_resume_is_bit_exact(runs):
  """Resumed from the int8 run's step-3 checkpoint, steps 4-6 repeat it exactly."""
  root, _, int8_run = runs
  shutil.copytree(root / "ckpt", root / "ckpt_3")
  shutil.rmtree(root / "ckpt_3" / "6")
  resumed = _train(root / "resumed", "--weight-quant", "int8", "--ckpt-dir",
                   str(root / "ckpt_3"))
  train, val = _losses(root / "int8")
  assert _losses(root / "resumed") == ([r for r in train if r[0] > 3],
                                       [r for r in val if r[0] > 3])  # exact
  assert resumed["val_loss"] == int8_run["val_loss"]


@pytest.mark.parametrize("argv", [["--weight-quant", "int4"], ["--config", "{config}"]])
def test_bad_weight_quant_fails_naming_the_flag_and_the_choices(argv, tmp_path, capsys):
  config = tmp_path / "run.json"
  config.write_text(json.dumps({"weight-quant": "fp8"}))
  with pytest.raises(SystemExit) as e:
    pretrain.parse_args([a.format(config=config) for a in argv], num_devices=8)
  assert e.value.code == 2
  message = capsys.readouterr().err.strip().splitlines()[-1]
  assert "--weight-quant" in message and "none, int8" in message, message
