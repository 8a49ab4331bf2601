"""Vocabulary extension: new tokens in the tokenizer, and rows for them found by token id.

`extend(tokenizer, model_cfg, seed)` adds `model.add_special_tokens` (never split, dropped by
`skip_special_tokens`) and `model.add_tokens` to a base tokenizer. A token the tokenizer already
has is not new: it is logged and skipped, and keeps its row. Each new token's row is the one at
its id (`convert_tokens_to_ids`), never at a position: a padded vocabulary (more embedding rows
than tokenizer entries, as many checkpoints have) puts the new ids inside the existing rows and
nothing is resized; otherwise the table grows to max(id) + 1 rows (`Extension.rows`) and the
module is built with that vocab size.

`grow` gives the rows at the new ids of the embedding table and of an untied output head their
first values (`model.new_token_init`): `mean`, the mean of the original tokenizer's rows (ids
0..len-1; padding rows never count); `mean_noise`, that mean plus N(0, 1/√hidden) noise from
`train.seed` (LLaMA-Factory's noisy mean); `description`, the mean of the rows of the token's
`model.token_descriptions` text, tokenised by the base tokenizer without special tokens.

A run saves its extended tokenizer in `<run>/tokenizer/`; everything that reads a run
(resume, evaluate, generate, export) uses that one (`run_tokenizer`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np

from ftjax import hf
from ftjax.config import ModelConfig, UserError

logger = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizer"  # in a run directory


@dataclasses.dataclass(frozen=True)
class Extension:
  """The tokens a run adds and how their rows start.

  Attributes:
    tokens: the new tokens, by id.
    ids: their ids in the extended tokenizer.
    base_len: the base tokenizer's size (its rows are the "old rows" that `mean` averages).
    init: model.new_token_init.
    descriptions: per new token, the base token ids of its description (init: description).
    seed: train.seed (init: mean_noise).
    size: the extended tokenizer's size.
  """

  tokens: tuple
  ids: tuple
  base_len: int
  init: str = "mean"
  descriptions: tuple = ()
  seed: int = 0
  size: int = 0

  def rows(self, vocab_size: int) -> int:
    """The table's row count: the model's own when the new ids fit in it (padded), else
    max(id) + 1."""
    return max(vocab_size, max(self.ids) + 1)


def extend(tokenizer: Any, model_cfg: ModelConfig, seed: int = 0) -> Optional[Extension]:
  """Adds the config's tokens to `tokenizer` (in place); returns what was added, or None when
  the config adds nothing (or only tokens the tokenizer already has)."""
  special, plain = list(model_cfg.add_special_tokens), list(model_cfg.add_tokens)
  if not special and not plain:
    return None
  vocab = tokenizer.get_vocab()
  known = [t for t in special + plain if t in vocab]
  if known:
    logger.info(f"model.add_tokens: the tokenizer already has {', '.join(known)}: not new, "
                "skipped (their rows are kept)")
  special = [t for t in special if t not in vocab]
  plain = [t for t in plain if t not in vocab]
  if not special and not plain:
    return None
  texts = model_cfg.token_descriptions or {}
  described = {}
  if model_cfg.new_token_init == "description":
    for token in special + plain:
      ids = tokenizer(texts[token], add_special_tokens=False)["input_ids"]
      if not ids:
        raise UserError(f"model.token_descriptions: the description of '{token}' tokenizes to "
                        "nothing")
      described[token] = tuple(ids)
  base_len = len(tokenizer)
  if special:
    # transformers 5's name for additional special tokens; False keeps the tokenizer's own
    tokenizer.add_special_tokens({"extra_special_tokens": special},
                                 replace_extra_special_tokens=False)
  if plain:
    tokenizer.add_tokens(plain)
  ids = tokenizer.convert_tokens_to_ids(special + plain)
  order = sorted(range(len(ids)), key=lambda i: ids[i])
  tokens = tuple((special + plain)[i] for i in order)
  ext = Extension(tokens, tuple(int(ids[i]) for i in order), base_len,
                  model_cfg.new_token_init, tuple(described.get(t, ()) for t in tokens), seed,
                  len(tokenizer))
  logger.info(f"added {len(tokens)} token(s) to the tokenizer ({base_len} -> {len(tokenizer)}): "
              + ", ".join(f"{t}={i}" for t, i in zip(ext.tokens, ext.ids))
              + f"; rows start as {ext.init}")
  return ext


def resolve(model_cfg: ModelConfig, seed: int = 0) -> tuple[Any, Optional[Extension]]:
  """(the base model's tokenizer with the config's tokens added, the Extension or None)."""
  tokenizer = hf.load_tokenizer(model_cfg.path)
  return tokenizer, extend(tokenizer, model_cfg, seed)


def _initial(old_NxD: np.ndarray, ext: Extension, salt: int) -> np.ndarray:
  """The first values (k, D) of the new rows of one table, from its old rows (fp32)."""
  k, d = len(ext.ids), old_NxD.shape[1]
  mean = old_NxD.mean(axis=0)
  if ext.init == "description":
    return np.stack([old_NxD[list(ids)].mean(axis=0) for ids in ext.descriptions])
  rows = np.broadcast_to(mean, (k, d)).copy()
  if ext.init == "mean_noise":
    rng = np.random.default_rng([ext.seed, salt])
    rows = rows + rng.normal(0.0, 1.0 / np.sqrt(d), (k, d)).astype(np.float32)
  return rows.astype(np.float32)


def grow(flat: dict, ext: Optional[Extension], module: Any) -> dict:
  """`flat` with the embedding table (and an untied output head) grown to `module`'s vocab
  size where needed and the rows at the new ids initialised (see the module docstring)."""
  if ext is None:
    return flat
  out = dict(flat)
  rows = module.cfg.vocab_size
  embedding = module.embed_path
  head, transposed = module.output_head
  tables = [(embedding, True)] + ([(head, transposed)] if head != embedding and head in flat
                                  else [])
  for salt, (path, by_row) in enumerate(tables):
    table = out[path] if by_row else out[path].T  # (V, D)
    old = min(ext.base_len, table.shape[0])
    if table.shape[0] < rows:
      table = jnp.concatenate([table, jnp.zeros((rows - table.shape[0], table.shape[1]),
                                                table.dtype)])
    new = _initial(np.asarray(table[:old], np.float32), ext, salt)
    table = table.at[jnp.asarray(ext.ids)].set(jnp.asarray(new, table.dtype))
    out[path] = table if by_row else table.T
  return out


def run_tokenizer(run_dir: str, model_dir: str) -> Any:
  """The tokenizer of a run: its saved extended one, else the base model's."""
  saved = os.path.join(run_dir, TOKENIZER_DIR)
  return hf.load_tokenizer(saved if os.path.isdir(saved) else model_dir)


def save(tokenizer: Any, run_dir: str) -> None:
  tokenizer.save_pretrained(os.path.join(run_dir, TOKENIZER_DIR))


def check_run(run_dir: str, ext: Optional[Extension]) -> None:
  """Refuses to go on with a run directory whose saved tokenizer has other added tokens than
  this config adds (a resume would read rows by other ids)."""
  saved = os.path.join(run_dir, TOKENIZER_DIR)
  if not os.path.isdir(saved):
    if ext is not None and os.path.isfile(os.path.join(run_dir, "config.yaml")):
      raise UserError(f"{run_dir}: the run was started without model.add_tokens; cannot resume "
                      "with new tokens (use a new train.output_dir)")
    return
  tok = hf.load_tokenizer(saved)
  same = ext is not None and len(tok) == ext.size and \
      list(tok.convert_tokens_to_ids(list(ext.tokens))) == list(ext.ids)
  if not same:
    raise UserError(f"{run_dir}: its tokenizer ({saved}) has other added tokens than this "
                    "config's model.add_tokens / add_special_tokens (use a new "
                    "train.output_dir)")
