"""Formats: records -> token ids, a per-token loss mask, a prompt length and a label.

`encode` turns a list of records into columns, one row per record, and never raises for a bad
record: it writes the reason, naming the file and record, into the row's `error`, so that a run
can stop on the first one or skip and count them (`data.on_error`). The loss mask is 1 where a
token is a training target:

- `text` trains on every token (BOS excepted: nothing predicts it) and the EOS it appends;
- `prompt_completion` on the completion and its EOS;
- `chat` on the assistant turns, each through its end-of-turn marker, rendered with the
  tokenizer's own chat template (see `_chat`);
- `classification` on nothing: the example carries a label (a name or an integer id);
- `preference` on the completions of a pair: the record's prompt with its `chosen` and with its
  `rejected` completion, each tokenised whole (strings, with EOS), or rendered through the chat
  template (messages); the prompt's own tokens must be a prefix of both. The two sequences are
  stored one after the other, `pair_split` tokens of chosen first.
"""

from __future__ import annotations

import json
from typing import Any

import datasets

from ftjax.config import DataConfig, UserError

ROLES = ("system", "user", "assistant", "tool")

FEATURES = datasets.Features({
    "tokens": datasets.Sequence(datasets.Value("int32")),
    "loss_mask": datasets.Sequence(datasets.Value("int8")),
    "prompt_len": datasets.Value("int32"),
    "label_name": datasets.Value("string"),  # classification, when the label is a name
    "label_id": datasets.Value("int64"),  # classification, when the label is an id; else -1
    "number": datasets.Value("int64"),  # the record's number (line number in line files)
    "error": datasets.Value("string"),  # why the record is unusable; "" when it is fine
    "pair_split": datasets.Value("int32"),  # preference: where rejected starts; else 0
})


def _string(record: dict, name: str, where: str) -> str:
  value = record.get(name)
  if value is None:
    raise UserError(f"{where} has no '{name}' field")
  if not isinstance(value, str):
    raise UserError(f"{where} field '{name}' is {type(value).__name__}, expected a string")
  if not value:
    raise UserError(f"{where} field '{name}' is empty")
  return value


def _messages(record: dict, cfg: DataConfig, where: str, need_assistant: bool = True
              ) -> list[dict]:
  messages = record.get(cfg.messages_field)
  if not isinstance(messages, list) or not messages:
    raise UserError(f"{where} field '{cfg.messages_field}' is missing or not a non-empty list of "
                    "messages")
  for j, m in enumerate(messages, start=1):
    if not isinstance(m, dict) or not isinstance(m.get("content"), str):
      raise UserError(f"{where} message {j} needs a string 'content'")
    if m.get("role") not in ROLES:
      raise UserError(f"{where} message {j} has unknown role {m.get('role')!r} "
                      f"(known: {', '.join(ROLES)})")
  if need_assistant and not any(m["role"] == "assistant" for m in messages):
    raise UserError(f"{where} has no assistant turn to train on")
  return [{k: v for k, v in m.items() if v is not None} for m in messages]  # typed files: nulls


def _label(record: dict, name: str, where: str) -> str | int:
  value = record.get(name)
  if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
    got = "nothing" if value is None else repr(value)
    raise UserError(f"{where} field '{name}' must be a label name or an integer id, got {got}")
  if isinstance(value, int) and value < 0:
    raise UserError(f"{where} field '{name}' is {value}, a negative label id")
  return value


def _completion(record: dict, name: str, where: str) -> str | list[dict]:
  """A preference record's `chosen` or `rejected`: a string, or assistant messages."""
  value = record.get(name)
  if isinstance(value, list):
    if not value:
      raise UserError(f"{where} field '{name}' is an empty list of messages")
    for j, m in enumerate(value, start=1):
      if not isinstance(m, dict) or not isinstance(m.get("content"), str):
        raise UserError(f"{where} field '{name}' message {j} needs a string 'content'")
      if m.get("role") not in ROLES:
        raise UserError(f"{where} field '{name}' message {j} has unknown role {m.get('role')!r}")
    if not value[0]["content"] and len(value) == 1:
      raise UserError(f"{where} field '{name}' is an empty completion")
    return [{k: v for k, v in m.items() if v is not None} for m in value]
  return _string(record, name, where)


def _preference(record: dict, cfg: DataConfig, where: str) -> tuple:
  prompt = record.get(cfg.prompt_field)
  chosen, rejected = _completion(record, "chosen", where), _completion(record, "rejected", where)
  if isinstance(prompt, list):
    prompt = _messages({cfg.messages_field: prompt}, cfg, where, need_assistant=False)
  elif prompt is None or not isinstance(prompt, str):
    raise UserError(f"{where} field '{cfg.prompt_field}' must be a string or a list of messages")
  if isinstance(prompt, list) != isinstance(chosen, list) or \
      isinstance(chosen, list) != isinstance(rejected, list):
    raise UserError(f"{where}: prompt, chosen and rejected must all be strings or all be "
                    "messages")
  if chosen == rejected:
    raise UserError(f"{where}: chosen and rejected are the same completion")
  return prompt, chosen, rejected


def parse(record: Any, cfg: DataConfig, where: str):
  """The format's payload of one record (a dict, or a raw jsonl line), or a UserError."""
  if isinstance(record, str):
    try:
      record = json.loads(record)
    except json.JSONDecodeError as e:
      raise UserError(f"{where} is malformed JSON ({e.msg})") from None
  if not isinstance(record, dict):
    raise UserError(f"{where} is a JSON {type(record).__name__}, expected an object")
  if cfg.format == "text":
    return _string(record, cfg.text_field, where)
  if cfg.format == "prompt_completion":
    return _string(record, cfg.prompt_field, where), _string(record, cfg.completion_field, where)
  if cfg.format == "chat":
    return _messages(record, cfg, where)
  if cfg.format == "preference":
    return _preference(record, cfg, where)
  return _string(record, cfg.text_field, where), _label(record, cfg.label_field, where)


def _common_prefix(a: list[int], b: list[int]) -> int:
  n = 0
  while n < min(len(a), len(b)) and a[n] == b[n]:
    n += 1
  return n


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


def _pair(payload: tuple, cfg: DataConfig, tokenizer: Any, where: str) -> tuple:
  """(chosen + rejected tokens, their masks, prompt_len, None, len(chosen)) of a preference
  record: each completion tokenised together with the prompt, as inference sees it."""
  prompt, chosen, rejected = payload
  if isinstance(prompt, list):
    render = lambda msgs, gen: tokenizer(tokenizer.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=gen), add_special_tokens=False)["input_ids"]
    prompt_ids = render(prompt, True)
    sides = [render(prompt + c, False) for c in (chosen, rejected)]
  else:
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    sides = tokenizer([prompt + chosen, prompt + rejected], add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    sides = [t + [eos] if cfg.add_eos and (not t or t[-1] != eos) else t for t in sides]
  p = len(prompt_ids)
  for name, ids in zip(("chosen", "rejected"), sides):
    if ids[:p] != prompt_ids:
      raise UserError(f"{where}: the prompt's tokens are not a prefix of prompt + {name} (a token "
                      "merges across the boundary, or the chat template renders the prompt "
                      "differently alone)")
    if len(ids) == p:
      raise UserError(f"{where} field '{name}' is an empty completion")
  masks = [[0] * max(p, 1) + [1] * (len(ids) - max(p, 1)) for ids in sides]
  return sides[0] + sides[1], masks[0] + masks[1], p, None, len(sides[0])


def _tokenize(payloads: dict[int, Any], cfg: DataConfig, tokenizer: Any, wheres: list[str]):
  """{row: (tokens, mask, prompt_len, label, pair_split)} for the parsed rows, or
  {row: error}."""
  rows = list(payloads)
  if cfg.format in ("chat", "preference"):
    out = {}
    for i in rows:
      try:
        if cfg.format == "chat":
          out[i] = (*_chat(payloads[i], tokenizer, cfg.assistant_turns == "last", wheres[i]),
                    None, 0)
        else:
          out[i] = _pair(payloads[i], cfg, tokenizer, wheres[i])
      except UserError as e:
        out[i] = str(e)
    return out
  if cfg.format == "classification":
    ids = tokenizer([payloads[i][0] for i in rows], add_special_tokens=True)["input_ids"] \
        if rows else []
    return {i: (t, [0] * len(t), 0, payloads[i][1], 0) for i, t in zip(rows, ids)}
  eos = tokenizer.eos_token_id
  if cfg.format == "text":
    full = [payloads[i] for i in rows]
    prompts = None
  else:  # the prompt and completion tokenised together, as inference sees them
    full = [p + c for p, c in (payloads[i] for i in rows)]
    prompts = [p for p, _ in (payloads[i] for i in rows)]
  full_ids = tokenizer(full, add_special_tokens=True)["input_ids"] if rows else []
  prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"] if prompts else None
  out = {}
  for k, (i, tokens) in enumerate(zip(rows, full_ids)):
    if cfg.add_eos and (not tokens or tokens[-1] != eos):
      tokens = tokens + [eos]
    # The completion starts where the joint tokenisation leaves the prompt's own (a token merged
    # across the boundary counts as completion).
    start = _common_prefix(tokens, prompt_ids[k]) if prompt_ids is not None else 0
    out[i] = (tokens, [0] * start + [1] * (len(tokens) - start), start, None, 0)
  return out


def encode(records: list, numbers: list[int], cfg: DataConfig, tokenizer: Any,
           path: str, unit: str = "record") -> dict[str, list]:
  """Columns (see FEATURES) for `records`; `unit` names them in errors ("record" or "line")."""
  wheres = [f"{path}: {unit} {n}" for n in numbers]
  payloads, errors = {}, {}
  for i, record in enumerate(records):
    try:
      payloads[i] = parse(record, cfg, wheres[i])
    except UserError as e:
      errors[i] = str(e)
  if payloads and not getattr(tokenizer, "chat_template", None):
    if cfg.format == "chat":
      raise UserError(f"{path}: data.format is chat, but the tokenizer has no chat template")
    if cfg.format == "preference" and any(isinstance(p[0], list) for p in payloads.values()):
      raise UserError(f"{path}: the preference records are conversations, but the tokenizer has "
                      "no chat template")
  done = _tokenize(payloads, cfg, tokenizer, wheres)
  cols: dict[str, list] = {k: [] for k in FEATURES}
  for i, n in enumerate(numbers):
    got = done.get(i, errors.get(i))
    if isinstance(got, str):
      got, error = ([], [], 0, None, 0), got
    else:
      error = ""
    tokens, mask, start, label, split = got
    mask = [0] + list(mask[1:]) if mask else mask  # nothing predicts the first token
    cols["tokens"].append(tokens)
    cols["loss_mask"].append(mask)
    cols["prompt_len"].append(start)
    cols["label_name"].append(label if isinstance(label, str) else "")
    cols["label_id"].append(label if isinstance(label, int) else -1)
    cols["number"].append(n)
    cols["error"].append(error)
    cols["pair_split"].append(split)
  return cols


def map_batch(batch: dict, indices: list[int], *, cfg: DataConfig, tokenizer: Any,
              path: str) -> dict[str, list]:
  """`datasets.map` function over a batch of a source (see `sources.read`)."""
  if "_number" in batch:  # a line file: records are named by line number
    numbers = batch["_number"]
    records = batch["_line"] if "_line" in batch else [{cfg.text_field: t}
                                                        for t in batch[cfg.text_field]]
    return encode(records, numbers, cfg, tokenizer, path, "line")
  keys = list(batch)
  records = [dict(zip(keys, values)) for values in zip(*(batch[k] for k in keys))]
  return encode(records, [i + 1 for i in indices], cfg, tokenizer, path)
