"""Greedy decoding with a KV cache, used for eval samples and the generate CLI.

Prompts are left-padded into one batch; padding has segment id 0 so real tokens never attend to
it, and positions count real tokens only. One jitted prefill, then one jitted step per token.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.models import llama


@functools.partial(jax.jit, static_argnames=("module", "prefill"))
def _forward(module, params, tokens, positions, segment_ids, cache, prefill):
  logits, cache = module.apply({"params": params}, tokens, positions, segment_ids, cache,
                               virtual_tokens=prefill)
  return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache


def greedy(module: Any, params: dict, prompts: list[list[int]], max_new_tokens: int,
           eos_id: Optional[int] = None) -> list[list[int]]:
  """Greedy continuations of token-id prompts (each stops after its EOS, which is kept)."""
  b, p = len(prompts), max(len(x) for x in prompts)
  tokens = np.zeros((b, p), np.int32)
  segment_ids = np.zeros((b, p), np.int32)
  for i, x in enumerate(prompts):
    tokens[i, p - len(x):] = x
    segment_ids[i, p - len(x):] = 1
  positions = np.maximum(np.cumsum(segment_ids, axis=1) - 1, 0).astype(np.int32)
  soft = module.peft.prompt_len  # prompt tuning's soft tokens occupy the cache's first slots
  cache = llama.init_cache(module.cfg, b, soft + p + max_new_tokens, module.dtype)
  nxt, cache = _forward(module, params, tokens, positions, segment_ids, cache, True)
  pos = positions[:, -1:] + 1
  out, done = [], np.zeros(b, bool)
  ones = np.ones((b, 1), np.int32)
  for _ in range(max_new_tokens):
    token = np.asarray(nxt)
    out.append(token)
    done |= token == eos_id
    if done.all():
      break
    nxt, cache = _forward(module, params, token[:, None], pos, ones, cache, False)
    pos = pos + 1
  result = []
  for i, row in enumerate(np.stack(out, axis=1).tolist()):
    if eos_id is not None and eos_id in row:
      row = row[:row.index(eos_id) + 1]
    result.append(row)
  return result
