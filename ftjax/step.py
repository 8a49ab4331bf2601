"""The pure train and eval steps, and the losses (causal LM and sequence classification).

`train_step(state, frozen, batch) -> (state, metrics)` differentiates only the trainable
parameters in `state.params`; `frozen` holds the rest. A batch arrives as (micro-batches, rows,
length) arrays; gradients are summed over micro-batches with `lax.scan` and divided by the number
of trained tokens of the whole batch, so k micro-batches of b rows equal one batch of k*b rows.
"""

from __future__ import annotations

import dataclasses
import functools
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


def logits_fn(module) -> ApplyFn:
  """The `ApplyFn` of a model module: its logits for a batch, with dropout only when a rng is
  given (training)."""
  def apply(params, batch, rng=None):
    rngs = {"dropout": rng} if rng is not None else None
    logits, _ = module.apply({"params": params}, batch["tokens"], batch["positions"],
                             batch["segment_ids"], rngs=rngs)
    return logits
  return apply


@dataclasses.dataclass(frozen=True)
class ChunkedLoss:
  """The causal-LM loss computed `chunk` tokens at a time, never holding the whole batch's
  logits: each chunk's logits are recomputed in the backward pass."""

  hidden_fn: Callable  # (params, batch, dropout rng or None) -> (hidden BxLxD, kernel DxV)
  chunk: int
  dtype: Any = jnp.float32  # the compute dtype of the head matmul
  kernel_grad: bool = True  # False when the output head is frozen (its gradient is skipped)


def chunked_loss(module, dtype: Any, trainable: set, chunk: int = 0) -> Optional[ChunkedLoss]:
  """The chunked causal-LM loss for `module`, or None where the model does not allow it (a
  classifier, a LoRA-wrapped output head). `chunk` 0: about 64 MB of fp32 logits per chunk on
  CPUs, 512 MB on accelerators (measured: smaller chunks leave an H100 idle between matmuls)."""
  if module.num_labels or not hasattr(module, "output_head") or module.peft.lora_at(("lm_head",)):
    return None
  budget = 2**26 if jax.default_backend() == "cpu" else 2**29
  chunk = chunk or max(64, budget // (4 * module.cfg.vocab_size) // 8 * 8)
  path, transposed = module.output_head

  def hidden_fn(params, batch, rng=None):
    rngs = {"dropout": rng} if rng is not None else None
    h, _ = module.apply({"params": params}, batch["tokens"], batch["positions"],
                        batch["segment_ids"], rngs=rngs, return_hidden=True)
    kernel = tree.flatten(params)[path]
    return h, kernel.T if transposed else kernel
  return ChunkedLoss(hidden_fn, chunk, dtype, kernel_grad=path in trainable)


def chunked_token_losses(h_BxLxD: jax.Array, kernel_DxV: jax.Array, batch: dict, chunk: int,
                         dtype: Any = jnp.float32, kernel_grad: bool = True
                         ) -> tuple[jax.Array, jax.Array]:
  """The summed next-token loss and the trained-token count of `token_losses`, from the final
  hidden states and the output head, `chunk` positions at a time: one chunk's fp32 logits exist
  at a time, never the batch's (see `_chunked_nll`)."""
  d = h_BxLxD.shape[-1]
  targets = batch["tokens"][:, 1:].reshape(-1)
  weights = (batch["loss_mask"][:, 1:] *
             (batch["segment_ids"][:, 1:] == batch["segment_ids"][:, :-1])).astype(jnp.float32)
  weights = weights.reshape(-1)
  h = h_BxLxD[:, :-1].reshape(-1, d)
  pad = -h.shape[0] % chunk
  h, targets, weights = (jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
                         for x in (h, targets, weights))
  return (_chunked_nll(h, kernel_DxV, targets, weights, chunk, jnp.dtype(dtype), kernel_grad),
          weights.sum())


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _chunked_nll(h_NxD, kernel_DxV, targets_N, weights_N, chunk, dtype, kernel_grad=True):
  return _chunked_nll_fwd(h_NxD, kernel_DxV, targets_N, weights_N, chunk, dtype, kernel_grad)[0]


def _chunked_nll_fwd(h_NxD, kernel_DxV, targets_N, weights_N, chunk, dtype, kernel_grad=True):
  """Loss and both gradients in one pass over the chunks: each chunk's softmax gives its logit
  gradient at once, so the backward pass only scales what the forward pass accumulated (no
  logits are recomputed or kept). Without `kernel_grad` (a frozen head) the head's gradient is
  not computed (it comes back as zeros)."""
  n, d = h_NxD.shape
  kernel = kernel_DxV.astype(dtype)

  def piece(dk, xs):
    h_c, t_c, w_c = xs
    logits = jnp.dot(h_c.astype(dtype), kernel).astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    nll = lse - jnp.take_along_axis(logits, t_c[:, None], axis=-1)[:, 0]
    probs = jnp.exp(logits - lse[:, None])
    dlogits = (probs - jax.nn.one_hot(t_c, logits.shape[-1], dtype=jnp.float32)) * w_c[:, None]
    dlogits = dlogits.astype(dtype)
    dh = jnp.dot(dlogits, kernel.T, preferred_element_type=jnp.float32)
    if kernel_grad:
      dk = dk + jnp.dot(h_c.astype(dtype).T, dlogits, preferred_element_type=jnp.float32)
    return dk, (jnp.sum(nll * w_c), dh)

  dk = jnp.zeros((d, kernel.shape[-1]) if kernel_grad else (), jnp.float32)
  dk, (sums, dh) = jax.lax.scan(
      piece, dk,
      (h_NxD.reshape(-1, chunk, d), targets_N.reshape(-1, chunk), weights_N.reshape(-1, chunk)))
  dk = dk.astype(kernel_DxV.dtype) if kernel_grad else jnp.zeros((), kernel_DxV.dtype)
  return jnp.sum(sums), (dh.reshape(n, d).astype(h_NxD.dtype), dk)


def _chunked_nll_bwd(chunk, dtype, kernel_grad, residuals, g):
  del chunk, dtype
  dh, dk = residuals
  dk = (g * dk).astype(dk.dtype) if kernel_grad else None  # None: a zero cotangent
  return (g * dh).astype(dh.dtype), dk, None, None


_chunked_nll.defvjp(_chunked_nll_fwd, _chunked_nll_bwd)


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



def _scaled_loss_sum(params, frozen, batch, rng, scale, apply_fn, distill=None, teacher=None,
                     chunked=None):
  if chunked is not None and distill is None:
    h, kernel = chunked.hidden_fn(tree.merge(params, frozen), batch, rng)
    nll_sum, count = chunked_token_losses(h, kernel, batch, chunked.chunk, chunked.dtype,
                                          chunked.kernel_grad)
    return nll_sum * scale, (nll_sum, count, 0.0)
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
               teacher: Optional[dict] = None, chunked: Optional[ChunkedLoss] = None
               ) -> tuple[dict, jax.Array, jax.Array, jax.Array]:
  """Gradients of `scale` x the summed token loss over micro-batches (a `lax.scan` over the
  leading axis of `batch`), the summed loss, the number of trained tokens, and the summed
  distillation KL (0 without a teacher)."""
  grad_fn = jax.grad(_scaled_loss_sum, has_aux=True)

  def micro(carry, inputs):
    grads, loss, count, kl = carry
    i, mb = inputs
    g, (l, n, k) = grad_fn(params, frozen, mb, jax.random.fold_in(rng, i), scale, apply_fn,
                           distill, teacher, chunked)
    return (jax.tree.map(jnp.add, grads, g), loss + l, count + n, kl + k), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  accum = jax.tree.leaves(batch)[0].shape[0]
  (grads, loss_sum, count, kl), _ = jax.lax.scan(micro, (zeros, 0.0, 0.0, 0.0),
                                                 (jnp.arange(accum), batch))
  return grads, loss_sum, count, kl


def train_step(state: TrainState, frozen: dict, batch: dict, teacher: Optional[dict] = None, *,
               apply_fn: ApplyFn, tx: optax.GradientTransformation, dynamic_scale: bool = False,
               scale_period: int = 1000, distill: Optional[Distill] = None,
               chunked: Optional[ChunkedLoss] = None) -> tuple[TrainState, dict]:
  """One optimizer step over a batch of shape (micro-batches, rows, length).

  Gradients are divided by the trained tokens of the whole batch (and the loss scale). A step
  whose gradients are not finite changes neither the parameters nor the optimizer state; it is
  counted, and under fp16 (`dynamic_scale`) halves the loss scale, which doubles again after
  `scale_period` finite steps.
  """
  step_rng = jax.random.fold_in(state.rng, state.step)
  grads, loss_sum, count, kl = accumulate(state.params, frozen, batch, step_rng, apply_fn,
                                          state.loss_scale, distill, teacher, chunked)
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
