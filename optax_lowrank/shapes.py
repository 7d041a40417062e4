"""Matricization of parameter leaves and the choice of which leaves to project.

A projected leaf is viewed as a stack of matrices. Its *reduction* (input)
axes form ``n`` and its *output* axes form ``m``; every axis named by neither
is a batch axis, which is how stacked (scanned) layers get one basis per layer.

Two orientations meet here:

- **Conventions** follow the reference implementations, which see a weight as
  ``(m, n) = (output, reduction)``, PyTorch's ``nn.Linear.weight``. So a rule
  such as GaLore's "``m >= n``: project on the right" selects the same side
  here, the tie ``m == n`` included, and bases have their reference shapes
  (``r × n`` on the right, ``m × r`` on the left).
- **Arrays** stay in the parameter's own layout, reduction axes first:
  ``matricize`` gives ``(batch..., n, m)``, which for a Flax ``Dense`` kernel
  ``(in, out)`` (``reduction_axes=0, output_axes=1``, the default for 2-D
  leaves) is the kernel itself. Projectors contract along the right axes with
  ``einsum`` instead of transposing the gradient and the update every step.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P


class DimensionNumbers(NamedTuple):
  """Which axes of a leaf form the rows and columns of its matrices.

  Attributes:
    reduction_axes: Axis or axes contracted with the layer's input (the
      ``in`` axes of a kernel); they form the matrix columns ``n``.
    output_axes: Axis or axes of the layer's output; they form the rows ``m``.
      Axes in neither are batch axes (for example the ``layers`` axis of
      scanned weights): each batch slice gets a basis of its own.
  """

  reduction_axes: Union[int, Sequence[int]] = 0
  output_axes: Union[int, Sequence[int]] = 1


DimensionNumbersOrFn = Union[
    None, DimensionNumbers, Any, Callable[[Any], Any]
]
MaskOrFn = Union[None, bool, Any, Callable[[Any], Any]]

# optax's own specs with the same meaning (fields ``reduction_axis`` and
# ``output_axis``), accepted wherever ``DimensionNumbers`` are.
_OPTAX_DIMENSION_NUMBERS = tuple(
    t for t in (getattr(optax.contrib, "GaLoreDimensionNumbers", None),
                getattr(optax.contrib, "MuonDimensionNumbers", None))
    if t is not None)


def is_dimension_numbers(x) -> bool:
  """Whether ``x`` is ours or optax's GaLore/Muon dimension numbers."""
  return isinstance(x, (DimensionNumbers,) + _OPTAX_DIMENSION_NUMBERS)


def as_dimension_numbers(x) -> Optional[DimensionNumbers]:
  """``x`` (ours, optax's GaLore/Muon spec, or ``None``) as ours."""
  if x is None or isinstance(x, DimensionNumbers):
    return x
  if isinstance(x, _OPTAX_DIMENSION_NUMBERS):
    return DimensionNumbers(x.reduction_axis, x.output_axis)
  raise ValueError(
      "`dimension_numbers` entries must be DimensionNumbers, optax's "
      f"GaLoreDimensionNumbers / MuonDimensionNumbers, or None; got {x!r}")


def path_name(path) -> str:
  """A key path as a ``/``-joined name: ``{"a": {"b": [x]}}`` → ``"a/b/0"``.

  A last ``.value`` attribute (a Flax NNX ``Variable``'s array) is left out:
  ``nnx.Optimizer`` hands ``init`` a state of ``Param`` variables and
  ``update`` the same state as plain arrays, and both must name a leaf alike.
  """
  path = tuple(path)
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and (
      path[-1].name == "value"):
    path = path[:-1]
  return jax.tree_util.keystr(path, simple=True, separator="/")


def match_paths(pattern: str) -> Callable[[Any], Any]:
  """A mask function selecting the leaves whose path matches ``pattern``.

  Like a ``target_modules`` list: ``pattern`` is a regular expression searched
  (``re.search``) in each leaf's ``path_name``, e.g. ``"layers/0/attn/q/kernel"``
  (Flax NNX state paths end in ``/value``).

  Args:
    pattern: A regular expression, e.g. ``"attn|mlp"``.

  Returns:
    ``mask(params) -> bool pytree``, for ``projection_mask`` of
    ``lowrank_project`` or any optax ``mask``.

  Example:
    >>> import jax.numpy as jnp, optax_lowrank
    >>> params = {"attn": {"q": jnp.zeros((8, 8))}, "norm": jnp.zeros(8)}
    >>> optax_lowrank.match_paths("attn|mlp")(params)
    {'attn': {'q': True}, 'norm': False}

  References:
    Zhao et al., `GaLore <https://arxiv.org/abs/2403.03507>`_, 2024 (the
    attention and MLP matrices are projected; embeddings, norms and the head
    are not).
  """
  try:
    regex = re.compile(pattern)
  except (re.error, TypeError) as e:
    raise ValueError(
        f"`pattern` must be a regular expression, got {pattern!r}: {e}"
    ) from None

  def mask(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: regex.search(path_name(path)) is not None, params)

  return mask


def _as_axes(axes: Union[int, Sequence[int]], ndim: int) -> Optional[tuple[int, ...]]:
  """Axes as non-negative ints, or ``None`` if empty or out of range."""
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  if not axes or any(not -ndim <= a < ndim for a in axes):
    return None
  return tuple(int(a) % ndim for a in axes)


@dataclasses.dataclass(frozen=True)
class MatrixLayout:
  """A static map between a leaf's shape and its ``(batch..., n, m)`` view."""

  shape: tuple[int, ...]
  batch_axes: tuple[int, ...]
  output_axes: tuple[int, ...]
  reduction_axes: tuple[int, ...]

  @classmethod
  def from_dimension_numbers(
      cls, shape: tuple[int, ...], dims: DimensionNumbers, path: str
  ) -> "MatrixLayout":
    """Validates ``dims`` against ``shape``; errors name the leaf ``path``."""
    ndim = len(shape)
    if ndim < 2:
      raise ValueError(
          f"Leaf {path} of shape {shape} cannot be projected: it has fewer "
          "than 2 axes. Exclude it with `mask` or give it no dimension numbers."
      )
    red = _as_axes(dims.reduction_axes, ndim)
    out = _as_axes(dims.output_axes, ndim)
    if red is None or out is None:
      raise ValueError(
          f"Dimension numbers {dims} for leaf {path} of shape {shape} name "
          f"an axis outside [-{ndim}, {ndim}) or no axis at all."
      )
    if len(set(red + out)) != len(red) + len(out):
      raise ValueError(
          f"Dimension numbers {dims} for leaf {path}: reduction and output "
          "axes must be distinct."
      )
    batch = tuple(a for a in range(ndim) if a not in red + out)
    return cls(tuple(shape), batch, out, red)

  @property
  def batch_shape(self) -> tuple[int, ...]:
    return tuple(self.shape[a] for a in self.batch_axes)

  @property
  def m(self) -> int:
    return math.prod(self.shape[a] for a in self.output_axes)

  @property
  def n(self) -> int:
    return math.prod(self.shape[a] for a in self.reduction_axes)

  @property
  def matrix_shape(self) -> tuple[int, ...]:
    """``(batch..., m, n)`` in the references' orientation (for reports)."""
    return self.batch_shape + (self.m, self.n)

  @property
  def _perm(self) -> tuple[int, ...]:
    return self.batch_axes + self.reduction_axes + self.output_axes

  def matricize(self, x: jax.Array) -> jax.Array:
    """``x`` of ``shape`` → ``(batch..., n, m)`` (no copy for Dense kernels)."""
    perm = self._perm
    if perm != tuple(range(len(perm))):
      x = jnp.transpose(x, perm)
    return x.reshape(self.batch_shape + (self.n, self.m))

  def unmatricize(self, y: jax.Array) -> jax.Array:
    """``(batch..., n, m)`` → an array of ``shape``."""
    perm = self._perm
    y = y.reshape(tuple(self.shape[a] for a in perm))
    if perm == tuple(range(len(perm))):
      return y
    inverse = tuple(sorted(range(len(perm)), key=perm.__getitem__))
    return jnp.transpose(y, inverse)


class MatrixInfo(NamedTuple):
  """What a projector needs to build a basis for one leaf (static values).

  Attributes:
    batch_shape: Shape of the batch axes in front of the matrices.
    m: Rows (product of output axes).
    n: Columns (product of reduction axes).
    rank: Rank of the subspace.
    spec: Partition spec entries of the ``(batch..., n, m)`` array view under
      an explicit-sharding mesh, or ``None`` when nothing is sharded
      explicitly.
    std_side: The side ``proj_type="std"`` compresses, when the matricize
      stage fixes it: a granular view (see ``granular_shape``) keeps the side
      of the matrix before regrouping. ``None``: decided from ``m`` and ``n``.
  """

  batch_shape: tuple[int, ...]
  m: int
  n: int
  rank: int
  spec: Optional[tuple[Any, ...]]
  std_side: Optional[str] = None

  def shape(self, dims: str) -> tuple[int, ...]:
    """``batch_shape`` followed by one size per letter of ``dims`` (m, n, r)."""
    sizes = {"m": self.m, "n": self.n, "r": self.rank}
    return self.batch_shape + tuple(sizes[d] for d in dims)

  def partition(self, dims: str) -> Optional[tuple[Any, ...]]:
    """Partition spec entries for ``shape(dims)``, or ``None`` if unsharded.

    ``m`` and ``n`` take the leaf's shardings, ``r`` is never sharded.
    """
    return partition(self.spec, dims)

  def zeros(self, dims: str, dtype) -> jax.Array:
    """Zeros of shape ``batch_shape + dims``, sharded like the leaf.

    Args:
      dims: One letter per trailing axis: ``m`` and ``n`` take the leaf's
        sizes and shardings, ``r`` is the rank (never sharded).
      dtype: Array dtype.

    Returns:
      The zero array, carrying the leaf's sharding along the axes it shares.
    """
    return jnp.zeros(self.shape(dims), dtype,
                     out_sharding=out_sharding(self.partition(dims)))


def partition(spec: Optional[Sequence[Any]], dims: str
              ) -> Optional[tuple[Any, ...]]:
  """Spec entries for a ``batch... + dims`` array, from those of a leaf's view.

  Args:
    spec: Partition spec entries of a ``(batch..., n, m)`` matricized view
      (``explicit_spec`` of the gradient), or ``None``.
    dims: One letter per trailing axis: ``m`` and ``n`` take the view's
      entries, ``r`` (the rank) is never sharded.

  Returns:
    The entries, or ``None`` if ``spec`` is ``None``.
  """
  if spec is None:
    return None
  nb = len(spec) - 2
  entries = {"n": spec[nb], "m": spec[nb + 1], "r": None}
  return (*spec[:nb], *(entries[d] for d in dims))


def explicit_spec(x) -> Optional[tuple[Any, ...]]:
  """Partition spec of ``x`` if it is sharded under explicit mesh axes.

  ``x`` is an array, a tracer, or a ``jax.ShapeDtypeStruct`` (as
  ``jax.eval_shape`` returns, which carries its sharding).
  """
  try:
    sharding = jax.typeof(x).sharding
  except (TypeError, AttributeError):
    sharding = getattr(x, "sharding", None)
    if not isinstance(sharding, jax.sharding.NamedSharding):
      return None
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or not mesh.axis_names:
    return None
  if not any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    return None
  spec = tuple(sharding.spec)
  return spec + (None,) * (x.ndim - len(spec))


def out_sharding(spec: Optional[Sequence[Any]]) -> Optional[P]:
  """A spec tuple as an ``out_sharding`` argument (``None`` if unsharded)."""
  return None if spec is None else P(*spec)


def reshard_like(x: jax.Array, like: jax.Array) -> jax.Array:
  """Reshards ``x`` to the explicit sharding of ``like`` (no-op otherwise)."""
  return reshard_to(x, explicit_spec(like))


def reshard_to(x: jax.Array, spec: Optional[Sequence[Any]]) -> jax.Array:
  """Reshards ``x`` to the spec entries ``spec`` (no-op for ``None``).

  Specs come from ``explicit_spec``, which is ``None`` without a mesh and
  under ``Auto`` mesh axes (there XLA's propagation decides), so that
  nothing is resharded there.
  """
  if spec is None:
    return x
  spec = tuple(spec) + (None,) * (x.ndim - len(spec))
  if explicit_spec(x) == spec:
    return x
  return jax.sharding.reshard(x, P(*spec))


def gather_matrices(x: jax.Array) -> jax.Array:
  """Makes the two matrix axes of ``x`` unsharded, for SVD or QR.

  Mesh axes taken off the matrix axes are moved onto the first unsharded batch
  axis they divide, so that a stacked ``(layers, n, m)`` gradient is factorized
  layer-parallel rather than on every device.

  Args:
    x: An array ``(batch..., n, m)``.

  Returns:
    ``x`` resharded so that its last two axes are replicated.
  """
  spec = explicit_spec(x)
  if spec is None or (spec[-1] is None and spec[-2] is None):
    return x
  freed = tuple(
      a for entry in spec[-2:] if entry is not None
      for a in ((entry,) if isinstance(entry, str) else entry)
  )
  batch = list(spec[:-2])
  mesh = jax.typeof(x).sharding.mesh
  size = math.prod(mesh.shape[a] for a in freed)
  for i, entry in enumerate(batch):
    if entry is None and x.shape[i] % size == 0:
      batch[i] = freed if len(freed) > 1 else freed[0]
      break
  return jax.sharding.reshard(x, P(*batch, None, None))


def validate_granularity(granularity) -> None:
  """Checks that ``granularity`` is a power of two (``1/2``, ``1``, ``4``, ...)."""
  ok = (not isinstance(granularity, bool)
        and isinstance(granularity, (int, float))
        and granularity > 0
        and float(math.log2(granularity)).is_integer())
  if not ok:
    raise ValueError(
        "`granularity` must be a power of two, e.g. 0.5, 1, 4 or 256, got "
        f"{granularity!r}"
    )


def granular_shape(m: int, n: int, granularity) -> tuple[int, int, str]:
  """VLoRP's regrouped matrix for granularity ``c`` and the side it projects.

  The references' ``G`` (``m × n``) is reshaped row-major: when ``m >= n`` to
  ``(m·c, n/c)`` (each row cut into ``c`` chunks) and projected on the right;
  otherwise to ``(m/c, n·c)`` (``c`` consecutive rows joined) and projected on
  the left. ``c < 1`` gives coarser units.

  Args:
    m: Rows of the matrix (output size).
    n: Columns (reduction size).
    granularity: ``c``, a power of two.

  Returns:
    ``(m', n', side)``.

  Raises:
    ValueError: if the regrouped sides are not whole numbers.
  """
  validate_granularity(granularity)
  side = "right" if m >= n else "left"
  rows, cols = (m * granularity, n / granularity) if side == "right" else (
      m / granularity, n * granularity)
  if not (float(rows).is_integer() and float(cols).is_integer()):
    short, long_ = ("n", "m") if side == "right" else ("m", "n")
    raise ValueError(
        f"`granularity` {granularity!r} does not fit the matrix (m, n) = "
        f"({m}, {n}): regrouping it to {'(m·c, n/c)' if side == 'right' else '(m/c, n·c)'} "
        f"gives ({rows:g}, {cols:g}). Allowed: a power of two c >= 1 dividing "
        f"{short} = {min(m, n)}, or c < 1 with 1/c dividing {long_} = "
        f"{max(m, n)}."
    )
  return int(rows), int(cols), side


def _regrouped_rows_entry(x: jax.Array, spec: tuple[Any, ...], m: int,
                          m2: int):
  """Mesh axes for the regrouped rows: the matrix axes' ones that divide both.

  ``m`` is always the major factor of ``m2`` or the other way round, so a
  sharding that divides both is the same split of the data in either view.
  """
  mesh = jax.typeof(x).sharding.mesh
  axes = tuple(
      a for entry in (spec[-1], spec[-2]) if entry is not None
      for a in ((entry,) if isinstance(entry, str) else entry)
  )
  while axes and (m2 % math.prod(mesh.shape[a] for a in axes)
                  or m % math.prod(mesh.shape[a] for a in axes)):
    axes = axes[:-1]
  if not axes:
    return None
  return axes[0] if len(axes) == 1 else axes


def regroup(x: jax.Array, m2: int, n2: int) -> jax.Array:
  """``(batch..., n, m)`` → ``(batch..., n2, m2)``: the row-major regrouping.

  In the references' orientation this is ``G.reshape(m2, n2)`` on each matrix
  (``G`` is ``xᵀ``), so rows and columns keep the references' order. Under
  explicit sharding the matrix axes' mesh axes move onto the regrouped rows
  ``m2`` where they divide it (an all-to-all, not a gather); ``n2`` is
  unsharded.
  """
  spec = explicit_spec(x)
  g = jnp.swapaxes(x, -1, -2)
  shape = g.shape[:-2] + (m2, n2)
  if spec is None:
    return jnp.swapaxes(g.reshape(shape), -1, -2)
  rows = P(*spec[:-2], _regrouped_rows_entry(g, spec, g.shape[-2], m2), None)
  g = jnp.reshape(jax.sharding.reshard(g, rows), shape, out_sharding=rows)
  return jnp.swapaxes(g, -1, -2)


def ungroup(y: jax.Array, m: int, n: int,
            spec: Optional[tuple[Any, ...]] = None) -> jax.Array:
  """Inverse of ``regroup``: back to ``(batch..., n, m)``.

  Under explicit sharding the mesh axes of ``y``'s matrix axes (of ``spec``,
  when given) that divide both row counts shard the rows ``m``; the result is
  then resharded as ``spec`` if given, else left so (``n`` unsharded).
  """
  y_spec = explicit_spec(y)
  g = jnp.swapaxes(y, -1, -2)
  shape = g.shape[:-2] + (m, n)
  if y_spec is None:
    return jnp.swapaxes(g.reshape(shape), -1, -2)
  source = y_spec if spec is None else tuple(spec)
  rows = P(*source[:-2], _regrouped_rows_entry(g, source, m, g.shape[-2]),
           None)
  g = jnp.reshape(reshard_to(g, tuple(rows)), shape, out_sharding=rows)
  return reshard_to(jnp.swapaxes(g, -1, -2), spec)


@dataclasses.dataclass(frozen=True)
class LeafPlan:
  """How one projected leaf is handled (static)."""

  index: int  # position among the projected leaves, for staggering
  layout: MatrixLayout
  rank: int
  path: str  # the leaf's key path (``keystr``), for error messages
  name: str  # ``path_name`` of the key path: the leaf's key in the state


def resolve_rank(rank: Union[int, float], m: int, n: int) -> int:
  """``rank`` as an int: a float in (0, 1] is a fraction of ``min(m, n)``."""
  if isinstance(rank, float):
    return max(1, int(round(rank * min(m, n))))
  return int(rank)


def resolve_per_leaf(spec_or_fn, tree, is_spec_leaf):
  """A per-leaf option given once, as a tree, or as a function of ``tree``."""
  if callable(spec_or_fn) and not is_dimension_numbers(spec_or_fn):
    spec_or_fn = spec_or_fn(tree)
  treedef = jax.tree.structure(tree)
  if is_spec_leaf(spec_or_fn):
    return [spec_or_fn] * treedef.num_leaves
  try:
    return treedef.flatten_up_to(spec_or_fn)
  except (ValueError, TypeError) as e:
    raise ValueError(
        "A per-leaf option (`mask` or `dimension_numbers`) must be a single "
        "value, a pytree with the parameters' structure, or a function of the "
        f"parameters returning one; got a mismatched tree: {e}"
    ) from None


def plan_leaves(
    params,
    *,
    rank: Union[int, float],
    mask: MaskOrFn = None,
    dimension_numbers: DimensionNumbersOrFn = None,
    warn: bool = False,
) -> tuple[list[Optional[LeafPlan]], Any]:
  """Decides, for each leaf of ``params``, whether and how it is projected.

  A leaf is projected when ``mask`` selects it (all leaves if ``mask`` is
  None), it has dimension numbers (2-D leaves default to
  ``DimensionNumbers(0, 1)``; 0-D and 1-D leaves are never projected) and its
  smaller matrix side exceeds the rank. A selected leaf of more than two axes
  without dimension numbers is left at full size, never reshaped by
  guesswork (as ``optax.contrib.galore`` does); with ``warn``, one warning
  lists such leaves.

  Args:
    params: A pytree of arrays or ``jax.ShapeDtypeStruct`` (only shapes read).
    rank: Int rank, or a float fraction of each leaf's smaller side.
    mask: ``None``, a bool, a pytree of bools like ``params``, or a function
      of ``params`` returning one.
    dimension_numbers: ``None``, one ``DimensionNumbers`` (or optax's
      GaLore/Muon spec) for all selected leaves, a pytree of them (``None``
      leaves skip), or a function of ``params`` returning one.
    warn: Warn once about selected leaves of more than two axes left
      unprojected for want of dimension numbers.

  Returns:
    A list with a ``LeafPlan`` or ``None`` per leaf, and the tree definition.
  """
  leaves_with_path, treedef = jax.tree.flatten_with_path(params)
  masks = resolve_per_leaf(
      True if mask is None else mask, params, lambda x: isinstance(x, bool)
  )
  dims_list = resolve_per_leaf(
      dimension_numbers,
      params,
      lambda x: x is None or is_dimension_numbers(x),
  )
  plans: list[Optional[LeafPlan]] = []
  unshaped = []
  count = 0
  for (path, leaf), selected, dims in zip(leaves_with_path, masks, dims_list):
    shape = tuple(leaf.shape)
    where = jax.tree_util.keystr(path) or "<root>"
    dims = as_dimension_numbers(dims)
    if not selected or len(shape) < 2:
      plans.append(None)
      continue
    if dims is None:
      if len(shape) > 2:
        unshaped.append(f"{where} {shape}")
        plans.append(None)
        continue
      dims = DimensionNumbers(0, 1)
    layout = MatrixLayout.from_dimension_numbers(shape, dims, where)
    r = resolve_rank(rank, layout.m, layout.n)
    if min(layout.m, layout.n) <= r:
      plans.append(None)
      continue
    plans.append(LeafPlan(count, layout, r, where, path_name(path) or "."))
    count += 1
  if warn and unshaped:
    warnings.warn(
        f"{len(unshaped)} leaves of more than 2 axes are not projected (no "
        f"dimension numbers): {', '.join(unshaped)}. Give `dimension_numbers` "
        "for them (axes they do not name become batch axes) to project them, "
        "or exclude them with the projection mask to silence this.",
        stacklevel=3)
  return plans, treedef
