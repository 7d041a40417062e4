"""Tests of the Flax NNX LLaMA (models/): shapes, causality, RoPE, sizes, scan, sharding
names and the low-rank spec."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from models import sharding as shd
from models.config import LlamaConfig
from models.layers import Attention, rope
from models.llama import Llama, stack_layers
from models.lowrank import lowrank_spec, pure_dict

TINY = LlamaConfig.tiny(num_layers=2, max_seq_len=32)


@nnx.jit
def _apply(model, tokens):
  return model(tokens)


def _tokens(shape, seed=0, vocab=TINY.vocab_size):
  return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


def _paths(tree, is_leaf=None):
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  return {tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path): leaf
          for path, leaf in flat}


def test_forward_shapes_and_dtypes():
  model = Llama(TINY, rngs=nnx.Rngs(0))
  logits = _apply(model, _tokens((3, 17)))
  assert logits.shape == (3, 17, TINY.vocab_size)
  assert logits.dtype == jnp.float32
  bf16 = Llama(TINY.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))
  assert _apply(bf16, _tokens((2, 8))).dtype == jnp.bfloat16
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(bf16, nnx.Param)))


def test_config_validation_and_presets():
  with pytest.raises(ValueError, match="num_kv_heads"):
    LlamaConfig.tiny(num_kv_heads=3)
  with pytest.raises(ValueError, match="remat"):
    LlamaConfig.tiny(remat="some")
  with pytest.raises(ValueError, match="unknown model size"):
    LlamaConfig.preset("2b")
  c = LlamaConfig.preset("130m")
  assert (c.d_model, c.d_ff, c.num_heads, c.num_layers, c.vocab_size, c.max_seq_len) == (
      768, 2048, 12, 12, 32000, 256)
  assert c.head_dim == 64 and c.num_groups == 1
  assert TINY.num_groups == 2  # the tiny model exercises grouped-query attention


@pytest.mark.parametrize("scan", [False, True])
def test_causal_future_tokens_do_not_change_past_logits(scan):
  model = Llama(TINY.replace(scan_layers=scan), rngs=nnx.Rngs(1))
  a = _tokens((2, 20), seed=1)
  b = a.at[:, 12:].set(_tokens((2, 8), seed=2))
  la, lb = _apply(model, a), _apply(model, b)
  np.testing.assert_allclose(la[:, :12], lb[:, :12], rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(la[:, 12:] - lb[:, 12:])).max() > 1e-3  # the future does matter


def test_rope_matches_float64_rotation_formula():
  rng = np.random.default_rng(0)
  b, t, n, h, theta = 2, 9, 3, 8, 500.0
  x = rng.standard_normal((b, t, n, h)).astype(np.float32)
  positions = np.arange(t) + 3
  got = np.asarray(rope(jnp.asarray(x), jnp.asarray(positions), theta))
  want = np.empty((b, t, n, h))
  half = h // 2
  for p_idx, p in enumerate(positions):
    for i in range(half):
      angle = p * theta ** (-2.0 * i / h)
      x1, x2 = x[:, p_idx, :, i].astype(np.float64), x[:, p_idx, :, i + half].astype(np.float64)
      want[:, p_idx, :, i] = np.cos(angle) * x1 - np.sin(angle) * x2
      want[:, p_idx, :, i + half] = np.sin(angle) * x1 + np.cos(angle) * x2
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # grouped layout (B, T, K, G, H) gets the same rotation per head
  grouped = np.asarray(rope(jnp.asarray(x.reshape(b, t, 1, n, h)), jnp.asarray(positions), theta))
  np.testing.assert_allclose(grouped.reshape(b, t, n, h), want, rtol=1e-5, atol=1e-5)


def _rope_np(x, positions, theta):
  half = x.shape[-1] // 2
  angle = positions[:, None] * theta ** (-2.0 * np.arange(half) / x.shape[-1])  # (T, half)
  cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def test_grouped_query_attention_matches_a_float64_reference():
  cfg = TINY
  attn = Attention(cfg, rngs=nnx.Rngs(7))
  b, t, n, k, h = 2, 10, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  x = np.random.default_rng(1).standard_normal((b, t, cfg.d_model))
  got = nnx.jit(lambda m, x: m(x, jnp.arange(t)))(attn, jnp.asarray(x, jnp.float32))
  w = {name: np.asarray(getattr(attn, name).kernel[...], np.float64) for name in "qkvo"}
  pos = np.arange(t, dtype=np.float64)
  q = _rope_np((x @ w["q"]).reshape(b, t, n, h), pos, cfg.rope_theta)
  kk = _rope_np((x @ w["k"]).reshape(b, t, k, h), pos, cfg.rope_theta)
  v = (x @ w["v"]).reshape(b, t, k, h)
  group = n // k  # query head i reads key/value head i // group
  kk, v = np.repeat(kk, group, axis=2), np.repeat(v, group, axis=2)
  scores = np.einsum("btnh,bsnh->bnts", q, kk) / np.sqrt(h)
  scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  want = np.einsum("bnts,bsnh->btnh", probs, v).reshape(b, t, n * h) @ w["o"]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def _hand_count(v, d, f, n_layers, heads, kv_heads):
  head_dim = d // heads
  attn = d * heads * head_dim + 2 * d * kv_heads * head_dim + heads * head_dim * d
  per_layer = attn + 3 * d * f + 2 * d  # q,k,v,o + gate,up,down + two RMSNorm scales
  return 2 * v * d + n_layers * per_layer + d  # untied embedding and head + final norm


@pytest.mark.parametrize("name,expected", [
    ("60m", 58_073_600), ("130m", 134_105_856), ("350m", 367_969_280),
    ("1b", 1_339_082_752)])
def test_parameter_counts(name, expected):
  cfg = LlamaConfig.preset(name)
  assert _hand_count(cfg.vocab_size, cfg.d_model, cfg.d_ff, cfg.num_layers, cfg.num_heads,
                     cfg.num_kv_heads) == expected
  abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  count = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert count == expected


def test_parameter_count_with_grouped_query_attention():
  cfg = LlamaConfig.tiny()
  abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  count = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  # v=260, d=128, f=352, 4 layers, 4 heads of 32, 2 kv heads:
  # 2·260·128 + 4·(128·128 + 2·128·64 + 128·128 + 3·128·352 + 2·128) + 128
  assert count == 66_560 + 4 * (16_384 + 16_384 + 16_384 + 135_168 + 256) + 128


_GRAD = nnx.jit(nnx.grad(lambda model, tokens: jnp.mean(model(tokens) ** 2)))


@pytest.fixture(scope="module")
def unscanned():
  """An unscanned model with its logits and gradients on a fixed batch."""
  plain = Llama(TINY, rngs=nnx.Rngs(3))
  tokens = _tokens((2, 16), seed=5)
  return plain, tokens, _apply(plain, tokens), _GRAD(plain, tokens)


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scanned_equals_unscanned_with_the_same_weights(remat, unscanned):
  plain, tokens, logits, g_plain = unscanned
  scanned = Llama(TINY.replace(scan_layers=True, remat=remat), rngs=nnx.Rngs(4))
  assert not np.allclose(_apply(scanned, tokens), logits, atol=1e-3)  # different init
  nnx.update(scanned.layers, stack_layers(plain.layers))
  nnx.update(scanned, nnx.State({"embed": plain.embed}))
  nnx.update(scanned.final_norm, nnx.state(plain.final_norm))
  nnx.update(scanned.lm_head, nnx.state(plain.lm_head))
  np.testing.assert_allclose(_apply(scanned, tokens), logits, rtol=1e-5, atol=1e-5)
  # and gradients agree too (remat must not change them)
  g_scan = _GRAD(scanned, tokens)
  for layer in range(TINY.num_layers):
    for group, name in (("attn", "q"), ("mlp", "down")):
      np.testing.assert_allclose(g_scan["layers"][group][name]["kernel"][layer],
                                 g_plain["layers"][layer][group][name]["kernel"],
                                 rtol=1e-4, atol=1e-6)


def test_stacked_weights_have_a_leading_layers_axis():
  cfg = TINY.replace(scan_layers=True)
  abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  q = abstract.layers.attn.q.kernel
  assert q.shape == (cfg.num_layers, cfg.d_model, cfg.num_heads * cfg.head_dim)
  names = nnx.get_partition_spec(nnx.state(abstract))
  assert tuple(pure_dict(names)["layers"]["attn"]["q"]["kernel"]) == ("layers", "embed", "heads")


@pytest.mark.parametrize("scan", [False, True])
def test_every_weight_has_logical_names(scan):
  cfg = TINY.replace(scan_layers=scan)
  state = nnx.state(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))), nnx.Param)
  specs = nnx.get_partition_spec(state)
  known = {name for name, _ in shd.RULES}
  pairs = zip(jax.tree.leaves(state), jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)))
  for leaf, spec in pairs:
    assert len(spec) == leaf.ndim and all(name in known for name in spec), spec


def test_rules_map_logical_names_onto_a_2d_mesh():
  mesh = shd.make_mesh({"fsdp": 4, "tensor": 2})
  state = nnx.state(nnx.eval_shape(lambda: Llama(TINY, rngs=nnx.Rngs(0))), nnx.Param)
  specs = _paths(pure_dict(shd.param_specs(state, shd.RULES, mesh)))
  assert specs[("embed",)] == P("tensor", "fsdp")
  assert specs[("lm_head", "kernel")] == P("fsdp", "tensor")
  assert specs[("layers", 0, "attn", "q", "kernel")] == P("fsdp", "tensor")
  assert specs[("layers", 1, "attn", "o", "kernel")] == P("tensor", "fsdp")
  assert specs[("layers", 1, "mlp", "down", "kernel")] == P("tensor", "fsdp")
  assert specs[("final_norm", "scale")] == P()
  # a dimension that the mesh axis does not divide is replicated along it
  assert shd.logical_to_mesh(("embed", "mlp"), shd.RULES, mesh, (6, 4)) == P(None, "tensor")
  # rules are data: a different table moves the same weights elsewhere
  rules = (("embed", "tensor"), ("mlp", "fsdp"))
  assert shd.logical_to_mesh(("embed", "mlp"), rules, mesh, (8, 8)) == P("tensor", "fsdp")
  # one mesh axis is never used twice in one spec
  assert shd.logical_to_mesh(("embed", "embed"), shd.RULES, mesh, (8, 8)) == P("fsdp")


def test_parse_mesh():
  assert shd.parse_mesh("data=1,fsdp=-1,tensor=2", 8) == {"data": 1, "fsdp": 4, "tensor": 2}
  assert shd.parse_mesh("", 1) == {"data": 1, "fsdp": 1, "tensor": 1}
  for bad in ("data=3", "fsdp=-1,tensor=-1", "pipeline=2", "data=2,fsdp=2"):
    with pytest.raises(ValueError):
      shd.parse_mesh(bad, 8)


EXPECTED_PROJECTED = {(group, name) for group, names in
                      (("attn", "qkvo"), ("mlp", ("gate", "up", "down"))) for name in names}


@pytest.mark.parametrize("scan", [False, True])
def test_lowrank_spec_selects_exactly_attention_and_mlp_matrices(scan):
  cfg = TINY.replace(scan_layers=scan)
  model = Llama(cfg, rngs=nnx.Rngs(0))
  mask, dims = lowrank_spec(model, cfg)
  params = _paths(pure_dict(nnx.state(model, nnx.Param)))
  mask = _paths(mask)
  dims = _paths(dims, is_leaf=lambda x: x is None or hasattr(x, "reduction_axes"))
  assert set(mask) == set(params)
  selected = {path for path, m in mask.items() if m}
  want = {(("layers",) + ((i,) if not scan else ()) + (g, n, "kernel"))
          for i in range(cfg.num_layers) for g, n in EXPECTED_PROJECTED}
  assert selected == want
  assert len(selected) == 7 * (1 if scan else cfg.num_layers)
  lead = 1 if scan else 0
  for path in params:
    d = dims[path]
    if path in selected:
      assert tuple(d) == (lead, lead + 1)
      shape = params[path].shape
      layer = path[-3:-1]
      fan_in = {"q": cfg.d_model, "k": cfg.d_model, "v": cfg.d_model, "o": cfg.d_model,
                "gate": cfg.d_model, "up": cfg.d_model, "down": cfg.d_ff}[layer[1]]
      assert shape[d.reduction_axes] == fan_in  # the reduction axis is the input axis
    else:
      assert d is None
  # embeddings, norms and the LM head stay in full
  assert not mask[("embed",)] and not mask[("lm_head", "kernel")]
  assert not mask[("final_norm", "scale")]


def test_lowrank_spec_accepts_abstract_params():
  cfg = TINY.replace(scan_layers=True)
  abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  pure = pure_dict(nnx.state(abstract, nnx.Param))
  mask, _ = lowrank_spec(pure, cfg)
  assert jax.tree.structure(mask) == jax.tree.structure(pure)
  assert sum(jax.tree.leaves(mask)) == 7
