"""Meshes and shardings: the `mesh:` config, one logical-axis rules table, placement.

A mesh has three axes: `data` (batch only), `fsdp` (batch, and parameters split along their
`embed` axis) and `tensor` (heads, kv heads, the FFN width and the vocabulary). Every parameter
carries logical axis names from its layer (`nn.with_logical_partitioning`); `RULES` maps them to
mesh axes, and a dimension that an axis does not divide stays replicated. PEFT parameters carry
their layer's axes (a LoRA rank axis has none, so it is replicated). Optimizer state is sharded
like its parameters; batches are split over data x fsdp.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ftjax import tree
from ftjax.config import MeshConfig, UserError

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")
RULES = {"embed": "fsdp", "vocab": "tensor", "heads": "tensor", "kv_heads": "tensor",
         "mlp": "tensor"}


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) with a -1 resolved to the devices left, or a UserError."""
  sizes = [cfg.data, cfg.fsdp, cfg.tensor]
  if any(s == 0 or s < -1 for s in sizes):
    raise UserError(f"mesh: sizes must be >= 1 or -1 (the rest), got data={cfg.data} "
                    f"fsdp={cfg.fsdp} tensor={cfg.tensor}")
  if sizes.count(-1) > 1:
    raise UserError("mesh: at most one of data, fsdp, tensor may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if num_devices % known:
    raise UserError(f"mesh: data x fsdp x tensor = {known} does not divide the {num_devices} "
                    "devices")
  return tuple(num_devices // known if s == -1 else s for s in sizes)


def make_mesh(cfg: MeshConfig, model_cfg: Any = None) -> Mesh:
  """The device mesh of the config (on the first data*fsdp*tensor devices)."""
  devices = jax.devices()
  shape = mesh_shape(cfg, len(devices))
  if model_cfg is not None:
    tensor = shape[2]
    for what, n in (("attention heads", model_cfg.num_heads),
                    ("FFN width", model_cfg.intermediate_size)):
      if n % tensor:
        raise UserError(f"mesh.tensor={tensor} does not divide the model's {what} ({n})")
  grid = np.asarray(devices[:math.prod(shape)]).reshape(shape)
  return Mesh(grid, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def describe(mesh: Mesh) -> str:
  used, total = mesh.devices.size, len(jax.devices())
  shape = " ".join(f"{k}={v}" for k, v in mesh.shape.items())
  note = f" (of {total}; set mesh sizes, -1 takes the rest)" if used < total else ""
  return f"mesh {shape} on {used} {jax.devices()[0].platform} device(s){note}"


def _spec(logical: Any, shape: tuple, mesh: Mesh) -> P:
  names = tuple(logical) if isinstance(logical, P) else ()
  out, used = [], set()
  for dim, name in zip(shape, names + (None,) * (len(shape) - len(names))):
    axis = RULES.get(name) if name else None
    if axis and axis not in used and mesh.shape[axis] > 1 and dim % mesh.shape[axis] == 0:
      out.append(axis)
      used.add(axis)
    else:
      out.append(None)
  return P(*out)


def param_shardings(module: Any, params: dict, mesh: Mesh) -> dict:
  """A NamedSharding per leaf of `params`, from the module's logical axis annotations."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  boxed = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), tokens, tokens, tokens))
  logical = tree.flatten(nn.get_partition_spec(boxed["params"]))
  return tree.unflatten({p: NamedSharding(mesh, _spec(logical.get(p), tuple(v.shape), mesh))
                         for p, v in tree.flatten(params).items()})


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def state_shardings(state: Any, params_sharding: dict, tx: optax.GradientTransformation,
                    mesh: Mesh) -> Any:
  """Shardings for a TrainState: parameters and their optimizer moments alike, the rest
  replicated."""
  rep = replicated(mesh)
  opt = optax.tree_utils.tree_map_params(tx, lambda _, s: s, state.opt_state, params_sharding,
                                         transform_non_params=lambda _: rep)
  return state.replace(step=rep, params=params_sharding, opt_state=opt, rng=rep, loss_scale=rep,
                       good_steps=rep, skipped=rep, bad_run=rep)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Rows (the second-to-last axis) split over data x fsdp."""
  return NamedSharding(mesh, P(*([None] * (ndim - 2)), BATCH, None))


def put_batch(batch: dict, sharding: NamedSharding) -> dict:
  """This process's rows of a global batch, assembled into global arrays."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def device_bytes(trees: Any, device: Any = None) -> int:
  """Bytes that `trees`' arrays hold on one device (the first by default)."""
  device = device or jax.devices()[0]
  return sum(s.data.nbytes for leaf in jax.tree.leaves(trees) if isinstance(leaf, jax.Array)
             for s in leaf.addressable_shards if s.device == device)
