"""Run logs people look at: metrics.jsonl, TensorBoard events, and the loss-curve picture.

`MetricsLog` appends one JSON object per logged step to metrics.jsonl and mirrors each number to
TensorBoard; a resumed run first drops the records past its checkpoint (they will be redone).
`plot` draws train loss, each eval set's loss and the learning rate into loss.png at the end of a
run. Library
code logs to the `ftjax` logger, which says nothing unless asked: the CLIs call `console()`
(info to stdout, warnings to stderr), and a run writes everything, tracebacks of the problems it
reports in one line included, to `<output_dir>/train.log` (`log_file`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from typing import Iterator, Optional

LOGGER = logging.getLogger("ftjax")
LOGGER.addHandler(logging.NullHandler())


class _Console(logging.Handler):
  """Info as plain lines on stdout, warnings and errors as `warning: ...` on stderr."""

  def emit(self, record: logging.LogRecord) -> None:
    if record.levelno >= logging.WARNING:
      print(f"{record.levelname.lower()}: {record.getMessage()}", file=sys.stderr, flush=True)
    else:
      print(record.getMessage(), flush=True)


def console(level: int = logging.INFO) -> None:
  """Shows ftjax's log on the terminal (the CLIs call this once)."""
  if not any(isinstance(h, _Console) for h in LOGGER.handlers):
    handler = _Console()
    handler.setLevel(level)
    LOGGER.addHandler(handler)
  LOGGER.setLevel(logging.DEBUG)  # the handlers choose what they show
  LOGGER.propagate = False  # a root handler that a dependency set up would print them again


def on_console() -> bool:
  """Whether `console()` shows ftjax's log (then a run also shows its progress bar)."""
  return any(isinstance(h, _Console) for h in LOGGER.handlers)


@contextlib.contextmanager
def log_file(output_dir: str, enabled: bool = True) -> Iterator[None]:
  """While active, every ftjax log record (debug included) is appended to output_dir/train.log."""
  if not enabled:
    yield
    return
  handler = logging.FileHandler(os.path.join(output_dir, "train.log"))
  handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
  old = LOGGER.level
  LOGGER.addHandler(handler)
  LOGGER.setLevel(logging.DEBUG)
  try:
    yield
  finally:
    LOGGER.removeHandler(handler)
    LOGGER.setLevel(old)
    handler.close()


def _step_of(line: str) -> Optional[int]:
  """The step of a metrics.jsonl line, or None for a line cut short by a kill."""
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return None


class MetricsLog:
  """metrics.jsonl plus TensorBoard events; a resumed run drops records past its checkpoint.
  Disabled (in processes other than 0), it writes nothing."""

  def __init__(self, output_dir: str, resume_step: int, enabled: bool = True):
    self.enabled, self.tb = enabled, None
    if not enabled:
      return
    self.path = os.path.join(output_dir, "metrics.jsonl")
    kept = []
    if os.path.exists(self.path):
      with open(self.path) as f:
        kept = [line for line in f if (s := _step_of(line)) is not None and s <= resume_step]
    with open(self.path, "w") as f:
      f.writelines(kept)
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel

    self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for k, v in record.items():
      if k != "step":
        self.tb.add_scalar(k, v, record["step"])

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def plot(output_dir: str) -> Optional[str]:
  """Draws train/eval loss and the learning rate from metrics.jsonl into loss.png (and, for
  preference tuning, the reward accuracy: how often the chosen completion out-scores the
  rejected one)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  with open(os.path.join(output_dir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f if line.strip()]
  train = [(r["step"], r["loss"]) for r in records if "loss" in r]
  if not train:
    return None
  # named eval sets (eval_<name>_loss) each get a curve; else the one eval_loss
  names = sorted({k[5:-5] for r in records for k in r
                  if k.startswith("eval_") and k.endswith("_loss") and k != "eval_loss"})
  keys = [(f"eval_{n}_loss", f"eval loss: {n}") for n in names] or [("eval_loss", "eval loss")]
  rewards = any("rewards/accuracies" in r or "eval_rewards/accuracies" in r for r in records)
  fig, axes = plt.subplots(3 if rewards else 2, 1, figsize=(7, 8 if rewards else 6), sharex=True,
                           gridspec_kw={"height_ratios": [3, 2, 1] if rewards else [3, 1]})
  ax, ax_lr = axes[0], axes[-1]
  if rewards:
    for key, style, name in [("rewards/accuracies", "-", "train (batch)"),
                             ("eval_rewards/accuracies", "o-", "eval")]:
      points = [(r["step"], r[key]) for r in records if key in r]
      if points:
        axes[1].plot(*zip(*points), style, label=name, lw=1)
    axes[1].set_ylabel("reward accuracy")
    axes[1].set_ylim(-0.05, 1.05)
    axes[1].legend()
    axes[1].grid(alpha=0.3)
  ax.plot(*zip(*train), label="train loss", lw=1)
  for key, name in keys:
    evals = [(r["step"], r[key]) for r in records if key in r]
    if evals:
      ax.plot(*zip(*evals), "o-", label=name)
  ax.set_ylabel("loss")
  ax.legend()
  ax.grid(alpha=0.3)
  ax_lr.plot([r["step"] for r in records if "lr" in r], [r["lr"] for r in records if "lr" in r])
  ax_lr.set_ylabel("lr")
  ax_lr.set_xlabel("step")
  ax_lr.grid(alpha=0.3)
  path = os.path.join(output_dir, "loss.png")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
