"""Meshes and shardings: the `mesh:` config, one logical-axis rules table, placement.

A mesh has three axes: `data` (batch only), `fsdp` (batch, and parameters split along their
`embed` axis) and `tensor` (heads, kv heads, the FFN width and the vocabulary). Every parameter
carries logical axis names from its layer (`nn.with_logical_partitioning`); `RULES` maps them to
mesh axes, and a dimension that an axis does not divide stays replicated. PEFT parameters carry
their layer's axes (a LoRA rank axis has none, so it is replicated). Optimizer state is sharded
like its parameters; batches are split over data x fsdp.
"""

from __future__ import annotations

import ctypes
import math
import os
import socket
import time
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ftjax import quant, tree
from ftjax.config import DistributedConfig, MeshConfig, UserError

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


def return_compiler_memory() -> None:
  """After each XLA compilation, hand the heap memory the compiler freed back to the OS (glibc's
  `malloc_trim`). glibc otherwise keeps it in its arenas, and the first step's buffers come on
  top: measured 150-170 MB of the peak RSS of full fine-tuning on the dense CPU benchmark model.
  Installed once per process (by `ftjax.train`); a no-op where the C library is not glibc."""
  global _TRIM_INSTALLED  # pylint: disable=global-statement
  if _TRIM_INSTALLED:
    return
  try:
    trim = ctypes.CDLL("libc.so.6").malloc_trim
  except (OSError, AttributeError):
    return

  def listener(event: str, _secs: float, **_):
    if event == "/jax/core/compile/backend_compile_duration":
      trim(0)
  jax.monitoring.register_event_duration_secs_listener(listener)
  _TRIM_INSTALLED = True


_TRIM_INSTALLED = False


# The GPU extras (`pip install -e ".[cuda12]"`) install one of these JAX plugins.
ACCELERATOR_PLUGINS = ("jax-cuda12-plugin", "jax-cuda13-plugin")


def describe_backend() -> str:
  """What JAX found: backend, devices (with their kind) and processes."""
  devices = jax.devices()
  kinds = sorted({d.device_kind for d in devices})
  return (f"backend {jax.default_backend()}: {len(devices)} device(s) ({', '.join(kinds)}), "
          f"{jax.local_device_count()} local, process {jax.process_index()} of "
          f"{jax.process_count()}")


def missing_accelerator() -> Optional[str]:
  """A one-line warning when a GPU plugin is installed but JAX sees only CPUs (and the user did
  not ask for the CPU through JAX_PLATFORMS); else None."""
  import importlib.metadata  # pylint: disable=import-outside-toplevel

  if jax.default_backend() != "cpu" or "cpu" in os.environ.get("JAX_PLATFORMS", ""):
    return None
  for name in ACCELERATOR_PLUGINS:
    try:
      importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
      continue
    return (f"{name} is installed, but JAX sees no GPU and trains on the CPU (check the driver "
            "with nvidia-smi, CUDA_VISIBLE_DEVICES, and `python -c 'import jax; "
            "print(jax.devices())'`)")
  return None


def _spec(logical: Any, shape: tuple, sizes: dict) -> P:
  names = tuple(logical) if isinstance(logical, P) else ()
  out, used = [], set()
  for dim, name in zip(shape, names + (None,) * (len(shape) - len(names))):
    axis = RULES.get(name) if name else None
    if axis and axis not in used and sizes[axis] > 1 and dim % sizes[axis] == 0:
      out.append(axis)
      used.add(axis)
    else:
      out.append(None)
  return P(*out)


def mesh_axes(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
  """{axis: size} of the config's mesh over `num_devices` devices (no devices needed)."""
  return dict(zip(AXES, mesh_shape(cfg, num_devices)))


def param_specs(module: Any, sizes: dict[str, int]) -> dict[str, P]:
  """{path: PartitionSpec} of every parameter of `module` on a mesh of these axis sizes, from
  the parameters' logical axis names."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  boxed = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), tokens, tokens, tokens))
  logical = tree.flatten(nn.get_partition_spec(boxed["params"]))
  shapes = tree.flatten(tree.unbox(boxed["params"]))
  return {p: _spec(logical.get(p), tuple(v.shape), sizes) for p, v in shapes.items()}


def param_shardings(module: Any, mesh: Mesh) -> dict[str, NamedSharding]:
  """{path: NamedSharding} for every parameter of `module`, from its logical axis names."""
  return {p: NamedSharding(mesh, spec)
          for p, spec in param_specs(module, dict(mesh.shape)).items()}


def quantized(q: quant.QuantKernel, sharding: NamedSharding) -> quant.QuantKernel:
  """The shardings of a quantised weight's arrays, from its parameter's: blocks and scales
  split along the rows (and columns) of the matrix as the parameter is split, where the mesh
  axis divides them; the second-level scales replicated."""
  spec = tuple(sharding.spec) + (None,) * (2 - len(sharding.spec))
  rows_cols = spec[::-1] if q.transposed else spec
  sizes = dict(sharding.mesh.shape)

  def fit(shape):
    axes = [a if a is not None and dim % sizes[a] == 0 else None
            for a, dim in zip(rows_cols, shape)]
    return NamedSharding(sharding.mesh, P(*axes))

  rep = NamedSharding(sharding.mesh, P())
  return quant.QuantKernel(fit(q.data.shape), fit(q.absmax.shape),
                           None if q.absmax2 is None else rep, None if q.offset is None else rep,
                           kind=q.kind, transposed=q.transposed)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def state_shardings(state: Any, params_sharding: dict, tx: optax.GradientTransformation,
                    mesh: Mesh) -> Any:
  """Shardings for a TrainState: parameters and the optimizer-state buffers shaped like one
  (found by the parameter path their key path ends with: Adam's moments, L2-SP's θ₀...) alike,
  the rest replicated (factored or gathered buffers, counts). `tx` is not needed: any
  transform whose state nests parameter-keyed dicts is covered."""
  del tx
  rep = replicated(mesh)
  known = tree.flatten(params_sharding)
  shapes = {p: v.shape for p, v in tree.flatten(state.params).items()}

  def place(keypath, leaf):
    path = tree.owner(keypath, shapes)
    if path is None or getattr(leaf, "shape", None) != shapes[path]:
      return rep
    return known[path]

  opt = jax.tree_util.tree_map_with_path(place, state.opt_state)
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
  device = device or jax.local_devices()[0]
  return sum(s.data.nbytes for leaf in jax.tree.leaves(trees) if isinstance(leaf, jax.Array)
             for s in leaf.addressable_shards if s.device == device)


CLUSTER_ENV = (("SLURM_NTASKS", "SLURM_JOB_ID"), ("OMPI_COMM_WORLD_SIZE", None))


def _in_cluster() -> bool:
  """A launcher that `jax.distributed.initialize()` recognises started several processes."""
  return any(int(os.environ.get(size, "1") or 1) > 1 and (marker is None or marker in os.environ)
             for size, marker in CLUSTER_ENV)


def _wait_for(address: str, timeout_s: int) -> None:
  """Returns once something listens at host:port, or raises a UserError after `timeout_s`."""
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise UserError(f"distributed.coordinator: expected host:port, got {address!r}")
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      socket.create_connection((host, int(port)), timeout=1).close()
      return
    except OSError:
      if time.monotonic() > deadline:
        raise UserError(f"distributed: the coordinator {address} was not reachable within "
                        f"{timeout_s}s (is process 0 running, and the address right?)") from None
      time.sleep(0.5)


def start_distributed(cfg: DistributedConfig) -> None:
  """Joins the other processes of a multi-process run (before JAX touches a device).

  Explicit (`distributed.coordinator`, `num_processes` > 1, `process_id`) or detected from the
  cluster environment (SLURM, Open MPI) when `distributed.auto` is true; a single process does
  nothing. CPU processes talk through gloo collectives.
  """
  if jax.distributed.is_initialized():
    return
  explicit = cfg.num_processes > 1
  if not explicit and not (cfg.auto and _in_cluster()):
    return
  kwargs: dict[str, Any] = {"initialization_timeout": cfg.timeout_s}
  if explicit:
    if not cfg.coordinator or cfg.process_id < 0 or cfg.process_id >= cfg.num_processes:
      raise UserError("distributed.num_processes > 1 needs distributed.coordinator (host:port) "
                      "and a distributed.process_id in [0, num_processes)")
    kwargs.update(coordinator_address=cfg.coordinator, num_processes=cfg.num_processes,
                  process_id=cfg.process_id)
  if explicit and cfg.process_id != 0:
    _wait_for(cfg.coordinator, cfg.timeout_s)  # JAX aborts the process if it cannot connect
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(**kwargs)
  except Exception as e:  # pylint: disable=broad-except
    where = cfg.coordinator or "from the cluster environment"
    raise UserError(f"distributed: could not join the run's processes (coordinator {where}, "
                    f"timeout {cfg.timeout_s}s): {str(e).splitlines()[0][:200]}") from None
