"""Block-wise quantization: error bounds against float64 NumPy, packing, bytes,
jit, Orbax, sharding, 8-bit Adam against float32 Adam, and argument errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import optax_lowrank as ol
from optax_lowrank import quantize as qz


# ---------------------------------------------------------------------------
# A float64 NumPy reference of the block layout and the linear map.


def _ref_kept_axes(shape, block_size, batch_dims=0):
  """Most leading axes kept without more blocks than the fewest possible."""
  count = lambda k: math.prod(shape[:k]) * -(-math.prod(shape[k:]) // block_size)
  best = batch_dims
  for k in range(batch_dims, len(shape)):
    if count(k) == count(batch_dims):
      best = k
  return best


def _ref_blocks(x, block_size, batch_dims=0):
  """float64 blocks ``(rows, num_blocks, block_size)``, last block padded with
  the row's last element; also the number of real elements per row."""
  x = np.asarray(x, np.float64)
  k = _ref_kept_axes(x.shape, block_size, batch_dims)
  rows = x.reshape(math.prod(x.shape[:k]), -1)
  length = rows.shape[1]
  nb = -(-length // block_size)
  padded = np.concatenate(
      [rows, np.repeat(rows[:, -1:], nb * block_size - length, axis=1)], axis=1)
  return padded.reshape(rows.shape[0], nb, block_size), length, k


def _ref_quantize(x, bits, block_size, batch_dims=0):
  blocks, length, k = _ref_blocks(x, block_size, batch_dims)
  lo, hi = blocks.min(-1), blocks.max(-1)
  scale = (hi - lo) / (2**bits - 1)
  safe = np.where(scale > 0, scale, 1.0)
  t = (blocks - lo[..., None]) / safe[..., None]
  return dict(blocks=blocks, lo=lo, hi=hi, scale=scale, t=t, length=length, k=k)


def _per_element(a, ref):
  """A per-block quantity ``(rows, nb)`` spread to the elements, unpadded."""
  rows, nb, bs = ref["blocks"].shape
  return np.repeat(a[..., None], bs, axis=-1).reshape(rows, nb * bs)[:, :ref["length"]]


def _data(shape, seed, offset=-3.0):
  """Mixed-sign data with a negative offset and rows of different scales."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape) * np.exp(rng.standard_normal(shape[:1] + (1,) * (len(shape) - 1)))
  return (x + offset).astype(np.float32)


SHAPES = [
    (512, 256),     # one block per row
    (3, 1000),      # rows kept, last block of each row partial (1000 = 3·256 + 232)
    (2, 5, 7, 64),  # leading batch axis kept, the rest flattened and padded
    (100, 8),       # a GaLore moment (n, r): flattened
]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_error_is_at_most_half_a_step(bits, shape):
  x = _data(shape, seed=len(shape) + bits)
  x.reshape(-1)[:300] = 0.75  # a constant first block
  q = qz.quantize(x, bits=bits, block_size=256)
  ref = _ref_quantize(x, bits, 256)

  lead = shape[:ref["k"]]
  nb = ref["blocks"].shape[1]
  assert q.kept_axes == ref["k"]
  assert q.codes.dtype == jnp.uint8 and q.scale.dtype == jnp.float32
  assert q.codes.shape == lead + (nb, 256 * bits // 8)
  assert q.scale.shape == q.zero.shape == lead + (nb,)
  np.testing.assert_array_equal(np.asarray(q.zero).reshape(-1, nb), ref["lo"])
  np.testing.assert_allclose(np.asarray(q.scale).reshape(-1, nb), ref["scale"],
                             rtol=2e-7, atol=0)
  # Codes are round((x − min)/scale), except where float32 meets a tie.
  codes = np.asarray(qz.unpack_codes(q)).reshape(ref["t"].shape).astype(np.int64)
  want = np.round(ref["t"]).astype(np.int64)
  near_tie = np.abs(ref["t"] - np.floor(ref["t"]) - 0.5) < 1e-3
  assert np.all((codes == want) | (near_tie & (np.abs(codes - want) == 1)))

  back = qz.dequantize(q)
  assert back.shape == x.shape and back.dtype == x.dtype
  err = np.abs(np.asarray(back, np.float64) - x).reshape(ref["blocks"].shape[0], -1)
  amax = np.maximum(np.abs(ref["lo"]), np.abs(ref["hi"]))
  # |x − x̂| <= scale/2, plus float32 rounding: 4 ulps (2^-24) of the block's
  # largest magnitude (the worst seen on adversarial data is 0.9).
  bound = _per_element(ref["scale"] / 2 + 2.0**-22 * amax, ref)
  assert np.all(err <= bound)
  assert err.max() > 0.4 * _per_element(ref["scale"], ref).max()  # not vacuous
  first = err.reshape(-1)[:256]
  assert np.all(first == 0)  # the constant block is exact


def test_constant_blocks_round_trip_exactly_without_nan():
  x = jnp.asarray([-2.5, 0.0, 1e30])[:, None] * jnp.ones((3, 512))  # 2 blocks a row
  for bits in (4, 8):
    q = qz.quantize(x, bits=bits)
    assert q.codes.shape[:2] == (3, 2)
    assert np.all(np.asarray(q.scale) == 0) and np.all(np.isfinite(q.zero))
    np.testing.assert_array_equal(qz.dequantize(q), x)
    np.testing.assert_array_equal(qz.unpack_codes(q), 0)


def test_batch_dims_quantize_each_slice_on_its_own():
  x = _data((3, 40, 8), seed=3)  # flattened would be 960 = 3.75 blocks
  assert qz.quantize(x).kept_axes == 0
  q = qz.quantize(x, batch_dims=1)
  assert q.codes.shape == (3, 2, 256)
  ref = _ref_quantize(x, 8, 256, batch_dims=1)
  np.testing.assert_array_equal(np.asarray(q.zero), ref["lo"])
  for i in range(3):  # slice i alone gives the same codes
    np.testing.assert_array_equal(q.codes[i], qz.quantize(x[i]).codes)


def test_int4_packs_two_codes_per_byte_low_nibble_first():
  x = _data((4, 512), seed=5)
  q4 = qz.quantize(x, bits=4)
  ref = _ref_quantize(x, 4, 256)
  codes = np.asarray(qz.unpack_codes(q4)).reshape(ref["t"].shape)
  assert codes.max() == 15 and codes.min() == 0
  packed = np.asarray(q4.codes).reshape(ref["t"].shape[:-1] + (128,))
  np.testing.assert_array_equal(packed & 0xF, codes[..., 0::2])
  np.testing.assert_array_equal(packed >> 4, codes[..., 1::2])
  assert q4.codes.nbytes * 2 == qz.quantize(x, bits=8).codes.nbytes


def test_sqrt_map_bounds_the_error_of_the_square_root():
  v = jnp.asarray(np.random.default_rng(0).standard_normal((4, 256)) ** 2 * 1e-4,
                  jnp.float32)
  q = qz.quantize(v, mapping="sqrt")
  back = np.asarray(qz.dequantize(q), np.float64)
  assert np.all(back >= 0)
  ref = _ref_quantize(np.sqrt(np.asarray(v, np.float64)), 8, 256)
  err = np.abs(np.sqrt(back) - np.sqrt(np.asarray(v, np.float64)))
  assert np.all(err <= _per_element(ref["scale"] / 2 + 2.0**-22 * ref["hi"], ref))


def test_stochastic_rounding_is_unbiased():
  x = jnp.asarray(_data((2, 256), seed=7))
  q = qz.quantize(x)
  step = np.repeat(np.asarray(q.scale), 256, axis=-1).reshape(x.shape)
  draws = 2000
  # 2000 copies of x in one call: each copy's rows are blocks of their own.
  sample = qz.dequantize(qz.quantize(
      jnp.broadcast_to(x, (draws,) + x.shape), batch_dims=1, stochastic=True,
      key=jax.random.key(0)))
  sample = np.asarray(sample, np.float64)
  err = np.abs(sample - np.asarray(x))
  assert np.all(err <= step * (1 + 1e-5))  # one of the two neighbouring codes
  assert np.mean(err > step / 2) > 0.2  # not rounded to nearest
  # The mean's standard error is at most step/2/√draws: allow 5 of them.
  tol = 5 * step / 2 / np.sqrt(draws)
  mean_err = np.abs(sample.mean(0) - np.asarray(x))
  assert np.all(mean_err <= tol)
  # Rounding to nearest is biased (up to step/2) and fails the same check.
  nearest_err = np.abs(np.asarray(qz.dequantize(q), np.float64) - np.asarray(x))
  assert np.mean(nearest_err > tol) > 0.5
  # Deterministic given the key; another key draws differently.
  again = qz.quantize(x, stochastic=True, key=jax.random.key(1))
  np.testing.assert_array_equal(
      again.codes, qz.quantize(x, stochastic=True, key=jax.random.key(1)).codes)
  assert not np.array_equal(
      again.codes, qz.quantize(x, stochastic=True, key=jax.random.key(2)).codes)


# ---------------------------------------------------------------------------
# Bytes, through memory.state_bytes (jax.eval_shape: nothing is allocated).


def test_quantized_adam_state_bytes_are_exact():
  params = {"w": jax.ShapeDtypeStruct((512, 256), jnp.float32),
            "b": jax.ShapeDtypeStruct((256,), jnp.float32)}
  plain = ol.memory.state_bytes(optax.scale_by_adam(), params)
  assert plain.total_bytes == 2 * (512 * 256 + 256) * 4 + 4
  for bits in (8, 4):
    mem = ol.memory.state_bytes(
        qz.quantize_state(optax.scale_by_adam(), bits=bits), params)
    by_path = {leaf.path: leaf.state_bytes for leaf in mem.leaves}
    # Per moment: codes + one float32 scale and zero point per 256-block.
    per_moment = 512 * 256 * bits // 8 + 2 * 512 * 4
    assert by_path["['w']"] == 2 * per_moment
    assert by_path["['b']"] == 2 * 256 * 4  # below min_size: float32
    assert mem.shared_bytes == 4  # the int32 count
    assert mem.total_bytes == 2 * per_moment + 2 * 256 * 4 + 4
  assert mem.total_bytes < plain.total_bytes / 7


def test_quantized_basis_and_moments_bytes_are_exact():
  # A Dense kernel (in=512, out=256): m = 256 < n = 512, so GaLore keeps the
  # left basis U (256, 8) and moments of R (n, r) = (512, 8).
  params = {"w": jax.ShapeDtypeStruct((512, 256), jnp.float32)}
  svd = ol.projectors.svd()
  plain = ol.memory.state_bytes(
      ol.lowrank_project(optax.scale_by_adam(), rank=8, projector=svd), params)
  basis_only = ol.memory.state_bytes(
      ol.lowrank_project(optax.scale_by_adam(), rank=8,
                         projector=qz.quantize_basis(svd, bits=4)), params)
  both = ol.memory.state_bytes(
      ol.lowrank_project(qz.quantize_state(optax.scale_by_adam(), bits=8),
                         rank=8, projector=qz.quantize_basis(svd, bits=4)),
      params)
  f32_basis, f32_moments, counts = 256 * 8 * 4, 2 * 512 * 8 * 4, 2 * 4
  int4_basis = 256 * 8 // 2 + 2 * (256 * 8 // 256) * 4  # 8 blocks: 1088
  int8_moments = 2 * (512 * 8 + 2 * (512 * 8 // 256) * 4)  # 16 blocks each
  assert plain.total_bytes == f32_basis + f32_moments + counts == 40968
  assert basis_only.total_bytes == int4_basis + f32_moments + counts
  assert both.total_bytes == int4_basis + int8_moments + counts == 9544
  assert both.leaves[0].projected and both.leaves[0].rank == 8


# ---------------------------------------------------------------------------
# quantize_state: jit, stable types, Orbax, and 8-bit Adam against float32.


def test_quantize_state_under_jit_is_tx_on_the_dequantized_state():
  params = {"w": jnp.zeros((64, 96)), "b": jnp.zeros((96,))}
  inner = optax.adam(1e-2)
  tx = qz.quantize_state(inner, min_size=1024)
  abstract = jax.eval_shape(tx.init, jax.tree.map(
      lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params))
  state = jax.jit(tx.init)(params)
  types = jax.tree.map(jax.typeof, state)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), abstract) == jax.tree.map(
      lambda a: (a.shape, a.dtype), state)
  assert isinstance(state[0].mu["w"], qz.QuantizedArray)
  assert state[0].mu["w"].mapping == "sqrt"
  assert not isinstance(state[0].mu["b"], qz.QuantizedArray)  # 96 < min_size
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))

  @jax.jit
  def both(g, state):
    """The wrapper's step, and ``inner``'s step on the dequantized state."""
    u, new_state = tx.update(g, state, params)
    want_u, want_state = inner.update(g, qz.dequantize_tree(state), params)
    return u, new_state, want_u, want_state

  for i in range(3):
    g = jax.tree.map(lambda p: jax.random.normal(jax.random.key(i), p.shape), params)
    u, new_state, want_u, want_state = both(g, state)
    assert jax.tree.map(jax.typeof, new_state) == types
    jax.tree.map(np.testing.assert_array_equal, u, want_u)
    for got, want in zip(jax.tree.leaves(qz.dequantize_tree(new_state)),
                         jax.tree.leaves(want_state)):
      if got.dtype == jnp.int32:  # the count
        np.testing.assert_array_equal(got, want)
      else:  # within half a step of sqrt|x| (stored with 8 bits)
        root = np.sqrt(np.abs(np.asarray(want, np.float64)))
        step = (root.max() + root.max()) / 255
        assert np.all(np.abs(np.sqrt(np.abs(np.asarray(got, np.float64))) - root)
                      <= step / 2 * (1 + 1e-5))
    state = new_state
  assert both._cache_size() == 1


def _grads(step):
  k = jax.random.split(jax.random.fold_in(jax.random.key(7), step), 2)
  return {"w": jax.random.normal(k[0], (64, 48)),
          "b": jax.random.normal(k[1], (16,))}


def test_orbax_round_trip_continues_bit_exactly(tmp_path):
  """8-bit moments and an int4 SVD basis, saved mid-run and restored."""
  params = jax.tree.map(jnp.zeros_like, _grads(0))
  tx = optax.chain(
      ol.lowrank_project(
          qz.quantize_state(optax.scale_by_adam(), min_size=128), rank=4,
          update_proj_gap=3, projector=qz.quantize_basis(ol.projectors.svd())),
      optax.scale_by_learning_rate(1e-2))

  def apply(p, s, t):
    u, s = tx.update(_grads(t), s, p)
    return optax.apply_updates(p, u), s

  step = jax.jit(apply)
  # Committed like Orbax's restored arrays, so the step compiles once.
  start = lambda: jax.device_put((params, tx.init(params)), jax.devices()[0])
  p, s = start()
  for t in range(9):
    p, s = step(p, s, t)
  straight = (p, s)
  lowrank = s[0]
  assert isinstance(lowrank.bases["w"].basis.u, qz.QuantizedArray)
  assert isinstance(lowrank.inner_state.nu["w"], qz.QuantizedArray)

  p, s = start()
  for t in range(4):
    p, s = step(p, s, t)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "ckpt", {"params": p, "opt_state": s})
  del p, s
  abstract = jax.eval_shape(lambda: {"params": params, "opt_state": tx.init(params)})
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(tmp_path / "ckpt", abstract)
  p, s = restored["params"], restored["opt_state"]
  assert jax.tree.structure(s) == jax.tree.structure(straight[1])
  for t in range(4, 9):
    p, s = step(p, s, t)
  jax.tree.map(np.testing.assert_array_equal, (p, s), straight)
  assert step._cache_size() == 1


def _least_squares(seed=0, sigma=1.0, d=128, m=256, n_samples=512):
  """Targets whose output columns have log-normal scales: the moments of each
  row of W (one 256-block) are heavy-tailed."""
  k = jax.random.split(jax.random.key(seed), 4)
  col = jnp.exp(sigma * jax.random.normal(k[0], (m,)))
  a = jax.random.normal(k[1], (n_samples, d))
  w_true = jax.random.normal(k[2], (d, m)) / jnp.sqrt(d) * col
  y = a @ w_true + 0.1 * jax.random.normal(k[3], (n_samples, m)) * col
  loss = lambda w: 0.5 * jnp.mean((jnp.dot(a, w, precision="highest") - y) ** 2)
  return loss, jnp.zeros((d, m))


def _train(tx, loss, w0, steps=50):
  tx = optax.chain(tx, optax.scale(-1e-2))

  def body(carry, _):
    w, s = carry
    u, s = tx.update(jax.grad(loss)(w), s, w)
    return (optax.apply_updates(w, u), s), None

  return jax.jit(lambda w: jax.lax.scan(body, (w, tx.init(w)), None, steps)[0][0])(w0)


def test_8bit_adam_tracks_float32_adam_and_a_linear_map_does_not():
  """50 Adam steps: ‖W_q − W_f32‖ / ‖W_f32 − W₀‖ (measured: sqrt 0.056,
  linear 1.24; one block for the whole tensor 0.39)."""
  loss, w0 = _least_squares()
  ref = _train(optax.scale_by_adam(), loss, w0)
  rel = lambda w: float(jnp.linalg.norm(w - ref) / jnp.linalg.norm(ref - w0))
  good = rel(_train(qz.quantize_state(optax.scale_by_adam()), loss, w0))
  linear = rel(_train(qz.quantize_state(optax.scale_by_adam(), mapping="linear"), loss, w0))
  assert good < 0.1
  assert linear > 0.5  # measurably worse: >= 5x
  assert float(loss(ref)) < 0.3 * float(loss(w0))  # the run does make progress


def test_one_block_for_a_heavy_tailed_tensor_is_measurably_worse():
  """√v = |g| of one gradient of the problem above, stored as v in 256-blocks
  (one row of W each) or in one block for the whole tensor: the 90th
  percentile of the relative error of √v (measured: 0.21 and 0.81; the
  linear map: 1.0 for both)."""
  loss, w0 = _least_squares()
  g = jax.grad(loss)(w0 + 0.01)
  root = np.abs(np.asarray(g, np.float64))

  def p90(**kwargs):
    back = np.asarray(qz.dequantize(qz.quantize(g * g, **kwargs)), np.float64)
    return np.quantile(np.abs(np.sqrt(back) - root) / root, 0.9)

  blocks, whole = p90(mapping="sqrt"), p90(mapping="sqrt", block_size=g.size)
  assert blocks < 0.3 and whole > 3 * blocks
  assert p90(mapping="linear") > 0.9


# ---------------------------------------------------------------------------
# quantize_basis inside lowrank_project.


def test_quantized_svd_basis_is_used_by_down_and_up():
  g = jax.random.normal(jax.random.key(1), (512, 256))  # (n, m): left basis
  params = {"w": jnp.zeros((512, 256))}
  tx = ol.lowrank_project(
      optax.scale_by_adam(), rank=8,
      projector=qz.quantize_basis(ol.projectors.svd(), bits=4))
  u, state = jax.jit(tx.update)({"w": g}, tx.init(params), params)
  qu = state.bases["w"].basis.u
  assert isinstance(qu, qz.QuantizedArray) and qu.bits == 4 and qu.shape == (256, 8)
  basis = qz.dequantize(qu)
  # The stored basis is the exact one within half a step per block.
  # G = gᵀ (m × n): U holds its top left singular vectors, signed so that
  # each column's largest entry is positive (projectors.svd's convention).
  exact = np.linalg.svd(np.asarray(g, np.float64).T)[0][:, :8]
  exact *= np.sign(exact[np.abs(exact).argmax(0), range(8)])
  step = np.repeat(np.asarray(qu.scale), 256).reshape(256, 8)
  assert np.all(np.abs(np.asarray(basis) - exact) <= step / 2 + 1e-6)
  # Adam's first step is r / (|r| + eps) for r = down(basis, g); then up.
  r = g @ basis
  want = (r / (jnp.abs(r) + 1e-8)) @ basis.T
  np.testing.assert_allclose(u["w"], want, rtol=1e-4, atol=1e-5)


def test_quantized_basis_refresh_keeps_a_layer_with_non_finite_gradient():
  params = {"stack": jnp.zeros((3, 40, 96))}
  dims = {"stack": ol.DimensionNumbers(1, 2)}
  tx = ol.lowrank_project(
      optax.scale_by_adam(), rank=4, update_proj_gap=2, dimension_numbers=dims,
      projector=qz.quantize_basis(ol.projectors.svd(), bits=4))
  step = jax.jit(tx.update)
  g0 = {"stack": jax.random.normal(jax.random.key(0), (3, 40, 96))}
  _, s1 = step(g0, tx.init(params), params)
  g2 = jax.random.normal(jax.random.key(1), (3, 40, 96)).at[1, 0, 0].set(jnp.nan)
  _, s2 = step(g0, s1, params)  # step 1: no refresh
  _, s3 = step({"stack": g2}, s2, params)  # step 2: refresh
  old, new = s2.bases["stack"].basis, s3.bases["stack"].basis
  leaf = jax.tree.leaves(old)[0]
  assert leaf.shape[0] == 3  # quantized per layer
  for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new)):
    np.testing.assert_array_equal(a[1], b[1])  # layer 1 kept its basis
    assert not np.array_equal(a[0], b[0]) and not np.array_equal(a[2], b[2])


# ---------------------------------------------------------------------------
# Sharding (8 simulated CPU devices, explicit axes).


def test_sharded_states_keep_their_types(mesh):
  spec = P("a", "b")
  tx = ol.lowrank_project(
      qz.quantize_state(optax.scale_by_adam(), min_size=256), rank=4,
      update_proj_gap=2, projector=qz.quantize_basis(ol.projectors.svd()))
  full = qz.quantize_state(optax.scale_by_adam(), min_size=256)
  abstract = {"w": jax.ShapeDtypeStruct((64, 512), jnp.float32)}
  unsharded = {t: jax.tree.structure(jax.eval_shape(t.init, abstract)) for t in (tx, full)}
  with jax.set_mesh(mesh):
    put = lambda x: jax.device_put(x, NamedSharding(mesh, spec))
    params = {"w": put(jnp.zeros((64, 512)))}
    for t in (tx, full):
      state = jax.jit(t.init)(params)
      assert jax.tree.structure(state) == unsharded[t]  # the state records no mesh
      types = jax.tree.map(jax.typeof, state)
      update = jax.jit(t.update)
      for seed in range(3):  # refresh, keep, refresh
        g = {"w": put(jax.random.normal(jax.random.key(seed), (64, 512)))}
        u, state = update(g, state, params)
        assert jax.tree.map(jax.typeof, state) == types
        assert jax.typeof(u["w"]).sharding.spec == spec
    vh = tx.init(params).bases["w"].basis.vh  # (r, n) = (4, 64), n on "a"
    assert isinstance(vh, qz.QuantizedArray)
    mu = state.mu["w"]  # (64, 512): rows kept, sharded on "a"
    assert mu.codes.shape == (64, 2, 256)
    assert jax.typeof(mu.codes).sharding.spec[0] == "a"
    assert jax.typeof(qz.dequantize(mu)).sharding.spec == spec


# ---------------------------------------------------------------------------
# Arguments.


@pytest.mark.parametrize("call, match", [
    (lambda: qz.quantize(jnp.ones(8), bits=2), r"`bits` must be one of \(4, 8\)"),
    (lambda: qz.quantize(jnp.ones(8), bits=True), r"`bits` must be one of \(4, 8\)"),
    (lambda: qz.quantize(jnp.ones(8), block_size=0), r"`block_size` must be a positive int"),
    (lambda: qz.quantize(jnp.ones(8), block_size=2.5), r"`block_size` must be a positive int"),
    (lambda: qz.quantize(jnp.ones(8), bits=4, block_size=255), r"`block_size` must be even"),
    (lambda: qz.quantize(jnp.ones(8), mapping="log"), r"`mapping` must be one of \('linear', 'sqrt'\)"),
    (lambda: qz.quantize(jnp.ones(8), batch_dims=2), r"`batch_dims` must be an int in \[0, 1\]"),
    (lambda: qz.quantize(jnp.ones(8, jnp.int32)), r"`x` must be a floating array"),
    (lambda: qz.quantize(jnp.ones(8), stochastic=True), r"`key` must be given"),
    (lambda: qz.quantize_state(optax.adam(1e-3), bits=16), r"`bits` must be one of \(4, 8\)"),
    (lambda: qz.quantize_state(optax.adam(1e-3), block_size=-256), r"`block_size` must be a positive int"),
    (lambda: qz.quantize_state(optax.adam(1e-3), min_size=-1), r"`min_size` must be an int >= 0"),
    (lambda: qz.quantize_state(optax.adam(1e-3), mapping="dynamic"), r"`mapping` must be one of"),
    (lambda: qz.quantize_state("adam"), r"`tx` must be an optax GradientTransformation"),
    (lambda: qz.quantize_basis(ol.projectors.svd(), bits=3), r"`bits` must be one of \(4, 8\)"),
    (lambda: qz.quantize_basis(ol.projectors.svd(), block_size=7), r"`block_size` must be even"),
    (lambda: qz.quantize_basis("svd"), r"`projector` must be a Projector"),
])
def test_bad_arguments_raise_value_error_naming_them(call, match):
  with pytest.raises(ValueError, match=match):
    call()
