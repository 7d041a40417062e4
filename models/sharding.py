"""Logical axis names and the rules table that maps them onto mesh axes (MaxText style).

Every weight carries logical names (`nnx.with_partitioning`); activations are annotated
with `activation_*` names. Which mesh axis a name lands on is data: the `RULES` table, or
any table of the same form passed to the functions below. A name mapped to several mesh
axes shards over their product; a mesh axis already used by an earlier dimension, missing
from the mesh, or one that does not divide the dimension is dropped (that dimension is
replicated over it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import contextlib
import math

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

RULES: Rules = (
    # weights
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("norm", None),
    ("layers", None),
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_vocab", "tensor"),
)


def _parse_sizes(text: str, fill: bool) -> dict[str, int]:
  """`data=2,tensor=4` → a size per axis of `MESH_AXES` (1 if not named); `fill`: one
  size may be -1."""
  shape = {name: 1 for name in MESH_AXES}
  for item in filter(None, (s.strip() for s in text.split(","))):
    name, sep, value = item.partition("=")
    if not sep or name.strip() not in MESH_AXES:
      raise ValueError(f"expected NAME=SIZE with NAME in {MESH_AXES}, got {item!r}")
    try:
      shape[name.strip()] = int(value)
    except ValueError:
      raise ValueError(f"expected an integer size, got {item!r}") from None
  fills = [k for k, v in shape.items() if v == -1]
  if len(fills) > fill or any(v == 0 or v < -1 for v in shape.values()):
    raise ValueError(f"sizes must be positive{', with at most one -1' if fill else ''}; "
                     f"got {text!r}")
  return shape


def parse_dcn_mesh(text: str) -> dict[str, int]:
  """Parses `data=2`: how many slices (or hosts) each mesh axis spans, over the
  data-center network (MaxText's `dcn_*_parallelism`); unnamed axes are 1."""
  return _parse_sizes(text, fill=False)


def parse_mesh(text: str, num_devices: int) -> dict[str, int]:
  """Parses `data=1,fsdp=-1,tensor=1`; one axis may be -1 (all remaining devices)."""
  shape = _parse_sizes(text, fill=True)
  fill = [k for k, v in shape.items() if v == -1]
  known = 1
  for v in shape.values():
    known *= v if v > 0 else 1
  if fill:
    if num_devices % known:
      raise ValueError(f"{num_devices} devices are not divisible by {known}")
    shape[fill[0]] = num_devices // known
  total = 1
  for v in shape.values():
    total *= v
  if total != num_devices:
    raise ValueError(f"mesh {shape} has {total} devices but {num_devices} are available")
  return shape


def make_mesh(shape: Mapping[str, int], *, explicit: bool = True, devices=None,
              dcn: Mapping[str, int] | None = None) -> jax.sharding.Mesh:
  """A device mesh over `MESH_AXES` (Explicit axes by default, Auto if asked), over all
  devices or the given ones.

  Args:
    shape: Each axis's size (over all devices).
    explicit: Explicit axis types; else Auto.
    devices: The devices (default: all).
    dcn: How many granules (slices, else processes) each axis spans: `shape` divided by
      it is each granule's part, laid out on its fast interconnect (ICI, NVLink) by
      `mesh_utils.create_hybrid_device_mesh`, and the granules are tiled along the DCN
      axes. With a single slice and a single process (or a process count that is not
      the granule count) the mesh is the plain one of `shape`.
  """
  kind = jax.sharding.AxisType.Explicit if explicit else jax.sharding.AxisType.Auto
  types = (kind,) * len(MESH_AXES)
  sizes = tuple(shape.get(name, 1) for name in MESH_AXES)
  dcn_sizes = tuple((dcn or {}).get(name, 1) for name in MESH_AXES)
  every = jax.devices() if devices is None else list(devices)
  granule = granule_attribute(every, math.prod(dcn_sizes))
  if granule is None:
    return jax.make_mesh(sizes, MESH_AXES, axis_types=types, devices=devices)
  return jax.sharding.Mesh(hybrid_devices(sizes, dcn_sizes, every, granule), MESH_AXES,
                           axis_types=types)


def granule_attribute(devices, num_granules: int) -> str | None:
  """What a DCN granule is for `num_granules` (> 1) granules: `slice_index` when the
  devices span several slices (TPU multislice), else `process_index` when there are
  exactly `num_granules` processes (a GPU cluster, one process per host); None (a plain
  mesh) when there is one granule. Raises ValueError when the slices do not match."""
  if num_granules == 1:
    return None
  slices = {getattr(d, "slice_index", 0) for d in devices}
  if len(slices) > 1:
    if len(slices) != num_granules:
      raise ValueError(f"the devices span {len(slices)} slices, but the DCN sizes "
                       f"multiply to {num_granules}")
    return "slice_index"
  if len({d.process_index for d in devices}) == num_granules:
    return "process_index"
  return None


def hybrid_devices(sizes: Sequence[int], dcn_sizes: Sequence[int], devices,
                   granule: str = "slice_index"):
  """The device array of a hybrid mesh: axis sizes `sizes` (over all devices), of which
  each granule (devices sharing `granule`, ordered by it) holds `sizes / dcn_sizes`;
  along every axis the granules are outermost (`mesh_utils.create_hybrid_device_mesh`)."""
  from jax.experimental import mesh_utils
  ici = [s // d for s, d in zip(sizes, dcn_sizes)]
  return mesh_utils.create_hybrid_device_mesh(
      ici, dcn_sizes, devices, process_is_granule=granule == "process_index")


def set_mesh(mesh):
  """Context manager making `mesh` current (jax.set_mesh, or use_mesh on older jax)."""
  if hasattr(jax, "set_mesh"):
    return jax.set_mesh(mesh)
  return jax.sharding.use_mesh(mesh)


def _mesh_sizes(mesh) -> dict[str, int]:
  return dict(zip(mesh.axis_names, mesh.axis_sizes)) if mesh is not None else {}


def logical_to_mesh(names: Sequence[str | None] | None, rules: Rules = RULES, mesh=None,
                    shape: Sequence[int] | None = None) -> P:
  """Maps logical axis names to a PartitionSpec over the mesh's axes."""
  if names is None:
    return P()
  table = dict(rules)
  sizes = _mesh_sizes(mesh)
  used: set[str] = set()
  spec = []
  for dim, name in enumerate(names):
    target = table.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    kept, product = [], 1
    for axis in axes:
      if axis in used or (mesh is not None and axis not in sizes):
        continue
      size = sizes.get(axis, 1)
      if shape is not None and shape[dim] % (product * size):
        continue
      if mesh is not None and size == 1:
        continue  # a size-1 axis shards nothing; leaving it out keeps specs readable
      kept.append(axis)
      product *= size
    used.update(kept)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


def _names_of(spec) -> tuple | None:
  if spec is None:
    return None
  return tuple(spec)


def param_specs(abstract_state, rules: Rules = RULES, mesh=None):
  """PartitionSpecs (mesh axes) for an `nnx.State` of variables with logical names."""
  from flax import nnx  # local: keeps this module importable without flax for tools
  logical = nnx.get_partition_spec(abstract_state)

  def unwrap(x):
    if not isinstance(x, nnx.Variable):
      return x
    return x.get_value() if hasattr(x, "get_value") else x.value

  def one(var, names):
    value, spec_names = unwrap(var), unwrap(names)
    return logical_to_mesh(_names_of(spec_names), rules, mesh, getattr(value, "shape", None))

  is_var = lambda x: isinstance(x, nnx.Variable)
  return jax.tree.map(one, abstract_state, logical, is_leaf=is_var)


def named(mesh, specs):
  """NamedShardings on `mesh` for a tree of PartitionSpecs."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def is_explicit(mesh) -> bool:
  """Whether `mesh` (concrete or abstract) has an Explicit axis."""
  if mesh is None or mesh.empty:
    return False
  return any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)


def as_explicit(mesh: jax.sharding.Mesh) -> jax.sharding.Mesh:
  """`mesh` with every axis Explicit (same devices and names)."""
  kind = jax.sharding.AxisType.Explicit
  return jax.sharding.Mesh(mesh.devices, mesh.axis_names,
                           axis_types=(kind,) * len(mesh.axis_names))


def _explicit_mesh():
  mesh = jax.sharding.get_abstract_mesh()
  return mesh if is_explicit(mesh) else None


def activation_spec(shape: Sequence[int], *names: str | None,
                    rules: Rules = RULES) -> P | None:
  """Mesh spec for an activation of `shape` when tracing under an Explicit mesh, else None.

  Under an Auto mesh (or none) the compiler chooses and None leaves the op's default.
  """
  mesh = _explicit_mesh()
  return None if mesh is None else logical_to_mesh(names, rules, mesh, shape)


def constrain(x, *names: str | None, rules: Rules = RULES):
  """Reshards `x` (Explicit mesh) to its logical activation names; no-op otherwise."""
  spec = activation_spec(x.shape, *names, rules=rules)
  return x if spec is None else jax.sharding.reshard(x, spec)


@contextlib.contextmanager
def no_eager_sharding():
  """Builds variables without placing them (their names are read later, by the rules)."""
  from flax import nnx
  if hasattr(nnx, "use_eager_sharding"):
    with nnx.use_eager_sharding(False):
      yield
  else:
    yield
