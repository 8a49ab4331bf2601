"""HF PEFT adapter directories <-> ftjax PEFT parameters (adapter_config.json + safetensors).

What is generic to PEFT's format lives here; each method's own tensors and config fields are
its `to_peft` / `from_peft` (ftjax/peft/<method>.py). Trained base modules (`modules_to_save`)
go out as `<prefix><HF tensor name>`, where the prefix is the method's `peft_prefix`
(`base_model.model.` for LoRA and IA3, `base_model.` for prompt learning, which PEFT wraps one
level less deep). Reading is strict: a config option or a tensor ftjax would not reproduce
exactly is an error, never silently dropped.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from ftjax import peft, tree
from ftjax.config import UserError
from ftjax.peft import tokens
from ftjax.peft.base import Context, Method

# Options that change the computation in ways ftjax does not implement (default = fine).
UNSUPPORTED = ("rank_pattern", "alpha_pattern", "lora_bias", "layer_replication",
               "trainable_token_indices", "target_parameters", "use_qalora", "fan_in_fan_out",
               "megatron_config", "layers_to_transform")


def save(out_dir: str, spec: Method, params: dict, trained_base: set[str], ctx: Context,
         base_model: str, task_type: str = "CAUSAL_LM") -> None:
  """Writes an HF PEFT adapter; trained base modules (and a classification head, for
  `task_type` SEQ_CLS) go out as `modules_to_save`.

  Raises:
    UserError: for a method or a set of trained base parameters PEFT cannot hold.
  """
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel

  family, flat = ctx.family, tree.flatten(params)
  config, tensors = spec.to_peft(flat, ctx)
  if spec.new_tokens:  # the added tokens' rows, as PEFT's trainable tokens
    indices, rows = tokens.to_peft(spec, flat, trained_base, ctx)
    if indices is not None and spec.method != "lora":
      raise UserError(f"model.add_tokens: HF PEFT holds new tokens' rows "
                      f"(trainable_token_indices) beside LoRA only, not {spec.method}; export "
                      "with --to hf instead")
    if indices is not None:
      config["trainable_token_indices"] = indices
      tensors.update(rows)
  prefix = spec.peft_prefix
  modules = sorted({p.rsplit("/", 1)[0] for p in trained_base})
  base = set(ctx.base_paths)
  for m in modules:
    partial = sorted(p for p in flat if p.startswith(m + "/") and p not in trained_base
                     and (p in base or family.is_classifier(p)))
    if partial:
      raise UserError(f"PEFT's modules_to_save holds whole modules, but only part of '{m}' was "
                      f"trained ({partial[0]} was frozen); export with --to hf instead")
    if spec.wraps(m):
      raise UserError(f"'{m}' has both {spec.method} and fully trained weights, which PEFT "
                      "cannot hold (modules_to_save cannot wrap an adapted layer); export with "
                      "--to hf instead")
  if family.embedding in trained_base and ctx.model_cfg.tie_word_embeddings:
    if spec.method != "lora":
      raise UserError("the trained embeddings are tied to the output head, which a PEFT "
                      f"{spec.method} adapter cannot express; export with --to hf instead")
    config["ensure_weight_tying"] = True  # PEFT then wraps lm_head too, tied to embed_tokens
    head_name = family.to_hf(family.output_head)[0]
    tensors[prefix + head_name] = np.asarray(flat[family.embedding], np.float32)
  for p in sorted(trained_base):
    name, transpose = family.to_hf(p)
    array = np.asarray(flat[p], np.float32)
    tensors[prefix + name] = array.T if transpose else array
  names = sorted({family.to_hf(p)[0].rsplit(".", 1)[0] for p in trained_base})
  config.update({"task_type": task_type, "base_model_name_or_path": base_model,
                 "inference_mode": True, "modules_to_save": names or None})
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
            os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})


def read_config(adapter_dir: str, what: str = "peft.init_from") -> tuple[dict, str]:
  """(adapter_config.json contents, its path), or a UserError naming the directory."""
  config_file = os.path.join(adapter_dir, "adapter_config.json")
  if not os.path.isfile(config_file):
    raise UserError(f"{what}: {adapter_dir} is not a PEFT adapter (no adapter_config.json)")
  try:
    with open(config_file) as f:
      adapter = json.load(f)
  except json.JSONDecodeError as e:
    raise UserError(f"{config_file}: not valid JSON ({e})") from None
  if not isinstance(adapter, dict):
    raise UserError(f"{config_file}: expected a JSON object")
  return adapter, config_file


def method_of(adapter: dict, config_file: str) -> str:
  """The peft.method of an adapter config, or a UserError for a type ftjax cannot load."""
  kind = adapter.get("peft_type")
  if kind not in peft.PEFT_TYPES:
    raise UserError(f"{config_file}: peft_type {kind!r} is not supported "
                    f"(supported: {', '.join(peft.PEFT_TYPES)})")
  return peft.PEFT_TYPES[kind]


def _read(adapter_dir: str) -> tuple[dict, dict, str]:
  adapter, config_file = read_config(adapter_dir)
  weights = os.path.join(adapter_dir, "adapter_model.safetensors")
  if not os.path.isfile(weights):
    raise UserError(f"peft.init_from: {adapter_dir} has no adapter_model.safetensors "
                    "(pickled adapter_model.bin is never loaded)")
  try:
    with safe_open(weights, framework="flax") as f:  # reads bf16 too
      tensors = {k: np.asarray(jnp.asarray(f.get_tensor(k), jnp.float32)) for k in f.keys()}
  except (SafetensorError, OSError) as e:
    raise UserError(f"{weights}: not a readable safetensors file ({e})") from None
  return adapter, tensors, config_file


def load(adapter_dir: str, ctx: Context) -> tuple[str, dict, dict, set[str]]:
  """Reads an HF PEFT adapter directory.

  Returns:
    (method, the method's config fields, ftjax leaves by path, trained base paths).

  Raises:
    UserError: naming the file and the option or tensor ftjax cannot reproduce exactly.
  """
  adapter, tensors, config_file = _read(adapter_dir)
  weights = os.path.join(adapter_dir, "adapter_model.safetensors")
  method = method_of(adapter, config_file)
  cls, family = peft.METHODS[method], ctx.family
  for key in UNSUPPORTED:
    if key == "fan_in_fan_out" and family.conv1d:
      continue  # GPT-2's Conv1D weights are (in, out): PEFT sets it for them
    if adapter.get(key) not in (None, False, {}, []):
      raise UserError(f"{config_file}: {key}={adapter[key]!r} is not supported")
  if adapter.get("bias", "none") != "none":
    raise UserError(f"{config_file}: bias={adapter['bias']!r} is not supported (only 'none')")
  base, own = {}, {}
  start = cls.peft_prefix
  for key, value in tensors.items():
    mapped = family.from_hf(key[len(start):]) if key.startswith(start) else None
    if mapped:  # a modules_to_save copy of a base tensor
      path, transpose = mapped
      base[path] = value.T if transpose else value
    else:
      own[key] = value
  if ctx.model_cfg.tie_word_embeddings:
    embed, head_path = family.embedding, family.output_head
    head = base.get(head_path)
    if head is not None and adapter.get("ensure_weight_tying") and embed in base and \
        np.array_equal(head.T, base[embed]):
      del base[head_path]  # the tied copy PEFT saves beside the embeddings
    if head_path in base:
      raise UserError(f"{weights}: the adapter trains lm_head, but this model ties it to "
                      "embed_tokens")
    if embed in base and not adapter.get("ensure_weight_tying"):
      raise UserError(f"{weights}: the adapter trains embed_tokens without "
                      "ensure_weight_tying on a model with tied embeddings")
  fields, leaves, used = cls.from_peft(adapter, own, ctx, weights)
  unused = sorted(set(own) - used)
  if unused:
    raise UserError(f"{weights}: tensor '{unused[0]}' is not part of what ftjax can load "
                    f"({len(unused)} such tensor(s))")
  return method, fields, {**leaves, **base}, set(base)
