"""The pure train and eval steps, and the causal-LM loss.

`train_step(state, frozen, batch) -> (state, metrics)` differentiates only the trainable
parameters in `state.params`; `frozen` holds the rest. A batch arrives as (micro-batches, rows,
length) arrays; gradients are summed over micro-batches with `lax.scan` and divided by the number
of trained tokens of the whole batch, so k micro-batches of b rows equal one batch of k*b rows.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from ftjax import tree


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict  # the trainable parameters (fp32 master copy)
  opt_state: Any
  rng: jax.Array  # dropout key of the run; each step and micro-batch folds in its index


def token_losses(logits_BxLxV: jax.Array, batch: dict) -> tuple[jax.Array, jax.Array]:
  """Per-position next-token loss (fp32), target weights, and weighted correct predictions.

  Position t predicts token t+1 when t+1 is a target of the same segment, so a packed example's
  first token is never trained on its neighbour's last.
  """
  targets = batch["tokens"][:, 1:]
  weights = (batch["loss_mask"][:, 1:] *
             (batch["segment_ids"][:, 1:] == batch["segment_ids"][:, :-1])).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits_BxLxV[:, :-1].astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  correct = (jnp.argmax(logits_BxLxV[:, :-1], axis=-1) == targets).astype(jnp.float32)
  return nll * weights, weights, correct * weights


ApplyFn = Callable[..., jax.Array]  # (params, batch, dropout rng or None) -> logits


def _loss_sum(params: dict, frozen: dict, batch: dict, rng: jax.Array, apply_fn: ApplyFn):
  nll, weights, _ = token_losses(apply_fn(tree.merge(params, frozen), batch, rng), batch)
  return nll.sum(), weights.sum()


def train_step(state: TrainState, frozen: dict, batch: dict, *, apply_fn: ApplyFn,
               tx: optax.GradientTransformation) -> tuple[TrainState, dict]:
  """One optimizer step over a batch of shape (micro-batches, rows, length)."""
  grad_fn = jax.value_and_grad(_loss_sum, has_aux=True)

  step_rng = jax.random.fold_in(state.rng, state.step)

  def micro(carry, inputs):
    grads, loss, count = carry
    i, mb = inputs
    (l, n), g = grad_fn(state.params, frozen, mb, jax.random.fold_in(step_rng, i), apply_fn)
    return (jax.tree.map(jnp.add, grads, g), loss + l, count + n), None

  zeros = jax.tree.map(jnp.zeros_like, state.params)
  accum = jax.tree.leaves(batch)[0].shape[0]
  (grads, loss_sum, count), _ = jax.lax.scan(micro, (zeros, 0.0, 0.0),
                                             (jnp.arange(accum), batch))
  denom = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g: g / denom, grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss_sum / denom, "grad_norm": optax.tree.norm(grads),
             "update_norm": optax.tree.norm(updates), "tokens": count}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: dict, frozen: dict, batch: dict, *, apply_fn: ApplyFn) -> dict:
  """Summed loss, trained-token count and correct next-token predictions of one batch."""
  nll, weights, correct = token_losses(apply_fn(tree.merge(params, frozen), batch, None), batch)
  return {"loss_sum": nll.sum(), "tokens": weights.sum(), "correct": correct.sum()}
