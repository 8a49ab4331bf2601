"""Data: files -> cached tokenisation -> examples with loss masks -> deterministic batches.

Each source file is tokenised once through `datasets.map` (both cores for large files) into a
cache keyed by a fingerprint of the file (path, size, mtime), the tokenizer (its vocabulary,
settings and chat template), the format settings and this package's encoding code; a change in
any of them tokenises again. What depends only on the run (seq_len and truncation, bad-record
policy, label ids, the eval split, packing) is applied after the cache, so changing it is cheap.

`load_splits(cfg, tokenizer)` returns the train and eval examples with their statistics;
`Batches` (batches.py) turns examples into global batches; `python -m ftjax.data --config FILE`
shows all of it before any training (see __main__.py).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
from typing import Any, Optional

import numpy as np

from ftjax.config import DataConfig, UserError, packing
from ftjax.data import formats, sources
from ftjax.data.batches import Batches, Example, bucket_lengths, collate, eval_batches, pack

logger = logging.getLogger(__name__)

__all__ = ["Batches", "Example", "bucket_lengths", "collate", "eval_batches", "pack",
           "load", "load_splits", "tokenize", "check_vocab", "Split", "Data", "eval_sets",
           "mix_rows", "train_batches"]

ENCODING_FIELDS = ("format", "text_field", "prompt_field", "completion_field", "messages_field",
                   "label_field", "assistant_turns", "add_eos")
_CODE = inspect.getsource(formats)


@dataclasses.dataclass
class Stats:
  """What happened to a split's records on their way to examples."""

  files: list[str] = dataclasses.field(default_factory=list)
  records: int = 0
  truncated: int = 0
  too_long: int = 0  # dropped: longer than seq_len under truncation: drop
  untrained: int = 0  # dropped: no trained token left (e.g. the completion was truncated away)
  skipped: int = 0  # bad records, under on_error: skip
  first_errors: list[str] = dataclasses.field(default_factory=list)
  cached_files: int = 0

  def describe(self, what: str, examples: int) -> str:
    files = self.files[0] if len(self.files) == 1 else f"{len(self.files)} files"
    line = f"{what} ({files}): {self.records} records -> {examples} examples"
    notes = [f"{self.truncated} truncated" * bool(self.truncated),
             f"{self.too_long} dropped as longer than data.seq_len" * bool(self.too_long),
             f"{self.untrained} dropped with no trained token" * bool(self.untrained),
             f"{self.skipped} bad record(s) skipped" * bool(self.skipped)]
    notes = [n for n in notes if n]
    if self.cached_files:
      notes.append(f"tokens from cache for {self.cached_files}/{len(self.files)} file(s)")
    line += f" ({', '.join(notes)})" if notes else ""
    if self.first_errors:
      line += "; first skipped: " + " | ".join(self.first_errors)
    return line


@dataclasses.dataclass
class Split:
  examples: list[Example]
  stats: Stats


@dataclasses.dataclass
class Data:
  train: Split
  eval: Optional[Split]  # the (first) eval set
  labels: list[str]  # classification: label names by id (data.labels, or found in data.train)
  evals: dict = dataclasses.field(default_factory=dict)  # {name: Split}; "" for the unnamed set
  tasks: list = dataclasses.field(default_factory=list)  # data.train's task names, by task id


@dataclasses.dataclass
class _Encoded:
  """One source file, tokenised: flat token/mask arrays with row offsets, and per-row fields."""

  path: str
  unit: str  # "line" or "record"
  offsets: np.ndarray
  tokens: np.ndarray
  loss_mask: np.ndarray
  prompt_len: np.ndarray
  label_name: list
  label_id: np.ndarray
  number: np.ndarray
  error: list
  pair_split: np.ndarray  # preference: where each row's rejected sequence starts
  cached: bool = False

  @staticmethod
  def from_columns(path: str, unit: str, table, cached: bool = False) -> "_Encoded":
    """From a pyarrow table with formats.FEATURES columns."""

    def flat(name):
      col = table[name].combine_chunks()
      offsets = np.asarray(col.offsets, np.int64)
      return offsets - offsets[0], col.flatten().to_numpy(zero_copy_only=False)

    offsets, tokens = flat("tokens")
    _, mask = flat("loss_mask")
    column = lambda name: table[name].to_numpy().astype(np.int64)
    return _Encoded(path, unit, offsets, tokens.astype(np.int32), mask.astype(np.int32),
                    column("prompt_len"), table["label_name"].to_pylist(), column("label_id"),
                    column("number"), table["error"].to_pylist(), column("pair_split"),
                    cached)

  def __len__(self):
    return len(self.number)


def _cache_dir(cfg: DataConfig) -> str:
  if cfg.cache_dir:
    return cfg.cache_dir
  import datasets  # pylint: disable=import-outside-toplevel

  return os.path.join(str(datasets.config.HF_DATASETS_CACHE), "ftjax")


def _encode_file(path: str, cfg: DataConfig, tokenizer: Any) -> _Encoded:
  """Tokenises one source through `datasets.map`, or reads the result from the cache."""
  import datasets  # pylint: disable=import-outside-toplevel
  from datasets.fingerprint import Hasher  # pylint: disable=import-outside-toplevel

  if cfg.format == "chat" and not getattr(tokenizer, "chat_template", None):
    raise UserError(f"{path}: data.format is chat, but the tokenizer has no chat template")
  if cfg.format == "preference" and path.lower().endswith(".txt"):
    raise UserError(f"{path}: data.format preference reads records with fields (jsonl, json, "
                    "csv, parquet or a saved dataset), not lines of text")
  raw = sources.read(path, cfg.text_field)
  if not len(raw):
    raise UserError(f"{path}: no records (the file is empty)")
  key = Hasher.hash([_CODE, sources.identity(path), tokenizer,
                     [getattr(cfg, f) for f in ENCODING_FIELDS]])
  num_proc = cfg.num_proc or (min(os.cpu_count() or 1, 8) if len(raw) >= 4000 else 1)
  num_proc = max(1, min(num_proc, len(raw)))
  cache_dir = _cache_dir(cfg)
  os.makedirs(cache_dir, exist_ok=True)
  stem = os.path.join(cache_dir, f"{os.path.basename(os.path.normpath(path))}-{key}")
  shards = [f"{stem}.arrow"] if num_proc == 1 else [
      f"{stem}_{r:05d}_of_{num_proc:05d}.arrow" for r in range(num_proc)]
  cached = all(os.path.exists(f) for f in shards)
  saved = os.environ.get("TOKENIZERS_PARALLELISM")
  bars = datasets.is_progress_bar_enabled()
  progress = len(raw) >= 10_000 and not cached  # a bar only where the wait is noticeable
  if bars and not progress:
    datasets.disable_progress_bars()
  if num_proc > 1:  # forked workers tokenise one at a time, without the fork warning
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
  try:
    encoded = raw.map(formats.map_batch, batched=True, batch_size=256, with_indices=True,
                      num_proc=num_proc if num_proc > 1 else None,
                      remove_columns=raw.column_names, features=formats.FEATURES,
                      fn_kwargs={"cfg": cfg, "tokenizer": tokenizer, "path": path},
                      cache_file_name=f"{stem}.arrow", new_fingerprint=key,
                      load_from_cache_file=True, desc=f"tokenising {path}")
  finally:
    if bars and not progress:
      datasets.enable_progress_bars()
    if num_proc > 1:
      if saved is None:
        os.environ.pop("TOKENIZERS_PARALLELISM", None)
      else:
        os.environ["TOKENIZERS_PARALLELISM"] = saved
  unit = "line" if sources.by_line(path) else "record"
  return _Encoded.from_columns(path, unit, encoded.data.table, cached)


def _labels(parts: list[_Encoded], cfg: DataConfig) -> list[str]:
  """Label names by id: data.labels, or those found in the train files (sorted names, or
  "0".."n-1" for integer ids)."""
  if cfg.format != "classification":
    return []
  if cfg.labels:
    return list(cfg.labels)
  names = {n for p in parts for n, e in zip(p.label_name, p.error) if n and not e}
  ids = {int(i) for p in parts for i, e in zip(p.label_id, p.error) if i >= 0 and not e}
  if names and ids:
    raise UserError(f"data.train: field '{cfg.label_field}' mixes label names and integer ids; "
                    "list the names in data.labels (by id)")
  if names:
    return sorted(names)
  return [str(i) for i in range(max(ids) + 1)] if ids else []


def _finish(parts: list[tuple[_Encoded, np.ndarray]], cfg: DataConfig, labels: list[str],
            what: str, tokenizer: Any) -> Split:
  """Applies the label set, the bad-record policy and the truncation policy to encoded rows."""
  special = set(tokenizer.all_special_ids)
  stats = Stats(files=[p.path for p, _ in parts],
                cached_files=sum(p.cached for p, _ in parts))
  label_ids = {name: i for i, name in enumerate(labels)}
  classification = cfg.format == "classification"
  examples = []
  for part, rows in parts:
    for i in rows:
      stats.records += 1
      where = f"{part.path}: {part.unit} {part.number[i]}"
      error, label = part.error[i], -1
      if not error and classification:
        name, label = part.label_name[i], int(part.label_id[i])
        if name:
          label = label_ids.get(name, -1)
        if label < 0 or label >= len(labels):
          error = (f"{where} label {name or part.label_id[i]!r} is not one of the labels "
                   f"({', '.join(labels)})")
      if error:
        if cfg.on_error == "error":
          raise UserError(error + " (set data.on_error: skip to skip bad records)")
        stats.skipped += 1
        if len(stats.first_errors) < 3:
          stats.first_errors.append(error)
        continue
      a, b = part.offsets[i], part.offsets[i + 1]
      tokens, mask = part.tokens[a:b], part.loss_mask[a:b]
      if part.pair_split[i]:
        pair = _pair(tokens, mask, int(part.pair_split[i]), cfg, where, stats)
        if pair is not None:
          examples.append(Example(*pair[:2], int(part.prompt_len[i]), -1, where, pair[2]))
        continue
      if len(tokens) > cfg.seq_len:
        if cfg.truncation == "error":
          raise UserError(f"{where} has {len(tokens)} tokens, more than data.seq_len "
                          f"({cfg.seq_len}) and data.truncation is 'error'")
        if cfg.truncation == "drop":
          stats.too_long += 1
          continue
        stats.truncated += 1
        keep = slice(cfg.seq_len)
        if classification and int(tokens[-1]) in special:  # keep a closing [SEP] or EOS
          keep = np.r_[0:cfg.seq_len - 1, len(tokens) - 1]
        tokens, mask = tokens[keep], mask[keep]
      if not classification and not mask[1:].any():  # the first token is never a target
        stats.untrained += 1
        continue
      examples.append(Example(tokens, mask, int(part.prompt_len[i]), label, where))
  if not examples:
    raise UserError(f"no usable examples: {stats.describe(what, 0)}")
  return Split(examples, stats)


def _pair(tokens: np.ndarray, mask: np.ndarray, split: int, cfg: DataConfig, where: str,
          stats: Stats) -> Optional[tuple]:
  """A preference pair under the truncation policy, each sequence on its own (the start kept, as
  TRL's default keep_start); None when it is dropped."""
  sides = [(tokens[:split], mask[:split]), (tokens[split:], mask[split:])]
  longest = max(len(t) for t, _ in sides)
  if longest > cfg.seq_len:
    if cfg.truncation == "error":
      raise UserError(f"{where} has a sequence of {longest} tokens, more than data.seq_len "
                      f"({cfg.seq_len}) and data.truncation is 'error'")
    if cfg.truncation == "drop":
      stats.too_long += 1
      return None
    stats.truncated += 1
    sides = [(t[:cfg.seq_len], m[:cfg.seq_len]) for t, m in sides]
  if not all(m[1:].any() for _, m in sides):  # a completion truncated away
    stats.untrained += 1
    return None
  return (np.concatenate([t for t, _ in sides]), np.concatenate([m for _, m in sides]),
          len(sides[0][0]))


def eval_sets(cfg: DataConfig) -> dict[str, list[str]]:
  """data.eval as {name: files}: named sets as given, a list as one set named ""."""
  if isinstance(cfg.eval, dict):
    return dict(cfg.eval)
  return {"": list(cfg.eval)} if cfg.eval else {}


def mix_rows(parts: list[tuple[_Encoded, np.ndarray, float]], seed: int
             ) -> list[tuple[_Encoded, np.ndarray]]:
  """Each source's rows repeated `weight` times: whole copies, then a seeded subset for the
  fraction left (the same subset every epoch), so the mixture is deterministic."""
  rng = np.random.default_rng(seed)
  out = []
  for part, rows, weight in parts:
    whole, frac = int(weight), weight - int(weight)
    chosen = [rows] * whole
    if frac > 0:
      chosen.append(np.sort(rng.permutation(rows)[:int(round(frac * len(rows)))]))
    out.append((part, np.concatenate(chosen) if chosen else rows[:0]))
  return out


def _held_out(parts: list[_Encoded], fraction: float, seed: int):
  """(eval rows, train rows) per part: a seeded `fraction` of all the parts' records held out."""
  total = sum(len(p) for p in parts)
  held = np.zeros(total, bool)
  held[np.random.default_rng(seed).permutation(total)[:max(1, round(total * fraction))]] = True
  starts = np.cumsum([0] + [len(p) for p in parts])
  return ([(p, np.flatnonzero(held[s:s + len(p)])) for p, s in zip(parts, starts)],
          [(p, np.flatnonzero(~held[s:s + len(p)])) for p, s in zip(parts, starts)])


def _load_tasks(cfg: DataConfig, tokenizer: Any, tasks: list[str]) -> Data:
  """data.train {NAME: FILES}: each task's examples carry its index in `tasks` (its adapter's);
  eval sets are data.eval's, named by task, or each task's data.eval_fraction."""
  train, evals, stats = [], {}, Stats()
  for name, files in cfg.train.items():
    what = f"data.train.{name}"
    parts = [_encode_file(f, cfg, tokenizer) for f in sources.resolve(files, what)]
    rows = [(p, np.arange(len(p))) for p in parts]
    if cfg.eval_fraction:
      held, rows = _held_out(parts, cfg.eval_fraction, cfg.split_seed)
      evals[name] = _finish(held, cfg, [], f"data.eval_fraction of {what}", tokenizer)
    split = _finish(rows, cfg, [], what, tokenizer)
    logger.info(split.stats.describe(what, len(split.examples)))
    for ex in split.examples + (evals[name].examples if name in evals else []):
      ex.task = tasks.index(name)
    train += split.examples
    for f in dataclasses.fields(Stats):
      setattr(stats, f.name, getattr(stats, f.name) + getattr(split.stats, f.name))
  for name, files in eval_sets(cfg).items():
    rows = [(p, np.arange(len(p))) for p in (
        _encode_file(f, cfg, tokenizer) for f in sources.resolve(files, f"data.eval.{name}"))]
    evals[name] = _finish(rows, cfg, [], f"data.eval.{name}", tokenizer)
    for ex in evals[name].examples:
      ex.task = tasks.index(name)
  evals = {name: evals[name] for name in tasks if name in evals}  # in the tasks' order
  return Data(Split(train, stats), next(iter(evals.values()), None), [], evals, list(tasks))


def load_splits(cfg: DataConfig, tokenizer: Any, tasks: Optional[list[str]] = None) -> Data:
  """The train and eval examples of `cfg` (eval: data.eval's sets, a data.eval_fraction of
  data.train, or none; train: data.train plus data.mix's sources, by weight). With tasks
  (data.train {NAME: FILES}), each example's `task` is its name's index in `tasks` (default:
  data.train's order)."""
  if isinstance(cfg.train, dict):
    return _load_tasks(cfg, tokenizer, list(tasks or cfg.train))
  sources_ = [(f, 1.0, "data.train") for f in sources.resolve(cfg.train, "data.train")]
  for i, m in enumerate(cfg.mix):
    sources_ += [(f, m.weight, f"data.mix[{i}]")
                 for f in sources.resolve(m.train, f"data.mix[{i}].train")]
  train_parts = [_encode_file(f, cfg, tokenizer) for f, _, _ in sources_]
  weights = [w for _, w, _ in sources_]
  named = eval_sets(cfg)
  eval_files = {name: sources.resolve(files, f"data.eval.{name}" if name else "data.eval")
                for name, files in named.items()}
  labels = _labels(train_parts, cfg)
  train_rows = [(p, np.arange(len(p))) for p in train_parts]
  eval_rows = None
  if cfg.eval_fraction:  # held out of data.train's records (not of data.mix's sources)
    primary = [p for p, (_, _, what) in zip(train_parts, sources_) if what == "data.train"]
    eval_rows, kept = _held_out(primary, cfg.eval_fraction, cfg.split_seed)
    train_rows = kept + train_rows[len(primary):]
  if cfg.mix:
    train_rows = mix_rows([(p, r, w) for (p, r), w in zip(train_rows, weights)], cfg.split_seed)
  train = _finish(train_rows, cfg, labels, "data.train", tokenizer)  # fails before eval is read
  evals = {}
  if eval_rows:
    evals[""] = _finish(eval_rows, cfg, labels, "data.eval", tokenizer)
  for name, files in eval_files.items():
    rows = [(p, np.arange(len(p))) for p in (_encode_file(f, cfg, tokenizer) for f in files)]
    evals[name] = _finish(rows, cfg, labels, f"data.eval.{name}" if name else "data.eval",
                          tokenizer)
  return Data(train, next(iter(evals.values()), None), labels, evals)


def train_batches(cfg: Any, examples: list[Example], pad_id: int, tasks: list[str] = (),
                  process_index: int = 0, process_count: int = 1) -> Batches:
  """The training batches of a run config (`cfg`: a `config.Config`), as `ftjax.train` and
  `python -m ftjax.data` both build them."""
  return Batches(examples, cfg.train.batch_size, cfg.data.seq_len, pad_id, cfg.train.seed,
                 packing=packing(cfg), buckets=cfg.data.buckets, process_index=process_index,
                 process_count=process_count, tasks=tasks, task_weights=cfg.data.task_weights,
                 single_task=cfg.data.task_batches == "single")


def load(paths: str | list[str], cfg: DataConfig, tokenizer: Any,
         labels: Optional[list[str]] = None) -> list[Example]:
  """The examples of some files (globs allowed), as one split."""
  paths = [paths] if isinstance(paths, str) else paths
  parts = [_encode_file(p, cfg, tokenizer) for p in sources.resolve(paths, "data")]
  labels = labels if labels is not None else _labels(parts, cfg)
  return _finish([(p, np.arange(len(p))) for p in parts], cfg, labels, "data", tokenizer).examples


def tokenize(records: list[dict], cfg: DataConfig, tokenizer: Any, path: str,
             labels: Optional[list[str]] = None) -> list[Example]:
  """Examples of in-memory records (no cache), named `path: record N` in errors."""
  cols = formats.encode(records, list(range(1, len(records) + 1)), cfg, tokenizer, path)
  import pyarrow as pa  # pylint: disable=import-outside-toplevel

  table = pa.table(cols, schema=formats.FEATURES.arrow_schema)
  part = _Encoded.from_columns(path, "record", table)
  labels = labels if labels is not None else _labels([part], cfg)
  split = _finish([(part, np.arange(len(part)))], cfg, labels, path, tokenizer)
  stats = split.stats
  if stats.truncated or stats.too_long or stats.untrained or stats.skipped:
    logger.info(stats.describe(path, len(split.examples)))
  return split.examples


def check_vocab(examples: list[Example], vocab_size: int) -> None:
  """Token ids past the model's embedding table would read garbage: refuse them."""
  for ex in examples:
    if ex.tokens.size and int(ex.tokens.max()) >= vocab_size:
      raise UserError(f"{ex.where} has token id {int(ex.tokens.max())}, outside the model's "
                      f"vocabulary of {vocab_size} (tokenizer and model do not match)")
