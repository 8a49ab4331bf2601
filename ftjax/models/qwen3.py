"""Qwen3: the Llama-family decoder with an RMSNorm over each query and key head before the
rotation (`q_norm`, `k_norm`, one scale of head_dim each, shared by the heads).

Everything else is `llama`'s: this module swaps the attention in and adds the two norms to the
HF table.
"""

from __future__ import annotations

import dataclasses

from ftjax.models import llama

ARCHITECTURES = {"Qwen3ForCausalLM": "qwen3"}


def config_from_hf(hf: dict) -> llama.LlamaConfig:
  cfg = llama.LlamaConfig.from_hf(hf)
  return dataclasses.replace(cfg, sliding_windows=llama.layer_windows(hf))


class Attention(llama.Attention):

  def qk_norm(self, q_BxLxHxD, k_BxLxKxD):
    norm = lambda name: llama.rms_norm(self.cfg, self.dtype, name)
    return norm("q_norm")(q_BxLxHxD), norm("k_norm")(k_BxLxKxD)


class DecoderLayer(llama.DecoderLayer):
  attention_cls = Attention


class Qwen3(llama.Llama):
  layer_cls = DecoderLayer


QK_NORMS = (
    ("model.layers.{i}.self_attn.q_norm.weight", "layers_{i}/self_attn/q_norm/scale", False),
    ("model.layers.{i}.self_attn.k_norm.weight", "layers_{i}/self_attn/k_norm/scale", False),
)
TABLE = llama.TABLE + QK_NORMS

FAMILY = llama.family("qwen3", ARCHITECTURES, config_from_hf, Qwen3, TABLE)
