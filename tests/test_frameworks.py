"""Drop-in through the ecosystem's entry points: Flax NNX's ``nnx.Optimizer``, Flax
Linen, Equinox, plain pytrees and MaxText-shaped scanned (stacked-layer) trees.

Every test trains or steps a tiny model with a jitted step compiled once. Training
checks that the loss falls by a margin on a fixed batch and that the optimizer state
is smaller than ``optax.adamw``'s for the same parameters, counted the same way; the
scanned tree is checked layer by layer against the same layers run unstacked.
"""

import warnings

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_lowrank as ol

VOCAB, EMBED, HEADS, MLP = 32, 16, 2, 32  # head_dim 8: attention matrices are 16 x 16
BATCH, SEQ = 4, 8
RANK = 4
STEPS = 4  # updates; the loss is read before each and once after the last


def _batch():
  tokens = jax.random.randint(jax.random.key(1), (BATCH, SEQ), 0, VOCAB)
  return tokens, jnp.roll(tokens, -1, axis=1)


def _cross_entropy(logits, targets):
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def _nbytes(tree) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def _lowrank_states(state):
  is_state = lambda x: isinstance(x, ol.LowRankState)
  return [s for s in jax.tree.leaves(state, is_leaf=is_state) if is_state(s)]


def _projected_paths(state) -> set:
  return {path for s in _lowrank_states(state) for path in s.bases}


def _attention_dims(params):
  """Dimension numbers for attention kernels with a head axis (Flax's layouts).

  q/k/v kernels are ``(embed, heads, head_dim)``: ``embed`` is contracted with the
  input, ``(heads, head_dim)`` is the output. The output kernel is
  ``(heads, head_dim, embed)``. 2-D leaves keep the default ``(in, out)``.
  """
  def dims(path, leaf):
    if jnp.ndim(leaf) != 3:
      return None
    if ol.shapes.path_name(path).endswith("out/kernel"):
      return ol.DimensionNumbers(reduction_axes=(0, 1), output_axes=2)
    return ol.DimensionNumbers(reduction_axes=0, output_axes=(1, 2))
  return jax.tree_util.tree_map_with_path(dims, params)


def _assert_falls(losses, name):
  # Every optimizer below is configured (learning rate, small ranks) so that four
  # updates on a fixed batch take at least 10% off the loss; a broken update, one
  # that is not applied, or one that points the wrong way does not.
  assert np.all(np.isfinite(losses)), (name, losses)
  assert losses[-1] < 0.9 * losses[0], (name, losses)


# The projected leaves of the test models: every matrix, the attention kernels
# included (through `_attention_dims`); the head's bias is the one unprojected leaf.
ATTENTION = {"attn/query/kernel", "attn/key/kernel", "attn/value/kernel",
             "attn/out/kernel"}
MATRICES = {"embed/embedding", "up/kernel", "down/kernel", "head/kernel"}


# --------------------------------------------------------------------------- NNX


class NnxModel(nnx.Module):
  """Embedding, multi-head self-attention, an MLP and a head."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(VOCAB, EMBED, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(
        num_heads=HEADS, in_features=EMBED, qkv_features=EMBED, use_bias=False,
        decode=False, rngs=rngs)
    self.up = nnx.Linear(EMBED, MLP, use_bias=False, rngs=rngs)
    self.down = nnx.Linear(MLP, EMBED, use_bias=False, rngs=rngs)
    self.head = nnx.Linear(EMBED, VOCAB, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    x = x + self.attn(x)
    x = x + self.down(jax.nn.gelu(self.up(x)))
    return self.head(x)


def _nnx_loss(model, tokens, targets):
  return _cross_entropy(model(tokens), targets)


# One configuration per registered alias: small ranks (granularity for VLoRP) that
# fit 16 x 16 and 32 x 16 matrices, and a learning rate at which the loss falls.
# Arguments are the defaults, `rank` and `dimension_numbers` only (no masks), so
# that they do not depend on the aliases' name of the projection mask.
NNX_CONFIGS = {
    "galore": lambda dims: ol.galore(1e-1, rank=RANK, dimension_numbers=dims),
    "apollo": lambda dims: ol.apollo(3e-2, rank=RANK, dimension_numbers=dims),
    "apollo_mini": lambda dims: ol.apollo_mini(1e-2, dimension_numbers=dims),
    "fira": lambda dims: ol.fira(3e-2, rank=RANK, dimension_numbers=dims),
    "frugal": lambda dims: ol.frugal(2e-2, RANK / EMBED, subspace="svd",
                                     dimension_numbers=dims),
    "flora": lambda dims: ol.flora(2e-1, rank=RANK, min_dim_size_to_factor=8,
                                   dimension_numbers=dims),
    "vlorp": lambda dims: ol.vlorp(3e-2, rank=1, granularity=4,
                                   dimension_numbers=dims),
    "osd": lambda dims: ol.osd(1e-1, rank=RANK, dimension_numbers=dims),
    "dct_adamw": lambda dims: ol.dct_adamw(5e-2, rank=RANK, dimension_numbers=dims),
    "grass": lambda dims: ol.grass(3e-2, rank=RANK, dimension_numbers=dims),
    "adarankgrad": lambda dims: ol.adarankgrad(1e-1, rank=RANK,
                                               dimension_numbers=dims),
    "galore_8bit": lambda dims: ol.galore_8bit(1e-1, rank=RANK,
                                               dimension_numbers=dims),
    "q_galore": lambda dims: ol.q_galore(1e-1, rank=RANK, dimension_numbers=dims),
    "coap": lambda dims: ol.coap(1e-1, rank=RANK, dimension_numbers=dims),
    "golore": lambda dims: ol.golore(1e-1, rank=RANK, dimension_numbers=dims),
    "gradnorm_lorp": lambda dims: ol.gradnorm_lorp(1e-1, rank=RANK,
                                                   dimension_numbers=dims),
    # Unscanned: each of the 8 projected matrices is its own "layer", 2 drawn; each
    # keeps an m x n full-rank buffer (float32), so rank 2 keeps it under STATE_FRACTION.
    "gum": lambda dims: ol.gum(1e-1, rank=2, num_layers=8, full_rank_layers=2,
                               group_fn=lambda path: path, dimension_numbers=dims),
    "owlore": lambda dims: ol.owlore(1e-1, rank=RANK, dimension_numbers=dims),
    # Any optax optimizer in the subspace, chained with a learning rate.
    "lowrank_project": lambda dims: optax.chain(
        ol.lowrank_project(optax.scale_by_adam(), rank=RANK,
                           dimension_numbers=dims),
        optax.scale_by_learning_rate(3e-2)),
}

# Largest optimizer-state size, as a fraction of optax.adamw's, for the NNX model.
# Adam keeps 2·m·n floats per matrix; at rank 4 on these 16-wide matrices a
# projected Adam keeps 2·4·max(m, n) + a basis, at most 0.5 of it for a 16 x 16
# matrix before the basis, and OSD's basis adds three more basis-sized arrays.
STATE_FRACTION = 0.7


def test_every_registered_alias_is_trained_under_nnx():
  assert set(ol.optimizers) <= set(NNX_CONFIGS), set(ol.optimizers) - set(NNX_CONFIGS)


def _nnx_state_bytes(optimizer) -> int:
  return _nbytes(nnx.state(optimizer.opt_state))


# The model's loss and gradient, compiled once for every optimizer below; each
# optimizer's `update` is compiled once on its own (a train step in one `nnx.jit`,
# as users write it, is docs/frameworks.md's example, run by tests/test_readme.py).
_NNX_VALUE_AND_GRAD = nnx.jit(nnx.value_and_grad(_nnx_loss))


@nnx.jit
def _nnx_update(optimizer, model, grads):
  optimizer.update(model, grads)


@pytest.mark.parametrize("name", sorted(NNX_CONFIGS))
def test_nnx_optimizer_trains(name):
  tokens, targets = _batch()
  model = NnxModel(nnx.Rngs(0))
  tx = NNX_CONFIGS[name](_attention_dims)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  # Every 3-D kernel has dimension numbers: no leaf is left out for want of them.
  assert not [w for w in caught if "not projected" in str(w.message)], name

  losses = []
  for _ in range(STEPS):
    loss, grads = _NNX_VALUE_AND_GRAD(model, tokens, targets)
    _nnx_update(optimizer, model, grads)
    losses.append(float(loss))
  losses.append(float(_NNX_VALUE_AND_GRAD(model, tokens, targets)[0]))
  _assert_falls(losses, name)
  assert int(optimizer.step[...]) == STEPS

  # The state is keyed by the parameters' paths (no Variable wrapper in the key);
  # the attention kernels are projected through their dimension numbers.
  projected = _projected_paths(optimizer.opt_state)
  assert ATTENTION <= projected, (name, projected)
  assert projected <= ATTENTION | MATRICES, (name, projected)

  reference = nnx.Optimizer(NnxModel(nnx.Rngs(0)), optax.adamw(1e-2), wrt=nnx.Param)
  ours, adamw = _nnx_state_bytes(optimizer), _nnx_state_bytes(reference)
  assert ours < STATE_FRACTION * adamw, (name, ours, adamw)


def test_nnx_attention_kernels_without_dimension_numbers_stay_unprojected():
  model = NnxModel(nnx.Rngs(0))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    optimizer = nnx.Optimizer(model, ol.galore(1e-2, rank=RANK), wrt=nnx.Param)
  messages = [str(w.message) for w in caught if "not projected" in str(w.message)]
  assert len(messages) == 1, messages
  for kernel in ("query", "key", "value", "out"):
    assert f"'attn']['{kernel}']['kernel']" in messages[0], messages[0]
  assert messages[0].startswith("4 leaves"), messages[0]
  assert _projected_paths(optimizer.opt_state) == MATRICES
  # Their moments are full size: the state of a query kernel is Adam's.
  (lowrank,) = _lowrank_states(optimizer.opt_state)
  mu = lowrank.inner_state.mu
  assert jnp.shape(mu["attn"]["query"]["kernel"]) == (EMBED, HEADS, EMBED // HEADS)
  assert jnp.shape(mu["up"]["kernel"]) == (RANK, MLP)  # projected: (r, m) for (n, m) = (16, 32)


def test_memory_table_attributes_nnx_state_to_its_parameters():
  """``memory.state_bytes`` on an NNX state (nested, ``Variable``-wrapped): each
  projected leaf is reported with its rank, its moments and its basis (the basis
  is keyed by path name in the state), against GaLore's count."""
  model = NnxModel(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  tx = ol.galore(1e-2, rank=RANK, dimension_numbers=_attention_dims)
  mem = ol.memory.state_bytes(tx, params)
  names = {ol.shapes.path_name(p): jnp.shape(x)
           for p, x in jax.tree.flatten_with_path(params)[0]}
  by_name = dict(zip(names, mem.leaves))
  sides = {"embed/embedding": (VOCAB, EMBED), "up/kernel": (EMBED, MLP),
           "down/kernel": (MLP, EMBED), "head/kernel": (EMBED, VOCAB)}
  sides.update({k: (EMBED, EMBED) for k in ATTENTION})
  for name, (n, m) in sides.items():  # moments 2·r·max(m, n), basis r·min(m, n)
    leaf = by_name[name]
    assert (leaf.projected, leaf.rank) == (True, RANK), name
    assert leaf.state_bytes == 4 * (2 * RANK * max(m, n) + RANK * min(m, n)), name
  assert by_name["head/bias"].state_bytes == 4 * 2 * VOCAB  # full Adam
  assert not by_name["head/bias"].projected
  assert mem.shared_bytes == 2 * 4  # the two int32 step counts
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  assert mem.total_bytes == _nnx_state_bytes(optimizer)


# ------------------------------------------------------------------------- Linen


class LinenModel(nn.Module):
  """The NNX model's layers in Linen."""

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, EMBED, name="embed")(tokens)
    x = x + nn.MultiHeadDotProductAttention(
        num_heads=HEADS, qkv_features=EMBED, use_bias=False, name="attn")(x)
    h = jax.nn.gelu(nn.Dense(MLP, use_bias=False, name="up")(x))
    x = x + nn.Dense(EMBED, use_bias=False, name="down")(h)
    return nn.Dense(VOCAB, name="head")(x)


LINEN_CONFIGS = {
    "galore": lambda dims: ol.galore(1e-1, rank=RANK, dimension_numbers=dims),
    "vlorp": lambda dims: ol.vlorp(3e-2, rank=1, granularity=4,
                                   dimension_numbers=dims),
}


@pytest.mark.parametrize("name", sorted(LINEN_CONFIGS))
def test_linen_model_trains(name):
  tokens, targets = _batch()
  model = LinenModel()
  params = model.init(jax.random.key(0), tokens)["params"]
  tx = LINEN_CONFIGS[name](_attention_dims)
  state = tx.init(params)
  loss_fn = lambda p: _cross_entropy(model.apply({"params": p}, tokens), targets)

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for _ in range(STEPS):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  losses.append(float(loss_fn(params)))
  _assert_falls(losses, name)
  assert _projected_paths(state) == ATTENTION | MATRICES
  adamw = _nbytes(optax.adamw(1e-2).init(params))
  assert _nbytes(state) < STATE_FRACTION * adamw, (name, _nbytes(state), adamw)


# ---------------------------------------------------------------------- Equinox


class EqxModel(eqx.Module):
  """The same layers in Equinox (``Linear`` weights are ``(out, in)``)."""

  embed: eqx.nn.Embedding
  attn: eqx.nn.MultiheadAttention
  up: eqx.nn.Linear
  down: eqx.nn.Linear
  head: eqx.nn.Linear

  def __init__(self, key):
    keys = jax.random.split(key, 5)
    self.embed = eqx.nn.Embedding(VOCAB, EMBED, key=keys[0])
    self.attn = eqx.nn.MultiheadAttention(HEADS, EMBED, key=keys[1])
    self.up = eqx.nn.Linear(EMBED, MLP, use_bias=False, key=keys[2])
    self.down = eqx.nn.Linear(MLP, EMBED, use_bias=False, key=keys[3])
    self.head = eqx.nn.Linear(EMBED, VOCAB, key=keys[4])

  def __call__(self, tokens):  # one sequence
    x = jax.vmap(self.embed)(tokens)
    x = x + self.attn(x, x, x)
    x = x + jax.vmap(lambda h: self.down(jax.nn.gelu(self.up(h))))(x)
    return jax.vmap(self.head)(x)


# Equinox stores Linear weights as (out, in), PyTorch's layout: axis 1 is the one
# contracted with the input. (The embedding table is read the same way.)
EQX_DIMS = ol.DimensionNumbers(reduction_axes=1, output_axes=0)
EQX_MATRICES = {"embed/weight", "up/weight", "down/weight", "head/weight"} | {
    f"attn/{p}_proj/weight" for p in ("query", "key", "value", "output")}
EQX_CONFIGS = {
    "galore": lambda: ol.galore(1e-1, rank=RANK, dimension_numbers=EQX_DIMS),
    "vlorp": lambda: ol.vlorp(3e-2, rank=1, granularity=4,
                              dimension_numbers=EQX_DIMS),
}


@pytest.mark.parametrize("name", sorted(EQX_CONFIGS))
def test_equinox_model_trains(name):
  tokens, targets = _batch()
  model = EqxModel(jax.random.key(0))
  tx = EQX_CONFIGS[name]()
  params = eqx.filter(model, eqx.is_array)
  # The params tree is a Module, and this one is callable: a labels tree built
  # from its structure (VLoRP's `unprojected=` partition) must not be taken for a
  # function of the parameters by optax.partition.
  assert callable(params)
  state = tx.init(params)

  def loss_fn(model):
    return _cross_entropy(jax.vmap(model)(tokens), targets)

  @eqx.filter_jit
  def step(model, state):
    loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
    updates, state = tx.update(grads, state, eqx.filter(model, eqx.is_array))
    return eqx.apply_updates(model, updates), state, loss

  losses = []
  for _ in range(STEPS):
    model, state, loss = step(model, state)
    losses.append(float(loss))
  losses.append(float(loss_fn(model)))
  _assert_falls(losses, name)
  (lowrank,) = _lowrank_states(state)
  assert set(lowrank.bases) == EQX_MATRICES
  if name == "vlorp":
    # `unprojected=`: the head's bias, the one leaf not projected, has AdamW's
    # moments of its own, next to the projected leaves' first moments.
    inner = lowrank.inner_state.inner_states
    assert set(inner) == {"projected", "unprojected"}
    unprojected = jax.tree.leaves(inner["unprojected"].inner_state)
    assert sorted(x.shape for x in unprojected if x.ndim) == [(VOCAB,), (VOCAB,)]
  adamw = _nbytes(optax.adamw(1e-2).init(params))
  assert _nbytes(state) < STATE_FRACTION * adamw, (name, _nbytes(state), adamw)


# ------------------------------------------- plain pytrees and scanned (MaxText) trees

LAYERS, HEAD_DIM = 2, EMBED // HEADS
# Each weight's layer axis in the scanned tree. MaxText stacks scanned layers on
# `param_scan_axis` (1 by default, e.g. an MLP kernel (embed, layers, mlp)); other
# codes stack on axis 0, (layers, embed, mlp). Both occur here.
SCAN_AXIS = {"wi": 0, "wo": 1, "query": 1, "out": 0, "scale": 0}
# Dimension numbers of the scanned weights: the layer axis is named by neither
# field, so it is a batch axis (one basis per layer). `wo` uses optax's spec.
SCANNED_DIMS = {
    "wi": ol.DimensionNumbers(reduction_axes=1, output_axes=2),  # (L, E, M)
    "wo": optax.contrib.GaLoreDimensionNumbers(reduction_axis=0, output_axis=2),  # (M, L, E)
    "query": ol.DimensionNumbers(reduction_axes=0, output_axes=(2, 3)),  # (E, L, H, hd)
    "out": ol.DimensionNumbers(reduction_axes=(1, 2), output_axes=3),  # (L, H, hd, E)
    "scale": None,  # (L, E): kept out by the projection mask
}


def _layer_tree(leaves):
  return {"mlp": {"wi": leaves["wi"], "wo": leaves["wo"]},
          "attn": {"query": leaves["query"], "out": leaves["out"]},
          "norm": {"scale": leaves["scale"]}}


def _layer_leaves(tree):
  return {"wi": tree["mlp"]["wi"], "wo": tree["mlp"]["wo"],
          "query": tree["attn"]["query"], "out": tree["attn"]["out"],
          "scale": tree["norm"]["scale"]}


LAYER_SHAPES = {"wi": (EMBED, MLP), "wo": (MLP, EMBED), "query": (EMBED, HEADS, HEAD_DIM),
                "out": (HEADS, HEAD_DIM, EMBED), "scale": (EMBED,)}


def _plain_tree(seed):
  """A plain pytree: the embedding and a list of per-layer dicts."""
  keys = iter(jax.random.split(jax.random.key(seed), 1 + LAYERS * len(LAYER_SHAPES)))
  return {"embed": jax.random.normal(next(keys), (VOCAB, EMBED)),
          "layers": [_layer_tree({k: jax.random.normal(next(keys), s)
                                  for k, s in LAYER_SHAPES.items()})
                     for _ in range(LAYERS)]}


def _scanned(plain):
  """The same weights as a MaxText-shaped scanned tree (layers stacked)."""
  layers = [_layer_leaves(layer) for layer in plain["layers"]]
  return {"embed": plain["embed"], "layers": _layer_tree({
      k: jnp.stack([layer[k] for layer in layers], axis=SCAN_AXIS[k])
      for k in LAYER_SHAPES})}


def _plain_dims(params):
  """Dimension numbers for the unstacked tree, as a function of the parameters."""
  def dims(path, leaf):
    name = ol.shapes.path_name(path)
    if name.endswith("attn/query"):
      return ol.DimensionNumbers(reduction_axes=0, output_axes=(1, 2))
    if name.endswith("attn/out"):
      return ol.DimensionNumbers(reduction_axes=(0, 1), output_axes=2)
    return None
  return jax.tree_util.tree_map_with_path(dims, params)


def _galore_core(dims):
  # GaLore's pipeline (exact SVD, Adam in the subspace, scale 0.25) with a projection
  # mask: a stacked norm scale (layers, embed) is 2-D and would be projected as one
  # matrix otherwise.
  return optax.chain(
      ol.lowrank_project(optax.scale_by_adam(eps=1e-6), rank=RANK, scale=0.25,
                         projection_mask=ol.match_paths("mlp|attn"),
                         dimension_numbers=dims),
      optax.add_decayed_weights(1e-2),
      optax.scale_by_learning_rate(1e-2))


def _run(tx, params, grads):
  state = tx.init(params)
  update = jax.jit(tx.update)
  out = []
  for g in grads:
    u, state = update(g, state, params)
    out.append(u)
  return out, state


def test_scanned_tree_equals_its_layers_run_unstacked():
  plain_params = _plain_tree(0)
  plain_grads = [_plain_tree(1), _plain_tree(2)]
  scanned_dims = {"embed": None, "layers": _layer_tree(SCANNED_DIMS)}
  plain_updates, plain_state = _run(_galore_core(_plain_dims), plain_params, plain_grads)
  scanned_updates, scanned_state = _run(
      _galore_core(scanned_dims), _scanned(plain_params),
      [_scanned(g) for g in plain_grads])

  (plain_lowrank,) = _lowrank_states(plain_state)
  (scanned_lowrank,) = _lowrank_states(scanned_state)
  assert set(plain_lowrank.bases) == {
      f"layers/{i}/{k}" for i in range(LAYERS)
      for k in ("mlp/wi", "mlp/wo", "attn/query", "attn/out")}
  # One basis per layer: (layers, m, n) in the references' orientation.
  assert {k: v.matrix_shape for k, v in scanned_lowrank.bases.items()} == {
      "layers/mlp/wi": (LAYERS, MLP, EMBED), "layers/mlp/wo": (LAYERS, EMBED, MLP),
      "layers/attn/query": (LAYERS, EMBED, EMBED),
      "layers/attn/out": (LAYERS, EMBED, EMBED)}

  for step, (plain, scanned) in enumerate(zip(plain_updates, scanned_updates)):
    np.testing.assert_array_equal(scanned["embed"], plain["embed"])
    stacked = _layer_leaves(scanned["layers"])
    for i, layer in enumerate(plain["layers"]):
      for k, want in _layer_leaves(layer).items():
        got = np.take(np.asarray(stacked[k]), i, axis=SCAN_AXIS[k])
        want = np.asarray(want)
        err = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert err < 1e-5, (step, i, k, err)


# ------------------------------------------------------ optax.inject_hyperparams


def test_nnx_optimizer_with_injected_learning_rate():
  """``optax.inject_hyperparams`` under ``nnx.Optimizer``: the learning rate is an
  ``OptVariable`` of the optimizer's state, set between jitted steps (no retrace);
  the shape-fixing arguments and the dimension-numbers function stay static."""
  tokens, targets = _batch()
  model = NnxModel(nnx.Rngs(0))
  tx = optax.inject_hyperparams(
      ol.galore, static_args=("rank", "update_proj_gap", "dimension_numbers"))(
      learning_rate=0.0, rank=RANK, update_proj_gap=2,
      dimension_numbers=_attention_dims)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  assert ATTENTION <= _projected_paths(optimizer.opt_state)
  traces = []

  @nnx.jit
  def update(optimizer, model, grads):
    traces.append(None)  # runs when traced, not when a compiled step runs
    optimizer.update(model, grads)

  start = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))

  loss, grads = _NNX_VALUE_AND_GRAD(model, tokens, targets)
  update(optimizer, model, grads)  # learning rate 0: nothing moves
  jax.tree.map(np.testing.assert_array_equal,
               nnx.to_pure_dict(nnx.state(model, nnx.Param)), start)

  optimizer.opt_state.hyperparams["learning_rate"][...] = 1e-1
  losses = [float(loss)]
  for _ in range(STEPS):
    loss, grads = _NNX_VALUE_AND_GRAD(model, tokens, targets)
    update(optimizer, model, grads)
    losses.append(float(loss))
  losses.append(float(_NNX_VALUE_AND_GRAD(model, tokens, targets)[0]))
  _assert_falls(losses, "inject_hyperparams(galore)")
  assert len(traces) == 1  # the new learning rate did not retrace the step
