"""A second implementation: optax.contrib.galore equals our `reverse_std`.

optax.contrib.galore views a kernel as ``(in, out)`` and projects on the left
when ``in >= out``: it keeps the smaller side, which is galore-torch's
``reverse_std``, not its default ``std``. Within one gap (before SVD sign
conventions can matter) the two implementations must agree.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_lowrank as ol


def _run(tx, params, steps=6):
  state = tx.init(params)
  update = jax.jit(tx.update)  # one compile instead of op-by-op dispatch
  out = []
  for t in range(steps):
    g = jax.tree.map(lambda x: jax.random.normal(jax.random.key(t), x.shape), params)
    u, state = update(g, state, params)
    out.append(u)
  return out


def test_optax_contrib_galore_matches_reverse_std():
  params = {"tall": jnp.zeros((48, 20)), "wide": jnp.zeros((20, 36)), "b": jnp.zeros(20)}
  theirs = _run(optax.contrib.galore(1e-2, rank=4, update_proj_gap=100, scale=0.25), params)
  ours = _run(ol.galore(1e-2, rank=4, update_proj_gap=100, scale=0.25, eps=1e-8,
                        proj_type="reverse_std"), params)
  std = _run(ol.galore(1e-2, rank=4, update_proj_gap=100, scale=0.25, eps=1e-8), params)
  for u_ours, u_theirs, u_std in zip(ours, theirs, std):
    for k in params:
      ref = np.asarray(u_theirs[k])
      assert np.linalg.norm(np.asarray(u_ours[k]) - ref) <= 2e-5 * np.linalg.norm(ref), k
    for k in ("tall", "wide"):  # galore-torch's default orientation differs
      ref = np.asarray(u_theirs[k])
      assert np.linalg.norm(np.asarray(u_std[k]) - ref) > 0.5 * np.linalg.norm(ref)
