"""BERT-style encoders (BERT, MiniLM): word + position + token-type embeddings, post-LayerNorm
layers with bidirectional attention, a tanh pooler over [CLS], and a classifier.

Paths follow HF's module names below `bert.` (`layer_2/attention/self/query/kernel`), so PEFT
target names (`query`, `value`, `dense`) work unchanged. Token types are all 0 (one text per
example). `__call__` returns the last hidden states (B, L, D) in fp32, or with `num_labels` the
classification logits (B, num_labels) of the pooled [CLS] token, as BertForSequenceClassification.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from ftjax.config import UserError
from ftjax.models import common, layers
from ftjax.models.family import Family

ARCHITECTURES = {"BertModel": "bert", "BertForSequenceClassification": "bert",
                 "BertForMaskedLM": "bert", "BertForPreTraining": "bert"}


@dataclasses.dataclass(frozen=True)
class BertConfig(layers.FullHeads):
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  max_positions: int
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  activation: str = "gelu"
  hidden_dropout: float = 0.0
  attention_dropout: float = 0.0
  classifier_dropout: float = 0.0
  tie_word_embeddings: bool = False
  family: str = "bert"

  @classmethod
  def from_hf(cls, hf: dict) -> "BertConfig":
    act = hf.get("hidden_act", "gelu")
    if act not in layers.ACTIVATIONS:
      raise UserError(f"hidden_act '{act}' is not supported")
    kind = hf.get("position_embedding_type", "absolute")
    if kind != "absolute":
      raise UserError(f"position_embedding_type '{kind}' is not supported (supported: absolute)")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
      raise UserError("BERT as a decoder is not supported")
    hidden_dropout = float(hf.get("hidden_dropout_prob", 0.0))
    classifier = hf.get("classifier_dropout")
    return cls(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
               intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
               num_heads=hf["num_attention_heads"], max_positions=hf["max_position_embeddings"],
               type_vocab_size=hf.get("type_vocab_size", 2),
               layer_norm_eps=hf.get("layer_norm_eps", 1e-12), activation=act,
               hidden_dropout=hidden_dropout,
               attention_dropout=float(hf.get("attention_probs_dropout_prob", 0.0)),
               classifier_dropout=hidden_dropout if classifier is None else float(classifier))


class SelfAttention(nn.Module):
  cfg: BertConfig
  dtype: Any = jnp.float32
  peft: layers.PeftHooks = layers.NO_PEFT

  @nn.compact
  def __call__(self, h_BxLxD, mask, prefix_kv=None):
    cfg = self.cfg
    b, l, d = h_BxLxD.shape
    proj = lambda name: layers.Dense(d, ("embed", "heads"), True, self.dtype, peft=self.peft,
                                     name=name)(h_BxLxD).reshape(b, l, cfg.num_heads, cfg.head_dim)
    q, k, v = proj("query"), proj("key"), proj("value")
    out, _ = layers.attend(self, q, k, v, mask, prefix_kv=prefix_kv,
                           dropout_rate=cfg.attention_dropout)
    return out.reshape(b, l, d)


class Output(nn.Module):
  """dense -> dropout -> (adapter) -> LayerNorm(x + residual): BertSelfOutput and BertOutput."""

  cfg: BertConfig
  axes: tuple
  adapter: Optional[str] = None  # 'attn' | 'ffn' when a bottleneck adapter sits here
  dtype: Any = jnp.float32
  peft: layers.PeftHooks = layers.NO_PEFT

  @nn.compact
  def __call__(self, x, residual):
    spec = self.peft
    y = layers.Dense(self.cfg.hidden_size, self.axes, True, self.dtype, peft=spec,
                     name="dense")(x)
    y = layers.dropout(self, self.cfg.hidden_dropout, y)
    if self.adapter:
      y = spec.sublayer(self, self.adapter, y)
    return layers.LayerNorm(self.cfg.layer_norm_eps, self.dtype, name="LayerNorm")(y + residual)


class Attention(nn.Module):
  """HF's BertAttention: `self` (the heads) and `output` (projection, residual, LayerNorm)."""

  cfg: BertConfig
  dtype: Any = jnp.float32
  peft: layers.PeftHooks = layers.NO_PEFT

  @nn.compact
  def __call__(self, h_BxLxD, mask, prefix_kv=None):
    a = SelfAttention(self.cfg, self.dtype, self.peft, name="self")(h_BxLxD, mask, prefix_kv)
    return Output(self.cfg, ("heads", "embed"), "attn", self.dtype, self.peft,
                  name="output")(a, h_BxLxD)


class Intermediate(nn.Module):
  cfg: BertConfig
  dtype: Any = jnp.float32
  peft: layers.PeftHooks = layers.NO_PEFT

  @nn.compact
  def __call__(self, h_BxLxD):
    y = layers.Dense(self.cfg.intermediate_size, ("embed", "mlp"), True, self.dtype,
                     peft=self.peft, name="dense")(h_BxLxD)
    return layers.ACTIVATIONS[self.cfg.activation](y)


class Layer(nn.Module):
  cfg: BertConfig
  dtype: Any = jnp.float32
  peft: layers.PeftHooks = layers.NO_PEFT

  @nn.compact
  def __call__(self, h_BxLxD, mask, prefix_kv=None):
    cfg, spec = self.cfg, self.peft
    h_BxLxD = Attention(cfg, self.dtype, spec, name="attention")(h_BxLxD, mask, prefix_kv)
    mid = Intermediate(cfg, self.dtype, spec, name="intermediate")(h_BxLxD)
    return Output(cfg, ("mlp", "embed"), "ffn", self.dtype, spec, name="output")(mid, h_BxLxD)


class Embeddings(nn.Module):
  """Word, position and token-type tables and their LayerNorm (HF's BertEmbeddings)."""

  cfg: BertConfig
  dtype: Any = jnp.float32

  def setup(self):
    cfg = self.cfg
    self.word_embeddings = layers.Embed(cfg.vocab_size, cfg.hidden_size, self.dtype)
    self.position_embeddings = layers.Embed(cfg.max_positions, cfg.hidden_size, self.dtype)
    self.token_type_embeddings = layers.Embed(cfg.type_vocab_size, cfg.hidden_size, self.dtype)
    # HF's name, kept so the parameter path reads like the checkpoint's
    self.LayerNorm = layers.LayerNorm(cfg.layer_norm_eps, self.dtype)  # pylint: disable=C0103

  def words(self, tokens_BxL):
    return self.word_embeddings(tokens_BxL)

  def __call__(self, h_BxLxD, positions_BxL):
    types = self.token_type_embeddings(jnp.zeros_like(positions_BxL))
    return self.LayerNorm(h_BxLxD + self.position_embeddings(positions_BxL) + types)


class Bert(nn.Module):
  cfg: BertConfig
  dtype: Any = jnp.float32
  peft: layers.PeftHooks = layers.NO_PEFT
  remat: str = "none"
  num_labels: int = 0
  attention: str = "xla"  # xla | cudnn (fused flash attention on GPUs; unpacked rows only)

  embed_path = "embeddings/word_embeddings/embedding"
  causal_lm = False

  @nn.compact
  def __call__(self, tokens_BxL, positions_BxL, segment_ids_BxL, cache: Optional[dict] = None,
               virtual_tokens: bool = True):
    cfg, spec = self.cfg, self.peft
    if cache is not None:
      raise UserError("BERT encoders do not generate text")
    embeddings = Embeddings(cfg, self.dtype, name="embeddings")
    h, positions_BxL, segment_ids_BxL, soft = common.soft_prompt(
        self, embeddings.words(tokens_BxL), positions_BxL, segment_ids_BxL, spec, self.dtype,
        virtual_tokens)
    h = layers.dropout(self, cfg.hidden_dropout, embeddings(h, positions_BxL))
    masks, prefixes, _, _ = common.masks_and_prefixes(
        self, positions_BxL, segment_ids_BxL, None, spec, cfg, self.dtype, causal=False,
        attention=self.attention)
    layer = Layer if self.remat == "none" else nn.remat(Layer,
                                                        policy=layers.REMAT_POLICIES[self.remat])
    for i in range(cfg.num_layers):
      h = layer(cfg, self.dtype, spec, name=f"layer_{i}")(
          h, masks[None], None if prefixes is None else prefixes[i])
    if not self.num_labels:
      return h[:, soft:].astype(jnp.float32), None
    # [CLS] is the sequence's first position (a soft prompt's first token under prompt
    # tuning, as in HF PEFT, where the soft tokens come first).
    pooled = layers.Dense(cfg.hidden_size, ("embed", None), True, self.dtype,
                          name="pooler")(h[:, 0])
    pooled = layers.dropout(self, cfg.classifier_dropout, jnp.tanh(pooled))
    logits = layers.Dense(self.num_labels, ("embed", None), True, self.dtype,
                          name="classifier")(pooled)
    return logits.astype(jnp.float32), None


_NORM = [("weight", "scale", False), ("bias", "bias", False)]
_LINEAR = [("weight", "kernel", True), ("bias", "bias", False)]
# (HF name, ftjax path, transpose)
TABLE = (
    *[(f"bert.embeddings.{n}.weight", f"embeddings/{n}/embedding", False)
      for n in ["word_embeddings", "position_embeddings", "token_type_embeddings"]],
    *[(f"bert.embeddings.LayerNorm.{w}", f"embeddings/LayerNorm/{p}", t) for w, p, t in _NORM],
    *[(f"bert.encoder.layer.{{i}}.{m}.{w}", f"layer_{{i}}/{m.replace('.', '/')}/{p}", t)
      for m, rows in [("attention.self.query", _LINEAR), ("attention.self.key", _LINEAR),
                      ("attention.self.value", _LINEAR), ("attention.output.dense", _LINEAR),
                      ("attention.output.LayerNorm", _NORM), ("intermediate.dense", _LINEAR),
                      ("output.dense", _LINEAR), ("output.LayerNorm", _NORM)]
      for w, p, t in rows],
    *[(f"bert.pooler.dense.{w}", f"pooler/{p}", t) for w, p, t in _LINEAR],
    *[(f"classifier.{w}", f"classifier/{p}", t) for w, p, t in _LINEAR],
)

FAMILY = Family(
    "bert", ARCHITECTURES, BertConfig.from_hf, Bert, TABLE, "bert.",
    embedding="embeddings/word_embeddings/embedding", layer=r"(?:^|/)layer_(\d+)/",
    kinds=(("embedding", r"^embeddings/"), ("norm", r"LayerNorm/"), ("attention", r"/attention/"),
           ("mlp", r"/(intermediate|output)/"), ("head", r"^(pooler|classifier)/")),
    heads=("classifier",), classifier_head="classifier", optional=("classifier", "pooler"),
    classifiers={"bert": "BertForSequenceClassification"}, causal_lm=False)
