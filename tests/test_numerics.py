"""Overflow safety (issue 14): huge but finite gradients give finite updates.

``optax.adamw`` stays finite for gradients multiplied by up to ~1e37 (its update goes to
zero where ``v`` overflows, from ~1e19). The low-rank methods squared gradients or
products of second-moment statistics and returned NaN from ~1e17 (coap), ~1e18 (flora)
and ~1e19 (vlorp). Exactness at ordinary scales and accuracy at 1e18 and 1e19 against
the float64 references are checked in test_coap.py and test_vlorp_reference.py; here
every method is swept against optax.adamw's finiteness, and the pieces are checked
against optax and float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_lowrank as ol
from optax_lowrank import numerics
from optax_lowrank.inner import scale_by_factored_rms

# Flora compresses (and optax factors) matrices whose sides are both >= 128.
SHAPES = {"w": (256, 128), "v": (128, 384), "b": (128,)}
SCALES = (1e18, 1e19, 1e25, 1e37)


def _grads(seed=0):
  rs = np.random.RandomState(seed)
  return {k: jnp.asarray(rs.randn(*s), jnp.float32) for k, s in SHAPES.items()}


def _finite(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


def _updates_finite(tx, scale, steps=3):
  rs = np.random.RandomState(1)
  params = {k: jnp.asarray(0.02 * rs.randn(*s), jnp.float32) for k, s in SHAPES.items()}
  state, update = tx.init(params), jax.jit(tx.update)
  for t in range(steps):
    g = jax.tree.map(lambda x: x * np.float32(scale), _grads(t))
    u, state = update(g, state, params)
    if not _finite(u):
      return False
  return True


METHODS = {
    "coap": lambda: ol.coap(1e-3, rank=8, update_proj_gap=1, reproject_factor=2),
    "vlorp": lambda: ol.vlorp(1e-3, rank=1, granularity=4, update_proj_gap=2),
    "flora": lambda: ol.flora(1e-3, rank=8, kappa=2),
}

@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("name", [
    "coap", "vlorp", "flora"])
def test_updates_are_finite_wherever_adamw_is(name, scale):
  assert _updates_finite(optax.adamw(1e-3), scale)  # the reference point
  assert _updates_finite(METHODS[name](), scale), (name, scale)


def test_power_of_two_scale():
  x = jnp.array([[3.0, -5e20], [0.0, 1.0]], jnp.float32)
  s = numerics.power_of_two_scale(x)
  assert float(s[0, 0]) == 2.0**68 and s.shape == (1, 1)
  rows = np.asarray(numerics.power_of_two_scale(x, axis=-1))[:, 0]
  np.testing.assert_array_equal(rows, [2.0**68, 1.0])
  for special in (0.0, np.inf, np.nan):
    assert float(numerics.power_of_two_scale(jnp.full((2, 2), special))[0, 0]) == 1.0
  # Clamped to 2^±126 so that 1/scale is a normal float (XLA:CPU flushes subnormals).
  assert float(numerics.power_of_two_scale(jnp.full((1, 1), 3e38))[0, 0]) == 2.0**126
  big = jnp.full((2, 2), 3e38, jnp.float32)
  assert float(jnp.max(big / numerics.power_of_two_scale(big))) > 1.0  # not flushed


def _factored_rms_float64(grads, eps=1e-30, exponent=0.8):
  """Adafactor's factored normalization of one (512, 128) matrix in float64 (optax's
  formula: decay 1 − (t+1)^(−0.8); the row statistic averages over the shorter axis,
  the column one over the longer)."""
  v_row = v_col = 0.0
  out = []
  for t, g in enumerate(grads):
    decay = 1.0 - (t + 1.0) ** -exponent
    sq = np.asarray(g, np.float64) ** 2 + eps
    v_row = decay * v_row + (1 - decay) * sq.mean(axis=1)
    v_col = decay * v_col + (1 - decay) * sq.mean(axis=0)
    out.append(g / np.sqrt(v_row[:, None] / v_row.mean()) / np.sqrt(v_col[None, :]))
  return out


def test_factored_rms_is_optax_bit_for_bit_on_ordinary_inputs():
  """Same updates and state as optax.scale_by_factored_rms, bit for bit, for gradients
  from 1e-8 to 1e8 (factored, unfactored and stacked leaves, a zero row)."""
  rs = np.random.RandomState(0)
  shapes = {**SHAPES, "s": (3, 160, 128), "small": (64, 32)}
  params = {k: jnp.zeros(s) for k, s in shapes.items()}
  ours, theirs = scale_by_factored_rms(), optax.scale_by_factored_rms()
  so, st = ours.init(params), theirs.init(params)
  assert jax.tree.structure(so) == jax.tree.structure(st)
  for _ in range(4):
    g = {k: jnp.asarray(rs.randn(*s) * 10.0 ** rs.uniform(-8, 8), jnp.float32)
         for k, s in shapes.items()}
    g["w"] = g["w"].at[3].set(0.0)
    uo, so = jax.jit(ours.update)(g, so, params)
    ut, st = jax.jit(theirs.update)(g, st, params)
    jax.tree.map(np.testing.assert_array_equal, (uo, so), (ut, st))


@pytest.mark.parametrize("scale", [1e18, 1e19])
def test_factored_rms_matches_float64_at_huge_gradients(scale):
  """Ours matches float64 to float32 rounding; optax's transform is NaN there (its
  column means sum 512 squares of ~1e36 first: the negative control)."""
  rs = np.random.RandomState(2)
  params = {"w": jnp.zeros((512, 128))}
  grads = [rs.randn(512, 128).astype(np.float32) * np.float32(scale) for _ in range(3)]
  want = _factored_rms_float64(grads)
  outs = {}
  for name, tx in (("ours", scale_by_factored_rms()),
                   ("optax", optax.scale_by_factored_rms())):
    state, update = tx.init(params), jax.jit(tx.update)
    outs[name] = []
    for g in grads:
      u, state = update({"w": jnp.asarray(g)}, state, params)
      outs[name].append(np.asarray(u["w"], np.float64))
  assert not all(np.isfinite(u).all() for u in outs["optax"])
  for got, w in zip(outs["ours"], want):
    assert np.abs(got - w).max() <= 1e-6 * np.abs(w).max()


def test_factored_rms_beyond_float32_statistics_gives_zero_not_nan():
  """From ~1e20 the mean square itself exceeds float32: a zero update (optax.adamw's
  behaviour where its v overflows), never NaN; other leaves are unaffected."""
  params = {"w": jnp.zeros((256, 128)), "u": jnp.zeros((256, 128))}
  tx = scale_by_factored_rms()
  g = _grads()
  grads = {"w": g["w"] * np.float32(1e30), "u": g["w"]}
  u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  np.testing.assert_array_equal(np.asarray(u["w"]), 0.0)
  want, _ = optax.scale_by_factored_rms().update({"u": g["w"]}, optax.scale_by_factored_rms().init({"u": params["u"]}), {"u": params["u"]})
  np.testing.assert_array_equal(np.asarray(u["u"]), np.asarray(want["u"]))
