"""(IA)³ (Liu et al., 2022): trained vectors that rescale activations of chosen dense layers.

For a target layer y = x·W + b, a vector l (ones at the start, so the model starts as the base)
rescales the output, y = (x·W + b) ⊙ l, or for a feed-forward target the input,
y = (x ⊙ l)·W + b, as HF PEFT computes them (in fp32, cast back to the compute dtype). Both fold
into the weights: W·diag(l) and b ⊙ l, or diag(l)·W. Parameter: `<module>/ia3_l`, (out,) or
(in,); in PEFT's files (out, 1) or (1, in) under `base_model.model.<module>.ia3_l`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from ftjax.config import PeftConfig, UserError
from ftjax.models import layers
from ftjax.peft.base import Context, Method

LEAF = "ia3_l"


@dataclasses.dataclass(frozen=True)
class IA3(Method):
  """(IA)³ vectors on the dense layers `modules`; those in `feedforward` scale their input."""

  modules: frozenset = frozenset()
  feedforward: frozenset = frozenset()

  method: ClassVar[str] = "ia3"
  peft_type: ClassVar[str] = "IA3"

  @classmethod
  def from_config(cls, cfg: PeftConfig, ctx: Context) -> "IA3":
    modules = ctx.dense_modules(cfg.ia3.targets, "peft.ia3.targets")
    feedforward = ctx.dense_modules(cfg.ia3.feedforward, "peft.ia3.feedforward") \
        if cfg.ia3.feedforward else frozenset()
    if feedforward - modules:
      raise UserError(f"peft.ia3.feedforward: '{sorted(feedforward - modules)[0]}' is not one of "
                      "peft.ia3.targets")
    return cls(modules, feedforward)

  def wraps(self, module_path: str) -> bool:
    return module_path in self.modules

  def dense(self, module, x_NxI, kernel_IxO, bias):
    path = "/".join(module.path)
    if path not in self.modules:
      return layers.linear(module, x_NxI, kernel_IxO, bias())
    ff = path in self.feedforward
    n = kernel_IxO.shape[0] if ff else kernel_IxO.shape[1]
    axis = module.axes[0] if ff else module.axes[1]
    scale = module.param(LEAF, nn.with_logical_partitioning(nn.initializers.ones, (axis,)), (n,),
                         module.param_dtype).astype(jnp.float32)
    if ff:
      x = (x_NxI.astype(jnp.float32) * scale).astype(module.dtype)
      return layers.linear(module, x, kernel_IxO, bias())
    y = layers.linear(module, x_NxI, kernel_IxO, bias())
    return (y.astype(jnp.float32) * scale).astype(module.dtype)

  def merge(self, flat: dict) -> dict:
    out = {p: v for p, v in flat.items() if not p.endswith("/" + LEAF)}
    for m in self.modules:
      scale = jnp.asarray(flat[f"{m}/{LEAF}"], jnp.float32)
      w = layers.dequantized(flat[f"{m}/kernel"])
      if m in self.feedforward:
        out[f"{m}/kernel"] = w * scale[:, None]
      else:
        out[f"{m}/kernel"] = w * scale[None, :]
        if f"{m}/bias" in flat:
          out[f"{m}/bias"] = jnp.asarray(flat[f"{m}/bias"], jnp.float32) * scale
    return out

  def to_peft(self, flat: dict, ctx: Context) -> tuple[dict, dict]:
    tensors = {}
    for m in sorted(self.modules):
      scale = np.asarray(flat[f"{m}/{LEAF}"], np.float32)
      shape = (1, -1) if m in self.feedforward else (-1, 1)
      tensors[f"{self.peft_prefix}{ctx.hf_module(m)}.{LEAF}"] = scale.reshape(shape)
    exact = lambda ms: "^(" + "|".join(re.escape(ctx.hf_module(m)) for m in sorted(ms)) + ")$"
    config = {"peft_type": "IA3", "target_modules": exact(self.modules),
              # PEFT full-matches a string against each module name; "(?!)" matches none
              "feedforward_modules": exact(self.feedforward) if self.feedforward else "(?!)",
              "fan_in_fan_out": ctx.family.conv1d, "init_ia3_weights": True}
    return config, tensors

  @classmethod
  def from_peft(cls, adapter, tensors, ctx, where):
    ff_spec = adapter.get("feedforward_modules") or []
    if isinstance(ff_spec, str):
      is_ff = lambda name: bool(re.fullmatch(ff_spec, name))
    else:
      is_ff = lambda name: any(name.endswith(k) for k in ff_spec)
    leaves, targets, feedforward, used = {}, [], [], set()
    suffix = f".{LEAF}"
    for key, value in tensors.items():
      if not (key.startswith(cls.peft_prefix) and key.endswith(suffix)):
        continue
      name = key[len(cls.peft_prefix):-len(suffix)]
      module = ctx.module_path(name)
      if module is None:
        raise UserError(f"{where}: IA3 tensor for unknown module '{name}'")
      leaves[f"{module}/{LEAF}"] = np.asarray(value, np.float32).reshape(-1)
      targets.append(f"^{re.escape(module)}/kernel$")
      if is_ff(name):
        feedforward.append(f"^{re.escape(module)}/kernel$")
      used.add(key)
    if not leaves:
      raise UserError(f"{where}: an IA3 adapter without ia3_l tensors")
    return {"targets": sorted(targets), "feedforward": sorted(feedforward)}, leaves, used
