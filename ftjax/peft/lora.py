"""LoRA and DoRA: a trained low-rank update beside a frozen dense kernel.

y = x·W + s·dropout(x)·A·B (+ bias), with A (in, r) random and B (r, out) zero, so a fresh
adapter leaves the model unchanged; s = alpha/r, or alpha/√r with rsLoRA. DoRA also trains a
magnitude m per output feature: y = m/‖W + s·A·B‖ ⊙ (x·W + s·x·A·B) + bias, the norm taken per
output column and treated as a constant in the backward pass (as in the paper and HF PEFT;
under dropout the formula is PEFT's, y = x·W + (m/n - 1)·x̃·W + m/n·s·x̃·A·B with x̃ dropped).

Parameters sit beside the kernel they adapt: `layers_0/self_attn/q_proj/{lora_a,lora_b,
lora_magnitude}`. The rank axis has no logical name, so it stays replicated on any mesh.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftjax.config import LoraConfig, PeftConfig, UserError
from ftjax.models import layers
from ftjax.peft.base import Context, Method

LEAVES = ("lora_a", "lora_b", "lora_magnitude")


@dataclasses.dataclass(frozen=True)
class Lora(Method):
  """LoRA (or DoRA) on the dense layers `modules` (module paths, e.g. 'layers_0/mlp/up_proj')."""

  modules: frozenset = frozenset()
  r: int = 8
  alpha: float = 16.0
  scale: float = 2.0
  dropout: float = 0.0
  rslora: bool = False
  dora: bool = False

  method: ClassVar[str] = "lora"
  peft_type: ClassVar[str] = "LORA"

  @classmethod
  def from_config(cls, cfg: PeftConfig, ctx: Context) -> "Lora":
    c = cfg.lora
    return cls(ctx.dense_modules(c.targets, "peft.lora.targets"), c.r, c.alpha, scale(c),
               c.dropout, c.rslora, c.dora)

  def wraps(self, module_path: str) -> bool:
    return module_path in self.modules

  def dense(self, module, x_NxI, kernel_IxO, bias):
    if "/".join(module.path) not in self.modules:
      return layers.linear(module, x_NxI, kernel_IxO, bias())
    y = layers.matmul(x_NxI, kernel_IxO, module.dtype)
    y = apply(module, x_NxI.astype(module.dtype), kernel_IxO, y, self)
    b = bias()
    return y if b is None else y + b.astype(module.dtype)

  def finish(self, flat, rng, text_ids, ctx):
    return finish(self, flat)

  def merge(self, flat: dict) -> dict:
    return merge(self, flat)

  def to_peft(self, flat: dict, ctx: Context) -> tuple[dict, dict]:
    config, tensors = to_peft(self, flat, ctx.hf_module)
    config["fan_in_fan_out"] = ctx.family.conv1d  # GPT-2's Conv1D holds (in, out) weights
    return config, tensors

  @classmethod
  def from_peft(cls, adapter, tensors, ctx, where):
    def to_module(name: str) -> str:
      path = ctx.module_path(name[len(cls.peft_prefix):])
      if path is None:
        raise UserError(f"{where}: LoRA tensor for unknown module '{name}'")
      return path
    return from_peft(adapter, tensors, to_module, where)


def scale(cfg: LoraConfig) -> float:
  return cfg.alpha / math.sqrt(cfg.r) if cfg.rslora else cfg.alpha / cfg.r


def uniform_fan_in(key, shape, dtype=jnp.float32):
  """PyTorch's nn.Linear default (kaiming-uniform, a=√5): U(±1/√fan_in), as PEFT inits A."""
  bound = 1.0 / math.sqrt(shape[0])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def apply(dense: nn.Module, x_NxI: jax.Array, kernel_IxO: jax.Array, y_NxO: jax.Array,
          spec) -> jax.Array:
  """Adds the LoRA (or DoRA) branch to a dense layer's bias-free output `y`.

  Called from inside `Dense.__call__`, so the parameters land in the dense layer's scope.
  Dropout on the branch input runs when the caller passes a 'dropout' rng (training).
  """
  in_f, out_f = kernel_IxO.shape
  a = dense.param("lora_a", nn.with_logical_partitioning(uniform_fan_in, (dense.axes[0], None)),
                  (in_f, spec.r), dense.param_dtype)
  b = dense.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros,
                                                         (None, dense.axes[1])),
                  (spec.r, out_f), dense.param_dtype)
  x = x_NxI
  if spec.dropout and dense.has_rng("dropout"):
    keep = 1.0 - spec.dropout
    kept = jax.random.bernoulli(dense.make_rng("dropout"), keep, x.shape)
    x = jnp.where(kept, x / keep, 0).astype(x.dtype)
  delta = jnp.dot(jnp.dot(x, a.astype(dense.dtype)), b.astype(dense.dtype)) * spec.scale
  if not spec.dora:
    return y_NxO + delta
  magnitude = dense.param("lora_magnitude",
                          nn.with_logical_partitioning(nn.initializers.ones, dense.axes[1:]),
                          (out_f,), dense.param_dtype)
  norm = jax.lax.stop_gradient(column_norm(kernel_IxO, a, b, spec.scale))
  ratio = (magnitude / norm).astype(dense.dtype)
  if x is x_NxI:
    return (y_NxO + delta) * ratio
  # With dropout, PEFT rescales the base path of the dropped input: x·W + (m/n - 1)·x̃·W + ...
  return y_NxO + (ratio - 1) * layers.matmul(x, kernel_IxO, dense.dtype) + ratio * delta


def column_norm(kernel, a, b, s):
  w = layers.dequantized(kernel) + s * jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32))
  return jnp.sqrt(jnp.sum(w * w, axis=0))


def finish(spec, flat: dict) -> dict:
  """DoRA's magnitude starts at ‖W‖ per output feature, read from the loaded base kernel."""
  out = dict(flat)
  for m in spec.modules:
    if spec.dora:
      out[f"{m}/lora_magnitude"] = column_norm(flat[f"{m}/kernel"], flat[f"{m}/lora_a"],
                                                flat[f"{m}/lora_b"], spec.scale)
  return out


def merge(spec, flat: dict) -> dict:
  """W + s·A·B (rescaled per column by DoRA's magnitude) in place of each adapted kernel."""
  out = {p: v for p, v in flat.items() if p.rsplit("/", 1)[-1] not in LEAVES}
  for m in spec.modules:
    w = layers.dequantized(flat[f"{m}/kernel"])  # a quantised base: what the adapter saw
    a, b = (jnp.asarray(flat[f"{m}/{n}"], jnp.float32) for n in ("lora_a", "lora_b"))
    merged = w + spec.scale * a @ b
    if spec.dora:
      merged = merged * (flat[f"{m}/lora_magnitude"] / column_norm(w, a, b, spec.scale))
    out[f"{m}/kernel"] = merged  # fp32, even over a bf16 base: the delta is not rounded away
  return out


def unmerge(spec, merged: dict, adapters: dict) -> dict:
  """The base kernels back from merged ones: W = W' - s·A·B (LoRA only).

  A DoRA merge rescales each column by m/‖W + s·A·B‖, a norm the merged weights no longer
  determine, so it is not inverted here: keep the unmerged parameters instead.
  """
  if spec.dora:
    raise UserError("a DoRA merge cannot be undone from the merged weights; keep the unmerged "
                    "parameters")
  out = dict(merged)
  for m in spec.modules:
    w = jnp.asarray(merged[f"{m}/kernel"], jnp.float32)
    a, b = (jnp.asarray(adapters[f"{m}/{n}"], jnp.float32) for n in ("lora_a", "lora_b"))
    out[f"{m}/kernel"] = (w - spec.scale * a @ b).astype(merged[f"{m}/kernel"].dtype)
  return out


def to_peft(spec, flat: dict, hf_module: Callable[[str], str]) -> tuple[dict, dict]:
  """(adapter_config fields, tensors) in HF PEFT's layout: A (r, in), B (out, r)."""
  tensors = {}
  for m in sorted(spec.modules):
    name = f"base_model.model.{hf_module(m)}"
    tensors[f"{name}.lora_A.weight"] = np.asarray(flat[f"{m}/lora_a"]).T
    tensors[f"{name}.lora_B.weight"] = np.asarray(flat[f"{m}/lora_b"]).T
    if spec.dora:
      tensors[f"{name}.lora_magnitude_vector"] = np.asarray(flat[f"{m}/lora_magnitude"])
  names = sorted(hf_module(m) for m in spec.modules)
  config = {"peft_type": "LORA", "r": spec.r, "lora_alpha": spec.alpha,
            "lora_dropout": spec.dropout, "use_rslora": spec.rslora, "use_dora": spec.dora,
            # exact module names, so that PEFT wraps the very layers ftjax trained
            "target_modules": "^(" + "|".join(n.replace(".", r"\.") for n in names) + ")$",
            "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True}
  return config, tensors


def from_peft(adapter: dict, tensors: dict, to_module: Callable[[str], str],
              where: str) -> tuple[dict, dict, set[str]]:
  """(peft.lora config fields, ftjax leaves, the tensor keys used) from a PEFT LoRA adapter."""
  dora = bool(adapter.get("use_dora"))
  suffixes = {".lora_A.weight": ("lora_a", True), ".lora_B.weight": ("lora_b", True)}
  if dora:
    suffixes[".lora_magnitude_vector"] = ("lora_magnitude", False)
  leaves, targets, used = {}, set(), set()
  for key, value in tensors.items():
    for suffix, (leaf, transpose) in suffixes.items():
      if key.endswith(suffix):
        module = to_module(key[:-len(suffix)])
        leaves[f"{module}/{leaf}"] = value.T if transpose else value
        targets.add(module)
        used.add(key)
  if not targets:
    raise UserError(f"{where}: a LORA adapter without lora_A/lora_B tensors")
  for m in sorted(targets):
    for _, (leaf, _) in suffixes.items():
      if f"{m}/{leaf}" not in leaves:
        raise UserError(f"{where}: module '{m}' has no {leaf} tensor")
  try:
    fields = {"r": int(adapter["r"]), "alpha": float(adapter["lora_alpha"]),
              "dropout": float(adapter.get("lora_dropout") or 0.0),
              "rslora": bool(adapter.get("use_rslora")), "dora": dora,
              "targets": [f"^{m}/kernel$" for m in sorted(targets)]}
  except (KeyError, TypeError, ValueError) as e:
    raise UserError(f"{where}: adapter_config.json lacks a valid r / lora_alpha ({e!r})") from None
  return fields, leaves, used
