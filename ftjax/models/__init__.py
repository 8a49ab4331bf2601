"""Model families and their registry.

A family is one module in ftjax/models/ that declares a `Family`: the HF architectures it
reads, how to read their config.json, its Flax module, its HF tensor table, the parameter paths
generic code needs (embedding, output and classification heads, the layer pattern), its module
kinds and its KV cache. Generic code (optimizer groups, LoRA targets, PEFT formats, chunked
losses, generation) asks the family instead of naming `lm_head` or `layers_`. Adding a family
is one module plus a line in `FAMILIES` below.
"""

from __future__ import annotations

import functools
from typing import Optional

from ftjax.models import bert, gemma2, gemma3, gpt2, llama, phi3, qwen3
from ftjax.models.family import Family

FAMILIES: tuple[Family, ...] = (llama.FAMILY, qwen3.FAMILY, gemma2.FAMILY, gemma3.FAMILY,
                                phi3.FAMILY, gpt2.FAMILY, bert.FAMILY)


@functools.cache
def by_architecture() -> dict[str, Family]:
  """{HF architecture name: family} over every registered family."""
  return {arch: family for family in FAMILIES for arch in family.architectures}


def for_architecture(arch: Optional[str]) -> Optional[Family]:
  return by_architecture().get(arch)


def for_model_type(model_type: str) -> Family:
  """The family that reads HF configs of this `model_type`."""
  found = [f for f in FAMILIES if model_type in f.architectures.values()]
  if not found:
    raise KeyError(f"no registered model family reads model_type '{model_type}'")
  return found[0]


def for_module(module) -> Family:
  """The family whose Flax module `module` is."""
  found = [f for f in FAMILIES if type(module) is f.module]
  if not found:
    raise KeyError(f"{type(module).__name__} is no registered family's module")
  return found[0]


__all__ = ["FAMILIES", "Family", "by_architecture", "for_architecture", "for_model_type",
           "for_module"]
