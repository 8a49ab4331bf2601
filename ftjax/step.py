"""The pure train and eval steps, and the losses (causal LM and sequence classification).

`train_step(state, frozen, batch) -> (state, metrics)` differentiates only the trainable
parameters in `state.params`; `frozen` holds the rest. A batch arrives as (micro-batches, rows,
length) arrays; gradients are summed over micro-batches with `lax.scan` and divided by the number
of trained tokens of the whole batch, so k micro-batches of b rows equal one batch of k*b rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

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
  loss_scale: jax.Array  # fp16: the dynamic loss scale (1 in other precisions)
  good_steps: jax.Array  # fp16: finite steps since the loss scale last changed
  skipped: jax.Array  # steps whose update was skipped for non-finite gradients, in all
  bad_run: jax.Array  # consecutive skipped steps up to this one


def init_state(params: dict, tx: optax.GradientTransformation, seed: int,
               loss_scale: float = 1.0) -> TrainState:
  zero = lambda: jnp.zeros((), jnp.int32)  # separate buffers: the train step donates each
  return TrainState(step=zero(), params=params, opt_state=tx.init(params),
                    rng=jax.random.PRNGKey(seed), loss_scale=jnp.full((), loss_scale, jnp.float32),
                    good_steps=zero(), skipped=zero(), bad_run=zero())


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


def class_losses(logits_BxC: jax.Array, batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-row cross-entropy against `labels` (B, 1), row weights (0 for empty rows), and
  weighted correct predictions: the classification counterpart of `token_losses`."""
  labels = batch["labels"][:, 0]
  weights = (labels >= 0).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits_BxC.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, jnp.maximum(labels, 0)[:, None], axis=-1)[:, 0]
  correct = (jnp.argmax(logits_BxC, axis=-1) == labels).astype(jnp.float32)
  return nll * weights, weights, correct * weights


def losses(logits: jax.Array, batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`class_losses` for a classifier's (B, C) logits, else `token_losses`."""
  return class_losses(logits, batch) if logits.ndim == 2 else token_losses(logits, batch)


ApplyFn = Callable[..., jax.Array]  # (params, batch, dropout rng or None) -> logits


@dataclasses.dataclass(frozen=True)
class Distill:
  """Knowledge distillation: loss = alpha * CE + (1 - alpha) * T^2 * KL(teacher || student)."""

  teacher_fn: Callable  # (teacher params, batch) -> logits
  temperature: float
  alpha: float


def distill_kl(student_BxLxV: jax.Array, teacher_BxLxV: jax.Array, weights: jax.Array,
               temperature: float) -> jax.Array:
  """T^2 * KL(teacher || student) of the softened next-token distributions, per position,
  weighted like `token_losses` (so only trained positions count)."""
  t = temperature
  log_s = jax.nn.log_softmax(student_BxLxV[:, :-1].astype(jnp.float32) / t, axis=-1)
  log_t = jax.nn.log_softmax(teacher_BxLxV[:, :-1].astype(jnp.float32) / t, axis=-1)
  kl = jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)
  return t * t * kl * weights


def _scaled_loss_sum(params, frozen, batch, rng, scale, apply_fn, distill=None, teacher=None):
  logits = apply_fn(tree.merge(params, frozen), batch, rng)
  nll, weights, _ = losses(logits, batch)
  if distill is None:
    return nll.sum() * scale, (nll.sum(), weights.sum(), 0.0)
  teacher_logits = jax.lax.stop_gradient(distill.teacher_fn(teacher, batch))
  kl = distill_kl(logits, teacher_logits, weights, distill.temperature).sum()
  loss = distill.alpha * nll.sum() + (1 - distill.alpha) * kl
  return loss * scale, (loss, weights.sum(), kl)


def accumulate(params: dict, frozen: dict, batch: dict, rng: jax.Array, apply_fn: ApplyFn,
               scale: jax.Array = 1.0, distill: Optional[Distill] = None,
               teacher: Optional[dict] = None) -> tuple[dict, jax.Array, jax.Array, jax.Array]:
  """Gradients of `scale` x the summed token loss over micro-batches (a `lax.scan` over the
  leading axis of `batch`), the summed loss, the number of trained tokens, and the summed
  distillation KL (0 without a teacher)."""
  grad_fn = jax.grad(_scaled_loss_sum, has_aux=True)

  def micro(carry, inputs):
    grads, loss, count, kl = carry
    i, mb = inputs
    g, (l, n, k) = grad_fn(params, frozen, mb, jax.random.fold_in(rng, i), scale, apply_fn,
                           distill, teacher)
    return (jax.tree.map(jnp.add, grads, g), loss + l, count + n, kl + k), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  accum = jax.tree.leaves(batch)[0].shape[0]
  (grads, loss_sum, count, kl), _ = jax.lax.scan(micro, (zeros, 0.0, 0.0, 0.0),
                                                 (jnp.arange(accum), batch))
  return grads, loss_sum, count, kl


def train_step(state: TrainState, frozen: dict, batch: dict, teacher: Optional[dict] = None, *,
               apply_fn: ApplyFn, tx: optax.GradientTransformation, dynamic_scale: bool = False,
               scale_period: int = 1000, distill: Optional[Distill] = None
               ) -> tuple[TrainState, dict]:
  """One optimizer step over a batch of shape (micro-batches, rows, length).

  Gradients are divided by the trained tokens of the whole batch (and the loss scale). A step
  whose gradients are not finite changes neither the parameters nor the optimizer state; it is
  counted, and under fp16 (`dynamic_scale`) halves the loss scale, which doubles again after
  `scale_period` finite steps.
  """
  step_rng = jax.random.fold_in(state.rng, state.step)
  grads, loss_sum, count, kl = accumulate(state.params, frozen, batch, step_rng, apply_fn,
                                          state.loss_scale, distill, teacher)
  denom = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g: g / (denom * state.loss_scale), grads)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(grad_norm)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
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
  metrics = {"loss": loss_sum / denom, "kl": kl / denom, "grad_norm": grad_norm,
             "update_norm": jnp.where(finite, optax.tree.norm(updates), 0.0), "tokens": count,
             "skipped": new.skipped, "bad_run": new.bad_run, "loss_scale": state.loss_scale}
  return new, metrics


def eval_step(params: dict, frozen: dict, batch: dict, *, apply_fn: ApplyFn) -> dict:
  """Summed loss, trained-token (or row) count and correct predictions of one batch; for a
  classifier also each row's predicted label."""
  logits = apply_fn(tree.merge(params, frozen), batch, None)
  nll, weights, correct = losses(logits, batch)
  out = {"loss_sum": nll.sum(), "tokens": weights.sum(), "correct": correct.sum()}
  if logits.ndim == 2:
    out["predicted"] = jnp.argmax(logits, axis=-1)
  return out
