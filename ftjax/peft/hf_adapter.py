"""HF PEFT adapter directories <-> ftjax PEFT parameters (adapter_config.json + safetensors).

Key names follow PEFT: LoRA tensors under `base_model.model.<module>.lora_{A,B}.weight` (torch
(out, in) layout), prompt-learning tensors as `prompt_embeddings`, and trained base modules
(`modules_to_save`) as `<prefix><HF tensor name>`, where the prefix is `base_model.model.` for
LoRA and `base_model.` for prompt learning (PEFT wraps the model one level less deep there).
Reading is strict: a config option or a tensor ftjax would not reproduce exactly is an error,
never silently dropped.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from ftjax import hf, tree
from ftjax.config import UserError
from ftjax.peft import lora, prefix, prompt

PEFT_TYPES = {"LORA": "lora", "PREFIX_TUNING": "prefix", "PROMPT_TUNING": "prompt"}
METHODS = {"lora": lora, "prefix": prefix, "prompt": prompt}
# LoRA options that change the computation in ways ftjax does not implement (default = fine).
UNSUPPORTED = ("rank_pattern", "alpha_pattern", "lora_bias", "layer_replication",
               "trainable_token_indices", "target_parameters", "use_qalora", "fan_in_fan_out",
               "megatron_config", "layers_to_transform")
EMBED = "embed_tokens/embedding"


def _prefix(method: str) -> str:
  return "base_model.model." if method == "lora" else "base_model."


def _hf_module(table: list, module_path: str) -> str:
  """ftjax module path -> HF module name ('layers_0/self_attn/q_proj' -> 'model.layers.0...')."""
  return hf.path_to_hf(table, f"{module_path}/kernel")[0].rsplit(".", 1)[0]


def save(out_dir: str, spec, params: dict, trained_base: set[str], table: list, model_cfg,
         base_model: str, task_type: str = "CAUSAL_LM") -> None:
  """Writes an HF PEFT adapter; trained base modules (and a classification head, for
  `task_type` SEQ_CLS) go out as `modules_to_save`.

  Raises:
    UserError: for a method or a set of trained base parameters PEFT cannot hold.
  """
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel

  if spec.method not in METHODS:
    raise UserError(f"peft.method {spec.method} has no HF PEFT adapter format")
  flat = tree.flatten(params)
  if spec.method == "lora":
    config, tensors = lora.to_peft(spec, flat, lambda m: _hf_module(table, m))
    config["fan_in_fan_out"] = model_cfg.family == "gpt2"  # Conv1D (in, out) weights
  else:
    config, tensors = METHODS[spec.method].to_peft(spec, flat, model_cfg)
  modules = sorted({p.rsplit("/", 1)[0] for p in trained_base})
  for m in modules:
    partial = sorted(p for p in flat if p.startswith(m + "/") and p not in trained_base
                     and p.rsplit("/", 1)[-1] not in lora.LEAVES)
    if partial:
      raise UserError(f"PEFT's modules_to_save holds whole modules, but only part of '{m}' was "
                      f"trained ({partial[0]} was frozen); export with --to hf instead")
    if m in spec.lora_modules:
      raise UserError(f"'{m}' has both LoRA and fully trained weights, which PEFT cannot hold "
                      "(modules_to_save cannot wrap a LoRA layer); export with --to hf instead")
  if EMBED in trained_base and model_cfg.tie_word_embeddings:
    if spec.method != "lora":
      raise UserError("the trained embeddings are tied to the output head, which a PEFT "
                      f"{spec.method} adapter cannot express; export with --to hf instead")
    config["ensure_weight_tying"] = True  # PEFT then wraps lm_head too, tied to embed_tokens
    tensors[_prefix(spec.method) + "lm_head.weight"] = np.asarray(flat[EMBED], np.float32)
  for p in sorted(trained_base):
    name, transpose = hf.path_to_hf(table, p)
    array = np.asarray(flat[p], np.float32)
    tensors[_prefix(spec.method) + name] = array.T if transpose else array
  names = sorted({hf.path_to_hf(table, p)[0].rsplit(".", 1)[0] for p in trained_base})
  config.update({"task_type": task_type, "base_model_name_or_path": base_model,
                 "inference_mode": True, "modules_to_save": names or None})
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
            os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})


def _read(adapter_dir: str) -> tuple[dict, dict, str]:
  config_file = os.path.join(adapter_dir, "adapter_config.json")
  weights = os.path.join(adapter_dir, "adapter_model.safetensors")
  if not os.path.isfile(config_file):
    raise UserError(f"peft.init_from: {adapter_dir} is not a PEFT adapter (no adapter_config.json)")
  if not os.path.isfile(weights):
    raise UserError(f"peft.init_from: {adapter_dir} has no adapter_model.safetensors "
                    "(pickled adapter_model.bin is never loaded)")
  try:
    with open(config_file) as f:
      adapter = json.load(f)
  except json.JSONDecodeError as e:
    raise UserError(f"{config_file}: not valid JSON ({e})") from None
  if not isinstance(adapter, dict):
    raise UserError(f"{config_file}: expected a JSON object")
  try:
    with safe_open(weights, framework="flax") as f:  # reads bf16 too
      tensors = {k: np.asarray(jnp.asarray(f.get_tensor(k), jnp.float32)) for k in f.keys()}
  except (SafetensorError, OSError) as e:
    raise UserError(f"{weights}: not a readable safetensors file ({e})") from None
  return adapter, tensors, config_file


def load(adapter_dir: str, table: list, model_cfg) -> tuple[str, dict, dict, set[str]]:
  """Reads an HF PEFT adapter directory.

  Returns:
    (method, the method's config fields, ftjax leaves by path, trained base paths).

  Raises:
    UserError: naming the file and the option or tensor ftjax cannot reproduce exactly.
  """
  adapter, tensors, config_file = _read(adapter_dir)
  weights = os.path.join(adapter_dir, "adapter_model.safetensors")
  kind = adapter.get("peft_type")
  if kind not in PEFT_TYPES:
    raise UserError(f"{config_file}: peft_type {kind!r} is not supported "
                    f"(supported: {', '.join(PEFT_TYPES)})")
  method = PEFT_TYPES[kind]
  for key in UNSUPPORTED:
    if key == "fan_in_fan_out" and model_cfg.family == "gpt2":
      continue  # GPT-2's Conv1D weights are (in, out): PEFT sets it for them
    if adapter.get(key) not in (None, False, {}, []):
      raise UserError(f"{config_file}: {key}={adapter[key]!r} is not supported")
  if adapter.get("bias", "none") != "none":
    raise UserError(f"{config_file}: bias={adapter['bias']!r} is not supported (only 'none')")
  base, own = {}, {}
  start = _prefix(method)
  for key, value in tensors.items():
    mapped = hf.hf_to_path(table, key[len(start):]) if key.startswith(start) else None
    if mapped:  # a modules_to_save copy of a base tensor
      path, transpose = mapped
      base[path] = value.T if transpose else value
    else:
      own[key] = value
  if model_cfg.tie_word_embeddings:
    head = base.get("lm_head/kernel")
    if head is not None and adapter.get("ensure_weight_tying") and EMBED in base and \
        np.array_equal(head.T, base[EMBED]):
      del base["lm_head/kernel"]  # the tied copy PEFT saves beside the embeddings
    if "lm_head/kernel" in base:
      raise UserError(f"{weights}: the adapter trains lm_head, but this model ties it to "
                      "embed_tokens")
    if EMBED in base and not adapter.get("ensure_weight_tying"):
      raise UserError(f"{weights}: the adapter trains embed_tokens without "
                      "ensure_weight_tying on a model with tied embeddings")
  if method == "lora":
    def to_module(name: str) -> str:
      mapped = hf.hf_to_path(table, name[len(start):] + ".weight")
      if mapped is None:
        raise UserError(f"{weights}: LoRA tensor for unknown module '{name}'")
      return mapped[0].rsplit("/", 1)[0]
    fields, leaves, used = lora.from_peft(adapter, own, to_module, weights)
  else:
    fields, leaves = METHODS[method].from_peft(adapter, own, model_cfg, weights)
    used = {"prompt_embeddings"}
  unused = sorted(set(own) - used)
  if unused:
    raise UserError(f"{weights}: tensor '{unused[0]}' is not part of what ftjax can load "
                    f"({len(unused)} such tensor(s))")
  return method, fields, {**leaves, **base}, set(base)
