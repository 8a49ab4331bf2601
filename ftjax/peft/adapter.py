"""Bottleneck adapters (Houlsby / Pfeiffer): h + W_up·σ(W_down·h) on a sublayer's output.

An adapter sits after the attention block (`attn`) and/or after the feed-forward block (`ffn`),
before the residual add; both positions is Houlsby's design, FFN only is Pfeiffer's. The up
projection starts at zero, so a fresh adapter is the identity and the model is the base model.
Parameters: `layers_3/{attn,ffn}_adapter/{down,up}/{kernel,bias}`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from ftjax.config import PeftConfig
from ftjax.models import layers
from ftjax.peft.base import Context, Method

ACTIVATIONS = {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "silu": jax.nn.silu, "tanh": jnp.tanh}


class Adapter(nn.Module):
  size: int
  activation: str = "relu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h_BxLxD: jax.Array) -> jax.Array:
    d = h_BxLxD.shape[-1]
    down = layers.Dense(self.size, ("embed", None), True, self.dtype, name="down")(h_BxLxD)
    up = layers.Dense(d, (None, "embed"), True, self.dtype, kernel_init=nn.initializers.zeros,
                      name="up")(ACTIVATIONS[self.activation](down))
    return h_BxLxD + up


@dataclasses.dataclass(frozen=True)
class Adapters(Method):
  """Bottleneck adapters of width `size` at `positions` ('attn', 'ffn') in every layer."""

  size: int = 64
  positions: tuple = ("attn", "ffn")
  activation: str = "relu"

  method: ClassVar[str] = "adapter"
  merge_refusal: ClassVar[str] = (
      "bottleneck adapters add layers that cannot be merged into the base weights, and HF "
      "PEFT has no format for them; keep using the run's checkpoint with ftjax")

  @classmethod
  def from_config(cls, cfg: PeftConfig, ctx: Context) -> "Adapters":
    return cls(cfg.adapter.size, tuple(sorted(set(cfg.adapter.positions))),
               cfg.adapter.activation)

  def sublayer(self, module, where, h_BxLxD):
    if where not in self.positions:
      return h_BxLxD
    return Adapter(self.size, self.activation, module.dtype, name=f"{where}_adapter")(h_BxLxD)
