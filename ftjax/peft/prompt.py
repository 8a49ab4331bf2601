"""Prompt tuning: m trained soft-token embeddings prepended to the input embeddings.

The soft tokens take positions 0..m-1 and the real tokens follow from m, as in HF PEFT; the
model drops the soft positions' logits, so labels and masks need no shifting outside it.
Initialisation: rows of the vocabulary's embeddings (`vocab`, PEFT's SAMPLE_VOCAB), the
embeddings of a text repeated to length m (`text`), or Gaussian noise with the embedding
table's standard deviation (`random`). Parameter: `prompt/embedding` (m, hidden).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftjax.config import PeftConfig, UserError
from ftjax.peft.base import Context, Method


class Prompt(nn.Module):
  length: int
  features: int

  @nn.compact
  def __call__(self) -> jax.Array:
    return self.param("embedding", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, "embed")), (self.length, self.features))


@dataclasses.dataclass(frozen=True)
class PromptTuning(Method):
  """`prompt_len` soft tokens, initialised by `init` (vocab | random | text)."""

  prompt_len: int = 16
  init: str = "vocab"

  method: ClassVar[str] = "prompt"
  peft_type: ClassVar[str] = "PROMPT_TUNING"
  peft_prefix: ClassVar[str] = "base_model."
  merge_refusal: ClassVar[str] = ("prompt tuning adds virtual tokens that cannot be merged into "
                                  "the base weights; export it with --to peft")

  @classmethod
  def from_config(cls, cfg: PeftConfig, ctx: Context) -> "PromptTuning":
    return cls(cfg.prompt.length, cfg.prompt.init)

  def prompt(self, module, features):
    return Prompt(self.prompt_len, features, name="prompt")()

  def finish(self, flat, rng, text_ids, ctx):
    return finish(self, flat, rng, text_ids, ctx.family.embedding)

  def to_peft(self, flat: dict, ctx: Context) -> tuple[dict, dict]:
    return to_peft(self, flat, ctx.model_cfg)

  @classmethod
  def from_peft(cls, adapter, tensors, ctx, where):
    fields, leaves = from_peft(adapter, tensors, ctx.model_cfg, where)
    return fields, leaves, {"prompt_embeddings"}


def finish(spec, flat: dict, rng: jax.Array, text_ids: Optional[list[int]],
           embed_path: str) -> dict:
  """Initialises the soft tokens from the loaded token-embedding table at `embed_path`."""
  table = flat[embed_path]
  m = spec.prompt_len
  if spec.init == "text":
    ids = np.resize(np.asarray(text_ids, np.int32), m)  # repeated, then cut to m
    soft = jnp.take(table, ids, axis=0)
  elif spec.init == "vocab":
    soft = jnp.take(table, jax.random.randint(rng, (m,), 0, table.shape[0]), axis=0)
  else:
    soft = jax.random.normal(rng, (m, table.shape[1])) * jnp.std(table.astype(jnp.float32))
  return {**flat, "prompt/embedding": soft.astype(jnp.float32)}


def to_peft(spec, flat: dict, model_cfg) -> tuple[dict, dict]:
  config = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": spec.prompt_len,
            "token_dim": model_cfg.hidden_size, "num_attention_heads": model_cfg.num_heads,
            "num_layers": model_cfg.num_layers, "num_transformer_submodules": 1,
            "prompt_tuning_init": "RANDOM"}
  return config, {"prompt_embeddings": np.asarray(flat["prompt/embedding"])}


def from_peft(adapter: dict, tensors: dict, model_cfg, where: str) -> tuple[dict, dict]:
  soft = tensors.get("prompt_embeddings")
  if soft is None or soft.ndim != 2 or soft.shape[1] != model_cfg.hidden_size:
    raise UserError(f"{where}: expected prompt_embeddings of shape (virtual tokens, "
                    f"{model_cfg.hidden_size}), got {None if soft is None else tuple(soft.shape)}")
  return {"length": int(soft.shape[0])}, {"prompt/embedding": soft}
