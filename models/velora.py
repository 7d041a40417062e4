"""VeLoRA: a dense layer that saves rank-1 sub-token projections of its input for backward.

VeLoRA (Miles et al., 2024, "VeLoRA: Memory Efficient Training using Rank-1 Sub-Token
Projections", https://arxiv.org/abs/2405.17991; code github.com/roymiles/VeLoRA) computes
`y = x W` exactly, but keeps for the backward pass only `z = <x_g, v>` for each group
`x_g` of `D/G` consecutive input features ("sub-token"), `v` a fixed unit vector of length
`D/G` per layer. The backward pass rebuilds `x̂_g = z v` and uses it for the weight
gradient, `dW = scale · x̂ᵀ dy`; the input gradient `dx = dy Wᵀ` needs only `W` and stays
exact. `v` is the normalised mean sub-token of the first batch the layer sees, then frozen
(the authors' `init_type="batch_average_once"`).

The residual saved per token is `G` numbers instead of `D`. That shrinks the train step's
activation memory only where `x` is not kept alive for the backward pass by another
operation (see docs/methods.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from models.sharding import is_explicit


class VeLoRAState(nnx.Variable):
  """A VeLoRA buffer (the fixed vector `v`, or whether it is set): model state that is
  not a parameter, so `nnx.Optimizer(wrt=nnx.Param)` and the trainer's optimizer leave
  it alone; it is saved with the model's state (and the trainer's checkpoints)."""


def _explicit_spec(a: jax.Array) -> P | None:
  """`a`'s PartitionSpec (one entry per axis) when tracing under an Explicit mesh, else
  None."""
  if not is_explicit(jax.sharding.get_abstract_mesh()):
    return None
  spec = jax.typeof(a).sharding.spec
  return P(*spec, *(None,) * (a.ndim - len(spec)))


def sub_tokens(x: jax.Array, groups: int) -> jax.Array:
  """(..., D) → (..., G, D/G): the `groups` consecutive-feature slices of each token."""
  shape = (*x.shape[:-1], groups, x.shape[-1] // groups)
  spec = _explicit_spec(x)
  if spec is None:
    return x.reshape(shape)
  return jnp.reshape(x, shape, out_sharding=P(*spec, None))  # a sharded D: on G


def first_batch_vector(x: jax.Array, groups: int, eps: float = 1e-12) -> jax.Array:
  """The mean sub-token of `x` over every token and group, scaled to unit length.

  As the authors' `batch_average_once` initialisation: `mean(0)` of the (B·T·G, D/G)
  sub-tokens, then `F.normalize` (divide by max(‖·‖, eps)). Computed in float32.
  """
  mean = jnp.mean(sub_tokens(x.astype(jnp.float32), groups), axis=tuple(range(x.ndim)))
  return mean / jnp.maximum(jnp.linalg.norm(mean), eps)


def velora_matmul(x: jax.Array, kernel: jax.Array, v: jax.Array, scale: float,
                  out_sharding=None) -> jax.Array:
  """`x @ kernel` whose backward pass sees only the rank-1 sub-token projections of `x`.

  Args:
    x: (..., D) inputs; D must be divisible by `v`'s length D/G.
    kernel: (D, F) weights, same dtype as `x`.
    v: (D/G,) unit vector; treated as a constant (its cotangent is zero).
    scale: multiplies the weight gradient (the authors' `velora_scale`).
    out_sharding: passed to the forward einsum (as `Dense` does).

  Returns:
    (..., F) `x @ kernel`, exactly. Its VJP returns `dx = dy kernelᵀ` (exact),
    `dkernel = scale · x̂ᵀ dy` with `x̂_g = <x_g, v> v` for every sub-token `x_g`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from models.velora import velora_matmul
    >>> x, w = jnp.ones((2, 3, 8)), jnp.eye(8, 4)
    >>> v = jnp.ones(4) / 2.0  # sub-tokens of ones are exactly rank-1 along v
    >>> dense = jax.grad(lambda w: jnp.sum(x @ w))(w)
    >>> low = jax.grad(lambda w: jnp.sum(velora_matmul(x, w, v, 1.0)))(w)
    >>> bool(jnp.allclose(dense, low))
    True
  """
  sub = v.shape[-1]
  if x.shape[-1] % sub:
    raise ValueError(f"the input width {x.shape[-1]} is not divisible by the sub-token "
                     f"size {sub}")
  groups = x.shape[-1] // sub
  x_spec, kernel_spec = _explicit_spec(x), _explicit_spec(kernel)

  def matmul(x, kernel):
    return jnp.einsum("...D,DF->...F", x, kernel, out_sharding=out_sharding)

  @jax.custom_vjp
  def f(x, kernel, v):
    return matmul(x, kernel)

  def fwd(x, kernel, v):
    z = jnp.einsum("...GS,S->...G", sub_tokens(x, groups), v.astype(x.dtype),
                   preferred_element_type=jnp.float32).astype(x.dtype)
    return matmul(x, kernel), (z, kernel, v)

  def bwd(residuals, dy):
    z, kernel, v = residuals
    dx = jnp.einsum("...F,DF->...D", dy, kernel, out_sharding=x_spec)
    # scale · x̂ᵀ dy without building x̂: row (g, s) of it is v_s · Σ_tokens z_g dy.
    zdy = jnp.einsum("...G,...F->GF", z, dy, preferred_element_type=jnp.float32,
                     out_sharding=None if kernel_spec is None else P(None, kernel_spec[-1]))
    dkernel = scale * zdy[:, None, :] * v.astype(jnp.float32)[None, :, None]
    dkernel = dkernel.reshape(kernel.shape).astype(kernel.dtype)
    if kernel_spec is not None:
      dkernel = jax.sharding.reshard(dkernel, kernel_spec)
    return dx, dkernel, jnp.zeros_like(v)

  f.defvjp(fwd, bwd)
  return f(x, kernel, v)


class Projection(nnx.Module):
  """VeLoRA state of one dense layer: `v` and whether the first batch has set it.

  Args:
    in_features: D, the dense layer's input width.
    groups: G, sub-tokens per token (D/G features each); must divide D.
    scale: multiplies the weight gradient.
    stack: a leading `layers` axis (scanned blocks), one `v` per layer.
  """

  def __init__(self, in_features: int, groups: int, scale: float, *,
               stack: int | None = None):
    if groups <= 0 or in_features % groups:
      raise ValueError(f"VeLoRA `groups` ({groups}) must be a positive divisor of the "
                       f"input width {in_features}")
    lead: Sequence[int] = () if stack is None else (stack,)
    self.vector = VeLoRAState(jnp.zeros((*lead, in_features // groups), jnp.float32))
    self.initialized = VeLoRAState(jnp.zeros(lead, jnp.bool_))
    self.groups, self.scale = groups, scale

  def __call__(self, x: jax.Array, kernel: jax.Array, out_sharding=None) -> jax.Array:
    """`x @ kernel` (VeLoRA backward); the first call sets `v` from `x`, later calls
    keep it (a `where`, so this works under `jit`, `scan` and `checkpoint`)."""
    first = first_batch_vector(jax.lax.stop_gradient(x), self.groups)
    ready = self.initialized[...]
    v = jnp.where(ready, self.vector[...], first)
    self.vector[...] = v
    self.initialized[...] = jnp.ones_like(ready)
    return velora_matmul(x, kernel, v, self.scale, out_sharding)
