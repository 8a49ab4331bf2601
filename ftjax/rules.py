"""The partition of a model's parameters: what trains, at which learning rate, with which decay.

One ordered list of rules decides three settings for every parameter leaf. A rule selects
leaves by a path regex (`pattern`), decoder layers (`layers: "0-3,10"`) and a module kind
(`kind: attention | mlp | norm | embedding | head`, resolved by the model family); every part
it gives must hold, and a rule with none selects every leaf. It sets any of `train`, `lr` (a
multiplier of `optim.lr`) and `weight_decay`. For each setting the first rule that selects the
leaf *and* sets that setting decides it (big_vision's first-match convention, per setting), so
a rule that only sets `lr` leaves `train` to the rules after it. The rules are, in order:

    partition.rules                  the user's, in their order
    peft.frozen                      train: false for each pattern
    peft.trainable                   train: true for each pattern (over base parameters)
    optim.lr_groups                  lr: group lr / optim.lr
    optim.no_decay                   weight_decay: 0
    defaults                         train: the PEFT method's own leaves and fresh heads; the base
                                     too under peft.method none, unless some rule sets
                                     `train: true` (choosing what trains freezes the rest);
                                     lr: 1; weight_decay: optim.weight_decay

so the older keys are sugar: a config that writes the same decisions as rules gives the same
partition, leaf for leaf. A user rule that selects no leaf is an error naming it. Every leaf's
deciding rule per setting is kept (`Decision.by`) and shown, with parameter counts and
optimizer-state bytes per group, by `python -m ftjax.partition --config FILE`
(ftjax/partition.py).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Optional

from ftjax.config import Config, OptimConfig, PartitionRule, PeftConfig, UserError

SETTINGS = ("train", "lr", "weight_decay")


@dataclasses.dataclass(frozen=True)
class Rule:
  """A resolved rule: its name (where it came from), selector and settings."""

  name: str
  pattern: str = ""
  layers: Optional[frozenset] = None
  kind: str = ""
  train: Optional[bool] = None
  lr: Optional[float] = None
  weight_decay: Optional[float] = None
  scope: str = "all"  # the paths it must select some of: all | base | trainable | none

  def selects(self, path: str, family: Any) -> bool:
    if self.pattern and not _compiled(self.pattern, self.name).search(path):
      return False
    if self.layers is not None and (family is None or family.layer_index(path) not in self.layers):
      return False
    return not self.kind or (family is not None and family.kind(path) == self.kind)


_PATTERNS: dict = {}


def _compiled(pattern: str, what: str) -> re.Pattern:
  if pattern not in _PATTERNS:
    try:
      _PATTERNS[pattern] = re.compile(pattern)
    except (re.error, TypeError) as e:
      raise UserError(f"{what}: '{pattern}' is not a valid regex ({e})") from None
  return _PATTERNS[pattern]


def parse_layers(text: str, what: str) -> frozenset:
  """"0-3,10" -> {0, 1, 2, 3, 10}."""
  out = set()
  for part in str(text).split(","):
    part = part.strip()
    m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
    if not m or (m.group(2) and int(m.group(2)) < int(m.group(1))):
      raise UserError(f"{what}.layers: '{text}' is not a list of layers and ranges like "
                      "'0-3,10'")
    out.update(range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1))
  return frozenset(out)


def user_rules(rules: Iterable[PartitionRule], what: str = "partition.rules") -> list[Rule]:
  """`partition.rules` as Rules named `partition.rules[i]`."""
  out = []
  for i, r in enumerate(rules):
    name = f"{what}[{i}]"
    if r.pattern:
      _compiled(r.pattern, name)
    layers = parse_layers(r.layers, name) if r.layers != "" else None
    out.append(Rule(name, r.pattern, layers, r.kind, r.train, r.lr, r.weight_decay))
  return out


def sugar(peft_cfg: Optional[PeftConfig], optim_cfg: Optional[OptimConfig]) -> list[Rule]:
  """The rules that peft.frozen, peft.trainable, optim.lr_groups and optim.no_decay stand for."""
  out = []
  if peft_cfg is not None:
    out += [Rule(f"peft.frozen[{i}]", p, train=False) for i, p in enumerate(peft_cfg.frozen)]
    out += [Rule(f"peft.trainable[{i}]", p, train=True, scope="base")
            for i, p in enumerate(peft_cfg.trainable)]
  if optim_cfg is not None:
    out += [Rule(f"optim.lr_groups[{i}]", g.pattern, lr=g.lr / optim_cfg.lr, scope="trainable")
            for i, g in enumerate(optim_cfg.lr_groups)]
    out += [Rule(f"optim.no_decay[{i}]", p, weight_decay=0.0, scope="none")
            for i, p in enumerate(optim_cfg.no_decay)]
  return out


@dataclasses.dataclass(frozen=True)
class Decision:
  """One leaf's settings and, per setting, the name of the rule that decided it."""

  train: bool
  lr: float
  weight_decay: float
  by: tuple  # ((setting, rule name), ...)

  def rule(self, setting: str) -> str:
    return dict(self.by)[setting]


def decide(rules: list[Rule], paths: Iterable[str], family: Any, *, base_paths: Iterable[str],
           method: str, base_trains: Optional[bool] = None, weight_decay: float = 0.0,
           check: Iterable[str] = ("all", "base", "trainable")) -> dict[str, Decision]:
  """Each path's Decision under `rules` (then the defaults, see the module docstring).

  Args:
    rules: user rules and sugar, in priority order.
    paths: every parameter path of the model.
    family: the model family (layers and kinds); None allows pattern-only rules.
    base_paths: the base model's paths (the rest are the method's own, or fresh heads).
    method: the PEFT method (base leaves train by default only under none).
    base_trains: whether base leaves train by default (default: under method none, unless a
      rule sets `train: true`: choosing what trains freezes the rest).
    weight_decay: the default decay.
    check: the scopes whose rules must select something (a rule that selects nothing in its
      scope is a UserError naming it): all (user rules), base (peft.trainable), trainable
      (optim.lr_groups).
  """
  paths, base = list(paths), set(base_paths)
  if family is None and any(r.layers is not None or r.kind for r in rules):
    raise ValueError("rules with layers or kind selectors need the model family")
  if base_trains is None:  # a rule that chooses what trains makes the rest frozen by default
    base_trains = method == "none" and not any(r.train is True for r in rules)
  hits = {r.name: {p for p in paths if r.selects(p, family)} for r in rules}
  out = {}
  for p in paths:
    values, by = {}, {}
    for r in rules:
      for s in SETTINGS:
        if s not in values and getattr(r, s) is not None and p in hits[r.name]:
          values[s], by[s] = getattr(r, s), r.name
      if len(values) == len(SETTINGS):
        break
    if "train" not in values:
      if p not in base:
        head = method == "none" or (family is not None and family.is_classifier(p))
        values["train"], by["train"] = True, "default: new head" if head \
            else "default: method's own"
      else:
        values["train"] = base_trains
        by["train"] = "default: full fine-tuning" if base_trains else "default: frozen base"
    if "lr" not in values:
      values["lr"], by["lr"] = 1.0, "default"
    if "weight_decay" not in values:
      values["weight_decay"], by["weight_decay"] = weight_decay, "default: optim.weight_decay"
    out[p] = Decision(bool(values["train"]), float(values["lr"]), float(values["weight_decay"]),
                      tuple((s, by[s]) for s in SETTINGS))
  trained = {p for p, d in out.items() if d.train}
  for r in rules:
    if r.scope in check:
      scope = {"all": paths, "base": base, "trainable": trained}[r.scope]
      if not hits[r.name] & set(scope):
        where = {"base": " base-model", "trainable": " trainable"}.get(r.scope, "")
        raise UserError(f"{r.name}: {_describe(r)} selects no{where} parameter")
  if not any(d.train for d in out.values()):
    raise UserError("partition: no parameter is left to train (check partition.rules, "
                    "peft.trainable and peft.frozen)")
  return out


def _describe(r: Rule) -> str:
  parts = []
  if r.pattern:
    parts.append(f"pattern '{r.pattern}'")
  if r.layers is not None:
    parts.append(f"layers {ranges(r.layers)}")
  if r.kind:
    parts.append(f"kind {r.kind}")
  return " and ".join(parts) or "the rule"


def ranges(layers: Iterable[int]) -> str:
  """{0, 1, 2, 3, 10} -> "0-3,10"."""
  out, run = [], []
  for i in sorted(layers):
    if run and i != run[-1] + 1:
      out.append(run)
      run = []
    run.append(i)
  if run:
    out.append(run)
  return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in out)


def for_config(cfg: Config, paths: Iterable[str], family: Any, base_paths: Iterable[str]
               ) -> dict[str, Decision]:
  """The partition of a run config over a model's paths."""
  rules = user_rules(cfg.partition.rules) + sugar(cfg.peft, cfg.optim)
  return decide(rules, paths, family, base_paths=base_paths, method=cfg.peft.method,
                weight_decay=cfg.optim.weight_decay)
