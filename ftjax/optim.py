"""The Optax chain built from the `optim` config.

    clip by global norm -> optimizer direction (adam / lion / sgd / adafactor)
      -> decoupled, masked weight decay -> -lr(step) -> per-leaf lr multipliers

Weight decay is decoupled (p -= lr * wd * p, as torch's AdamW) and masked: leaves whose path
matches an `optim.no_decay` regex (norms, biases, embeddings by default) are not decayed. `adam`
adds the decay to the gradient instead (L2, as torch's Adam). The schedule is a pure function of
the step, so the learning rate logged for a step is the one its update used.

Per-leaf multipliers give layer-wise learning rates: `lr_groups` (regex -> peak lr), a per-layer
decay (layer i of n gets lr * layer_decay^(n - i); embeddings one step below layer 0, the final
norm and head at full lr) and LoRA+ (lora_b at lr * loraplus_ratio). All of them scale the one
schedule, and the weight decay with it, as torch's parameter groups do.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax

from ftjax import tree
from ftjax.config import OptimConfig


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


def decay_mask(cfg: OptimConfig, params: dict) -> dict:
  """True for leaves that get weight decay: every leaf no `no_decay` pattern finds."""
  paths = set(tree.flatten(params))
  exempt = tree.match(cfg.no_decay, paths, "optim.no_decay", strict=False)
  return tree.mask(params, paths - exempt)


def _depth(path: str, num_layers: int, layer_index: Callable[[str], Optional[int]],
           is_embedding: Callable[[str], bool]) -> int:
  """0 for embeddings, i + 1 for layer i, num_layers + 1 for what follows (final norm, head)."""
  i = layer_index(path)
  if i is not None:
    return i + 1
  return 0 if is_embedding(path) else num_layers + 1


def lr_multipliers(cfg: OptimConfig, paths: list[str], num_layers: int, family=None
                   ) -> dict[str, float]:
  """Each trainable leaf's learning rate relative to `optim.lr` (see the module docstring).
  `family` (ftjax.models.Family) says where a leaf sits for `layer_decay`."""
  groups = tree.label([(g.pattern, g.lr / cfg.lr) for g in cfg.lr_groups], paths,
                      "optim.lr_groups (over trainable parameters)", default=1.0)
  out = {}
  for path in paths:
    m = groups[path]
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


def build(cfg: OptimConfig, total_steps: int, params: dict, num_layers: int = 0, family=None
          ) -> tuple[optax.GradientTransformation, Callable[[int], float]]:
  """Returns (the gradient transformation for `params`, the learning-rate schedule); `family`
  (ftjax.models.Family) places leaves in layers for `optim.layer_decay`."""
  lr = schedule(cfg, total_steps)
  flat = tree.flatten(params)
  decay = optax.add_decayed_weights(cfg.weight_decay, decay_mask(cfg, params)) \
      if cfg.weight_decay else optax.identity()
  parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
  parts += _direction(cfg, decay)
  parts.append(optax.scale_by_learning_rate(lr))
  scales = lr_multipliers(cfg, list(flat), num_layers, family)
  if any(m != 1.0 for m in scales.values()):
    factors = tree.unflatten({p: jnp.float32(m) for p, m in scales.items()})
    parts.append(optax.stateless(lambda updates, _: jax.tree.map(jnp.multiply, updates, factors)))
  return optax.chain(*parts), lr
