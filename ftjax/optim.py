"""The Optax chain built from the `optim` config.

    clip by global norm -> optimizer direction (adam / lion / sgd / adafactor)
      -> decoupled, masked weight decay -> -lr(step) -> per-leaf lr multipliers

Weight decay is decoupled (p -= lr * wd * p, as torch's AdamW) and masked: leaves whose path
matches an `optim.no_decay` regex (norms, biases, embeddings by default) are not decayed, and
`partition.rules` may set a leaf's decay (see ftjax.rules). `adam` adds the decay to the
gradient instead (L2, as torch's Adam). The schedule is a pure function of
the step, so the learning rate logged for a step is the one its update used.

Per-leaf multipliers give layer-wise learning rates: `lr_groups` (regex -> peak lr), a per-layer
decay (layer i of n gets lr * layer_decay^(n - i); embeddings one step below layer 0, the final
norm and head at full lr) and LoRA+ (lora_b at lr * loraplus_ratio). All of them scale the one
schedule, and the weight decay with it, as torch's parameter groups do.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from ftjax import dynamic as dynamic_lib
from ftjax import rules as prules
from ftjax import tree
from ftjax.config import OptimConfig, PartitionConfig, PartitionRule


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then cosine / linear decay to `lr * min_lr_ratio`, a constant,
  or warmup-stable-decay (flat, then linear decay over the last `decay_fraction` of the steps)."""
  decay_steps = max(total_steps - cfg.warmup_steps, 1)
  end = cfg.lr * cfg.min_lr_ratio
  if cfg.schedule == "cosine":
    main = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
  elif cfg.schedule == "linear":
    main = optax.linear_schedule(cfg.lr, end, decay_steps)
  elif cfg.schedule == "wsd":
    tail = max(round(total_steps * cfg.decay_fraction), 1)
    stable = max(decay_steps - tail, 0)
    main = optax.join_schedules([optax.constant_schedule(cfg.lr),
                                 optax.linear_schedule(cfg.lr, end, tail)], [stable])
  else:
    main = optax.constant_schedule(cfg.lr)
  if cfg.warmup_steps == 0:
    return main
  warmup = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
  return optax.join_schedules([warmup, main], [cfg.warmup_steps])


def decisions(cfg: OptimConfig, paths: list[str], family=None,
              rules: Sequence[PartitionRule] = ()) -> dict[str, prules.Decision]:
  """Each trainable leaf's lr multiplier and weight decay: `rules` (partition.rules) first, then
  optim.lr_groups and optim.no_decay (see ftjax.rules)."""
  return prules.decide(prules.user_rules(rules) + prules.sugar(None, cfg), paths, family,
                       base_paths=(), method="lora", weight_decay=cfg.weight_decay,
                       check=("trainable",))


def decay_mask(cfg: OptimConfig, params: dict, family=None,
               rules: Sequence[PartitionRule] = ()) -> dict:
  """True for leaves that get weight decay (a decay > 0 after the rules and `no_decay`; with
  optim.weight_decay 0, those that would get one)."""
  cfg = dataclasses.replace(cfg, weight_decay=cfg.weight_decay or 1.0)
  found = decisions(cfg, list(tree.flatten(params)), family, rules)
  return tree.unflatten({p: d.weight_decay > 0 for p, d in found.items()})


def decayed_weights(coefficients: dict[str, float]) -> optax.GradientTransformation:
  """Decoupled weight decay with one coefficient per leaf path (0: none): u + c * p, as
  `optax.add_decayed_weights` computes it for one coefficient."""
  def update(updates, state, params):
    if params is None:
      raise ValueError("decayed_weights needs the parameters")
    flat_u, flat_p = tree.flatten(updates), tree.flatten(params)
    return tree.unflatten({k: u + coefficients[k] * flat_p[k] if coefficients[k] else u
                           for k, u in flat_u.items()}), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def _depth(path: str, num_layers: int, layer_index: Callable[[str], Optional[int]],
           is_embedding: Callable[[str], bool]) -> int:
  """0 for embeddings, i + 1 for layer i, num_layers + 1 for what follows (final norm, head)."""
  i = layer_index(path)
  if i is not None:
    return i + 1
  return 0 if is_embedding(path) else num_layers + 1


def lr_multipliers(cfg: OptimConfig, paths: list[str], num_layers: int, family=None,
                   rules: Sequence[PartitionRule] = ()) -> dict[str, float]:
  """Each trainable leaf's learning rate relative to `optim.lr` (see the module docstring).
  `family` (ftjax.models.Family) says where a leaf sits for `layer_decay`."""
  found = decisions(cfg, paths, family, rules)
  out = {}
  for path in paths:
    m = found[path].lr
    if cfg.layer_decay != 1.0:
      if family is None:
        raise ValueError("optim.layer_decay needs the model family")
      depth = _depth(path, num_layers, family.layer_index,
                     lambda p: family.kind(p) == "embedding" or p.endswith("/embedding"))
      m *= cfg.layer_decay ** (num_layers + 1 - depth)
    if cfg.loraplus_ratio and path.endswith("lora_b"):
      m *= cfg.loraplus_ratio
    out[path] = m
  return out


def _direction(cfg: OptimConfig, decay: optax.GradientTransformation
               ) -> list[optax.GradientTransformation]:
  if cfg.name == "adamw":
    return [optax.scale_by_adam(cfg.b1, cfg.b2, cfg.eps), decay]
  if cfg.name == "adam":  # L2: the decay joins the gradient before the moments
    return [decay, optax.scale_by_adam(cfg.b1, cfg.b2, cfg.eps)]
  if cfg.name == "lion":
    return [optax.scale_by_lion(cfg.b1, cfg.b2), decay]
  if cfg.name == "sgd":
    momentum = [optax.trace(cfg.momentum, cfg.nesterov)] if cfg.momentum else []
    return momentum + [decay]
  # adafactor: factored second moments with update clipping, at the configured lr (HF's
  # Adafactor with relative_step=False and scale_parameter=False)
  return [optax.scale_by_factored_rms(), optax.clip_by_block_rms(1.0), decay]


def build(cfg: OptimConfig, total_steps: int, params: dict, num_layers: int = 0, family=None, *,
          rules: Sequence[PartitionRule] = (), dynamic: Optional[PartitionConfig] = None,
          seed: int = 0, first: Sequence[optax.GradientTransformation] = ()
          ) -> tuple[optax.GradientTransformation, Callable[[int], float]]:
  """Returns (the gradient transformation for `params`, the learning-rate schedule).

  Args:
    cfg: the `optim` section.
    total_steps: the schedule's length.
    params: the trainable parameters (or their shapes).
    num_layers, family: where leaves sit (ftjax.models.Family), for `optim.layer_decay`,
      layer and kind selectors, and LISA.
    rules: `partition.rules`, which may set lr multipliers and weight decay per leaf.
    dynamic: `partition` with `lisa` or `sparse` set: the chain is wrapped so that only the
      window's layers (ftjax.dynamic.lisa) or the chosen entries (ftjax.dynamic.sparse) update.
    seed: LISA's layer choices.
    first: transforms ahead of clipping, on the raw gradient (e.g. ftjax.regularize's L2-SP
      and EWC terms).
  """
  lr = schedule(cfg, total_steps)
  paths = list(tree.flatten(params))
  found = decisions(cfg, paths, family, rules)
  coefficients = {p: d.weight_decay for p, d in found.items()}
  lisa = dynamic is not None and dynamic.lisa.layers
  values = set(coefficients.values()) - {0.0}
  if not values:
    decay = optax.identity()
  elif len(values) == 1 and not lisa:  # (LISA's per-layer states need a per-leaf transform)
    decay = optax.add_decayed_weights(values.pop(), tree.unflatten(
        {p: c > 0 for p, c in coefficients.items()}))
  else:
    decay = decayed_weights(coefficients)
  clip = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
  direction = _direction(cfg, decay)
  tail = [optax.scale_by_learning_rate(lr)]
  scales = lr_multipliers(cfg, paths, num_layers, family, rules)
  if any(m != 1.0 for m in scales.values()):
    factors = tree.unflatten({p: jnp.float32(m) for p, m in scales.items()})
    tail.append(optax.stateless(lambda updates, _: jax.tree.map(jnp.multiply, updates, factors)))
  if lisa:
    if family is None or not num_layers:
      raise ValueError("partition.lisa needs the model family and its number of layers")
    args = ({p: family.layer_index(p) for p in paths}, num_layers, dynamic.lisa.layers,
            dynamic.lisa.every, seed)
    tx = optax.chain(dynamic_lib.lisa_grads(*args), *clip,
                     dynamic_lib.lisa(optax.chain(*direction), *args), *tail)
  else:
    tx = optax.chain(*clip, *direction, *tail)
    if dynamic is not None and dynamic.sparse.density:
      tx = dynamic_lib.sparse(tx, dynamic.sparse.density)
  return (optax.chain(*first, tx) if first else tx), lr
