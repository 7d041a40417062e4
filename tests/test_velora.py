"""Tests of VeLoRA (models/velora.py): the custom VJP against a float64 NumPy reference of
its formula, the exact output and input gradient, the rank-1 case, `v`'s first-batch
initialisation, remat, and the tiny LLaMA through one train step and a checkpoint."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from models.config import LlamaConfig
from models.llama import Llama
from models.lowrank import pure_dict
from models.velora import Projection, VeLoRAState, first_batch_vector, velora_matmul
from train import steps

SCALE = 1.5


def _reference(x, w, v, scale, dy):
  """float64 NumPy: y = x w, dx = dy wᵀ, dW = scale · x̂ᵀ dy with x̂_g = <x_g, v> v."""
  x, w, v, dy = (np.asarray(a, np.float64) for a in (x, w, v, dy))
  d, s = x.shape[-1], v.shape[0]
  x2, dy2 = x.reshape(-1, d), dy.reshape(-1, dy.shape[-1])
  z = x2.reshape(-1, d // s, s) @ v  # (tokens, G)
  xhat = (z[..., None] * v).reshape(-1, d)
  return x @ w, dy @ w.T, scale * xhat.T @ dy2


def _unit(key, n):
  v = jax.random.normal(key, (n,))
  return v / jnp.linalg.norm(v)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / np.max(np.abs(b))


def _vjp(x, w, v, scale, dy):
  y, vjp = jax.vjp(lambda x, w, v: velora_matmul(x, w, v, scale), x, w, v)
  return (y, *vjp(dy))


def test_vjp_matches_float64_reference_of_the_formula():
  kx, kw, kv, kd = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(kx, (2, 5, 12))
  w = jax.random.normal(kw, (12, 7))
  v = _unit(kv, 4)  # G = 3 sub-tokens of 4 features
  dy = jax.random.normal(kd, (2, 5, 7))
  y, dx, dw, dv = _vjp(x, w, v, SCALE, dy)
  y_ref, dx_ref, dw_ref = _reference(x, w, v, SCALE, dy)
  assert _rel(y, y_ref) < 1e-6      # the forward pass is the plain matmul
  assert _rel(dx, dx_ref) < 1e-6    # the input gradient is exact
  assert _rel(dw, dw_ref) < 1e-6    # the weight gradient is VeLoRA's
  assert not np.any(np.asarray(dv))  # v is a constant
  # Negative control: a generic x is not rank-1 along v, so dW is not the dense one.
  dense = np.asarray(x, np.float64).reshape(-1, 12).T @ np.asarray(dy, np.float64).reshape(-1, 7)
  assert _rel(dw, dense) > 0.3
  assert _rel(dw_ref / SCALE, dense) > 0.3


def test_weight_gradient_is_dense_when_sub_tokens_are_rank_one_along_v():
  kc, kw, kv, kd = jax.random.split(jax.random.key(1), 4)
  v = _unit(kv, 4)
  coeff = jax.random.normal(kc, (3, 6, 5))  # one coefficient per sub-token (G = 5)
  x = (coeff[..., None] * v).reshape(3, 6, 20)
  w = jax.random.normal(kw, (20, 8))
  dy = jax.random.normal(kd, (3, 6, 8))
  _, dx, dw, _ = _vjp(x, w, v, 1.0, dy)
  x64, dy64 = np.asarray(x, np.float64), np.asarray(dy, np.float64)
  dense = x64.reshape(-1, 20).T @ dy64.reshape(-1, 8)
  assert _rel(dw, dense) < 1e-5
  assert _rel(dx, dy64 @ np.asarray(w, np.float64).T) < 1e-6
  # Negative control: a v orthogonal to the sub-tokens loses the whole gradient.
  other = _unit(jax.random.key(9), 4)
  other = other - jnp.dot(other, v) * v
  _, _, dw_other, _ = _vjp(x, w, other / jnp.linalg.norm(other), 1.0, dy)
  assert np.max(np.abs(np.asarray(dw_other))) < 1e-5 * np.max(np.abs(dense))


def test_composes_with_remat():
  kx, kw, kv, kd = jax.random.split(jax.random.key(2), 4)
  x, w = jax.random.normal(kx, (4, 3, 16)), jax.random.normal(kw, (16, 6))
  v, c = _unit(kv, 8), jax.random.normal(kd, (4, 3, 6))
  loss = lambda x, w: jnp.sum(velora_matmul(x, w, v, SCALE) * c)  # dy = c
  for policy in (None, jax.checkpoint_policies.dots_with_no_batch_dims_saveable):
    dx, dw = jax.jit(jax.grad(jax.checkpoint(loss, policy=policy), argnums=(0, 1)))(x, w)
    _, dx_ref, dw_ref = _reference(x, w, v, SCALE, c)
    assert _rel(dx, dx_ref) < 1e-6
    assert _rel(dw, dw_ref) < 1e-6


@pytest.mark.parametrize("kind", ("explicit", "auto"))
def test_sharded_matches_the_reference(kind):
  """Batch on a `data` axis, output features on `tensor` (a Dense layer's layout): the
  backward pass's contractions over sharded axes come out with the primal shardings."""
  axis = getattr(jax.sharding.AxisType, kind.capitalize())
  mesh = jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(axis, axis))
  kx, kw, kv, kd = jax.random.split(jax.random.key(7), 4)
  x, w = jax.random.normal(kx, (8, 3, 16)), jax.random.normal(kw, (16, 6))
  v, dy = _unit(kv, 4), jax.random.normal(kd, (8, 3, 6))
  specs = (P("data", None, None), P(None, "tensor"), P(), P("data", None, "tensor"))
  out = specs[3] if kind == "explicit" else None
  with jax.set_mesh(mesh):
    args = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip((x, w, v, dy), specs)]

    @jax.jit
    def run(x, w, v, dy):
      y, vjp = jax.vjp(lambda x, w: velora_matmul(x, w, v, SCALE, out), x, w)
      return (y, *vjp(dy))

    y, dx, dw = run(*args)
  if kind == "explicit":
    assert jax.typeof(dx).sharding.spec == specs[0]
    assert jax.typeof(dw).sharding.spec == specs[1]
  for got, want in zip((y, dx, dw), _reference(x, w, v, SCALE, dy)):
    assert _rel(got, want) < 1e-5


def test_v_is_the_first_batch_mean_sub_token_then_frozen():
  first, second = (jax.random.normal(jax.random.key(i), (2, 3, 12)) + 1.0 for i in (3, 4))
  proj = Projection(12, 3, 1.0)
  assert not bool(proj.initialized[...])
  proj(first, jnp.ones((12, 2)))
  mean = np.asarray(first, np.float64).reshape(-1, 4).mean(axis=0)
  expected = mean / np.linalg.norm(mean)
  assert _rel(proj.vector[...], expected) < 1e-6
  assert _rel(first_batch_vector(first, 3), expected) < 1e-6
  proj(second, jnp.ones((12, 2)))  # later batches leave v as it is
  assert bool(proj.initialized[...])
  assert _rel(proj.vector[...], expected) < 1e-6
  other = np.asarray(second, np.float64).reshape(-1, 4).mean(axis=0)
  assert _rel(other / np.linalg.norm(other), expected) > 1e-3  # control: it would move
  with pytest.raises(ValueError, match="groups"):
    Projection(12, 5, 1.0)


def test_config_validates_velora_fields():
  cfg = LlamaConfig.tiny(velora_layers=["v", "down"], velora_groups=[16, 22])
  assert cfg.velora_layers == ("v", "down") and cfg.velora_groups_of("down") == 22
  assert cfg.velora_groups_of("q") is None
  with pytest.raises(ValueError, match="velora_layers"):
    LlamaConfig.tiny(velora_layers=("value",), velora_groups=(16,))
  with pytest.raises(ValueError, match="one group count"):
    LlamaConfig.tiny(velora_layers=("v", "down"), velora_groups=(16,))
  with pytest.raises(ValueError, match="divisor of its input width 352"):
    LlamaConfig.tiny(velora_layers=("down",), velora_groups=(21,))
  with pytest.raises(ValueError, match="velora_scale"):
    LlamaConfig.tiny(velora_scale=0.0)


CFG = LlamaConfig.tiny(d_model=32, d_ff=64, num_heads=4, num_kv_heads=2, num_layers=2,
                       max_seq_len=16, scan_layers=True, remat="full",
                       velora_layers=("v", "down"), velora_groups=(4, 8), velora_scale=SCALE)


def _rms_norm(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def test_tiny_llama_train_step_and_checkpoint(tmp_path):
  """Scanned, rematerialised blocks with VeLoRA on v and down, through the trainer's
  step: the loss and every other gradient equal the plain model's; each VeLoRA kernel's
  gradient is rank-1 along its layer's v in every sub-token slot; v is set by the first
  batch (layer 0's value input checked in float64) and kept by the next; a checkpoint
  restores it."""
  tokens = jax.random.randint(jax.random.key(5), (2, 2, 13), 0, CFG.vocab_size)
  graphdef, _ = steps.abstract_model(CFG)
  init = steps.make_init_fn(CFG, optax.adamw(1e-3))
  state = jax.jit(init)(jax.random.key(0))
  velora0 = state["velora"]["layers"]
  assert not np.any(np.asarray(velora0["attn"]["v"]["velora"]["initialized"]))

  plain = CFG.replace(velora_layers=(), velora_groups=())
  plain_grad = jax.value_and_grad(steps.make_loss_fn(steps.abstract_model(plain)[0]))

  @jax.jit
  def run(state, tokens):
    loss, grads, velora = steps.make_grad_fn(graphdef)(state["params"], tokens[0],
                                                      state["velora"])
    new, metrics = steps.make_train_step(graphdef, optax.adamw(1e-3))(state, tokens)
    return loss, grads, velora, plain_grad(state["params"], tokens[0]), new, metrics

  loss, grads, velora, (plain_loss, plain_grads), new, metrics = run(state, tokens[:1])
  assert abs(float(loss) - float(plain_loss)) < 1e-6
  flat = dict(jax.tree_util.tree_flatten_with_path(plain_grads)[0])
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    name = jax.tree_util.keystr(path)
    if "['v']" in name or "['down']" in name:
      assert _rel(g, flat[path]) > 0.1, name  # VeLoRA's weight gradient
    else:
      assert _rel(g, flat[path]) < 1e-5, name  # exact input gradients upstream

  layers = velora["layers"]
  for group, name, groups in (("attn", "v", 4), ("mlp", "down", 8)):
    v = np.asarray(layers[group][name]["velora"]["vector"], np.float64)  # (L, D/G)
    assert np.all(np.asarray(layers[group][name]["velora"]["initialized"]))
    np.testing.assert_allclose(np.linalg.norm(v, axis=-1), 1.0, rtol=1e-6)
    g = np.asarray(grads["layers"][group][name]["kernel"], np.float64)  # (L, D, F)
    blocks = g.reshape(g.shape[0], groups, -1, g.shape[-1])  # (L, G, D/G, F)
    along = np.einsum("lgsf,ls->lgf", blocks, v)
    rank1 = along[:, :, None, :] * v[:, None, :, None]
    assert _rel(rank1, blocks) < 1e-5  # every sub-token slot is parallel to v
    plain_blocks = np.asarray(plain_grads["layers"][group][name]["kernel"]).reshape(blocks.shape)
    assert _rel(np.einsum("lgsf,ls->lgf", plain_blocks, v)[:, :, None, :]
                * v[:, None, :, None], plain_blocks) > 0.1  # control: dense is not

  # Layer 0's value projection sees attn_norm(embed[tokens]) of the first micro-batch.
  params = jax.tree.map(lambda a: np.asarray(a, np.float64), state["params"])
  h = _rms_norm(params["embed"][np.asarray(tokens[0, :, :-1])],
                params["layers"]["attn_norm"]["scale"][0], CFG.norm_eps)
  mean = h.reshape(-1, 8).mean(axis=0)
  v0 = new["velora"]["layers"]["attn"]["v"]["velora"]["vector"][0]
  assert _rel(v0, mean / np.linalg.norm(mean)) < 1e-5
  assert np.isfinite(float(metrics["loss"]))

  later = run(new, tokens[1:])[4]  # the same shapes: no new compilation
  for a, b in zip(jax.tree.leaves(later["velora"]), jax.tree.leaves(new["velora"])):
    np.testing.assert_array_equal(a, b)
  assert _rel(later["params"]["lm_head"]["kernel"], new["params"]["lm_head"]["kernel"]) > 0

  from train.checkpoint import Checkpointer
  ckpt = Checkpointer(str(tmp_path), keep=1)
  ckpt.save(2, later)
  ckpt.close()
  restored = Checkpointer(str(tmp_path)).restore(jax.eval_shape(lambda: later), 2)
  for a, b in zip(jax.tree.leaves(restored["velora"]), jax.tree.leaves(later["velora"])):
    np.testing.assert_array_equal(a, b)


def test_nnx_optimizer_leaves_the_velora_buffers_alone():
  cfg = CFG.replace(num_layers=1, scan_layers=False, remat="none")
  model = Llama(cfg, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  tokens = jax.random.randint(jax.random.key(6), (2, 9), 0, cfg.vocab_size)

  @nnx.jit
  def train_step(model, optimizer, tokens):
    loss_fn = lambda m: jnp.mean(steps.cross_entropy(m(tokens[:, :-1]), tokens[:, 1:]))
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  assert not jax.tree.leaves(nnx.state(optimizer, VeLoRAState))
  kernel = np.asarray(model.layers[0].mlp.down.kernel[...])
  train_step(model, optimizer, tokens)
  down = model.layers[0].mlp.down.velora
  assert bool(down.initialized[...])
  np.testing.assert_allclose(np.linalg.norm(np.asarray(down.vector[...])), 1.0, rtol=1e-6)
  assert _rel(model.layers[0].mlp.down.kernel[...], kernel) > 0
  assert pure_dict(nnx.state(model, VeLoRAState))  # the buffers are still in the model
