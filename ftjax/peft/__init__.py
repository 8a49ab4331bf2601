"""Parameter-efficient fine-tuning: one spec, one dispatch over LoRA, adapters, prefix, prompt.

A method adds parameters to the model (the model reads a hashable `Spec` to build them) and
narrows the set of trained parameter paths; everything else is frozen. The flow:

  spec = peft.build_spec(cfg.peft, base_paths, model_cfg)
  module = module.clone(peft=spec)
  params = peft.init(module, base_params, rng)          # base + fresh PEFT leaves
  trained = peft.trainable_paths(cfg.peft, base_paths, params)

Freezing by pattern (`peft.trainable`, `peft.frozen`) works alone (method none: BitFit, last
layers, norms only) and on top of any method (LoRA plus a trained head).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from ftjax import tree
from ftjax.config import PeftConfig, UserError
from ftjax.peft import lora, prefix, prompt


@dataclasses.dataclass(frozen=True)
class Spec:
  """What a model builds beyond its base weights. Hashable: it is part of the Flax module."""

  method: str = "none"
  lora_modules: frozenset = frozenset()  # module paths, e.g. 'layers_0/self_attn/q_proj'
  lora_r: int = 0
  lora_alpha: float = 0.0
  lora_scale: float = 0.0
  lora_dropout: float = 0.0
  rslora: bool = False
  dora: bool = False
  adapter_size: int = 0
  adapter_positions: tuple = ()
  adapter_activation: str = "relu"
  prefix_len: int = 0
  prefix_hidden: int = 0  # 0: flat prefixes, > 0: through the MLP reparameterisation
  prompt_len: int = 0
  prompt_init: str = "vocab"

  def lora_at(self, path: tuple) -> bool:
    return bool(self.lora_modules) and "/".join(path) in self.lora_modules

  @property
  def virtual_tokens(self) -> int:
    """Positions the real tokens are shifted by (prefix or soft-prompt length)."""
    return self.prefix_len + self.prompt_len


NONE = Spec()


def build_spec(cfg: PeftConfig, base_paths: list[str], model_cfg) -> Spec:
  """The Spec for `cfg` on a model with these parameter paths and this config."""
  if cfg.method == "none":
    return NONE
  if cfg.method == "lora":
    return Spec("lora", lora.modules(cfg.lora, base_paths), cfg.lora.r, cfg.lora.alpha,
                lora.scale(cfg.lora), cfg.lora.dropout, cfg.lora.rslora, cfg.lora.dora)
  if cfg.method == "adapter":
    return Spec("adapter", adapter_size=cfg.adapter.size,
                adapter_positions=tuple(sorted(set(cfg.adapter.positions))),
                adapter_activation=cfg.adapter.activation)
  if cfg.method == "prefix":
    hidden = (cfg.prefix.projection_hidden or model_cfg.hidden_size) if cfg.prefix.projection \
        else 0
    return Spec("prefix", prefix_len=cfg.prefix.length, prefix_hidden=hidden)
  return Spec("prompt", prompt_len=cfg.prompt.length, prompt_init=cfg.prompt.init)


def check_context(spec: Spec, seq_len: int, max_positions: Optional[int], where: str) -> None:
  """Virtual tokens plus the longest sequence must fit the model's position range."""
  if max_positions and spec.virtual_tokens + seq_len > max_positions:
    what = f"peft.{spec.method}.length ({spec.virtual_tokens}) + " if spec.virtual_tokens else ""
    raise UserError(f"{what}data.seq_len ({seq_len}) exceeds the context of {where} "
                    f"({max_positions} positions)")


def init(module, base: dict, rng: jax.Array, text_ids: Optional[list[int]] = None) -> dict:
  """The base parameters plus freshly initialised PEFT leaves for `module.peft`."""
  spec = module.peft
  base_flat = tree.flatten(base)
  init_rng, finish_rng = jax.random.split(rng)

  @jax.jit
  def fresh(key):  # only the new leaves leave the jit, so XLA drops the base initialisers
    tokens = jnp.zeros((1, 1), jnp.int32)
    full = tree.flatten(tree.unbox(module.init(key, tokens, tokens, tokens)["params"]))
    return {p: v for p, v in full.items() if p not in base_flat}

  flat = {**base_flat, **fresh(init_rng)}
  if spec.method == "lora":
    flat = lora.finish(spec, flat)
  elif spec.method == "prompt":
    flat = prompt.finish(spec, flat, finish_rng, text_ids, module.embed_path)
  return tree.unflatten(flat)


def trainable_paths(cfg: PeftConfig, base_paths: list[str], params: dict) -> set[str]:
  """Which leaves train: the method's own, plus `peft.trainable`, minus `peft.frozen`."""
  paths = list(tree.flatten(params))
  base = set(base_paths)
  if cfg.trainable:
    chosen = tree.match(cfg.trainable, base_paths, "peft.trainable (over base-model parameters)")
  else:
    chosen = set(base) if cfg.method == "none" else set()
  chosen |= {p for p in paths if p not in base}
  if cfg.frozen:
    chosen -= tree.match(cfg.frozen, paths, "peft.frozen")
  if not chosen:
    raise UserError("peft: no parameter is left to train (check peft.trainable / peft.frozen)")
  return chosen


def eject(spec: Spec, params: dict) -> tuple[Spec, dict]:
  """The inference form: prefix MLPs replaced by the flat prefixes they produce."""
  if spec.method != "prefix" or not spec.prefix_hidden:
    return spec, params
  return dataclasses.replace(spec, prefix_hidden=0), tree.unflatten(
      prefix.eject(tree.flatten(params)))


def merge_refusal(method: str) -> Optional[str]:
  """Why a method cannot be merged into the base weights, or None if it can."""
  if method == "adapter":
    return ("bottleneck adapters add layers that cannot be merged into the base weights, and HF "
            "PEFT has no format for them; keep using the run's checkpoint with ftjax")
  if method in ("prefix", "prompt"):
    return (f"{method} tuning adds virtual tokens that cannot be merged into the base weights; "
            "export it with --to peft")
  return None


def merge(spec: Spec, params: dict) -> dict:
  """Base-model parameters with the method folded in (LoRA / DoRA; nothing to fold for none)."""
  refusal = merge_refusal(spec.method)
  if refusal:
    raise UserError(refusal)
  if spec.method == "none":
    return params
  return tree.unflatten(lora.merge(spec, tree.flatten(params)))
