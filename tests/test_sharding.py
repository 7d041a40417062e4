"""States are born sharded like their parameters; sharded updates match."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import optax_lowrank as ol
from tests import test_aliases as aliases  # the aliases' configurations and unsharded runs

SHAPES = {"w": (64, 32), "v": (32, 64), "layers": (4, 32, 48), "b": (32,)}
DIMS = {"w": None, "v": None, "layers": ol.DimensionNumbers(1, 2), "b": None}
CASES = {
    "rows": {"w": P("a", None), "v": P("a", None), "layers": P(None, "a", None), "b": P("a")},
    "cols": {"w": P(None, "b"), "v": P(None, "a"), "layers": P(None, None, "a"), "b": P(None)},
    "both": {"w": P("a", "b"), "v": P("b", "a"), "layers": P("b", "a", None), "b": P("a")},
}


def _tree(seed):
  keys = jax.random.split(jax.random.key(seed), len(SHAPES))
  return {k: jax.random.normal(key, s) for key, (k, s) in zip(keys, SHAPES.items())}



def _spec_entry(spec, axis):
  return spec[axis] if axis < len(spec) else None


@pytest.mark.parametrize("proj_type", ["std", "reverse_std"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_sharded_state_and_updates(mesh, case, proj_type):
  specs = CASES[case]
  tx = ol.galore(0.1, rank=4, update_proj_gap=2, proj_type=proj_type,
                 dimension_numbers=DIMS, weight_decay=0.01)
  params, grads = _tree(0), [_tree(s) for s in (1, 2, 3)]
  state = tx.init(params)
  expected = []
  for g in grads:
    u, state = jax.jit(tx.update)(g, state, params)
    expected.append(u)

  with jax.set_mesh(mesh):
    put = lambda t: {k: jax.device_put(x, NamedSharding(mesh, specs[k])) for k, x in t.items()}
    sp = put(params)
    state = jax.jit(tx.init)(sp)
    types = jax.tree.map(jax.typeof, state)
    lowrank = state[0]
    for name, spec in specs.items():
      layout = ol.shapes.MatrixLayout.from_dimension_numbers(
          SHAPES[name], DIMS[name] or ol.DimensionNumbers(0, 1), name
      ) if len(SHAPES[name]) > 1 else None
      if layout is None:
        assert jax.typeof(lowrank.inner_state.mu[name]).sharding.spec == spec
        continue
      # Moments and basis keep the parameter's sharding on the axes they share.
      # Array layout of the gradient: (batch..., n, m) = (..., reduction, output).
      arr = [_spec_entry(spec, a) for a in layout.batch_axes] + [
          _spec_entry(spec, layout.reduction_axes[0]),
          _spec_entry(spec, layout.output_axes[0]),
      ]
      mu = lowrank.inner_state.mu[name]
      basis = jax.tree.leaves(lowrank.bases[name])[0]
      mu_spec = tuple(jax.typeof(mu).sharding.spec) + (None,) * 3
      b_spec = tuple(jax.typeof(basis).sharding.spec) + (None,) * 3
      nb = len(layout.batch_axes)
      assert mu_spec[:nb] == tuple(arr[:nb]) and b_spec[:nb] == tuple(arr[:nb])
      if mu.shape[-1] == 4:  # left: R is (n, r), the basis U (m, r)
        assert mu_spec[nb:nb + 2] == (arr[nb], None)
        assert b_spec[nb:nb + 2] == (arr[nb + 1], None)
      else:  # right: R is (r, m), the basis Vh (r, n)
        assert mu_spec[nb:nb + 2] == (None, arr[nb + 1])
        assert b_spec[nb:nb + 2] == (None, arr[nb])

    update = jax.jit(tx.update)
    for g, want in zip(grads, expected):
      u, state = update(put(g), state, sp)
      assert jax.tree.map(jax.typeof, state) == types
      for k in SHAPES:
        assert jax.typeof(u[k]).sharding.spec == jax.typeof(sp[k]).sharding.spec
        got, ref = np.asarray(u[k]), np.asarray(want[k])
        assert np.linalg.norm(got - ref) <= 1e-5 * np.linalg.norm(ref), k


def test_full_projection_runs_sharded(mesh):
  """Two-sided bases: types are stable and the state is sharded as the params.

  Values are not compared: right after an SVD refresh, ``Uᵀ G Vᵀ`` is diagonal
  up to rounding, and Adam's first step amplifies that rounding noise (which
  differs between sharded and unsharded reductions) into O(1) entries.
  """
  tx = ol.galore(0.1, rank=4, update_proj_gap=2, proj_type="full", dimension_numbers=DIMS)
  specs = CASES["both"]
  with jax.set_mesh(mesh):
    put = lambda t: {k: jax.device_put(x, NamedSharding(mesh, specs[k])) for k, x in t.items()}
    sp = put(_tree(0))
    state = jax.jit(tx.init)(sp)
    types = jax.tree.map(jax.typeof, state)
    for s in (1, 2, 3):
      u, state = jax.jit(tx.update)(put(_tree(s)), state, sp)
      assert jax.tree.map(jax.typeof, state) == types
      assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
    u_basis = state[0].bases["w"].basis.u  # w: matrix (32, 64) sharded ("b", "a")
    assert jax.typeof(u_basis).sharding.spec[0] == "b"


# ---------------------------------------------------------------------------
# State that does not depend on the mesh: the same tree structure with and without one,
# and the same optimizers under Auto mesh axes (MaxText's default) as under Explicit ones.

AUTO = (jax.sharding.AxisType.Auto,) * 2
EXPLICIT = (jax.sharding.AxisType.Explicit,) * 2
_pr = ol.projectors
_LAYERS_ONLY = {"w": False, "v": False, "layers": True, "b": False}


def _project(projector, **kwargs):
  return lambda: ol.lowrank_project(
      optax.scale_by_adam(), rank=4, update_proj_gap=2, projector=projector(),
      dimension_numbers=aliases.DIMS, **kwargs)


# lowrank_project with each projector and wrapper (the aliases cover the combine rules).
PROJECTED = {
    "svd": _project(lambda: _pr.svd()),
    "svd_full": _project(lambda: _pr.svd("full")),
    "randomized_svd": _project(lambda: _pr.randomized_svd(warm_start=True)),
    "online_pca": _project(lambda: _pr.online_pca(2)),
    "coap": _project(lambda: _pr.coap(2)),
    "random": _project(lambda: _pr.random()),
    "random_orthonormal": _project(lambda: _pr.random("left", std="orthonormal")),
    "blocks": _project(lambda: _pr.blocks(0.5), projection_mask=_LAYERS_ONLY),
    "columns": _project(lambda: _pr.coordinates("columns", density=0.5)),
    "random_k": _project(lambda: _pr.coordinates("random_k", density=0.5)),
    "randperm": _project(lambda: _pr.randperm()),
    "dct": _project(lambda: _pr.dct()),
    "grass": _project(lambda: _pr.grass(selection="norm_sampling")),
    "granular_random": _project(lambda: _pr.granular(_pr.random(std="unit"), 4)),
    "granular_svd": _project(lambda: _pr.granular(_pr.svd(), 0.5)),
    "quantized_svd": _project(lambda: ol.quantize.quantize_basis(_pr.svd())),
    "quantized_lazy": _project(lambda: ol.quantize.quantize_basis(
        ol.schedules.lazy(_pr.svd(), 2), bits=8)),
    "adaptive_rank": _project(lambda: ol.schedules.adaptive_rank(_pr.svd())),
    "quantized_moments": lambda: ol.lowrank_project(
        ol.quantize.quantize_state(optax.scale_by_adam(), min_size=64), rank=4,
        update_proj_gap=2, dimension_numbers=aliases.DIMS),
}
CONFIGS = {**{f"alias_{k}": v for k, v in aliases.ALIASES.items()}, **PROJECTED}


def _put(mesh, tree, specs):
  return {k: jax.device_put(x, NamedSharding(mesh, specs[k])) for k, x in tree.items()}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_state_tree_structure_does_not_depend_on_the_mesh(mesh, name):
  """``init`` on unsharded parameters (``jax.eval_shape``) and, under an Explicit and an
  Auto 4 x 2 mesh, ``jax.jit(init)`` on parameters sharded along both matrix axes give
  one tree structure: no static field of the state records a mesh or a sharding.
  (``jit(...).eval_shape`` traces ``jit(init)`` without compiling; tracing decides the
  structure.)"""
  tx = CONFIGS[name]()
  params = aliases._tree(0)
  want = jax.tree.structure(jax.eval_shape(tx.init, params))
  for axis_types in (EXPLICIT, AUTO):
    mesh_ = jax.make_mesh((4, 2), ("a", "b"), axis_types=axis_types)
    with jax.set_mesh(mesh_):
      state = jax.jit(tx.init).eval_shape(_put(mesh_, params, aliases.SPECS["both"]))
    assert jax.tree.structure(state) == want, (name, axis_types)


# A representative set: SVD, key-drawn, sparse-index, DCT and COAP bases. The granular
# (vlorp), block (frugal_blocks) and quantized lazy (q_galore) bases run under an Auto
# mesh in the test below, which lays their state out from an Explicit mesh and makes the
# same comparison with the unsharded run.
AUTO_MESH_ALIASES = ("galore", "apollo", "grass", "coap", "dct_adamw")
EXPLICIT_LAYOUT_ALIASES = ("vlorp", "frugal_blocks", "q_galore")


def _inputs():
  """Parameters, two gradients and their specs (both matrix axes sharded)."""
  return aliases._tree(0), [aliases._tree(s) for s in (1, 2)], aliases.SPECS["both"]


def _two_updates_equal_the_unsharded_run(name, update, state, mesh, sp, grads, specs):
  """Each update equals the unsharded run's (2e-5) and keeps the state's types."""
  types = jax.tree.map(jax.typeof, state)
  for g, want in zip(grads, aliases._unsharded_run(name)[:2]):
    u, state = update(_put(mesh, g, specs), state, sp)
    assert jax.tree.map(jax.typeof, state) == types
    for k in aliases.SHAPES:
      got, ref = np.asarray(u[k]), np.asarray(want[k])
      assert np.linalg.norm(got - ref) <= 2e-5 * np.linalg.norm(ref), (name, k)


@pytest.mark.parametrize("name", AUTO_MESH_ALIASES)
def test_auto_mesh_equals_unsharded_with_stable_state_types(mesh, name):
  """Under an Auto mesh (no explicit shardings: the library takes its unsharded paths
  and XLA's propagation shards), init and two jitted updates on parameters and
  gradients sharded along both matrix axes equal the unsharded run, and the state's
  types after each update are those after init."""
  tx, params, grads, specs = aliases.ALIASES[name](), *_inputs()
  auto = jax.make_mesh((4, 2), ("a", "b"), axis_types=AUTO)
  with jax.set_mesh(auto):
    sp = _put(auto, params, specs)
    state = jax.jit(tx.init)(sp)
    update = jax.jit(tx.update)
    _two_updates_equal_the_unsharded_run(name, update, state, auto, sp, grads, specs)


@pytest.mark.parametrize("name", EXPLICIT_LAYOUT_ALIASES)
def test_state_shardings_from_an_explicit_mesh_lay_out_an_auto_mesh_run(mesh, name):
  """As a MaxText-style trainer does: the state's shardings are read off
  ``jax.eval_shape(init)`` on an Explicit mesh (outside the state), then given as
  ``out_shardings`` to ``init`` and ``update`` jitted under an Auto mesh of the same
  devices. That needs the same tree structure on both meshes; the state is then laid out
  like the parameters and the updates equal the unsharded run."""
  tx, params, grads, specs = aliases.ALIASES[name](), *_inputs()
  explicit = jax.make_mesh((4, 2), ("a", "b"), axis_types=EXPLICIT)
  with jax.set_mesh(explicit):
    abstract = jax.eval_shape(tx.init, _put(explicit, params, specs))
  auto = jax.make_mesh((4, 2), ("a", "b"), axis_types=AUTO)
  shardings = jax.tree.map(  # as train.steps.state_shardings: scalars come back unsharded
      lambda x: NamedSharding(auto, x.sharding.spec if x.sharding is not None else P()),
      abstract)
  assert any(s.spec != P() for s in jax.tree.leaves(shardings))  # the state is sharded
  param_shardings = {k: NamedSharding(auto, s) for k, s in specs.items()}
  with jax.set_mesh(auto):
    sp = _put(auto, params, specs)
    state = jax.jit(tx.init, out_shardings=shardings)(sp)
    update = jax.jit(tx.update, out_shardings=(param_shardings, shardings))
    _two_updates_equal_the_unsharded_run(name, update, state, auto, sp, grads, specs)
