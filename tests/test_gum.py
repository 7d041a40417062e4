"""GUM (``optax_lowrank.gum``): the paper's two branches against a float64 reference, the
same layers drawn for every matrix of a layer (stacked and unscanned), and the state a branch
does not use left bit-identical."""

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_lowrank as ol
from tests.reference.gum import RefGum

L, N_IN, M_OUT, RANK, K, GAP, SEED = 4, 24, 16, 4, 1, 3, 3  # m < n: GaLore's std is left
STACK = ol.DimensionNumbers(1, 2)


def _quiet(fn, *args):
  """Runs ``fn`` with lowrank_project's "no inner state" warning silenced: GUM keeps its
  momenta in the combine rule, and these trees have no unprojected leaf."""
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "lowrank_project: the inner transform")
    return fn(*args)


def _drawn(step, num_layers=L, k=K):
  """The documented draw of a period starting at ``step``."""
  key = jax.random.fold_in(jax.random.key(SEED), step)
  return np.asarray(ol.sampling.choose_layers(key, num_layers, k))


def _grads(steps):
  keys = jax.random.split(jax.random.key(7), steps)
  return [np.asarray(jax.random.normal(k, (L, N_IN, M_OUT))) for k in keys]


def test_gum_matches_the_float64_reference_of_both_branches():
  """Two periods of a stacked leaf: the drawn layer steps ``NS(F)`` on the debiased
  residual, the others ``P·NS(R)`` with ``R`` kept across the period boundary (and frozen
  while drawn). Negative controls: feeding ``G`` instead of ``G − PPᵀG`` to the full-rank
  branch, or swapping the branches, is far off. The debiasing factors cancel inside
  Newton–Schulz (its Frobenius normalization), so the reference without them agrees too."""
  steps = 2 * GAP
  assert not np.array_equal(_drawn(0), _drawn(GAP))  # both branches change hands
  tx = ol.gum(1.0, rank=RANK, full_rank_layers=K, update_proj_gap=GAP, seed=SEED,
              dimension_numbers=STACK)
  params = jnp.zeros((L, N_IN, M_OUT))
  grads = _grads(steps)

  def run(grads):
    state, update, out = tx.init(params), jax.jit(tx.update), []
    for g in grads:
      u, state = update(g, state, params)
      out.append(u)
    return out

  got = _quiet(run, grads)
  factor = -0.2 * math.sqrt(max(M_OUT, N_IN))  # -lr · consistent_rms · √max(m, n)
  refs = {name: RefGum(L, M_OUT, N_IN, RANK, K, gap=GAP, **kw) for name, kw in {
      "paper": {}, "undebiased": dict(debias=False), "no_residual": dict(residual=False),
  }.items()}
  swapped = RefGum(L, M_OUT, N_IN, RANK, K, gap=GAP)
  err = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)
  for t, (g, u) in enumerate(zip(grads, got)):
    drawn = _drawn(t - t % GAP)
    g_ref = np.swapaxes(g, -1, -2)
    want = {name: np.swapaxes(r.update(g_ref, drawn), -1, -2) * factor
            for name, r in refs.items()}
    other = np.swapaxes(swapped.update(g_ref, ~drawn), -1, -2) * factor
    u = np.asarray(u)
    for layer in range(L):
      assert err(u[layer], want["paper"][layer]) < 5e-4, (t, layer)
      assert err(u[layer], want["undebiased"][layer]) < 5e-4, (t, layer)
      assert err(u[layer], other[layer]) > 0.5, (t, layer)
      if drawn[layer]:
        assert err(u[layer], want["no_residual"][layer]) > 0.2, (t, layer)


def _stacked_and_unscanned():
  """One model twice: q/up matrices of 4 layers stacked, and as 8 leaves of one layer."""
  stacked = {"attn_q": jnp.zeros((L, 16, 24)), "mlp_up": jnp.zeros((L, 16, 40))}
  unscanned = {"layers": {str(i): {"attn_q": jnp.zeros((16, 24)),
                                   "mlp_up": jnp.zeros((16, 40))} for i in range(L)}}
  return stacked, unscanned


@functools.lru_cache(maxsize=None)
def _states():
  """The low-rank states after each of 4 steps (2 periods of 2, k = 2 of 4 layers), for
  the stacked model and for the unscanned one (``group_fn`` = the layer, ``num_layers``)."""
  stacked, unscanned = _stacked_and_unscanned()
  kw = dict(rank=4, full_rank_layers=2, update_proj_gap=2, seed=SEED)
  runs = {}
  for name, params, tx in [
      ("stacked", stacked, ol.gum(1e-2, dimension_numbers=STACK, **kw)),
      ("unscanned", unscanned, ol.gum(1e-2, num_layers=L,
                                      group_fn=lambda path: path.split("/")[1], **kw))]:
    state, update, seen = _quiet(tx.init, params), jax.jit(tx.update), []
    for t in range(4):
      g = jax.tree.map(lambda x, i=t: jax.random.normal(jax.random.key(i), x.shape), params)
      _, state = _quiet(update, g, state, params)
      seen.append(state[0])
    runs[name] = seen
  return runs


def test_every_matrix_of_a_layer_takes_the_same_branch_stacked_and_unscanned():
  """In each period two stacked leaves draw the same ``k`` layers, and unscanned blocks draw
  the same layers for both matrices of a layer, exactly ``k`` of them, the layers the
  stacked model draws (the documented draw)."""
  runs = _states()
  for period in range(2):
    s = runs["stacked"][2 * period].bases
    u = runs["unscanned"][2 * period].bases
    layers = sorted(np.asarray(s["attn_q"].basis.slots).tolist())
    assert layers == sorted(np.asarray(s["mlp_up"].basis.slots).tolist())
    assert layers == np.flatnonzero(_drawn(2 * period, k=2)).tolist()
    by_layer = {i: {bool(u[f"layers/{i}/{w}"].basis.active[0])
                    for w in ("attn_q", "mlp_up")} for i in range(L)}
    assert all(len(v) == 1 for v in by_layer.values()), by_layer
    assert [i for i, v in by_layer.items() if True in v] == layers


def test_state_a_branch_does_not_use_stays_bit_identical():
  """Within a period a drawn layer's low-rank momentum is not touched (bit for bit), and an
  undrawn unscanned layer's full-rank buffer stays zero; undrawn layers' low-rank momenta
  and drawn ones' full-rank momenta do move."""
  for run in _states().values():
    before, after = run[0], run[1]  # two steps of the first period
    for name, b in before.bases.items():
      drawn_layers = np.asarray(b.basis.slots)[np.asarray(b.basis.active)]
      old, new = before.combine_states[name], after.combine_states[name]
      low_old, low_new = np.asarray(old.low), np.asarray(new.low)
      if low_old.ndim == 3:  # stacked: (L, ...)
        undrawn = np.setdiff1d(np.arange(L), drawn_layers)
        np.testing.assert_array_equal(low_new[drawn_layers], low_old[drawn_layers])
        assert np.all(low_new[undrawn] != low_old[undrawn])
        assert np.all(np.asarray(new.full) != np.asarray(old.full))
      elif drawn_layers.size:  # an unscanned leaf of a drawn layer
        np.testing.assert_array_equal(low_new, low_old)
        assert np.all(np.asarray(new.full) != np.asarray(old.full))
      else:  # an unscanned leaf of an undrawn layer
        assert not np.any(np.asarray(new.full)) and np.all(low_new != low_old)


@pytest.mark.parametrize("kwargs, match", [
    (dict(full_rank_layers=4, dimension_numbers=STACK), "`full_rank_layers`"),
    (dict(stagger=True, dimension_numbers=STACK), "`stagger`"),
    (dict(num_layers=4), "`group_fn`"),
    (dict(num_layers=4, full_rank_layers=4, group_fn=str), "`full_rank_layers`"),
    (dict(), "`num_layers`"),
])
def test_bad_configurations_name_the_argument(kwargs, match):
  """k must leave q in (0, 1); every leaf starts its period together; unscanned blocks
  need their layer count and a layer label per leaf (at build time, or at init)."""
  params = {"w": jnp.zeros((4, 16, 24))} if "dimension_numbers" in kwargs else {
      "w": jnp.zeros((16, 24))}
  with pytest.raises(ValueError, match=match):
    _quiet(ol.gum(1e-2, rank=4, **kwargs).init, params)
