"""Bottleneck adapters (Houlsby / Pfeiffer): h + W_up·σ(W_down·h) on a sublayer's output.

An adapter sits after the attention block (`attn`) and/or after the feed-forward block (`ffn`),
before the residual add; both positions is Houlsby's design, FFN only is Pfeiffer's. The up
projection starts at zero, so a fresh adapter is the identity and the model is the base model.
Parameters: `layers_3/{attn,ffn}_adapter/{down,up}/{kernel,bias}`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ftjax.models import layers

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
