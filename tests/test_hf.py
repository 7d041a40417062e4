"""Hugging Face LLaMA import/export (models/hf.py).

Checkpoints are written here with NumPy and safetensors in the Hugging Face layout
(PyTorch `(out, in)` weights, `model.layers.{i}...` names, optional shard index), and the
loaded model's logits are checked against a float64 NumPy LLaMA forward written in this
file from the Hugging Face conventions: rotate-half RoPE, grouped-query attention
(query head n reads key/value head n // G), RMSNorm, SwiGLU, and LLaMA-3.1's frequency
scaling written as Meta's per-frequency loop.
"""

import json
import math
import pathlib

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors import safe_open
from safetensors.numpy import save_file

import models
from models import hf
from models import sharding as shd
from models.lowrank import pure_dict

D, FF, HEADS, KV_HEADS, LAYERS, VOCAB, T = 32, 64, 4, 2, 2, 50, 16
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}

# name -> (config.json, file dtype, head_dim, number of weight files, scan_layers)
CASES = {
    # transformers 4.x layout: rope_theta / rope_scaling at the top level; bfloat16 file
    "legacy_untied_bf16": (
        {"rope_theta": 10000.0, "rope_scaling": LLAMA3, "tie_word_embeddings": False,
         "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16"}, ml_dtypes.bfloat16, None, 1,
        False),
    # transformers 5.x layout: one rope_parameters dict; tied; head_dim != d/heads; sharded
    "rope_parameters_tied_sharded": (
        {"rope_parameters": {**LLAMA3, "rope_theta": 10000.0}, "tie_word_embeddings": True,
         "rms_norm_eps": 1e-6, "head_dim": 16}, np.float32, 16, 2, True),
    # LLaMA-2 style: no scaling, another theta
    "default_rope": (
        {"rope_theta": 500.0, "rope_scaling": None, "rms_norm_eps": 1e-5, "head_dim": 8},
        np.float32, None, 1, True),
}


def _hf_config(extra):
  return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB,
          "hidden_size": D, "intermediate_size": FF, "num_hidden_layers": LAYERS,
          "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
          "max_position_embeddings": 2048, "hidden_act": "silu", **extra}


def _hf_tensors(seed, head_dim, tied, dtype):
  """Random weights in the Hugging Face layout, stored as `dtype`."""
  rng = np.random.default_rng(seed)
  h = head_dim or D // HEADS
  w = lambda *shape: rng.normal(0.0, 0.3, shape)
  norm = lambda: 1.0 + 0.2 * rng.normal(size=(D,))
  t = {"model.embed_tokens.weight": w(VOCAB, D), "model.norm.weight": norm()}
  if not tied:
    t["lm_head.weight"] = w(VOCAB, D)
  for i in range(LAYERS):
    p = f"model.layers.{i}."
    t |= {p + "input_layernorm.weight": norm(), p + "post_attention_layernorm.weight": norm(),
          p + "self_attn.q_proj.weight": w(HEADS * h, D),
          p + "self_attn.k_proj.weight": w(KV_HEADS * h, D),
          p + "self_attn.v_proj.weight": w(KV_HEADS * h, D),
          p + "self_attn.o_proj.weight": w(D, HEADS * h),
          p + "mlp.gate_proj.weight": w(FF, D), p + "mlp.up_proj.weight": w(FF, D),
          p + "mlp.down_proj.weight": w(D, FF)}
  return {k: v.astype(dtype) for k, v in t.items()}


def _write(path, config, tensors, files=1):
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps(config))
  names = sorted(tensors)
  if files == 1:
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path
  weight_map = {}
  for f in range(files):
    file = f"model-{f + 1:05d}-of-{files:05d}.safetensors"
    part = {n: tensors[n] for n in names[f::files]}
    save_file(part, str(path / file), metadata={"format": "pt"})
    weight_map |= {n: file for n in part}
  (path / "model.safetensors.index.json").write_text(
      json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
  return path


def _case(tmp_path, name, seed=0):
  extra, dtype, head_dim, files, scan = CASES[name]
  config = _hf_config(extra)
  tensors = _hf_tensors(seed, head_dim, config.get("tie_word_embeddings", False), dtype)
  return _write(tmp_path / name, config, tensors, files), config, tensors, scan


# ------------------------------------------------------------- float64 reference


def _inv_freq(config, head_dim, scaled=True):
  """RoPE frequencies; LLaMA-3.1 scaling written as Meta's reference loop."""
  rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
  theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
  freqs = [1.0 / theta ** (2 * i / head_dim) for i in range(head_dim // 2)]
  if not scaled or rope.get("rope_type", "default") != "llama3":
    return np.array(freqs)
  factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
  old = rope["original_max_position_embeddings"]
  out = []
  for f in freqs:
    wavelen = 2 * math.pi / f
    if wavelen < old / high:
      out.append(f)
    elif wavelen > old / low:
      out.append(f / factor)
    else:
      smooth = (old / wavelen - low) / (high - low)
      out.append((1 - smooth) * f / factor + smooth * f)
  return np.array(out)


def _reference_logits(config, tensors, tokens, scaled_rope=True):
  """The LLaMA forward of `config` / `tensors` (Hugging Face layout) in float64."""
  w = {k: np.asarray(v, np.float64) for k, v in tensors.items()}
  h = config.get("head_dim") or D // HEADS
  eps, groups = config["rms_norm_eps"], HEADS // KV_HEADS
  freq = _inv_freq(config, h, scaled_rope)
  angle = np.arange(tokens.shape[1])[:, None] * freq[None, :]  # (T, h/2)
  cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]

  def rms(x, weight):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * weight

  def rotate(x):  # (B, T, heads, h): pairs (i, i + h/2)
    x1, x2 = x[..., : h // 2], x[..., h // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

  b, t = tokens.shape
  x = w["model.embed_tokens.weight"][tokens]
  causal = np.tril(np.ones((t, t), bool))
  for i in range(LAYERS):
    p = f"model.layers.{i}."
    a = rms(x, w[p + "input_layernorm.weight"])
    q = rotate((a @ w[p + "self_attn.q_proj.weight"].T).reshape(b, t, HEADS, h))
    k = rotate((a @ w[p + "self_attn.k_proj.weight"].T).reshape(b, t, KV_HEADS, h))
    v = (a @ w[p + "self_attn.v_proj.weight"].T).reshape(b, t, KV_HEADS, h)
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)  # head n -> n // G
    s = np.einsum("bqnh,bknh->bnqk", q, k) / math.sqrt(h)
    s = np.where(causal, s, -np.inf)
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    o = np.einsum("bnqk,bknh->bqnh", s, v).reshape(b, t, HEADS * h)
    x = x + o @ w[p + "self_attn.o_proj.weight"].T
    m = rms(x, w[p + "post_attention_layernorm.weight"])
    gate = m @ w[p + "mlp.gate_proj.weight"].T
    hidden = gate / (1 + np.exp(-gate)) * (m @ w[p + "mlp.up_proj.weight"].T)
    x = x + hidden @ w[p + "mlp.down_proj.weight"].T
  x = rms(x, w["model.norm.weight"])
  head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
  return x @ head.T


def _rel(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def _tokens(seed=0, batch=2):
  return np.random.default_rng(seed).integers(0, VOCAB, (batch, T))


# ------------------------------------------------------------------------ tests


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_a_float64_reference(tmp_path, name):
  path, config, tensors, scan = _case(tmp_path, name)
  model = models.from_pretrained(path, scan_layers=scan)
  tokens = _tokens()
  logits = np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens))
  ref = _reference_logits(config, tensors, tokens)
  assert logits.shape == (2, T, VOCAB) and logits.dtype == np.float32
  assert _rel(logits, ref) <= 1e-4, _rel(logits, ref)
  cfg = model.cfg
  assert cfg.scan_layers == scan and cfg.norm_eps == config["rms_norm_eps"]
  assert cfg.tie_embeddings == config.get("tie_word_embeddings", False)
  assert ("lm_head" in pure_dict(nnx.state(model, nnx.Param))) != cfg.tie_embeddings
  if "llama3" in json.dumps(config):
    # negative control: without LLaMA-3.1's frequency scaling the logits are far off
    assert _rel(logits, _reference_logits(config, tensors, tokens, scaled_rope=False)) > 1e-2


@pytest.mark.parametrize("name,param_dtype", [("legacy_untied_bf16", "bfloat16"),
                                              ("rope_parameters_tied_sharded", None)])
def test_save_pretrained_writes_the_hugging_face_tensors_back_exactly(tmp_path, name,
                                                                      param_dtype):
  path, config, tensors, scan = _case(tmp_path, name)
  model = models.from_pretrained(path, param_dtype=param_dtype, scan_layers=scan)
  out = tmp_path / "saved"
  models.save_pretrained(model, out, max_shard_bytes=20_000)  # forces several files
  index = json.loads((out / "model.safetensors.index.json").read_text())
  files = sorted(set(index["weight_map"].values()))
  assert len(files) > 1 and sorted(p.name for p in out.glob("*.safetensors")) == files
  written = {}
  for file in files:
    with safe_open(str(out / file), framework="np") as f:
      assert f.metadata() == {"format": "pt"}
      written |= {k: f.get_tensor(k) for k in f.keys()}
  assert sorted(written) == sorted(tensors)  # same names; no lm_head when tied
  for k, v in tensors.items():
    assert written[k].dtype == v.dtype and np.array_equal(written[k], v), k
  saved = json.loads((out / "config.json").read_text())
  assert saved["tie_word_embeddings"] == config.get("tie_word_embeddings", False)
  assert saved["rope_scaling"] == LLAMA3 and saved["rope_theta"] == 10000.0
  assert saved["head_dim"] == (config.get("head_dim") or D // HEADS)
  assert saved["rms_norm_eps"] == config["rms_norm_eps"]
  # and back: the same config and bit-identical parameters
  again = models.from_pretrained(out, param_dtype=param_dtype, scan_layers=scan)
  assert again.cfg == model.cfg
  same = jax.tree.map(lambda a, b: a.dtype == b.dtype and np.array_equal(a, b),
                      nnx.state(again, nnx.Param), nnx.state(model, nnx.Param))
  assert all(jax.tree.leaves(same))


def test_loading_under_a_mesh_reads_only_each_devices_block(tmp_path, monkeypatch):
  if jax.device_count() < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
  path, config, tensors, scan = _case(tmp_path, "rope_parameters_tied_sharded")
  reads = []
  read_block = hf._read_block

  def spy(tensor, *args):
    block = read_block(tensor, *args)
    reads.append((math.prod(tensor.get_shape()), len(tensor.get_shape()), block.size))
    return block

  monkeypatch.setattr(hf, "_read_block", spy)
  mesh = shd.make_mesh({"fsdp": 4, "tensor": 2})
  model = models.from_pretrained(path, scan_layers=scan, mesh=mesh)
  params = pure_dict(nnx.state(model, nnx.Param))
  abstract = nnx.state(nnx.eval_shape(lambda: models.Llama(model.cfg, rngs=nnx.Rngs(0))),
                       nnx.Param)
  specs = pure_dict(shd.param_specs(abstract, shd.RULES, mesh))
  got = {jax.tree_util.keystr(k): v.sharding
         for k, v in jax.tree_util.tree_leaves_with_path(params)}
  want = {jax.tree_util.keystr(k): NamedSharding(mesh, s)
          for k, s in jax.tree_util.tree_leaves_with_path(
              specs, is_leaf=lambda x: isinstance(x, P))}
  assert got == want
  assert want["['layers']['attn']['q']['kernel']"].spec == P(None, "fsdp", "tensor")
  assert want["['embed']"].spec == P("tensor", "fsdp")
  # each device read only its block: every matrix here is split 4 x 2, the norms not
  assert reads and all(block * (8 if ndim == 2 else 1) == whole
                       for whole, ndim, block in reads)
  # the same values as the unsharded load, and the same logits
  plain = pure_dict(nnx.state(models.from_pretrained(path, scan_layers=scan), nnx.Param))
  assert all(jax.tree.leaves(jax.tree.map(
      lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), params, plain)))
  tokens = _tokens(1, batch=4)  # the batch axis is split over data x fsdp = 4
  with shd.set_mesh(mesh):
    batch = jax.device_put(tokens, NamedSharding(mesh, P(("data", "fsdp"))))
    logits = nnx.jit(lambda m, t: m(t))(model, batch)
  assert _rel(logits, _reference_logits(config, tensors, tokens)) <= 1e-4


REFUSED = [
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}},
     "rope_parameters.rope_type"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling.rope_type"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"model_type": "mistral"}, "model_type"),
    ({"architectures": ["MistralForCausalLM"]}, "architectures"),
]


@pytest.mark.parametrize("change,field", REFUSED, ids=[f for _, f in REFUSED])
def test_unsupported_config_fields_are_refused_in_one_line(change, field):
  config = {**_hf_config({"rope_theta": 10000.0, "rms_norm_eps": 1e-5}), **change}
  with pytest.raises(ValueError, match=f"`{field}`") as err:
    hf.config_from_hf(config)
  assert "\n" not in str(err.value)


def test_unexpected_missing_or_misshapen_tensors_are_named(tmp_path):
  config = _hf_config({"rope_theta": 10000.0, "rms_norm_eps": 1e-5})
  tensors = _hf_tensors(0, None, False, np.float32)
  bias = "model.layers.1.self_attn.q_proj.bias"
  path = _write(tmp_path / "bias", config, {**tensors, bias: np.zeros(D, np.float32)})
  with pytest.raises(ValueError, match=bias):
    models.from_pretrained(path)
  path = _write(tmp_path / "head_dim", {**config, "head_dim": 16}, tensors)
  with pytest.raises(ValueError, match=r"k_proj.weight' has shape \(16, 32\)"):
    models.from_pretrained(path)  # the config's heads are 16 wide, the file's 8
  del tensors["model.layers.0.mlp.up_proj.weight"]
  path = _write(tmp_path / "missing", config, tensors)
  with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj.weight"):
    models.from_pretrained(path)


def test_config_translation_and_new_field_validation():
  cfg = hf.config_from_hf(_hf_config({"rope_parameters": {**LLAMA3, "rope_theta": 5e5},
                                      "rms_norm_eps": 1e-5, "head_dim": 16}))
  assert (cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.num_kv_heads, cfg.num_layers) == (
      D, FF, HEADS, KV_HEADS, LAYERS)
  assert (cfg.head_dim, cfg.head_dim_override, cfg.rope_theta, cfg.rope_type) == (
      16, 16, 5e5, "llama3")
  assert (cfg.rope_factor, cfg.rope_original_max_len, cfg.max_seq_len) == (8.0, 1024, 2048)
  # num_key_value_heads absent: multi-head attention, as transformers reads it
  assert hf.config_from_hf({"hidden_size": 64, "num_attention_heads": 4}).num_kv_heads == 4
  with pytest.raises(ValueError, match="rope_type"):
    models.LlamaConfig(rope_type="yarn")
  with pytest.raises(ValueError, match="rope_low_freq_factor < rope_high_freq_factor"):
    models.LlamaConfig(rope_type="llama3", rope_low_freq_factor=4.0)
  with pytest.raises(ValueError, match="head_dim_override"):
    models.LlamaConfig(head_dim_override=0)


def test_the_readme_install_brings_what_this_file_imports():
  tomllib = pytest.importorskip("tomllib")  # the standard library from Python 3.11
  root = pathlib.Path(__file__).parents[1]
  extras = tomllib.loads((root / "pyproject.toml").read_text())["project"][
      "optional-dependencies"]
  installed = " ".join(extras["test"] + extras["train"])
  assert "safetensors" in installed and "tokenizers" in installed
