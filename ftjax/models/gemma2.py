"""Gemma 2: the Llama-family decoder with Gemma's changes, as `transformers`' Gemma2ForCausalLM.

- RMSNorms scale by (1 + w) (weights stored as offsets from 1, initialised to 0);
- token embeddings multiplied by √hidden_size (rounded to the compute dtype, as HF does);
- GeGLU: the gate's activation is the tanh GELU (`hidden_activation`);
- four norms per layer: before and after attention, before and after the MLP (the post-norms
  apply to the sublayer's output, before the residual add);
- attention scores scaled by `query_pre_attn_scalar`^-½ (not head_dim^-½) and soft-capped
  (cap·tanh(s/cap), `attn_logit_softcapping`), output logits soft-capped too
  (`final_logit_softcapping`; the chunked loss applies the cap: see loss.chunked_loss);
- layers alternate sliding-window and global attention (`layer_types`);
- tied embeddings; head_dim independent of hidden_size / heads.

The Llama module reads these as config variants (`LlamaConfig.norm_offset`, `embed_scale`, ...);
this file reads them from config.json and declares the layer's four norms and the HF table.
Soft-capped attention cannot run cuDNN's fused kernel, so `model.attention: cudnn` (or auto on a
GPU) falls back to XLA's attention (see common.masks_and_prefixes).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn

from ftjax.config import UserError
from ftjax.models import llama

ARCHITECTURES = {"Gemma2ForCausalLM": "gemma2"}


def config_from_hf(hf: dict) -> llama.LlamaConfig:
  """Gemma 2's config.json (transformers 4.x or 5.x layout) as a `LlamaConfig`."""
  return dataclasses.replace(gemma_config(hf), attn_softcap=hf.get("attn_logit_softcapping"))


def gemma_config(hf: dict) -> llama.LlamaConfig:
  """What Gemma 2 and Gemma 3 read alike from config.json (all but the attention soft-cap,
  which only Gemma 2 applies, and Gemma 3's per-layer RoPE)."""
  act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
  if act not in ("gelu_pytorch_tanh", "gelu_new", "gelu"):
    raise UserError(f"hidden_activation '{act}' is not supported for Gemma "
                    "(supported: gelu_pytorch_tanh, gelu_new, gelu)")
  if hf.get("use_bidirectional_attention"):
    raise UserError("use_bidirectional_attention is not supported (causal decoders only)")
  rope = dict(hf.get("rope_parameters") or {})
  n, window = hf["num_hidden_layers"], hf.get("sliding_window")
  kinds = hf.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention"
                                    for i in range(n)]
  return llama.LlamaConfig(
      **llama.common_fields(hf, rope.get("full_attention", rope)),  # Gemma 3: the global RoPE
      tie_word_embeddings=hf.get("tie_word_embeddings", True),
      qkv_bias=hf.get("attention_bias", False),
      o_bias=hf.get("attention_bias", False),
      sliding_windows=tuple(window if k == "sliding_attention" and window else None
                            for k in kinds),
      family=hf.get("model_type", "gemma2"),
      activation="gelu_pytorch_tanh" if act == "gelu_new" else act,
      norm_offset=True,
      embed_scale=True,
      query_scale=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5,
      logit_softcap=hf.get("final_logit_softcapping"),
  )


class DecoderLayer(llama.DecoderLayer):
  """Gemma's layer: norms before and after attention and before and after the MLP."""

  @nn.compact
  def __call__(self, h_BxLxD, positions_BxL, mask, kv_cache=None, cache_index=None,
               prefix_kv=None):
    norm = lambda name: llama.rms_norm(self.cfg, self.dtype, name)
    spec = self.peft
    attn, kv_cache = self.attention(norm("input_layernorm")(h_BxLxD), positions_BxL, mask,
                                    kv_cache, cache_index, prefix_kv)
    h_BxLxD = h_BxLxD + spec.sublayer(self, "attn", norm("post_attention_layernorm")(attn))
    ffn = self.mlp(norm("pre_feedforward_layernorm")(h_BxLxD))
    return h_BxLxD + spec.sublayer(self, "ffn", norm("post_feedforward_layernorm")(ffn)), kv_cache


class Gemma2(llama.Llama):
  layer_cls = DecoderLayer


_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
          "post_feedforward_layernorm")
TABLE = tuple(row for row in llama.TABLE if "layernorm" not in row[0]) + tuple(
    (f"model.layers.{{i}}.{n}.weight", f"layers_{{i}}/{n}/scale", False) for n in _NORMS)

FAMILY = llama.family("gemma2", ARCHITECTURES, config_from_hf, Gemma2, TABLE)
