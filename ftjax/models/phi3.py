"""Phi-3 (and Phi-3.5 / Phi-4-mini text): the Llama-family decoder with fused projections, as
`transformers`' Phi3ForCausalLM.

- `qkv_proj`: one dense layer for queries, keys and values (split after it, queries first);
- `gate_up_proj`: one dense layer for the MLP's gate and up halves (gate first);
- LongRoPE (`rope_scaling` type `su` / `longrope`, the 128k variants): short or long per-frequency
  factors and a scaled rotation (see layers.rope_frequencies); a partial rotation where
  `partial_rotary_factor` < 1;
- a sliding window over every layer where `sliding_window` is set; dropout on each sublayer's
  output in training (`resid_pdrop`).

The fused layers keep HF's names, so LoRA targets (`qkv_proj`, `gate_up_proj`, or all-linear),
PEFT adapters and exports address them as PEFT does: one LoRA pair per fused matrix.
"""

from __future__ import annotations

import dataclasses

from ftjax.models import llama

ARCHITECTURES = {"Phi3ForCausalLM": "phi3"}


def config_from_hf(hf: dict) -> llama.LlamaConfig:
  cfg = llama.LlamaConfig.from_hf(hf)
  window = hf.get("sliding_window")
  return dataclasses.replace(cfg, sliding_windows=(window,) * cfg.num_layers if window else None,
                             residual_dropout=float(hf.get("resid_pdrop") or 0.0))


class Attention(llama.Attention):

  def qkv(self, h_BxLxD):
    cfg = self.cfg
    q_width, kv_width = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    qkv = self.dense(q_width + 2 * kv_width, ("embed", "heads"), cfg.qkv_bias,
                     "qkv_proj")(h_BxLxD)
    return (qkv[..., :q_width], qkv[..., q_width:q_width + kv_width],
            qkv[..., q_width + kv_width:])


class MLP(llama.MLP):

  def gate_up(self, h_BxLxD):
    n = self.cfg.intermediate_size
    both = self.dense(2 * n, ("embed", "mlp"), "gate_up_proj")(h_BxLxD)
    return both[..., :n], both[..., n:]


class DecoderLayer(llama.DecoderLayer):
  attention_cls = Attention
  mlp_cls = MLP


class Phi3(llama.Llama):
  layer_cls = DecoderLayer


TABLE = llama.decoder_table(("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                             "mlp.down_proj"))

FAMILY = llama.family("phi3", ARCHITECTURES, config_from_hf, Phi3, TABLE)
