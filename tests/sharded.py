"""Running an optimizer on one device and on a mesh, and comparing the two."""

import jax
import numpy as np
from jax.sharding import NamedSharding


def assert_sharded_matches(tx, params, grads, mesh, specs, *, rtol):
  """Runs ``tx.update`` over ``grads`` unsharded, then on ``mesh`` with every leaf put
  with ``specs`` (a dict like ``params``), and asserts at every step: the state's types
  are those of ``init`` (no recompilation), each update is sharded like its parameter,
  and ``‖sharded − unsharded‖ <= rtol · ‖unsharded‖`` per leaf.

  Returns:
    ``(unsharded updates per step, compiled sharded update)``; the latter's
    ``as_text()`` is the HLO for ``tests.hlo``.
  """
  state = jax.jit(tx.init)(params)
  update = jax.jit(tx.update)
  expected = []
  for g in grads:
    u, state = update(g, state, params)
    expected.append(u)
  with jax.set_mesh(mesh):
    put = lambda t: {k: jax.device_put(x, NamedSharding(mesh, specs[k]))
                     for k, x in t.items()}
    sp = put(params)
    state = jax.jit(tx.init)(sp)
    types = jax.tree.map(jax.typeof, state)
    compiled = jax.jit(tx.update).lower(put(grads[0]), state, sp).compile()
    for g, want in zip(grads, expected):
      u, state = compiled(put(g), state, sp)
      assert jax.tree.map(jax.typeof, state) == types
      for k in specs:
        assert jax.typeof(u[k]).sharding.spec == jax.typeof(sp[k]).sharding.spec
        got, ref = np.asarray(u[k]), np.asarray(want[k])
        assert np.linalg.norm(got - ref) <= rtol * np.linalg.norm(ref), k
  return expected, compiled
