"""`python -m ftjax.evaluate`: held-out metrics of a model, a model + PEFT adapter, or a run.

    python -m ftjax.evaluate (--model DIR [--adapter DIR] | --run RUN_DIR [--step N|best])
                             --data FILE [--format F] [--samples N] [--json]

A run with several adapters (`peft.adapters`) is evaluated one adapter at a time: `--run RUN
--adapter NAME` (it reproduces the run's `eval_<NAME>_loss` on that task's eval file).

The data goes through the training pipeline (`data.load`, the same formats, loss masks and
truncation) and the same eval step, so `--run` on the run's eval file reproduces its logged
`eval_loss`. It reports the per-token loss, perplexity and next-token accuracy over the trained
tokens (for `prompt_completion` and `chat` only the completions / assistant turns count), or,
for `--format classification`, the per-example loss, accuracy and macro-F1. `--samples N` adds
greedy generations of the first N prompts scored against their completions (exact match,
ROUGE-L, BLEU; see ftjax.evaluation).

Defaults: with `--run`, the format, fields, seq_len and truncation are the run's `data` settings,
the batch size its `eval.batch_size`, generation length its `eval.max_new_tokens`, the compute
dtype its `precision.compute`, and the checkpoint the newest. With `--model`, the format is
`text`, seq_len min(2048, the model's positions), the batch size 8, generation length 32, and
the model runs in fp32 (as `python -m ftjax.generate`); a classifier's labels are its
config.json `id2label` (what `ftjax.export --to hf` writes) unless `--labels` names them. Records
longer than seq_len are truncated (as `data.truncation: truncate`, unless the run chose
otherwise). One device runs the model.

`--json` prints one JSON object on stdout: `loss`, `ppl` (null for a classifier), `accuracy`,
`tokens` (the trained tokens the loss averages over; examples for a classifier), `examples`,
`f1` (classifiers), `exact_match`, `rouge_l`, `bleu`, `samples` (with `--samples`) and `step`
(with `--run`); logs go to stderr. Bad input is one line `error: ...` on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import os
import sys
from typing import Any, Optional

import jax

from ftjax import assembly, data, evaluation, export, generate, hf, loss, metrics, step, vocab
from ftjax import config as config_lib
from ftjax.config import Config, DataConfig, EvalConfig, PeftConfig, UserError
from ftjax.peft import hf_adapter

logger = logging.getLogger("ftjax.evaluate")  # not __main__ under python -m

FORMATS = ("text", "prompt_completion", "chat", "classification")
MODEL_SEQ_LEN = 2048  # --model's seq_len, when the model has at least this many positions


@dataclasses.dataclass
class Request:
  """What to evaluate on which data (the command line's flags; 0 / None: the default)."""

  data: list[str]
  model: Optional[str] = None
  adapter: Optional[str] = None
  run: Optional[str] = None
  step: Optional[int | str] = None
  format: Optional[str] = None
  seq_len: int = 0
  batch_size: int = 0
  samples: int = 0
  max_new_tokens: int = 0
  labels: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Target:
  """A model ready to evaluate: module, all parameters, tokenizer, and the data/eval settings."""

  module: Any
  params: dict
  tokenizer: Any
  cfg: Config  # data.* and eval.* as resolved; nothing else is read
  step: Optional[int] = None  # the checkpoint's step (--run)


def _check(req: Request) -> None:
  """Flag combinations and ranges, before anything is read."""
  if bool(req.model) == bool(req.run):
    raise UserError("pass --model DIR (with --adapter DIR) or --run RUN_DIR, exactly one of them")
  if req.step is not None and not req.run:
    raise UserError("--step chooses a checkpoint of --run")
  if req.labels and req.run:
    raise UserError("--labels goes with --model; a run's config.yaml records its labels")
  if req.seq_len < 0 or req.batch_size < 0 or req.samples < 0 or req.max_new_tokens < 0:
    raise UserError("--seq-len, --batch-size, --samples and --max-new-tokens cannot be negative")
  if req.model and not os.path.isdir(req.model):
    raise UserError(f"--model: directory not found: {req.model}")


def _context(module: Any, hf_config: dict) -> Optional[int]:
  """The positions left for data: the model's context less prompt tuning's soft tokens."""
  positions = getattr(module.cfg, "max_positions", None) or hf_config.get(
      "max_position_embeddings")
  return positions - module.peft.prompt_len if positions else None


def _labels_of(hf_config: dict, family: Any) -> list[str]:
  """A classifier checkpoint's label names by id (config.json `id2label`), else []."""
  arch = (hf_config.get("architectures") or [None])[0]
  names = hf_config.get("id2label") or {}
  if arch not in family.classifiers.values() or not names:
    return []
  return [names.get(str(i)) or str(i) for i in range(len(names))]


def _classifier(model_dir: str, adapter: Optional[str], labels: list[str], hf_config: dict,
                family: Any) -> tuple[Any, dict, Any, list[str]]:
  """(module, params, tokenizer, labels) of a sequence classifier; one without a trained head
  is refused (a fresh random head measures nothing)."""
  labels = labels or _labels_of(hf_config, family)
  if not labels:
    raise UserError(f"--format classification: {model_dir} is no classifier with labels "
                    "(config.json id2label); name them in order with --labels")
  peft_cfg, saved = PeftConfig(), []
  if adapter:
    adapter_cfg, config_file = hf_adapter.read_config(adapter, "--adapter")
    peft_cfg = PeftConfig(method=hf_adapter.method_of(adapter_cfg, config_file),
                          init_from=adapter)
    saved = [m.rsplit(".", 1)[-1] for m in adapter_cfg.get("modules_to_save") or []]
  tokenizer = hf.load_tokenizer(model_dir)
  model = assembly.load_model(model_dir, peft_cfg, compute="fp32", num_labels=len(labels),
                              tokenizer=tokenizer)
  if any(family.is_classifier(p) for p in model.fresh) and family.classifier_head not in saved:
    raise UserError(f"{model_dir}{' + ' + adapter if adapter else ''} has no trained "
                    f"classification head ({family.classifier_head})")
  return model.module, model.params, tokenizer, labels


def load(req: Request) -> Target:
  """The model (`req.model` + `req.adapter`, or checkpoint `req.step` of `req.run`) and the
  data and eval settings it is evaluated with (see the module docstring for the defaults)."""
  _check(req)
  if req.run:
    run_config = os.path.join(req.run, "config.yaml")
    if req.adapter and os.path.isfile(run_config) and \
        not config_lib.load(run_config).peft.adapters:
      raise UserError("--adapter DIR goes with --model; a run's checkpoint holds its own PEFT "
                      "weights (with --run, --adapter NAME picks one of a run's peft.adapters)")
    cfg, model, params, at = export.load_run(req.run, req.step)
    logger.info(f"{req.run}: checkpoint of step {at} ({cfg.peft.method})")
    if cfg.peft.adapters:  # one of several adapters, as a plain LoRA model
      if not req.adapter:
        raise UserError(f"{req.run} trained adapters {', '.join(cfg.peft.adapters)}: choose one "
                        "with --adapter NAME")
      model = assembly.single_adapter(model, params, req.adapter)
      params = model.params
    classifier = bool(model.module.num_labels)
    if req.format and (req.format == "classification") != classifier:
      kind = "a classifier" if classifier else "a causal LM"
      raise UserError(f"--format {req.format}: {req.run} trained {kind} "
                      f"(data.format {cfg.data.format})")
    target = Target(model.module, params, vocab.run_tokenizer(req.run, cfg.model.path), cfg, at)
    context = _context(model.module, model.hf_config)
    seq_len = req.seq_len or cfg.data.seq_len
  else:
    fmt = req.format or "text"
    module, _, hf_config, family = hf.build(req.model)
    if fmt != "classification" and not family.causal_lm:
      raise UserError(f"{req.model} is an encoder: evaluate it with --format classification")
    if fmt == "classification":
      module, params, tokenizer, labels = _classifier(req.model, req.adapter, req.labels,
                                                      hf_config, family)
    else:
      module, params, tokenizer, _ = generate.load_for_generation(req.model, req.adapter, None)
      labels = []
    context = _context(module, hf_config)
    seq_len = req.seq_len or min(MODEL_SEQ_LEN, context or MODEL_SEQ_LEN)
    cfg = Config(data=DataConfig(format=fmt, labels=labels), eval=EvalConfig())
    target = Target(module, params, tokenizer, cfg)
  if context and seq_len > context:
    raise UserError(f"--seq-len {seq_len} is longer than the model's context ({context} "
                    "positions)")
  fmt = req.format or target.cfg.data.format
  if fmt == "preference":
    raise UserError(f"{req.run}: a preference run's pairs are scored during the run "
                    "(eval_rewards/* in metrics.jsonl); evaluate its model here on another "
                    "format (--format text, prompt_completion or chat)")
  if req.samples and fmt in ("text", "classification"):
    raise UserError(f"--samples completes prompts: --format {fmt} has none (use "
                    "prompt_completion or chat)")
  evals = target.cfg.eval
  target.cfg = dataclasses.replace(
      target.cfg,
      data=dataclasses.replace(target.cfg.data, format=fmt, seq_len=seq_len, packing=False),
      eval=dataclasses.replace(evals, batch_size=req.batch_size or evals.batch_size,
                               samples=req.samples,
                               max_new_tokens=req.max_new_tokens or evals.max_new_tokens))
  return target


def measure(target: Target, paths: list[str]) -> dict:
  """The metrics of `target` on the files `paths` (see the module docstring for the keys)."""
  cfg, module, tokenizer = target.cfg, target.module, target.tokenizer
  classify = cfg.data.format == "classification"
  examples = data.load(paths, cfg.data, tokenizer, list(cfg.data.labels) if classify else None)
  data.check_vocab(examples, module.cfg.vocab_size)
  jitted = jax.jit(functools.partial(step.eval_step, apply_fn=loss.logits_fn(module)))
  counted = {"tokens": 0.0}

  def eval_fn(params, frozen, batch):  # also counts the targets the loss is averaged over
    out = jitted(params, frozen, batch)
    counted["tokens"] += float(out["tokens"])
    return out

  out = evaluation.evaluate(eval_fn, {}, target.params, examples, cfg, tokenizer.pad_token_id)
  if cfg.eval.samples:
    out.update(evaluation.generated(module, target.params, examples, tokenizer, cfg))
  result = {"loss": out["eval_loss"], "ppl": out.get("eval_ppl"),  # a classifier has no ppl
            "accuracy": out["eval_accuracy"], "tokens": int(counted["tokens"]),
            "examples": len(examples)}
  result.update({k.removeprefix("eval_"): v for k, v in out.items()})
  if target.step is not None:
    result["step"] = target.step
  return result


def run(req: Request) -> dict:
  """Loads what `req` names and measures it on `req.data`."""
  return measure(load(req), req.data)


def describe(req: Request, result: dict) -> str:
  """Two lines for people: what was measured on how much, and the metrics."""
  what = f"{req.run} (step {result['step']})" if req.run else \
      req.model + (f" + {req.adapter}" if req.adapter else "")
  count = f"{result['examples']} examples"
  if result["ppl"] is not None:
    count += f", {result['tokens']} target tokens"
  return (f"{what} on {', '.join(req.data)}: {count}\n"
          + evaluation.describe({f"eval_{k}": v for k, v in result.items()}))


class _Parser(argparse.ArgumentParser):
  """Flag errors as one `error: ...` line (exit status 2), like every other bad input."""

  def error(self, message: str):
    self.exit(2, f"error: {message}\n")


def main(argv: Optional[list[str]] = None) -> int:
  parser = _Parser(prog="python -m ftjax.evaluate",
                   description="Held-out loss, perplexity, accuracy and generation metrics of a "
                   "model, a model + PEFT adapter, or a run.")
  parser.add_argument("--model", help="an HF model directory")
  parser.add_argument("--adapter", help="an HF PEFT adapter directory for --model; with --run "
                      "of a run with several adapters (peft.adapters), the NAME of one")
  parser.add_argument("--run", help="an ftjax run directory (train.output_dir)")
  parser.add_argument("--step", type=export.step_arg,
                      help="--run's checkpoint step, or 'best' (default: the newest)")
  parser.add_argument("--data", nargs="+", required=True,
                      help="data files (jsonl, json, csv, parquet, txt; globs)")
  parser.add_argument("--format", choices=FORMATS,
                      help="data format (default: the run's data.format, or text)")
  parser.add_argument("--labels", type=lambda s: s.split(","), default=[],
                      help="classification: label names by id, comma-separated (default: the "
                      "model's id2label, or the run's data.labels)")
  parser.add_argument("--seq-len", type=int, default=0,
                      help=f"longer records are truncated (default: the run's data.seq_len, or "
                      f"min({MODEL_SEQ_LEN}, the model's positions))")
  parser.add_argument("--batch-size", type=int, default=0,
                      help="rows per eval batch (default: the run's eval.batch_size, or 8)")
  parser.add_argument("--samples", type=int, default=0,
                      help="score greedy completions of the first N prompts (default: none)")
  parser.add_argument("--max-new-tokens", type=int, default=0,
                      help="generation length for --samples (default: the run's "
                      "eval.max_new_tokens, or 32)")
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  args = vars(parser.parse_args(argv))
  as_json = args.pop("json")
  req = Request(**args)
  metrics.console()
  absl = logging.getLogger("absl")  # orbax's notes on read-only checkpoint managers: noise here
  level = absl.level
  absl.setLevel(logging.ERROR)
  try:
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the result only
      result = run(req)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  finally:
    absl.setLevel(level)
  print(json.dumps(result) if as_json else describe(req, result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
