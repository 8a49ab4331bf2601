"""`python -m ftjax.partition --config FILE [overrides] [--diff OTHER.yaml]`: a config's partition.

Before any weight is read (shapes only), a table of the parameter groups that the rules of
ftjax.rules make: whether they train, their role (base, peft, new head), kind and layers, the
rule that decided `train`, parameter count, optimizer-state bytes (from the optimizer's own
state shapes: LISA and sparse wrappers, L2-SP's θ₀, EWC's θ₀ and Fisher included), lr
multiplier and weight decay with the rules that set them, and sharding on the config's mesh;
then totals. `--diff` lists what changes between two configs' partitions.
`report(cfg).summary()` is the line a run logs at its start.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import re
import sys
from typing import Any, Optional

import jax
import numpy as np

from ftjax import assembly, optim, regularize, sharding, tree
from ftjax.config import Config, UserError
from ftjax.rules import for_config, ranges


def _role(path: str, base: set, family: Any) -> str:
  if path not in base:
    return "new" if family is not None and family.is_classifier(path) else "peft"
  return "base"


@dataclasses.dataclass
class Group:
  train: bool
  role: str
  kind: str
  layers: set
  rule: str
  lr: str
  decay: str
  params: int = 0
  opt_bytes: int = 0
  dtype_bytes: int = 0
  shardings: set = dataclasses.field(default_factory=set)


@dataclasses.dataclass
class Report:
  """What the partition CLI shows: groups of leaves and totals."""

  groups: list
  decisions: dict
  shapes: dict
  opt_other: int  # optimizer-state bytes that belong to no parameter (step counts, masks)
  mesh: dict
  dynamic: str = ""  # what LISA or sparse updates do to the trained groups

  @property
  def trained(self) -> int:
    return sum(g.params for g in self.groups if g.train)

  @property
  def total(self) -> int:
    return sum(g.params for g in self.groups)

  @property
  def opt_bytes(self) -> int:
    return sum(g.opt_bytes for g in self.groups) + self.opt_other

  def summary(self) -> str:
    n_groups = sum(g.train for g in self.groups)
    frozen_bytes = sum(g.dtype_bytes for g in self.groups if not g.train)
    return (f"partition: {self.trained:,} of {self.total:,} parameters train "
            f"({100 * self.trained / max(self.total, 1):.3g}%) in {n_groups} group(s); "
            f"optimizer state {_mb(self.opt_bytes)}; frozen weights {_mb(frozen_bytes)}"
            + (f"; {self.dynamic}" if self.dynamic else ""))


def _mb(n: int) -> str:
  """Bytes in the largest unit that keeps them >= 1 (binary units)."""
  for unit, size in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
    if n >= size:
      return f"{n / size:.2f} {unit}"
  return f"{n} B"


def report(cfg: Config, num_devices: Optional[int] = None,
           model: Optional[assembly.Model] = None) -> Report:
  """The partition of `cfg` from shapes alone (no weight is read), or of a model already built
  from it (`model`: a run's, whose fresh weights are then known)."""
  plan = assembly.plan_from_config(cfg) if model is None else model.as_plan()
  shapes = plan.shapes
  cfg = dataclasses.replace(cfg, peft=plan.peft_config)  # with peft.init_from's settings
  decisions = for_config(cfg, shapes, plan.family, plan.base_paths)
  trained = {p for p, d in decisions.items() if d.train}
  params = tree.unflatten({p: shapes[p] for p in sorted(trained)})
  decayed = optim.decay_mask(cfg.optim, params, plan.family, cfg.partition.rules)

  def init(p, fisher):  # the run's whole chain, EWC's Fisher a stand-in of the right shapes
    first = regularize.transforms(cfg.regularize, decayed, fisher if cfg.regularize.ewc.lam
                                  else None)
    tx, _ = optim.build(cfg.optim, cfg.train.steps, p, plan.config.num_layers, plan.family,
                        rules=cfg.partition.rules, dynamic=cfg.partition, seed=cfg.train.seed,
                        first=first)
    return tx.init(p)

  state = jax.eval_shape(init, params, params)
  nbytes = lambda x: int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
  known = set(tree.flatten(params))
  attributed = collections.Counter()  # state bytes per parameter (by key path, tree.owner)
  total_state = 0
  for keypath, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    total_state += nbytes(leaf)
    if (owner := tree.owner(keypath, known)) is not None:
      attributed[owner] += nbytes(leaf)
  mesh_shape = sharding.mesh_axes(cfg.mesh, num_devices or jax.device_count())
  specs = sharding.param_specs(plan.module, mesh_shape)
  base = set(plan.base_paths)
  frozen_dtype = 2 if cfg.peft.base_dtype == "bf16" else 4
  groups: dict = {}
  for p, d in decisions.items():
    kind = (plan.family.kind(p) if plan.family else None) or "-"
    role = _role(p, base, plan.family)
    lr = f"{d.lr:g}" + (f" ({d.rule('lr')})" if d.rule("lr") != "default" else "")
    wd = f"{d.weight_decay:g}" + (f" ({d.rule('weight_decay')})"
                                  if not d.rule("weight_decay").startswith("default") else "")
    i = plan.family.layer_index(p) if plan.family else None
    key = (d.train, role, kind, i is None, d.rule("train"), lr if d.train else "-",
           wd if d.train else "-")
    g = groups.setdefault(key, Group(d.train, role, kind, set(), d.rule("train"), key[5], key[6]))
    n = int(np.prod(shapes[p].shape))
    g.params += n
    g.dtype_bytes += n * (4 if d.train or p not in base else frozen_dtype)
    g.opt_bytes += attributed.get(p, 0)
    if i is not None:
      g.layers.add(i)
    g.shardings.add(_spec_text(specs.get(p)))
  ordered = sorted(groups.values(), key=lambda g: (not g.train, min(g.layers, default=-1),
                                                   g.role, g.kind, g.rule))
  lisa, sparse = cfg.partition.lisa, cfg.partition.sparse
  dynamic = ""
  if lisa.layers:
    dynamic = (f"LISA: {min(lisa.layers, plan.config.num_layers)} of {plan.config.num_layers} "
               f"decoder layers train in each window of {lisa.every} steps")
  elif sparse.density:
    dynamic = (f"sparse: the top {sparse.density:g} of each trained tensor's entries by "
               f"{sparse.score} over {sparse.warmup_steps} batch(es)")
  return Report(ordered, decisions, shapes, total_state - sum(attributed.values()), mesh_shape,
                dynamic)


def _spec_text(spec: Any) -> str:
  axes = [a for a in (tuple(spec) if spec is not None else ()) if a]
  return "replicated" if not axes else "(" + ", ".join(
      "+".join(a) if isinstance(a, tuple) else str(a) for a in spec) + ")"


def table(rep: Report) -> str:
  """The groups as an aligned text table, with totals."""
  head = ["train", "role", "kind", "layers", "rule", "params", "opt state", "lr x", "decay",
          "sharding"]
  rows = []
  for g in rep.groups:
    rows.append(["yes" if g.train else "no", g.role, g.kind,
                 ranges(g.layers) if g.layers else "-", g.rule, f"{g.params:,}",
                 _mb(g.opt_bytes) if g.train else "-", g.lr, g.decay,
                 " ".join(sorted(g.shardings))])
  frozen = rep.total - rep.trained
  rows.append(["", "", "", "", "total trained", f"{rep.trained:,}", _mb(rep.opt_bytes), "", "",
               ""])
  rows.append(["", "", "", "", "total frozen", f"{frozen:,}", "", "", "", ""])
  widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
  fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
  lines = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
  mesh = " x ".join(f"{k} {v}" for k, v in rep.mesh.items())
  return "\n".join(lines + [f"mesh: {mesh}", rep.summary()])


def diff(a: Report, b: Report, name_a: str, name_b: str) -> str:
  """What changes from partition `a` to `b`: leaves grouped by (before -> after) settings."""
  if set(a.decisions) != set(b.decisions):
    only = sorted(set(a.decisions) ^ set(b.decisions))
    lines = [f"the two configs have different parameters ({len(only)} differ, e.g. {only[0]})"]
  else:
    lines = []
  show = lambda d: ("train" if d.train else "frozen") + (
      f", lr x{d.lr:g}, decay {d.weight_decay:g}" if d.train else "")
  changes: dict = {}
  for p in sorted(set(a.decisions) & set(b.decisions)):
    da, db = a.decisions[p], b.decisions[p]
    if (da.train, da.lr, da.weight_decay) == (db.train, db.lr, db.weight_decay) or \
        (not da.train and not db.train):
      continue
    key = (show(da), show(db))
    entry = changes.setdefault(key, [0, collections.Counter()])
    entry[0] += int(np.prod(a.shapes[p].shape))
    entry[1][re.sub(r"\d+", "N", p)] += 1
  for (before, after), (n, names) in changes.items():
    examples = ", ".join(f"{k} x{v}" if v > 1 else k for k, v in names.most_common(3))
    more = f", +{len(names) - 3} more" if len(names) > 3 else ""
    lines.append(f"{before} -> {after}: {n:,} parameters ({examples}{more})")
  if not changes:
    lines.append("no leaf changes train, lr or decay")
  lines.append(f"{name_a}: {a.summary()}")
  lines.append(f"{name_b}: {b.summary()}")
  return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
  from ftjax import config, metrics  # pylint: disable=import-outside-toplevel

  parser = argparse.ArgumentParser(
      prog="python -m ftjax.partition",
      description="Show which parameters a config trains, before training (no weight is read).")
  parser.add_argument("--config", required=True, help="a YAML run config")
  parser.add_argument("overrides", nargs="*", help="key.sub=value overrides (of --config)")
  parser.add_argument("--diff", metavar="OTHER.yaml", help="show what changes in OTHER.yaml")
  parser.add_argument("--devices", type=int, help="plan the sharding for this many devices "
                      "(default: the devices JAX sees)")
  args = parser.parse_args(argv)
  metrics.console()
  try:
    cfg = config.load(args.config, args.overrides)
    rep = report(cfg, args.devices)
    if args.diff:
      other = report(config.load(args.diff), args.devices)
      print(diff(rep, other, args.config, args.diff))
    else:
      print(table(rep))
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
