"""The interface every PEFT method implements, and what a method is told about the model.

A method is one module in ftjax/peft/ holding a frozen dataclass that subclasses `Method`:

- its fields are the method's resolved settings (hashable: the object becomes the model's
  `peft` attribute, and the family's modules call its hooks, `models.layers.PeftHooks`);
- `from_config` resolves `peft.<name>` for one model (targets to module paths, sizes);
- `finish` sets initial values that depend on the loaded weights (DoRA's magnitudes, prompt
  tokens from the vocabulary);
- `merge` folds the method into the base weights, or `merge_refusal` says why it cannot;
- `to_peft` / `from_peft` write and read HF PEFT's adapter format (`peft_type` names it; None:
  PEFT has no such method).

Adding a method is one such module plus a line in `ftjax/peft/__init__.METHODS` and its
`peft.<name>` section in `ftjax/config.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional

import jax

from ftjax import tree
from ftjax.config import PeftConfig, UserError
from ftjax.models import layers


@dataclasses.dataclass(frozen=True)
class Context:
  """What a method knows about the model it is added to.

  Attributes:
    model_cfg: the family's model config (num_layers, hidden_size, num_kv_heads, ...).
    family: the model family (`ftjax.models.Family`): HF tables and parameter paths.
    base_paths: the base model's parameter paths.
  """

  model_cfg: Any
  family: Any
  base_paths: tuple = ()

  def hf_module(self, module_path: str) -> str:
    """ftjax module path -> HF module name ('layers_0/self_attn/q_proj' -> 'model.layers.0...')."""
    return self.family.to_hf(f"{module_path}/kernel")[0].rsplit(".", 1)[0]

  def module_path(self, hf_module: str) -> Optional[str]:
    """HF module name -> ftjax module path, or None when the model has no such dense layer."""
    mapped = self.family.from_hf(hf_module + ".weight")
    return mapped[0].rsplit("/", 1)[0] if mapped else None

  def dense_modules(self, patterns: list[str], what: str) -> frozenset[str]:
    """The dense modules whose kernel path a pattern finds; `all-linear` means every dense
    layer except the output and classification heads (as in HF PEFT)."""
    kernels = [p for p in self.base_paths if p.endswith("/kernel")]
    found = tree.match([t for t in patterns if t != "all-linear"], kernels, what)
    if "all-linear" in patterns:
      found |= {p for p in kernels if not self.family.is_head(p)}
    return frozenset(p.rsplit("/", 1)[0] for p in found)


@dataclasses.dataclass(frozen=True)
class Method(layers.PeftHooks):
  """A PEFT method (see the module docstring). The base class adds nothing: `peft.method none`
  (full fine-tuning, or freezing by pattern alone)."""

  method: ClassVar[str] = "none"
  peft_type: ClassVar[Optional[str]] = None
  # What HF PEFT puts before a base model's tensor names in this method's adapters.
  peft_prefix: ClassVar[str] = "base_model.model."
  merge_refusal: ClassVar[Optional[str]] = None  # why `merge` cannot work, if it cannot
  # Tokens added to the vocabulary, and which frozen tables train their rows as separate leaves
  # (`new_tokens/embedding`, `new_tokens/lm_head`; see ftjax/peft/tokens.py). Set by
  # ftjax.assembly after the method is resolved, for any method (none included).
  new_tokens: tuple = dataclasses.field(default=(), kw_only=True)
  new_token_leaves: tuple = dataclasses.field(default=(), kw_only=True)

  @classmethod
  def from_config(cls, cfg: PeftConfig, ctx: Context) -> "Method":
    """The method's settings for one model, from the `peft` config section."""
    del cfg, ctx
    return cls()

  def finish(self, flat: dict, rng: jax.Array, text_ids: Optional[list[int]],
             ctx: Context) -> dict:
    """Initial values that depend on the loaded base weights; `flat` holds all parameters."""
    del rng, text_ids, ctx
    return flat

  def merge(self, flat: dict) -> dict:
    """Base-model parameters with the method folded in."""
    if self.merge_refusal:
      raise UserError(self.merge_refusal)
    return flat

  def eject(self, flat: dict) -> tuple["Method", dict]:
    """The inference form of the method and its parameters (e.g. prefix MLPs computed once)."""
    return self, flat

  def to_peft(self, flat: dict, ctx: Context) -> tuple[dict, dict]:
    """(adapter_config.json fields, tensors by PEFT key) of an HF PEFT adapter."""
    raise UserError(f"peft.method {self.method} has no HF PEFT adapter format")

  @classmethod
  def from_peft(cls, adapter: dict, tensors: dict, ctx: Context, where: str
                ) -> tuple[dict, dict, set[str]]:
    """(peft.<method> config fields, ftjax leaves by path, the tensor keys used) from an HF
    PEFT adapter's config and tensors (trained base modules already taken out)."""
    raise UserError(f"{where}: peft.method {cls.method} cannot be read from HF PEFT")


NONE = Method()
