"""New tokens' rows trained apart from a frozen table (PEFT's TrainableTokens).

When tokens are added (ftjax/vocab.py) and the embedding table or an untied output head is
frozen, `peft.train_new_tokens` gives the rows at the new ids their own leaves,
`new_tokens/embedding` and `new_tokens/lm_head` (k, hidden): the model substitutes them for the
table's rows in the lookup and for the head's columns in the logits (models/common.py), so the
frozen tables stay bit-identical, weight decay never touches them, and optimizer state is
k x hidden. This works beside any method (`Method.new_tokens` / `new_token_leaves`).

`fold` writes the leaves back into the tables (merged exports); `to_peft` writes HF PEFT's
`trainable_token_indices` (`<module>.token_adapter.trainable_tokens_delta`, which holds the
rows' values, not differences from the base).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

LEAVES = {"embedding": "new_tokens/embedding", "lm_head": "new_tokens/lm_head"}


def tables(ctx) -> dict:
  """{leaf name: (table path, stored (vocab, hidden))}: the embedding, and an untied head."""
  family, out = ctx.family, {"embedding": (ctx.family.embedding, True)}
  if not ctx.model_cfg.tie_word_embeddings and family.output_head in ctx.base_paths:
    out["lm_head"] = (family.output_head, False)
  return out


def _rows(table, by_row: bool, ids) -> jnp.ndarray:
  return jnp.asarray(table)[ids] if by_row else jnp.asarray(table)[:, ids].T


def init_leaves(spec, flat: dict, ctx) -> dict:
  """The leaves start as the tables' (initialised) rows at the new ids, in fp32."""
  out, ids = dict(flat), jnp.asarray(spec.new_tokens)
  for name, (path, by_row) in tables(ctx).items():
    if name in spec.new_token_leaves:
      out[LEAVES[name]] = _rows(flat[path], by_row, ids).astype(jnp.float32)
  return out


def fold(spec, flat: dict, ctx) -> dict:
  """The tables with the leaves written into their rows (the leaves removed)."""
  out, ids = dict(flat), jnp.asarray(spec.new_tokens)
  for name, (path, by_row) in tables(ctx).items():
    leaf = LEAVES[name]
    if leaf in out:
      rows = jnp.asarray(out.pop(leaf))
      table = jnp.asarray(out[path], jnp.float32)
      out[path] = table.at[ids].set(rows) if by_row else table.at[:, ids].set(rows.T)
  return out


def to_peft(spec, flat: dict, trained_base: set, ctx) -> tuple[object, dict]:
  """(adapter_config's `trainable_token_indices`, tensors) for the new tokens' rows of every
  table that does not go out whole as `modules_to_save` (a tied head follows the embedding in
  PEFT, as here)."""
  folded, ids = fold(spec, flat, ctx), list(spec.new_tokens)
  indices, tensors = {}, {}
  for path, by_row in tables(ctx).values():
    if path in trained_base:
      continue
    module = ctx.family.to_hf(path)[0].rsplit(".", 1)[0]
    indices[module.rsplit(".", 1)[-1]] = ids
    key = f"base_model.model.{module}.token_adapter.trainable_tokens_delta"
    tensors[key] = np.asarray(_rows(folded[path], by_row, jnp.asarray(ids)), np.float32)
  if not indices:
    return None, {}
  if ctx.model_cfg.tie_word_embeddings:
    return ids, tensors  # the list form: the embedding, and PEFT ties the head to it
  return indices, tensors
