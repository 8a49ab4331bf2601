"""Orbax checkpoints of a run, checked on restore, and the lock that keeps a run directory to
one run.

Checkpoints live in `<output_dir>/checkpoints/<step>` (and, under early stopping, the best
parameters in `<output_dir>/best/<step>`). Orbax writes each one to a temporary directory and
renames it when complete, so a kill mid-write leaves the previous checkpoint as the latest usable
one. Restoring onto the abstract structure of a freshly built state keeps optax's state types and
the target shardings.

Orbax does not check what it reads back, so each checkpoint's metadata carries two 32-bit sums
per array (of its bits, and of its bits weighted by position): a truncated or deleted file fails
to read, a flipped bit or a chunk from elsewhere fails the sums. `restore_intact` reports a
damaged newest checkpoint in one line, moves it aside (`<step>.corrupt`, never deleted) and
resumes from the newest intact one.

`RunLock` is an exclusive `flock(2)` on `<output_dir>/run.lock` that records its holder. The
kernel drops it when the holding process ends, however it ends (SIGKILL included), so a stale
lock file never blocks a later run.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import io
import json
import logging
import os
import socket
import sys
import time
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from ftjax.config import UserError

log = logging.getLogger(__name__)


@jax.jit
def _sums(leaves: list) -> list:
  """Per array: (sum of its bits, sum of its bits times 2i+1) modulo 2**32."""
  out = []
  for x in leaves:
    if x.dtype == jnp.bool_:
      bits = x.astype(jnp.uint32)
    else:
      bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))
    bits = bits.reshape(-1).astype(jnp.uint32)
    weights = jnp.arange(bits.size, dtype=jnp.uint32) * 2 + 1
    out.append(jnp.stack([jnp.sum(bits, dtype=jnp.uint32),
                          jnp.sum(bits * weights, dtype=jnp.uint32)]))
  return out


def fingerprint(state: Any) -> dict:
  """{tree path: [sum, weighted sum]} of every array of `state`, for its checkpoint's metadata."""
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  sums = jax.device_get(_sums([x for _, x in flat]))
  return {jax.tree_util.keystr(p): [int(a), int(b)] for (p, _), (a, b) in zip(flat, sums)}


def _reason(e: BaseException) -> str:
  """The first line of the innermost cause (TensorStore's own message), at most 200 characters."""
  while e.__cause__ is not None or e.__context__ is not None:
    e = e.__cause__ or e.__context__
  text = (str(e).strip().splitlines() or [type(e).__name__])[0]
  return text if len(text) <= 200 else text[:197] + "..."


class _DebugStream(io.TextIOBase):
  """A stand-in for sys.stderr that sends what is written to the debug log."""

  def write(self, text: str) -> int:
    if text.strip():
      log.debug("stderr: %s", text.rstrip())
    return len(text)


@contextlib.contextmanager
def _quiet_reads(failed: list) -> Iterator[None]:
  """A failed Orbax read leaves TensorStore reads in flight whose callbacks, and whose collected
  coroutines, print tracebacks ("Event loop is closed", "Exception ignored", "Task exception was
  never retrieved") from other threads; while active, and for a moment after a failure, all of
  that goes to the debug log (train.log) instead of the terminal."""
  old_hook, old_err, aio = sys.unraisablehook, sys.stderr, logging.getLogger("asyncio")
  old_level = aio.level
  sys.unraisablehook = lambda u: log.debug("%s: %r", u.err_msg or "ignored", u.exc_value)
  sys.stderr = _DebugStream()
  aio.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    if failed:
      time.sleep(0.5)  # let the reads in flight finish and report into the debug log
    gc.collect()
    sys.unraisablehook, sys.stderr = old_hook, old_err
    aio.setLevel(old_level)


class Checkpointer:
  """Saves every `every` steps (and when forced), keeps the newest `keep`."""

  def __init__(self, output_dir: str, every: int, keep: int, read_only: bool = False,
               name: str = "checkpoints"):
    self.every = every
    self.directory = os.path.abspath(os.path.join(output_dir, name))
    self.manager = ocp.CheckpointManager(
        self.directory,
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
    meta = {**meta, "fingerprint": fingerprint(state)}
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, like: Any) -> tuple[Any, dict]:
    """Restores checkpoint `step` onto the structure, dtypes and shardings of `like`, and checks
    its arrays against the sums recorded when it was saved (ValueError if they differ)."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    saved = out.meta.get("fingerprint")
    if saved is not None:  # checkpoints written before the sums existed restore unchecked
      bad = [p for p, s in fingerprint(out.state).items() if saved.get(p) != s]
      if bad:
        raise ValueError(f"{len(bad)} array(s) differ from what was saved, e.g. {bad[0]}")
    return out.state, out.meta

  def meta(self, step: int) -> dict:
    """The JSON metadata of checkpoint `step` alone (cheap: no arrays are read)."""
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def restore_intact(self, like: Any, check: Callable[[int, dict], None]
                     ) -> Optional[tuple[int, Any, dict]]:
    """Restores the newest checkpoint that reads back intact: (step, state, meta), or None when
    there is no checkpoint.

    `check(step, meta)` may raise a UserError (this config cannot continue that checkpoint),
    which stops the search. A checkpoint that fails to read is reported in one line and, once an
    intact one is found, moved aside to `<step>.corrupt`; with none intact, nothing moves and a
    UserError says why.
    """
    damaged = []
    with _quiet_reads(damaged):
      found = self._newest_intact(like, check, damaged)
    if found:
      for bad, reason in damaged:
        moved = self._move_aside(bad)
        log.warning("checkpoint %d is damaged (%s): moved to %s; resuming from step %d", bad,
                    reason, moved, found[0])
      if damaged:
        self.manager.reload()
      return found
    if damaged:
      listed = "; ".join(f"step {s}: {r}" for s, r in damaged)
      raise UserError(f"{self.directory}: no intact checkpoint to resume from ({listed}); they "
                      "are left in place: move them aside to start over, or use another "
                      "train.output_dir")
    return None

  def _newest_intact(self, like: Any, check: Callable[[int, dict], None], damaged: list
                     ) -> Optional[tuple[int, Any, dict]]:
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        meta = self.meta(step)
      except Exception as e:  # pylint: disable=broad-except
        damaged.append((step, f"its metadata cannot be read: {_reason(e)}"))
        log.debug("checkpoint %d: metadata", step, exc_info=True)
        continue
      check(step, meta)
      try:
        state, meta = self.restore(step, like)
      except Exception as e:  # pylint: disable=broad-except
        damaged.append((step, _reason(e)))
        log.debug("checkpoint %d: restore", step, exc_info=True)
        continue
      return step, state, meta
    return None

  def _move_aside(self, step: int) -> str:
    """Renames checkpoint `step` to `<step>.corrupt` (or `.corrupt-N`), only in process 0."""
    source = os.path.join(self.directory, str(step))
    target, n = source + ".corrupt", 1
    while os.path.exists(target):
      n += 1
      target = f"{source}.corrupt-{n}"
    if jax.process_index() == 0:
      os.rename(source, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices(f"ftjax: moved checkpoint {step} aside")
    return target

  def restore_params(self, step: int) -> dict:
    """The trained parameters of checkpoint `step`, as plain arrays (for export), or a UserError
    when the checkpoint cannot be read."""
    failed: list = []
    with _quiet_reads(failed):
      try:
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore()))
      except Exception as e:  # pylint: disable=broad-except
        failed.append(step)
        log.debug("checkpoint %d: restore", step, exc_info=True)
        others = sorted(set(self.manager.all_steps()) - {step})
        raise UserError(f"{self.directory}: checkpoint {step} cannot be read ({_reason(e)}); "
                        f"other checkpoints: {others or 'none'} (--step picks one)") from None
    return out.state["params"]

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


class RunLock:
  """Holds `<run_dir>/run.lock` exclusively while a run writes to `run_dir` (process 0 only).

  The second run on a held directory stops with a UserError naming the holder's pid and host.
  Where the filesystem has no locks (ENOLCK), the run warns once and goes on unlocked.
  """

  def __init__(self, run_dir: str):
    self.path = os.path.join(run_dir, "run.lock")
    self.fd: Optional[int] = None

  def __enter__(self) -> "RunLock":
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = self._holder(fd)
      os.close(fd)
      raise UserError(f"{os.path.dirname(self.path)} is in use by another run ({holder}); "
                      "wait for it to end, or use another train.output_dir") from None
    except OSError as e:  # no lock support on this filesystem
      os.close(fd)
      log.warning("%s: cannot lock (%s); two runs on this directory would not be stopped",
                  self.path, e.strerror)
      return self
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
    self.fd = fd
    return self

  @staticmethod
  def _holder(fd: int) -> str:
    try:
      who = json.loads(os.pread(fd, 4096, 0).decode())
      return f"pid {who['pid']} on host {who['host']}, since {who['since']}"
    except (ValueError, KeyError, OSError):
      return "a process that has not yet recorded itself"

  def __exit__(self, *exc) -> None:
    if self.fd is not None:
      fcntl.flock(self.fd, fcntl.LOCK_UN)
      os.close(self.fd)
      self.fd = None
