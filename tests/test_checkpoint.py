"""Orbax save → restore → continue equals the uninterrupted run bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import optax_lowrank as ol


def _grads(step):
  k = jax.random.split(jax.random.fold_in(jax.random.key(7), step), 3)
  return {
      "w": jax.random.normal(k[0], (24, 16)),
      "stack": jax.random.normal(k[1], (2, 20, 12)),
      "b": jax.random.normal(k[2], (16,)),
  }


def test_orbax_roundtrip_continues_bit_exactly(tmp_path):
  params = jax.tree.map(jnp.zeros_like, _grads(0))
  tx = ol.galore(
      optax.cosine_decay_schedule(1e-2, 12), rank=4, update_proj_gap=3,
      weight_decay=0.1, on_refresh="rotate",
      dimension_numbers={"w": None, "stack": ol.DimensionNumbers(1, 2), "b": None},
  )
  step = jax.jit(lambda p, s, t: _apply(tx, p, s, _grads(t)))

  p, s = params, tx.init(params)
  for t in range(12):
    p, s = step(p, s, t)
  straight = (p, s)

  p, s = params, tx.init(params)
  for t in range(5):
    p, s = step(p, s, t)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "ckpt", {"params": p, "opt_state": s})
  del p, s
  abstract = jax.eval_shape(lambda: {"params": params, "opt_state": tx.init(params)})
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(tmp_path / "ckpt", abstract)
  p, s = restored["params"], restored["opt_state"]
  assert jax.tree.structure(s) == jax.tree.structure(straight[1])
  for t in range(5, 12):
    p, s = step(p, s, t)
  jax.tree.map(np.testing.assert_array_equal, (p, s), straight)


def _apply(tx, params, state, grads):
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state
