"""`python -m ftjax.export --run RUN_DIR --to peft|hf --out DIR`: a run's weights for HF.

A run with several adapters (`peft.adapters`) exports one with `--adapter NAME` (`--to peft`
without it writes each to `--out/NAME`).

`--to peft` writes an HF PEFT adapter (LoRA / DoRA, prompt tuning, prefix tuning with the MLP
ejected to flat prefixes; trained base modules as `modules_to_save`). `--to hf` writes a full
model directory that `transformers` loads: full or partial fine-tuning as trained, LoRA merged
into the base weights. Methods a format cannot hold are refused with the reason.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional

from ftjax import assembly, checkpoint, config, metrics, peft, tree, vocab
from ftjax.config import UserError

logger = logging.getLogger("ftjax.export")


def load_run(run_dir: str, step: Optional[int | str] = None, model_path: Optional[str] = None
             ) -> tuple[config.Config, assembly.Model, dict, int]:
  """A run's config, its model, the parameters of checkpoint `step` (default: the newest;
  "best": the best under early stopping) merged into the model's, and the step."""
  config_file = os.path.join(run_dir, "config.yaml")
  if not os.path.isfile(config_file):
    raise UserError(f"--run: {run_dir} is not an ftjax run directory (no config.yaml)")
  cfg = config.load(config_file, [f"model.path={model_path}"] if model_path else [])
  if not os.path.isdir(cfg.model.path):
    raise UserError(f"{config_file}: model.path {cfg.model.path} is not a directory from here "
                    "(pass --model DIR)")
  best = step == "best"
  if best and not os.path.isdir(os.path.join(run_dir, "best")):
    raise UserError(f"--step best: {run_dir} kept no best checkpoint (it needs eval.patience)")
  ckpt = checkpoint.Checkpointer(run_dir, 0, 1, read_only=True,
                                 name="best" if best else "checkpoints")
  try:
    step = ckpt.latest_step() if step is None or best else int(step)
    if step is None:
      raise UserError(f"--run: {run_dir} has no checkpoint")
    if step not in ckpt.manager.all_steps():
      raise UserError(f"--step: {run_dir} has no checkpoint at step {step} "
                      f"(have {sorted(ckpt.manager.all_steps())})")
    trained = tree.flatten(ckpt.restore_params(step))
  finally:
    ckpt.close()
  tokenizer = vocab.run_tokenizer(run_dir, cfg.model.path)
  model = assembly.from_config(cfg, tokenizer, skip_init_from=True)  # the checkpoint has it all
  if set(trained) != model.trainable:
    raise UserError(f"{run_dir}: checkpoint {step} does not hold this config's trainable "
                    "parameters (was config.yaml edited?)")
  return cfg, model, tree.unflatten({**tree.flatten(model.params), **trained}), step


def export(run_dir: str, to: str, out_dir: str, step: Optional[int | str] = None,
           model_path: Optional[str] = None, dtype: str = "auto",
           adapter: Optional[str] = None) -> str:
  """Exports checkpoint `step` (default: the newest; "best": the best under early stopping) of
  a run; returns `out_dir`. A run with several adapters (`peft.adapters`) exports adapter
  `adapter`, or with `to` peft and no `adapter`, each one to `out_dir/<NAME>`."""
  config_file = os.path.join(run_dir, "config.yaml")
  if not os.path.isfile(config_file):
    raise UserError(f"--run: {run_dir} is not an ftjax run directory (no config.yaml)")
  cfg = config.load(config_file)
  if os.path.isfile(out_dir) or (os.path.isdir(out_dir) and os.listdir(out_dir)):
    raise UserError(f"--out: {out_dir} already exists and is not empty (choose a new directory)")
  if to == "peft" and not peft.METHODS[cfg.peft.method].peft_type:
    why = {"none": "peft.method none (full or partial fine-tuning) is no adapter: use --to hf",
           "adapter": "bottleneck adapters have no HF PEFT format (PEFT has no such method)",
           }.get(cfg.peft.method, f"HF PEFT has no format for peft.method {cfg.peft.method}")
    raise UserError(f"cannot export peft.method {cfg.peft.method} --to peft: {why}")
  if to == "hf" and peft.merge_refusal(cfg.peft.method):
    raise UserError(f"cannot export --to hf: {peft.merge_refusal(cfg.peft.method)}")
  names = list(cfg.peft.adapters or {})
  if adapter is not None and adapter not in names:
    have = f"its adapters are {', '.join(names)}" if names else "it has no named adapters"
    raise UserError(f"--adapter {adapter}: {run_dir} has no adapter of that name ({have})")
  if names and adapter is None and to == "hf":
    raise UserError(f"--to hf merges one adapter: name it with --adapter (one of "
                    f"{', '.join(names)})")
  cfg, model, params, _ = load_run(run_dir, step, model_path)
  model.path = os.path.abspath(cfg.model.path)
  tokenizer = vocab.run_tokenizer(run_dir, cfg.model.path)
  if names:
    for name in [adapter] if adapter else names:
      one = assembly.single_adapter(model, params, name)
      where = out_dir if adapter else os.path.join(out_dir, name)
      _write(cfg, one, one.params, to, where, dtype, run_dir, tokenizer)
      logger.info(f"adapter {name} -> {where}")
    return out_dir
  _write(cfg, model, params, to, out_dir, dtype, run_dir, tokenizer)
  return out_dir


def _write(cfg: config.Config, model: assembly.Model, params: dict, to: str, out_dir: str,
           dtype: str, run_dir: str, tokenizer) -> None:
  """One model's (or adapter's) export."""
  classify = cfg.data.format == "classification"
  if to == "peft":
    assembly.save_adapter(model, params, out_dir, "SEQ_CLS" if classify else "CAUSAL_LM")
    tokenizer.save_pretrained(out_dir)
  else:
    if cfg.peft.base_quant != "none":
      logger.info(f"--to hf: the adapter is merged into the dequantised {cfg.peft.base_quant} "
                  "base weights (the weights it trained against), not the original ones")
    updates = model.family.classifier_config(model.hf_config, cfg.data.labels,
                                             tokenizer.pad_token_id) if classify else None
    assembly.save_merged(model, params, out_dir, dtype, updates)
    if os.path.isdir(os.path.join(run_dir, vocab.TOKENIZER_DIR)):
      tokenizer.save_pretrained(out_dir)  # the extended tokenizer over the base's copies


def step_arg(text: str) -> int | str:
  """argparse type of `--step`: a step number or 'best'."""
  if text == "best":
    return text
  try:
    return int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a step number or 'best', got {text!r}") from None


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m ftjax.export",
                                   description="Export a run as an HF PEFT adapter or HF model.")
  parser.add_argument("--run", required=True, help="the run directory (train.output_dir)")
  parser.add_argument("--to", required=True, choices=("peft", "hf"))
  parser.add_argument("--out", required=True, help="the directory to write")
  parser.add_argument("--step", type=step_arg,
                      help="checkpoint step, or 'best' (early stopping's best; default: newest)")
  parser.add_argument("--model", help="base model directory, if it moved since training")
  parser.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"),
                      help="--to hf weight dtype (auto: the base model's)")
  parser.add_argument("--adapter", help="a run with several adapters (peft.adapters): the one "
                      "to export (--to peft without it: each to --out/NAME)")
  args = parser.parse_args(argv)
  metrics.console()
  try:
    out = export(args.run, args.to, args.out, args.step, args.model, args.dtype, args.adapter)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.to} export of {args.run} to {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
