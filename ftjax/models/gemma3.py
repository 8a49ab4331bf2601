"""Gemma 3 (text): Gemma 2's decoder (see gemma2) with an RMSNorm over each query and key head
instead of attention soft-capping, as `transformers`' Gemma3ForCausalLM.

- `q_norm` / `k_norm`: (1 + w) RMSNorms of head_dim, before the rotation (as Qwen3's);
- a 5:1 pattern of sliding-window and global layers (`layer_types`, or the older
  `sliding_window_pattern`);
- two RoPEs: sliding layers rotate with the local base (`rope_local_base_freq`, 10 000) and no
  scaling, global layers with `rope_theta` (1 000 000) and `rope_scaling` (linear ×8 on 4B and
  up); transformers 5 writes both under `rope_parameters`, keyed by layer type;
- no attention soft-capping (HF's Gemma 3 ignores `attn_logit_softcapping`), final-logit
  soft-capping where the config sets it; a 262k vocabulary, which the chunked loss never
  materialises for the whole batch.
"""

from __future__ import annotations

import dataclasses

from ftjax.config import UserError
from ftjax.models import gemma2, llama, qwen3

ARCHITECTURES = {"Gemma3ForCausalLM": "gemma3_text"}


def config_from_hf(hf: dict) -> llama.LlamaConfig:
  """Gemma 3's text config.json (transformers 4.x or 5.x layout) as a `LlamaConfig`."""
  n = hf["num_hidden_layers"]
  if not hf.get("layer_types"):
    pattern = hf.get("sliding_window_pattern", 6)
    hf = {**hf, "layer_types": ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                for i in range(n)]}
  local = dict((hf.get("rope_parameters") or {}).get("sliding_attention") or {})
  if local.get("rope_type", "default") != "default":
    raise UserError(f"rope type '{local['rope_type']}' on sliding layers is not supported")
  theta = float(local.get("rope_theta", hf.get("rope_local_base_freq", 10000.0)))
  return dataclasses.replace(gemma2.gemma_config(hf), local_rope=(theta, None))


class DecoderLayer(gemma2.DecoderLayer):
  attention_cls = qwen3.Attention


class Gemma3(llama.Llama):
  layer_cls = DecoderLayer


TABLE = gemma2.TABLE + qwen3.QK_NORMS

# (Gemma3ForSequenceClassification is the multimodal model's classifier)
FAMILY = llama.family("gemma3", ARCHITECTURES, config_from_hf, Gemma3, TABLE,
                      classifiers={"gemma3_text": "Gemma3TextForSequenceClassification"})
