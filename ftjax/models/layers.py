"""Building blocks shared by the model families: dense, embedding, norms, RoPE, attention.

Every parameter is created with logical axis names (`embed`, `heads`, `kv_heads`, `mlp`,
`vocab`, `norm`) so one rules table can later map them to a device mesh. Parameters live in
`param_dtype` (fp32 master weights); math runs in `dtype` (the compute dtype); softmax and norms
run in fp32.

Dense layers flatten activations to 2-D (B*L, D) around the matmul: XLA:CPU computes the weight
gradient about twice as fast when only one batch-like dimension must be contracted.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from ftjax.quant import QuantKernel

Dtype = Any
NEG_INF = -1e30  # finite, so that a fully masked row can never produce NaN


def matmul(x_NxI: jax.Array, kernel_IxO: jax.Array | QuantKernel, dtype: Dtype) -> jax.Array:
  """x @ kernel in `dtype`. A quantised kernel (`peft.base_quant`) is dequantised inside a
  checkpoint, so that the backward pass dequantises it again instead of keeping the whole
  dequantised weight alive from the forward pass: only the quantised blocks are ever stored."""
  if not isinstance(kernel_IxO, QuantKernel):
    return jnp.dot(x_NxI.astype(dtype), kernel_IxO.astype(dtype))
  product = lambda x, q: jnp.dot(x, q.value(dtype))
  return jax.checkpoint(product, policy=jax.checkpoint_policies.nothing_saveable)(
      x_NxI.astype(dtype), kernel_IxO)


def dequantized(kernel: jax.Array | QuantKernel, dtype: Dtype = jnp.float32) -> jax.Array:
  """The kernel's values (a quantised kernel dequantised; a plain one as it is)."""
  return kernel.value(dtype) if isinstance(kernel, QuantKernel) else kernel.astype(dtype)


def weight(module: nn.Module, name: str, init: Callable, shape: tuple, dtype: Dtype
           ) -> jax.Array | QuantKernel:
  """`module.param(name, init, shape, dtype)`, or the quantised form (`QuantKernel`) that the
  loader stored there for a frozen base weight (`peft.base_quant`)."""
  if module.has_variable("params", name):
    stored = module.get_variable("params", name)
    if isinstance(stored, QuantKernel):
      if tuple(stored.shape) != tuple(shape):
        raise ValueError(f"{'/'.join(module.path)}/{name}: quantised weight of shape "
                         f"{stored.shape}, the layer needs {shape}")
      return stored
  return module.param(name, init, shape, dtype)


def linear(module: nn.Module, x_NxI: jax.Array, kernel_IxO: jax.Array | QuantKernel,
           bias_O: Optional[jax.Array]) -> jax.Array:
  """x @ kernel (+ bias) in the module's compute dtype: a dense layer without PEFT."""
  y = matmul(x_NxI, kernel_IxO, module.dtype)
  return y if bias_O is None else y + bias_O.astype(module.dtype)


class PeftHooks:
  """The places where a PEFT method may change a model, and what a model does by default.

  A family's modules call these hooks on their `peft` attribute (an instance of a subclass,
  hashable because it is part of the Flax module); each PEFT method (ftjax/peft/) overrides the
  hooks it needs. Submodules and parameters a hook creates land in the calling module's scope.
  """

  method = "none"
  prefix_len = 0  # key/value positions prepended in every attention layer
  prompt_len = 0  # soft tokens prepended to the input embeddings
  new_tokens = ()  # ids of tokens added to the vocabulary (ftjax/vocab.py)
  new_token_leaves = ()  # "embedding" / "lm_head": new rows trained as their own leaves

  @property
  def virtual_tokens(self) -> int:
    """Positions the real tokens are shifted by (prefix or soft-prompt length)."""
    return self.prefix_len + self.prompt_len

  def wraps(self, module_path: str) -> bool:  # pylint: disable=unused-argument
    """Whether the method changes the dense layer at `module_path` ('layers_0/mlp/up_proj')."""
    return False

  def dense(self, module: nn.Module, x_NxI: jax.Array, kernel_IxO: jax.Array,
            bias: Callable[[], Optional[jax.Array]]) -> jax.Array:
    """A dense layer's output (bias included) for its 2-D input. `bias()` creates and returns
    the layer's bias (None without one); a hook calls it after creating its own parameters, so
    that the base layer's parameters keep their order (and so their random initialisation)."""
    return linear(module, x_NxI, kernel_IxO, bias())

  def sublayer(self, module: nn.Module, where: str, h_BxLxD: jax.Array) -> jax.Array:
    """A sublayer's output before the residual add; `where` is 'attn' or 'ffn'."""
    del module, where
    return h_BxLxD

  def prompt(self, module: nn.Module, features: int) -> Optional[jax.Array]:
    """The soft tokens (prompt_len, features) to prepend, or None."""
    del module, features
    return None

  def prefix(self, module: nn.Module, cfg: Any, dtype: Dtype) -> Optional[jax.Array]:
    """Per-layer key/value prefixes (layers, 2, prefix_len, kv_heads, head_dim), or None."""
    del module, cfg, dtype
    return None


NO_PEFT = PeftHooks()


class Dense(nn.Module):
  """y = x @ kernel (+ bias), kernel stored (in, out) with logical axes, or quantised
  (`QuantKernel`, a frozen base kernel under `peft.base_quant`).

  The PEFT method's `dense` hook computes the output (LoRA / DoRA add a branch; see ftjax/peft).
  """

  features: int
  axes: tuple[Optional[str], Optional[str]]
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable = nn.initializers.normal(0.02)
  peft: Any = NO_PEFT

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = weight(self, "kernel", nn.with_logical_partitioning(self.kernel_init, self.axes),
                    (x.shape[-1], self.features), self.param_dtype)
    def bias() -> Optional[jax.Array]:
      if not self.use_bias:
        return None
      return self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                             self.axes[1:]),
                        (self.features,), self.param_dtype)

    x2d = x.reshape(-1, x.shape[-1])
    y = self.peft.dense(self, x2d, kernel, bias)
    return y.reshape(*x.shape[:-1], self.features)


class Embed(nn.Module):
  """Token embedding table (vocab, embed); `attend` gives logits for tied output heads. A
  quantised table (`peft.base_quant_embeddings`) dequantises only the rows it looks up."""

  num_embeddings: int
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.embedding = weight(
        self, "embedding",
        nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
        (self.num_embeddings, self.features), self.param_dtype)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    if isinstance(self.embedding, QuantKernel):
      return self.embedding.matrix(self.dtype, rows=tokens)
    return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)

  def attend(self, h: jax.Array) -> jax.Array:
    table = self.embedding
    table_T = dataclasses.replace(table, transposed=True) if isinstance(table, QuantKernel) \
        else table.T
    y = matmul(h.reshape(-1, h.shape[-1]), table_T, self.dtype)
    return y.reshape(*h.shape[:-1], self.num_embeddings)


class RMSNorm(nn.Module):
  """x / rms(x) * scale, computed in fp32 (as HF's LlamaRMSNorm does); with `unit_offset` the
  stored weight is an offset from 1 (x / rms(x) * (1 + w), initialised to 0: Gemma)."""

  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  unit_offset: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.zeros if self.unit_offset else nn.initializers.ones
    scale = self.param("scale", nn.with_logical_partitioning(init, ("norm",)),
                       (x.shape[-1],), self.param_dtype).astype(jnp.float32)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return ((1.0 + scale if self.unit_offset else scale) * x32).astype(self.dtype)


class LayerNorm(nn.Module):
  """(x - mean) / std * scale + bias, computed in fp32 (GPT-2, BERT)."""

  eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                      (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each layer's input
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
}

# HF `hidden_act` names -> functions (gelu_new and gelu_pytorch_tanh are the tanh approximation).
ACTIVATIONS = {
    "silu": nn.silu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
}


def rope_frequencies(dim: int, theta: float, scaling: Optional[dict],
                     positions_BxL: Optional[jax.Array] = None) -> tuple[jax.Array, float]:
  """Inverse frequencies (dim/2,) for rotary embeddings of `dim` rotated dims, with HF's
  `rope_scaling` types, and the factor that scales the rotated vectors (1 but for LongRoPE).

  Supports the default rotation, `linear` scaling, Llama 3.1's `llama3` frequency bands and
  Phi-3's `longrope`: per-frequency short or long factors, the long ones when the call's largest
  position reaches past `original_max_position_embeddings` (as transformers picks per forward
  pass), and the rotation scaled by √(1 + ln(factor) / ln(original length)).
  """
  exponent = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
  inv_freq = 1.0 / (theta ** exponent)
  kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
  if kind == "default":
    return inv_freq, 1.0
  if kind == "linear":
    return inv_freq / scaling["factor"], 1.0
  if kind == "llama3":
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return jnp.where(medium, smoothed, out), 1.0
  if kind == "longrope":
    old_len, factor = scaling["original_max_position_embeddings"], scaling["factor"]
    mscale = scaling.get("attention_factor") or (
        1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(old_len)))
    short, long = (1.0 / (jnp.asarray(scaling[k], jnp.float32) * theta ** exponent)
                   for k in ("short_factor", "long_factor"))
    past = positions_BxL is not None and jnp.max(positions_BxL) + 1 > old_len
    return jnp.where(past, long, short), mscale
  raise ValueError(f"unsupported rope_scaling type '{kind}' "
                   "(supported: default, linear, llama3, longrope)")


def apply_rope(x_BxLxHxD: jax.Array, positions_BxL: jax.Array, inv_freq: jax.Array,
               mscale: float = 1.0) -> jax.Array:
  """Rotates query/key vectors by their positions (HF's rotate-half convention), in fp32: the
  leading 2·len(inv_freq) dims of each head (all of them unless the rotation is partial), the
  rotation scaled by `mscale`."""
  angles = positions_BxL.astype(jnp.float32)[..., None] * inv_freq  # B, L, R/2
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(angles) * mscale, jnp.sin(angles) * mscale
  x = x_BxLxHxD.astype(jnp.float32)
  r = angles.shape[-1]
  x, rest = x[..., :r], x[..., r:]
  rotated = jnp.concatenate([-x[..., r // 2:], x[..., :r // 2]], axis=-1)
  return jnp.concatenate([x * cos + rotated * sin, rest], axis=-1).astype(x_BxLxHxD.dtype)


def attention_mask(q_index: jax.Array, k_index: jax.Array, q_seg_BxL: jax.Array,
                   k_seg_BxS: jax.Array, sliding_window: Optional[int] = None,
                   causal: bool = True) -> jax.Array:
  """Boolean (B, 1, L, S) mask: causal by index (unless `causal` is false: encoders), never
  across segments.

  Indices are (L,)/(S,) buffer indices shared by the batch, or (B, L)/(B, S) per row. Segment ids
  separate packed examples and padding (id 0): a query sees only keys of its own segment at or
  before its own index, so padding and packing are exact.
  """
  same = q_seg_BxL[:, :, None] == k_seg_BxS[:, None, :]
  if not causal:
    return same[:, None]
  q, k = jnp.atleast_2d(q_index)[:, :, None], jnp.atleast_2d(k_index)[:, None, :]
  seen = k <= q
  if sliding_window:
    seen &= k > q - sliding_window
  return (seen & same)[:, None]


@flax.struct.dataclass
class FusedMask:
  """An attention mask that cuDNN's fused (flash) kernel can apply itself: each row holds one
  right-padded example of `lengths` tokens, attended causally or not. `dense` is the same mask
  as a boolean (B, 1, L, S) array, for where the fused kernel does not apply (dropout)."""

  dense: jax.Array
  lengths: jax.Array  # (B,) int32
  causal: bool = flax.struct.field(pytree_node=False, default=True)


def dropout(module: nn.Module, rate: float, x: jax.Array) -> jax.Array:
  """Dropout at `rate` inside `module`, in training only (when a 'dropout' rng is passed)."""
  if rate and module.has_rng("dropout"):
    return nn.Dropout(rate, deterministic=False)(x)
  return x


def soft_cap(x: jax.Array, cap: Optional[float]) -> jax.Array:
  """cap·tanh(x/cap) (Gemma's soft-capping of attention scores and output logits), or x itself
  without a cap."""
  return cap * jnp.tanh(x / cap) if cap else x


def attend(module: nn.Module, q_BxLxHxD: jax.Array, k_BxLxKxD: jax.Array, v_BxLxKxD: jax.Array,
           mask, kv_cache=None, cache_index=None, prefix_kv=None, dropout_rate: float = 0.0,
           scale: Optional[float] = None, softcap: Optional[float] = None):
  """Attention as every family's attention layer runs it: this call's keys and values are
  written into the KV cache at `cache_index` (when decoding), prefix-tuning keys and values
  (2, m, kv_heads, head_dim) are put in front, and the probabilities get dropout in training.
  `scale` and `softcap`: see `dot_product_attention`.
  Returns (output BxLxHxD, the updated cache or None)."""
  k, v = k_BxLxKxD, v_BxLxKxD
  if kv_cache is not None:
    k = jax.lax.dynamic_update_slice(kv_cache[0], k.astype(kv_cache[0].dtype),
                                     (0, cache_index, 0, 0))
    v = jax.lax.dynamic_update_slice(kv_cache[1], v.astype(kv_cache[1].dtype),
                                     (0, cache_index, 0, 0))
    kv_cache = (k, v)
  k, v = k.astype(q_BxLxHxD.dtype), v.astype(q_BxLxHxD.dtype)
  if prefix_kv is not None:  # seen by every query
    b = q_BxLxHxD.shape[0]
    pk, pv = (jnp.broadcast_to(x[None], (b, *x.shape)) for x in prefix_kv)
    k, v = jnp.concatenate([pk, k], axis=1), jnp.concatenate([pv, v], axis=1)
  drop = None
  if dropout_rate and module.has_rng("dropout"):
    drop = nn.Dropout(dropout_rate, deterministic=False)
  return dot_product_attention(q_BxLxHxD, k, v, mask, drop, scale, softcap), kv_cache


class FullHeads:
  """Config mixin of families whose keys and values have as many heads as the queries."""

  @property
  def num_kv_heads(self) -> int:
    return self.num_heads  # pylint: disable=no-member

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads  # pylint: disable=no-member


def dot_product_attention(q_BxLxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array,
                          mask_Bx1xLxS: jax.Array | FusedMask,
                          dropout: Optional[Callable] = None, scale: Optional[float] = None,
                          softcap: Optional[float] = None) -> jax.Array:
  """Grouped-query attention: H query heads share K key/value heads (H % K == 0); `dropout`,
  when given, applies to the attention probabilities (training). Scores are q·k times `scale`
  (default 1/√head_dim), soft-capped to softcap·tanh(scores/softcap) when `softcap` is set
  (Gemma 2). A `FusedMask` runs cuDNN's flash attention (no dropout, no soft-capping; the
  probabilities are never materialised)."""
  scale = scale or 1.0 / math.sqrt(q_BxLxHxD.shape[-1])
  if isinstance(mask_Bx1xLxS, FusedMask):
    fused, mask_Bx1xLxS = mask_Bx1xLxS, mask_Bx1xLxS.dense
    if dropout is None and not softcap:
      try:
        return jax.nn.dot_product_attention(
            q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, scale=scale, is_causal=fused.causal,
            query_seq_lengths=fused.lengths, key_value_seq_lengths=fused.lengths,
            implementation="cudnn")
      except NotImplementedError:  # a shape cuDNN's kernel lacks (e.g. an odd length)
        pass
  if dropout is None:
    return _attention(q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, mask_Bx1xLxS, scale, softcap)
  b, l, h, d = q_BxLxHxD.shape
  kv = k_BxSxKxD.shape[2]
  q = q_BxLxHxD.reshape(b, l, kv, h // kv, d)
  scores = soft_cap(jnp.einsum("blkgd,bskd->bkgls", q, k_BxSxKxD,
                              preferred_element_type=jnp.float32) * scale, softcap)
  scores = jnp.where(mask_Bx1xLxS[:, :, None], scores, NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1)
  if dropout is not None:
    probs = dropout(probs)
  probs = probs.astype(v_BxSxKxD.dtype)
  out = jnp.einsum("bkgls,bskd->blkgd", probs, v_BxSxKxD)
  return out.reshape(b, l, h, d)



# Attention without dropout, with a hand-written backward pass: each key/value head's G query
# heads are one (G*L, D) matrix, so every product is a plain batched matmul, and the backward
# pass reuses the saved probabilities. On XLA:CPU this is faster than differentiating the
# einsums (measured: 147 -> 92 ms per layer, forward and backward, on the benchmark model).
# Recomputing the probabilities in the backward pass instead (from saved row maxima and sums)
# was measured too: XLA's temporary memory for the dense CPU benchmark's step stayed at 1188 MiB,
# so it would only add a Q.K^T product.
def _grouped(x_BxLxHxD: jax.Array, kv: int) -> jax.Array:
  b, l, h, d = x_BxLxHxD.shape
  return x_BxLxHxD.reshape(b, l, kv, h // kv, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, -1, d)


def _ungrouped(x_BxKxGLxD: jax.Array, l: int) -> jax.Array:
  b, kv, gl, d = x_BxKxGLxD.shape
  g = gl // l
  return x_BxKxGLxD.reshape(b, kv, g, l, d).transpose(0, 3, 1, 2, 4).reshape(b, l, kv * g, d)


def _raw_scores(q_BxKxGLxD, k_BxKxSxD, scale):
  return jnp.matmul(q_BxKxGLxD, k_BxKxSxD.transpose(0, 1, 3, 2),
                    preferred_element_type=jnp.float32) * scale


def _scores(q_BxKxGLxD, k_BxKxSxD, mask_Bx1xLxS, scale, softcap):
  """Masked fp32 scores (B, K, G*L, S) of grouped queries, and the mask as (B, 1, G*L, S)."""
  b, _, gl, _ = q_BxKxGLxD.shape
  l, s = mask_Bx1xLxS.shape[-2:]
  scores = soft_cap(_raw_scores(q_BxKxGLxD, k_BxKxSxD, scale), softcap)
  mask = jnp.broadcast_to(mask_Bx1xLxS[:, :, None], (b, 1, gl // l, l, s)).reshape(b, 1, gl, s)
  return jnp.where(mask, scores, NEG_INF), mask


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, mask_Bx1xLxS, scale, softcap):
  return _attention_fwd(q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, mask_Bx1xLxS, scale, softcap)[0]


def _attention_fwd(q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, mask_Bx1xLxS, scale, softcap):
  l = q_BxLxHxD.shape[1]
  kv = k_BxSxKxD.shape[2]
  q = _grouped(q_BxLxHxD, kv)  # B, K, G*L, D
  k, v = k_BxSxKxD.transpose(0, 2, 1, 3), v_BxSxKxD.transpose(0, 2, 1, 3)  # B, K, S, D
  scores, mask = _scores(q, k, mask_Bx1xLxS, scale, softcap)
  probs = jax.nn.softmax(scores, axis=-1)  # fp32
  out = jnp.matmul(probs.astype(v.dtype), v)
  return _ungrouped(out, l).astype(q_BxLxHxD.dtype), (q, k, v, mask, probs)


def _attention_bwd(scale, softcap, residuals, dout_BxLxHxD):
  q, k, v, mask, probs = residuals
  l = dout_BxLxHxD.shape[1]
  dout = _grouped(dout_BxLxHxD, k.shape[1]).astype(v.dtype)
  dv = jnp.matmul(probs.astype(v.dtype).transpose(0, 1, 3, 2), dout)
  dprobs = jnp.matmul(dout, v.transpose(0, 1, 3, 2), preferred_element_type=jnp.float32)
  dscores = probs * (dprobs - jnp.sum(dprobs * probs, axis=-1, keepdims=True)) * scale
  if softcap:  # d(cap·tanh(x/cap))/dx = 1 - tanh², the capped scores recomputed, not kept
    dscores = dscores * (1.0 - jnp.square(jnp.tanh(_raw_scores(q, k, scale) / softcap)))
  dscores = jnp.where(mask, dscores, 0.0).astype(q.dtype)  # masked scores were constants
  dq = _ungrouped(jnp.matmul(dscores, k), l)
  dk = jnp.matmul(dscores.transpose(0, 1, 3, 2), q).transpose(0, 2, 1, 3)
  return dq, dk.astype(k.dtype), dv.transpose(0, 2, 1, 3).astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)

def last_token(h_BxLxD: jax.Array, segment_ids_BxL: jax.Array) -> jax.Array:
  """Each row's hidden state at its last non-padding token (B, D): what a decoder's
  sequence-classification head reads (rows are right-padded, one example each)."""
  last = jnp.maximum(jnp.sum(segment_ids_BxL > 0, axis=1) - 1, 0)
  return jnp.take_along_axis(h_BxLxD, last[:, None, None], axis=1)[:, 0]
