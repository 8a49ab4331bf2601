"""Orbax checkpoints of a run: the train state plus JSON metadata (data position, step).

Checkpoints live in `<output_dir>/checkpoints/<step>` (and, under early stopping, the best
parameters in `<output_dir>/best/<step>`). Orbax writes each one to a temporary
directory and renames it when complete, so a kill mid-write leaves the previous checkpoint as
the latest usable one. Restoring onto the abstract structure of a freshly built state keeps
optax's state types and the target shardings.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves every `every` steps (and when forced), keeps the newest `keep`."""

  def __init__(self, output_dir: str, every: int, keep: int, read_only: bool = False,
               name: str = "checkpoints"):
    self.every = every
    self.manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(output_dir, name)),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                             read_only=read_only),
        item_names=("state", "meta"))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: dict, force: bool = False) -> bool:
    """Saves when `step` is on the interval (or `force`); returns whether it saved."""
    if not force and not (self.every and step % self.every == 0):
      return False
    if step in self.manager.all_steps():
      return False
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, like: Any) -> tuple[Any, dict]:
    """Restores checkpoint `step` onto the structure, dtypes and shardings of `like`."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return out.state, out.meta

  def meta(self, step: int) -> dict:
    """The JSON metadata of checkpoint `step` alone (cheap: no arrays are read)."""
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def restore_params(self, step: int) -> dict:
    """The trained parameters of checkpoint `step`, as plain arrays (for export)."""
    out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return out.state["params"]

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
