"""`python -m ftjax.data --config FILE [key.sub=value ...]`: the data a run would train on.

A dry run: it tokenises (and caches) the configured data with the model's tokenizer, builds the
batches the run would see, and prints counts (records, examples, truncated, dropped, skipped),
token totals, a length histogram, how full the rows are (packing or bucketed padding), and the
first examples rendered with their trained tokens between [[ and ]], so the loss mask can be
checked before any compute is spent. No model weights are loaded.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from ftjax import config, data, hf
from ftjax.config import UserError

OPEN, CLOSE = "[[", "]]"


def render(example: data.Example, tokenizer) -> str:
  """The example's text with each run of trained tokens between [[ and ]].

  Pieces are cut from decodes of growing prefixes, so the text reads exactly as the whole
  sequence decodes (tokenizers that drop a leading space when a piece is decoded alone included).
  """
  tokens, mask = example.tokens.tolist(), example.loss_mask.tolist()
  decode = lambda n: tokenizer.decode(tokens[:n], skip_special_tokens=False,
                                      clean_up_tokenization_spaces=False)
  out, done, start = [], "", 0
  for end in range(1, len(tokens) + 1):
    if end < len(tokens) and mask[end] == mask[start]:
      continue
    text = decode(end)
    piece = text[len(done):] if text.startswith(done) else tokenizer.decode(tokens[start:end])
    out.append(f"{OPEN}{piece}{CLOSE}" if mask[start] else piece)
    done, start = text, end
  return "".join(out)


def histogram(lengths: np.ndarray, seq_len: int, bins: int = 8, width: int = 40) -> list[str]:
  edges = np.unique(np.ceil(np.linspace(0, seq_len, bins + 1)).astype(int))
  counts, _ = np.histogram(lengths, bins=edges)
  top = max(int(counts.max()), 1)
  return [f"    {lo + 1:>6}-{hi:<6} {'#' * round(width * c / top):<{width}} {c}"
          for lo, hi, c in zip(edges[:-1], edges[1:], counts)]


def describe(what: str, split: data.Split, cfg: config.Config, pad_id: int,
             labels: list[str]) -> list[str]:
  examples = split.examples
  lines = [split.stats.describe(what, len(examples))]
  lengths = np.array([len(side.tokens) for ex in examples for side in ex.sides()])
  trained = sum(int(ex.loss_mask[1:].sum()) for ex in examples)
  unit = "sequence (a pair has two)" if examples[0].split else "example"
  lines.append(f"  tokens: {lengths.sum():,} in all, {trained:,} trained "
               f"({100 * trained / max(lengths.sum(), 1):.1f}%); per {unit} min {lengths.min()}, "
               f"median {int(np.median(lengths))}, max {lengths.max()} (data.seq_len "
               f"{cfg.data.seq_len})")
  if labels:
    counts = np.bincount([ex.label for ex in examples], minlength=len(labels))
    lines.append("  labels: " + ", ".join(f"{i} {n!r}: {c}" for i, (n, c) in
                                          enumerate(zip(labels, counts))))
  lines.append("  length histogram (tokens per example):")
  lines += histogram(lengths, cfg.data.seq_len)
  if what == "data.train":
    b = data.train_batches(cfg, examples, pad_id, list(cfg.peft.adapters or {}))
    sides = 2 if b.pairs else 1  # a pair is two rows of a batch
    padded = sum(data.batches.fit(int(b.row_tokens[b.global_rows(s)].max()), b.lengths)
                 * cfg.train.batch_size * sides for s in range(b.steps_per_epoch))
    real = sum(len(examples[b.rows[r][i]].tokens) for s in range(b.steps_per_epoch)
               for r in b.global_rows(s) for i in range(len(b.rows[r])))
    rows = (f"packed into {len(b.rows)} rows of {cfg.data.seq_len} tokens "
            f"({100 * b.efficiency:.1f}% full)" if b.packed else
            "one sequence per row, a pair's two side by side" if b.pairs else "one example per row")
    lines.append(f"  rows: {rows}; padded to lengths {'/'.join(map(str, b.lengths))}: "
                 f"{100 * real / padded:.1f}% of the padded tokens are real")
    epochs = cfg.train.steps / b.steps_per_epoch
    if b.tasks:
      lines.append("  tasks (rows per epoch): " + ", ".join(
          f"{name} {n}" for name, n in zip(b.tasks, b.task_counts))
          + f"; {cfg.data.task_batches} batches")
    lines.append(f"  batches: {b.steps_per_epoch} steps per epoch of {cfg.train.batch_size} "
                 f"{'pairs' if b.pairs else 'rows'} (train.steps {cfg.train.steps} = "
                 f"{epochs:.2f} epochs)")
  return lines


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m ftjax.data", description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True, help="a YAML config (see configs/)")
  parser.add_argument("--show", type=int, default=2, help="examples to render (default 2)")
  parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
  args = parser.parse_intermixed_args(argv)
  try:
    cfg = config.load(args.config, args.overrides)
    hf_config, _ = hf.read_config(cfg.model.path)
    tokenizer = hf.load_tokenizer(cfg.model.path)
    loaded = data.load_splits(cfg.data, tokenizer, list(cfg.peft.adapters or {}))
    splits = [("data.train", loaded.train)] + [(f"data.eval.{n}" if n else "data.eval", s)
                                               for n, s in loaded.evals.items()]
    for _, split in splits:
      data.check_vocab(split.examples, hf_config["vocab_size"])
    lines = [f"tokenizer {cfg.model.path}: {len(tokenizer)} tokens, chat template "
             f"{'yes' if getattr(tokenizer, 'chat_template', None) else 'no'}; format "
             f"{cfg.data.format}"]
    for what, split in splits:
      lines += describe(what, split, cfg, tokenizer.pad_token_id, loaded.labels)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for ex in loaded.train.examples[:args.show]:
    label = f", label {ex.label} {loaded.labels[ex.label]!r}" if ex.label >= 0 else ""
    lines.append(f"\nexample {ex.where}: {len(ex.tokens)} tokens, {int(ex.loss_mask[1:].sum())} "
                 f"trained (between {OPEN} and {CLOSE}){label}")
    if ex.split:
      chosen, rejected = ex.sides()
      lines += [f"chosen:   {render(chosen, tokenizer)}",
                f"rejected: {render(rejected, tokenizer)}"]
    else:
      lines.append(render(ex, tokenizer))
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
