"""SFT on CPU, ftjax against TRL's SFTTrainer: Alpaca-shaped data, one model, marginal wall-clock.

    python scripts/bench_sft.py --json benchmarks/sft_cpu.json --figure benchmarks/sft_cpu.png
    python scripts/bench_sft.py --quick                     # smoke test, a few minutes on 2 cores
    python scripts/bench_sft.py --format chat --json benchmarks/sft_chat_cpu.json

Data: --examples N + --extra M prompt/completion records (seeded by --seed), whose token lengths
(SmolLM2's tokenizer) follow Stanford Alpaca's (tatsu-lab/stanford_alpaca; prompt = instruction,
plus "\\n\\n" + input where there is one; completion = output). No published token quantiles of
Alpaca were found, so they were measured once, with SmolLM2's tokenizer, on the public 5,000-record
sample `data/alpaca_5000.json` of tatsu-lab/stanford_alpaca (commit 5e69c50, "get subset from
alpaca data"), and are tabled below (ALPACA_*):

    prompt      p10 8, p50 14, p90 32, mean 18.4 tokens
    completion  p10 7, p50 44, p90 125, mean 58.2 tokens (without EOS)

A check on the whole set: alpaca-lora (tloen/alpaca-lora lengths.ipynb, issue #9) found that 256
LLaMA tokens cover ~98% of alpaca_data.json with the Alpaca template; here 1.5% of the sample's
records exceed 255 tokens. Lengths are drawn from the tabled quantiles (inverse CDF, linear
between them) through a Gaussian copula with the sample's normal-score correlation, -0.24 (long
inputs come with short outputs). A record longer than --seq-len is cut to fit (its completion
shortened; the EOS, or chat's template tokens, kept), as either framework's truncation would, so
truncation is a no-op on both sides. Text: runs of English words from the standard library's
help texts (`pydoc_data.topics`, no download), cut to the drawn token counts. The JSON states the
targeted and the realised quantiles. Records are written as jsonl in the prompt-completion form
both frameworks read ({"prompt", "completion"}); `--format chat` writes the same text as one user
and one assistant message ({"messages": [...]}), loss on the assistant turn only.

Settings, the same on both sides: SmolLM2-135M-Instruct (--model, an HF directory written by
`python -m ftjax.prepare smollm2`), fp32 on CPU; LoRA r16, alpha 32, dropout 0 on q, k, v, o,
gate, up, down; AdamW lr 2e-4, constant, no warmup, no weight decay, clipping at norm 1.0; batch
8 rows; max length 256; loss on completion tokens and the EOS appended to each completion (ftjax
`data.add_eos`; TRL appends `eos_token` to prompt-completion records), the mean over the batch's
trained tokens; one epoch.

Modes, each run in its own process: ftjax through its CLI (`python -m ftjax.train --config`)
with no data.packing override (`default`: whatever ftjax's default is), `packing`
(data.packing=true), `padded` (data.packing=false); TRL through `SFTTrainer(...).train()` on the
`from_pretrained` model with `peft_config=LoraConfig(...)`, SFTConfig defaults apart from the
shared settings (gradient checkpointing on, TRL's default; per-step logging), `default`
(padding to the longest row of each batch), `packing` (packing=True, its BFD strategy, which
trains padding-free) and `padding_free` (padding_free=True; TRL then refuses max_length, so it
gets max_length=None, a no-op here as every record fits). By default (`--trl-gc both`) each TRL
mode also runs with gradient_checkpointing=False (`+nogc`), so "TRL best" includes them. TRL's
side is skipped for chat data when its assistant_only_loss refuses SmolLM2's chat template (it
needs `{% generation %}` markers); the reason is recorded.

Timing: every mode runs on N and on N + M examples in each of --rounds rounds (the order of
frameworks alternating), whole processes timed from outside; the marginal seconds of the M extra
examples cancel start-up, loading, tokenisation and compilation. Trained tokens/s = the trained
tokens the longer run trained beyond the shorter one / those seconds (median over rounds), the
tokens counted from what each run trained: ftjax's batches rebuilt from its run's resolved
config (it runs ceil(rows / 8) steps, so every row trains; the last batch is topped up from the
next epoch), TRL's counted in its collator. Peak memory: each process's peak RSS (os.wait4). Each
framework's own throughput is recorded too (ftjax's metrics.jsonl tokens_per_s, TRL's
train_runtime and num_tokens). "Epoch of M extra" = the M extra records' trained tokens / that
rate: one epoch of the same records, whatever top-up a mode's last batch got; "marginal s" is the
raw difference. A mode is marked noisy (and left out of "TRL best") when its marginal seconds are
under 20% of its N run's, or its rounds spread by more than 20%: use more --extra or --rounds.

Equal loss: the first 8 records are tokenised by TRL's own dataset preparation and by ftjax.data;
the token ids and trained masks must agree (the script fails otherwise), and the loss of that
batch at step 0 (LoRA B = 0: the base model's loss) is computed by TRL's compute_loss (padded,
padding-free and BFD-packed) and by ftjax.train's loss on ftjax.load_model (one example per row,
and packed), all within 1e-4 relative.
"""

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import bench  # noqa: E402  (scripts/bench.py: environment, load checks)
import peak_rss  # noqa: E402  (scripts/peak_rss.py: ru_maxrss in MiB)

ALPACA_SOURCE = ("tatsu-lab/stanford_alpaca data/alpaca_5000.json (commit 5e69c50, a 5,000-record "
                 "sample of alpaca_data.json), SmolLM2 tokenizer; prompt = instruction [+ '\\n\\n' "
                 "+ input], completion = output")
ALPACA_LEVELS = [0, 1, 2, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55, 60, 65, 70, 75, 80, 85, 90,
                 95, 98, 99, 100]
ALPACA_PROMPT = [4, 6, 6, 7, 8, 9, 10, 10, 11, 12, 13, 13, 14, 16, 17, 18, 20, 22, 24, 27, 32, 41,
                 59, 72, 238]
ALPACA_COMPLETION = [0, 1, 2, 4, 7, 9, 11, 14, 17, 22, 28, 35, 44, 52, 60, 69, 77, 86, 96, 108,
                     125, 160, 221, 264, 587]
ALPACA_MEAN = {"prompt": 18.4, "completion": 58.2}
ALPACA_RHO = -0.24  # normal-score correlation of prompt and completion lengths in the sample
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FTJAX_MODES = {"default": [], "packing": ["data.packing=true"], "padded": ["data.packing=false"]}
TRL_MODES = ("default", "packing", "padding_free")
CHECK_ROWS = 8
REL_TOL = 1e-4
# A mode is noisy when its marginal seconds are under this fraction of its N run's wall-clock
# (start-up jitter swamps the extra examples) or its rounds spread by more than this fraction.
NOISY = 0.2


def parse(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--model", default="models/smollm2-135m-instruct",
                 help="HF model directory (relative paths: from the repository root)")
  p.add_argument("--format", choices=["prompt_completion", "chat"], default="prompt_completion")
  p.add_argument("--examples", type=int, default=128, help="N: the shorter run's records")
  p.add_argument("--extra", type=int, default=128, help="M: the longer run's extra records")
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--modes", default="", help="framework:mode,... (default: all; e.g. "
                 "ftjax:default,trl:default,trl:packing+nogc)")
  p.add_argument("--trl-gc", choices=["on", "off", "both"], default=None,
                 help="TRL's gradient checkpointing: on (its default), off (+nogc modes) or "
                 "both (default; --quick: on)")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq-len", type=int, default=256)
  p.add_argument("--lr", type=float, default=2e-4)
  p.add_argument("--json", default="")
  p.add_argument("--figure", default="")
  p.add_argument("--workdir", default="", help="keep data, configs and logs here (default: a "
                 "temporary directory, removed at the end)")
  p.add_argument("--wait-idle", type=float, default=0.0,
                 help="before each run, wait up to this many seconds for other load to go away")
  p.add_argument("--quick", action="store_true", help="smoke test: 32 + 32 records, 1 round")
  p.add_argument("--worker", default="", help=argparse.SUPPRESS)  # trl | check-trl | check-ftjax
  p.add_argument("--mode", default="", help=argparse.SUPPRESS)
  p.add_argument("--data", default="", help=argparse.SUPPRESS)
  p.add_argument("--config", default="", help=argparse.SUPPRESS)
  p.add_argument("--out", default="", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.quick:
    args.examples, args.extra, args.rounds = 32, 32, 1
  args.trl_gc = args.trl_gc or ("on" if args.quick else "both")
  args.model = os.path.abspath(os.path.join(ROOT, args.model))
  return args


def log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


# ---- data ------------------------------------------------------------------------------------

def _phi(z: np.ndarray) -> np.ndarray:
  return 0.5 * (1.0 + np.vectorize(math.erf)(z / math.sqrt(2.0)))


def sample_lengths(n: int, seed: int, room: int) -> tuple[np.ndarray, np.ndarray, int]:
  """(prompt, completion) token counts of n records drawn from the Alpaca quantiles, and how many
  records had their completion cut so that prompt + completion <= room."""
  rng = np.random.default_rng([seed, 1])
  z = rng.multivariate_normal([0.0, 0.0], [[1.0, ALPACA_RHO], [ALPACA_RHO, 1.0]], size=n)
  u = 100.0 * _phi(z)
  prompt = np.rint(np.interp(u[:, 0], ALPACA_LEVELS, ALPACA_PROMPT)).astype(int)
  completion = np.rint(np.interp(u[:, 1], ALPACA_LEVELS, ALPACA_COMPLETION)).astype(int)
  prompt = np.clip(prompt, 1, room - 1)
  completion = np.maximum(completion, 1)
  cut = int(np.sum(prompt + completion > room))
  return prompt, np.minimum(completion, room - prompt), cut


def overhead(tokenizer, fmt: str) -> int:
  """Tokens a record has beyond its prompt and completion text: the EOS, or (chat) the template's
  system turn, role headers and end-of-turn markers."""
  if fmt != "chat":
    return 1
  msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
  text = tokenizer.apply_chat_template(msgs, tokenize=False)
  return len(tokenizer(text, add_special_tokens=False)["input_ids"]) - 2


def _word_stream() -> list[str]:
  """English words from the standard library's help texts, in their order."""
  from pydoc_data import topics  # pylint: disable=import-outside-toplevel

  text = " ".join(topics.topics[k] for k in sorted(topics.topics))
  return [w for w in text.split() if re.fullmatch(r"[A-Za-z][a-z]*[.,;:]?", w)]


class _Words:
  """Word runs cut to an exact token count (SmolLM2's byte-level BPE splits before each space, so
  a text's tokens are the sum of its words')."""

  def __init__(self, tokenizer, seed: int):
    self.tok, self.words = tokenizer, _word_stream()
    self.rng = np.random.default_rng([seed, 2])
    self.counts: dict = {}

  def _count(self, piece: str) -> int:
    if piece not in self.counts:
      self.counts[piece] = len(self.tok(piece, add_special_tokens=False)["input_ids"])
    return self.counts[piece]

  def text(self, tokens: int, lead_space: bool) -> str:
    """A run of words from a random place, `tokens` tokens long (a word that would overshoot is
    skipped); with a leading space when `lead_space`."""
    at, out, left = int(self.rng.integers(len(self.words))), [], tokens
    while left > 0:
      word = self.words[at % len(self.words)]
      at += 1
      piece = word if not out and not lead_space else " " + word
      n = self._count(piece)
      if n <= left:
        out.append(piece)
        left -= n
    return "".join(out)


def make_records(n: int, args, tokenizer) -> tuple[list[dict], dict]:
  """n records in `args.format` and what they were drawn from."""
  extra = overhead(tokenizer, args.format)
  prompt_n, completion_n, cut = sample_lengths(n, args.seed, args.seq_len - extra)
  words = _Words(tokenizer, args.seed)
  records = []
  for p, c in zip(prompt_n, completion_n):
    prompt = words.text(int(p), lead_space=False)
    completion = words.text(int(c), lead_space=True)  # a clean token boundary after the prompt
    if args.format == "chat":
      records.append({"messages": [{"role": "user", "content": prompt},
                                   {"role": "assistant", "content": completion.lstrip()}]})
    else:
      records.append({"prompt": prompt, "completion": completion})
  return records, {"cut_to_fit": cut, "overhead_tokens": extra}


def quantiles(values) -> dict:
  a = np.asarray(values, np.float64)
  return {"p10": float(np.percentile(a, 10)), "p50": float(np.percentile(a, 50)),
          "p90": float(np.percentile(a, 90)), "mean": round(float(a.mean()), 2)}


def write_jsonl(path: str, records: list[dict]) -> None:
  with open(path, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


# ---- ftjax -----------------------------------------------------------------------------------

def ftjax_yaml(args, path: str) -> None:
  """The shared settings as an ftjax config (data.train and train.steps are given per run)."""
  import yaml  # pylint: disable=import-outside-toplevel

  cfg = {"model": {"path": args.model},
         "peft": {"method": "lora", "lora": {"targets": ["all-linear"], "r": 16, "alpha": 32,
                                             "dropout": 0.0}},
         "data": {"format": args.format, "seq_len": args.seq_len, "add_eos": True},
         "optim": {"name": "adamw", "lr": args.lr, "schedule": "constant", "warmup_steps": 0,
                   "weight_decay": 0.0, "clip_norm": 1.0},
         "precision": {"compute": "fp32"},
         "train": {"batch_size": args.batch, "seed": args.seed, "log_every": 1},
         "eval": {"samples": 0}}
  with open(path, "w") as f:
    yaml.safe_dump(cfg, f, sort_keys=False)


def ftjax_batches(cfg, cache_dir: str):
  """ftjax's training batches of a run config, built as `ftjax.train` builds them."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  from ftjax import data, hf  # pylint: disable=import-outside-toplevel

  tok = hf.load_tokenizer(cfg.model.path)
  dcfg = dataclasses.replace(cfg.data, cache_dir=cache_dir)
  examples = data.load_splits(dcfg, tok).train.examples
  return data.train_batches(cfg, examples, tok.pad_token_id)


def batch_counts(batch: dict) -> dict:
  """Trained, real (non-padding) and computed (row x length) tokens of one ftjax batch."""
  seg = batch["segment_ids"]
  trained = batch["loss_mask"][:, 1:] * (seg[:, 1:] == seg[:, :-1]) * (seg[:, 1:] > 0)
  return {"trained": int(trained.sum()), "real": int((seg > 0).sum()), "computed": int(seg.size)}


def ftjax_plan(args, config_path: str, overrides: list[str], cache_dir: str) -> int:
  """Steps that train every row of the run once: ceil(rows / batch)."""
  from ftjax import config  # pylint: disable=import-outside-toplevel

  batches = ftjax_batches(config.load(config_path, overrides), cache_dir)
  return -(-len(batches.rows) // args.batch)


def ftjax_count(run_dir: str, cache_dir: str) -> dict:
  """What a finished ftjax run trained, from its resolved config.yaml: steps, rows, packing,
  tokens (trained, real, computed), and its own logged throughput and first loss."""
  from ftjax import config  # pylint: disable=import-outside-toplevel

  cfg = config.load(os.path.join(run_dir, "config.yaml"))
  batches = ftjax_batches(cfg, cache_dir)
  totals = {"trained": 0, "real": 0, "computed": 0}
  for s in range(cfg.train.steps):
    for k, v in batch_counts(batches.get(s)).items():
      totals[k] += v
  logged = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
  steps = [r for r in logged if "tokens_per_s" in r]
  own = [r["tokens_per_s"] for r in steps[1:]]  # the first step compiles
  return {"steps": cfg.train.steps, "rows": len(batches.rows), "packing": cfg.data.packing,
          "tokens": totals, "first_loss": steps[0]["loss"] if steps else None,
          "own_tokens_per_s": statistics.median(own) if own else None}


def ftjax_command(config_path: str, data_path: str, mode: str, steps: int, out_dir: str,
                  cache_dir: str) -> list[str]:
  return [sys.executable, "-m", "ftjax.train", "--config", config_path,
          f"data.train=[{data_path}]", f"data.cache_dir={cache_dir}", f"train.steps={steps}",
          f"train.output_dir={out_dir}"] + FTJAX_MODES[mode]


# ---- TRL -------------------------------------------------------------------------------------

def trl_settings(args, mode: str, out_dir: str) -> dict:
  """SFTConfig keywords of a TRL mode: the shared settings, then the mode's own."""
  base, _, flag = mode.partition("+")
  kw = dict(output_dir=out_dir, per_device_train_batch_size=args.batch, num_train_epochs=1,
            learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
            weight_decay=0.0, max_grad_norm=1.0, max_length=args.seq_len, bf16=False, fp16=False,
            use_cpu=True, report_to=[], save_strategy="no", eval_strategy="no",
            dataloader_num_workers=0, logging_steps=1, seed=args.seed)
  if args.format == "chat":
    kw["assistant_only_loss"] = True
  if base == "packing":
    kw["packing"] = True
  elif base == "padding_free":
    kw.update(padding_free=True, max_length=None)  # TRL refuses max_length here; all records fit
  if flag == "nogc":
    kw["gradient_checkpointing"] = False
  return kw


def trl_trainer(args, mode: str, records: list[dict], out_dir: str):
  """TRL's SFTTrainer as a user builds it: the HF model, its tokenizer, LoRA via peft_config."""
  import datasets  # pylint: disable=import-outside-toplevel
  import peft  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  import trl  # pylint: disable=import-outside-toplevel

  model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
  tok = transformers.AutoTokenizer.from_pretrained(args.model)
  lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS,
                         task_type="CAUSAL_LM")
  return trl.SFTTrainer(model=model, args=trl.SFTConfig(**trl_settings(args, mode, out_dir)),
                        train_dataset=datasets.Dataset.from_list(records), processing_class=tok,
                        peft_config=lora)


def trl_worker(args) -> dict:
  """One TRL run: trains one epoch of --data in --mode; counts what its collator fed."""
  out_dir = tempfile.mkdtemp(prefix="bench-sft-trl-")
  try:
    trainer = trl_trainer(args, args.mode, read_jsonl(args.data), out_dir)
    totals = {"trained": 0, "real": 0, "computed": 0, "steps": 0}
    collate = trainer.data_collator

    def counting(rows):
      batch = collate(rows)
      labels = batch["labels"]
      totals["trained"] += int((labels[:, 1:] != -100).sum())
      totals["real"] += int(batch["attention_mask"].sum()) if "attention_mask" in batch else \
          int(labels.numel())
      totals["computed"] += int(labels.numel())
      totals["steps"] += 1
      return batch

    trainer.data_collator = counting
    out = trainer.train()
    history = [r for r in trainer.state.log_history if "loss" in r]
    num_tokens = max((r.get("num_tokens", 0) for r in trainer.state.log_history), default=0)
    runtime = out.metrics.get("train_runtime")
    return {"tokens": {k: totals[k] for k in ("trained", "real", "computed")},
            "steps": totals["steps"], "rows": len(trainer.train_dataset),
            "first_loss": history[0]["loss"] if history else None, "train_runtime_s": runtime,
            "own_tokens_per_s": num_tokens / runtime if runtime else None,
            "gradient_checkpointing": trainer.args.gradient_checkpointing,
            "optim": str(trainer.args.optim)}
  finally:
    shutil.rmtree(out_dir, ignore_errors=True)


# ---- equal loss on the first batch ---------------------------------------------------------

def check_trl(args) -> dict:
  """TRL's tokenisation of the first records and its step-0 loss on them: padded (its default
  collator), padding-free, and BFD-packed."""
  import torch  # pylint: disable=import-outside-toplevel
  from trl.data_utils import pack_dataset  # pylint: disable=import-outside-toplevel
  from trl.trainer.sft_trainer import DataCollatorForLanguageModeling  # pylint: disable=import-outside-toplevel

  records = read_jsonl(args.data)[:CHECK_ROWS]
  out_dir = tempfile.mkdtemp(prefix="bench-sft-check-")
  try:
    try:
      trainer = trl_trainer(args, "default", records, out_dir)
    except ValueError as e:  # e.g. assistant_only_loss with a template without generation tags
      return {"error": f"{type(e).__name__}: {e}"}
    rows = [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"])}
            for r in trainer.train_dataset]
    pad = trainer.processing_class.pad_token_id
    packed = pack_dataset(trainer.train_dataset.select_columns(["input_ids", "labels"]),
                          args.seq_len, "bfd")
    collators = {"padded": (trainer.data_collator, rows),
                 "padding_free": (DataCollatorForLanguageModeling(pad, padding_free=True), rows),
                 "packed": (DataCollatorForLanguageModeling(pad, padding_free=True),
                            list(packed))}
    trainer.model.eval()
    losses = {}
    with torch.no_grad():
      for name, (collate, batch_rows) in collators.items():
        batch = collate(batch_rows)
        losses[name] = float(trainer.compute_loss(trainer.model, dict(batch)))
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {"ids": [r["input_ids"] for r in rows],
            "mask": [[int(x != -100) for x in r["labels"]] for r in rows],
            "losses": losses, "trainable": trainable}
  finally:
    shutil.rmtree(out_dir, ignore_errors=True)


def check_ftjax(args) -> dict:
  """ftjax.data's tokenisation of the first records and ftjax.train's loss on them at step 0:
  one example per row, and the same examples packed."""
  import jax  # pylint: disable=import-outside-toplevel
  from ftjax import config, data, hf, load_model, train, tree  # pylint: disable=import-outside-toplevel

  cfg = config.load(args.config, [f"data.train=[{args.data}]"])
  records = read_jsonl(args.data)[:CHECK_ROWS]
  tok = hf.load_tokenizer(cfg.model.path)
  examples = data.tokenize(records, cfg.data, tok, args.data)
  model = load_model(cfg.model.path, cfg.peft, compute=cfg.precision.compute, seed=cfg.train.seed)
  loss_fn = jax.jit(train.loss_for(cfg, model))
  lengths = np.array([len(ex.tokens) for ex in examples])
  layouts = {"unpacked": [[ex] for ex in examples],
             "packed": [[examples[i] for i in row] for row in data.pack(lengths, cfg.data.seq_len)]}
  losses = {}
  for name, rows in layouts.items():
    width = max(sum(len(ex.tokens) for ex in row) for row in rows)
    batch = data.collate(rows, width, tok.pad_token_id)
    total, aux = loss_fn(model.params, batch, None, None)
    losses[name] = float(total) / float(aux["tokens"])
  return {"ids": [ex.tokens.tolist() for ex in examples],
          "mask": [ex.loss_mask.tolist() for ex in examples], "losses": losses,
          "trainable": tree.count(model.split()[0]), "packed_rows": len(layouts["packed"])}


def compare(ftjax_side: dict, trl_side: dict) -> dict:
  """Token ids and trained masks must agree (position 0 is never a target); the losses within
  REL_TOL of ftjax's unpacked loss."""
  losses = {f"ftjax_{k}": v for k, v in ftjax_side["losses"].items()}
  out = {"rows": len(ftjax_side["ids"]), "losses": losses}
  if "error" in trl_side:
    out["trl_skipped"] = trl_side["error"]
  else:
    for i, (a, b) in enumerate(zip(ftjax_side["ids"], trl_side["ids"])):
      if a != b:
        raise SystemExit(f"tokenisation differs on record {i + 1}:\n  ftjax {a}\n  TRL   {b}")
      ma, mb = ftjax_side["mask"][i][1:], trl_side["mask"][i][1:]
      if ma != mb:
        raise SystemExit(f"trained mask differs on record {i + 1}:\n  ftjax {ma}\n  TRL   {mb}")
    if len(ftjax_side["ids"]) != len(trl_side["ids"]):
      raise SystemExit(f"ftjax kept {len(ftjax_side['ids'])} records, TRL {len(trl_side['ids'])}")
    if ftjax_side["trainable"] != trl_side["trainable"]:
      raise SystemExit(f"trainable parameters differ: ftjax {ftjax_side['trainable']}, TRL "
                       f"{trl_side['trainable']}")
    losses.update({f"trl_{k}": v for k, v in trl_side["losses"].items()})
    out["tokens_equal"] = True
  ref = losses["ftjax_unpacked"]
  out["rel_diff"] = {k: abs(v - ref) / abs(ref) for k, v in losses.items()}
  out["max_rel_diff"] = max(out["rel_diff"].values())
  out["ok"] = out["max_rel_diff"] < REL_TOL
  out["trainable_params"] = ftjax_side["trainable"]
  return out


# ---- the parent: processes, rounds, summary ------------------------------------------------

def run_process(cmd: list[str], log_path: str) -> dict:
  """Runs one child to its end: wall seconds (from outside), peak RSS and CPU seconds of that
  child (os.wait4), and the cores other processes kept busy meanwhile."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  with open(log_path, "w") as out:
    busy0, t0 = bench._busy_cores(), time.perf_counter()  # pylint: disable=protected-access
    child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - t0
    busy = bench._busy_cores() - busy0  # pylint: disable=protected-access
  rc = os.waitstatus_to_exitcode(status)
  if rc:
    with open(log_path) as f:
      tail = f.read()[-3000:]
    raise SystemExit(f"failed (exit {rc}): {' '.join(cmd)}\n{tail}")
  cpu = usage.ru_utime + usage.ru_stime
  return {"wall_s": wall, "peak_rss_mib": peak_rss.maxrss_mib(usage.ru_maxrss), "cpu_s": cpu,
          "foreign_cores": max(busy - cpu, 0.0) / wall}


def worker_command(args, kind: str, **flags) -> list[str]:
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--model", args.model,
         "--format", args.format, "--seed", str(args.seed), "--batch", str(args.batch),
         "--seq-len", str(args.seq_len), "--lr", str(args.lr)]
  for k, v in flags.items():
    cmd += [f"--{k}", str(v)]
  return cmd


def run_mode(args, work: str, fw: str, mode: str, size: str, rnd: int) -> dict:
  """One timed run of a mode on the N (`small`) or N + M (`large`) records."""
  data_path = os.path.join(work, f"train_{size}.jsonl")
  tag = f"{fw}-{mode}-{size}-r{rnd}"
  log_path = os.path.join(work, "logs", tag + ".log")
  bench.wait_for_idle(args.wait_idle)
  if fw == "ftjax":
    run_dir, cache = os.path.join(work, "runs", tag), os.path.join(work, "cache", tag)
    steps = args.ftjax_steps[(mode, size)]
    rec = run_process(ftjax_command(args.config_path, data_path, mode, steps, run_dir, cache),
                      log_path)
    rec.update(ftjax_count(run_dir, os.path.join(work, "cache", "parent")))
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
  else:
    out = os.path.join(work, "logs", tag + ".json")
    rec = run_process(worker_command(args, "trl", mode=mode, data=data_path, out=out), log_path)
    with open(out) as f:
      rec.update(json.load(f))
  rec.update(framework=fw, mode=mode, size=size, round=rnd)
  log(f"  {tag}: {rec['wall_s']:.1f} s, {rec['steps']} steps, {rec['tokens']['trained']} trained "
      f"tokens, peak RSS {rec['peak_rss_mib']:.0f} MiB, other load {rec['foreign_cores']:.2f} "
      "cores")
  return rec


def marginals(runs: list[dict], fw: str, mode: str) -> list[dict]:
  """Per round: the seconds and tokens the N + M run took beyond the N run of a mode."""
  out = []
  for rnd in sorted({r["round"] for r in runs}):
    pair = {r["size"]: r for r in runs
            if (r["framework"], r["mode"], r["round"]) == (fw, mode, rnd)}
    if len(pair) == 2:
      secs = pair["large"]["wall_s"] - pair["small"]["wall_s"]
      tokens = pair["large"]["tokens"]["trained"] - pair["small"]["tokens"]["trained"]
      out.append({"seconds": secs, "trained_tokens": tokens,
                  "tokens_per_s": tokens / secs if secs > 0 else None})
  return out


def summarise(runs: list[dict], modes: list[tuple[str, str]], check: dict,
              extra_tokens: int) -> list[dict]:
  """Per mode: medians over rounds of the marginal seconds and trained tokens/s (None where a
  round's marginal time is not positive: start-up noise swamped the extra examples), their
  spread, one epoch of the M extra examples at that rate, peak RSS, the step-0 loss of its
  layout, and ratios to TRL's default and best mode."""
  check_key = {("ftjax", "packing"): "ftjax_packed", ("ftjax", "padded"): "ftjax_unpacked",
               ("trl", "default"): "trl_padded", ("trl", "packing"): "trl_packed",
               ("trl", "padding_free"): "trl_padding_free"}
  rows = []
  for fw, mode in modes:
    marg = marginals(runs, fw, mode)
    mine = [r for r in runs if (r["framework"], r["mode"]) == (fw, mode)]
    if not marg:
      continue
    rates = [x["tokens_per_s"] for x in marg]
    rate = statistics.median(rates) if None not in rates else None
    large = [r for r in mine if r["size"] == "large"]
    own = [r["own_tokens_per_s"] for r in mine if r.get("own_tokens_per_s")]
    packing = next((r.get("packing") for r in mine if "packing" in r), None)
    key = check_key.get((fw, mode.partition("+")[0]))
    if fw == "ftjax" and mode == "default":
      key = "ftjax_packed" if packing else "ftjax_unpacked"
    rows.append({
        "framework": fw, "mode": mode, "trained_tokens_per_s": rate,
        "tokens_per_s_by_round": rates,
        "spread": (max(rates) - min(rates)) / rate if rate and len(rates) > 1 else None,
        "epoch_extra_s": extra_tokens / rate if rate else None,
        "marginal_s": statistics.median(x["seconds"] for x in marg),
        "marginal_trained_tokens": statistics.median(x["trained_tokens"] for x in marg),
        "padding_efficiency": statistics.median(
            r["tokens"]["real"] / r["tokens"]["computed"] for r in large),
        "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in mine),
        "wall_s": {size: statistics.median(r["wall_s"] for r in mine if r["size"] == size)
                   for size in ("small", "large")},
        "steps": {r["size"]: r["steps"] for r in mine},
        "own_tokens_per_s": statistics.median(own) if own else None,
        "first_logged_loss": next((r["first_loss"] for r in mine if r.get("first_loss")), None),
        "step0_loss": check["losses"].get(key) if key else None, "packs": packing,
        "max_foreign_cores": max(r["foreign_cores"] for r in mine)})
    row = rows[-1]
    row["noisy"] = bool(rate is None or row["marginal_s"] < NOISY * row["wall_s"]["small"]
                        or (row["spread"] or 0) > NOISY)
  trl_rows = [r for r in rows if r["framework"] == "trl" and r["trained_tokens_per_s"]
              and not r["noisy"]]
  default = next((r for r in trl_rows if r["mode"] == "default"), None)
  best = max(trl_rows, key=lambda r: r["trained_tokens_per_s"]) if trl_rows else None
  for r in rows:
    rate = r["trained_tokens_per_s"]
    r["vs_trl_default"] = rate / default["trained_tokens_per_s"] if rate and default else None
    r["vs_trl_best"] = rate / best["trained_tokens_per_s"] if rate and best else None
    r["trl_best_mode"] = best["mode"] if best else None
  return rows


def table(rows: list[dict]) -> str:
  f = lambda x, spec: "-" if x is None else format(x, spec)
  lines = ["| framework | mode | trained tok/s | spread | x TRL default | x TRL best "
           "| epoch of M extra, s | marginal s | padding eff. | peak RSS MiB | step-0 loss |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    rate = f(r["trained_tokens_per_s"], ".0f") + " (noisy)" * r["noisy"]
    lines.append(f"| {r['framework']} | {r['mode']} | {rate} | "
                 f"{'-' if r['spread'] is None else format(100 * r['spread'], '.0f') + '%'} | "
                 f"{f(r['vs_trl_default'], '.2f')} | {f(r['vs_trl_best'], '.2f')} | "
                 f"{f(r['epoch_extra_s'], '.1f')} | {r['marginal_s']:.1f} | "
                 f"{r['padding_efficiency']:.2f} | {r['peak_rss_mib']:.0f} | "
                 f"{f(r['step0_loss'], '.6f')} |")
  return "\n".join(lines)


def figure(rows: list[dict], path: str, title: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  left_out = [f"{r['framework']} {r['mode']}" for r in rows if r["noisy"]]
  rows = [r for r in rows if not r["noisy"]]
  fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 4.2))
  names = [r["framework"] + "\n" + r["mode"].replace("+", "\n+") for r in rows]
  values = [r["trained_tokens_per_s"] for r in rows]
  colors = ["tab:blue" if r["framework"] == "ftjax" else "tab:orange" for r in rows]
  bars = ax.bar(names, values, color=colors)
  for bar, r in zip(bars, rows):
    note = f"{r['trained_tokens_per_s']:.0f}"
    if r["vs_trl_default"] is not None:
      note += f"\n{r['vs_trl_default']:.2f}x"
    ax.annotate(note, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                va="bottom", fontsize=8)
  ax.set_ylabel("trained tokens / s (marginal epoch)")
  note = "blue: ftjax, orange: TRL SFTTrainer; labels: tok/s, x TRL default"
  if left_out:
    note += f"; noisy, left out: {', '.join(left_out)}"
  ax.set_title(title.replace(", fp32, ", ", fp32,\n") + "\n" + note, fontsize=8)
  ax.margins(y=0.2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def all_modes(args) -> list[tuple[str, str]]:
  if args.modes:
    return [tuple(m.split(":", 1)) for m in args.modes.split(",")]
  gc = {"on": [""], "off": ["+nogc"], "both": ["", "+nogc"]}[args.trl_gc]
  trl_modes = [m + g for g in gc for m in TRL_MODES]
  return [("ftjax", m) for m in FTJAX_MODES] + [("trl", m) for m in trl_modes]


def prepare_data(args, work: str) -> dict:
  """Writes the small (N) and large (N + M) record files; their length statistics."""
  from ftjax import data, hf  # pylint: disable=import-outside-toplevel
  from ftjax.config import DataConfig  # pylint: disable=import-outside-toplevel

  tok = hf.load_tokenizer(args.model)
  records, info = make_records(args.examples + args.extra, args, tok)
  write_jsonl(os.path.join(work, "train_small.jsonl"), records[:args.examples])
  write_jsonl(os.path.join(work, "train_large.jsonl"), records)
  examples = data.tokenize(records, DataConfig(format=args.format, seq_len=args.seq_len), tok,
                           "records")
  texts = [(r["prompt"], r["completion"]) if "prompt" in r else
           (r["messages"][0]["content"], r["messages"][1]["content"]) for r in records]
  count = lambda xs: [len(ids) for ids in tok(xs, add_special_tokens=False)["input_ids"]]
  trained = [int(ex.loss_mask[1:].sum()) for ex in examples]
  return {"source": ALPACA_SOURCE, "format": args.format, "records": len(records),
          "examples": args.examples, "extra": args.extra, "seq_len": args.seq_len,
          "target": {"prompt": {**quantiles_of_table(ALPACA_PROMPT),
                                "mean": ALPACA_MEAN["prompt"]},
                     "completion": {**quantiles_of_table(ALPACA_COMPLETION),
                                    "mean": ALPACA_MEAN["completion"]},
                     "rho": ALPACA_RHO},
          "realised": {"prompt": quantiles(count([p for p, _ in texts])),
                       "completion": quantiles(count([c for _, c in texts])),
                       "trained": quantiles(trained),
                       "sequence": quantiles([len(ex.tokens) for ex in examples])},
          "realised_note": "prompt, completion: each text tokenised alone; trained, sequence: "
                           "ftjax.data's tokenisation of the records (with the EOS; chat: with "
                           "the chat template)",
          "trained_tokens_extra": int(sum(trained[args.examples:])), **info}


def quantiles_of_table(table_: list) -> dict:
  return {f"p{q}": float(np.interp(q, ALPACA_LEVELS, table_)) for q in (10, 50, 90)}


def main() -> int:
  args = parse()
  if args.worker:
    work = {"trl": trl_worker, "check-trl": check_trl, "check-ftjax": check_ftjax}[args.worker]
    result = work(args)
    with open(args.out, "w") as f:
      json.dump(result, f)
    return 0
  if not os.path.isfile(os.path.join(args.model, "config.json")):
    raise SystemExit(f"{args.model}: no model; prepare it with `python -m ftjax.prepare smollm2 "
                     "--out models/smollm2-135m-instruct`")
  work = args.workdir or tempfile.mkdtemp(prefix="bench-sft-")
  os.makedirs(os.path.join(work, "logs"), exist_ok=True)
  try:
    return _run(args, work)
  finally:
    if not args.workdir:
      shutil.rmtree(work, ignore_errors=True)


def _run(args, work: str) -> int:
  env = bench.environment()
  from importlib.metadata import version  # pylint: disable=import-outside-toplevel
  env["trl"] = version("trl")
  log(f"data: {args.examples} + {args.extra} {args.format} records in {work}")
  described = prepare_data(args, work)
  args.config_path = os.path.join(work, "ftjax.yaml")
  ftjax_yaml(args, args.config_path)
  modes = all_modes(args)

  log("equal loss on the first batch (step 0)")
  sides = {}
  for kind in ("check-ftjax", "check-trl"):
    out = os.path.join(work, "logs", kind + ".json")
    run_process(worker_command(args, kind, data=os.path.join(work, "train_small.jsonl"),
                               config=args.config_path, out=out),
                os.path.join(work, "logs", kind + ".log"))
    with open(out) as f:
      sides[kind] = json.load(f)
  check = compare(sides["check-ftjax"], sides["check-trl"])
  log("  " + ", ".join(f"{k} {v:.6f}" for k, v in check["losses"].items())
      + f"; max relative difference {check['max_rel_diff']:.2e}"
      + (f"; TRL skipped: {check['trl_skipped']}" if "trl_skipped" in check else ""))
  if "trl_skipped" in check:
    modes = [m for m in modes if m[0] != "trl"]

  args.ftjax_steps = {}
  for fw, mode in modes:
    if fw == "ftjax":
      for size in ("small", "large"):
        args.ftjax_steps[(mode, size)] = ftjax_plan(
            args, args.config_path, [f"data.train=[{os.path.join(work, f'train_{size}.jsonl')}]"]
            + FTJAX_MODES[mode], os.path.join(work, "cache", "parent"))
  runs = []
  for rnd in range(args.rounds):
    order = modes if rnd % 2 == 0 else sorted(modes, key=lambda m: m[0] != "trl")
    for fw, mode in order:
      for size in ("small", "large"):
        runs.append(run_mode(args, work, fw, mode, size, rnd))
  rows = summarise(runs, modes, check, described["trained_tokens_extra"])
  title = (f"SmolLM2-135M LoRA r16, {args.format}, Alpaca-shaped lengths, batch {args.batch} x "
           f"{args.seq_len}, fp32, {env['cpu']} ({env['cores']} cores)")
  print(title)
  print(f"data: {described['source']}")
  for part in ("prompt", "completion"):
    t, r = described["target"][part], described["realised"][part]
    print(f"  {part}: target p10/p50/p90/mean {t['p10']:.0f}/{t['p50']:.0f}/{t['p90']:.0f}/"
          f"{t['mean']:.1f}, realised {r['p10']:.0f}/{r['p50']:.0f}/{r['p90']:.0f}/{r['mean']:.1f}")
  print(f"step-0 loss on the first {check['rows']} records: " + ", ".join(
      f"{k} {v:.6f}" for k, v in check["losses"].items())
      + f" (max relative difference {check['max_rel_diff']:.1e})")
  if "trl_skipped" in check:
    print(f"TRL skipped: {check['trl_skipped']}")
  print(table(rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"environment": env, "command": " ".join([sys.executable] + sys.argv),
                 "settings": {"model": os.path.relpath(args.model, ROOT), "lora": {
                     "r": 16, "alpha": 32, "dropout": 0.0, "targets": LORA_TARGETS},
                     "optimizer": f"AdamW lr {args.lr}, constant, no warmup, weight decay 0, "
                                  "clip norm 1.0", "batch": args.batch, "seq_len": args.seq_len,
                     "dtype": "fp32", "rounds": args.rounds, "seed": args.seed},
                 "data": described, "equal_loss": check, "summary": rows, "runs": runs},
                f, indent=1)
    log(f"wrote {args.json}")
  if args.figure and rows:
    figure(rows, args.figure, title)
    log(f"wrote {args.figure}")
  if not check["ok"]:
    log(f"step-0 losses differ by {check['max_rel_diff']:.2e} relative (> {REL_TOL})")
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
