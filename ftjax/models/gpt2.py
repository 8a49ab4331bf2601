"""GPT-2: learned absolute positions, pre-LayerNorm blocks, a fused q/k/v projection, GELU MLP
and an output head tied to the token embeddings.

HF stores GPT-2's projections as `Conv1D` with (in, out) weights, the layout of ftjax kernels,
so the mapping table transposes nothing. Parameter paths follow HF's module names (`h_3/attn/
c_attn/kernel`), so PEFT target names (`c_attn`, `c_proj`, `c_fc`) work unchanged. Dropout
(embeddings, attention probabilities, residual branches) runs only in training.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from ftjax.config import UserError
from ftjax.models import common, layers
from ftjax.models.family import Family

ARCHITECTURES = {"GPT2LMHeadModel": "gpt2", "GPT2Model": "gpt2",
                 "GPT2ForSequenceClassification": "gpt2"}


@dataclasses.dataclass(frozen=True)
class GPT2Config(layers.FullHeads):
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  max_positions: int
  layer_norm_eps: float = 1e-5
  activation: str = "gelu_new"
  embd_dropout: float = 0.0
  attention_dropout: float = 0.0
  resid_dropout: float = 0.0
  tie_word_embeddings: bool = True
  family: str = "gpt2"

  @classmethod
  def from_hf(cls, hf: dict) -> "GPT2Config":
    act = hf.get("activation_function", "gelu_new")
    if act not in layers.ACTIVATIONS:
      raise UserError(f"activation_function '{act}' is not supported")
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
      raise UserError("GPT-2 attention scaling other than 1/sqrt(head_dim) is not supported")
    if hf.get("add_cross_attention"):
      raise UserError("GPT-2 with cross-attention is not supported")
    if not hf.get("tie_word_embeddings", True):
      raise UserError("GPT-2 with an untied output head is not supported")
    width = hf["n_embd"]
    return cls(vocab_size=hf["vocab_size"], hidden_size=width,
               intermediate_size=hf.get("n_inner") or 4 * width, num_layers=hf["n_layer"],
               num_heads=hf["n_head"], max_positions=hf["n_positions"],
               layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5), activation=act,
               embd_dropout=float(hf.get("embd_pdrop", 0.0)),
               attention_dropout=float(hf.get("attn_pdrop", 0.0)),
               resid_dropout=float(hf.get("resid_pdrop", 0.0)))


class Attention(nn.Module):
  cfg: GPT2Config
  dtype: Any = jnp.float32
  peft: layers.PeftHooks = layers.NO_PEFT

  @nn.compact
  def __call__(self, h_BxLxD, mask, kv_cache=None, cache_index=None, prefix_kv=None):
    cfg = self.cfg
    b, l, d = h_BxLxD.shape
    qkv = layers.Dense(3 * d, ("embed", "heads"), True, self.dtype, peft=self.peft,
                       name="c_attn")(h_BxLxD)
    q, k, v = (x.reshape(b, l, cfg.num_heads, cfg.head_dim) for x in jnp.split(qkv, 3, -1))
    out, kv_cache = layers.attend(self, q, k, v, mask, kv_cache, cache_index, prefix_kv,
                                  cfg.attention_dropout)
    out = out.reshape(b, l, d)
    out = layers.Dense(d, ("heads", "embed"), True, self.dtype, peft=self.peft,
                       name="c_proj")(out)
    return layers.dropout(self, cfg.resid_dropout, out), kv_cache


class MLP(nn.Module):
  cfg: GPT2Config
  dtype: Any = jnp.float32
  peft: layers.PeftHooks = layers.NO_PEFT

  @nn.compact
  def __call__(self, h_BxLxD):
    cfg = self.cfg
    dense = lambda n, axes, name: layers.Dense(n, axes, True, self.dtype, peft=self.peft,
                                               name=name)
    up = layers.ACTIVATIONS[cfg.activation](
        dense(cfg.intermediate_size, ("embed", "mlp"), "c_fc")(h_BxLxD))
    down = dense(cfg.hidden_size, ("mlp", "embed"), "c_proj")(up)
    return layers.dropout(self, cfg.resid_dropout, down)


class Block(nn.Module):
  cfg: GPT2Config
  dtype: Any = jnp.float32
  peft: layers.PeftHooks = layers.NO_PEFT

  @nn.compact
  def __call__(self, h_BxLxD, mask, kv_cache=None, cache_index=None, prefix_kv=None):
    norm = lambda name: layers.LayerNorm(self.cfg.layer_norm_eps, self.dtype, name=name)
    spec = self.peft
    attn, kv_cache = Attention(self.cfg, self.dtype, spec, name="attn")(
        norm("ln_1")(h_BxLxD), mask, kv_cache, cache_index, prefix_kv)
    h_BxLxD = h_BxLxD + spec.sublayer(self, "attn", attn)
    ffn = MLP(self.cfg, self.dtype, spec, name="mlp")(norm("ln_2")(h_BxLxD))
    return h_BxLxD + spec.sublayer(self, "ffn", ffn), kv_cache


class GPT2(nn.Module):
  """GPT-2 LM. `__call__` matches `llama.Llama`: (logits_BxLxV in fp32, cache), or with
  `num_labels` the classification logits (B, num_labels) of each row's last token."""

  cfg: GPT2Config
  dtype: Any = jnp.float32
  peft: layers.PeftHooks = layers.NO_PEFT
  remat: str = "none"
  num_labels: int = 0
  attention: str = "xla"  # xla | cudnn (fused flash attention on GPUs; unpacked rows only)

  embed_path = "wte/embedding"

  @nn.compact
  def __call__(self, tokens_BxL, positions_BxL, segment_ids_BxL, cache: Optional[dict] = None,
               virtual_tokens: bool = True, return_hidden: bool = False):
    cfg, spec = self.cfg, self.peft
    wte = layers.Embed(cfg.vocab_size, cfg.hidden_size, self.dtype, name="wte")
    new_rows = common.new_token_rows(self, spec, cfg.hidden_size)
    h = common.embed_new_tokens(wte(tokens_BxL), tokens_BxL, new_rows, spec)
    h, positions_BxL, segment_ids_BxL, soft = common.soft_prompt(
        self, h, positions_BxL, segment_ids_BxL, spec, self.dtype, virtual_tokens)
    wpe = layers.Embed(cfg.max_positions, cfg.hidden_size, self.dtype, name="wpe")
    h = layers.dropout(self, cfg.embd_dropout, h + wpe(positions_BxL))
    masks, prefixes, index, k_seg = common.masks_and_prefixes(
        self, positions_BxL, segment_ids_BxL, cache, spec, cfg, self.dtype,
        attention=self.attention)
    block = Block if self.remat == "none" else nn.remat(Block,
                                                        policy=layers.REMAT_POLICIES[self.remat])
    new_layers = []
    for i in range(cfg.num_layers):
      kv = cache["layers"][i] if cache is not None else None
      h, kv = block(cfg, self.dtype, spec, name=f"h_{i}")(
          h, masks[None], kv, index, None if prefixes is None else prefixes[i])
      new_layers.append(kv)
    h = layers.LayerNorm(cfg.layer_norm_eps, self.dtype, name="ln_f")(h[:, soft:])
    if self.num_labels:
      return common.score(h, segment_ids_BxL[:, soft:], self.num_labels, self.dtype), None
    if return_hidden:  # the caller applies `output_kernel` itself (a chunked loss)
      return h, None
    logits = common.new_token_logits(h, wte.attend(h), common.head_rows(new_rows, True), spec,
                                     self.dtype)
    if cache is not None:
      cache = {"index": index + h.shape[1] + soft, "segment_ids": k_seg, "layers": new_layers}
    return logits.astype(jnp.float32), cache

  @property
  def output_head(self) -> tuple[str, bool]:
    """The output head's parameter path, and whether it is stored (vocab, hidden)."""
    return "wte/embedding", True


# (HF name, ftjax path, transpose). GPT-2's Conv1D weights are stored (in, out): nothing is
# transposed.
TABLE = (
    ("transformer.wte.weight", "wte/embedding", False),
    ("transformer.wpe.weight", "wpe/embedding", False),
    *[(f"transformer.h.{{i}}.{hf_name}.{w}", f"h_{{i}}/{ours}/{p}", False)
      for hf_name, ours in [("ln_1", "ln_1"), ("ln_2", "ln_2")]
      for w, p in [("weight", "scale"), ("bias", "bias")]],
    *[(f"transformer.h.{{i}}.{m}.{w}", f"h_{{i}}/{m.replace('.', '/')}/{p}", False)
      for m in ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
      for w, p in [("weight", "kernel"), ("bias", "bias")]],
    ("transformer.ln_f.weight", "ln_f/scale", False),
    ("transformer.ln_f.bias", "ln_f/bias", False),
    ("lm_head.weight", "lm_head/kernel", True),
    ("score.weight", "score/kernel", True),
)

FAMILY = Family(
    "gpt2", ARCHITECTURES, GPT2Config.from_hf, GPT2, TABLE, "transformer.",
    embedding="wte/embedding", layer=r"(?:^|/)h_(\d+)/",
    kinds=(("embedding", r"^(wte|wpe)/"), ("attention", r"/attn/"), ("mlp", r"/mlp/"),
           ("norm", r"(^|/)ln_"), ("head", r"^(lm_head|score)/")),
    classifiers={"gpt2": "GPT2ForSequenceClassification"}, conv1d=True)
