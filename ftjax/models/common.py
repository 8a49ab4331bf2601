"""What every family's top-level module does around its layers: soft prompts, attention masks,
prefixes and the sequence-classification head.

The functions run inside a module's `@nn.compact` method (passed as `module`), so the submodules
they and the PEFT hooks create (the soft prompt, the prefix, the score head) land in that
module's scope under fixed names: `prompt`, `prefix`, `score`.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ftjax.models import layers

logger = logging.getLogger(__name__)


DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}


def compute_dtype(name: str):
  """`precision.compute` as a dtype: auto is fp32 on CPUs (no bf16 speed there), else bf16."""
  if name == "auto":
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  return DTYPES[name]


def attention_impl(choice: str, dtype: Any, packing: bool,
                   softcap: Optional[float] = None) -> str:
  """`model.attention` resolved: auto picks cuDNN's flash attention on GPUs in half precision
  when rows hold one example each (no packing), else XLA's. cuDNN's kernel cannot soft-cap
  attention scores (`softcap`: Gemma 2), so such a model runs XLA's, and the run says so once."""
  if choice == "auto":
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    choice = "cudnn" if jax.default_backend() == "gpu" and half and not packing else "xla"
  if choice == "cudnn" and softcap:
    _say_once(f"model.attention: cuDNN's flash attention cannot soft-cap attention scores "
              f"(this model caps them at {softcap}); XLA's attention runs instead")
    return "xla"
  return choice


@functools.cache
def _say_once(message: str) -> None:
  logger.warning(message)


def soft_prompt(module, h_BxLxD: jax.Array, positions_BxL: jax.Array,
                segment_ids_BxL: jax.Array, spec, dtype: Any, virtual_tokens: bool = True):
  """Shifts real positions past the virtual tokens and, under prompt tuning, prepends the soft
  tokens (only in training and in a generation's prefill: `virtual_tokens`).

  Returns (h, positions, segment_ids, number of soft tokens prepended).
  """
  positions_BxL = positions_BxL + spec.virtual_tokens  # real tokens follow the virtual ones
  soft = spec.prompt_len if virtual_tokens else 0
  if soft:
    b, d = h_BxLxD.shape[0], h_BxLxD.shape[-1]
    prompt = spec.prompt(module, d).astype(dtype)
    h_BxLxD = jnp.concatenate([jnp.broadcast_to(prompt[None], (b, *prompt.shape)), h_BxLxD], 1)
    row_seg = jnp.max(segment_ids_BxL, axis=1, keepdims=True)  # unpacked rows: 1 (0 if empty)
    segment_ids_BxL = jnp.concatenate([jnp.broadcast_to(row_seg, (b, soft)), segment_ids_BxL], 1)
    positions_BxL = jnp.concatenate(
        [jnp.broadcast_to(jnp.arange(soft), (b, soft)), positions_BxL], axis=1)
  return h_BxLxD, positions_BxL, segment_ids_BxL, soft


def masks_and_prefixes(module, positions_BxL: jax.Array, segment_ids_BxL: jax.Array,
                       cache: Optional[dict], spec, cfg, dtype: Any, causal: bool = True,
                       attention: str = "xla"):
  """Attention masks per distinct sliding window, and prefix-tuning keys/values per layer.

  With `attention` "cudnn" (rows of one right-padded example each: unpacked batches), a
  training or eval pass without prefixes or sliding windows gets `layers.FusedMask`s, which
  run cuDNN's flash attention.

  Returns ({window: mask}, prefixes (layers, 2, m, kv_heads, head_dim) or None, the cache
  write index or None, the keys' segment ids).
  """
  l = segment_ids_BxL.shape[1]
  if cache is None:
    q_index = k_index = jnp.arange(l)
    k_seg, index = segment_ids_BxL, None
  else:  # keys are the whole cache buffer; this call's tokens are written at `index`
    index = cache["index"]
    q_index = index + jnp.arange(l)
    k_seg = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids_BxL, (0, index))
    k_index = jnp.arange(k_seg.shape[1])
  windows = set(getattr(cfg, "sliding_windows", None) or (None,))
  masks = {w: layers.attention_mask(q_index, k_index, segment_ids_BxL, k_seg, w, causal)
           for w in windows}
  prefixes = None
  if spec.prefix_len:
    prefixes = spec.prefix(module, cfg, dtype)
    # Prefix slots are cache positions 0..m-1 before the real tokens, as HF holds them: every
    # real query sees them, except where a sliding window has moved past (counted from the
    # query's position in its own example when packed; from its buffer index when decoding).
    m = spec.prefix_len
    q_at = q_index + m if cache is not None else positions_BxL
    masks = {w: jnp.concatenate([layers.attention_mask(
        q_at, jnp.arange(m), segment_ids_BxL > 0, jnp.ones((1, m), bool), w), mask], -1)
             for w, mask in masks.items()}
  elif attention == "cudnn" and cache is None and windows == {None}:
    lengths = jnp.sum(segment_ids_BxL > 0, axis=1).astype(jnp.int32)
    masks = {None: layers.FusedMask(masks[None], lengths, causal)}
  return masks, prefixes, index, k_seg


def score(h_BxLxD: jax.Array, segment_ids_BxL: jax.Array, num_labels: int, dtype: Any
          ) -> jax.Array:
  """A decoder's classification head: a bias-free `score` projection of each row's last
  non-padding token (HF's *ForSequenceClassification), in fp32."""
  pooled = layers.last_token(h_BxLxD, segment_ids_BxL)
  logits = layers.Dense(num_labels, ("embed", None), False, dtype, name="score")(pooled)
  return logits.astype(jnp.float32)


class NewTokens(nn.Module):
  """The rows of tokens added to the vocabulary, trained apart from a frozen table (PEFT's
  TrainableTokens): `embedding` (k, hidden) replaces the table's rows in the lookup, `lm_head`
  (k, hidden) an untied head's columns in the logits (a tied head uses `embedding`)."""

  count: int
  features: int
  leaves: tuple

  @nn.compact
  def __call__(self) -> dict:
    init = nn.with_logical_partitioning(nn.initializers.zeros, (None, "embed"))
    return {name: self.param(name, init, (self.count, self.features), jnp.float32)
            for name in self.leaves}


def new_token_rows(module, spec, features: int) -> Optional[dict]:
  """The new tokens' own rows ({leaf: (k, hidden)}), created in `module`'s scope as
  `new_tokens/...`, or None when no table trains them apart."""
  if not spec.new_token_leaves:
    return None
  return NewTokens(len(spec.new_tokens), features, tuple(spec.new_token_leaves),
                   name="new_tokens")()


def embed_new_tokens(h_BxLxD: jax.Array, tokens_BxL: jax.Array, rows: Optional[dict],
                     spec) -> jax.Array:
  """Token embeddings with the new tokens' trained rows in place of the frozen table's."""
  if not rows or "embedding" not in rows:
    return h_BxLxD
  hit_BxLxK = tokens_BxL[..., None] == jnp.asarray(spec.new_tokens, tokens_BxL.dtype)
  new_BxLxD = jnp.take(rows["embedding"], jnp.argmax(hit_BxLxK, axis=-1), axis=0)
  return jnp.where(jnp.any(hit_BxLxK, axis=-1)[..., None], new_BxLxD.astype(h_BxLxD.dtype),
                   h_BxLxD)


def head_rows(rows: Optional[dict], tied: bool) -> Optional[jax.Array]:
  """The (k, hidden) rows that replace the output head's columns of the new tokens, or None."""
  if not rows:
    return None
  return rows.get("embedding" if tied else "lm_head")


def new_token_logits(h_BxLxD: jax.Array, logits_BxLxV: jax.Array, rows: Optional[jax.Array],
                     spec, dtype: Any) -> jax.Array:
  """The logits with the new tokens' columns computed from their own rows (k columns: the
  frozen head's columns at those ids are overwritten, never trained)."""
  if rows is None:
    return logits_BxLxV
  new = jnp.dot(h_BxLxD.astype(dtype), rows.astype(dtype).T)
  return logits_BxLxV.at[..., jnp.asarray(spec.new_tokens)].set(new.astype(logits_BxLxV.dtype))
