"""Online Subspace Descent's projector against a float64 NumPy transcription of the code.

The reference follows ``galore_torch/galore_projector.py`` (``proj_type="continuous"``)
and ``galore_torch/adamw.py`` of kyleliang919/Online-Subspace-Descent: SVD basis at the
first step; then each step projects with the current ``P``, computes
``loss = ‖Ĝ PᵀP − Ĝ‖²`` (right; ``‖P Pᵀ Ĝ − Ĝ‖²`` left) with ``Ĝ = G/‖G‖``, and after
the update takes one ``torch.optim.AdamW`` step on ``P`` (defaults: betas .9/.999,
eps 1e-8, weight decay 0.01) with lr ``(1/gap)·(lr_t/lr_0)``. Its loss gradient is
checked by central finite differences, so it does not share a derivation with ours.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import optax_lowrank as ol
from optax_lowrank.projectors.online_pca import online_pca


def _loss(p, G, side):
  Gh = G / np.linalg.norm(G)
  E = Gh @ p.T @ p - Gh if side == "right" else p @ p.T @ Gh - Gh
  return np.sum(E * E)


def _grad(p, G, side):
  """Analytic gradient of ``_loss`` in float64 (verified by finite differences)."""
  Gh = G / np.linalg.norm(G)
  if side == "right":  # p (r, n)
    E = Gh @ p.T @ p - Gh
    return 2 * (p @ Gh.T @ E + p @ E.T @ Gh)
  E = p @ p.T @ Gh - Gh  # p (m, r)
  return 2 * (E @ Gh.T @ p + Gh @ E.T @ p)


class RefOSD:
  def __init__(self, gap, lr_ratio=lambda t: 1.0, wd=0.01, b1=0.9, b2=0.999, eps=1e-8):
    self.gap, self.lr_ratio, self.wd, self.b1, self.b2, self.eps = gap, lr_ratio, wd, b1, b2, eps
    self.p, self.t, self.mu, self.nu = None, 0, None, None

  def step(self, G, side, r, step):
    """Returns the basis used at this step; updates it afterwards."""
    if self.p is None:
      u, _, vh = np.linalg.svd(G, full_matrices=False)
      self.p = vh[:r] if side == "right" else u[:, :r]
      self.mu, self.nu = np.zeros_like(self.p), np.zeros_like(self.p)
      return self.p.copy()
    used = self.p.copy()
    grad = _grad(self.p, G, side)
    lr = self.lr_ratio(step) / self.gap
    self.t += 1
    self.p = self.p * (1 - lr * self.wd)
    self.mu = self.b1 * self.mu + (1 - self.b1) * grad
    self.nu = self.b2 * self.nu + (1 - self.b2) * grad ** 2
    denom = np.sqrt(self.nu) / np.sqrt(1 - self.b2 ** self.t) + self.eps
    self.p = self.p - lr / (1 - self.b1 ** self.t) * self.mu / denom
    return used


def test_reference_gradient_matches_finite_differences():
  rng = np.random.default_rng(0)
  for side, shape in (("right", (3, 7)), ("left", (9, 3))):
    G = rng.standard_normal((9, 7))
    p = rng.standard_normal(shape) * 0.5
    grad, h = _grad(p, G, side), 1e-6
    fd = np.zeros_like(p)
    for idx in np.ndindex(p.shape):
      d = np.zeros_like(p)
      d[idx] = h
      fd[idx] = (_loss(p + d, G, side) - _loss(p - d, G, side)) / (2 * h)
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("R, C", [(48, 16), (16, 48)])
def test_basis_follows_the_reference_step_by_step(R, C):
  r, gap, steps = 3, 4, 12
  schedule = optax.linear_schedule(1.0, 0.25, steps)  # lr_t / lr_0
  tx = ol.lowrank_project(optax.identity(), rank=r, update_proj_gap=1,
                          projector=online_pca(gap, lr_ratio=schedule))
  state = tx.init({"w": jnp.zeros((C, R))})
  update = jax.jit(tx.update)
  ref = RefOSD(gap, lr_ratio=lambda t: float(schedule(t)))
  side = "right" if R >= C else "left"
  rng = np.random.default_rng(1)
  base = rng.standard_normal((R, C))
  sign = None
  for step in range(steps):
    G = base + 0.5 * rng.standard_normal((R, C))  # a drifting subspace
    u, state = update({"w": jnp.asarray(G.T, jnp.float32)}, state)
    used = ref.step(G, side, r, step)
    basis = state.bases["w"].basis.basis
    got = np.asarray(basis.vh if side == "right" else basis.u, np.float64)
    if sign is None:  # SVD signs are arbitrary: align the reference's once, at step 0
      sign = np.sign(np.sum(got * used, axis=1 if side == "right" else 0))
      sign = sign[:, None] if side == "right" else sign[None, :]
      ref.p = ref.p * sign
      used = used * sign
    err = np.abs(got - used).max() / np.abs(used).max()
    assert err <= 1e-4, (step, err)
    # The update projects with the basis in use at this step.
    want = (G @ used.T @ used) if side == "right" else (used @ used.T @ G)
    assert np.abs(np.asarray(u["w"], np.float64).T - want).max() <= 1e-4 * np.abs(want).max()


def test_sharded_equals_unsharded_with_stable_state_types(mesh):
  R, C, r = 64, 32, 4
  tx = ol.lowrank_project(optax.scale_by_adam(), rank=r, update_proj_gap=1,
                          projector=online_pca(10))
  params = {"w": jnp.zeros((C, R))}
  grads = [{"w": jax.random.normal(jax.random.key(i), (C, R))} for i in range(3)]
  state = tx.init(params)
  expected = []
  for g in grads:
    u, state = tx.update(g, state)
    expected.append(u["w"])
  for spec in (P("a", "b"),):
    with jax.set_mesh(mesh):
      put = lambda t: {"w": jax.device_put(t["w"], NamedSharding(mesh, spec))}
      state = jax.jit(tx.init)(put(params))
      types = jax.tree.map(jax.typeof, state)
      update = jax.jit(tx.update)
      for g, want in zip(grads, expected):
        u, state = update(put(g), state)
        assert jax.tree.map(jax.typeof, state) == types
        assert jax.typeof(u["w"]).sharding.spec == spec
        np.testing.assert_allclose(np.asarray(u["w"]), np.asarray(want), atol=1e-4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(update_proj_gap=0), "update_proj_gap"), (dict(proj_type="full"), "proj_type"),
    (dict(b1=1.5), "b1"), (dict(weight_decay=-1.0), "weight_decay"),
])
def test_bad_arguments_name_the_parameter(kwargs, match):
  with pytest.raises(ValueError, match=match):
    online_pca(**{"update_proj_gap": 10, **kwargs})


def test_state_can_be_donated_from_init_on():
  """The basis and the next basis are separate buffers (donating the state of a jitted
  step must not see one buffer twice), from init and after the step-0 SVD."""
  tx = ol.osd(1e-2, rank=4)
  params = {"w": jnp.ones((32, 48))}
  step = jax.jit(lambda s, g: tx.update(g, s, params)[1], donate_argnums=0)
  state = jax.jit(tx.init)(params)
  for i in range(3):
    state = step(state, {"w": jax.random.normal(jax.random.key(i), (32, 48))})
  assert np.all(np.isfinite(np.asarray(state[0].bases["w"].basis.next.vh)))
