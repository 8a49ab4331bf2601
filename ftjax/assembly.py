"""A model ready to train: base weights, a PEFT method, and the partition into trained/frozen.

`load_model` is the one way a model is put together, for the CLIs and for library users alike:

    model = load_model("models/smollm2", peft=PeftConfig(method="lora"),
                       trainable=lambda path: "lora_" in path or path.startswith("norm/"))
    params, frozen = model.split()

Nothing is written back into a config: what `peft.init_from` resolved (the adapter's rank,
targets, length...) comes back as `Model.peft_config`. The partition is decided before any
weight is read, so frozen base weights under `base_dtype="bf16"` are converted as they are read
and no fp32 copy of them ever exists.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

from ftjax import hf, peft, quant, rules as prules, sharding, tree, vocab as vocab_lib
from ftjax.config import (Config, NamedLoraConfig, PartitionRule, PeftConfig, UserError,
                          packing, resolve_adapters)
from ftjax.models import Family, common
from ftjax.peft import hf_adapter, tokens
from ftjax.peft.base import Context, Method

logger = logging.getLogger(__name__)

DTYPES = common.DTYPES
compute_dtype = common.compute_dtype


@dataclasses.dataclass
class Model:
  """A model to train: its module (with the PEFT method), all parameters, and what trains.

  Attributes:
    module: the Flax module; `module.peft` is the resolved PEFT method.
    params: every parameter (base and PEFT), a nested dict.
    trainable: the paths of the parameters that train.
    base_paths: the base model's paths (a classification head is not base: it always trains).
    config: the family's model config; `hf_config` the parsed config.json.
    family: the model family (HF tables, parameter paths).
    path: the HF model directory.
    peft_config: the `peft` section as resolved (with `peft.init_from`'s own settings).
    fresh: parameters the checkpoint lacked (a new classification head).
    layout: {path: NamedSharding} when built on a mesh.
  """

  module: Any
  params: dict
  trainable: set
  base_paths: list
  config: Any
  hf_config: dict
  family: Family
  path: str
  peft_config: PeftConfig
  fresh: list = dataclasses.field(default_factory=list)
  layout: Optional[dict] = None

  @property
  def spec(self) -> Method:
    return self.module.peft

  @property
  def context(self) -> Context:
    """What PEFT methods and adapter formats know about this model."""
    return Context(self.config, self.family, tuple(self.base_paths))

  def as_plan(self) -> "Plan":
    """What `plan` would have decided for this model (shapes of its current parameters)."""
    shapes = {p: jax.ShapeDtypeStruct(v.shape, v.dtype)
              for p, v in tree.flatten(self.params).items()}
    heads = {p for p in shapes if self.family.is_classifier(p)}
    return Plan(self.module, self.spec, self.peft_config, list(self.base_paths), {}, shapes,
                heads, set(self.trainable), self.family, self.config, self.hf_config, {})

  def split(self) -> tuple[dict, dict]:
    """(trainable, frozen) parameter subtrees."""
    return tree.split(self.params, self.trainable)

  def apply(self, params: dict, batch: dict, rng: Optional[jax.Array] = None) -> jax.Array:
    """The logits of a batch (`tokens`, `positions`, `segment_ids`); dropout when `rng` is
    given."""
    rngs = {"dropout": rng} if rng is not None else None
    with peft.multi.rows(batch.get("adapter")):
      logits, _ = self.module.apply({"params": params}, batch["tokens"], batch["positions"],
                                    batch["segment_ids"], rngs=rngs)
    return logits

  def with_trainable(self, rule: Any) -> "Model":
    """The same model with another partition (`rule` as `load_model`'s `trainable`; heads and
    fresh weights still train). Leaves read in bf16 that now train are converted to fp32 (from
    their bf16 values: choose the partition at `load_model` to train them from fp32)."""
    heads = {p for p in tree.flatten(self.params) if self.family.is_classifier(p)}
    chosen = _trainable(self.peft_config, rule, (), self.base_paths, tree.flatten(self.params),
                        heads | set(self.fresh), self.family)
    flat = {p: v.astype(jnp.float32) if p in chosen else v
            for p, v in tree.flatten(self.params).items()}
    return dataclasses.replace(self, params=tree.unflatten(flat), trainable=chosen)

  def with_peft(self, peft_config: PeftConfig, trainable: Any = None, seed: int = 0,
                tokenizer: Any = None) -> "Model":
    """This base model (built with method none) plus a freshly initialised PEFT method: what
    `load_model(path, peft_config, trainable=...)` builds, without reading the weights again."""
    if self.spec.method != "none":
      raise UserError(f"with_peft: this model already has peft.method {self.spec.method}")
    cfg = dataclasses.replace(peft_config)
    spec = peft.build_spec(cfg, self.base_paths, self.config, self.family)
    module = self.module.clone(peft=spec)
    text_ids = _prompt_text(spec, cfg, tokenizer)
    params = peft.init(module, self.params, jax.random.PRNGKey(seed), text_ids, self.context)
    flat = tree.flatten(params)
    heads = {p for p in flat if self.family.is_classifier(p)}
    chosen = _trainable(cfg, trainable, (), self.base_paths, flat, heads | set(self.fresh),
                        self.family)
    if cfg.base_dtype == "bf16":
      flat.update({p: v.astype(jnp.bfloat16) for p, v in flat.items()
                   if p in self.base_paths and p not in chosen})
    return dataclasses.replace(self, module=module, params=tree.unflatten(flat),
                               trainable=chosen, peft_config=cfg)


def load_model(model_dir: str, peft_config: Optional[PeftConfig] = None, *,
               trainable: Any = None, compute: str = "auto", num_labels: int = 0,
               seed: int = 0, mesh: Optional[jax.sharding.Mesh] = None, remat: str = "none",
               attention: str = "auto", tokenizer: Any = None, seq_len: int = 0,
               init_from: Optional[str] = None, rules: Sequence[PartitionRule] = (),
               vocab: Optional[vocab_lib.Extension] = None) -> Model:
  """Loads an HF model directory and adds a PEFT method.

  Args:
    model_dir: a local HF model directory (config.json, *.safetensors).
    peft_config: the method and its settings (`PeftConfig`; default: none, full fine-tuning).
      `base_dtype="bf16"` stores the frozen base weights in bf16.
    trainable: which parameters train, deciding over every path: a function path -> bool, a
      regex, a list of regexes, or ordered (regex, bool) rules (see `tree.select`). Default:
      the method's own parameters plus `peft_config.trainable`, minus `peft_config.frozen`.
    compute: the compute dtype (auto: fp32 on CPUs, bf16 on accelerators | fp32 | bf16 | fp16).
    num_labels: > 0 for a sequence classifier with this many labels (a fresh head if the
      checkpoint has none).
    seed: the PEFT initialisation's seed.
    mesh: build every parameter in its shards on this mesh.
    remat, attention: the module's rematerialisation (none | full | dots) and attention
      implementation (auto: cuDNN's fused kernel on GPUs in half precision | xla | cudnn).
    tokenizer: needed for prompt tuning's `init: text`.
    seq_len: the longest sequence, checked against the context (0: not checked).
    init_from: an HF PEFT adapter directory whose weights (and settings) start the method;
      default `peft_config.init_from`.
    rules: `partition.rules` (PartitionRule), ahead of `peft_config.frozen` / `.trainable`
      (see ftjax.rules); not with `trainable`.
    vocab: tokens added to the tokenizer (`vocab.extend`): the tables gain their rows, which
      train apart from a frozen table with `peft_config.train_new_tokens`.

  Raises:
    UserError: for a directory that is not a model, a rule that selects nothing, an adapter
      that does not fit.
  """
  pl = plan(model_dir, peft_config, trainable=trainable, rules=rules, compute=compute,
            num_labels=num_labels, remat=remat, attention=attention, seq_len=seq_len,
            init_from=init_from, vocab=vocab)
  cfg, spec, module, shapes, family = pl.peft_config, pl.spec, pl.module, pl.shapes, pl.family
  base_paths, chosen, heads, model_cfg, hf_cfg = (pl.base_paths, pl.trainable, pl.heads,
                                                  pl.config, pl.hf_config)
  dtype = compute_dtype(compute)
  dtypes = {p: jnp.bfloat16 for p in base_paths if p not in chosen} \
      if cfg.base_dtype == "bf16" else {}
  # Soft prompts start from rows of the fp32 embedding table; it is converted after that.
  late = {family.embedding} & set(dtypes) if spec.prompt_len else set()
  dtypes = {p: d for p, d in dtypes.items() if p not in late}
  layout = sharding.param_shardings(module, mesh) if mesh is not None else None
  quantized = _quantized(cfg, spec, base_paths, chosen, family)
  loaded = hf.load(model_dir, dtype, shardings=layout, num_labels=num_labels, dtypes=dtypes,
                   expected=pl.base_shapes, quant=quantized)
  if layout is not None and quantized:  # a quantised weight's arrays each in its own shards
    stored = tree.flatten(loaded.params)
    layout.update({p: sharding.quantized(stored[p], layout[p]) for p in quantized})
  fresh = loaded.fresh
  if fresh:  # e.g. BERT's pooler: initialised here, so not frozen base weights
    base_paths = [p for p in base_paths if p not in fresh]
    chosen = _trainable(cfg, trainable, rules, base_paths, shapes, heads | set(fresh), family)
  text_ids = _prompt_text(spec, cfg, tokenizer)
  ctx = Context(model_cfg, family, tuple(base_paths))
  base = tree.unflatten(vocab_lib.grow(tree.flatten(loaded.params), vocab, module))
  del loaded
  params = peft.init(module, base, jax.random.PRNGKey(seed), text_ids, ctx, set(shapes))
  del base  # the only reference to the base tree is now `params`
  flat = tokens.init_leaves(spec, tree.flatten(params), ctx) if spec.new_token_leaves \
      else tree.flatten(params)
  flat.update({p: flat[p].astype(jnp.bfloat16) for p in late})
  _set_leaves(flat, pl.from_adapter, "peft.init_from")
  if layout is not None:  # PEFT leaves join their layers' shards (base leaves are there)
    flat = {p: jax.device_put(v, layout[p]) for p, v in flat.items()}
  return Model(module, tree.unflatten(flat), chosen, base_paths, model_cfg, hf_cfg, family,
               model_dir, cfg, fresh, layout)


def _set_leaves(flat: dict, leaves: dict, what: str) -> None:
  """Puts an adapter's tensors into `flat` (in place), each in its leaf's dtype, refusing a
  path the model lacks or a shape it does not have."""
  for path, value in leaves.items():
    if path not in flat or tuple(value.shape) != tuple(flat[path].shape):
      got = tuple(flat[path].shape) if path in flat else "no such parameter"
      raise UserError(f"{what}: tensor for '{path}' has shape {tuple(value.shape)}, this model "
                      f"has {got}")
    flat[path] = jnp.asarray(value, flat[path].dtype)


def _quantized(cfg: PeftConfig, spec: Method, base_paths: list[str], chosen: set[str],
               family: Family) -> dict[str, tuple[str, bool]]:
  """{path: (kind, double)} of the frozen base weights `peft.base_quant` stores quantised: the
  kernels of the dense layers but the heads (what bitsandbytes quantises in transformers), and
  with `base_quant_embeddings` the token embedding and output head too."""
  if cfg.base_quant == "none":
    return {}
  kind, double = cfg.base_quant, cfg.base_quant == "nf4" and cfg.base_quant_double is not False
  frozen = [p for p in base_paths if p not in chosen]
  paths = [p for p in frozen if p.endswith("/kernel") and not family.is_head(p)]
  if cfg.base_quant_embeddings:
    if spec.prompt_len:
      logger.info("peft.base_quant_embeddings: the token embedding stays unquantised under "
                  "prompt tuning (soft tokens start from its rows)")
    paths += [p for p in frozen if (p == family.embedding and not spec.prompt_len)
              or p == family.output_head]
  if not paths:
    raise UserError(f"peft.base_quant {kind}: no frozen dense kernel to quantise (it stores the "
                    "frozen base of a PEFT method; here every kernel trains)")
  return {p: (kind, double) for p in paths}


@dataclasses.dataclass
class Plan:
  """A model before its weights are read: the module with its PEFT method, every parameter's
  shape, and the partition."""

  module: Any
  spec: Method
  peft_config: PeftConfig  # as resolved (peft.init_from's settings and trained modules)
  base_paths: list
  base_shapes: dict  # {path: ShapeDtypeStruct} of the checkpoint's base model
  shapes: dict  # {path: ShapeDtypeStruct} of every parameter, PEFT leaves included
  heads: set  # classification-head paths (always trained)
  trainable: set
  family: Family
  config: Any
  hf_config: dict
  from_adapter: dict  # peft.init_from's tensors by path


def plan(model_dir: str, peft_config: Optional[PeftConfig] = None, *, trainable: Any = None,
         rules: Sequence[PartitionRule] = (), compute: str = "auto", num_labels: int = 0,
         remat: str = "none", attention: str = "auto", seq_len: int = 0,
         init_from: Optional[str] = None, vocab: Optional[vocab_lib.Extension] = None) -> Plan:
  """Everything `load_model` decides before reading weights (arguments as there)."""
  cfg = dataclasses.replace(peft_config or PeftConfig())
  if cfg.adapters:  # named adapters: peft.method lora (as config validation settles it)
    resolve_adapters(cfg)
  init_from = cfg.init_from if init_from is None else init_from
  dtype = compute_dtype(compute)
  base, model_cfg, hf_cfg, family = hf.build(model_dir, dtype, num_labels)
  # A classification head is never part of the frozen base: it always trains.
  base_shapes = tree.flatten(hf.abstract_params(base))
  if vocab is not None:
    base, model_cfg, hf_cfg = _with_vocab(base, model_cfg, hf_cfg, family, vocab, dtype,
                                          num_labels, model_dir)
  base_paths = [p for p in base_shapes if not family.is_classifier(p)]
  ctx = Context(model_cfg, family, tuple(base_paths))
  from_adapter: dict = {}
  if init_from:
    method, fields, from_adapter, trained = hf_adapter.load(init_from, ctx)
    if method != cfg.method:
      raise UserError(f"peft.init_from: {init_from} holds a {method} adapter, but "
                      f"peft.method is {cfg.method}")
    cfg = dataclasses.replace(cfg, **{method: dataclasses.replace(getattr(cfg, method),
                                                                  **fields)})
    logger.info(f"peft.init_from {init_from}: the adapter's own settings replace "
                f"peft.{method}: " + ", ".join(f"{k}={v}" for k, v in fields.items()
                                               if k != "targets")
                + (f", {len(trained)} trained base tensor(s)" if trained else ""))
    cfg.trainable = sorted(set(cfg.trainable) | {f"^{re.escape(p)}$" for p in trained})
  spec = peft.build_spec(cfg, base_paths, model_cfg, family)
  peft.check_context(spec, seq_len, getattr(model_cfg, "max_positions", None)
                     or hf_cfg.get("max_position_embeddings"), model_dir)
  module = base.clone(peft=spec, remat=remat, attention=common.attention_impl(
      attention, dtype, packing=False, softcap=getattr(model_cfg, "attn_softcap", None)))
  shapes = tree.flatten(hf.abstract_params(module))
  heads = {p for p in shapes if family.is_classifier(p)}
  chosen = _trainable(cfg, trainable, rules, base_paths, shapes, heads, family)
  if vocab is not None:
    spec = dataclasses.replace(spec, new_tokens=vocab.ids,
                               new_token_leaves=_new_token_leaves(cfg, chosen, ctx))
    module = module.clone(peft=spec)
    shapes = tree.flatten(hf.abstract_params(module))
    leaves = {tokens.LEAVES[n] for n in spec.new_token_leaves}
    chosen = _trainable(cfg, trainable, rules, base_paths, shapes, heads | leaves, family)
  return Plan(module, spec, cfg, base_paths, base_shapes, shapes, heads, chosen, family,
              model_cfg, hf_cfg, from_adapter)


def _with_vocab(base: Any, model_cfg: Any, hf_cfg: dict, family: Family,
                vocab: vocab_lib.Extension, dtype: Any, num_labels: int, model_dir: str):
  """(module, model config, HF config) with room for the new tokens' ids: rebuilt with
  vocab_size max(id) + 1 when the ids fall beyond the table (a padded table needs nothing)."""
  if not getattr(base, "causal_lm", True):
    raise UserError(f"model.add_tokens: {model_dir} is an encoder; vocabulary extension is for "
                    "decoder (causal-LM) families")
  rows = vocab.rows(model_cfg.vocab_size)
  if rows == model_cfg.vocab_size:
    return base, model_cfg, hf_cfg
  logger.info(f"vocabulary: {model_cfg.vocab_size} -> {rows} embedding rows (new ids "
              f"{vocab.ids[0]}..{vocab.ids[-1]})")
  hf_cfg = {**hf_cfg, "vocab_size": rows}
  model_cfg = family.config_from_hf(hf_cfg)
  return family.module(model_cfg, dtype, num_labels=num_labels), model_cfg, hf_cfg


def _new_token_leaves(cfg: PeftConfig, chosen: set, ctx: Context) -> tuple:
  """Which tables train the new tokens' rows as their own leaves: the frozen ones, with
  peft.train_new_tokens (a trained table trains its new rows with the rest)."""
  frozen = [name for name, (path, _) in tokens.tables(ctx).items() if path not in chosen]
  if frozen and not cfg.train_new_tokens:
    logger.warning(f"peft.train_new_tokens is false: the new tokens' rows of the frozen "
                   f"{' and '.join(frozen)} keep their initial values")
    return ()
  return tuple(frozen)


def _prompt_text(spec: Method, cfg: PeftConfig, tokenizer: Any) -> Optional[list[int]]:
  """The token ids prompt tuning's `init: text` starts from, else None."""
  if spec.method != "prompt" or spec.init != "text":
    return None
  if tokenizer is None:
    raise UserError("peft.prompt.init: text needs the model's tokenizer")
  text_ids = tokenizer(cfg.prompt.init_text)["input_ids"]  # as PEFT does (BOS included)
  if not text_ids:
    raise UserError("peft.prompt.init_text tokenizes to nothing")
  return text_ids


def _trainable(cfg: PeftConfig, rule: Any, rules: Sequence[PartitionRule], base_paths: list[str],
               shapes: dict, always: set[str], family: Family) -> set[str]:
  """The trained paths: without a rule, the partition of `rules` then peft.frozen /
  peft.trainable (see ftjax.rules); with one, its choice plus `always` (a classification
  head and weights the checkpoint lacked, which start freshly initialised)."""
  if rule is None:
    decisions = prules.decide(prules.user_rules(rules) + prules.sugar(cfg, None), shapes,
                              family, base_paths=base_paths, method=cfg.method,
                              check=("all", "base"))
    return {p for p, d in decisions.items() if d.train}
  if rules:
    raise UserError("load_model: give a trainable rule or partition rules, not both")
  chosen = tree.select(rule, shapes, "trainable")
  if not chosen:
    raise UserError("trainable: the rule chooses no parameter")
  return chosen | always


def from_config(cfg: Config, tokenizer: Any = None, mesh: Optional[jax.sharding.Mesh] = None,
                skip_init_from: bool = False, vocab: Optional[vocab_lib.Extension] = None
                ) -> Model:
  """`load_model` with a run config's settings (model, peft, precision, data, train; the
  tokens `model.add_tokens` adds, resolved here unless `vocab` already holds them)."""
  return load_model(cfg.model.path, cfg.peft, mesh=mesh, tokenizer=tokenizer, seed=cfg.train.seed,
                    **_config_args(cfg, skip_init_from, vocab))


def _config_args(cfg: Config, skip_init_from: bool = False,
                 vocab: Optional[vocab_lib.Extension] = None) -> dict:
  num_labels = len(cfg.data.labels) if cfg.data.format == "classification" else 0
  dtype = compute_dtype(cfg.precision.compute)
  if vocab is None and (cfg.model.add_tokens or cfg.model.add_special_tokens):
    vocab = vocab_lib.resolve(cfg.model, cfg.train.seed)[1]
  return dict(compute=cfg.precision.compute, num_labels=num_labels, remat=cfg.train.remat,
              attention=common.attention_impl(cfg.model.attention, dtype, packing(cfg)),
              seq_len=cfg.data.seq_len, init_from="" if skip_init_from else None,
              rules=cfg.partition.rules, vocab=vocab)


def plan_from_config(cfg: Config) -> Plan:
  """`plan` with a run config's settings (classification needs `data.labels` resolved; without
  them the head is planned for 2 labels)."""
  args = _config_args(cfg)
  if cfg.data.format == "classification" and not args["num_labels"]:
    args["num_labels"] = 2
  return plan(cfg.model.path, cfg.peft, **args)


def load_adapters(model_dir: str, adapter_dirs: dict[str, str], compute: str = "auto",
                  tokenizer: Any = None) -> Model:
  """The base model of `model_dir` with several HF PEFT LoRA / DoRA adapters, by name
  ({NAME: DIR}), each row of a batch applying its own (`batch["adapter"]`; ftjax.peft.multi)."""
  pl = plan(model_dir, compute=compute)
  ctx = Context(pl.config, pl.family, tuple(pl.base_paths))
  named, leaves = {}, {}
  for name, adapter_dir in adapter_dirs.items():
    peft.multi.check_name(name, f"--adapter {name}={adapter_dir}")
    method, fields, found, trained = hf_adapter.load(adapter_dir, ctx)
    if method != "lora" or trained:
      what = f"a {method} adapter" if method != "lora" else "trained base modules"
      raise UserError(f"--adapter {name}={adapter_dir}: several adapters in one batch are LoRA / "
                      f"DoRA only, without modules_to_save; this one has {what}")
    named[name] = NamedLoraConfig(**fields)
    leaves.update(peft.multi.place(name, found))
  model = load_model(model_dir, PeftConfig(method="lora", adapters=named), compute=compute,
                     tokenizer=tokenizer)
  flat = tree.flatten(model.params)
  _set_leaves(flat, leaves, "--adapter")
  model.params = tree.unflatten(flat)
  return model


def single_adapter(model: Model, params: dict, name: str) -> Model:
  """Adapter `name` of a several-adapter model (`peft.adapters`) as a plain LoRA model over the
  same base: its parameters (`params` merged over the model's) at the usual LoRA paths, the
  other adapters left out. What export and generation need of one adapter."""
  spec = model.spec
  if not isinstance(spec, peft.multi.MultiLora):
    raise UserError(f"--adapter {name}: this model has one PEFT method ({spec.method}), not "
                    "named adapters")
  full = tree.merge(model.params, params) if params is not model.params else params
  one, flat = spec.single(name, tree.flatten(full))
  trainable = set(spec.single(name, {p: None for p in model.trainable})[1])
  lora_cfg = model.peft_config.adapters[name]
  cfg = dataclasses.replace(model.peft_config, method="lora", adapters=None,
                            lora=dataclasses.replace(model.peft_config.lora, **{
                                f.name: getattr(lora_cfg, f.name)
                                for f in dataclasses.fields(model.peft_config.lora)}))
  return dataclasses.replace(model, module=model.module.clone(peft=one),
                             params=tree.unflatten(flat), trainable=trainable, peft_config=cfg)


def save_adapter(model: Model, params: dict, out_dir: str, task_type: str = "CAUSAL_LM") -> str:
  """Writes `params` (all of them, or the trained part merged over the model's) as an HF PEFT
  adapter of the model's method; trained base modules go out as `modules_to_save`."""
  full = tree.merge(model.params, params) if params is not model.params else params
  spec, full = peft.eject(model.spec, full)
  head = {p for p in model.trainable if model.family.is_classifier(p)}
  trained_base = (model.trainable & set(model.base_paths)) | head
  hf_adapter.save(out_dir, spec, full, trained_base, model.context, model.path, task_type)
  return out_dir


def save_merged(model: Model, params: dict, out_dir: str, dtype: str = "auto",
                config_updates: Optional[dict] = None) -> str:
  """Writes `params` merged into the base weights as an HF model directory `transformers`
  loads (LoRA folded in; methods that cannot merge are refused with the reason)."""
  full = tree.merge(model.params, params) if params is not model.params else params
  full = tree.unflatten(quant.dequantize_tree(tree.flatten(full)))  # a quantised base's values
  if model.spec.new_token_leaves:  # the new tokens' rows back into their tables
    full = tree.unflatten(tokens.fold(model.spec, tree.flatten(full), model.context))
  hf.save_model(out_dir, peft.merge(model.spec, full), model.path, model.family, dtype,
                {"vocab_size": model.config.vocab_size, **(config_updates or {})})
  return out_dir

