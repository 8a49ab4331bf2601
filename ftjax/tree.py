"""Parameter paths and the one path-matching utility behind every parameter selection.

A parameter tree is a nested dict; its leaves are named by '/'-joined paths
(`layers_3/self_attn/q_proj/kernel`). Every selection over those paths — the trained set
(`peft.trainable` / `peft.frozen`), LoRA targets, weight decay (`optim.no_decay`), learning-rate
groups (`optim.lr_groups`) — goes through `label`: ordered `(pattern, label)` rules, first match
wins (big_vision's convention); a pattern that does not compile or matches nothing is one error
that names it. Trees split into trainable and frozen parts and merge back.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Optional

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


def compile_pattern(pattern: str, what: str) -> re.Pattern:
  """`re.compile`, or a UserError naming the pattern and the key it came from."""
  try:
    return re.compile(pattern)
  except (re.error, TypeError) as e:
    raise UserError(f"{what}: '{pattern}' is not a valid regex ({e})") from None


_REQUIRED = object()


def label(rules: Iterable[tuple[str, Any]], paths: Iterable[str], what: str,
          default: Any = _REQUIRED, strict: bool = True) -> dict[str, Any]:
  """Labels every path by ordered `(pattern, label)` rules: the first pattern that finds the path
  (`re.search`) gives its label.

  Args:
    rules: (regex over parameter paths, label) pairs, in priority order.
    paths: the candidate paths.
    what: the config key (or argument) the rules came from, for error messages.
    default: the label of a path no rule finds; without one, such a path is an error.
    strict: whether a pattern that finds no path at all is an error (off for defaults that are
      meant to cover several model families).

  Raises:
    UserError: naming a pattern that does not compile or (strict) finds nothing, or a path no
      rule covers.
  """
  paths = list(paths)
  compiled = [(pattern, compile_pattern(pattern, what), value) for pattern, value in rules]
  out: dict[str, Any] = {}
  for pattern, regex, value in compiled:
    hits = [p for p in paths if regex.search(p)]
    if strict and not hits:
      raise UserError(f"{what}: pattern '{pattern}' matches no parameter")
    for p in hits:
      out.setdefault(p, value)
  uncovered = [p for p in paths if p not in out]
  if uncovered and default is _REQUIRED:
    raise UserError(f"{what}: parameter '{uncovered[0]}' is covered by no rule "
                    f"({len(uncovered)} such parameter(s))")
  return {p: out.get(p, default) for p in paths}


def match(patterns: Iterable[str], paths: Iterable[str], what: str,
          strict: bool = True) -> set[str]:
  """The paths that any pattern finds (`label` with every pattern labelling True)."""
  labels = label([(p, True) for p in patterns], paths, what, default=False, strict=strict)
  return {p for p, chosen in labels.items() if chosen}


def select(rule: Any, paths: Iterable[str], what: str = "trainable") -> set[str]:
  """The paths a rule chooses. A rule is a function path -> bool, one regex, a list of regexes
  (any finds), or ordered (regex, bool) pairs (the first that finds a path decides; paths no
  pair finds are not chosen)."""
  paths = list(paths)
  if callable(rule):
    return {p for p in paths if rule(p)}
  if isinstance(rule, str):
    rule = [rule]
  rule = list(rule)
  if all(isinstance(r, str) for r in rule):
    return match(rule, paths, what)
  labels = label([(pattern, bool(chosen)) for pattern, chosen in rule], paths, what,
                 default=False)
  return {p for p, chosen in labels.items() if chosen}


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


def owner(keypath: tuple, paths: set[str]) -> Optional[str]:
  """The parameter an optimizer-state leaf belongs to: the longest run of dict keys at the end
  of its key path (`jax.tree_util` keys) that is a known parameter path. Optax and ftjax's own
  transforms nest their per-parameter buffers as the parameters are nested, so
  `.../mu/layers_0/mlp/up_proj/kernel` belongs to `layers_0/mlp/up_proj/kernel`."""
  import jax  # pylint: disable=import-outside-toplevel

  names = [str(k.key) for k in keypath if isinstance(k, jax.tree_util.DictKey)]
  for i in range(len(names)):
    path = "/".join(names[i:])
    if path in paths:
      return path
  return None


def count(params: dict) -> int:
  return sum(int(getattr(v, "size", 0)) for v in flatten(params).values())
