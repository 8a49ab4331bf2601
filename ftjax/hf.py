"""Hugging Face checkpoints <-> ftjax parameter trees: one mapping table per model family.

A table row names an HF tensor and the ftjax parameter path it becomes (`{i}` is the layer
index) and whether the matrix is transposed (torch Linear stores (out, in); ftjax kernels are
(in, out)). Loading checks every shape against the model's abstract parameters and fails on a
missing or unexpected tensor. Weights are read from safetensors only, never from pickles.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import json
import os
import re
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from ftjax import tree
from ftjax.config import UserError
from ftjax.models import llama

# (HF name, ftjax path, transpose)
LLAMA_TABLE = [
    ("model.embed_tokens.weight", "embed_tokens/embedding", False),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers_{i}/self_attn/q_proj/kernel", True),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers_{i}/self_attn/k_proj/kernel", True),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers_{i}/self_attn/v_proj/kernel", True),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers_{i}/self_attn/o_proj/kernel", True),
    ("model.layers.{i}.self_attn.q_proj.bias", "layers_{i}/self_attn/q_proj/bias", False),
    ("model.layers.{i}.self_attn.k_proj.bias", "layers_{i}/self_attn/k_proj/bias", False),
    ("model.layers.{i}.self_attn.v_proj.bias", "layers_{i}/self_attn/v_proj/bias", False),
    ("model.layers.{i}.self_attn.o_proj.bias", "layers_{i}/self_attn/o_proj/bias", False),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers_{i}/mlp/gate_proj/kernel", True),
    ("model.layers.{i}.mlp.up_proj.weight", "layers_{i}/mlp/up_proj/kernel", True),
    ("model.layers.{i}.mlp.down_proj.weight", "layers_{i}/mlp/down_proj/kernel", True),
    ("model.layers.{i}.mlp.gate_proj.bias", "layers_{i}/mlp/gate_proj/bias", False),
    ("model.layers.{i}.mlp.up_proj.bias", "layers_{i}/mlp/up_proj/bias", False),
    ("model.layers.{i}.mlp.down_proj.bias", "layers_{i}/mlp/down_proj/bias", False),
    ("model.layers.{i}.input_layernorm.weight", "layers_{i}/input_layernorm/scale", False),
    ("model.layers.{i}.post_attention_layernorm.weight",
     "layers_{i}/post_attention_layernorm/scale", False),
    ("model.norm.weight", "norm/scale", False),
    ("lm_head.weight", "lm_head/kernel", True),
]
# HF tensors that carry no parameters (buffers some checkpoints include).
IGNORED = [r".*rotary_emb\.inv_freq$"]


@dataclasses.dataclass(frozen=True)
class Family:
  """How to build and map one model family."""

  config_from_hf: Callable[[dict], Any]
  module: Callable[..., Any]
  table: list


FAMILIES = {
    arch: Family(llama.LlamaConfig.from_hf, llama.Llama, LLAMA_TABLE)
    for arch in llama.ARCHITECTURES
}


def _compile(template: str) -> re.Pattern:
  return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


def hf_to_path(table: list, hf_name: str) -> tuple[str, bool] | None:
  """Maps an HF tensor name to (ftjax path, transpose), or None if no row matches."""
  for hf_tpl, ours, transpose in table:
    m = _compile(hf_tpl).match(hf_name)
    if m:
      return ours.replace("{i}", m.groupdict().get("i") or ""), transpose
  return None


def path_to_hf(table: list, path: str) -> tuple[str, bool]:
  """Maps an ftjax parameter path to (HF tensor name, transpose)."""
  for hf_tpl, ours, transpose in table:
    m = _compile(ours).match(path)
    if m:
      return hf_tpl.replace("{i}", m.groupdict().get("i") or ""), transpose
  raise KeyError(f"no HF name for parameter '{path}'")


def read_config(model_dir: str) -> tuple[dict, str]:
  """Returns (config.json contents, architecture), or a UserError saying why this is no model."""
  if not os.path.isdir(model_dir):
    raise UserError(f"model.path: directory not found: {model_dir}")
  config_file = os.path.join(model_dir, "config.json")
  if not os.path.isfile(config_file):
    raise UserError(f"{model_dir} is not an HF model directory (no config.json)")
  try:
    with open(config_file) as f:
      hf = json.load(f)
  except json.JSONDecodeError as e:
    raise UserError(f"{config_file}: not valid JSON ({e})") from None
  arch = (hf.get("architectures") or [None])[0]
  if arch not in FAMILIES:
    raise UserError(f"{model_dir}: architecture '{arch}' is not supported "
                    f"(supported: {', '.join(sorted(FAMILIES))})")
  return hf, arch


def _safetensors_files(model_dir: str) -> list[str]:
  index = os.path.join(model_dir, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index) as f:
      names = sorted(set(json.load(f)["weight_map"].values()))
    files = [os.path.join(model_dir, n) for n in names]
  else:
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
  if not files:
    pickles = glob.glob(os.path.join(model_dir, "*.bin")) + glob.glob(
        os.path.join(model_dir, "*.pt"))
    hint = " (found pickled weights, which ftjax never loads: convert them to safetensors)" \
        if pickles else ""
    raise UserError(f"{model_dir}: no *.safetensors weights{hint}")
  for f in files:
    if not os.path.isfile(f):
      raise UserError(f"{model_dir}: weight file {os.path.basename(f)} named in the index is "
                      "missing")
  return files


@dataclasses.dataclass
class LoadedModel:
  """A model ready to run: its module, config, and parameters (a nested dict of arrays)."""

  module: Any
  config: Any
  params: dict
  hf_config: dict
  family: Family


def build(model_dir: str, dtype=jnp.float32) -> tuple[Any, Any, dict, Family]:
  """Returns (module, model config, HF config, family) for the model directory."""
  hf, arch = read_config(model_dir)
  family = FAMILIES[arch]
  try:
    cfg = family.config_from_hf(hf)
  except UserError as e:
    raise UserError(f"{model_dir}: {e}") from None
  return family.module(cfg, dtype), cfg, hf, family


def abstract_params(module: Any) -> dict:
  """The parameter tree's shapes and dtypes, without allocating anything."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), tokens, tokens, tokens))
  return tree.unbox(shapes["params"])


def load(model_dir: str, dtype=jnp.float32, param_dtype=jnp.float32,
         shardings: Optional[dict] = None) -> LoadedModel:
  """Loads an HF model directory into an ftjax module and parameter tree.

  Args:
    model_dir: a local directory with config.json and safetensors weights.
    dtype: the compute dtype the module runs in.
    param_dtype: the dtype parameters are stored in.
    shardings: {parameter path: jax.sharding.Sharding}; each tensor is then read straight into
      its shards (each device's slice from the memory-mapped file), never whole on one device.

  Raises:
    UserError: for a directory that is not a supported model, or tensors that do not fit.
  """
  module, cfg, hf, family = build(model_dir, dtype)
  expected = tree.flatten(abstract_params(module))
  loaded: dict[str, Any] = {}
  for file in _safetensors_files(model_dir):
    with safe_open(file, framework="flax") as f:
      for name in f.keys():
        mapped = hf_to_path(family.table, name)
        if mapped is None:
          if any(re.match(p, name) for p in IGNORED):
            continue
          raise UserError(f"{model_dir}: unexpected tensor '{name}' for {cfg.family}")
        path, transpose = mapped
        if path not in expected:
          if path == "lm_head/kernel":
            continue  # a tied checkpoint may still carry lm_head.weight
          raise UserError(f"{model_dir}: tensor '{name}' has no place in this model's config")
        if path in loaded:
          raise UserError(f"{model_dir}: tensor '{name}' appears in more than one weight file")
        piece = f.get_slice(name)
        shape = tuple(piece.get_shape())[::-1] if transpose else tuple(piece.get_shape())
        if shape != tuple(expected[path].shape):
          raise UserError(f"{model_dir}: tensor '{name}' has shape {tuple(piece.get_shape())}, "
                          f"the config implies {tuple(expected[path].shape)}")
        if shardings is None:
          array = np.asarray(f.get_tensor(name))
          loaded[path] = jnp.asarray(array.T if transpose else array, dtype=param_dtype)
        else:
          def read(index, piece=piece, transpose=transpose):
            part = np.asarray(piece[index[::-1] if transpose else index])
            return (part.T if transpose else part).astype(param_dtype)
          loaded[path] = jax.make_array_from_callback(shape, shardings[path], read)
  missing = sorted(set(expected) - set(loaded))
  if missing:
    names = [path_to_hf(family.table, p)[0] for p in missing[:3]]
    raise UserError(f"{model_dir}: missing {len(missing)} tensor(s), e.g. {', '.join(names)}")
  return LoadedModel(module, cfg, tree.unflatten(loaded), hf, family)


def load_tokenizer(model_dir: str):
  """The model directory's tokenizer through `transformers.AutoTokenizer` (local files only)."""
  import transformers  # pylint: disable=import-outside-toplevel

  try:
    tok = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
  except (OSError, ValueError) as e:
    raise UserError(f"{model_dir}: cannot load a tokenizer ({str(e).splitlines()[0]})") from None
  if tok.pad_token_id is None:
    tok.pad_token = tok.eos_token
  return tok


# ---- merged exports ---------------------------------------------------------------------

# Files a merged export copies from the base model directory (config.json is rewritten).
MODEL_SIDE_FILES = ("generation_config.json", "tokenizer*", "special_tokens_map.json",
                    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "chat_template.*",
                    "*.model")


def save_model(out_dir: str, params: dict, model_dir: str, table: list, dtype: str) -> None:
  """Writes base-model parameters as an HF model directory, with copies of the source
  directory's config, tokenizer and template files. `dtype`: auto (the source's) | fp32 | bf16."""
  import shutil  # pylint: disable=import-outside-toplevel

  from safetensors.flax import save_file  # pylint: disable=import-outside-toplevel

  hf, _ = read_config(model_dir)
  source = hf.get("dtype") or hf.get("torch_dtype") or "float32"
  name = {"auto": source, "fp32": "float32", "bf16": "bfloat16"}[dtype]
  target = {"bfloat16": jnp.bfloat16, "float16": jnp.float16}.get(name, jnp.float32)
  name = jnp.dtype(target).name if name != "bfloat16" else name
  tensors = {}
  for path, value in tree.flatten(params).items():
    hf_name, transpose = path_to_hf(table, path)
    value = jnp.asarray(value, jnp.float32)
    tensors[hf_name] = (value.T if transpose else value).astype(target)
  os.makedirs(out_dir, exist_ok=True)
  for f in sorted(os.listdir(model_dir)):
    if any(fnmatch.fnmatch(f, p) for p in MODEL_SIDE_FILES):
      shutil.copyfile(os.path.join(model_dir, f), os.path.join(out_dir, f))
  hf["torch_dtype" if "torch_dtype" in hf else "dtype"] = name
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)
  save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
