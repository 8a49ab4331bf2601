"""The Optax chain built from the `optim` config: schedule, clipping, optimizer, decoupled decay.

Weight decay is decoupled (AdamW: p -= lr * wd * p) and masked: leaves whose path matches an
`optim.no_decay` regex (norms, biases, embeddings by default) are not decayed. The schedule is a
pure function of the step, so the learning rate logged for a step is the one its update used.
"""

from __future__ import annotations

from typing import Callable

import optax

from ftjax import tree
from ftjax.config import OptimConfig


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then cosine or linear decay to `lr * min_lr_ratio` (or flat)."""
  decay_steps = max(total_steps - cfg.warmup_steps, 1)
  end = cfg.lr * cfg.min_lr_ratio
  if cfg.schedule == "cosine":
    main = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
  elif cfg.schedule == "linear":
    main = optax.linear_schedule(cfg.lr, end, decay_steps)
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


def build(cfg: OptimConfig, total_steps: int, params: dict
          ) -> tuple[optax.GradientTransformation, Callable[[int], float]]:
  """Returns (the gradient transformation for `params`, the learning-rate schedule)."""
  lr = schedule(cfg, total_steps)
  parts = []
  if cfg.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  parts.append(optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                           mask=decay_mask(cfg, params)))
  return optax.chain(*parts), lr
