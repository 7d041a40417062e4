"""GoLore: one projector file and one alias on the pipeline, against the authors' code.

``tests/reference/golore.py`` ports the authors' AdamW (float64). Before ``switch_step`` it
computes its own SVD subspaces; after, it is handed the random matrices read from our state
(JAX draws them). Updates are compared every step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_lowrank as ol
from optax_lowrank.projectors import RefreshContext
from optax_lowrank.projectors.golore import random_stiefel
from tests.reference.golore import RefGoLore

LR, RANK, GAP, SWITCH, STEPS = 1e-2, 4, 3, 6, 12
SHAPES = {"tall": (24, 16), "wide": (12, 20)}  # kernels (in, out): G is (out, in)


def _grads(t):
  keys = jax.random.split(jax.random.fold_in(jax.random.key(5), t), len(SHAPES))
  # Low-rank plus noise, so the SVD subspace is well separated.
  out = {}
  for k, (name, (n, m)) in zip(keys, SHAPES.items()):
    a, b, c = jax.random.split(k, 3)
    low = jax.random.normal(a, (n, 3)) @ jax.random.normal(b, (3, m))
    out[name] = 3.0 * low + 0.3 * jax.random.normal(c, (n, m))
  return out


def _run(rotate=True):
  params = {k: jnp.zeros(s, jnp.float32) for k, s in SHAPES.items()}
  tx = ol.golore(LR, rank=RANK, switch_step=SWITCH, update_proj_gap=GAP)
  update = jax.jit(tx.update)
  state = tx.init(params)
  refs = {k: RefGoLore(m, n, RANK, gap=GAP, switch_step=SWITCH, lr=LR, rotate=rotate)
          for k, (n, m) in SHAPES.items()}
  errors, random_bases = [], []
  for t in range(STEPS):
    g = _grads(t)
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
    for k, ref in refs.items():
      basis = state[0].bases[k].basis
      matrix = np.asarray(basis.vh if ref.right else basis.u, np.float64)
      if t % GAP == 0 and t >= SWITCH:
        random_bases.append((k, t, matrix))
      want = ref.update(np.asarray(g[k], np.float64).T,
                        random_matrix=matrix if ref.is_random() else None)
      got = np.asarray(u[k], np.float64).T
      errors.append(np.linalg.norm(got - want) / np.linalg.norm(want))
  return np.asarray(errors), random_bases


def test_updates_match_the_authors_adamw():
  errors, random_bases = _run()
  assert errors.max() <= 2e-5, errors.max()
  # Negative control: the same reference without the first-moment rotation.
  wrong, _ = _run(rotate=False)
  assert wrong.max() > 100 * 2e-5, wrong.max()
  # Random phase: orthonormal, redrawn at every refresh, unrelated to the SVD subspace.
  assert len(random_bases) == 2 * len(SHAPES)
  by_leaf = {}
  for k, t, matrix in random_bases:
    gram = matrix @ matrix.T if matrix.shape[0] == RANK else matrix.T @ matrix
    np.testing.assert_allclose(gram, np.eye(RANK), atol=1e-5)
    by_leaf.setdefault(k, []).append(matrix)
  for mats in by_leaf.values():
    assert not np.allclose(mats[0], mats[1], atol=1e-3)


def test_random_stiefel_is_the_polar_factor_and_haar():
  """The reference's Z (ZᵀZ)^(-1/2), and uniform: E[Q Qᵀ] = (r/n) I over many draws."""
  keys = jax.random.split(jax.random.key(0), 400)
  qs = np.asarray(jax.jit(jax.vmap(lambda k: random_stiefel(k, (16, 3), "left")))(keys),
                  np.float64)
  z = np.asarray(jax.random.normal(keys[0], (16, 3), jnp.float32), np.float64)
  w, v = np.linalg.eigh(z.T @ z)
  polar = z @ v @ np.diag(w ** -0.5) @ v.T
  np.testing.assert_allclose(qs[0], polar, atol=1e-5)
  mean = np.einsum("kij,klj->il", qs, qs) / len(qs)
  np.testing.assert_allclose(mean, 3 / 16 * np.eye(16), atol=0.04)
  right = np.asarray(random_stiefel(keys[1], (3, 16), "right"), np.float64)
  np.testing.assert_allclose(right @ right.T, np.eye(3), atol=1e-5)


def test_switch_step_zero_is_random_from_the_start_and_bad_arguments():
  proj = ol.projectors.golore(0)
  g = _grads(0)["tall"]  # (n, m) = (24, 16): m < n, the left side
  info = ol.shapes.MatrixInfo((), 16, 24, 4, None)
  exact = ol.projectors.svd().refresh(RefreshContext(0, jax.random.key(0)), g,
                                      proj.init(info, jnp.float32))
  rand = proj.refresh(RefreshContext(0, jax.random.key(0)), g, proj.init(info, jnp.float32))
  cos = np.abs(np.asarray(exact.u).T @ np.asarray(rand.u))  # (r, r)
  assert cos.max() < 0.99, cos
  with pytest.raises(ValueError, match="`switch_step`"):
    ol.projectors.golore(-1)
  with pytest.raises(ValueError, match="`proj_type`"):
    ol.projectors.golore(10, "full")
