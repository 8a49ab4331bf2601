"""LoRA and DoRA: a trained low-rank update beside a frozen dense kernel.

y = x·W + s·dropout(x)·A·B (+ bias), with A (in, r) random and B (r, out) zero, so a fresh
adapter leaves the model unchanged; s = alpha/r, or alpha/√r with rsLoRA. DoRA also trains a
magnitude m per output feature: y = m/‖W + s·A·B‖ ⊙ (x·W + s·x·A·B) + bias, the norm taken per
output column and treated as a constant in the backward pass (as in the paper and HF PEFT).

Parameters sit beside the kernel they adapt: `layers_0/self_attn/q_proj/{lora_a,lora_b,
lora_magnitude}`. The rank axis has no logical name, so it stays replicated on any mesh.
"""

from __future__ import annotations

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftjax import tree
from ftjax.config import LoraConfig, UserError

LEAVES = ("lora_a", "lora_b", "lora_magnitude")


def modules(cfg: LoraConfig, paths: list[str]) -> frozenset[str]:
  """The dense modules LoRA wraps: those whose kernel path a target pattern finds.

  `all-linear` means every dense layer except the output head (as in HF PEFT).
  """
  kernels = [p for p in paths if p.endswith("/kernel")]
  patterns = [t for t in cfg.targets if t != "all-linear"]
  found = tree.match(patterns, kernels, "peft.lora.targets")
  if "all-linear" in cfg.targets:
    found |= {p for p in kernels if not p.startswith("lm_head/")}
  return frozenset(p.rsplit("/", 1)[0] for p in found)


def scale(cfg: LoraConfig) -> float:
  return cfg.alpha / math.sqrt(cfg.r) if cfg.rslora else cfg.alpha / cfg.r


def _uniform_fan_in(key, shape, dtype=jnp.float32):
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
  a = dense.param("lora_a", nn.with_logical_partitioning(_uniform_fan_in, (dense.axes[0], None)),
                  (in_f, spec.lora_r), dense.param_dtype)
  b = dense.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros,
                                                         (None, dense.axes[1])),
                  (spec.lora_r, out_f), dense.param_dtype)
  x = x_NxI
  if spec.lora_dropout and dense.has_rng("dropout"):
    keep = 1.0 - spec.lora_dropout
    kept = jax.random.bernoulli(dense.make_rng("dropout"), keep, x.shape)
    x = jnp.where(kept, x / keep, 0).astype(x.dtype)
  delta = jnp.dot(jnp.dot(x, a.astype(dense.dtype)), b.astype(dense.dtype)) * spec.lora_scale
  if not spec.dora:
    return y_NxO + delta
  magnitude = dense.param("lora_magnitude",
                          nn.with_logical_partitioning(nn.initializers.ones, dense.axes[1:]),
                          (out_f,), dense.param_dtype)
  norm = jax.lax.stop_gradient(_column_norm(kernel_IxO, a, b, spec.lora_scale))
  return (y_NxO + delta) * (magnitude / norm).astype(dense.dtype)


def _column_norm(kernel, a, b, s):
  w = kernel.astype(jnp.float32) + s * jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32))
  return jnp.sqrt(jnp.sum(w * w, axis=0))


def finish(spec, flat: dict) -> dict:
  """DoRA's magnitude starts at ‖W‖ per output feature, read from the loaded base kernel."""
  out = dict(flat)
  for m in spec.lora_modules:
    if spec.dora:
      out[f"{m}/lora_magnitude"] = _column_norm(flat[f"{m}/kernel"], flat[f"{m}/lora_a"],
                                                flat[f"{m}/lora_b"], spec.lora_scale)
  return out


def merge(spec, flat: dict) -> dict:
  """W + s·A·B (rescaled per column by DoRA's magnitude) in place of each adapted kernel."""
  out = {p: v for p, v in flat.items() if p.rsplit("/", 1)[-1] not in LEAVES}
  for m in spec.lora_modules:
    w, a, b = (jnp.asarray(flat[f"{m}/{n}"], jnp.float32) for n in ("kernel", "lora_a", "lora_b"))
    merged = w + spec.lora_scale * a @ b
    if spec.dora:
      merged = merged * (flat[f"{m}/lora_magnitude"] / _column_norm(w, a, b, spec.lora_scale))
    out[f"{m}/kernel"] = merged.astype(flat[f"{m}/kernel"].dtype)
  return out


def to_peft(spec, flat: dict, hf_module: Callable[[str], str]) -> tuple[dict, dict]:
  """(adapter_config fields, tensors) in HF PEFT's layout: A (r, in), B (out, r)."""
  tensors = {}
  for m in sorted(spec.lora_modules):
    name = f"base_model.model.{hf_module(m)}"
    tensors[f"{name}.lora_A.weight"] = np.asarray(flat[f"{m}/lora_a"]).T
    tensors[f"{name}.lora_B.weight"] = np.asarray(flat[f"{m}/lora_b"]).T
    if spec.dora:
      tensors[f"{name}.lora_magnitude_vector"] = np.asarray(flat[f"{m}/lora_magnitude"])
  names = sorted(hf_module(m) for m in spec.lora_modules)
  config = {"peft_type": "LORA", "r": spec.lora_r, "lora_alpha": spec.lora_alpha,
            "lora_dropout": spec.lora_dropout, "use_rslora": spec.rslora, "use_dora": spec.dora,
            # exact module names, so that PEFT wraps the very layers ftjax trained
            "target_modules": "^(" + "|".join(n.replace(".", r"\.") for n in names) + ")$",
            "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True}
  return config, tensors


def from_peft(adapter: dict, tensors: dict, to_module: Callable[[str], str],
              where: str) -> tuple[dict, dict]:
  """(peft.lora config fields, ftjax leaves) from a PEFT LoRA adapter."""
  if adapter.get("fan_in_fan_out"):
    raise UserError(f"{where}: fan_in_fan_out LoRA (Conv1D layers) is not supported here")
  leaves, targets = {}, set()
  suffixes = {".lora_A.weight": ("lora_a", True), ".lora_B.weight": ("lora_b", True),
              ".lora_magnitude_vector": ("lora_magnitude", False)}
  for key, value in tensors.items():
    for suffix, (leaf, transpose) in suffixes.items():
      if key.endswith(suffix):
        module = to_module(key[:-len(suffix)])
        leaves[f"{module}/{leaf}"] = value.T if transpose else value
        targets.add(module)
  if not targets:
    raise UserError(f"{where}: a LORA adapter without lora_A/lora_B tensors")
  fields = {"r": int(adapter["r"]), "alpha": float(adapter["lora_alpha"]),
            "dropout": float(adapter.get("lora_dropout") or 0.0),
            "rslora": bool(adapter.get("use_rslora")), "dora": bool(adapter.get("use_dora")),
            "targets": [f"^{m}/kernel$" for m in sorted(targets)]}
  return fields, leaves
