"""Moment policies and first-moment readers on int8 moments (``quantize.quantize_state``).

``lowrank_project``'s ``reset`` and ``rotate`` reach a leaf's moments through their
dequantized view and store the result quantized again; COAP's basis step reads the
dequantized first moment. Each is checked against float64 NumPy computed from the state
before the step (the reference applies the policy and Adam's update to the dequantized
moments); the quantized result must be within the 8-bit error of that, and a negative
control (the other policy, or none) must be far from it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_lowrank as ol
from optax_lowrank import projectors
from optax_lowrank import quantize as qz
from tests.reference import coap as ref_coap

B1, B2 = 0.9, 0.999
PARAMS = {"w": jnp.zeros((64, 128))}  # (in, out): n = 64 < m = 128, a right basis (4, 64)


def _grad(step):
  rng = np.random.default_rng(step)
  low = rng.standard_normal((64, 6)) @ rng.standard_normal((6, 128))  # rotates with step
  return {"w": jnp.asarray(low + 0.1 * rng.standard_normal((64, 128)), jnp.float32)}


def _run(tx, steps):
  state = tx.init(PARAMS)
  update = jax.jit(tx.update)
  states = [state]
  for t in range(steps):
    _, state = update(_grad(t), state)
    states.append(state)
  return states


def _moments(state):
  adam = qz.dequantize_tree(state.inner_state)
  return (np.asarray(adam.mu["w"], np.float64), np.asarray(adam.nu["w"], np.float64))


def _rel(a, b):
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("policy", ["reset", "rotate"])
def test_policies_act_on_quantized_moments(policy):
  def make(on_refresh):
    return ol.lowrank_project(
        qz.quantize_state(optax.scale_by_adam(B1, B2), min_size=64), rank=4,
        update_proj_gap=2, on_refresh=on_refresh)

  states = _run(make(policy), 3)
  assert isinstance(states[-1].inner_state.mu["w"], qz.QuantizedArray)
  before, after = states[2], states[3]  # step 2 refreshes the basis
  old = np.asarray(before.bases["w"].basis.vh, np.float64)   # (r, n)
  new = np.asarray(after.bases["w"].basis.vh, np.float64)
  assert _rel(new, old) > 0.1  # the subspace moved
  mu, nu = _moments(before)                                   # (r, m)
  r = new @ np.asarray(_grad(2)["w"], np.float64)             # down: V g, (r, m)
  if policy == "reset":
    mu, nu = np.zeros_like(mu), np.zeros_like(nu)
  else:  # M ← down(new, up(old, M)) = V_new V_oldᵀ M; the second moment is kept
    mu = new @ (old.T @ mu)
  want_mu, want_nu = B1 * mu + (1 - B1) * r, B2 * nu + (1 - B2) * r * r
  got_mu, got_nu = _moments(after)
  assert _rel(got_mu, want_mu) < 0.02 and _rel(got_nu, want_nu) < 0.02
  # Negative control: keeping the moments misses the policy by far more.
  kept_mu, _ = _moments(_run(make("keep"), 3)[3])
  assert _rel(kept_mu, want_mu) > 10 * _rel(got_mu, want_mu)


def test_coap_reads_the_dequantized_first_moment():
  tx = ol.lowrank_project(
      qz.quantize_state(optax.scale_by_adam(B1, B2), min_size=64), rank=4,
      update_proj_gap=1, projector=projectors.coap(reproject_factor=4))
  states = _run(tx, 2)  # step 0: range find; step 1: a basis step
  p0 = np.asarray(states[1].bases["w"].basis.basis.vh, np.float64)
  mu, _ = _moments(states[1])
  g = np.asarray(_grad(1)["w"], np.float64).T                 # torch's G (m, n)
  want = ref_coap.coap_update_proj(p0, mu.T, g, "right")
  got = np.asarray(states[2].bases["w"].basis.basis.vh, np.float64)
  assert _rel(got, want) < 1e-5
  assert _rel(p0, want) > 1e-3  # the step did move the basis


def test_coap_alias_with_int8_moments_tracks_float_moments():
  """``coap(state_dtype="int8")`` over 12 steps (3 range finds, 6 basis steps) stays
  within the 8-bit error of ``coap()``'s updates, and its moments take a quarter of the
  bytes (moments of 16 × 512 = 8192 entries: above ``min_size``, so quantized)."""
  params = {"w": jnp.zeros((256, 512))}
  rng = np.random.default_rng(0)
  left, right = rng.standard_normal((256, 24)), rng.standard_normal((24, 512))
  kw = dict(rank=16, update_proj_gap=2, reproject_factor=3)
  runs = {}
  for dtype in (None, "int8"):
    tx = ol.coap(1e-2, state_dtype=dtype, **kw)
    state, update, out = tx.init(params), jax.jit(tx.update), []
    for t in range(12):
      noise = np.random.default_rng(t).standard_normal((256, 512))
      g = {"w": jnp.asarray(left @ np.roll(right, t, axis=1) + 0.1 * noise, jnp.float32)}
      u, state = update(g, state, params)
      out.append(np.asarray(u["w"], np.float64))
    runs[dtype] = (out, state)
  errors = [_rel(q, f) for q, f in zip(runs["int8"][0], runs[None][0])]
  assert 0 < max(errors) < 0.05, errors
  assert isinstance(runs["int8"][1][0].inner_state.mu["w"], qz.QuantizedArray)
  full = ol.memory.state_bytes(ol.coap(1e-2, **kw), params).total_bytes
  small = ol.memory.state_bytes(ol.coap(1e-2, state_dtype="int8", **kw), params)
  assert small.total_bytes < 0.5 * full
