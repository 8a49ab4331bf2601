"""Parameter-efficient fine-tuning: a registry of methods behind one interface (`base.Method`).

A method adds parameters to the model (the model calls the method's hooks) and narrows the set
of trained parameter paths; everything else is frozen. The flow:

  spec = peft.build_spec(cfg.peft, base_paths, model_cfg, family)   # a Method
  module = module.clone(peft=spec)
  params = peft.init(module, base_params, rng)          # base + fresh PEFT leaves

What trains — the method's own leaves by default, plus or minus what `partition.rules`,
`peft.trainable` and `peft.frozen` choose — is the partition of ftjax.rules (decided in
ftjax.assembly).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from ftjax import models, tree
from ftjax.config import PeftConfig, UserError
from ftjax.peft import adapter, ia3, lora, multi, prefix, prompt
from ftjax.peft.base import NONE, Context, Method

# peft.method -> its Method class. A new method: its module, and one line here.
METHODS: dict[str, type[Method]] = {
    "none": Method,
    "lora": lora.Lora,
    "adapter": adapter.Adapters,
    "prefix": prefix.PrefixTuning,
    "prompt": prompt.PromptTuning,
    "ia3": ia3.IA3,
}
# HF PEFT's peft_type -> peft.method, for the methods PEFT can hold.
PEFT_TYPES = {cls.peft_type: name for name, cls in METHODS.items() if cls.peft_type}

def build_spec(cfg: PeftConfig, base_paths: list[str], model_cfg, family=None) -> Method:
  """The resolved method of `cfg` for a model with these parameter paths and this config."""
  family = family or models.for_model_type(model_cfg.family)
  cls = multi.MultiLora if cfg.adapters else METHODS[cfg.method]
  return cls.from_config(cfg, Context(model_cfg, family, tuple(base_paths)))


def check_context(spec: Method, seq_len: int, max_positions: Optional[int], where: str) -> None:
  """Virtual tokens plus the longest sequence must fit the model's position range."""
  if max_positions and spec.virtual_tokens + seq_len > max_positions:
    what = f"peft.{spec.method}.length ({spec.virtual_tokens}) + " if spec.virtual_tokens else ""
    raise UserError(f"{what}data.seq_len ({seq_len}) exceeds the context of {where} "
                    f"({max_positions} positions)")


def init(module, base: dict, rng: jax.Array, text_ids: Optional[list[int]] = None,
         ctx: Optional[Context] = None, paths: Optional[set] = None) -> dict:
  """The base parameters plus freshly initialised PEFT leaves for `module.peft` (and any other
  leaf `base` lacks, e.g. a new classification head). `paths`: all of the module's parameter
  paths, when the caller has them (nothing is initialised when `base` holds them all)."""
  spec = module.peft
  base_flat = tree.flatten(base)
  init_rng, finish_rng = jax.random.split(rng)

  @jax.jit
  def fresh(key):  # only the new leaves leave the jit, so XLA drops the base initialisers
    tokens = jnp.zeros((1, 1), jnp.int32)
    full = tree.flatten(tree.unbox(module.init(key, tokens, tokens, tokens)["params"]))
    return {p: v for p, v in full.items() if p not in base_flat}

  flat = dict(base_flat)
  if paths is None or set(paths) - set(base_flat):
    flat.update(fresh(init_rng))
  if ctx is None:
    ctx = Context(module.cfg, models.for_module(module), tuple(base_flat))
  return tree.unflatten(spec.finish(flat, finish_rng, text_ids, ctx))


def eject(spec: Method, params: dict) -> tuple[Method, dict]:
  """The inference form: e.g. prefix MLPs replaced by the flat prefixes they produce."""
  spec, flat = spec.eject(tree.flatten(params))
  return spec, tree.unflatten(flat)


def merge_refusal(method: str) -> Optional[str]:
  """Why a method cannot be merged into the base weights, or None if it can."""
  return METHODS[method].merge_refusal


def merge(spec: Method, params: dict) -> dict:
  """Base-model parameters with the method folded in (LoRA / DoRA; nothing to fold for none)."""
  return tree.unflatten(spec.merge(tree.flatten(params)))


__all__ = ["METHODS", "PEFT_TYPES", "NONE", "Context", "Method", "build_spec", "check_context",
           "eject", "init", "merge", "merge_refusal", "multi"]
