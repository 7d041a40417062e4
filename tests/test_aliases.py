"""Every registered alias: jit, stacked layers, 8-device sharding, Orbax round trip.

Values are checked against each alias's own unsharded run (sharding must not change
the numbers); the formulas themselves are checked against float64 references in the
``test_*_reference.py`` files.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import optax_lowrank as ol

SHAPES = {"w": (64, 32), "v": (32, 64), "layers": (4, 32, 48), "b": (32,)}
DIMS = {"w": None, "v": None, "layers": ol.DimensionNumbers(1, 2), "b": None}
SPECS = {
    "rows": {"w": P("a", None), "v": P("a", None), "layers": P(None, "a", None), "b": P("a")},
    "cols": {"w": P(None, "b"), "v": P(None, "a"), "layers": P(None, None, "a"), "b": P(None)},
    "both": {"w": P("a", "b"), "v": P("b", "a"), "layers": P("b", "a", None), "b": P("a")},
}
# One configuration per alias (and per FRUGAL subspace family), small enough for CPU.
ALIASES = {
    "galore": lambda: ol.galore(0.1, rank=4, update_proj_gap=2, dimension_numbers=DIMS),
    "apollo": lambda: ol.apollo(0.1, rank=4, update_proj_gap=2, dimension_numbers=DIMS,
                                weight_decay=0.01),
    "apollo_mini": lambda: ol.apollo_mini(0.1, update_proj_gap=2, dimension_numbers=DIMS),
    "fira": lambda: ol.fira(0.1, rank=4, update_proj_gap=2, dimension_numbers=DIMS),
    "frugal_blocks": lambda: ol.frugal(
        0.1, 0.5, subspace="blocks", update_proj_gap=2, dimension_numbers=DIMS,
        mask={"w": False, "v": False, "layers": True, "b": False}),
    "frugal_columns": lambda: ol.frugal(0.1, 0.25, subspace="columns", update_proj_gap=2,
                                        dimension_numbers=DIMS),
    "frugal_random": lambda: ol.frugal(0.1, 0.25, subspace="random", update_proj_gap=2,
                                       dimension_numbers=DIMS),
    "flora": lambda: ol.flora(0.1, rank=4, kappa=2, min_dim_size_to_factor=16,
                              momentum_dtype=jnp.float32, dimension_numbers=DIMS),
    "adarankgrad": lambda: ol.adarankgrad(0.1, rank=4, threshold=0.5, update_proj_gap=2,
                                          dimension_numbers=DIMS),
    "dct_adamw": lambda: ol.dct_adamw(0.1, rank=4, dimension_numbers=DIMS),
    "galore_8bit": lambda: ol.galore_8bit(0.1, rank=4, update_proj_gap=2,
                                          dimension_numbers=DIMS),
    "q_galore": lambda: ol.q_galore(0.1, rank=4, update_proj_gap=2, dimension_numbers=DIMS),
    "grass": lambda: ol.grass(0.1, rank=4, update_proj_gap=2, dimension_numbers=DIMS),
    "osd": lambda: ol.osd(0.1, rank=4, update_proj_gap=2, dimension_numbers=DIMS),
    "vlorp": lambda: ol.vlorp(0.1, rank=2, granularity=4, update_proj_gap=2,
                              dimension_numbers=DIMS, weight_decay=0.01),
    "coap": lambda: ol.coap(0.1, rank=4, update_proj_gap=2, reproject_factor=2,
                            dimension_numbers=DIMS),
    "golore": lambda: ol.golore(0.1, rank=4, update_proj_gap=2, switch_step=2,
                                dimension_numbers=DIMS),
}


def test_every_registered_optimizer_is_covered():
  names = set(ol.optimizers)
  covered = {k.split("_blocks")[0].split("_columns")[0].split("_random")[0] for k in ALIASES}
  assert names <= covered, names - covered


def _tree(seed):
  keys = jax.random.split(jax.random.key(seed), len(SHAPES))
  return {k: jax.random.normal(key, s) for key, (k, s) in zip(keys, SHAPES.items())}


def _lowrank_states(state):
  return [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, ol.LowRankState))
          if isinstance(s, ol.LowRankState)]



@functools.lru_cache(maxsize=None)
def _unsharded_run(name):
  tx = ALIASES[name]()
  params, grads = _tree(0), [_tree(s) for s in (1, 2, 3)]
  state = tx.init(params)
  update = jax.jit(tx.update)
  out = []
  for g in grads:
    u, state = update(g, state, params)
    out.append(u)
  return out


# Every alias on matrices sharded along both axes (stack sharded on its layer axis too);
# the random projectors, drawn sharded, also along one axis at a time.
# Aliases whose projector has a sharded test of its own (test_randomized_svd, test_dct_grass,
# test_online_pca, test_quantize, test_coap) are left out here to keep the suite short.
OWN_SHARDED_TESTS = ("adarankgrad", "dct_adamw", "grass", "osd", "galore_8bit", "coap")
SHARDED_CASES = [(name, "both") for name in sorted(ALIASES)
                 if name not in OWN_SHARDED_TESTS] + [("apollo", "rows")]
# One alias per kind of state (block and index bases, factored moments, key-drawn granular
# bases with ProjFactor, quantized lazy bases); GaLore (and Fira's SVD basis) has its own in
# test_checkpoint.py.
ROUNDTRIP = ("frugal_blocks", "frugal_columns", "flora", "vlorp", "q_galore")


@pytest.mark.parametrize("name, case", SHARDED_CASES)
def test_sharded_equals_unsharded_and_state_is_sharded_like_params(mesh, name, case):
  tx = ALIASES[name]()
  expected = _unsharded_run(name)
  specs = SPECS[case]
  params, grads = _tree(0), [_tree(s) for s in (1, 2, 3)]
  with jax.set_mesh(mesh):
    put = lambda t: {k: jax.device_put(x, NamedSharding(mesh, specs[k])) for k, x in t.items()}
    sp = put(params)
    state = jax.jit(tx.init)(sp)
    types = jax.tree.map(jax.typeof, state)
    # Parameter-shaped state of unprojected leaves keeps the parameter's sharding.
    for lowrank in _lowrank_states(state):
      for path, leaf in jax.tree.flatten_with_path(lowrank.inner_state)[0]:
        key = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        if key and key[-1] == "b" and leaf.shape == SHAPES["b"]:
          assert jax.typeof(leaf).sharding.spec == specs["b"], (path, name)
    update = jax.jit(tx.update)
    for g, want in zip(grads, expected):
      u, state = update(put(g), state, sp)
      assert jax.tree.map(jax.typeof, state) == types  # no recompilation, donation-safe
      for k in SHAPES:
        assert jax.typeof(u[k]).sharding.spec == jax.typeof(sp[k]).sharding.spec, (k, name)
        got, ref = np.asarray(u[k]), np.asarray(want[k])
        assert np.linalg.norm(got - ref) <= 2e-5 * np.linalg.norm(ref), (name, k)


@pytest.mark.parametrize("name", ROUNDTRIP)
def test_orbax_roundtrip_continues_bit_exactly(tmp_path, name):
  tx = ALIASES[name]()
  params = _tree(0)
  step = jax.jit(lambda p, s, t: _apply(tx, p, s, _tree(100 + t)))

  p, s = params, tx.init(params)
  for t in range(7):
    p, s = step(p, s, t)
  straight = (p, s)

  p, s = params, tx.init(params)
  for t in range(3):
    p, s = step(p, s, t)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "ckpt", {"params": p, "opt_state": s})
  abstract = jax.eval_shape(lambda: {"params": params, "opt_state": tx.init(params)})
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(tmp_path / "ckpt", abstract)
  p, s = restored["params"], restored["opt_state"]
  for t in range(3, 7):
    p, s = step(p, s, t)
  jax.tree.map(np.testing.assert_array_equal, (p, s), straight)


def _apply(tx, params, state, grads):
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state


def test_fira_stacked_leaf_equals_its_layers_one_by_one():
  """A (4, 32, 48) leaf with a batch axis is updated as four separate matrices: SVD
  bases, channel factors and limiter norms are per layer. (Random projectors draw one
  key per leaf; their stacked cases are in the reference tests.)"""
  stacked = {"s": jax.random.normal(jax.random.key(0), (4, 32, 48))}
  split = {f"l{i}": stacked["s"][i] for i in range(4)}
  tx_s = ol.fira(0.1, rank=4, update_proj_gap=3,
                 dimension_numbers={"s": ol.DimensionNumbers(1, 2)})
  tx_l = ol.fira(0.1, rank=4, update_proj_gap=3)
  ss, sl = tx_s.init(stacked), tx_l.init(split)
  for t in range(7):
    g = jax.random.normal(jax.random.fold_in(jax.random.key(1), t), (4, 32, 48))
    us, ss = jax.jit(tx_s.update)({"s": g}, ss, stacked)
    ul, sl = jax.jit(tx_l.update)({f"l{i}": g[i] for i in range(4)}, sl, split)
    for i in range(4):
      np.testing.assert_allclose(us["s"][i], ul[f"l{i}"], rtol=2e-5, atol=1e-7)


def test_blocks_needs_a_stacked_axis_and_names_the_leaf():
  with pytest.raises(ValueError, match=r"\['w'\].*blocks.*stacked"):
    ol.frugal(1e-3, subspace="blocks").init({"w": jnp.zeros((32, 16))})


@pytest.mark.parametrize("factory, kwargs, match", [
    (ol.apollo, dict(scale_type="row"), "scale_type"),
    (ol.apollo, dict(projector="svd2"), "projector"),
    (ol.apollo, dict(b1=1.0), "b1"),
    (ol.fira, dict(proj_type="full"), "proj_type"),
    (ol.fira, dict(eps=-1.0), "eps"),
    (ol.frugal, dict(density=0.0), "density"),
    (ol.frugal, dict(subspace="diagonal"), "projector"),
    (ol.frugal, dict(order="sideways"), "order"),
    (ol.frugal, dict(state_free_rule="adam"), "rule"),
    (ol.flora, dict(b2=0.0), "b2"),
    (ol.flora, dict(clipping_threshold=0.0), "clipping_threshold"),
    (ol.coap, dict(reproject_factor=0), "reproject_factor"),
    (ol.coap, dict(update_proj_gap=0), "update_proj_gap"),
    (ol.coap, dict(b1=1.0), "b1"),
    (ol.coap, dict(state_dtype="int4"), "state_dtype"),
])
def test_bad_hyperparameters_name_the_parameter(factory, kwargs, match):
  with pytest.raises(ValueError, match=match):
    factory(1e-3, **kwargs)
