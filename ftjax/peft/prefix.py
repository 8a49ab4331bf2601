"""Prefix tuning: trained key/value prefixes of length m prepended in every attention layer.

The prefixes form one (m, layers·2·kv_heads·head_dim) matrix, HF PEFT's layout: row block 2l
holds layer l's keys, 2l+1 its values, one prefix per KV head under grouped-query attention.
Training goes through the MLP reparameterisation P = W2·tanh(W1·E + b1) + b2 of a small
embedding E (Li & Liang, 2021); `eject` computes P once and keeps only the flat matrix, the form
used for inference and PEFT export. Prefix keys carry no rotary position; the real tokens'
positions start at m, as in HF when the prefix arrives as a cache.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftjax.config import PeftConfig, UserError
from ftjax.peft.base import Context, Method

MLP_LEAVES = ("prefix/embedding", "prefix/mlp_in/kernel", "prefix/mlp_in/bias",
              "prefix/mlp_out/kernel", "prefix/mlp_out/bias")


class Prefix(nn.Module):
  """Returns the per-layer prefixes as (layers, 2, m, kv_heads, head_dim)."""

  length: int
  num_layers: int
  num_kv_heads: int
  head_dim: int
  hidden: int  # 0: the flat matrix is the parameter; > 0: the MLP's hidden width
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self) -> jax.Array:
    token_dim = self.num_kv_heads * self.head_dim
    width = self.num_layers * 2 * token_dim
    normal = nn.initializers.normal(1.0)  # torch.nn.Embedding's N(0, 1), as PEFT uses
    if self.hidden:
      e = self.param("embedding", normal, (self.length, token_dim))
      h = jnp.tanh(nn.Dense(self.hidden, name="mlp_in")(e))
      kv = nn.Dense(width, name="mlp_out")(h)
    else:
      kv = self.param("kv", normal, (self.length, width))
    kv = kv.astype(self.dtype).reshape(self.length, self.num_layers, 2, self.num_kv_heads,
                                       self.head_dim)
    return kv.transpose(1, 2, 0, 3, 4)


def eject(flat: dict) -> dict:
  """Replaces the MLP reparameterisation by the flat prefix matrix it produces."""
  if "prefix/kv" in flat:
    return dict(flat)
  e, w1, b1, w2, b2 = (jnp.asarray(flat[p], jnp.float32) for p in MLP_LEAVES)
  out = {p: v for p, v in flat.items() if p not in MLP_LEAVES}
  out["prefix/kv"] = jnp.tanh(e @ w1 + b1) @ w2 + b2
  return out


@dataclasses.dataclass(frozen=True)
class PrefixTuning(Method):
  """`prefix_len` key/value prefixes per layer; `hidden` > 0 trains them through the MLP."""

  prefix_len: int = 16
  hidden: int = 0

  method: ClassVar[str] = "prefix"
  peft_type: ClassVar[str] = "PREFIX_TUNING"
  peft_prefix: ClassVar[str] = "base_model."
  merge_refusal: ClassVar[str] = ("prefix tuning adds virtual tokens that cannot be merged into "
                                  "the base weights; export it with --to peft")

  @classmethod
  def from_config(cls, cfg: PeftConfig, ctx: Context) -> "PrefixTuning":
    hidden = (cfg.prefix.projection_hidden or ctx.model_cfg.hidden_size) \
        if cfg.prefix.projection else 0
    return cls(cfg.prefix.length, hidden)

  def prefix(self, module, cfg, dtype):
    return Prefix(self.prefix_len, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, self.hidden,
                  dtype, name="prefix")()

  def eject(self, flat: dict) -> tuple["PrefixTuning", dict]:
    if not self.hidden:
      return self, flat
    return dataclasses.replace(self, hidden=0), eject(flat)

  def to_peft(self, flat: dict, ctx: Context) -> tuple[dict, dict]:
    return to_peft(self, flat, ctx.model_cfg)

  @classmethod
  def from_peft(cls, adapter, tensors, ctx, where):
    fields, leaves = from_peft(adapter, tensors, ctx.model_cfg, where)
    return fields, leaves, {"prompt_embeddings"}


def to_peft(spec, flat: dict, model_cfg) -> tuple[dict, dict]:
  config = {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": spec.prefix_len,
            "token_dim": model_cfg.num_kv_heads * model_cfg.head_dim,
            "num_attention_heads": model_cfg.num_kv_heads, "num_layers": model_cfg.num_layers,
            "num_transformer_submodules": 1, "prefix_projection": False,
            "encoder_hidden_size": model_cfg.hidden_size}
  return config, {"prompt_embeddings": np.asarray(eject(flat)["prefix/kv"])}


def from_peft(adapter: dict, tensors: dict, model_cfg, where: str) -> tuple[dict, dict]:
  kv = tensors.get("prompt_embeddings")
  width = model_cfg.num_layers * 2 * model_cfg.num_kv_heads * model_cfg.head_dim
  if kv is None or kv.ndim != 2 or kv.shape[1] != width:
    raise UserError(f"{where}: expected prompt_embeddings of shape (virtual tokens, {width}) "
                    f"for this model, got {None if kv is None else tuple(kv.shape)}")
  return {"length": int(kv.shape[0]), "projection": False}, {"prefix/kv": kv}
