"""Data: records from local files, tokenised examples with loss masks, deterministic batches.

An example is a token sequence plus a per-token `loss_mask` (1 where the token is a training
target). `text` trains on every token; `prompt_completion` only on the completion (and the EOS
that ends it); `chat` renders `messages` with the tokenizer's chat template and trains on the
assistant turns, each through its end-of-turn token. Batches are a pure function of (seed, step): the order of epoch e is a permutation
seeded by (seed, e), so a resumed run sees exactly the batches an uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from ftjax.config import DataConfig, UserError


def _read_jsonl(path: str) -> list[dict]:
  records = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise UserError(f"{path}:{number}: malformed JSON line ({e.msg})") from None
      if not isinstance(record, dict):
        raise UserError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
      records.append(record)
  return records


def read_records(path: str) -> list[dict]:
  """Reads a jsonl/json/csv/parquet file or a `save_to_disk` directory into a list of dicts."""
  if os.path.isdir(path):
    import datasets  # pylint: disable=import-outside-toplevel

    try:
      ds = datasets.load_from_disk(path)
    except FileNotFoundError:
      raise UserError(f"{path}: not a saved datasets directory") from None
    if isinstance(ds, datasets.DatasetDict):
      ds = ds["train"]
    return list(ds)
  if not os.path.isfile(path):
    raise UserError(f"data file not found: {path}")
  ext = os.path.splitext(path)[1].lower()
  if ext == ".jsonl":
    return _read_jsonl(path)
  loaders = {".json": "json", ".csv": "csv", ".parquet": "parquet"}
  if ext not in loaders:
    raise UserError(f"{path}: unsupported data file type '{ext}' (use .jsonl, .json, .csv, "
                    ".parquet or a saved datasets directory)")
  import datasets  # pylint: disable=import-outside-toplevel

  try:
    return list(datasets.load_dataset(loaders[ext], data_files=path, split="train"))
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"{path}: cannot read ({str(e).splitlines()[0]})") from None


def _field(record: dict, name: str, path: str, number: int) -> str:
  value = record.get(name)
  if value is None:
    raise UserError(f"{path}: record {number} has no '{name}' field")
  if not isinstance(value, str):
    raise UserError(f"{path}: record {number} field '{name}' is {type(value).__name__}, "
                    "expected a string")
  if not value:
    raise UserError(f"{path}: record {number} field '{name}' is empty")
  return value


@dataclasses.dataclass
class Example:
  tokens: np.ndarray  # (n,) int32
  loss_mask: np.ndarray  # (n,) int32, 1 where the token is a training target
  prompt_len: int = 0  # tokens before the first target (the generation prompt)


def _common_prefix(a: list[int], b: list[int]) -> int:
  n = 0
  while n < min(len(a), len(b)) and a[n] == b[n]:
    n += 1
  return n


ROLES = ("system", "user", "assistant", "tool")


def _messages(record: dict, cfg: DataConfig, path: str, number: int) -> list[dict]:
  messages = record.get(cfg.messages_field)
  if not isinstance(messages, list) or not messages:
    raise UserError(f"{path}: record {number} field '{cfg.messages_field}' is missing or not a "
                    "non-empty list of messages")
  for j, m in enumerate(messages, start=1):
    if not isinstance(m, dict) or not isinstance(m.get("content"), str):
      raise UserError(f"{path}: record {number} message {j} needs a string 'content'")
    if m.get("role") not in ROLES:
      raise UserError(f"{path}: record {number} message {j} has unknown role {m.get('role')!r} "
                      f"(known: {', '.join(ROLES)})")
  if not any(m["role"] == "assistant" for m in messages):
    raise UserError(f"{path}: record {number} has no assistant turn to train on")
  return messages


def _chat(messages: list[dict], tokenizer: Any, last_only: bool, where: str):
  """Renders a conversation with the tokenizer's template; returns (tokens, mask, prompt_len).

  Each assistant turn's text is what the template adds between the conversation so far with a
  generation prompt and the conversation including that turn, up to and including its
  end-of-turn marker (trailing whitespace after the marker is not trained). This needs no
  `{% generation %}` tags, only a template that renders prefixes of a conversation as prefixes.
  """
  render = lambda msgs, gen: tokenizer.apply_chat_template(msgs, tokenize=False,
                                                           add_generation_prompt=gen)
  full = render(messages, False)
  spans = []
  for i, m in enumerate(messages):
    if m["role"] != "assistant":
      continue
    prompt, upto = render(messages[:i], True), render(messages[:i + 1], False).rstrip()
    if not (upto.startswith(prompt) and full.startswith(upto)):
      raise UserError(f"{where}: the chat template does not render a conversation's prefixes "
                      "as prefixes, so assistant turns cannot be located")
    spans.append((len(prompt), len(upto)))
  if last_only:
    spans = spans[-1:]
  enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
  tokens, offsets = enc["input_ids"], enc["offset_mapping"]
  mask = [int(any(a <= lo < b for a, b in spans)) for lo, _ in offsets]
  prompt_len = next(t for t, (lo, _) in enumerate(offsets) if lo >= spans[-1][0])
  return tokens, mask, prompt_len


def _encode(records: list[dict], cfg: DataConfig, tokenizer: Any, path: str):
  """(tokens, loss mask, prompt length) per record, for the configured format."""
  if cfg.format == "chat":
    if not getattr(tokenizer, "chat_template", None):
      raise UserError(f"{path}: data.format is chat, but the tokenizer has no chat template")
    return [_chat(_messages(r, cfg, path, i + 1), tokenizer, cfg.assistant_turns == "last",
                  f"{path}: record {i + 1}") for i, r in enumerate(records)]
  eos = tokenizer.eos_token_id
  if cfg.format == "text":
    texts = [_field(r, cfg.text_field, path, i + 1) for i, r in enumerate(records)]
    full_ids, prompt_ids = tokenizer(texts, add_special_tokens=True)["input_ids"], None
  else:
    prompts = [_field(r, cfg.prompt_field, path, i + 1) for i, r in enumerate(records)]
    completions = [_field(r, cfg.completion_field, path, i + 1) for i, r in enumerate(records)]
    full_ids = tokenizer([p + c for p, c in zip(prompts, completions)],
                         add_special_tokens=True)["input_ids"]
    prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
  out = []
  for i, tokens in enumerate(full_ids):
    if cfg.add_eos and (not tokens or tokens[-1] != eos):
      tokens = tokens + [eos]
    start = _common_prefix(tokens, prompt_ids[i]) if prompt_ids is not None else 0
    out.append((tokens, [0] * start + [1] * (len(tokens) - start), start))
  return out


def tokenize(records: list[dict], cfg: DataConfig, tokenizer: Any, path: str) -> list[Example]:
  """Turns records into examples with loss masks, applying the truncation policy.

  A prompt and its completion are tokenised together, as inference will see them; the completion
  starts where that sequence leaves the prompt's own tokenisation (a token merged across the
  boundary counts as completion). Chat records train on assistant turns (see `_chat`).
  """
  examples, truncated, dropped = [], 0, 0
  for i, (tokens, mask, start) in enumerate(_encode(records, cfg, tokenizer, path)):
    if len(tokens) > cfg.seq_len:
      if cfg.truncation == "error":
        raise UserError(f"{path}: record {i + 1} has {len(tokens)} tokens, more than data.seq_len "
                        f"({cfg.seq_len}) and data.truncation is 'error'")
      if cfg.truncation == "drop":
        dropped += 1
        continue
      truncated += 1
      tokens, mask = tokens[:cfg.seq_len], mask[:cfg.seq_len]
    if sum(mask[1:]) == 0:  # nothing left to learn from (the first token is never a target)
      dropped += 1
      continue
    examples.append(Example(np.asarray(tokens, np.int32), np.asarray(mask, np.int32),
                            prompt_len=start))
  if truncated or dropped:
    print(f"{path}: {truncated} example(s) truncated, {dropped} dropped (data.seq_len="
          f"{cfg.seq_len}, data.truncation={cfg.truncation})")
  if not examples:
    raise UserError(f"{path}: no usable examples")
  return examples


def check_vocab(examples: list[Example], vocab_size: int, path: str) -> None:
  """Token ids past the model's embedding table would read garbage: refuse them."""
  for i, ex in enumerate(examples):
    if ex.tokens.size and int(ex.tokens.max()) >= vocab_size:
      raise UserError(f"{path}: example {i + 1} has token id {int(ex.tokens.max())}, outside the "
                      f"model's vocabulary of {vocab_size} (tokenizer and model do not match)")


def load(path: str, cfg: DataConfig, tokenizer: Any) -> list[Example]:
  return tokenize(read_records(path), cfg, tokenizer, path)


def collate(examples: list[Example], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """Right-pads examples into a batch: tokens, positions, segment_ids (0 = pad), loss_mask."""
  b = len(examples)
  batch = {
      "tokens": np.full((b, seq_len), pad_id, np.int32),
      "positions": np.zeros((b, seq_len), np.int32),
      "segment_ids": np.zeros((b, seq_len), np.int32),
      "loss_mask": np.zeros((b, seq_len), np.int32),
  }
  for i, ex in enumerate(examples):
    n = len(ex.tokens)
    batch["tokens"][i, :n] = ex.tokens
    batch["positions"][i, :n] = np.arange(n)
    batch["segment_ids"][i, :n] = 1
    batch["loss_mask"][i, :n] = ex.loss_mask
  return batch


class Batches:
  """Global batches as a pure function of the step, epoch after epoch, each freshly shuffled."""

  def __init__(self, examples: list[Example], batch_size: int, seq_len: int, pad_id: int,
               seed: int, what: str = "data.train"):
    if len(examples) < batch_size:
      raise UserError(f"{what} has {len(examples)} examples, fewer than one batch "
                      f"(train.batch_size={batch_size})")
    self.examples, self.batch_size, self.seq_len = examples, batch_size, seq_len
    self.pad_id, self.seed = pad_id, seed
    self.steps_per_epoch = len(examples) // batch_size

  def position(self, step: int) -> dict[str, int]:
    """Where batch `step` (0-based) starts: its epoch and index within the epoch's order."""
    return {"epoch": step // self.steps_per_epoch,
            "index": (step % self.steps_per_epoch) * self.batch_size}

  def get(self, step: int) -> dict[str, np.ndarray]:
    pos = self.position(step)
    order = np.random.default_rng([self.seed, pos["epoch"]]).permutation(len(self.examples))
    chosen = order[pos["index"]:pos["index"] + self.batch_size]
    return collate([self.examples[i] for i in chosen], self.seq_len, self.pad_id)


def eval_batches(examples: list[Example], batch_size: int, seq_len: int, pad_id: int):
  """The eval set in order, in fixed-size batches (the last one padded with empty rows)."""
  for start in range(0, len(examples), batch_size):
    chunk = examples[start:start + batch_size]
    batch = collate(chunk, seq_len, pad_id)
    if len(chunk) < batch_size:  # keep one shape, so the eval step compiles once
      batch = {k: np.concatenate([v, np.zeros((batch_size - len(chunk), seq_len), v.dtype)])
               for k, v in batch.items()}
    yield batch
