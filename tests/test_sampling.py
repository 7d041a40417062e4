"""Layer sampling against the exact probabilities of sequential sampling."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_lowrank import sampling


def _inclusion_probabilities(weights, k):
  """P(layer i chosen) for draws one by one with p ∝ w among those left (float64)."""
  w = np.asarray(weights, np.float64)
  out = np.zeros(len(w))
  for order in itertools.permutations(range(len(w)), k):
    p, left = 1.0, w.sum()
    for i in order:
      p *= w[i] / left
      left -= w[i]
    out[list(order)] += p
  return out


@pytest.mark.parametrize("weights", [None, (4.0, 1.0, 2.0, 0.5, 2.5)])
def test_inclusion_frequencies_match_sequential_sampling(weights):
  num_layers, k, draws = 5, 2, 20000
  keys = jax.random.split(jax.random.key(0), draws)
  w = None if weights is None else jnp.asarray(weights)
  masks = jax.jit(jax.vmap(
      lambda key: sampling.choose_layers(key, num_layers, k, w)))(keys)
  masks = np.asarray(masks)
  assert (masks.sum(axis=1) == k).all()
  want = _inclusion_probabilities(
      np.ones(num_layers) if weights is None else weights, k)
  got = masks.mean(axis=0)
  # Binomial standard error at 20000 draws is below 0.0036.
  np.testing.assert_allclose(got, want, atol=0.015)
  # Negative control: the weighted and uniform laws differ by more than that.
  if weights is not None:
    assert np.abs(want - k / num_layers).max() > 0.1


def test_zero_weights_are_chosen_last_and_same_key_same_layers():
  w = jnp.asarray([0.0, 1.0, 0.0, 3.0, 0.0])
  key = jax.random.key(3)
  a = sampling.choose_layers(key, 5, 2, w)
  np.testing.assert_array_equal(a, [False, True, False, True, False])
  three = np.asarray(jax.vmap(
      lambda k: sampling.choose_layers(k, 5, 3, w))(
          jax.random.split(key, 200)))
  assert three[:, [1, 3]].all()
  # The third layer is any of the zero-weight ones, not always the first.
  assert len({tuple(row) for row in three}) == 3
  np.testing.assert_array_equal(
      sampling.choose_layers(key, 5, 2), sampling.choose_layers(key, 5, 2))


@pytest.mark.parametrize("num_layers,k,weights,match", [
    (0, 0, None, "num_layers"),
    (4, 5, None, "`k`"),
    (4, -1, None, "`k`"),
    (4, 2, jnp.ones(3), "weights"),
])
def test_bad_arguments_name_the_parameter(num_layers, k, weights, match):
  with pytest.raises(ValueError, match=match):
    sampling.choose_layers(jax.random.key(0), num_layers, k, weights)
