"""The losses a train step can be given, and the contract they follow.

A loss function is `loss_fn(params, batch, rng, context) -> (summed loss, aux)`:

- `params` is the whole parameter tree (trainable and frozen merged; only the trainable part is
  differentiated), `batch` one micro-batch, `rng` the dropout key (None outside training) and
  `context` whatever the step was given beside the batch (a teacher's parameters, or None);
- the loss is a *sum* over the micro-batch's trained tokens (or rows), and `aux["tokens"]` their
  count: the step adds both up over micro-batches and divides by the total, so k micro-batches of
  b rows equal one batch of k*b rows. Other `aux` entries are sums reported per token (`kl`).

A regulariser R(params) that should weigh `lam` in the per-token loss is added as
`lam * R(params) * aux["tokens"]` (see `regularized`). Everything here is a pure function of
its inputs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from ftjax import tree
from ftjax.models.layers import soft_cap
from ftjax.peft import multi
from ftjax.quant import QuantKernel

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
LossFn = Callable[[dict, dict, Optional[jax.Array], Any], tuple[jax.Array, dict]]


def logits_fn(module) -> ApplyFn:
  """The `ApplyFn` of a model module: its logits for a batch, with dropout only when a rng is
  given (training)."""
  def apply(params, batch, rng=None):
    rngs = {"dropout": rng} if rng is not None else None
    with multi.rows(batch.get("adapter")):  # each row's adapter, under peft.adapters
      logits, _ = module.apply({"params": params}, batch["tokens"], batch["positions"],
                               batch["segment_ids"], rngs=rngs)
    return logits
  return apply


@dataclasses.dataclass(frozen=True)
class ChunkedLoss:
  """The causal-LM loss computed `chunk` tokens at a time, never holding the whole batch's
  logits: each chunk's softmax gives its logit gradient at once (see `_chunked_nll_fwd`)."""

  hidden_fn: Callable  # (params, batch, dropout rng or None) -> (hidden BxLxD, kernel DxV)
  chunk: int
  dtype: Any = jnp.float32  # the compute dtype of the head matmul
  kernel_grad: bool = True  # False when the output head is frozen (its gradient is skipped)
  columns: tuple = ()  # a frozen head's columns whose gradient is still needed (new tokens)
  softcap: Optional[float] = None  # the model's final-logit soft-cap (Gemma)


def chunked_loss(module, dtype: Any, trainable: set, chunk: int = 0) -> Optional[ChunkedLoss]:
  """The chunked causal-LM loss for `module`, or None where the model does not allow it (a
  classifier, an output head a PEFT method wraps). `chunk` 0: about 64 MB of fp32 logits per
  chunk on CPUs, 512 MB on accelerators (measured: smaller chunks leave an H100 idle between
  matmuls)."""
  if module.num_labels or not hasattr(module, "output_head"):
    return None
  path, transposed = module.output_head
  if module.peft.wraps(path.rsplit("/", 1)[0]):
    return None
  budget = 2**26 if jax.default_backend() == "cpu" else 2**29
  chunk = chunk or max(64, budget // (4 * module.cfg.vocab_size) // 8 * 8)

  # New tokens' rows trained apart from a frozen head replace its columns at their ids; only
  # those k columns of the head's gradient are then computed (`columns`).
  spec = module.peft
  leaf = "embedding" if transposed else "lm_head"
  leaf = f"new_tokens/{leaf}" if leaf in spec.new_token_leaves else None
  ids = tuple(spec.new_tokens) if leaf else ()

  def hidden_fn(params, batch, rng=None):
    rngs = {"dropout": rng} if rng is not None else None
    with multi.rows(batch.get("adapter")):
      h, _ = module.apply({"params": params}, batch["tokens"], batch["positions"],
                          batch["segment_ids"], rngs=rngs, return_hidden=True)
    flat = tree.flatten(params)
    kernel = flat[path]
    if isinstance(kernel, QuantKernel):  # a frozen quantised head, dequantised whole
      kernel = kernel.value(dtype)
    kernel = kernel.T if transposed else kernel
    if leaf:
      kernel = kernel.at[:, jnp.asarray(ids)].set(flat[leaf].T.astype(kernel.dtype))
    return h, kernel
  return ChunkedLoss(hidden_fn, chunk, dtype, kernel_grad=path in trainable,
                     columns=() if path in trainable else ids,
                     softcap=getattr(module.cfg, "logit_softcap", None))


def chunked_token_losses(h_BxLxD: jax.Array, kernel_DxV: jax.Array, batch: dict, chunk: int,
                         dtype: Any = jnp.float32, kernel_grad: bool = True,
                         columns: tuple = (), softcap: Optional[float] = None
                         ) -> tuple[jax.Array, jax.Array]:
  """The summed next-token loss and the trained-token count of `token_losses`, from the final
  hidden states and the output head, about `chunk` positions at a time: one chunk's fp32 logits
  exist at a time, never the batch's (see `_chunked_nll`).

  Only trained positions cost head work. Each row's trained positions are moved to its front (a
  stable sort on the weights), and the rows are cut into chunks along the sequence, `chunk / B`
  positions of every row per chunk. Chunks past the longest row's trained count hold nothing
  and skip the head matmul and softmax (see `_chunked_nll_fwd`). An answer-only SFT batch
  trains about half its positions, and padding none. The cut keeps the batch axis whole, so a
  batch sharded over rows stays sharded through the head.
  """
  b, l, d = h_BxLxD.shape
  targets = batch["tokens"][:, 1:]
  weights = (batch["loss_mask"][:, 1:] *
             (batch["segment_ids"][:, 1:] == batch["segment_ids"][:, :-1])).astype(jnp.float32)
  order = jnp.argsort(weights == 0, axis=1, stable=True)  # each row's trained positions first
  h = jnp.take_along_axis(h_BxLxD[:, :-1], order[..., None], axis=1)
  targets, weights = (jnp.take_along_axis(x, order, axis=1) for x in (targets, weights))
  per_row = min(max(8, chunk // b // 8 * 8), -(-(l - 1) // 8) * 8)
  pad = -(l - 1) % per_row
  h, targets, weights = (jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
                         for x in (h, targets, weights))
  n = (l - 1 + pad) // per_row  # chunks of B x per_row positions, chunk-major
  h, targets, weights = (jnp.moveaxis(x.reshape(b, n, per_row, *x.shape[2:]), 1, 0)
                         for x in (h, targets, weights))
  return (_chunked_nll(h, kernel_DxV, targets, weights, jnp.dtype(dtype), kernel_grad,
                       tuple(columns), softcap), weights.sum())


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _chunked_nll(h_CxBxPxD, kernel_DxV, targets_CxBxP, weights_CxBxP, dtype, kernel_grad=True,
                 columns=(), softcap=None):
  return _chunked_nll_fwd(h_CxBxPxD, kernel_DxV, targets_CxBxP, weights_CxBxP, dtype,
                          kernel_grad, columns, softcap)[0]


def _chunked_nll_fwd(h_CxBxPxD, kernel_DxV, targets_CxBxP, weights_CxBxP, dtype,
                     kernel_grad=True, columns=(), softcap=None):
  """Loss and both gradients in one pass over the C chunks (each B rows x P positions): each
  chunk's softmax gives its logit gradient at once, so the backward pass only scales what the
  forward pass accumulated (no logits are recomputed or kept). A chunk with no trained position
  is skipped (`lax.cond`: no matmul, no softmax). Without `kernel_grad` (a frozen head) the
  head's gradient is not computed (it comes back as zeros), except for the `columns` asked for
  (new tokens' rows trained apart: k columns, h.T @ their logit gradients). With `softcap` the
  logits are softcap·tanh(h·W / softcap) (Gemma), and the gradient goes through the tanh."""
  d = h_CxBxPxD.shape[-1]
  kernel = kernel_DxV.astype(dtype)
  cols = jnp.asarray(columns, jnp.int32)

  def piece(dk, xs):
    h_c, t_c, w_c = (x.reshape(-1, *x.shape[2:]) for x in xs)  # (B*P, ...)
    logits = soft_cap(jnp.dot(h_c.astype(dtype), kernel).astype(jnp.float32), softcap)
    lse = jax.nn.logsumexp(logits, axis=-1)
    nll = lse - jnp.take_along_axis(logits, t_c[:, None], axis=-1)[:, 0]
    probs = jnp.exp(logits - lse[:, None])
    dlogits = (probs - jax.nn.one_hot(t_c, logits.shape[-1], dtype=jnp.float32)) * w_c[:, None]
    if softcap:  # through cap·tanh(z/cap): 1 - tanh² = 1 - (logits/cap)²
      dlogits = dlogits * (1.0 - jnp.square(logits / softcap))
    dlogits = dlogits.astype(dtype)
    dh = jnp.dot(dlogits, kernel.T, preferred_element_type=jnp.float32)
    if kernel_grad:
      dk = dk + jnp.dot(h_c.astype(dtype).T, dlogits, preferred_element_type=jnp.float32)
    elif columns:
      dk = dk + jnp.dot(h_c.astype(dtype).T, dlogits[:, cols], preferred_element_type=jnp.float32)
    return dk, (jnp.sum(nll * w_c), dh.reshape(xs[0].shape))

  def skip(dk, xs):
    return dk, (jnp.zeros((), jnp.float32), jnp.zeros(xs[0].shape, jnp.float32))

  def body(dk, xs):
    return jax.lax.cond(jnp.any(xs[2] > 0), piece, skip, dk, xs)

  width = kernel.shape[-1] if kernel_grad else len(columns)
  dk = jnp.zeros((d, width) if kernel_grad or columns else (), jnp.float32)
  dk, (sums, dh) = jax.lax.scan(body, dk, (h_CxBxPxD, targets_CxBxP, weights_CxBxP))
  if kernel_grad:
    dk = dk.astype(kernel_DxV.dtype)
  elif columns:  # the k columns in place, zeros elsewhere (the frozen columns' cotangent)
    dk = jnp.zeros(kernel_DxV.shape, kernel_DxV.dtype).at[:, cols].set(dk.astype(kernel_DxV.dtype))
  else:
    dk = jnp.zeros((), kernel_DxV.dtype)
  return jnp.sum(sums), (dh.astype(h_CxBxPxD.dtype), dk)


def _chunked_nll_bwd(dtype, kernel_grad, columns, softcap, residuals, g):
  del dtype, softcap
  dh, dk = residuals
  kernel_grad = kernel_grad or bool(columns)
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


def cross_entropy(apply_fn: ApplyFn) -> LossFn:
  """Next-token cross-entropy of a causal LM (or row cross-entropy of a classifier) from whole
  logits: `token_losses` / `class_losses` summed."""
  def loss_fn(params, batch, rng=None, context=None):
    del context
    nll, weights, _ = losses(apply_fn(params, batch, rng), batch)
    return nll.sum(), {"tokens": weights.sum()}
  return loss_fn


def chunked_cross_entropy(chunked: ChunkedLoss) -> LossFn:
  """`cross_entropy` of a causal LM computed `chunked.chunk` tokens at a time (no whole-batch
  logits; see `ChunkedLoss`)."""
  def loss_fn(params, batch, rng=None, context=None):
    del context
    h, kernel = chunked.hidden_fn(params, batch, rng)
    nll_sum, count = chunked_token_losses(h, kernel, batch, chunked.chunk, chunked.dtype,
                                          chunked.kernel_grad, chunked.columns, chunked.softcap)
    return nll_sum, {"tokens": count}
  return loss_fn


def distillation(apply_fn: ApplyFn, distill: Distill) -> LossFn:
  """alpha * CE + (1 - alpha) * T^2 * KL(teacher || student); the step's `context` holds the
  teacher's parameters. `aux["kl"]` is the summed KL."""
  def loss_fn(params, batch, rng=None, context=None):
    logits = apply_fn(params, batch, rng)
    nll, weights, _ = losses(logits, batch)
    teacher_logits = jax.lax.stop_gradient(distill.teacher_fn(context, batch))
    kl = distill_kl(logits, teacher_logits, weights, distill.temperature).sum()
    return distill.alpha * nll.sum() + (1 - distill.alpha) * kl, {"tokens": weights.sum(),
                                                                   "kl": kl}
  return loss_fn


def regularized(loss_fn: LossFn, penalty: Callable[[dict], jax.Array], weight: float) -> LossFn:
  """`loss_fn` plus `weight * penalty(params)` per trained token: the step's per-token loss then
  gains exactly `weight * penalty(params)`, whatever the batch and accumulation."""
  def regularized_fn(params, batch, rng=None, context=None):
    total, aux = loss_fn(params, batch, rng, context)
    return total + weight * penalty(params) * aux["tokens"], aux
  return regularized_fn
