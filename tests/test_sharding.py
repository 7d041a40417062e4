"""States are born sharded like their parameters; sharded updates match."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import optax_lowrank as ol

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
