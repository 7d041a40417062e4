"""Every registered alias: jit, stacked layers, 8-device sharding, Orbax round trip.

Values are checked against each alias's own unsharded run (sharding must not change
the numbers); the formulas themselves are checked against float64 references in the
``test_*_reference.py`` files.
"""

import functools
import inspect

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
        projection_mask={"w": False, "v": False, "layers": True, "b": False}),
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
    "gradnorm_lorp": lambda: ol.gradnorm_lorp(0.1, rank=4, update_proj_gap=2,
                                              dimension_numbers=DIMS),
    "gum": lambda: ol.gum(0.1, rank=4, full_rank_layers=1, update_proj_gap=2,
                          dimension_numbers=DIMS,
                          projection_mask={"w": False, "v": False, "layers": True,
                                           "b": False}),
    # "layers" is a stack of 4 layers, 2 trained at a time.
    "owlore": lambda: ol.owlore(0.1, rank=4, active_layers=2, interval=2,
                                update_proj_gap=2, dimension_numbers=DIMS),
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
    (ol.frugal, dict(subspace="diagonal"), "`subspace`"),
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


# ---------------------------------------------------------------------------
# The shared options, inject_hyperparams and argument checks, for every alias.
# ---------------------------------------------------------------------------

SMALL = {"w": (32, 16), "v": (16, 24), "b": (16,)}
# One small configuration per registered alias: rank 4 (or density 0.25), and
# sides that every alias projects.
SMALL_KWARGS = {
    "galore": dict(rank=4),
    "apollo": dict(rank=4),
    "apollo_mini": dict(),
    "fira": dict(rank=4),
    "frugal": dict(density=0.25, subspace="columns"),
    "flora": dict(rank=4, min_dim_size_to_factor=8),
    "vlorp": dict(rank=2, granularity=4),
    "osd": dict(rank=4, peak_learning_rate=0.1),
    "dct_adamw": dict(rank=4),
    "grass": dict(rank=4),
    "adarankgrad": dict(rank=4),
    "galore_8bit": dict(rank=4),
    "q_galore": dict(rank=4),
    "coap": dict(rank=4),
    "golore": dict(rank=4),
    "gradnorm_lorp": dict(rank=4),
    "gum": dict(rank=4, full_rank_layers=1, num_layers=2, group_fn=lambda path: path),
    "owlore": dict(rank=4),
}
DECAY_MASK = {"w": True, "v": False, "b": False}
PROJECTED = {"w": True, "v": True, "b": False}


def test_every_registered_optimizer_has_a_small_configuration():
  assert set(ol.optimizers) == set(SMALL_KWARGS)


def _small(seed):
  keys = jax.random.split(jax.random.key(seed), len(SMALL))
  return {k: jax.random.normal(key, s) for key, (k, s) in zip(keys, SMALL.items())}


def _bases(state):
  return {name for s in _lowrank_states(state) for name in s.bases}


@pytest.mark.parametrize("name", sorted(SMALL_KWARGS))
def test_mask_is_the_weight_decay_mask_of_optax_adamw(name):
  """``mask`` selects the decayed leaves exactly as ``optax.adamw``'s does: the
  update with weight decay minus the one without is optax.adamw's (its own two
  updates' difference, ``-lr·wd·W`` on the masked leaves), for a callable mask, while
  ``projection_mask`` (also a callable) picks the projected leaves. Flora adds
  ``wd·W`` after the learning rate (its reference's rule): its difference is
  optax.adamw's divided by the learning rate. GradNormLoRP decays its projected
  (weight-normalized) leaves after the step, as its reference does: there the
  difference is ``-lr·wd·W'``, ``W'`` the weight after the step without decay."""
  lr, wd = 0.1, 0.25
  params, grads = _small(0), _small(1)
  factory = ol.optimizers[name]
  kw = dict(SMALL_KWARGS[name], mask=lambda p: DECAY_MASK,
            projection_mask=lambda p: PROJECTED)

  def first_update(tx):
    state = tx.init(params)
    return tx.update(grads, state, params)[0], state

  @jax.jit
  def run():
    with_decay, state = first_update(factory(lr, weight_decay=wd, **kw))
    without, _ = first_update(factory(lr, weight_decay=0.0, **kw))
    ref_decay, _ = first_update(
        optax.adamw(lr, weight_decay=wd, mask=lambda p: DECAY_MASK))
    ref_without, _ = first_update(optax.adamw(lr, weight_decay=0.0))
    return with_decay, without, ref_decay, ref_without, state

  with_decay, without, ref_decay, ref_without, state = run()
  assert _bases(state) == {"w", "v"}, (name, _bases(state))  # projection_mask
  for k in SMALL:
    got = np.asarray(with_decay[k]) - np.asarray(without[k])
    want = np.asarray(ref_decay[k]) - np.asarray(ref_without[k])
    if name == "flora":
      want = want / lr
    if name == "gradnorm_lorp" and PROJECTED[k]:
      want = -lr * wd * (np.asarray(params[k]) + np.asarray(without[k])) * DECAY_MASK[k]
    scale = np.abs(np.asarray(without[k])).max() + np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * scale,
                               err_msg=f"{name} {k}")
    if not DECAY_MASK[k]:
      assert not np.any(got), (name, k)


@pytest.mark.parametrize("name", sorted(SMALL_KWARGS))
def test_inject_hyperparams_with_the_static_args_equals_the_alias(name):
  """optax's documented recipe with ``STATIC_ARGS``: numbers injected as arrays (and
  a learning-rate schedule), callable masks kept static. One jitted update equals
  the alias's, and the state is the alias's low-rank one (callables not taken for
  schedules: the projected leaves keep their bases, the inner state its shapes)."""
  factory = ol.optimizers[name]
  kw = dict(SMALL_KWARGS[name], learning_rate=optax.linear_schedule(0.1, 0.01, 10),
            weight_decay=0.01, mask=lambda p: DECAY_MASK,
            projection_mask=lambda p: PROJECTED)
  params, grads = _small(0), _small(1)
  plain = factory(**kw)
  injected = optax.inject_hyperparams(
      factory, static_args=ol.STATIC_ARGS[name])(**kw)

  plain_state = jax.jit(plain.init)(params)
  state = jax.jit(injected.init)(params)
  assert "b1" in state.hyperparams and "learning_rate" in state.hyperparams_states
  assert not {"mask", "projection_mask"} & (set(state.hyperparams)
                                           | set(state.hyperparams_states))
  assert _bases(state.inner_state) == _bases(plain_state) == {"w", "v"}, name
  shapes = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), _lowrank_states(t))
  assert shapes(state.inner_state) == shapes(plain_state), name

  want, _ = jax.jit(plain.update)(grads, plain_state, params)
  got, state = jax.jit(injected.update)(grads, state, params)
  for k in SMALL:
    atol = 1e-6 * float(jnp.abs(want[k]).max())
    if name == "gradnorm_lorp":  # W' − W: rounded to W's float32 spacing, as W + U is
      atol = max(atol, 4 * float(jnp.finfo(jnp.float32).eps * jnp.abs(params[k]).max()))
    np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=2e-5,
                               atol=atol, err_msg=f"{name} {k}")


# Values each argument must refuse, by name; every argument of every alias has an
# entry (masks and dimension numbers accept any pytree or function).
NAN, INF = float("nan"), float("inf")
BAD = {
    "learning_rate": [NAN, INF, True, "0.1"],
    "rank": [True, 0, -1, NAN, INF, 1.5, "8", np.bool_(True)],
    "update_proj_gap": [True, 0, 2.5, np.float32(10)],
    "scale": [0.0, -1.0, NAN, INF, np.float32(INF), True],
    "proj_type": ["diag", 1],
    "projector": ["svd2"],
    "b1": [NAN, 1.0, -0.1, True],
    "b2": [NAN, 1.0, -0.1, True],
    "eps": [NAN, -1e-8, INF, True],
    "weight_decay": [NAN, -0.1, INF, True],
    "mask": [],
    "projection_mask": [],
    "dimension_numbers": [],
    "stagger": [1, "yes"],
    "seed": [True, 1.5, "0"],
    "state_dtype": ["int4", "float16"],
    "group_fn": [3],
    "on_refresh": ["sometimes"],
    "scale_type": ["row"],
    "scale_front": [1],
    "limiter": ["yes"],
    "density": [True, 0.0, 1.5, NAN],
    "subspace": ["diagonal"],
    "order": ["sideways"],
    "proj_lr_scale": [0.0, NAN],
    "state_free_lr_scale": [-1.0, NAN],
    "state_free_rule": ["adam"],
    "reset_statistics": [1],
    "kappa": [True, 0, 2.5],
    "clipping_threshold": [0.0, NAN],
    "multiply_by_parameter_scale": [1],
    "min_dim_size_to_factor": [0, True],
    "factorized_second_moment": [1],
    "momentum_dtype": ["float99"],
    "granularity": [3, True, 0],
    "distribution": ["uniform"],
    "peak_learning_rate": [0.0, NAN],
    "norm": ["l3"],
    "selection": ["random"],
    "threshold": [0.0, 1.5, NAN],
    "proj_bits": [3, True],
    "proj_group_size": [0, True],
    "cos_threshold": [1.5, NAN],
    "gamma_proj": [1, True],
    "queue_size": [0],
    "reproject_factor": [0, True],
    "switch_step": [-1, True],
    "exact_gradient": [1, "yes"],
    "reset_magnitude": [1, "yes"],
    "full_rank_layers": [0, True, 1.5],
    "num_layers": [1, True, 2.5],
    "beta": [NAN, 1.0, -0.1, True],
    "ns_steps": [0, True, 2.5],
    "consistent_rms": [0.0, NAN, True],
    "active_layers": [0, True, 1.5, 0.0, NAN, "2"],
    "interval": [0, True, 2.5],
    "layer_weights": ["norm", [1.0, -1.0], [NAN], []],
    "outlier_threshold": [0.0, -1.0, NAN, INF, True],
    "layer_of": [3, "layers"],
    "switch_threshold": [-1.0, NAN, INF, True],
}
BAD_FOR = {("flora", "b2"): [NAN, 0.0, INF, True],  # an exponent > 0
           ("vlorp", "projector"): ["random"]}  # None or a Projector


@pytest.mark.parametrize("name", sorted(SMALL_KWARGS))
def test_bad_values_are_refused_naming_the_argument(name):
  """Bools where numbers belong (``update_proj_gap=True`` would refresh every step),
  ``inf``, ``nan`` and out-of-range values are errors, and every error names the
  argument as the user passed it (Flora's ``kappa``, Q-GaLore's ``proj_bits``,
  FRUGAL's ``subspace``), never an internal one."""
  factory = ol.optimizers[name]
  params = inspect.signature(factory).parameters
  accepted, misnamed = [], []
  for p in params:
    for value in BAD_FOR.get((name, p), BAD.get(p, [])):
      kwargs = dict(SMALL_KWARGS[name], learning_rate=1e-3)
      kwargs[p] = value
      try:
        factory(**kwargs)
      except ValueError as e:
        if f"`{p}`" not in str(e):
          misnamed.append((p, value, str(e)))
      else:
        accepted.append((p, value))
  assert not accepted, (name, "accepted", accepted)
  assert not misnamed, (name, "errors not naming the argument", misnamed)
  missing = [p for p in params if p not in BAD]
  assert not missing, f"no bad values for {missing}: add them to BAD"


@pytest.mark.parametrize("factory, kwargs, match", [
    # Accepted, then wrong (issue 14): a refresh every step, an infinite step, nan.
    (ol.galore, dict(update_proj_gap=True), "`update_proj_gap`"),
    (ol.galore, dict(scale=np.float32("inf")), "`scale`"),
    (ol.apollo, dict(scale=float("inf")), "`scale`"),
    (ol.frugal, dict(density=True), "`density`"),
    *[(f, dict(eps=float("nan")), "`eps`") for f in ol.optimizers.values()],
    # Errors that named an internal argument instead of the one passed.
    (ol.flora, dict(kappa=0), "`kappa`"),
    (ol.q_galore, dict(proj_bits=3), "`proj_bits`"),
    (ol.frugal, dict(subspace="diagonal"), "`subspace`"),
    (ol.flora, dict(clipping_threshold=0.0), "`clipping_threshold`"),
    (ol.q_galore, dict(gamma_proj=1), "`gamma_proj`"),
])
def test_issue_14_values_are_refused_naming_the_argument(factory, kwargs, match):
  with pytest.raises(ValueError, match=match):
    factory(1e-3, **kwargs)


def test_cross_argument_errors_name_the_arguments():
  with pytest.raises(ValueError, match="`proj_group_size`"):
    ol.q_galore(1e-3, proj_bits=4, proj_group_size=255)
  with pytest.raises(ValueError, match="`kappa`"):
    ol.flora(1e-3, kappa=0)


@pytest.mark.parametrize("name", sorted(
    n for n in SMALL_KWARGS if "rank" in inspect.signature(ol.optimizers[n]).parameters))
def test_numpy_and_jax_integers_are_ranks(name):
  """``rank=np.int64(8)`` (from a numpy config, or a JAX scalar) is rank 8."""
  for rank in (np.int64(8), jnp.int32(8)):
    kwargs = dict(SMALL_KWARGS[name], rank=rank)
    if name == "vlorp":
      kwargs["granularity"] = 1
    if "update_proj_gap" in inspect.signature(ol.optimizers[name]).parameters:
      kwargs["update_proj_gap"] = np.int32(10)
    tx = ol.optimizers[name](1e-3, **kwargs)
    state = jax.eval_shape(tx.init, {"w": jax.ShapeDtypeStruct((48, 32), jnp.float32)})
    (lowrank,) = _lowrank_states(state)
    assert lowrank.bases["w"].rank == 8, (name, rank)


@pytest.mark.parametrize("factory, arg", [
    (ol.galore, "projector"), (ol.galore_8bit, "projector"), (ol.apollo, "projector"),
    (ol.apollo_mini, "projector"), (ol.fira, "projector"), (ol.frugal, "subspace")])
def test_proj_type_with_a_projector_instance_is_an_error(factory, arg):
  """A ``Projector`` carries its side: ``proj_type`` beside it is refused, not ignored."""
  with pytest.raises(ValueError, match="`proj_type`.*Projector instance"):
    factory(1e-3, proj_type="std", **{arg: ol.projectors.svd("right")})
  factory(1e-3, **{arg: ol.projectors.svd("right")})  # alone, it is used


def test_shared_options_are_the_same_everywhere():
  """Every alias takes the shared options, with the same defaults (q_galore and
  galore_8bit store int8 moments by definition), documented in its docstring."""
  shared = dict(mask=None, projection_mask=None, dimension_numbers=None, stagger=False,
                seed=0, state_dtype=None, group_fn=None)
  for name, factory in ol.optimizers.items():
    params = inspect.signature(factory).parameters
    for option, default in shared.items():
      if name in ("q_galore", "galore_8bit") and option == "state_dtype":
        default = "int8"
      assert params[option].default == default, (name, option)
      assert params[option].kind == inspect.Parameter.KEYWORD_ONLY, (name, option)
      assert f"    {option}: " in factory.__doc__ or name in ("apollo_mini", "galore_8bit")
    assert set(ol.STATIC_ARGS[name]) <= set(params), name
    assert {"mask", "projection_mask", "dimension_numbers", "group_fn"} <= set(
        ol.STATIC_ARGS[name]), name


def test_variants_are_partials_the_trainer_can_call():
  """``apollo_mini`` and ``galore_8bit`` are ``functools.partial``s (as optax's
  ``nadamw``) whose signatures still show what they take."""
  assert isinstance(ol.apollo_mini, functools.partial)
  assert ol.apollo_mini.func is ol.apollo and ol.galore_8bit.func is ol.galore
  params = inspect.signature(ol.apollo_mini).parameters
  assert params["rank"].default == 1 and params["scale"].default == 128.0
  assert {"projection_mask", "update_proj_gap", "seed"} <= set(params)
  assert inspect.signature(ol.galore_8bit).parameters["state_dtype"].default == "int8"
  assert ol.aliases.static_args(ol.apollo_mini) == ol.aliases.static_args(ol.apollo)


def test_a_traced_static_argument_names_the_recipe():
  with pytest.raises(ValueError, match=r"`granularity`.*STATIC_ARGS\['vlorp'\]"):
    jax.jit(lambda c: ol.vlorp(1e-3, granularity=c).init({"w": jnp.ones((8, 8))}))(4)


def test_osd_takes_a_schedule_without_its_peak_with_a_warning():
  """optax's harness passes a schedule alone; the basis step then does not follow it."""
  with pytest.warns(UserWarning, match="peak_learning_rate"):
    ol.osd(optax.constant_schedule(1e-3), rank=4)


@pytest.mark.parametrize("name", sorted(SMALL_KWARGS))
def test_state_dtype_int8_quantizes_the_inner_moments(name):
  """``state_dtype="int8"``, a shared option, stores the inner optimizer's large
  moments block-wise quantized in every alias (traced only)."""
  params = {"w": jax.ShapeDtypeStruct((256, 128), jnp.float32),
            "e": jax.ShapeDtypeStruct((64, 128), jnp.float32)}
  quantized = lambda s: [x for x in jax.tree.leaves(
      s, is_leaf=lambda x: isinstance(x, ol.quantize.QuantizedArray))
                         if isinstance(x, ol.quantize.QuantizedArray)]
  nbytes = lambda s: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(s))
  states = {}
  for dtype in (None, "int8"):
    kw = dict(SMALL_KWARGS[name], projection_mask={"w": True, "e": False},
              state_dtype=dtype)
    states[dtype] = jax.eval_shape(ol.optimizers[name](1e-3, **kw).init, params)
  assert quantized(states["int8"]) and nbytes(states["int8"]) < nbytes(states[None])
  if name not in ("q_galore", "galore_8bit"):  # int8 by default
    assert not quantized(states[None]), name
