"""Batches: examples collated into rows, padded to a bucket length, in a seeded order.

A row holds one example, or several when packing: each keeps its own segment id and positions
that restart at 0, so attention never crosses examples and no example's first token is trained
on its neighbour's last (see `loss.token_losses`). Batch `s` is a pure function of (seed, s): the
rows of epoch e are permuted by a generator seeded with (seed, e), so a resumed run, or another
process, computes exactly the batches an uninterrupted single process would.

A preference pair is one example holding two sequences (`Example.split`); its batch rows come in
twos, chosen then rejected (rows 2i and 2i+1), so any split of the rows into micro-batches or
shards that keeps an even count keeps every pair together. `train.batch_size` counts pairs.
"""

from __future__ import annotations

import bisect
import dataclasses
import zlib
from typing import Sequence

import numpy as np

from ftjax.config import UserError


@dataclasses.dataclass
class Example:
  tokens: np.ndarray  # (n,) int32
  loss_mask: np.ndarray  # (n,) 1 where the token is a training target
  prompt_len: int = 0  # tokens before the first target (the generation prompt)
  label: int = -1  # classification: the label id
  where: str = ""  # the file and record it came from
  split: int = 0  # a preference pair: tokens[:split] is chosen, tokens[split:] rejected
  task: int = -1  # tasks (peft.adapters): the index of the example's task and adapter

  def sides(self) -> list["Example"]:
    """The example's sequences: itself, or a pair's chosen and rejected."""
    if not self.split:
      return [self]
    return [Example(self.tokens[:self.split], self.loss_mask[:self.split], self.prompt_len,
                    where=self.where),
            Example(self.tokens[self.split:], self.loss_mask[self.split:], self.prompt_len,
                    where=self.where)]

  @property
  def length(self) -> int:
    """The longest sequence's tokens (a row holds one sequence)."""
    n = len(self.tokens)
    return max(self.split, n - self.split) if self.split else n


def bucket_lengths(seq_len: int, buckets: int) -> list[int]:
  """seq_len and its halves (rounded up to multiples of 8), `buckets` lengths at most."""
  lengths = {seq_len}
  for k in range(1, buckets):
    n = -(-seq_len // 2**k)
    lengths.add(min(seq_len, -(-n // 8) * 8))
  return sorted(lengths)


def fit(length: int, lengths: list[int]) -> int:
  return lengths[min(bisect.bisect_left(lengths, length), len(lengths) - 1)]


def pair_nll_scale(pairs: list[Example]) -> float:
  """Pairs over the chosen sequences' tokens after the first: what turns ORPO's summed NLL
  into a token mean in a loss that is a mean over pairs."""
  return len(pairs) / max(sum(ex.split - 1 for ex in pairs), 1)


def collate(rows: list[list[Example]], length: int, pad_id: int,
            ref: np.ndarray | None = None, nll_scale: float | None = None
            ) -> dict[str, np.ndarray]:
  """Rows of examples, right-padded to `length`: tokens, positions, segment_ids (0 = padding),
  loss_mask, `labels` (b, 1) (-1 for empty rows) when the examples are labelled, and `adapter`
  (b, 1) (each row's task; 0 for empty rows) when they belong to tasks.

  A row of a preference pair becomes two rows (chosen, rejected), with `pair_nll_scale` (see
  `pair_nll_scale`; of these pairs unless `nll_scale` gives the whole batch's) and, given `ref`
  (pairs, 2), the reference's scores as `ref_logps` (2 * pairs, 1).
  """
  extra = {}
  pairs = [row[0] for row in rows if row and row[0].split]
  if pairs:
    if any(len(row) > 1 for row in rows):
      raise ValueError("preference pairs are collated one per row")
    rows = [side for row in rows for side in ([[x] for x in row[0].sides()] if row else [[], []])]
    scale = pair_nll_scale(pairs) if nll_scale is None else nll_scale
    extra["pair_nll_scale"] = np.full((len(rows), 1), scale, np.float32)
    if ref is not None:
      extra["ref_logps"] = np.asarray(ref, np.float32).reshape(len(rows), 1)
  b = len(rows)
  batch = {
      "tokens": np.full((b, length), pad_id, np.int32),
      "positions": np.zeros((b, length), np.int32),
      "segment_ids": np.zeros((b, length), np.int32),
      "loss_mask": np.zeros((b, length), np.int32),
  }
  labelled = any(ex.label >= 0 for row in rows for ex in row)
  if labelled:
    batch["labels"] = np.full((b, 1), -1, np.int32)
  if any(ex.task >= 0 for row in rows for ex in row):
    batch["adapter"] = np.array([[row[0].task if row else 0] for row in rows], np.int32)
  for i, row in enumerate(rows):
    at = 0
    for seg, ex in enumerate(row, start=1):
      n = len(ex.tokens)
      batch["tokens"][i, at:at + n] = ex.tokens
      batch["positions"][i, at:at + n] = np.arange(n)
      batch["segment_ids"][i, at:at + n] = seg
      batch["loss_mask"][i, at:at + n] = ex.loss_mask
      at += n
    if labelled and row:
      batch["labels"][i, 0] = row[0].label
  return {**batch, **extra}


def pack(lengths: np.ndarray, seq_len: int) -> list[list[int]]:
  """Best-fit decreasing: example indices grouped into rows of at most `seq_len` tokens."""
  rows: list[list[int]] = []
  free: list[tuple[int, int]] = []  # (space left, row), sorted
  for i in np.argsort(-np.asarray(lengths), kind="stable"):
    n = int(lengths[i])
    j = bisect.bisect_left(free, (n, -1))
    if j < len(free):
      space, r = free.pop(j)
    else:
      space, r = seq_len, len(rows)
      rows.append([])
    rows[r].append(int(i))
    if space - n > 0:
      bisect.insort(free, (space - n, r))
  return [sorted(r) for r in rows]


class Batches:
  """Global training batches, epoch after epoch, each epoch's rows freshly shuffled.

  `get(step)` returns this process's share: rows [p * b/P, (p+1) * b/P) of the global batch of
  b rows, padded to the bucket that fits the whole global batch, so every process agrees on the
  shape without communicating.
  """

  def __init__(self, examples: list[Example], batch_size: int, seq_len: int, pad_id: int,
               seed: int, what: str = "data.train", *, packing: bool = False, buckets: int = 1,
               process_index: int = 0, process_count: int = 1, ref: np.ndarray | None = None,
               tasks: Sequence[str] = (), task_weights: dict | None = None,
               single_task: bool = False):
    self.examples, self.batch_size, self.seq_len = examples, batch_size, seq_len
    self.pad_id, self.seed, self.lengths = pad_id, seed, bucket_lengths(seq_len, buckets)
    self.packed = packing
    self.ref = ref  # preference: each pair's reference log-probabilities (examples, 2)
    self.pairs = bool(examples) and bool(examples[0].split)
    if self.pairs and packing:
      raise UserError("data.packing cannot be used with preference pairs")
    sizes = np.array([ex.length for ex in examples], np.int64)
    self.tasks, self.single_task = list(tasks), single_task
    groups = [np.arange(len(examples))]
    if self.tasks:  # a row holds one task's examples
      task_of = np.array([ex.task for ex in examples])
      groups = [np.flatnonzero(task_of == k) for k in range(len(self.tasks))]
    self.rows, self.task_rows = [], []
    for idx in groups:
      local = pack(sizes[idx], seq_len) if packing else [[i] for i in range(len(idx))]
      self.task_rows.append(np.arange(len(self.rows), len(self.rows) + len(local)))
      self.rows += [[int(idx[i]) for i in r] for r in local]
    self.row_tokens = np.array([sizes[r].sum() for r in self.rows], np.int64)
    self.task_counts = _task_counts(self.task_rows, self.tasks, task_weights)
    if len(self.rows) < batch_size:
      rows = f"{len(self.rows)} packed rows" if packing else f"{len(examples)} examples"
      hint = " (data.packing: false puts one example in each row)" if packing else ""
      raise UserError(f"{what} has {rows}, fewer than one batch (train.batch_size={batch_size})"
                      f"{hint}")
    if batch_size % process_count:
      raise UserError(f"train.batch_size ({batch_size}) must divide by the number of processes "
                      f"({process_count})")
    self.process_index, self.process_count = process_index, process_count
    self.steps_per_epoch = sum(self.task_counts) // batch_size
    if single_task:
      for name, n in zip(self.tasks, self.task_counts):
        if n < batch_size:
          raise UserError(f"{what}.{name} has {n} rows per epoch, fewer than one batch "
                          f"(train.batch_size={batch_size}) under data.task_batches: single")
      self.steps_per_epoch = sum(n // batch_size for n in self.task_counts)
    self._order: tuple = (None, None)

  @property
  def efficiency(self) -> float:
    """Tokens over the row capacity (seq_len per row): how full the rows are."""
    return float(self.row_tokens.sum()) / (len(self.rows) * self.seq_len)

  def position(self, step: int) -> dict[str, int]:
    """Where batch `step` (0-based) starts: its epoch and row index within the epoch's order."""
    return {"epoch": step // self.steps_per_epoch,
            "index": (step % self.steps_per_epoch) * self.batch_size}

  def order(self, epoch: int) -> np.ndarray:
    """The rows of `epoch` in their shuffled order (the last epoch's is kept)."""
    if self._order[0] != epoch:
      self._order = (epoch, self._epoch_rows(epoch))
    return self._order[1]

  def _epoch_rows(self, epoch: int) -> np.ndarray:
    """Without tasks, a permutation of the rows. With tasks, each task's share of rows (its
    rows in a permutation of their own, seeded by the task's name, cycled to its count), all
    shuffled together, or (single_task) cut into one-task batches whose task order is shuffled:
    a task's rows come in the same order whatever other tasks the run has."""
    mix = np.random.default_rng([self.seed, epoch])
    if not self.tasks:
      return mix.permutation(len(self.rows))
    picks = []
    for name, rows, n in zip(self.tasks, self.task_rows, self.task_counts):
      rng = np.random.default_rng([self.seed, epoch, zlib.crc32(name.encode())])
      cycles = [rng.permutation(rows) for _ in range(-(-n // len(rows)))]
      picks.append(np.concatenate(cycles)[:n])
    if not self.single_task:
      return mix.permutation(np.concatenate(picks))
    b = self.batch_size
    chunks = [p[:len(p) // b * b].reshape(-1, b) for p in picks]
    order = mix.permutation(np.repeat(np.arange(len(chunks)), [len(c) for c in chunks]))
    taken = [0] * len(chunks)
    out = []
    for k in order:
      out.append(chunks[k][taken[k]])
      taken[k] += 1
    return np.concatenate(out)

  def global_rows(self, step: int) -> np.ndarray:
    """Row indices of the global batch `step`."""
    pos = self.position(step)
    return self.order(pos["epoch"])[pos["index"]:pos["index"] + self.batch_size]

  def get(self, step: int) -> dict[str, np.ndarray]:
    chosen = self.global_rows(step)
    length = fit(int(self.row_tokens[chosen].max()), self.lengths)
    share = self.batch_size // self.process_count
    mine = chosen[self.process_index * share:(self.process_index + 1) * share]
    ref, scale = None, None
    if self.pairs:
      scale = pair_nll_scale([self.examples[self.rows[r][0]] for r in chosen])
      ref = None if self.ref is None else self.ref[[self.rows[r][0] for r in mine]]
    return collate([[self.examples[i] for i in self.rows[r]] for r in mine], length, self.pad_id,
                   ref, scale)


def _task_counts(task_rows: list[np.ndarray], tasks: list[str], weights: dict | None
                 ) -> list[int]:
  """Rows per epoch of each task: its own rows (proportional to size), or the epoch's rows
  shared out by `weights` (relative; tasks not named weigh 1)."""
  sizes = [len(r) for r in task_rows]
  for name, n in zip(tasks, sizes):
    if not n:
      raise UserError(f"data.train.{name} has no examples")
  if not weights:
    return sizes
  w = np.array([weights.get(name, 1.0) for name in tasks], np.float64)
  return [max(1, int(round(sum(sizes) * x / w.sum()))) for x in w]


def eval_batches(examples: list[Example], batch_size: int, seq_len: int, pad_id: int,
                 buckets: int = 1, ref: np.ndarray | None = None):
  """The eval set in order, one example (or pair) per row, in batches of `batch_size` (the
  last one filled with empty rows, so each bucket compiles once); `ref`: the pairs' reference
  log-probabilities (examples, 2)."""
  lengths = bucket_lengths(seq_len, buckets)
  for start in range(0, len(examples), batch_size):
    chunk = examples[start:start + batch_size]
    length = fit(max(ex.length for ex in chunk), lengths)
    chunk_ref = None
    if ref is not None:
      chunk_ref = np.zeros((batch_size, 2), np.float32)
      chunk_ref[:len(chunk)] = ref[start:start + len(chunk)]
    yield collate([[ex] for ex in chunk] + [[]] * (batch_size - len(chunk)), length, pad_id,
                  chunk_ref)
