"""Invariants of fine-tuning, as checks a test or a researcher calls on real trees.

Each check returns nothing when the invariant holds and raises `AssertionError` naming the
offending parameter paths (the first few and how many) when it does not:

- `frozen_unchanged`: training left every frozen leaf bit-identical (bytes, dtype, shape);
- `trainable_moved`: every trained leaf changed somewhere;
- `no_frozen_opt_state`: the optimizer state holds buffers for trained leaves only (and, for
  Adam-like states, for each of them);
- `identity_at_init`: a freshly added LoRA / DoRA / (IA)³ / bottleneck adapter leaves the base
  model's logits unchanged.

Parameter trees are nested dicts named by '/'-joined paths (see ftjax.tree).
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import jax
import numpy as np

from ftjax import hf, tree
from ftjax.peft import NONE, multi

SHOWN = 5  # paths named in a message; the rest are counted


def _listed(paths: Iterable[str]) -> str:
  """The first few of `paths` (sorted), and how many more there are."""
  paths = sorted(paths)
  more = f" (and {len(paths) - SHOWN} more)" if len(paths) > SHOWN else ""
  return ", ".join(paths[:SHOWN]) + more


def _fail(what: str, paths: Iterable[str], why: str) -> None:
  """AssertionError naming `paths`, if there are any."""
  paths = list(paths)
  if paths:
    raise AssertionError(f"{what}: {len(paths)} parameter(s) {why}: {_listed(paths)}")


def _host(x: Any) -> np.ndarray:
  return np.asarray(jax.device_get(x))


def frozen_unchanged(before: dict, after: dict, trainable: set[str]) -> None:
  """Every leaf of `before` whose path is not in `trainable` is in `after` with the same shape,
  dtype and bytes.

  Raises:
    AssertionError: naming the frozen leaves that changed or are missing from `after`.
  """
  old, new = tree.flatten(before), tree.flatten(after)
  frozen = [p for p in old if p not in trainable]
  _fail("frozen_unchanged", [p for p in frozen if p not in new], "missing after training")
  changed = []
  for p in frozen:
    a, b = _host(old[p]), _host(new[p])
    if a.shape != b.shape or a.dtype != b.dtype or a.tobytes() != b.tobytes():
      changed.append(p)
  _fail("frozen_unchanged", changed, "frozen but changed")


def _same_values(a: np.ndarray, b: np.ndarray) -> bool:
  return a.shape == b.shape and np.array_equal(a, b)


def trainable_moved(before: dict, after: dict, trainable: set[str]) -> None:
  """Every path in `trainable` is in both trees and differs in at least one entry.

  Raises:
    AssertionError: naming the trained leaves that did not move or are missing.
  """
  old, new = tree.flatten(before), tree.flatten(after)
  _fail("trainable_moved", [p for p in trainable if p not in old or p not in new],
        "trained but missing from a tree")
  still = [p for p in trainable if _same_values(_host(old[p]), _host(new[p]))]
  _fail("trainable_moved", still, "trained but unchanged")


def no_frozen_opt_state(opt_state: Any, trainable: set[str], params: Optional[dict] = None,
                        complete: bool = True) -> None:
  """The optimizer state holds buffers for trained leaves only, and (`complete`) for each.

  A state leaf belongs to a parameter when the dict keys at the end of its key path name one
  (`mu/layers_0/mlp/up_proj/kernel` belongs to `layers_0/mlp/up_proj/kernel`). With `params`
  (all parameters) a leaf that belongs to a frozen one is an error; without it, any leaf of at
  least one dimension reached through dict keys must belong to a trained one (its dict keys are
  then named as the parameter; scalars, such as injected hyperparameters, are not parameter
  buffers).

  Args:
    opt_state: the optimizer state (`TrainState.opt_state`).
    trainable: the trained paths.
    params: every parameter, trained and frozen; optional.
    complete: also require a buffer for every trained path (true of Adam-like states; false for
      plain SGD, which keeps none).

  Raises:
    AssertionError: naming the frozen parameters the state holds buffers for, or (`complete`)
      the trained ones it holds none for.
  """
  known = set(tree.flatten(params)) | set(trainable) if params is not None else set(trainable)
  held, stray = set(), set()
  for keys, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    path = tree.owner(keys, known)
    if path is not None:
      held.add(path)
    elif params is None and np.ndim(leaf) >= 1:
      names = [str(k.key) for k in keys if isinstance(k, jax.tree_util.DictKey)]
      if names:
        stray.add("/".join(names))
  _fail("no_frozen_opt_state", (held - set(trainable)) | stray,
        "not trained but in the optimizer state")
  if complete:
    _fail("no_frozen_opt_state", set(trainable) - held, "trained but absent from the optimizer "
          "state")


def identity_at_init(model: Any, batch: dict, params: Optional[dict] = None,
                     atol: float = 1e-6) -> None:
  """The model with its PEFT method gives the base model's logits at every real position.

  The base logits come from `model.module.clone(peft=NONE)` over the base model's parameters
  alone. LoRA, DoRA, (IA)³ and bottleneck adapters start as the identity (DoRA's magnitude over
  the norm is 1 only up to rounding: about 1e-5 in fp32).

  Args:
    model: an `ftjax.Model` (`ftjax.load_model`).
    batch: `tokens`, `positions`, `segment_ids` (rows, length); padding positions are ignored.
    params: all parameters to check (default `model.params`, as initialised).
    atol: the largest absolute logit difference allowed.

  Raises:
    ValueError: for prefix or prompt tuning, which add virtual tokens and are not the identity.
    AssertionError: naming the method's parameters when a logit differs by more than `atol`.
  """
  spec = model.module.peft
  if spec.virtual_tokens:
    raise ValueError(f"identity_at_init: peft.method {spec.method} adds virtual tokens, so it "
                     "does not start as the base model")
  params = model.params if params is None else params
  base_module = model.module.clone(peft=NONE)
  flat = tree.flatten(params)
  base_paths = set(tree.flatten(hf.abstract_params(base_module)))
  base = tree.unflatten({p: v for p, v in flat.items() if p in base_paths})
  inputs = (batch["tokens"], batch["positions"], batch["segment_ids"])
  with multi.rows(batch.get("adapter")):  # each row's adapter, for named adapters
    ours, _ = model.module.apply({"params": params}, *inputs)
  want, _ = base_module.apply({"params": base}, *inputs)
  real = _host(batch["segment_ids"]) > 0
  diff = np.abs(_host(ours).astype(np.float32) - _host(want).astype(np.float32))[real]
  worst = float(diff.max()) if diff.size else 0.0
  if not worst <= atol:  # also catches NaN
    own = [p for p in flat if p not in base_paths]
    raise AssertionError(f"identity_at_init: peft.method {spec.method} changes the base model's "
                         f"logits by up to {worst:.3g} (> {atol:g}); its {len(own)} "
                         f"parameter(s): {_listed(own)}")
