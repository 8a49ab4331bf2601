"""Hugging Face checkpoints <-> ftjax parameter trees, through each model family's table.

The registry (`ftjax.models`) picks the family by config.json's architecture; the family's table
(`Family.table`, declared in its module) maps each HF tensor to an ftjax parameter path and says
whether the matrix is transposed (torch Linear stores (out, in); ftjax kernels are (in, out)).
Loading checks every shape against the model's abstract parameters and fails on a
missing or unexpected tensor. Weights are read from safetensors only, never from pickles.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import json
import os
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from ftjax import quant, sharding as placement, tree
from ftjax.config import UserError
from ftjax import models
from ftjax.models import Family

# HF tensors that carry no parameters (buffers some checkpoints include), and pretraining heads
# a fine-tune does not use (BERT's masked-LM and next-sentence heads).
IGNORED = [r".*rotary_emb\.inv_freq$", r".*\.attn\.(masked_)?bias$",
           r".*embeddings\.(position_ids|token_type_ids)$", r"^cls\."]


def hf_to_path(table, hf_name: str) -> tuple[str, bool] | None:
  """Maps an HF tensor name to (ftjax path, transpose) through a family (or its table)."""
  return _family(table).from_hf(hf_name)


def path_to_hf(table, path: str) -> tuple[str, bool]:
  """Maps an ftjax parameter path to (HF tensor name, transpose) through a family."""
  return _family(table).to_hf(path)


def _family(table) -> Family:
  if isinstance(table, Family):
    return table
  return next(f for f in models.FAMILIES if f.table == tuple(table))


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
  if models.for_architecture(arch) is None:
    raise UserError(f"{model_dir}: architecture '{arch}' is not supported "
                    f"(supported: {', '.join(sorted(models.by_architecture()))})")
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


def check_weights(model_dir: str) -> None:
  """Opens every weight file's header (cheap: nothing is read but the header and the file size),
  so a truncated or damaged file is a UserError naming it before any work."""
  for file in _safetensors_files(model_dir):
    with _open(file):
      pass


def _open(file: str):
  """`safe_open` of one weight file, or a UserError naming it."""
  try:
    return safe_open(file, framework="flax")
  except (SafetensorError, OSError) as e:
    raise UserError(f"{file}: not a readable safetensors file ({str(e).splitlines()[0]}); is "
                    "it truncated?") from None


@dataclasses.dataclass
class LoadedModel:
  """A model ready to run: its module, config, and parameters (a nested dict of arrays)."""

  module: Any
  config: Any
  params: dict
  hf_config: dict
  family: Family
  fresh: list  # parameter paths the checkpoint lacked (a new classification head)


def build(model_dir: str, dtype=jnp.float32, num_labels: int = 0
          ) -> tuple[Any, Any, dict, Family]:
  """Returns (module, model config, HF config, family) for the model directory; with
  `num_labels` the module is a sequence classifier with that many labels."""
  hf, arch = read_config(model_dir)
  family = models.for_architecture(arch)
  try:
    cfg = family.config_from_hf(hf)
  except UserError as e:
    raise UserError(f"{model_dir}: {e}") from None
  except KeyError as e:
    raise UserError(f"{model_dir}: config.json lacks {e}, which a {arch} needs") from None
  return family.module(cfg, dtype, num_labels=num_labels), cfg, hf, family


def abstract_params(module: Any) -> dict:
  """The parameter tree's shapes and dtypes, without allocating anything."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), tokens, tokens, tokens))
  return tree.unbox(shapes["params"])


def load(model_dir: str, dtype=jnp.float32, param_dtype=jnp.float32,
         shardings: Optional[dict] = None, num_labels: int = 0,
         dtypes: Optional[dict] = None, expected: Optional[dict] = None,
         quant: Optional[dict] = None) -> LoadedModel:
  """Loads an HF model directory into an ftjax module and parameter tree.

  Args:
    model_dir: a local directory with config.json and safetensors weights.
    dtype: the compute dtype the module runs in.
    param_dtype: the dtype parameters are stored in.
    dtypes: {parameter path: dtype} for the parameters stored in another dtype (frozen base
      weights in bf16 are converted as they are read: no fp32 copy of them ever exists).
    expected: {path: shape struct} of the module's parameters, when the caller has them.
    shardings: {parameter path: jax.sharding.Sharding}; each tensor is then read straight into
      its shards (each device's slice from the memory-mapped file), never whole on one device.
    num_labels: > 0 for a sequence classifier; a head the checkpoint lacks is left out of
      `params` and listed in `LoadedModel.fresh`, for the caller to initialise.
    quant: {parameter path: (kind, double)} of the weights stored quantised
      (`quant.QuantKernel`, see `peft.base_quant`): each is read whole on the host, quantised
      there, and only its quantised blocks reach the devices (with `shardings`, in the shards of
      their layer).

  Raises:
    UserError: for a directory that is not a supported model, or tensors that do not fit.
  """
  module, cfg, hf, family = build(model_dir, dtype, num_labels)
  expected = expected or tree.flatten(abstract_params(module))
  loaded: dict[str, Any] = {}
  for file in _safetensors_files(model_dir):
    with _open(file) as f:
      for name in f.keys():
        mapped = family.from_hf(name)
        if mapped is None and not name.startswith(family.base_prefix):
          mapped = family.from_hf(family.base_prefix + name)  # a bare base model
        if mapped is None:
          if any(re.match(p, name) for p in IGNORED):
            continue
          raise UserError(f"{model_dir}: unexpected tensor '{name}' for {cfg.family}")
        path, transpose = mapped
        if path not in expected:
          if family.is_head(path) or family.is_optional(path):
            continue  # a tied checkpoint's lm_head copy, or a head this task does not use
          raise UserError(f"{model_dir}: tensor '{name}' has no place in this model's config")
        if path in loaded:
          raise UserError(f"{model_dir}: tensor '{name}' appears in more than one weight file")
        piece = f.get_slice(name)
        shape = tuple(piece.get_shape())[::-1] if transpose else tuple(piece.get_shape())
        if shape != tuple(expected[path].shape):
          raise UserError(f"{model_dir}: tensor '{name}' has shape {tuple(piece.get_shape())}, "
                          f"the config implies {tuple(expected[path].shape)}")
        target = (dtypes or {}).get(path, param_dtype)
        if path in (quant or {}):
          loaded[path] = _quantized(np.asarray(f.get_tensor(name)), path, transpose,
                                    *quant[path], shardings[path] if shardings else None)
        elif shardings is None:
          array = np.asarray(f.get_tensor(name))
          loaded[path] = jnp.asarray(array.T if transpose else array, dtype=target)
        else:
          def read(index, piece=piece, transpose=transpose, target=target):
            part = np.asarray(piece[index[::-1] if transpose else index])
            return (part.T if transpose else part).astype(target)
          loaded[path] = jax.make_array_from_callback(shape, shardings[path], read)
  fresh = sorted(p for p in set(expected) - set(loaded) if family.is_optional(p))
  missing = sorted(set(expected) - set(loaded) - set(fresh))
  if missing:
    names = [family.to_hf(p)[0] for p in missing[:3]]
    raise UserError(f"{model_dir}: missing {len(missing)} tensor(s), e.g. {', '.join(names)}")
  return LoadedModel(module, cfg, tree.unflatten(loaded), hf, family, fresh)


def _quantized(array: np.ndarray, path: str, transpose: bool, kind: str, double: bool,
               sharding: Optional[jax.sharding.NamedSharding]) -> quant.QuantKernel:
  """An HF tensor as the quantised form of the ftjax parameter at `path`: a dense kernel
  (in, out) quantises its (out, in) matrix, as bitsandbytes' Linear4bit does; an embedding
  table its own (vocab, hidden) rows, as Embedding4bit does. The 8-bit scales of double
  quantisation are chosen as bitsandbytes' kernel for this backend chooses them."""
  kernel = path.endswith("/kernel")
  matrix = array if transpose == kernel else array.T
  backend = "cpu" if jax.default_backend() == "cpu" else "cuda"
  try:
    q = quant.quantize(matrix, kind, double, transposed=kernel, where=path, kernel=backend)
  except ValueError as e:
    raise UserError(f"peft.base_quant {kind}: {e}") from None
  if sharding is None:
    return jax.tree.map(jnp.asarray, q)
  return jax.tree.map(jax.device_put, q, placement.quantized(q, sharding))


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


def save_model(out_dir: str, params: dict, model_dir: str, table: list, dtype: str,
               config_updates: Optional[dict] = None) -> None:
  """Writes base-model parameters as an HF model directory, with copies of the source
  directory's config (plus `config_updates`), tokenizer and template files. `dtype`: auto (the
  source's) | fp32 | bf16."""
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
  hf.update(config_updates or {})
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)
  save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
