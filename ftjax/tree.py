"""Parameter paths and the one path-matching utility behind every parameter selection.

A parameter tree is a nested dict; its leaves are named by '/'-joined paths
(`layers_3/self_attn/q_proj/kernel`). Regex patterns over those paths select leaves for training,
weight decay, learning-rate groups and sharding; a pattern that matches nothing is an error that
names it. Trees split into trainable and frozen parts and merge back.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

import flax.linen as nn
from flax import traverse_util

from ftjax.config import UserError


def unbox(params: Any) -> Any:
  """Strips Flax's logical-partitioning boxes, leaving plain arrays (or shape structs)."""
  return nn.meta.unbox(params)


def flatten(params: dict) -> dict[str, Any]:
  return traverse_util.flatten_dict(params, sep="/")


def unflatten(flat: dict[str, Any]) -> dict:
  return traverse_util.unflatten_dict(flat, sep="/")


def match(patterns: Iterable[str], paths: Iterable[str], what: str,
          strict: bool = True) -> set[str]:
  """The paths that any pattern finds (`re.search`).

  Args:
    patterns: regexes over parameter paths.
    paths: the candidate paths.
    what: the config key the patterns came from, for error messages.
    strict: whether a pattern that finds nothing is an error (off for defaults that are
      meant to cover several model families).
  """
  paths = list(paths)
  found: set[str] = set()
  for pattern in patterns:
    try:
      regex = re.compile(pattern)
    except re.error as e:
      raise UserError(f"{what}: '{pattern}' is not a valid regex ({e})") from None
    hits = {p for p in paths if regex.search(p)}
    if strict and not hits:
      raise UserError(f"{what}: pattern '{pattern}' matches no parameter")
    found |= hits
  return found


def mask(params: dict, selected: set[str]) -> dict:
  """A tree of bools shaped like `params`: True where the leaf's path is in `selected`."""
  return unflatten({p: p in selected for p in flatten(params)})


def split(params: dict, trainable: set[str]) -> tuple[dict, dict]:
  """Splits `params` into (trainable, frozen) subtrees by path."""
  flat = flatten(params)
  return (unflatten({p: v for p, v in flat.items() if p in trainable}),
          unflatten({p: v for p, v in flat.items() if p not in trainable}))


def merge(*trees: dict) -> dict:
  """The union of disjoint subtrees."""
  out: dict[str, Any] = {}
  for t in trees:
    out.update(flatten(t))
  return unflatten(out)


def count(params: dict) -> int:
  return sum(int(getattr(v, "size", 0)) for v in flatten(params).values())
