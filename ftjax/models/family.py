"""`Family`: what one model family declares so that generic code never names its modules.

Mapping tables are data: a row names an HF tensor, the ftjax parameter path it becomes (`{i}`
is the layer index) and whether the matrix is transposed (torch Linear stores (out, in); ftjax
kernels are (in, out)).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Optional

import jax.numpy as jnp

@functools.cache
def _compile(template: str) -> re.Pattern:
  return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


@dataclasses.dataclass(frozen=True)
class Family:
  """One model family.

  Attributes:
    name: the family's name ('llama', 'gpt2', ...).
    architectures: {HF architecture: HF model_type}, causal-LM and classifier classes alike.
    config_from_hf: parsed config.json -> the family's model config (UserError if unsupported).
    module: the Flax module class, built as module(cfg, dtype, num_labels=...).
    table: (HF name, ftjax path, transpose) rows.
    base_prefix: what HF task models put before the base model's tensor names (a bare base
      model checkpoint lacks it).
    embedding: the token-embedding table's path.
    layer: a regex whose group 1 is the layer index of a path inside a layer.
    kinds: (kind, regex) pairs, first match wins: which module kind a path belongs to
      (embedding, attention, mlp, norm, head); layer-wise lr places `embedding` below layer 0.
    heads: top-level modules that are output or classification heads (never in LoRA's or
      IA3's all-linear).
    output_head: the path of an untied output head's kernel (tied models share `embedding`).
    classifier_head: the top-level module of the sequence-classification head.
    optional: top-level modules a checkpoint may lack (they start freshly initialised).
    classifiers: {HF model_type: the *ForSequenceClassification architecture} for exports.
    conv1d: HF stores this family's dense weights (in, out) (PEFT's fan_in_fan_out).
    causal_lm: False for encoders (classification only, no generation).
  """

  name: str
  architectures: dict
  config_from_hf: Callable[[dict], Any]
  module: Any
  table: tuple
  base_prefix: str
  embedding: str
  layer: str
  kinds: tuple
  heads: tuple = ("lm_head", "score")
  output_head: str = "lm_head/kernel"
  classifier_head: str = "score"
  optional: tuple = ("score",)
  classifiers: dict = dataclasses.field(default_factory=dict)
  conv1d: bool = False
  causal_lm: bool = True

  def __hash__(self):
    return hash(self.name)

  def from_hf(self, hf_name: str) -> Optional[tuple[str, bool]]:
    """HF tensor name -> (ftjax path, transpose), or None if no row matches."""
    for hf_tpl, ours, transpose in self.table:
      m = _compile(hf_tpl).match(hf_name)
      if m:
        return ours.replace("{i}", m.groupdict().get("i") or ""), transpose
    return None

  def to_hf(self, path: str) -> tuple[str, bool]:
    """ftjax parameter path -> (HF tensor name, transpose)."""
    for hf_tpl, ours, transpose in self.table:
      m = _compile(ours).match(path)
      if m:
        return hf_tpl.replace("{i}", m.groupdict().get("i") or ""), transpose
    raise KeyError(f"no HF name for parameter '{path}'")

  def is_head(self, path: str) -> bool:
    """Whether `path` belongs to an output or classification head."""
    return path.split("/", 1)[0] in self.heads

  def is_classifier(self, path: str) -> bool:
    """Whether `path` belongs to the classification head (always trained, exported with it)."""
    return path.split("/", 1)[0] == self.classifier_head

  def is_optional(self, path: str) -> bool:
    return path.split("/", 1)[0] in self.optional

  def layer_index(self, path: str) -> Optional[int]:
    """The index of the layer `path` is in, or None outside the layers."""
    found = re.search(self.layer, path)
    return int(found.group(1)) if found else None

  def kind(self, path: str) -> Optional[str]:
    """The module kind of `path` (one of KINDS), or None."""
    return next((kind for kind, regex in self.kinds if re.search(regex, path)), None)

  def classifier_config(self, hf_config: dict, labels: list[str], pad_id: int) -> dict:
    """config.json entries that make an export load as `AutoModelForSequenceClassification`."""
    return {"architectures": [self.classifiers[hf_config.get("model_type", self.name)]],
            "id2label": {str(i): name for i, name in enumerate(labels)},
            "label2id": {name: i for i, name in enumerate(labels)},
            "problem_type": "single_label_classification", "pad_token_id": pad_id}


def init_cache(cfg: Any, batch: int, max_len: int, dtype=jnp.float32) -> dict:
  """An empty KV cache for `max_len` positions of a decoder with `cfg.num_layers` layers of
  `cfg.num_kv_heads` heads of `cfg.head_dim` (segment id 0 marks unwritten slots). Under prompt
  tuning `max_len` must count the soft tokens too."""
  shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  return {
      "index": jnp.zeros((), jnp.int32),
      "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
      "layers": [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers)],
  }
