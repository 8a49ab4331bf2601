"""Many LoRA / DoRA adapters over one frozen base, each row of a batch applying its own.

`peft.adapters: {NAME: {r, alpha, targets, dora, ...}}` resolves to one `MultiLora` holding a
`Lora` per name. Each adapter's parameters sit in a scope named after it inside the dense layer
it adapts, `layers_0/self_attn/q_proj/<NAME>/{lora_a, lora_b, lora_magnitude}`, so partition
rules, optimizer groups and checkpoints see every adapter apart; `single(name, flat)` gives one
adapter back as a plain `Lora` with its leaves at the usual `.../q_proj/lora_a` paths (export,
merge and PEFT's format then need nothing new).

Which adapter a row uses is data, not structure: the row's adapter id (an index into
`adapters`) travels with the batch as `batch["adapter"]` (rows, 1), and whoever applies the
module inside a traced function says so with `with rows(ids): module.apply(...)` (ftjax.loss,
ftjax.generate and `assembly.Model.apply` do). A context variable, rather than a new argument
to every family's modules: the dense layers deep inside need the ids, and no family has to know
that they exist. It must be set inside the traced function, from its arguments, so that a
jitted program never bakes a batch's ids in as constants.

Two ways to compute the rows' branches (`routing`; `scripts/bench_adapters.py` measures both;
"auto", the default, gathers where a layer has several adapters):
- "mask": one matmul through all adapters' A side by side (in, Σr), zero the columns that are
  not the row's own (times each adapter's scale), one matmul through the stacked B (Σr, out).
  Exact, shape-static, and the whole cost is n× a LoRA branch of rank r (small beside the base
  matmul).
- "gather": each row's own A and B picked from stacks (rows, in, r) and applied with a batched
  matmul; the work is one branch per row, the gathered copies cost rows × (in + out) × r.
A row whose id names no adapter of a layer gets no branch there (an adapter without that
target; an id of -1 or past the last adapter: the base model). Measured on 2 CPU cores
(benchmark model, batch 8 x 256, four adapters r16 on every projection): gather 711 tokens/s,
mask 639, one plain LoRA 708 — mask does n times the branch work, gather one branch per row at
the price of small gathered copies.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, ClassVar, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftjax.config import PeftConfig, UserError, check_adapter_name
from ftjax.models import layers
from ftjax.peft import lora
from ftjax.peft.base import Context, Method

# Whether a value is known while tracing (an eager gradient's inputs are; a jit's are not):
# jax.core's public alias is deprecated without a replacement, so the check is skipped if a
# later jax lacks it.
_is_concrete = getattr(jax._src.core, "is_concrete", None)  # pylint: disable=protected-access

_ROWS: contextvars.ContextVar = contextvars.ContextVar("ftjax_adapter_rows", default=None)


@contextlib.contextmanager
def rows(ids_B: Optional[jax.Array]):
  """Within this block, row i of every batch a `MultiLora` model sees uses adapter `ids_B[i]`
  (an int array (rows,) or (rows, 1); None: no routing)."""
  token = _ROWS.set(None if ids_B is None else jnp.asarray(ids_B).reshape(-1))
  try:
    yield
  finally:
    _ROWS.reset(token)


check_name = check_adapter_name


class _Branch(nn.Module):
  """One adapter's parameters inside a dense layer's scope (initialised as `lora.apply` does)."""

  r: int
  axes: tuple
  dora: bool
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, in_f: int, out_f: int):
    a = self.param("lora_a", nn.with_logical_partitioning(lora.uniform_fan_in,
                                                          (self.axes[0], None)),
                   (in_f, self.r), self.param_dtype)
    b = self.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros,
                                                          (None, self.axes[1])),
                   (self.r, out_f), self.param_dtype)
    m = self.param("lora_magnitude", nn.with_logical_partitioning(nn.initializers.ones,
                                                                  self.axes[1:]),
                   (out_f,), self.param_dtype) if self.dora else None
    return a, b, m


@dataclasses.dataclass(frozen=True)
class MultiLora(Method):
  """Named LoRA / DoRA adapters (`adapters`: ((name, Lora), ...)); see the module docstring."""

  adapters: tuple = ()
  routing: str = "auto"  # auto (gather where a layer has several adapters) | mask | gather

  method: ClassVar[str] = "lora"
  peft_type: ClassVar[str] = "LORA"
  merge_refusal: ClassVar[str] = ("a run with several adapters merges one adapter at a time "
                                  "(export --adapter NAME)")

  @classmethod
  def from_config(cls, cfg: PeftConfig, ctx: Context) -> "MultiLora":
    specs = []
    for name, c in cfg.adapters.items():
      check_name(name, f"peft.adapters.{name}")
      modules = ctx.dense_modules(c.targets, f"peft.adapters.{name}.targets")
      for m in modules:  # the name must not read as another kind of module (rules by kind)
        if ctx.family.kind(f"{m}/{name}/lora_a") != ctx.family.kind(f"{m}/kernel"):
          raise UserError(f"peft.adapters.{name}: the name reads as a "
                          f"{ctx.family.kind(f'{m}/{name}/lora_a')} module in this model's "
                          f"parameter paths ({m}/{name}/...); choose another name")
      specs.append((name, lora.Lora(modules, c.r, c.alpha, lora.scale(c), c.dropout, c.rslora,
                                    c.dora or c.method == "dora")))
    return cls(tuple(specs))

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(n for n, _ in self.adapters)

  def wraps(self, module_path: str) -> bool:
    return any(module_path in s.modules for _, s in self.adapters)

  def dense(self, module, x_NxI, kernel_IxO, bias):
    path = "/".join(module.path)
    here = [(k, name, s) for k, (name, s) in enumerate(self.adapters) if path in s.modules]
    if not here:
      return layers.linear(module, x_NxI, kernel_IxO, bias())
    in_f, out_f = kernel_IxO.shape
    params = [_Branch(s.r, module.axes, s.dora, module.param_dtype, name=name)(in_f, out_f)
              for _, name, s in here]
    b = bias()
    y = layers.matmul(x_NxI, kernel_IxO, module.dtype)
    ids_N = _token_ids(module, x_NxI)
    x_in = x_NxI.astype(module.dtype)
    x = _dropout(module, x_in, ids_N, here)
    gather = self.routing == "gather" or (self.routing == "auto" and len(here) > 1)
    route = _gather if gather else _mask
    delta = route(x, ids_N, here, params, module.dtype)
    if any(s.dora for _, _, s in here):
      ratio = _dora_ratio(module, kernel_IxO, ids_N, here, params)
      if x is x_in:
        y = (y + delta) * ratio
      else:  # PEFT's form under dropout (see ftjax.peft.lora)
        y = y + (ratio - 1) * layers.matmul(x, kernel_IxO, module.dtype) + ratio * delta
    else:
      y = y + delta
    return y if b is None else y + b.astype(module.dtype)

  def finish(self, flat, rng, text_ids, ctx):
    out = dict(flat)
    for name, s in self.adapters:
      if s.dora:
        view = lora.finish(s, self.single(name, flat)[1])
        out.update({f"{m}/{name}/lora_magnitude": view[f"{m}/lora_magnitude"] for m in s.modules})
    return out

  def to_peft(self, flat: dict, ctx: Context) -> tuple[dict, dict]:
    raise UserError(f"a run with adapters {', '.join(self.names)} exports one adapter at a "
                    "time (--adapter NAME)")

  def index(self, name: str, what: str = "adapter") -> int:
    if name not in self.names:
      raise UserError(f"{what} '{name}' is not one of this model's adapters "
                      f"({', '.join(self.names)})")
    return self.names.index(name)

  def single(self, name: str, flat: dict) -> tuple[lora.Lora, dict]:
    """Adapter `name` alone: its `Lora` spec, and `flat` with its leaves at the plain LoRA paths
    (`.../q_proj/lora_a`) and the other adapters' leaves left out."""
    spec = self.adapters[self.index(name)][1]
    out = {}
    for p, v in flat.items():
      parts = p.rsplit("/", 2)
      if len(parts) == 3 and parts[2] in lora.LEAVES and parts[1] in self.names:
        if parts[1] == name:
          out[f"{parts[0]}/{parts[2]}"] = v
        continue
      out[p] = v
    return dataclasses.replace(spec, new_tokens=self.new_tokens,
                               new_token_leaves=self.new_token_leaves), out


def place(name: str, leaves: dict) -> dict:
  """Plain LoRA leaves (`.../q_proj/lora_a`) at adapter `name`'s paths (`single`'s inverse)."""
  out = {}
  for p, v in leaves.items():
    module, leaf = p.rsplit("/", 1)
    out[f"{module}/{name}/{leaf}" if leaf in lora.LEAVES else p] = v
  return out


def _token_ids(module, x_NxI: jax.Array) -> jax.Array:
  """The adapter id of each of the layer input's positions (rows × length, flattened)."""
  n_tokens = x_NxI.shape[0]
  ids = _ROWS.get()
  if ids is None:
    if module.is_initializing():
      return jnp.zeros((n_tokens,), jnp.int32)
    raise UserError("a model with several adapters was applied without each row's adapter id "
                    "(batch['adapter'], set with ftjax.peft.multi.rows)")
  if _is_concrete and not _is_concrete(x_NxI) and _is_concrete(ids):
    raise UserError("ftjax.peft.multi.rows was set outside the traced (jitted) function: its "
                    "ids would be compiled in as constants; set it inside, from an argument")
  if n_tokens % ids.shape[0]:
    raise ValueError(f"{n_tokens} positions do not split into {ids.shape[0]} rows")
  return jnp.repeat(ids.astype(jnp.int32), n_tokens // ids.shape[0])


def _slots(ids_N: jax.Array, here: list) -> tuple[jax.Array, int]:
  """(each token's slot in a table of n = max index here + 2 entries: its adapter's index, or
  the last entry when its id names no adapter of this layer; n)."""
  n = max(k for k, _, _ in here) + 2
  known = np.zeros(n, bool)
  known[[k for k, _, _ in here]] = True
  inside = (ids_N >= 0) & (ids_N < n - 1)
  return jnp.where(inside & jnp.asarray(known)[jnp.clip(ids_N, 0, n - 1)], ids_N, n - 1), n


def _dropout(module, x_NxI, ids_N, here):
  """The branch input under each row's own adapter's dropout (in training only)."""
  slot, n = _slots(ids_N, here)
  rates = np.zeros(n, np.float32)
  for k, _, s in here:
    rates[k] = s.dropout
  if not rates.any() or not module.has_rng("dropout"):
    return x_NxI
  keep = 1.0 - jnp.asarray(rates)[slot][:, None]
  kept = jax.random.bernoulli(module.make_rng("dropout"), keep, x_NxI.shape)
  return jnp.where(kept, x_NxI / keep, 0).astype(x_NxI.dtype)


def _mask(x_NxI, ids_N, here, params, dtype):
  """Σ_k [row uses k] s_k·x·A_k·B_k as two matmuls through all adapters' factors at once."""
  a = jnp.concatenate([p[0] for p in params], axis=1).astype(dtype)
  b = jnp.concatenate([p[1] for p in params], axis=0).astype(dtype)
  owner = np.concatenate([np.full(s.r, k) for k, _, s in here])
  scale = np.concatenate([np.full(s.r, s.scale, np.float32) for _, _, s in here])
  mask = jnp.where(ids_N[:, None] == owner[None, :], scale[None, :], 0.0).astype(dtype)
  return jnp.dot(jnp.dot(x_NxI, a) * mask, b)


def _gather(x_NxI, ids_N, here, params, dtype):
  """Each row's own s·x·A·B with its factors gathered from stacks padded to the largest rank
  (a stack slot past the adapters here is zero: no branch)."""
  r = max(s.r for _, _, s in here)
  slot, n = _slots(ids_N, here)  # the last slot (zeros): ids naming no adapter here
  in_f, out_f = params[0][0].shape[0], params[0][1].shape[1]
  a = jnp.zeros((n, in_f, r), dtype)
  b = jnp.zeros((n, r, out_f), dtype)
  for (k, _, s), (pa, pb, _) in zip(here, params):
    a = a.at[k, :, :s.r].set(pa.astype(dtype))
    b = b.at[k, :s.r, :].set((pb * s.scale).astype(dtype))
  rows = _ROWS.get().shape[0] if _ROWS.get() is not None else 1
  row_slot = slot.reshape(rows, -1)[:, 0]
  x = x_NxI.reshape(rows, -1, in_f)
  z = jnp.einsum("bli,bir->blr", x, a[row_slot])
  return jnp.einsum("blr,bro->blo", z, b[row_slot]).reshape(x_NxI.shape[0], out_f)


def _dora_ratio(module, kernel_IxO, ids_N, here, params):
  """Each token's m/‖W + s·A·B‖ of its row's DoRA adapter (1 for LoRA adapters and rows
  without an adapter here), the norm a constant in the backward pass."""
  out_f = kernel_IxO.shape[1]
  slot, n = _slots(ids_N, here)
  table = [jnp.ones((out_f,), jnp.float32)] * n
  for (k, _, s), (a, b, m) in zip(here, params):
    if s.dora:
      norm = jax.lax.stop_gradient(lora.column_norm(kernel_IxO, a, b, s.scale))
      table[k] = m.astype(jnp.float32) / norm
  return jnp.stack(table)[slot].astype(module.dtype)
