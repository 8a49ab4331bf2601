"""The pure train and eval steps.

`train_step(state, frozen, batch, context, *, loss_fn, tx) -> (state, metrics)` differentiates
only the trainable parameters in `state.params`; `frozen` holds the rest. The loss is a
parameter (`loss_fn`, see ftjax.loss), so a new loss or a regulariser needs no new step. A batch
arrives as (micro-batches, rows, length) arrays; gradients are summed over micro-batches with
`lax.scan` and divided by the number of trained tokens of the whole batch, so k micro-batches of
b rows equal one batch of k*b rows.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from ftjax import loss, tree
from ftjax.loss import ApplyFn, LossFn


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict  # the trainable parameters (fp32 master copy)
  opt_state: Any
  rng: jax.Array  # dropout key of the run; each step and micro-batch folds in its index
  loss_scale: jax.Array  # fp16: the dynamic loss scale (1 in other precisions)
  good_steps: jax.Array  # fp16: finite steps since the loss scale last changed
  skipped: jax.Array  # steps whose update was skipped for non-finite gradients, in all
  bad_run: jax.Array  # consecutive skipped steps up to this one


def init_state(params: dict, tx: optax.GradientTransformation, seed: int = 0,
               loss_scale: float = 1.0) -> TrainState:
  """The state of step 0: `params` (the trainable part), `tx`'s state, a dropout key from
  `seed`."""
  zero = lambda: jnp.zeros((), jnp.int32)  # separate buffers: the train step donates each
  return TrainState(step=zero(), params=params, opt_state=tx.init(params),
                    rng=jax.random.PRNGKey(seed), loss_scale=jnp.full((), loss_scale, jnp.float32),
                    good_steps=zero(), skipped=zero(), bad_run=zero())


def accumulate(params: dict, frozen: dict, batch: dict, rng: jax.Array, loss_fn: LossFn,
               scale: jax.Array = 1.0, context: Any = None) -> tuple[dict, jax.Array, dict]:
  """Gradients of `scale` x the summed loss over micro-batches (a `lax.scan` over the leading
  axis of `batch`), the summed loss, and the summed `aux` of `loss_fn` (see ftjax.loss)."""
  def scaled(p, mb, key):
    total, aux = loss_fn(tree.merge(p, frozen), mb, key, context)
    return total * scale, (total, aux)

  grad_fn = jax.grad(scaled, has_aux=True)

  def micro(carry, inputs):
    grads, total = carry
    i, mb = inputs
    g, (t, a) = grad_fn(params, mb, jax.random.fold_in(rng, i))
    return (jax.tree.map(jnp.add, grads, g), total + t), a

  zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32))
  accum = jax.tree.leaves(batch)[0].shape[0]
  (grads, total), auxs = jax.lax.scan(micro, zeros, (jnp.arange(accum), batch))
  return grads, total, jax.tree.map(lambda x: jnp.sum(x, axis=0), auxs)


def train_step(state: TrainState, frozen: dict, batch: dict, context: Any = None, *,
               loss_fn: LossFn, tx: optax.GradientTransformation, dynamic_scale: bool = False,
               scale_period: int = 1000) -> tuple[TrainState, dict]:
  """One optimizer step over a batch of shape (micro-batches, rows, length).

  `loss_fn` (see ftjax.loss) gives each micro-batch's summed loss and trained-token count;
  `context` is passed to it (a teacher's parameters, or None). Gradients are divided by the
  trained tokens of the whole batch (and the loss scale). A step whose gradients are not finite
  changes neither the parameters nor the optimizer state; it is counted, and under fp16
  (`dynamic_scale`) halves the loss scale, which doubles again after `scale_period` finite
  steps.
  """
  step_rng = jax.random.fold_in(state.rng, state.step)
  grads, loss_sum, aux = accumulate(state.params, frozen, batch, step_rng, loss_fn,
                                    state.loss_scale, context)
  count = aux["tokens"]
  denom = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g: g / (denom * state.loss_scale), grads)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(grad_norm)

  # A branch, not a select of new and old values: the select keeps both the optimizer's
  # results and the old buffers alive, a copy of the parameters and of each moment (measured:
  # 190 MB more temporary memory on the dense CPU benchmark model).
  def update(_):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return optax.apply_updates(state.params, updates), opt_state, optax.tree.norm(updates)

  skip = lambda _: (state.params, state.opt_state, jnp.zeros((), jnp.float32))
  params, opt_state, update_norm = jax.lax.cond(finite, update, skip, None)
  loss_scale, good = state.loss_scale, state.good_steps
  if dynamic_scale:
    grow = finite & (good + 1 >= scale_period)
    loss_scale = jnp.where(finite, jnp.where(grow, loss_scale * 2, loss_scale),
                           jnp.maximum(loss_scale / 2, 1.0))
    good = jnp.where(finite & ~grow, good + 1, 0)
  bad = (~finite).astype(jnp.int32)
  new = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                      loss_scale=loss_scale, good_steps=good, skipped=state.skipped + bad,
                      bad_run=(state.bad_run + bad) * bad)
  metrics = {**{k: v / denom for k, v in aux.items() if k != "tokens"},
             "loss": loss_sum / denom, "grad_norm": grad_norm,
             "update_norm": update_norm, "tokens": count,
             "skipped": new.skipped, "bad_run": new.bad_run, "loss_scale": state.loss_scale}
  return new, metrics


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, grad_accum: int = 1,
                    **kwargs) -> Callable:
  """`train_step` jitted for (rows, length) batches, which it splits into `grad_accum`
  micro-batches: `step(state, frozen, batch, context=None) -> (state, metrics)`. The state's
  buffers are donated (reuse the returned state). `kwargs` go to `train_step`."""
  def run(state, frozen, batch, context=None):
    micro = {k: v.reshape(grad_accum, -1, *v.shape[1:]) for k, v in batch.items()}
    return train_step(state, frozen, micro, context, loss_fn=loss_fn, tx=tx, **kwargs)
  return jax.jit(run, donate_argnums=(0,))


def eval_step(params: dict, frozen: dict, batch: dict, *, apply_fn: ApplyFn) -> dict:
  """Summed loss, trained-token (or row) count and correct predictions of one batch; for a
  classifier also each row's predicted label."""
  logits = apply_fn(tree.merge(params, frozen), batch, None)
  nll, weights, correct = loss.losses(logits, batch)
  out = {"loss_sum": nll.sum(), "tokens": weights.sum(), "correct": correct.sum()}
  if logits.ndim == 2:
    out["predicted"] = jnp.argmax(logits, axis=-1)
  return out
