"""The Llama-family decoder: Llama 2/3, Mistral, Qwen2 and SmolLM2 in one functional Flax module.

RMSNorm, rotary positions (with `llama3` / `linear` scaling), grouped-query attention with
optional q/k/v bias (Qwen2), SwiGLU, optional tied embeddings (SmolLM2). Parameter paths follow
HF's module names (`layers_3/self_attn/q_proj/kernel`) so mapping tables stay obvious.

The model takes per-token positions and segment ids (0 = padding) so that padded and packed
batches are exact, and an optional KV cache for generation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from ftjax.config import UserError
from ftjax.models import common, layers
from ftjax.models.family import Family

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """The hyperparameters ftjax needs, read from an HF `config.json`."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: Optional[tuple] = None  # sorted (key, value) pairs of HF's rope_scaling dict
  tie_word_embeddings: bool = False
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  sliding_windows: Optional[tuple] = None  # per layer: a window size or None
  attention_dropout: float = 0.0  # on the attention probabilities, in training only
  family: str = "llama"
  # Variants of the same decoder that other families (Gemma) build on:
  activation: str = "silu"  # the MLP gate's activation (a `layers.ACTIVATIONS` name)
  norm_offset: bool = False  # RMSNorms scale by (1 + w)
  embed_scale: bool = False  # token embeddings are multiplied by √hidden_size
  query_scale: Optional[float] = None  # attention scores' scale (None: 1/√head_dim)
  attn_softcap: Optional[float] = None  # attention scores soft-capped: cap·tanh(s/cap)
  logit_softcap: Optional[float] = None  # output logits soft-capped: cap·tanh(z/cap)
  local_rope: Optional[tuple] = None  # (theta, rope_scaling) of the sliding-window layers
  rotary_dim: Optional[int] = None  # the leading dims of each head that RoPE rotates (all)
  residual_dropout: float = 0.0  # on each sublayer's output, in training only (Phi-3)

  def rope(self, layer: int) -> tuple[float, Optional[dict]]:
    """Layer `layer`'s RoPE base and scaling (`local_rope` on sliding-window layers)."""
    if self.local_rope and self.sliding_windows and self.sliding_windows[layer]:
      theta, scaling = self.local_rope
    else:
      theta, scaling = self.rope_theta, self.rope_scaling
    return theta, dict(scaling) if scaling else None

  @classmethod
  def from_hf(cls, hf: dict) -> "LlamaConfig":
    """Builds the config from a parsed HF `config.json` (transformers 4.x or 5.x layout)."""
    family = hf.get("model_type", "llama")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
      raise UserError(f"hidden_act '{act}' is not supported (supported: silu)")
    attention_bias = hf.get("attention_bias", False)
    return cls(
        **common_fields(hf, hf.get("rope_parameters") or {}),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        qkv_bias=family == "qwen2" or attention_bias,
        o_bias=family != "qwen2" and attention_bias,
        mlp_bias=hf.get("mlp_bias", False),
        sliding_windows=_sliding_windows(hf, family),
        family=family,
    )


def common_fields(hf: dict, rope: dict) -> dict:
  """The `LlamaConfig` fields every Llama-style config.json states alike: sizes, norm epsilon,
  attention dropout and RoPE (`rope`: see `rope_settings`)."""
  heads = hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
  theta, scaling, rotary_dim = rope_settings(hf, rope, head_dim)
  return dict(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
              intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
              num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
              head_dim=head_dim, rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta,
              rope_scaling=scaling, rotary_dim=rotary_dim,
              attention_dropout=float(hf.get("attention_dropout") or 0.0))


SUPPORTED_ROPE = ("default", "linear", "llama3", "longrope")


def rope_settings(hf: dict, rope: dict, head_dim: int) -> tuple[float, Optional[tuple], int]:
  """(base, scaling as sorted (key, value) pairs or None, rotated dims) of config.json's RoPE:
  `rope` is the RoPE dict that transformers 5 writes (`rope_parameters`, or one layer type's
  entry of it); 4.x's top-level `rope_theta` / `rope_scaling` / `partial_rotary_factor` win.
  Unsupported kinds are errors, not silent differences. LongRoPE (Phi-3's `su` / `longrope`)
  keeps its factor lists and gets `factor` and `original_max_position_embeddings` filled in as
  transformers does."""
  rope = dict(rope)
  theta = float(hf.get("rope_theta", rope.pop("rope_theta", 10000.0)))
  partial = hf.get("partial_rotary_factor", rope.pop("partial_rotary_factor", 1.0))
  scaling = dict(hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default"
                                            else {}))
  kind = scaling.pop("type", None) or scaling.get("rope_type", "default")
  kind = "longrope" if kind in ("su", "longrope") else kind
  if kind not in SUPPORTED_ROPE:
    raise UserError(f"rope type '{kind}' is not supported (supported: {', '.join(SUPPORTED_ROPE)})")
  if kind == "longrope":
    original = scaling.get("original_max_position_embeddings") or hf[
        "original_max_position_embeddings"]
    scaling.update(original_max_position_embeddings=original,
                   factor=scaling.get("factor") or hf["max_position_embeddings"] / original,
                   short_factor=tuple(scaling["short_factor"]),
                   long_factor=tuple(scaling["long_factor"]))
  scaling = {k: v for k, v in scaling.items() if k != "partial_rotary_factor"}
  scaling = tuple(sorted({**scaling, "rope_type": kind}.items())) if kind != "default" else None
  return theta, scaling, int(head_dim * partial)


def _sliding_windows(hf: dict, family: str) -> Optional[tuple]:
  """Per-layer attention windows as HF applies them (Mistral everywhere; Qwen2 by layer type)."""
  n, window = hf["num_hidden_layers"], hf.get("sliding_window")
  if not window:
    return None
  if family == "mistral":
    return (window,) * n
  if family == "qwen2":
    return layer_windows(hf)
  return None


def layer_windows(hf: dict) -> Optional[tuple]:
  """Qwen-style per-layer windows: with `use_sliding_window`, the layers that `layer_types` (or
  `max_window_layers`) marks as sliding attend within `sliding_window` tokens."""
  n, window = hf["num_hidden_layers"], hf.get("sliding_window")
  if not (window and hf.get("use_sliding_window")):
    return None
  kinds = hf.get("layer_types") or [
      "sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention"
      for i in range(n)]
  return tuple(window if k == "sliding_attention" else None for k in kinds)


def rms_norm(cfg: LlamaConfig, dtype: Any, name: str) -> layers.RMSNorm:
  return layers.RMSNorm(cfg.rms_norm_eps, dtype, unit_offset=cfg.norm_offset, name=name)


class Attention(nn.Module):
  cfg: LlamaConfig
  dtype: Any = jnp.float32
  peft: layers.PeftHooks = layers.NO_PEFT
  index: int = 0  # the layer's index

  def dense(self, features: int, axes: tuple, bias: bool, name: str) -> layers.Dense:
    return layers.Dense(features, axes, bias, self.dtype, peft=self.peft, name=name)

  def qkv(self, h_BxLxD):
    """The flat query, key and value projections (Phi-3 fuses them into one)."""
    cfg = self.cfg
    kv_width = cfg.num_kv_heads * cfg.head_dim
    q = self.dense(cfg.num_heads * cfg.head_dim, ("embed", "heads"), cfg.qkv_bias,
                   "q_proj")(h_BxLxD)
    k = self.dense(kv_width, ("embed", "kv_heads"), cfg.qkv_bias, "k_proj")(h_BxLxD)
    v = self.dense(kv_width, ("embed", "kv_heads"), cfg.qkv_bias, "v_proj")(h_BxLxD)
    return q, k, v

  @nn.compact
  def __call__(self, h_BxLxD, positions_BxL, mask, kv_cache=None, cache_index=None,
               prefix_kv=None):
    cfg = self.cfg
    b, l, _ = h_BxLxD.shape
    q, k, v = self.qkv(h_BxLxD)
    q = q.reshape(b, l, cfg.num_heads, cfg.head_dim)
    k = k.reshape(b, l, cfg.num_kv_heads, cfg.head_dim)
    v = v.reshape(b, l, cfg.num_kv_heads, cfg.head_dim)
    q, k = self.qk_norm(q, k)
    inv_freq, mscale = layers.rope_frequencies(cfg.rotary_dim or cfg.head_dim,
                                               *cfg.rope(self.index), positions_BxL)
    q = layers.apply_rope(q, positions_BxL, inv_freq, mscale)
    k = layers.apply_rope(k, positions_BxL, inv_freq, mscale)
    out, kv_cache = layers.attend(self, q.astype(self.dtype), k, v, mask, kv_cache, cache_index,
                                  prefix_kv, cfg.attention_dropout, cfg.query_scale,
                                  cfg.attn_softcap)
    out = self.dense(cfg.hidden_size, ("heads", "embed"), cfg.o_bias, "o_proj")(
        out.reshape(b, l, cfg.num_heads * cfg.head_dim))
    return out, kv_cache

  def qk_norm(self, q_BxLxHxD, k_BxLxKxD):
    """Per-head query/key normalisation before the rotation: none here (Qwen3 overrides it)."""
    return q_BxLxHxD, k_BxLxKxD


class MLP(nn.Module):
  cfg: LlamaConfig
  dtype: Any = jnp.float32
  peft: layers.PeftHooks = layers.NO_PEFT

  def dense(self, features: int, axes: tuple, name: str) -> layers.Dense:
    return layers.Dense(features, axes, self.cfg.mlp_bias, self.dtype, peft=self.peft, name=name)

  def gate_up(self, h_BxLxD):
    """The gate and up projections (Phi-3 fuses them into one)."""
    n = self.cfg.intermediate_size
    return (self.dense(n, ("embed", "mlp"), "gate_proj")(h_BxLxD),
            self.dense(n, ("embed", "mlp"), "up_proj")(h_BxLxD))

  @nn.compact
  def __call__(self, h_BxLxD):
    gate, up = self.gate_up(h_BxLxD)
    act = layers.ACTIVATIONS[self.cfg.activation]
    return self.dense(self.cfg.hidden_size, ("mlp", "embed"), "down_proj")(act(gate) * up)


class DecoderLayer(nn.Module):
  cfg: LlamaConfig
  dtype: Any = jnp.float32
  peft: layers.PeftHooks = layers.NO_PEFT
  index: int = 0  # the layer's index

  attention_cls = Attention  # a family built on this one may swap its attention in
  mlp_cls = MLP  # ... and its MLP

  def attention(self, h_BxLxD, *args):
    return self.attention_cls(self.cfg, self.dtype, self.peft, self.index, name="self_attn")(
        h_BxLxD, *args)

  def mlp(self, h_BxLxD):
    return self.mlp_cls(self.cfg, self.dtype, self.peft, name="mlp")(h_BxLxD)

  @nn.compact
  def __call__(self, h_BxLxD, positions_BxL, mask, kv_cache=None, cache_index=None,
               prefix_kv=None):
    norm = lambda name: rms_norm(self.cfg, self.dtype, name)
    spec = self.peft
    attn, kv_cache = self.attention(norm("input_layernorm")(h_BxLxD), positions_BxL, mask,
                                    kv_cache, cache_index, prefix_kv)
    drop = lambda x: layers.dropout(self, self.cfg.residual_dropout, x)
    h_BxLxD = h_BxLxD + drop(spec.sublayer(self, "attn", attn))
    ffn = self.mlp(norm("post_attention_layernorm")(h_BxLxD))
    return h_BxLxD + drop(spec.sublayer(self, "ffn", ffn)), kv_cache


class Llama(nn.Module):
  """Decoder-only LM. `__call__` returns (logits_BxLxV in fp32, updated cache or None), or with
  `num_labels` the classification logits (B, num_labels) of each row's last token.

  Under prompt tuning the soft tokens are prepended when `virtual_tokens` is true (always in
  training; only in the prefill during generation) and their logits are dropped.
  """

  cfg: LlamaConfig
  dtype: Any = jnp.float32
  peft: layers.PeftHooks = layers.NO_PEFT
  remat: str = "none"  # none | full | dots: recompute each layer's activations in backward
  num_labels: int = 0  # > 0: a sequence classifier returning (B, num_labels) logits
  attention: str = "xla"  # xla | cudnn (fused flash attention on GPUs; unpacked rows only)

  embed_path = "embed_tokens/embedding"
  layer_cls = DecoderLayer  # a family built on this one may swap its layer in

  @nn.compact
  def __call__(self, tokens_BxL, positions_BxL, segment_ids_BxL, cache: Optional[dict] = None,
               virtual_tokens: bool = True, return_hidden: bool = False):
    cfg, spec = self.cfg, self.peft
    embed = layers.Embed(cfg.vocab_size, cfg.hidden_size, self.dtype, name="embed_tokens")
    new_rows = common.new_token_rows(self, spec, cfg.hidden_size)
    h = common.embed_new_tokens(embed(tokens_BxL), tokens_BxL, new_rows, spec)
    if cfg.embed_scale:  # √hidden rounded to the compute dtype, as HF's scaled embedding
      h = h * jnp.asarray(cfg.hidden_size ** 0.5, self.dtype)
    h, positions_BxL, segment_ids_BxL, soft = common.soft_prompt(
        self, h, positions_BxL, segment_ids_BxL, spec, self.dtype, virtual_tokens)
    masks, prefixes, index, k_seg = common.masks_and_prefixes(
        self, positions_BxL, segment_ids_BxL, cache, spec, cfg, self.dtype,
        attention=self.attention)
    layer_cls = self.layer_cls
    if self.remat != "none":
      layer_cls = nn.remat(layer_cls, policy=layers.REMAT_POLICIES[self.remat])
    new_layers = []
    for i in range(cfg.num_layers):
      window = cfg.sliding_windows[i] if cfg.sliding_windows else None
      kv = cache["layers"][i] if cache is not None else None
      h, kv = layer_cls(cfg, self.dtype, spec, i, name=f"layers_{i}")(
          h, positions_BxL, masks[window], kv, index,
          None if prefixes is None else prefixes[i])
      new_layers.append(kv)
    h = rms_norm(cfg, self.dtype, "norm")(h[:, soft:])
    if self.num_labels:
      return common.score(h, segment_ids_BxL[:, soft:], self.num_labels, self.dtype), None
    if return_hidden:  # the caller applies `output_kernel` itself (a chunked loss)
      return h, None
    if cfg.tie_word_embeddings:
      logits = embed.attend(h)
    else:
      logits = layers.Dense(cfg.vocab_size, ("embed", "vocab"), False, self.dtype, peft=spec,
                            name="lm_head")(h)
    logits = common.new_token_logits(
        h, logits, common.head_rows(new_rows, cfg.tie_word_embeddings), spec, self.dtype)
    logits = layers.soft_cap(logits.astype(jnp.float32), cfg.logit_softcap)
    if cache is not None:
      cache = {"index": index + h.shape[1] + soft, "segment_ids": k_seg, "layers": new_layers}
    return logits, cache

  @property
  def output_head(self) -> tuple[str, bool]:
    """The output head's parameter path, and whether it is stored (vocab, hidden)."""
    if self.cfg.tie_word_embeddings:
      return "embed_tokens/embedding", True
    return "lm_head/kernel", False



# (HF name, ftjax path, transpose)
def decoder_table(projections: tuple[str, ...]) -> tuple:
  """The HF table of a Llama-style decoder whose layers hold these dense `projections`
  ('self_attn.q_proj', ...; weights and biases)."""
  return (
      ("model.embed_tokens.weight", "embed_tokens/embedding", False),
      *[(f"model.layers.{{i}}.{m}.{w}", f"layers_{{i}}/{m.replace('.', '/')}/{p}", t)
        for m in projections
        for w, p, t in [("weight", "kernel", True), ("bias", "bias", False)]],
      ("model.layers.{i}.input_layernorm.weight", "layers_{i}/input_layernorm/scale", False),
      ("model.layers.{i}.post_attention_layernorm.weight",
       "layers_{i}/post_attention_layernorm/scale", False),
      ("model.norm.weight", "norm/scale", False),
      ("lm_head.weight", "lm_head/kernel", True),
      ("score.weight", "score/kernel", True),
  )


TABLE = decoder_table(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                       "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
KINDS = (("norm", r"norm/"), ("embedding", r"^embed_tokens/"), ("attention", r"/self_attn/"),
         ("mlp", r"/mlp/"), ("head", r"^(lm_head|score)/"))


def family(name: str, architectures: dict, config_from_hf=LlamaConfig.from_hf, module=None,
           table: tuple = TABLE, classifiers: Optional[dict] = None) -> Family:
  """The `Family` of a Llama-style decoder (HF module names `model.layers.{i}...`).
  `classifiers` ({model_type: *ForSequenceClassification}) defaults to the causal-LM
  architectures' names with `SequenceClassification` for `CausalLM`."""
  classifiers = classifiers or {t: a.replace("CausalLM", "SequenceClassification")
                                for a, t in architectures.items()}
  archs = {**architectures, **{a: t for t, a in classifiers.items()}}
  return Family(name, archs, config_from_hf, module or Llama, table, "model.",
                embedding="embed_tokens/embedding", layer=r"(?:^|/)layers_(\d+)/", kinds=KINDS,
                classifiers=classifiers)


FAMILY = family("llama", ARCHITECTURES)
