"""The typed config schema: dataclasses, YAML loading, dotted overrides, validation.

A config is data: every key has a type and a default here, and anything else (an unknown key,
a wrong type, a value outside its choices) is a `UserError` naming the key and the file before
any work starts. Overrides on the command line are `key.sub=value` words whose values are parsed
as YAML scalars (`train.steps=20`, `optim.lr=3e-4`, `data.packing=true`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import types
import typing
from typing import Any, Literal, Optional, Union

import yaml

# peft.adapters names: path components of their parameters (`.../q_proj/<NAME>/lora_a`), so
# not a leaf name a dense layer already has.
ADAPTER_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
RESERVED_NAMES = ("bias", "embedding", "kernel", "lora_a", "lora_b", "lora_magnitude", "scale")


class UserError(Exception):
  """Bad input from the user. The CLIs print it as one line and exit with status 2."""


@dataclasses.dataclass
class ModelConfig:
  path: str = ""  # a local HF model directory (config.json, *.safetensors, tokenizer files)
  # auto: cuDNN's fused flash attention on GPUs in bf16/fp16 when rows are unpacked, else xla
  attention: Literal["auto", "xla", "cudnn"] = "auto"
  # Vocabulary extension (ftjax/vocab.py): tokens the tokenizer gains (special ones are never
  # split and are dropped by skip_special_tokens). A token the tokenizer already has is not
  # new: it is logged and skipped. Rows for new tokens are found by token id.
  add_tokens: list[str] = dataclasses.field(default_factory=list)
  add_special_tokens: list[str] = dataclasses.field(default_factory=list)
  # mean: the mean of the original tokenizer's rows; mean_noise: plus N(0, 1/hidden) noise
  # from train.seed; description: the mean of the rows of model.token_descriptions[token]
  new_token_init: Literal["mean", "mean_noise", "description"] = "mean"
  token_descriptions: Optional[dict[str, str]] = None  # {token: text} for init: description


@dataclasses.dataclass
class LoraConfig:
  targets: list[str] = dataclasses.field(default_factory=lambda: ["q_proj", "v_proj"])
  r: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r
  dora: bool = False  # weight-decomposed LoRA (a trained magnitude per output feature)


@dataclasses.dataclass
class NamedLoraConfig(LoraConfig):
  """One of `peft.adapters`: a LoRA (or DoRA) adapter of its own over the shared base."""

  method: Literal["lora", "dora"] = "lora"  # dora: the same as dora: true


@dataclasses.dataclass
class AdapterConfig:
  size: int = 64  # bottleneck width
  positions: list[Literal["attn", "ffn"]] = dataclasses.field(
      default_factory=lambda: ["attn", "ffn"])  # both: Houlsby; ffn only: Pfeiffer
  activation: Literal["relu", "gelu", "silu", "tanh"] = "relu"


@dataclasses.dataclass
class PrefixConfig:
  length: int = 16  # virtual key/value positions per layer
  projection: bool = True  # train through the MLP reparameterisation
  projection_hidden: int = 0  # 0: the model's hidden size


@dataclasses.dataclass
class PromptConfig:
  length: int = 16  # soft tokens
  init: Literal["vocab", "random", "text"] = "vocab"
  init_text: str = ""  # for init: text (its token embeddings, repeated to `length`)


@dataclasses.dataclass
class IA3Config:
  # Dense layers whose activations get a trained (IA)³ vector (regexes; all-linear: every one
  # but the heads). The defaults are HF PEFT's for Llama-style models.
  targets: list[str] = dataclasses.field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])
  # Targets whose input is rescaled instead of their output (the feed-forward layers).
  feedforward: list[str] = dataclasses.field(default_factory=lambda: ["down_proj"])


@dataclasses.dataclass
class PeftConfig:
  method: Literal["none", "lora", "adapter", "prefix", "prompt", "ia3"] = "none"
  trainable: list[str] = dataclasses.field(default_factory=list)  # base params to train (regex)
  frozen: list[str] = dataclasses.field(default_factory=list)  # params to freeze (regex)
  base_dtype: Literal["fp32", "bf16"] = "fp32"  # storage of frozen base weights
  # QLoRA: the frozen kernels of the dense layers (not the heads) stored quantised as
  # bitsandbytes stores them, dequantised inside each layer for its matmul.
  base_quant: Literal["none", "nf4", "int8"] = "none"
  base_quant_double: Optional[bool] = None  # nf4's double quantisation (default: on for nf4)
  # Also quantise the frozen token embedding and output head (bitsandbytes' Embedding4bit
  # layout). Off by default: bitsandbytes-4bit models in transformers keep them unquantised, so
  # an adapter trained over quantised embeddings sees other weights than it is served with.
  base_quant_embeddings: bool = False
  init_from: str = ""  # an HF PEFT adapter directory to start from
  # With model.add_tokens: when the embedding table (or an untied head) is frozen, the new
  # tokens' rows still train, as their own small leaves (PEFT's trainable_token_indices).
  # On by default: a new token whose row never trains stays the mean of the vocabulary, which
  # the model can neither read nor produce (the known trap of adding tokens under LoRA).
  train_new_tokens: bool = True
  lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
  adapter: AdapterConfig = dataclasses.field(default_factory=AdapterConfig)
  prefix: PrefixConfig = dataclasses.field(default_factory=PrefixConfig)
  prompt: PromptConfig = dataclasses.field(default_factory=PromptConfig)
  ia3: IA3Config = dataclasses.field(default_factory=IA3Config)
  # Several named adapters over one frozen base ({NAME: {r, alpha, targets, dora, ...}}, each
  # with peft.lora's defaults, not its values), trained together with data.train {NAME: FILES}:
  # each row of a batch applies its own task's adapter (ftjax/peft/multi.py).
  adapters: Optional[dict[str, NamedLoraConfig]] = None


@dataclasses.dataclass
class MixSource:
  train: list[str] = dataclasses.field(default_factory=list)  # files or globs
  weight: float = 1.0  # copies of the source per epoch (0.5: a seeded half; 2: each twice)


@dataclasses.dataclass
class DataConfig:
  # Local jsonl/json/csv/parquet/txt files, globs, or saved datasets directories (one or a list);
  # or tasks {NAME: FILES, ...}, one per adapter of peft.adapters, each row with its task's.
  train: Union[list[str], dict[str, list[str]]] = dataclasses.field(default_factory=list)
  # Tasks: each task's share of an epoch's rows (relative; default: proportional to its rows).
  task_weights: Optional[dict[str, float]] = None
  # Tasks: mixed (rows of any tasks in one batch) | single (each batch holds one task's rows).
  task_batches: Literal["mixed", "single"] = "mixed"
  # Held-out files of the same format: a list (one eval set, `eval_loss`), or named sets
  # {NAME: FILES, ...}, each logged as `eval_<NAME>_loss` / `eval_<NAME>_ppl` (the first named
  # set also as `eval_loss`, which early stopping watches).
  eval: Union[list[str], dict[str, list[str]]] = dataclasses.field(default_factory=list)
  # Replay / mixing: more train sources, each repeated `weight` times per epoch (a fraction
  # takes a seeded subset), added to data.train (which counts with weight 1).
  mix: list[MixSource] = dataclasses.field(default_factory=list)
  eval_fraction: float = 0.0  # without data.eval: hold out this fraction of data.train's records
  split_seed: int = 0  # which records data.eval_fraction holds out
  # preference: pairs of completions, {prompt, chosen, rejected} (strings, or messages)
  format: Literal["text", "prompt_completion", "chat", "classification", "preference"] = "text"
  text_field: str = "text"
  prompt_field: str = "prompt"
  completion_field: str = "completion"
  messages_field: str = "messages"  # chat: a list of {role, content}
  label_field: str = "label"  # classification: a label name or an integer id
  labels: list[str] = dataclasses.field(default_factory=list)  # classification: names by id
  assistant_turns: Literal["all", "last"] = "all"  # chat: which assistant turns are trained
  seq_len: int = 512
  truncation: Literal["truncate", "drop", "error"] = "truncate"
  add_eos: bool = True
  # Several examples per row, attention and loss kept apart (exact). auto: packs the causal-LM
  # formats (text, prompt_completion, chat), except under prompt tuning and where attention is
  # cuDNN's flash kernel, which needs one example per row (GPUs in half precision).
  packing: Union[bool, Literal["auto"]] = "auto"
  buckets: int = 4  # pad each batch to the shortest of seq_len, seq_len/2, ... (this many)
  on_error: Literal["error", "skip"] = "error"  # a bad record stops the run, or is skipped
  num_proc: int = 0  # tokenising processes; 0: all cores for large files
  cache_dir: str = ""  # tokenised data cache; "": the datasets cache directory


@dataclasses.dataclass
class LrGroup:
  pattern: str = ""  # a regex over parameter paths; the first group that matches a leaf wins
  lr: float = 0.0  # its peak learning rate (the schedule's shape is shared)


@dataclasses.dataclass
class OptimConfig:
  name: Literal["adamw", "adam", "lion", "sgd", "adafactor"] = "adamw"
  lr: float = 1e-4
  schedule: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
  warmup_steps: int = 0
  min_lr_ratio: float = 0.0  # the schedule ends at lr * min_lr_ratio
  decay_fraction: float = 0.2  # wsd: the last fraction of steps that decays (linearly)
  weight_decay: float = 0.0  # decoupled (adam: L2 added to the gradient, as torch.optim.Adam)
  # Leaves whose path matches one of these regexes get no weight decay; by default biases, norm
  # scales and embedding tables (soft prompts included), by leaf name in every family.
  no_decay: list[str] = dataclasses.field(
      default_factory=lambda: [r"bias$", r"scale$", r"embedding$"])
  b1: float = 0.9  # adam/adamw/lion
  b2: float = 0.999  # adam/adamw/lion (Lion's paper uses 0.99)
  eps: float = 1e-8
  momentum: float = 0.0  # sgd
  nesterov: bool = False  # sgd
  clip_norm: float = 1.0  # 0 turns clipping off
  lr_groups: list[LrGroup] = dataclasses.field(default_factory=list)  # per-group peak lr
  layer_decay: float = 1.0  # layer-wise lr decay: layer i of n gets lr * layer_decay^(n - i)
  loraplus_ratio: float = 0.0  # LoRA+: lora_b learns this many times faster (0: off)


@dataclasses.dataclass
class PrecisionConfig:
  # auto = bf16 on GPU/TPU, fp32 on CPU (where XLA upcasts bf16 matmuls and gains no speed).
  compute: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
  loss_scale: float = 32768.0  # fp16: the initial dynamic loss scale
  loss_scale_period: int = 1000  # fp16: finite steps before the scale doubles


@dataclasses.dataclass
class TrainConfig:
  steps: int = 100
  epochs: float = 0.0  # > 0: train this many epochs of data.train instead of train.steps
  batch_size: int = 8  # sequences per optimizer step (all micro-batches together)
  grad_accum: int = 1  # micro-batches per step; batch_size must divide by it
  remat: Literal["none", "full", "dots"] = "none"  # recompute layer activations in backward
  # LM loss in chunks of this many tokens, each chunk's logits recomputed in the backward pass
  # (0: about 64 MB of fp32 logits per chunk on CPU, 512 MB on GPU; -1: whole-batch logits)
  loss_chunk: int = 0
  max_bad_steps: int = 10  # stop after this many consecutive steps with non-finite gradients
  seed: int = 0
  output_dir: str = "runs/default"
  log_every: int = 1
  stop_after: int = 0  # end this invocation after this step, checkpointed (a time slice)


@dataclasses.dataclass
class EvalConfig:
  every: int = 0  # 0: evaluate only at the start and at the end
  batch_size: int = 8
  max_examples: int = 0  # 0: the whole eval set
  samples: int = 0  # greedy generations printed for this many eval prompts
  max_new_tokens: int = 32
  patience: int = 0  # early stopping: evals without improvement before stopping (0: off)
  min_delta: float = 0.0  # early stopping: the eval loss must fall by more than this


@dataclasses.dataclass
class CheckpointConfig:
  every: int = 0  # 0: only at the end
  keep: int = 2


@dataclasses.dataclass
class DistillConfig:
  teacher: str = ""  # an HF model directory sharing the student's tokenizer ("": no distillation)
  temperature: float = 2.0
  alpha: float = 0.5  # loss = alpha * CE + (1 - alpha) * T^2 * KL(teacher || student)


@dataclasses.dataclass
class PreferenceConfig:
  """Preference tuning (data.format: preference); each loss as TRL defines it (ftjax.preference)."""

  # sigmoid (DPO), ipo, hinge, robust (label-smoothed cDPO), simpo and orpo (reference-free)
  loss: Literal["sigmoid", "ipo", "hinge", "robust", "simpo", "orpo"] = "sigmoid"
  beta: float = 0.1
  label_smoothing: float = 0.0  # robust and simpo: the assumed fraction of flipped labels
  simpo_gamma: float = 0.5  # simpo: the target reward margin
  orpo_lambda: float = 0.1  # orpo: the weight of the odds-ratio term beside the chosen NLL
  # base: the starting model with the PEFT method off; initial: a frozen copy of the starting
  # trainable parameters; precomputed: one pass before training, kept in the run directory;
  # none: reference-free losses. "": none for simpo/orpo, else base where it is exact, else
  # initial.
  reference: Literal["", "base", "initial", "precomputed", "none"] = ""


@dataclasses.dataclass
class MeshConfig:
  # Devices per mesh axis; -1: the devices left. data x fsdp x tensor must divide the devices.
  data: int = 1  # batch split, parameters replicated
  fsdp: int = 1  # batch split, parameters (and optimizer state) split along their embed axis
  tensor: int = 1  # heads, FFN width and vocabulary split


@dataclasses.dataclass
class DistributedConfig:
  # Multi-process runs: jax.distributed starts when num_processes > 1, or by itself under a
  # cluster it recognises (SLURM, Open MPI, ...) when `auto` is true.
  coordinator: str = ""  # host:port of process 0
  num_processes: int = 1
  process_id: int = -1  # -1: from the cluster environment
  auto: bool = True
  timeout_s: int = 300  # how long to wait for the coordinator and the other processes


@dataclasses.dataclass
class PartitionRule:
  """One rule of `partition.rules`: a selector (all given parts must hold; none: every leaf) and
  the settings it decides for the leaves it selects (unset: a later rule decides)."""

  pattern: str = ""  # a regex over parameter paths (re.search)
  layers: Union[str, int] = ""  # decoder layer indices and ranges, "0-3,10" (or one index)
  kind: Literal["", "attention", "mlp", "norm", "embedding", "head"] = ""  # per model family
  train: Optional[bool] = None
  lr: Optional[float] = None  # a multiplier of optim.lr (and of the schedule)
  weight_decay: Optional[float] = None  # this group's decoupled decay (0: none)


@dataclasses.dataclass
class LisaConfig:
  layers: int = 0  # LISA: k decoder layers train in each window (0: off)
  every: int = 0  # window length in steps


@dataclasses.dataclass
class SparseConfig:
  density: float = 0.0  # train only this fraction of each selected tensor's entries (0: off)
  score: Literal["grad2", "fisher"] = "grad2"  # importance: squared batch gradients | Fisher
  warmup_steps: int = 1  # train batches scored (without updates) before training starts


@dataclasses.dataclass
class PartitionConfig:
  # Ordered rules, first match wins per setting; peft.trainable / peft.frozen /
  # optim.lr_groups / optim.no_decay follow them as more rules (see ftjax.partition).
  rules: list[PartitionRule] = dataclasses.field(default_factory=list)
  lisa: LisaConfig = dataclasses.field(default_factory=LisaConfig)
  sparse: SparseConfig = dataclasses.field(default_factory=SparseConfig)


@dataclasses.dataclass
class EwcConfig:
  lam: float = dataclasses.field(default=0.0, metadata={"key": "lambda"})  # 0: off
  data: list[str] = dataclasses.field(default_factory=list)  # the data the Fisher is taken over
  max_examples: int = 0  # 0: every example of regularize.ewc.data


@dataclasses.dataclass
class RegularizeConfig:
  l2sp: float = 0.0  # lambda of lambda/2 |theta - theta_0|^2 over decayed leaves (0: off)
  ewc: EwcConfig = dataclasses.field(default_factory=EwcConfig)


@dataclasses.dataclass
class Config:
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  peft: PeftConfig = dataclasses.field(default_factory=PeftConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
  precision: PrecisionConfig = dataclasses.field(default_factory=PrecisionConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
  checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
  distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)
  preference: PreferenceConfig = dataclasses.field(default_factory=PreferenceConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
  partition: PartitionConfig = dataclasses.field(default_factory=PartitionConfig)
  regularize: RegularizeConfig = dataclasses.field(default_factory=RegularizeConfig)


def _type_name(tp: Any) -> str:
  if typing.get_origin(tp) is Literal:
    return " | ".join(str(a) for a in typing.get_args(tp))
  return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
  """Checks `value` against the annotation `tp`; returns it (ints widen to floats)."""
  origin = typing.get_origin(tp)
  if origin is Literal:
    if value not in typing.get_args(tp):
      raise UserError(f"{key}: {value!r} is not one of {_type_name(tp)}")
    return value
  if origin in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if value is None and len(args) < len(typing.get_args(tp)):
      return None
    if isinstance(value, dict):  # a mapping takes the dict form, if there is one
      args = [a for a in args if typing.get_origin(a) is dict] or args
    else:
      args = [a for a in args if typing.get_origin(a) is not dict] or args
    for arg in args[:-1]:  # the first form the value fits
      try:
        return _coerce(value, arg, key)
      except UserError:
        pass
    return _coerce(value, args[-1], key)
  if origin is dict:
    if not isinstance(value, dict) or not value:
      raise UserError(f"{key}: expected a mapping of names, got {value!r}")
    _, item = typing.get_args(tp)
    return {str(k): _coerce(v, item, f"{key}.{k}") for k, v in value.items()}
  if origin is list:
    if isinstance(value, str):  # a single item stands for a list of one ("" for none)
      value = [value] if value else []
    if not isinstance(value, list):
      raise UserError(f"{key}: expected a list, got {value!r}")
    (item,) = typing.get_args(tp)
    return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
  if dataclasses.is_dataclass(tp):
    return _build(tp, value, key)
  if tp is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if tp is float and isinstance(value, str):
    try:  # YAML 1.1 reads "3e-4" as a string; accept it as the float it clearly is.
      value = float(value)
    except ValueError:
      pass
  if tp is float and isinstance(value, float) and not math.isfinite(value):
    raise UserError(f"{key}: expected a finite float, got {value!r}")
  if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
    raise UserError(f"{key}: expected {_type_name(tp)}, got {value!r}")
  return value


def _build(cls: type, data: Any, prefix: str) -> Any:
  if not isinstance(data, dict):
    raise UserError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
  hints = typing.get_type_hints(cls)
  names = {_key(f) for f in dataclasses.fields(cls)}
  for key in data:
    if key not in names:
      where = f"{prefix}.{key}" if prefix else str(key)
      close = difflib.get_close_matches(str(key), names, n=1)
      hint = f"did you mean '{close[0]}'? " if close else ""
      raise UserError(f"unknown key '{where}' ({hint}known: {', '.join(sorted(names))})")
  kwargs = {}
  for f in dataclasses.fields(cls):
    if _key(f) not in data:
      continue
    key = f"{prefix}.{_key(f)}" if prefix else _key(f)
    tp, value = hints[f.name], data[_key(f)]
    if dataclasses.is_dataclass(tp):
      kwargs[f.name] = _build(tp, {} if value is None else value, key)
    else:
      kwargs[f.name] = _coerce(value, tp, key)
  return cls(**kwargs)


def _key(f: dataclasses.Field) -> str:
  """A field's config key: its name, or `metadata["key"]` where the key is a Python keyword."""
  return f.metadata.get("key", f.name)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
  *parents, leaf = dotted.split(".")
  node = tree
  for p in parents:
    node = node.setdefault(p, {})
    if not isinstance(node, dict):
      raise UserError(f"override {dotted}: '{p}' is not a section")
  node[leaf] = value


def _validate(cfg: Config) -> None:
  checks = [
      (cfg.train.steps > 0, "train.steps must be > 0"),
      (cfg.train.batch_size > 0, "train.batch_size must be > 0"),
      (cfg.train.grad_accum > 0, "train.grad_accum must be > 0"),
      (cfg.train.batch_size % cfg.train.grad_accum == 0,
       f"train.batch_size ({cfg.train.batch_size}) must divide by train.grad_accum "
       f"({cfg.train.grad_accum})"),
      (cfg.train.log_every > 0, "train.log_every must be > 0"),
      (cfg.train.stop_after >= 0, "train.stop_after must be >= 0"),
      (cfg.data.seq_len >= 2, "data.seq_len must be >= 2"),
      (cfg.optim.lr > 0, "optim.lr must be > 0"),
      (0 <= cfg.optim.b1 < 1 and 0 <= cfg.optim.b2 < 1, "optim.b1 and optim.b2 must be in [0, 1)"),
      (cfg.optim.eps > 0, "optim.eps must be > 0"),
      (0 <= cfg.optim.momentum < 1, "optim.momentum must be in [0, 1)"),
      (0 < cfg.optim.decay_fraction <= 1, "optim.decay_fraction must be in (0, 1]"),
      (0 < cfg.optim.layer_decay <= 1, "optim.layer_decay must be in (0, 1]"),
      (cfg.optim.loraplus_ratio >= 0, "optim.loraplus_ratio must be >= 0"),
      (all(g.pattern and g.lr > 0 for g in cfg.optim.lr_groups),
       "optim.lr_groups: each group needs a pattern and an lr > 0"),
      (cfg.precision.loss_scale >= 1, "precision.loss_scale must be >= 1"),
      (cfg.precision.loss_scale_period >= 1, "precision.loss_scale_period must be >= 1"),
      (cfg.train.epochs >= 0, "train.epochs must be >= 0"),
      (cfg.train.max_bad_steps >= 1, "train.max_bad_steps must be >= 1"),
      (cfg.eval.patience >= 0, "eval.patience must be >= 0"),
      (cfg.eval.min_delta >= 0, "eval.min_delta must be >= 0"),
      (cfg.distill.temperature > 0, "distill.temperature must be > 0"),
      (0 <= cfg.distill.alpha <= 1, "distill.alpha must be in [0, 1]"),
      (cfg.distributed.num_processes >= 1, "distributed.num_processes must be >= 1"),
      (cfg.distributed.timeout_s >= 1, "distributed.timeout_s must be >= 1"),
      (cfg.train.seed >= 0, "train.seed must be >= 0"),
      (cfg.partition.lisa.layers >= 0, "partition.lisa.layers must be >= 0"),
      (not cfg.partition.lisa.layers or cfg.partition.lisa.every >= 1,
       "partition.lisa.every must be >= 1 with partition.lisa.layers"),
      (0.0 <= cfg.partition.sparse.density <= 1.0, "partition.sparse.density must be in [0, 1]"),
      (cfg.partition.sparse.warmup_steps >= 1, "partition.sparse.warmup_steps must be >= 1"),
      (not (cfg.partition.lisa.layers and cfg.partition.sparse.density),
       "partition.lisa and partition.sparse cannot be combined"),
      (all(r.lr is None or r.lr >= 0 for r in cfg.partition.rules),
       "partition.rules: lr multipliers must be >= 0"),
      (all(r.weight_decay is None or r.weight_decay >= 0 for r in cfg.partition.rules),
       "partition.rules: weight_decay must be >= 0"),
      (all(r.train is not None or r.lr is not None or r.weight_decay is not None
           for r in cfg.partition.rules),
       "partition.rules: each rule must set train, lr or weight_decay"),
      (cfg.regularize.l2sp >= 0, "regularize.l2sp must be >= 0"),
      (cfg.regularize.ewc.lam >= 0, "regularize.ewc.lambda must be >= 0"),
      (not cfg.regularize.ewc.lam or bool(cfg.regularize.ewc.data),
       "regularize.ewc.lambda needs regularize.ewc.data (the data of the Fisher)"),
      (cfg.regularize.ewc.max_examples >= 0, "regularize.ewc.max_examples must be >= 0"),
      (all(m.train and m.weight >= 0 for m in cfg.data.mix),
       "data.mix: each source needs train files and a weight >= 0"),
      (cfg.eval.samples >= 0, "eval.samples must be >= 0"),
      (cfg.eval.max_examples >= 0, "eval.max_examples must be >= 0"),
      (cfg.eval.max_new_tokens >= 1, "eval.max_new_tokens must be >= 1"),
      (cfg.optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0"),
      (0.0 <= cfg.optim.min_lr_ratio <= 1.0, "optim.min_lr_ratio must be in [0, 1]"),
      (cfg.optim.weight_decay >= 0, "optim.weight_decay must be >= 0"),
      (cfg.optim.clip_norm >= 0, "optim.clip_norm must be >= 0"),
      (cfg.eval.every >= 0, "eval.every must be >= 0"),
      (cfg.eval.batch_size > 0, "eval.batch_size must be > 0"),
      (cfg.checkpoint.every >= 0, "checkpoint.every must be >= 0"),
      (cfg.checkpoint.keep > 0, "checkpoint.keep must be > 0"),
      (not (cfg.peft.base_quant != "nf4" and cfg.peft.base_quant_double),
       "peft.base_quant_double applies to peft.base_quant nf4 only"),
      (not (cfg.peft.base_quant == "none" and cfg.peft.base_quant_embeddings),
       "peft.base_quant_embeddings needs peft.base_quant nf4 or int8"),
      (not (cfg.peft.base_quant_embeddings and (cfg.model.add_tokens or
                                                cfg.model.add_special_tokens)),
       "peft.base_quant_embeddings cannot be combined with model.add_tokens / "
       "add_special_tokens (new rows start from the unquantised table)"),
      (cfg.peft.lora.r > 0, "peft.lora.r must be > 0"),
      (cfg.peft.lora.alpha > 0, "peft.lora.alpha must be > 0"),
      (0 <= cfg.peft.lora.dropout < 1, "peft.lora.dropout must be in [0, 1)"),
      (bool(cfg.peft.lora.targets), "peft.lora.targets must name at least one pattern"),
      (bool(cfg.peft.ia3.targets), "peft.ia3.targets must name at least one pattern"),
      (cfg.peft.adapter.size > 0, "peft.adapter.size must be > 0"),
      (bool(cfg.peft.adapter.positions), "peft.adapter.positions must name attn and/or ffn"),
      (cfg.peft.prefix.length > 0, "peft.prefix.length must be > 0"),
      (cfg.peft.prefix.projection_hidden >= 0, "peft.prefix.projection_hidden must be >= 0"),
      (cfg.peft.prompt.length > 0, "peft.prompt.length must be > 0"),
      (cfg.peft.prompt.init != "text" or bool(cfg.peft.prompt.init_text),
       "peft.prompt.init: text needs peft.prompt.init_text"),
      (bool(cfg.model.path), "model.path is required"),
      (bool(cfg.data.train) or bool(cfg.data.mix), "data.train is required"),
      (0.0 <= cfg.data.eval_fraction < 1.0, "data.eval_fraction must be in [0, 1)"),
      (not (cfg.data.eval and cfg.data.eval_fraction),
       "set data.eval or data.eval_fraction, not both"),
      (cfg.data.buckets >= 1, "data.buckets must be >= 1"),
      (cfg.data.num_proc >= 0, "data.num_proc must be >= 0"),
      (not (cfg.data.packing is True and cfg.model.attention == "cudnn"),
       "model.attention cudnn needs one example per row (data.packing false); use auto or xla"),
      (not (cfg.data.packing is True and cfg.data.format == "classification"),
       "data.packing is for language-model formats, not classification"),
      (not (cfg.data.packing is True and cfg.data.format == "preference"),
       "data.packing cannot be used with data.format preference (a pair's chosen and rejected "
       "sequences are rows side by side, one example each)"),
      (cfg.preference.beta > 0, "preference.beta must be > 0"),
      (0 <= cfg.preference.label_smoothing < 0.5, "preference.label_smoothing must be in [0, 0.5)"),
      (not cfg.preference.label_smoothing or cfg.preference.loss in ("robust", "simpo"),
       f"preference.label_smoothing is used by losses robust and simpo only, not "
       f"{cfg.preference.loss} (TRL ignores it there)"),
      (cfg.preference.orpo_lambda >= 0, "preference.orpo_lambda must be >= 0"),
      (cfg.preference.loss not in ("simpo", "orpo") or cfg.preference.reference in ("", "none"),
       f"preference.loss {cfg.preference.loss} is reference-free: preference.reference must be "
       f"none (or unset), not {cfg.preference.reference}"),
      (cfg.preference.loss in ("simpo", "orpo") or cfg.preference.reference != "none",
       f"preference.loss {cfg.preference.loss} compares with a reference model: "
       "preference.reference must be base, initial or precomputed"),
      (not (cfg.data.format == "preference" and cfg.distill.teacher),
       "distill.teacher and data.format preference cannot be combined"),
      (not (cfg.data.format == "preference" and
            (cfg.regularize.ewc.lam or cfg.partition.sparse.density)),
       "regularize.ewc and partition.sparse score gradients of the SFT loss; they cannot be "
       "combined with data.format preference"),
      (not (cfg.data.packing is True and cfg.peft.method == "prompt"),
       "data.packing cannot be used with peft.method prompt (soft tokens are prepended per row, "
       "not per example)"),
  ]
  for ok, message in checks:
    if not ok:
      raise UserError(message)
  _validate_tokens(cfg.model)
  _validate_tasks(cfg)


def check_adapter_name(name: str, what: str) -> None:
  """An adapter name is a path component of its parameters (`.../q_proj/<NAME>/lora_a`)."""
  if not ADAPTER_NAME.match(name) or name in RESERVED_NAMES:
    raise UserError(f"{what}: an adapter name is letters, digits, '_' or '-', starting with a "
                    f"letter, and not one of {', '.join(RESERVED_NAMES)}")


LM_FORMATS = ("text", "prompt_completion", "chat")


def packing(cfg: Config) -> bool:
  """`data.packing` resolved (see DataConfig): auto packs unless the format or method would
  change under packing, or `model.attention` resolves to cuDNN's kernel for unpacked rows (which
  reads the JAX backend: call it after `jax.distributed` has started). A model that soft-caps
  attention scores (Gemma 2) never runs cuDNN's kernel, so it packs."""
  d = cfg.data
  if d.packing != "auto":
    return d.packing
  if d.format not in LM_FORMATS or cfg.peft.method == "prompt":
    return False
  # pylint: disable-next=import-outside-toplevel  (the config itself needs no JAX)
  from ftjax.models import common
  dtype = common.compute_dtype(cfg.precision.compute)
  return common.attention_impl(cfg.model.attention, dtype, packing=False,
                               softcap=_attention_softcap(cfg.model.path)) != "cudnn"


def _attention_softcap(model_dir: str) -> Optional[float]:
  """`attn_logit_softcapping` of the model's config.json, or None (also where the file is
  missing or unreadable: loading the model reports that, naming the file)."""
  try:
    with open(os.path.join(model_dir, "config.json")) as f:
      return json.load(f).get("attn_logit_softcapping")
  except (OSError, ValueError, AttributeError):
    return None


def resolve_adapters(p: PeftConfig) -> None:
  """Checks `peft.adapters` and settles what it implies, in place: `peft.method` lora, and each
  adapter's `method: dora` as `dora: true`. For library users too (`load_model` calls it)."""
  if p.method not in ("none", "lora"):
    raise UserError(f"peft.adapters holds LoRA / DoRA adapters; it cannot be combined with "
                    f"peft.method {p.method}")
  if p.lora != LoraConfig():
    raise UserError("peft.lora is not used with peft.adapters (each named adapter has its own "
                    "r, alpha, targets...): set them under peft.adapters.NAME")
  p.method = "lora"  # what the named adapters are
  for name, a in p.adapters.items():
    check_adapter_name(name, f"peft.adapters.{name}")
    if a.r <= 0 or a.alpha <= 0 or not 0 <= a.dropout < 1 or not a.targets:
      raise UserError(f"peft.adapters.{name}: r and alpha must be > 0, dropout in [0, 1), "
                      "and targets name at least one pattern")
    a.dora = a.dora or a.method == "dora"


def _validate_tasks(cfg: Config) -> None:
  """peft.adapters and data.train's tasks name each other, in combinations that are built."""
  d, p = cfg.data, cfg.peft
  tasks = list(d.train) if isinstance(d.train, dict) else None
  if p.adapters is None:
    if tasks is not None:
      raise UserError("data.train names tasks (a mapping): give each its adapter in "
                      "peft.adapters")
    for key, used in [("task_weights", bool(d.task_weights)),
                      ("task_batches", d.task_batches != "mixed")]:
      if used:
        raise UserError(f"data.{key} needs tasks (data.train: {{NAME: FILES}})")
    return
  resolve_adapters(p)
  if tasks is None:
    raise UserError("peft.adapters: data.train must name each adapter's data "
                    "({NAME: FILES, ...})")
  for name in tasks:
    if name not in p.adapters:
      raise UserError(f"data.train.{name}: no adapter of that name in peft.adapters "
                      f"({', '.join(p.adapters)})")
  for name in p.adapters:
    if name not in tasks:
      raise UserError(f"peft.adapters.{name}: no data for it in data.train")
  for name, w in (d.task_weights or {}).items():
    if name not in tasks or not w > 0:
      raise UserError(f"data.task_weights.{name}: must name a task of data.train and be > 0")
  if isinstance(d.eval, dict):
    for name in d.eval:
      if name not in tasks:
        raise UserError(f"data.eval.{name}: with tasks, each eval set is named after the task "
                        f"(and adapter) it evaluates ({', '.join(tasks)})")
  elif d.eval:
    raise UserError("data.eval: with tasks, name each eval set after its task "
                    "({NAME: FILES}), or use data.eval_fraction")
  unsupported = [(d.format in ("classification", "preference"), f"data.format {d.format}"),
                 (bool(d.mix), "data.mix"), (bool(p.init_from), "peft.init_from"),
                 (bool(cfg.distill.teacher), "distill.teacher"),
                 (bool(cfg.regularize.ewc.lam), "regularize.ewc"),
                 (bool(cfg.partition.sparse.density), "partition.sparse")]
  for bad, what in unsupported:
    if bad:
      raise UserError(f"peft.adapters (several adapters) cannot be combined with {what}")


def _validate_tokens(m: ModelConfig) -> None:
  """model.add_tokens / add_special_tokens / token_descriptions agree with each other."""
  listed = list(m.add_tokens) + list(m.add_special_tokens)
  seen = set()
  for token in listed:
    if not token:
      raise UserError("model.add_tokens: an added token cannot be empty")
    if token in seen:
      raise UserError(f"model.add_tokens: '{token}' is given twice (add_tokens and "
                      "add_special_tokens together)")
    seen.add(token)
  descriptions = m.token_descriptions or {}
  for token in descriptions:
    if token not in seen:
      raise UserError(f"model.token_descriptions: '{token}' is not in model.add_tokens or "
                      "model.add_special_tokens")
  if m.new_token_init == "description":
    for token in listed:
      if not descriptions.get(token, "").strip():
        raise UserError(f"model.new_token_init: description needs model.token_descriptions "
                        f"for '{token}'")


def load(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
  """Reads a YAML config, applies `key.sub=value` overrides and validates the result.

  Args:
    path: a YAML file, or None for the defaults.
    overrides: dotted `key=value` words, applied after the file.

  Returns:
    The validated Config.

  Raises:
    UserError: naming the file and the offending key.
  """
  data: dict = {}
  where = path or "<defaults>"
  if path is not None:
    if not os.path.isfile(path):
      raise UserError(f"config file not found: {path}")
    with open(path) as f:
      try:
        data = yaml.safe_load(f) or {}
      except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
  for word in overrides or []:
    key, sep, raw = word.partition("=")
    if not sep or not key:
      raise UserError(f"override '{word}' is not of the form key.sub=value")
    try:
      value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
      raise UserError(f"override {key}: cannot parse value {raw!r}") from None
    _set_dotted(data, key.strip(), value)
  try:
    cfg = _build(Config, data, "")
    _validate(cfg)
  except UserError as e:
    raise UserError(f"{where}: {e}") from None
  return cfg


def to_dict(cfg: Any) -> Any:
  """The config as plain data, keyed as in YAML (`load` reads it back)."""
  if dataclasses.is_dataclass(cfg):
    return {_key(f): to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
  if isinstance(cfg, list):
    return [to_dict(v) for v in cfg]
  if isinstance(cfg, dict):
    return {k: to_dict(v) for k, v in cfg.items()}
  return cfg


def dump(cfg: Config, path: str) -> None:
  with open(path, "w") as f:
    yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
