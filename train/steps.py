"""The model side of training: train state, loss, the train and eval steps.

The train state is a plain dict `{"step", "params", "opt_state"}` of arrays (plus
`"health"`, the counters of a `train.faults.Guard`, when the step has one, and
`"velora"`, the model's VeLoRA buffers, when its config selects VeLoRA layers), so Orbax
saves it as-is and the optimizer sees the pure-dict parameter tree (the tree that
`models.lowrank_spec` describes).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from models import sharding as shd
from models.config import LlamaConfig
from models.llama import Llama
from models.lowrank import pure_dict
from models.velora import VeLoRAState
from train.faults import Guard

State = dict[str, Any]


def abstract_model(cfg: LlamaConfig):
  """(graphdef, abstract nnx.State) of the model; nothing is allocated."""
  return nnx.split(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-token cross-entropy in float32; written without a gather so a vocab-sharded
  logits array needs no resharding (log-sum-exp minus the label's logit)."""
  logits = logits.astype(jnp.float32)
  picked = jnp.sum(jnp.where(labels[..., None] == jnp.arange(logits.shape[-1]), logits,
                             0.0), axis=-1)
  return jax.nn.logsumexp(logits, axis=-1) - picked


def make_loss_fn(graphdef) -> Callable[[Any, jax.Array], jax.Array]:
  """loss(params, tokens (b, T+1)) → mean next-token cross-entropy."""
  def loss_fn(params, tokens):
    return _mean_loss(nnx.merge(graphdef, params), tokens)
  return loss_fn


def _mean_loss(model, tokens):
  return jnp.mean(cross_entropy(model(tokens[:, :-1]), tokens[:, 1:]))


def masked_batch(tokens: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
  """A batch for `make_masked_loss_fn`: tokens (..., T+1) and a loss mask (..., T) on the
  predicted tokens (`mask[..., t]` weighs the prediction of `tokens[..., t + 1]`)."""
  return {"tokens": tokens, "mask": mask}


def _masked_loss(model, batch, scale):
  losses = cross_entropy(model(batch["tokens"][:, :-1]), batch["tokens"][:, 1:])
  return scale * jnp.sum(losses * batch["mask"].astype(jnp.float32))


def make_masked_loss_fn(graphdef):
  """loss(params, {"tokens" (b, T+1), "mask" (b, T)}, scale) → scale · Σ mask · CE.

  The cross-entropy of the masked-in predictions only (completion tokens in fine-tuning),
  summed and multiplied by `scale`; the train step passes `scale = k / Σ mask` over the
  whole batch of k micro-batches, so the mean over micro-batches is the mean over every
  masked-in token of the batch, however unevenly they fall in the micro-batches.
  """
  def loss_fn(params, batch, scale):
    return _masked_loss(nnx.merge(graphdef, params), batch, scale)
  return loss_fn


def make_grad_fn(graphdef, scale=None):
  """grad(params, micro, velora) → (loss, grads, velora after the call).

  `micro` is a token array (the mean next-token loss) or, with `scale`, a `masked_batch`
  dict (`make_masked_loss_fn`'s loss). `velora` is the model's VeLoRA buffers (pure
  dict), or None for a model without VeLoRA layers; the first call sets each layer's `v`
  from its batch, later calls keep it.
  """
  def loss_fn(params, micro, velora):
    model = nnx.merge(graphdef, params, *(() if velora is None else (velora,)))
    if scale is None:
      loss = _mean_loss(model, micro)
    else:
      loss = _masked_loss(model, micro, scale)
    return loss, None if velora is None else pure_dict(nnx.state(model, VeLoRAState))

  value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)

  def grad(params, micro, velora):
    (loss, velora), grads = value_and_grad(params, micro, velora)
    return loss, grads, velora
  return grad


def _grad_fn(graphdef, batch):
  """(`make_grad_fn` for one micro-batch, k) for `batch` (k micro-batches): the mean loss
  of a token array, the masked loss of a `masked_batch` dict."""
  k = jax.tree.leaves(batch)[0].shape[0]
  if not isinstance(batch, dict):
    return make_grad_fn(graphdef), k
  scale = k / jnp.maximum(jnp.sum(batch["mask"].astype(jnp.float32)), 1.0)
  return make_grad_fn(graphdef, scale), k


def place(x: jax.Array, spec: P) -> jax.Array:
  """`x` laid out as `spec` over the current mesh: `reshard` where the mesh's axes are
  Explicit, a sharding constraint (the compiler's choice elsewhere) where they are Auto."""
  if shd.is_explicit(jax.sharding.get_abstract_mesh()):
    return jax.sharding.reshard(x, spec)
  return jax.lax.with_sharding_constraint(x, spec)


def make_init_fn(cfg: LlamaConfig, tx: optax.GradientTransformation, param_specs=None, *,
                 store: Callable[[Any], Any] | None = None, guard: Guard | None = None):
  """init(key) → train state; params are resharded to their specs where they are born.
  `store` (e.g. `weight_quant.Int8Weights.store`) maps the float params to the stored
  ones after the optimizer's init; with a `guard` the state has its `health` entry."""
  from_params = make_state_fn(tx, param_specs, store=store, guard=guard)
  def init(key):
    model = Llama(cfg, rngs=nnx.Rngs(params=key))
    state = from_params(pure_dict(nnx.state(model, nnx.Param)))
    velora = nnx.state(model, VeLoRAState)
    if jax.tree.leaves(velora):
      state["velora"] = pure_dict(velora)
    return state
  return init


def make_state_fn(tx: optax.GradientTransformation, param_specs=None, *,
                  store: Callable[[Any], Any] | None = None, guard: Guard | None = None):
  """state(params) → the train state at step 0 of given (pure-dict) params, e.g. a
  pretrained model's for fine-tuning; `param_specs`, `store`, `guard` as in
  `make_init_fn`."""
  def init(params):
    if param_specs is not None:
      params = jax.tree.map(place, params, param_specs)
    opt_state = tx.init(params)
    if store is not None:
      params = store(params)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt_state}
    if guard is not None:
      state["health"] = guard.init()
    return state
  return init


def _typed_like(tree, like):
  """`tree` with each leaf resharded like the leaf of `like` where, under an Explicit
  mesh, their shardings differ (the branches of a `lax.cond` must have equal types)."""
  if not shd.is_explicit(jax.sharding.get_abstract_mesh()):
    return tree
  def one(x, y):
    spec = jax.typeof(y).sharding.spec
    return x if jax.typeof(x).sharding.spec == spec else jax.sharding.reshard(x, spec)
  return jax.tree.map(one, tree, like)


def _guarded(guard, state, loss, norm, apply):
  """`apply()` → (params, opt_state), run only when `guard` passes the step (else the
  state's own), the new health, and the guard's metrics."""
  if guard is None:
    return (*apply(), None, {})
  ok, health, metrics = guard(state["health"], loss, norm)
  old = (state["params"], state["opt_state"])
  params, opt_state = jax.lax.cond(ok, lambda: _typed_like(apply(), old), lambda: old)
  return params, opt_state, health, metrics


def _new_state(state, params, opt_state, health, velora=None):
  new = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
  if health is not None:
    new["health"] = health
  if velora is not None:
    new["velora"] = velora
  return new


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule=None,
                    guard: Guard | None = None):
  """step(state, batch (k, b/k, T+1)) → (state, metrics).

  The k micro-batches are scanned inside the step (gradient accumulation): gradients and
  losses are summed in float32 and divided by k, which equals one step on the whole batch
  because every micro-batch has the same number of tokens. A `masked_batch` dict of such
  arrays trains on the masked-in tokens only (`make_masked_loss_fn`). With a `guard`
  (`train.faults.Guard`), a step it rejects (a non-finite loss or gradient norm, a spike)
  leaves the parameters and the optimizer state as they were.
  """
  def step(state: State, batch: jax.Array):
    grad_fn, k = _grad_fn(graphdef, batch)
    params = state["params"]
    zeros = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=jnp.float32), params)

    def micro(carry, tokens):
      loss_sum, grad_sum, velora = carry
      loss, grads, velora = grad_fn(params, tokens, velora)
      grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
      return (loss_sum + loss, grad_sum, velora), None

    carry = (jnp.zeros((), jnp.float32), zeros, state.get("velora"))
    (loss, grads, velora), _ = jax.lax.scan(micro, carry, batch)
    loss = loss / k
    grads = jax.tree.map(lambda g, p: (g / k).astype(p.dtype), grads, params)
    norm = optax.tree.norm(grads)

    def apply():
      updates, opt_state = tx.update(grads, state["opt_state"], params)
      return optax.apply_updates(params, updates), opt_state

    new_params, opt_state, health, checks = _guarded(guard, state, loss, norm, apply)
    metrics = {"loss": loss, "grad_norm": norm, **checks}
    if schedule is not None:
      metrics["lr"] = jnp.asarray(schedule(state["step"]), jnp.float32)
    return _new_state(state, new_params, opt_state, health, velora), metrics

  return step


def make_subspace_train_step(graphdef, tx, schedule=None, clip: float = 0.0,
                             guard: Guard | None = None):
  """step(state, batch (k, b/k, T+1)) → (state, metrics), accumulating in the subspace.

  `tx` is an `optax_lowrank.MultiSteps` over k micro-batches: each micro-batch's gradient
  is projected at once (`tx.accumulate`), so the projected leaves never get a full-size
  accumulator; the last micro-batch's `tx.update` runs the optimizer on the means. With
  `clip > 0` each micro-batch's gradient is clipped to that global norm before it is
  accumulated (the mean's full gradient is never formed, so it cannot be clipped as a
  whole); `micro_grad_norm` logs the mean norm of the micro-batch gradients, which is
  also what a `guard` checks (with the loss); a rejected step drops the accumulators.
  A `masked_batch` dict trains on its masked-in tokens, as in `make_train_step`.
  """
  def micro_grads(grad_fn, params, tokens, velora):
    loss, grads, velora = grad_fn(params, tokens, velora)
    norm = optax.tree.norm(grads)
    if clip and clip > 0:
      factor = jnp.minimum(1.0, clip / jnp.maximum(norm, 1e-30))
      grads = jax.tree.map(lambda g: (g * factor).astype(g.dtype), grads)
    return loss, norm, grads, velora

  def step(state: State, batch: jax.Array):
    grad_fn, k = _grad_fn(graphdef, batch)
    params = state["params"]

    def micro(carry, tokens):
      loss_sum, norm_sum, opt_state, velora = carry
      loss, norm, grads, velora = micro_grads(grad_fn, params, tokens, velora)
      opt_state = tx.accumulate(grads, opt_state, params)
      return (loss_sum + loss, norm_sum + norm, opt_state, velora), None

    zero = jnp.zeros((), jnp.float32)
    (loss, norm, opt_state, velora), _ = jax.lax.scan(
        micro, (zero, zero, state["opt_state"], state.get("velora")),
        jax.tree.map(lambda x: x[:-1], batch))
    last_loss, last_norm, grads, velora = micro_grads(
        grad_fn, params, jax.tree.map(lambda x: x[-1], batch), velora)
    loss, norm = (loss + last_loss) / k, (norm + last_norm) / k

    def apply():
      updates, new_opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), new_opt_state

    new_params, new_opt_state, health, checks = _guarded(guard, state, loss, norm, apply)
    metrics = {"loss": loss, "micro_grad_norm": norm, **checks}
    if schedule is not None:
      metrics["lr"] = jnp.asarray(schedule(state["step"]), jnp.float32)
    return _new_state(state, new_params, new_opt_state, health, velora), metrics

  return step


def make_eval_step(graphdef):
  """eval(params, tokens (b, T+1)) → (sum of token losses, token count)."""
  def eval_step(params, tokens):
    model = nnx.merge(graphdef, params)
    losses = cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])
    return jnp.sum(losses), jnp.asarray(losses.size, jnp.float32)
  return eval_step


def make_masked_eval_step(graphdef):
  """eval(params, {"tokens" (b, T+1), "mask" (b, T)}) → (Σ mask · CE, Σ mask), per row:
  each row's summed cross-entropy of its masked-in tokens and their count (a completion's
  negative log-likelihood; a multiple-choice continuation's score)."""
  def eval_step(params, batch):
    model = nnx.merge(graphdef, params)
    tokens, mask = batch["tokens"], batch["mask"].astype(jnp.float32)
    losses = cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])
    return jnp.sum(losses * mask, axis=-1), jnp.sum(mask, axis=-1)
  return eval_step


def state_shardings(cfg: LlamaConfig, tx, mesh, rules=shd.RULES, *, store=None,
                    guard: Guard | None = None):
  """Abstract train state and its NamedShardings (MaxText order: abstract → specs → shardings).

  Parameter specs come from the logical names through `rules`; optimizer-state shardings
  are read off `jax.eval_shape` of `init` on the Explicit mesh, where every state leaf
  that is a function of a parameter inherits that parameter's sharding. The mesh's axes
  may be Explicit or Auto. `store`, `guard`: as in `make_init_fn`.
  """
  _, abstract = abstract_model(cfg)
  specs = pure_dict(shd.param_specs(nnx.state(abstract, nnx.Param), rules, mesh))
  init = make_init_fn(cfg, tx, specs, store=store, guard=guard)
  # Shardings are read off the types of an Explicit twin of the mesh (same devices and
  # axes); under an Auto mesh the same specs are then imposed on the jitted functions.
  with shd.set_mesh(shd.as_explicit(mesh)):
    abstract_state = jax.eval_shape(init, jax.random.key(0))

  def sharding_of(leaf):
    s = getattr(leaf, "sharding", None)
    if isinstance(s, NamedSharding):
      return NamedSharding(mesh, s.spec)
    return NamedSharding(mesh, P())

  shardings = jax.tree.map(sharding_of, abstract_state)
  abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state,
      shardings)
  return init, abstract_state, shardings, specs


def batch_sharding(mesh, rules=shd.RULES, *, micro_batched: bool = True) -> NamedSharding:
  """Token batches (micro-batches, batch, length), or (batch, length) when not
  `micro_batched`: the batch axis over the `activation_batch` mesh axes."""
  names = (None, "activation_batch") if micro_batched else ("activation_batch",)
  spec = shd.logical_to_mesh(names, rules, mesh)
  return NamedSharding(mesh, spec)
