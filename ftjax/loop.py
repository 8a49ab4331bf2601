"""The host loop of a run: steps, logging, evals, early stopping, checkpoints, clean stops.

`Loop.run(state)` steps from the state's step to `train.steps`, and stops early, cleanly, when:
- `train.stop_after` is reached (a scheduler's time slice);
- SIGTERM or SIGINT arrives (the step in flight finishes, a checkpoint is written, and the run
  returns with `interrupted` set; a second signal interrupts at once);
- the eval loss has not improved by more than `eval.min_delta` for `eval.patience` evals (the best
  parameters are kept in `<output_dir>/best`);
- `train.max_bad_steps` consecutive steps had non-finite gradients (`Diverged`; those updates were
  skipped, so the checkpoint written holds the last finite parameters).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import threading
import time
from typing import Any, Callable, Optional

import jax
import numpy as np

from ftjax import checkpoint, data
from ftjax.config import Config
from ftjax.metrics import MetricsLog, on_console

logger = logging.getLogger(__name__)


class Diverged(Exception):
  """Training cannot go on: too many consecutive steps with non-finite gradients."""


class Signals:
  """While active, SIGTERM and SIGINT only ask the loop to checkpoint and stop."""

  def __init__(self):
    self.received: Optional[int] = None
    self._old: dict = {}

  def __enter__(self) -> "Signals":
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if self.received is not None:
      raise KeyboardInterrupt
    self.received = signum
    logger.info(f"{signal.Signals(signum).name}: finishing this step, saving a checkpoint, then "
                "stopping (send it again to stop at once)")

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


@dataclasses.dataclass
class EarlyStop:
  """Eval-loss bookkeeping for early stopping; saved in each checkpoint's metadata."""

  best: float = math.inf
  best_step: int = 0
  bad: int = 0  # evals since the best one
  stopped: bool = False

  def update(self, loss: float, at: int, min_delta: float) -> bool:
    """Records an eval; returns whether it is a new best."""
    if loss < self.best - min_delta:
      self.best, self.best_step, self.bad = loss, at, 0
      return True
    self.bad += 1
    return False


@dataclasses.dataclass
class Loop:
  cfg: Config
  train_fn: Callable
  put: Callable[[dict], dict]  # host batch -> global device arrays
  frozen: dict
  batches: data.Batches
  lr_schedule: Callable
  ckpt: checkpoint.Checkpointer
  best: Optional[checkpoint.Checkpointer]  # the best parameters, under early stopping
  meta: Callable[[int], dict]  # checkpoint metadata of a step
  log: MetricsLog
  evaluate: Callable[[str, int, dict], Optional[dict]]
  result: Any  # train.RunResult: losses, evals, how the run ended
  early: EarlyStop
  signals: Signals

  def run(self, state: Any) -> Any:
    """Steps to train.steps (or an early stop); returns the last state."""
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel

    cfg = self.cfg
    start, end = int(state.step), cfg.train.steps
    if cfg.train.stop_after:
      end = min(end, cfg.train.stop_after)
    accum = cfg.train.grad_accum
    shown = on_console() and jax.process_index() == 0  # the CLIs ask for it
    bar = tqdm(total=cfg.train.steps, initial=start, desc="train", unit="step",
               dynamic_ncols=True, disable=start >= end or not shown, mininterval=1.0)
    window_tokens, window_start = 0.0, time.perf_counter()
    try:
      for s in range(start, end):
        batch = self.batches.get(s)
        window_tokens += float(np.sum(batch["segment_ids"] > 0))
        batch = self.put({k: v.reshape(accum, -1, v.shape[-1]) for k, v in batch.items()})
        state, metrics = self.train_fn(state, self.frozen, batch)
        done = s + 1
        record = None
        if done % cfg.train.log_every == 0 or done == end:
          record = self._record(state, done, s, metrics, window_tokens, window_start)
          bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                          tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        bar.update(1)
        stop = self._eval(state, done, record)
        if record:
          self.log.write(record)
          window_tokens, window_start = 0.0, time.perf_counter()
        self.ckpt.save(done, state, self.meta(done), force=stop or self.signals.received)
        if stop or self.signals.received:
          if self.signals.received:
            self.result.interrupted = self.signals.received
          break
    finally:
      bar.close()  # before any error line, so that line stands alone
    return state

  def _record(self, state, done: int, s: int, metrics: dict, tokens: float, since: float):
    metrics = jax.device_get(metrics)
    record = {"step": done, "loss": float(metrics["loss"]), "lr": float(self.lr_schedule(s)),
              "grad_norm": float(metrics["grad_norm"]),
              "update_norm": float(metrics["update_norm"]),
              "tokens_per_s": tokens / max(time.perf_counter() - since, 1e-9)}
    if self.cfg.distill.teacher:
      record["kl"] = float(metrics["kl"])
    record.update({k: float(v) for k, v in metrics.items() if "/" in k})  # rewards/*, logps/*
    if self.cfg.precision.compute == "fp16":
      record["loss_scale"] = float(metrics["loss_scale"])
    if int(metrics["skipped"]):
      record["skipped_steps"] = int(metrics["skipped"])
      self.result.skipped_steps = int(metrics["skipped"])
    self.result.losses[done] = record["loss"]
    if int(metrics["bad_run"]) >= self.cfg.train.max_bad_steps:
      self.log.write(record)
      self.ckpt.save(done, state, self.meta(done), force=True)
      raise Diverged(
          f"step {done}: {int(metrics['bad_run'])} consecutive steps had non-finite gradients "
          f"(last grad norm {record['grad_norm']}, loss {record['loss']}, loss scale "
          f"{float(metrics['loss_scale'])}); their updates were skipped and the checkpoint of "
          f"step {done} holds the last finite parameters. Lower optim.lr, use fp32/bf16, or "
          "check the data")
    return record

  def _eval(self, state, done: int, record: Optional[dict]) -> bool:
    """Evaluates when due; returns whether early stopping ends the run here."""
    cfg = self.cfg
    last = done == cfg.train.steps
    if not (last or (cfg.eval.every and done % cfg.eval.every == 0)):
      return False
    result = self.evaluate("after" if last else "eval", done, state.params)
    if not result:
      return False
    if record is not None:
      record.update({k: v for k, v in result.items() if k.startswith("eval_")})
    else:
      self.log.write({"step": done, **{k: v for k, v in result.items() if k.startswith("eval_")}})
    if last:
      self.result.after = result
    if not cfg.eval.patience:
      return False
    if self.early.update(result["eval_loss"], done, cfg.eval.min_delta):
      self.best.save(done, {"params": state.params}, self.meta(done), force=True)
    elif self.early.bad >= cfg.eval.patience and not last:
      self.early.stopped = True
      self.result.after = result
      self.result.stopped_early = done
      logger.info(f"early stopping at step {done}: eval loss has not improved by more than "
                  f"{cfg.eval.min_delta} for {self.early.bad} evals; the best, "
                  f"{self.early.best:.4f} at step {self.early.best_step}, is kept in best/")
      return True
    return False
