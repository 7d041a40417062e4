"""Each alias's optimizer state, byte for byte, against its method's definition.

``memory.state_bytes`` measures the state through ``jax.eval_shape``; here every
alias's state is also written down from the method (what its paper and
reference code keep per weight matrix) and the two must agree exactly, per
parameter leaf and in total, for float32 and bfloat16 parameters.

The parameter tree has a kernel with ``m > n``, one with ``m < n`` (Flax
``(in, out)`` kernels: ``n`` is the reduction/input size, ``m`` the output
size, as in ``DimensionNumbers``), a stack of 3 kernels with
``DimensionNumbers(1, 2)`` (a leading layers axis) and a bias vector. Leaves
that are not projected keep their method's full state (two Adam moments).
Every registered optimizer must have a formula here; the quantized ones (galore_8bit,
q_galore) are measured on larger matrices, where their moments are quantized.
"""

import math

import jax
import jax.numpy as jnp
import pytest

import optax_lowrank as ol

SHAPES = {
    "wide": (24, 40),      # (in, out): n = 24, m = 40, m > n
    "tall": (40, 24),      # n = 40, m = 24, m < n
    "stack": (3, 20, 36),  # 3 matrices with n = 20, m = 36
    "bias": (24,),
}
DIMS = {"wide": None, "tall": None, "stack": ol.DimensionNumbers(1, 2),
        "bias": None}
MATRICES = ("wide", "tall", "stack")
RANK = 8
INT32 = 4
FLOAT32 = 4
KEY = 2 * 4  # one raw PRNG key, uint32[2]
DTYPES = [jnp.float32, jnp.bfloat16]


def _matrices(name):
  """``(batch, m, n)``: how many matrices a leaf holds and their size."""
  *batch, n, m = SHAPES[name]
  return math.prod(batch), m, n


def _full_adam(name, s):
  """Two moments of the parameter's shape."""
  return 2 * math.prod(SHAPES[name]) * s


def _moments(name, r, s):
  """Two moments of GaLore's ``std`` projection: ``m×r`` if ``m >= n``, else
  ``r×n`` (the smaller side is compressed, the larger kept)."""
  b, m, n = _matrices(name)
  return 2 * b * r * (m if m >= n else n) * s


def _svd_basis(name, r, s):
  """``Vh[:r]`` (``r×n``) if ``m >= n`` else ``U[:, :r]`` (``m×r``), in the
  parameters' dtype (galore-torch keeps it in the parameter's dtype)."""
  b, m, n = _matrices(name)
  return b * r * (n if m >= n else m) * s


def _limiter(name):
  """The norm-growth limiter's previous norm: one float32 per matrix."""
  return _matrices(name)[0] * FLOAT32


def galore(s):
  per_leaf = {k: _moments(k, RANK, s) + _svd_basis(k, RANK, s)
              for k in MATRICES}
  per_leaf["bias"] = _full_adam("bias", s)
  # lowrank_project's step count and scale_by_adam's.
  return per_leaf, 2 * INT32


def apollo(s, rank=RANK):
  # Moments of the random projection (same side rule as GaLore); the matrix
  # itself is never stored, only one key per leaf (the stack draws its three
  # matrices from one key); the limiter's norm per matrix.
  per_leaf = {k: _moments(k, rank, s) + KEY + _limiter(k) for k in MATRICES}
  per_leaf["bias"] = _full_adam("bias", s)
  # lowrank_project's count, scale_by_adam_uncorrected's count, and
  # scale_by_bias_correction's count.
  return per_leaf, 3 * INT32


def apollo_mini(s):
  return apollo(s, rank=1)


def fira(s):
  per_leaf = {k: _moments(k, RANK, s) + _svd_basis(k, RANK, s) + _limiter(k)
              for k in MATRICES}
  per_leaf["bias"] = _full_adam("bias", s)
  # As APOLLO: lowrank count, uncorrected Adam's count, bias-correction count.
  return per_leaf, 3 * INT32


def frugal_blocks(s, density):
  """Adam on ``round(L·density)`` of the stack's ``L`` matrices, whole."""
  b, m, n = _matrices("stack")
  k = round(b * density)
  per_leaf = {"stack": 2 * k * m * n * s + k * INT32 + INT32}  # indices, start
  for name in ("wide", "tall", "bias"):  # masked out: plain AdamW
    per_leaf[name] = _full_adam(name, s)
  for name in per_leaf:  # scale_by_adam_leafwise: one count per leaf
    per_leaf[name] += INT32
  return per_leaf, INT32  # lowrank_project's count


def frugal_columns(s, density):
  """Adam on ``floor(n·density)`` columns of each ``m×n`` matrix."""
  per_leaf = {}
  for name in MATRICES:
    b, m, n = _matrices(name)
    k = math.floor(n * density)
    per_leaf[name] = 2 * b * k * m * s + b * k * INT32  # moments, indices
  per_leaf["bias"] = _full_adam("bias", s)
  for name in per_leaf:
    per_leaf[name] += INT32
  return per_leaf, INT32


def frugal_svd(s, density):
  """GaLore's subspace with ``r = round(density·min(m, n))``."""
  per_leaf = {}
  for name in MATRICES:
    _, m, n = _matrices(name)
    r = round(density * min(m, n))
    per_leaf[name] = _moments(name, r, s) + _svd_basis(name, r, s)
  per_leaf["bias"] = _full_adam("bias", s)
  for name in per_leaf:
    per_leaf[name] += INT32
  return per_leaf, INT32


def flora(s, min_dim, momentum_size):
  """Adafactor's second moment of the raw gradient, and a momentum compressed
  to ``r×max(m, n)`` (the smaller side, by a key-drawn random matrix) for
  matrices with ``min(m, n) >= min_dim`` and ``max(m, n) <= 4·min(m, n)``,
  stored in the momentum dtype; a full momentum for everything else.

  optax's Adafactor factors a leaf over its two largest axes when the smaller
  of them is ``>= min_dim``: a row and a column statistic (the leaf's shape
  less one of those axes each) and a ``(1,)`` placeholder for ``v``;
  otherwise ``v`` is full and the two statistics are ``(1,)`` placeholders.
  """
  per_leaf = {}
  for name, shape in SHAPES.items():
    size, axes = math.prod(shape), sorted(shape)
    if len(shape) >= 2 and axes[-2] >= min_dim:
      second = (size // axes[-1] + size // axes[-2] + 1) * s
    else:
      second = (size + 2) * s
    momentum = size * momentum_size
    if name in MATRICES:
      b, m, n = _matrices(name)
      if min(m, n) >= min_dim and max(m, n) <= 4 * min(m, n):
        momentum = b * RANK * max(m, n) * momentum_size + KEY
    per_leaf[name] = second + momentum
  # scale_by_factored_rms's count and lowrank_project's.
  return per_leaf, 2 * INT32


def vlorp(s, c=4, r=2):
  """ProjFactor: the first moment of the regrouped projection, ``max(m, n)·c·r`` per
  matrix in the gradient's dtype; a row and a column factor (float32) and a count;
  one key per leaf (the matrix is never stored). The bias gets AdamW with its own
  count (``scale_by_adam_leafwise``)."""
  per_leaf = {}
  for name in MATRICES:
    b, m, n = _matrices(name)
    per_leaf[name] = b * max(m, n) * c * r * s + b * (m + n) * FLOAT32 + INT32 + KEY
  per_leaf["bias"] = _full_adam("bias", s) + INT32
  return per_leaf, 2 * INT32  # lowrank_project's count, optax.ema's count


def osd(s):
  """GaLore's moments; the basis, the next basis and the basis's AdamW moments, all
  float32 (the basis is optimized), and that AdamW's count."""
  per_leaf = {k: _moments(k, RANK, s) + 4 * _svd_basis(k, RANK, FLOAT32) + INT32
              for k in MATRICES}
  per_leaf["bias"] = _full_adam("bias", s)
  return per_leaf, 2 * INT32


def dct_adamw(s):
  """Adam on ``r`` DCT columns: GaLore's moments, ``r`` int32 indices per matrix."""
  per_leaf = {k: _moments(k, RANK, s) + _matrices(k)[0] * RANK * INT32 for k in MATRICES}
  per_leaf["bias"] = _full_adam("bias", s)
  for name in per_leaf:  # scale_by_adam_leafwise: one count per leaf
    per_leaf[name] += INT32
  return per_leaf, INT32


def grass(s):
  """Adam on ``r`` selected rows: GaLore's moments, ``r`` int32 indices and ``r``
  float32 scales per matrix."""
  per_leaf = {k: _moments(k, RANK, s) + _matrices(k)[0] * RANK * (INT32 + FLOAT32)
              for k in MATRICES}
  per_leaf["bias"] = _full_adam("bias", s)
  for name in per_leaf:
    per_leaf[name] += INT32
  return per_leaf, INT32


def adarankgrad(s):
  """GaLore's state at the maximum rank, plus per matrix the rank in use and the step
  of its last switch (int32 each)."""
  per_leaf = {k: _moments(k, RANK, s) + _svd_basis(k, RANK, s)
              + _matrices(k)[0] * 2 * INT32
              for k in MATRICES}
  per_leaf["bias"] = _full_adam("bias", s)
  return per_leaf, 2 * INT32


def coap(s):
  """GaLore's moments and basis (in the parameters' dtype, as the code keeps it), and
  one int32 count of basis updates per leaf (every fifth is a range find)."""
  per_leaf = {k: _moments(k, RANK, s) + _svd_basis(k, RANK, s) + INT32
              for k in MATRICES}
  per_leaf["bias"] = _full_adam("bias", s)
  # As APOLLO: lowrank count, uncorrected Adam's count, bias-correction count.
  return per_leaf, 3 * INT32


def golore(s):
  """GaLore's moments and basis (the SVD's side, later a random orthonormal matrix of
  the same shape, in the parameters' dtype); Hugging Face Adam as the authors' code."""
  per_leaf = {k: _moments(k, RANK, s) + _svd_basis(k, RANK, s) for k in MATRICES}
  per_leaf["bias"] = _full_adam("bias", s)
  # lowrank_project's count, uncorrected Adam's count, bias correction's count.
  return per_leaf, 3 * INT32


def gradnorm_lorp(s):
  """GaLore's state for the direction's gradient (moments and basis in the parameters'
  dtype), plus four float32 numbers per output of each matrix: the magnitude g, the
  direction's norm ‖v‖ (v itself is read from the weight: v = (‖v‖/g)·W) and g's two
  Adam moments."""
  per_leaf = {k: _moments(k, RANK, s) + _svd_basis(k, RANK, s)
              + 4 * _matrices(k)[0] * _matrices(k)[1] * FLOAT32 for k in MATRICES}
  per_leaf["bias"] = _full_adam("bias", s)
  # weight_norm_project's count; lowrank_project's, scale_by_adam_uncorrected's and
  # scale_by_bias_correction's for the direction; the last two again for g.
  return per_leaf, 6 * INT32
def gum(s, projected, slots):
  """GUM on the ``projected`` leaves: the SVD basis (parameters' dtype), the low-rank
  momentum (float32, the kept side as GaLore's moments), the full-rank momentum of
  ``slots`` layers (float32 ``m·n`` each: the drawn ones of a stack, or the one buffer of
  an unscanned leaf), int32 slot indices, a bool per slot and two int32 period counters;
  the other leaves take Adam."""
  per_leaf = {}
  for k in SHAPES:
    if k in projected:
      _, m, n = _matrices(k)
      k_slots = slots if k == "stack" else 1
      per_leaf[k] = (_svd_basis(k, RANK, s) + _moments(k, RANK, FLOAT32) // 2
                     + k_slots * (m * n * FLOAT32 + INT32 + 1) + 2 * INT32)
    else:
      per_leaf[k] = _full_adam(k, s)
  # lowrank_project's step count and scale_by_adam's.
  return per_leaf, 2 * INT32
def owlore(s, num_layers):
  """GaLore's state (HF Adam: its count and the lowrank count), the layer-wise
  wrapper's count, and per layer a float32 sampling weight, a bool (drawn) and an
  int32 step count."""
  per_leaf, _ = galore(s)
  return per_leaf, 3 * INT32 + num_layers * (FLOAT32 + 1 + INT32)


# name → [(case, kwargs, formula(itemsize) -> (per-leaf bytes, shared bytes))]
CASES = {
    "galore": [("", dict(rank=RANK), galore)],
    "apollo": [("", dict(rank=RANK), apollo)],
    "apollo_mini": [("", {}, apollo_mini)],
    "fira": [("", dict(rank=RANK), fira)],
    "frugal": [
        (f"{subspace}-{density}",
         dict(density=density, subspace=subspace,
              **({"projection_mask": {k: k == "stack" for k in SHAPES}}
                 if subspace == "blocks" else {})),
         lambda s, f=formula, d=density: f(s, d))
        for subspace, formula in (("blocks", frugal_blocks),
                                  ("columns", frugal_columns),
                                  ("svd", frugal_svd))
        for density in (0.25, 0.3)
    ],
    "vlorp": [("c4-r2", dict(rank=2, granularity=4), vlorp)],
    "osd": [("", dict(rank=RANK), osd)],
    "dct_adamw": [("", dict(rank=RANK), dct_adamw)],
    "grass": [("", dict(rank=RANK), grass)],
    "adarankgrad": [("", dict(rank=RANK), adarankgrad)],
    "coap": [("", dict(rank=RANK), coap)],
    "golore": [("", dict(rank=RANK), golore)],
    "gradnorm_lorp": [("", dict(rank=RANK), gradnorm_lorp)],
    "gum": [
        ("stacked", dict(rank=RANK, full_rank_layers=1,
                         projection_mask={k: k == "stack" for k in SHAPES}),
         lambda s: gum(s, ("stack",), 1)),
        ("unscanned", dict(rank=RANK, full_rank_layers=1, num_layers=2,
                           group_fn=lambda path: path,
                           projection_mask={k: k in ("wide", "tall") for k in SHAPES}),
         lambda s: gum(s, ("wide", "tall"), 1)),
    ],
    "owlore": [
        ("no-layers", dict(rank=RANK), lambda s: owlore(s, 0)),
        ("stacked", dict(rank=RANK, layer_of=lambda path: (
            ol.sampling.STACKED if path == "stack" else None)),
         lambda s: owlore(s, 3)),
    ],
    "flora": [
        # Every matrix factored and compressed (bfloat16 momentum, the
        # default); the stack (min side 20) neither; nothing (the default
        # min_dim_size_to_factor, 128); momentum in the parameters' dtype.
        ("min16", dict(rank=RANK, min_dim_size_to_factor=16),
         lambda s: flora(s, 16, 2)),
        ("min21", dict(rank=RANK, min_dim_size_to_factor=21),
         lambda s: flora(s, 21, 2)),
        ("min128", dict(rank=RANK), lambda s: flora(s, 128, 2)),
        ("min16-param-dtype-momentum",
         dict(rank=RANK, min_dim_size_to_factor=16, momentum_dtype=None),
         lambda s: flora(s, 16, s)),
    ],
}

PARAMS = [
    pytest.param(name, case, kwargs, formula, dtype,
                 id=f"{name}{'-' + case if case else ''}-"
                    f"{jnp.dtype(dtype).name}")
    for name in CASES
    for case, kwargs, formula in CASES[name]
    for dtype in DTYPES
]


def _params(dtype):
  return {k: jax.ShapeDtypeStruct(s, dtype) for k, s in SHAPES.items()}


@pytest.mark.parametrize("name,case,kwargs,formula,dtype", PARAMS)
def test_state_bytes_equal_the_formula(name, case, kwargs, formula, dtype):
  del case
  tx = ol.optimizers[name](1e-3, dimension_numbers=DIMS, **kwargs)
  mem = ol.memory.state_bytes(tx, _params(dtype))
  per_leaf, shared = formula(jnp.dtype(dtype).itemsize)
  measured = {leaf.path: leaf.state_bytes for leaf in mem.leaves}
  assert measured == {f"['{k}']": v for k, v in per_leaf.items()}
  assert mem.shared_bytes == shared
  assert mem.total_bytes == sum(per_leaf.values()) + shared


# The quantized aliases keep a moment in float when it has fewer than 4096 elements
# (quantize_state's min_size), so they are measured on larger matrices (eval_shape only:
# nothing is allocated): every projected moment here is quantized, the bias's is not.
QSHAPES = {
    "wide": (128, 256),     # n = 128, m = 256: moments r×m = 8192 elements
    "tall": (256, 128),     # n = 256, m = 128: moments r×n = 8192
    "stack": (2, 96, 160),  # 2 matrices, n = 96, m = 160: moments 2·r·m = 10240
    "bias": (256,),
}
QRANK = 32
BLOCK = 256  # elements per block of the int8 moments and of the int4 basis
BLOCK_SCALE_ZERO = 2 * FLOAT32  # each block's float32 scale and zero
QUEUE = 5  # Q-GaLore's queue of cosine similarities (queue_size)


def _q_matrices(name):
  *batch, n, m = QSHAPES[name]
  return math.prod(batch), m, n


def _int8_moment(numel):
  """A moment quantized in int8 blocks of 256 over its flattening (one byte per element,
  the last block padded), plus each block's scale and zero."""
  return -(-numel // BLOCK) * (BLOCK + BLOCK_SCALE_ZERO)


def _q_moments(name):
  b, m, n = _q_matrices(name)
  return 2 * _int8_moment(b * QRANK * (m if m >= n else n))


def _q_side(name):
  """The length of a basis vector: ``n`` for ``Vh[:r]`` (m >= n), else ``m``."""
  _, m, n = _q_matrices(name)
  return n if m >= n else m


def galore_8bit_formula(s):
  per_leaf = {k: _q_moments(k) + _q_matrices(k)[0] * QRANK * _q_side(k) * s
              for k in MATRICES}
  per_leaf["bias"] = 2 * QSHAPES["bias"][0] * s  # under min_size: kept as it is
  return per_leaf, 2 * INT32


def q_galore_formula(s):
  per_leaf = {}
  for k in MATRICES:
    b = _q_matrices(k)[0]
    # the basis: int4 (two codes a byte), blocks of 256 per matrix
    basis = b * -(-QRANK * _q_side(k) // BLOCK) * (BLOCK // 2 + BLOCK_SCALE_ZERO)
    # the lazy rule per matrix: its gap, its queue of similarities, how many it has,
    # the previous leading singular vector; and the leaf's count of refresh calls
    lazy = b * (INT32 + QUEUE * FLOAT32 + INT32 + _q_side(k) * FLOAT32) + INT32
    per_leaf[k] = _q_moments(k) + basis + lazy
  per_leaf["bias"] = 2 * QSHAPES["bias"][0] * s  # under min_size: Adam's, as it is
  return per_leaf, 2 * INT32


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("name, formula", [("galore_8bit", galore_8bit_formula),
                                           ("q_galore", q_galore_formula)])
def test_quantized_state_bytes_equal_the_block_layout(name, formula, dtype):
  tx = ol.optimizers[name](1e-3, rank=QRANK, dimension_numbers=DIMS)
  params = {k: jax.ShapeDtypeStruct(shape, dtype) for k, shape in QSHAPES.items()}
  mem = ol.memory.state_bytes(tx, params)
  per_leaf, shared = formula(jnp.dtype(dtype).itemsize)
  assert {leaf.path: leaf.state_bytes for leaf in mem.leaves} == {
      f"['{k}']": v for k, v in per_leaf.items()}
  assert mem.shared_bytes == shared


@pytest.mark.parametrize("name", sorted(ol.optimizers))
def test_every_registered_alias_has_a_formula(name):
  assert name in CASES or name in ("galore_8bit", "q_galore"), (
      f"no analytic state formula for {name!r} in this file")


def test_frugal_blocks_refuses_a_single_matrix():
  """Blocks are whole matrices of a stack: a 2-D leaf has none to choose."""
  tx = ol.frugal(1e-3, 0.25, subspace="blocks", dimension_numbers=DIMS)
  with pytest.raises(ValueError, match="stacked matrices"):
    ol.memory.state_bytes(tx, _params(jnp.float32))
