"""`python -m ftjax.train --config FILE [key.sub=value ...]`: a whole fine-tuning run.

`main()` parses the command line and calls `run(cfg)`; tests and library users call `run(cfg)`
directly and get a `RunResult`. A run goes through named phases: `_data` (tokenised splits and
batches), `_setup` (mesh, model, optimizer, sharded state), `_train` (resume, then the host loop
of loop.py, evals and checkpoints). A run directory holds the resolved config.yaml,
metrics.jsonl, TensorBoard events, Orbax checkpoints and loss.png; running the same command again
resumes from the newest checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import logging
import math
import os
import sys
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import (assembly, checkpoint, config, data, evaluation, hf, loop, loss, metrics,
                   optim, partition, preference, regularize, sharding, start, step, tree, vocab)
from ftjax.config import Config, UserError

logger = logging.getLogger("ftjax.train")  # not __main__ under python -m


compute_dtype = assembly.compute_dtype


def build_model(cfg: Config, tokenizer, skip_init_from: bool = False,
                mesh: Optional[jax.sharding.Mesh] = None,
                vocab_added: Optional[vocab.Extension] = None) -> assembly.Model:
  """`assembly.from_config`, then records the resolved PEFT settings (`peft.init_from`'s rank,
  targets, length...) in `cfg.peft`, so the run's config.yaml holds them."""
  model = assembly.from_config(cfg, tokenizer, mesh, skip_init_from, vocab_added)
  cfg.peft = model.peft_config
  return model


@dataclasses.dataclass
class RunResult:
  """What a run did. Read as attributes, or as a mapping (`result["losses"]`)."""

  output_dir: str
  start_step: int = 0
  final_step: int = 0
  losses: dict = dataclasses.field(default_factory=dict)  # {step: train loss}
  evals: dict = dataclasses.field(default_factory=dict)  # {step: eval metrics}
  before: Optional[dict] = None  # eval metrics before training (None without an eval set)
  after: Optional[dict] = None  # ... and at the end (or at the early stop)
  memory: dict = dataclasses.field(default_factory=dict)  # bytes of params / optimizer state
  interrupted: Optional[int] = None  # the signal that stopped the run (checkpointed)
  stopped_early: Optional[int] = None  # the step early stopping ended the run at
  skipped_steps: Optional[int] = None  # steps skipped for non-finite gradients, if any
  plot: Optional[str] = None  # loss.png

  def __getitem__(self, key: str) -> Any:
    if key not in self.__dataclass_fields__:
      raise KeyError(key)
    return getattr(self, key)

  def get(self, key: str, default: Any = None) -> Any:
    value = getattr(self, key, None)
    return default if value is None else value

  def __contains__(self, key: str) -> bool:
    return key in self.__dataclass_fields__ and getattr(self, key) is not None


@dataclasses.dataclass
class Data:
  """The tokenised splits of a run and its batches (phase 1)."""

  tokenizer: Any
  train: list
  evals: dict  # {name: examples}: data.eval's sets ("" for the unnamed one)
  batches: data.Batches
  ewc: list = dataclasses.field(default_factory=list)  # regularize.ewc.data's examples
  added: Optional[vocab.Extension] = None  # the tokens model.add_tokens added to `tokenizer`

  @property
  def eval(self) -> list:
    """The first eval set's examples (early stopping and eval.samples use it)."""
    return next(iter(self.evals.values()), [])

  @property
  def pad_id(self) -> int:
    return self.tokenizer.pad_token_id


@dataclasses.dataclass
class Setup:
  """The model, mesh, optimizer and sharded train state of a run (phase 2)."""

  model: assembly.Model
  mesh: jax.sharding.Mesh
  state: step.TrainState
  frozen: dict
  tx: Any
  lr_schedule: Any
  shardings: dict  # state / frozen / params NamedShardings
  memory: dict


def loss_for(cfg: Config, model: assembly.Model, distill: Optional[loss.Distill] = None
             ) -> loss.LossFn:
  """The run's loss: the preference loss for preference pairs; distillation with a teacher;
  else the chunked causal-LM cross-entropy unless `train.loss_chunk` is -1 or the model does not
  allow it; else whole-logit cross-entropy (causal LM or classification)."""
  if cfg.data.format == "preference":
    logps = preference.sequence_logps(model.module, compute_dtype(cfg.precision.compute),
                                      cfg.train.loss_chunk)
    return preference.loss_fn(cfg.preference, logps)
  apply_fn = loss.logits_fn(model.module)
  if distill is not None:
    return loss.distillation(apply_fn, distill)
  if cfg.train.loss_chunk >= 0:
    chunked = loss.chunked_loss(model.module, compute_dtype(cfg.precision.compute),
                                model.trainable, cfg.train.loss_chunk)
    if chunked is not None:
      return loss.chunked_cross_entropy(chunked)
  return loss.cross_entropy(apply_fn)


def run(cfg: Config) -> RunResult:
  """Fine-tunes `cfg.model.path` on `cfg.data`; returns what the run did (`RunResult`).

  The run holds `train.output_dir` (`checkpoint.RunLock`, in process 0) from before any work to
  the end; a second run on it stops with a UserError naming the holder.
  """
  cfg = copy.deepcopy(cfg)  # peft.init_from and train.epochs resolve fields in place
  sharding.start_distributed(cfg.distributed)
  main = jax.process_index() == 0
  out_dir = cfg.train.output_dir
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise UserError(f"train.output_dir: {out_dir} exists and is not a directory")
  try:
    os.makedirs(out_dir, exist_ok=True)
  except OSError as e:
    raise UserError(f"train.output_dir: cannot create {out_dir} ({e.strerror})") from None
  with contextlib.ExitStack() as stack:
    held = None
    if main:
      try:
        stack.enter_context(checkpoint.RunLock(out_dir))
      except UserError as e:
        held = e
    if jax.process_count() > 1:  # every process stops when process 0 could not lock
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      if multihost_utils.broadcast_one_to_all(np.int32(held is not None)):
        raise held or UserError(f"{out_dir} is in use by another run (see process 0)")
    elif held:
      raise held
    if not main:  # only process 0 prints and writes the run's own files
      stack.enter_context(contextlib.redirect_stdout(stack.enter_context(
          open(os.devnull, "w"))))
    stack.enter_context(metrics.log_file(out_dir, enabled=main))
    logger.info(sharding.describe_backend())
    sharding.return_compiler_memory()
    if warning := sharding.missing_accelerator():
      logger.warning(warning)
    return _run(cfg)


def _run(cfg: Config) -> RunResult:
  """The phases of a run: data, model and state, resume, train."""
  d = _data(cfg)
  setup = _setup(cfg, d)
  return _train(cfg, d, setup)


def _data(cfg: Config) -> Data:
  """Phase 1: checks the model directory, tokenises the splits, makes the batches. Cheap checks
  come first: a bad model directory or data file fails before any weights load, and data is
  tokenised (perhaps in forked workers) before JAX starts its threads. Resolves
  `data.labels` (classification), `data.packing` (auto) and `train.steps` (from `train.epochs`)
  in `cfg`."""
  cfg.data.packing = config.packing(cfg)  # config.yaml records what the run did
  base_module, model_cfg, _, _ = hf.build(cfg.model.path)
  hf.check_weights(cfg.model.path)
  tokenizer, added = vocab.resolve(cfg.model, cfg.train.seed)
  vocab.check_run(cfg.train.output_dir, added)
  vocab_size = added.rows(model_cfg.vocab_size) if added else model_cfg.vocab_size
  classify = cfg.data.format == "classification"
  if not classify and not getattr(base_module, "causal_lm", True):
    raise UserError(f"{cfg.model.path} is an encoder: it trains with data.format: "
                    "classification only")
  for key, value in [("distill.teacher", cfg.distill.teacher), ("eval.samples", cfg.eval.samples)]:
    if classify and value:
      raise UserError(f"{key} works with causal-LM data formats, not data.format classification")
  if cfg.data.format == "preference" and cfg.eval.samples:
    raise UserError("eval.samples (generation metrics against a reference completion) does not "
                    "apply to data.format preference")
  tasks = list(cfg.peft.adapters or {})  # task k trains adapter k
  loaded = data.load_splits(cfg.data, tokenizer, tasks)
  if classify:
    cfg.data.labels = list(loaded.labels)  # config.yaml records the label order
  train_examples = loaded.train.examples
  logger.info(loaded.train.stats.describe("data.train", len(train_examples)))
  evals = {}
  for name, split in loaded.evals.items():
    logger.info(split.stats.describe(f"data.eval.{name}" if name else "data.eval",
                                     len(split.examples)))
    evals[name] = split.examples[:cfg.eval.max_examples or None]
  if cfg.eval.samples and jax.process_count() > 1:
    raise UserError("eval.samples (generation) runs in single-process runs only")
  if cfg.eval.patience and not evals:
    raise UserError("eval.patience (early stopping) needs an eval set: set data.eval or "
                    "data.eval_fraction")
  data.check_vocab(train_examples + [e for x in evals.values() for e in x], vocab_size)
  batches = data.train_batches(cfg, train_examples, tokenizer.pad_token_id, tasks,
                               jax.process_index(), jax.process_count())
  if tasks:
    logger.info("tasks (rows per epoch): " + ", ".join(
        f"{name} {n}" for name, n in zip(tasks, batches.task_counts))
        + f"; {cfg.data.task_batches} batches")
  if batches.packed:
    logger.info(f"packing: {len(train_examples)} examples in {len(batches.rows)} rows of "
                f"{cfg.data.seq_len} tokens, {100 * batches.efficiency:.1f}% full")
  if cfg.train.epochs:
    cfg.train.steps = max(1, math.ceil(cfg.train.epochs * batches.steps_per_epoch))
    logger.info(f"train.epochs {cfg.train.epochs} = {cfg.train.steps} steps "
                f"({batches.steps_per_epoch} per epoch)")
  ewc = []
  if cfg.regularize.ewc.lam:
    ewc = data.load(cfg.regularize.ewc.data, cfg.data, tokenizer, loaded.labels)
    ewc = ewc[:cfg.regularize.ewc.max_examples or None]
    data.check_vocab(ewc, vocab_size)
  return Data(tokenizer, train_examples, evals, batches, ewc, added)


def _setup(cfg: Config, d: Data) -> Setup:
  """Phase 2: the mesh, the model (weights read into their shards), the optimizer and the
  sharded train state."""
  _, model_cfg, _, _ = hf.build(cfg.model.path)
  mesh = sharding.make_mesh(cfg.mesh, model_cfg)
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if (cfg.train.batch_size // cfg.train.grad_accum) % shards:
    raise UserError(f"train.batch_size / train.grad_accum ({cfg.train.batch_size} / "
                    f"{cfg.train.grad_accum}) must divide by mesh data x fsdp ({shards})")
  model = build_model(cfg, d.tokenizer, mesh=mesh, vocab_added=d.added)
  if model.fresh:
    logger.info(f"initialised fresh (not in {cfg.model.path}): {', '.join(model.fresh)}")
  params, frozen = model.split()
  params_sh, frozen_sh = tree.split(tree.unflatten(model.layout), model.trainable)
  n_train, n_total = tree.count(params), tree.count(model.params)
  dtype = compute_dtype(cfg.precision.compute)
  logger.info(f"model {cfg.model.path}: {n_total / 1e6:.2f}M parameters, peft {cfg.peft.method}, "
              f"{n_train:,} trainable ({100 * n_train / n_total:.3g}%), compute "
              f"{jnp.dtype(dtype).name}, optimizer {cfg.optim.name}; {len(d.train)} train / "
              f"{sum(len(x) for x in d.evals.values())} eval examples")
  logger.info(partition.report(cfg, model=model).summary())
  fisher = start.ewc_fisher(cfg, d.ewc, d.pad_id, loss_for(cfg, model), params, frozen,
                            mesh) if cfg.regularize.ewc.lam else None
  decayed = optim.decay_mask(cfg.optim, params, model.family, cfg.partition.rules)
  tx, lr_schedule = optim.build(cfg.optim, cfg.train.steps, params, model.config.num_layers,
                                model.family, rules=cfg.partition.rules, dynamic=cfg.partition,
                                seed=cfg.train.seed,
                                first=regularize.transforms(cfg.regularize, decayed, fisher))
  fp16 = cfg.precision.compute == "fp16"
  state = step.init_state(params, tx, cfg.train.seed, cfg.precision.loss_scale if fp16 else 1.0)
  state_sh = sharding.state_shardings(state, params_sh, tx, mesh)
  state = jax.device_put(state, state_sh)
  memory = {"params": sharding.device_bytes((state.params, frozen)),
            "opt_state": sharding.device_bytes(state.opt_state),
            "params_total": sum(x.nbytes for x in jax.tree.leaves((state.params, frozen))),
            "opt_state_total": sum(x.nbytes for x in jax.tree.leaves(state.opt_state))}
  logger.info(f"{sharding.describe(mesh)}; per device: parameters "
              f"{memory['params'] / 2**20:.1f} MB, optimizer state "
              f"{memory['opt_state'] / 2**20:.1f} MB")
  model.params = None  # `state` and `frozen` hold the parameters from here on
  return Setup(model, mesh, state, frozen, tx, lr_schedule,
               {"state": state_sh, "frozen": frozen_sh, "params": params_sh}, memory)


def _train(cfg: Config, d: Data, setup: Setup) -> RunResult:
  """Phases 3 and 4: resume from the newest intact checkpoint, then train, evaluate and
  checkpoint to `train.steps` (or a clean stop)."""
  out_dir = cfg.train.output_dir
  main = jax.process_index() == 0
  model, mesh, frozen = setup.model, setup.mesh, setup.frozen
  state_sh, frozen_sh = setup.shardings["state"], setup.shardings["frozen"]
  ckpt = checkpoint.Checkpointer(out_dir, cfg.checkpoint.every, cfg.checkpoint.keep)
  best = checkpoint.Checkpointer(out_dir, 0, 1, name="best") if cfg.eval.patience else None
  early = loop.EarlyStop()
  data_meta = {"examples": len(d.train), "rows": len(d.batches.rows),
               "batch_size": cfg.train.batch_size, "seed": cfg.train.seed}
  if d.batches.tasks:  # what orders a run's task rows (not in older runs' metadata)
    data_meta.update(tasks=list(d.batches.tasks), task_counts=list(d.batches.task_counts),
                     task_batches=cfg.data.task_batches)
  shapes = {p: list(v.shape) for p, v in sorted(tree.flatten(setup.state.params).items())}
  result = RunResult(out_dir, memory=setup.memory)

  def close():
    ckpt.close()  # commits any checkpoint still being written, even on an error or Ctrl-C
    if best:
      best.close()

  def resumable(at: int, meta: dict) -> None:
    saved = {k: meta["data"].get(k) for k in data_meta}
    problem = None
    if saved != data_meta:
      problem = f"its data order came from {saved}, this config gives {data_meta}"
    elif meta.get("trainable") != shapes:
      problem = ("it trained other parameters (peft method, targets, rank or trainable "
                 "patterns differ from this config)")
    if problem:
      raise UserError(f"{out_dir}: cannot resume step {at} exactly: {problem} "
                      "(use a new train.output_dir)")

  state = setup.state
  ref, scores = None, {}
  if cfg.data.format == "preference":  # before a restore replaces the starting parameters
    ref, scores = start.reference(cfg, setup.model, setup.state.params, setup.frozen, d.train,
                                  d.evals, d.batches, d.pad_id, setup.mesh, main)
  try:
    restored = ckpt.restore_intact(state, resumable)
  except UserError:
    close()
    raise
  if restored:
    result.start_step, state, meta = restored
    early = loop.EarlyStop(**meta.get("early", {}))
    logger.info(f"resumed from step {result.start_step} (data epoch {meta['data']['epoch']}, "
                f"index {meta['data']['index']})")
    if early.stopped:
      close()
      logger.info(f"{out_dir} stopped early at step {result.start_step} (best step "
                  f"{early.best_step}); nothing to do")
      result.final_step = result.stopped_early = result.start_step
      return result
  if main:
    config.dump(cfg, os.path.join(out_dir, "config.yaml"))
    if cfg.model.add_tokens or cfg.model.add_special_tokens:
      vocab.save(d.tokenizer, out_dir)  # resume, evaluate, generate and export read it
  log = metrics.MetricsLog(out_dir, result.start_step, enabled=main)
  if not restored and cfg.partition.sparse.density:
    state = start.choose_sparse(cfg, d.batches, state, frozen, loss_for(cfg, model), mesh)

  apply_fn = loss.logits_fn(model.module)
  batch_sh = sharding.batch_sharding(mesh, 3)
  distill, teacher, teacher_sh = None, None, None
  if cfg.distill.teacher:
    distill, teacher, teacher_sh = start.teacher(cfg, d.tokenizer, model.config,
                                                 compute_dtype(cfg.precision.compute), mesh)
  jitted = jax.jit(functools.partial(step.train_step, loss_fn=loss_for(cfg, model, distill),
                                     tx=setup.tx,
                                     dynamic_scale=cfg.precision.compute == "fp16",
                                     scale_period=cfg.precision.loss_scale_period),
                   in_shardings=(state_sh, frozen_sh, batch_sh, teacher_sh),
                   out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))
  train_fn = lambda state, frozen, batch: jitted(state, frozen, batch, teacher)
  if ref is not None:
    train_fn = lambda state, frozen, batch: jitted(state, frozen, ref.attach(frozen, batch), None)
    pref_loss = loss_for(cfg, model)
    pref_eval = jax.jit(lambda p, f, batch: pref_loss(tree.merge(p, f), batch))
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  eval_sh = sharding.batch_sharding(mesh, 2) if cfg.eval.batch_size % shards == 0 \
      else sharding.replicated(mesh)
  eval_step = jax.jit(functools.partial(step.eval_step, apply_fn=apply_fn),
                      in_shardings=(setup.shardings["params"], frozen_sh, eval_sh))

  def eval_fn(p, f, batch):
    if eval_sh.spec and jax.process_count() > 1:  # this process's rows of the global batch
      share = len(batch["tokens"]) // jax.process_count()
      batch = {k: v[jax.process_index() * share:][:share] for k, v in batch.items()}
    return eval_step(p, f, sharding.put_batch(batch, eval_sh))

  def run_eval(label: str, at: int, params: dict) -> Optional[dict]:
    """Every eval set's metrics: `eval_*` for the first (or only) set, `eval_<name>_*` for
    each named set as well."""
    out = {}
    for name, examples in d.evals.items():
      if ref is not None:
        got = preference.evaluate(ref, pref_eval, params, frozen, examples,
                                  scores.get(f"eval_{name}"), cfg, d.pad_id, mesh)
      else:
        got = evaluation.evaluate(eval_fn, params, frozen, examples, cfg, d.pad_id)
      if not out:  # the first set: eval_loss (early stopping) and generation metrics
        out.update(got)
        if cfg.eval.samples:
          out.update(evaluation.generated(model.module, tree.merge(params, frozen), examples,
                                          d.tokenizer, cfg))
      if name:
        out.update({f"eval_{name}_{k[5:]}": v for k, v in got.items()})
      logger.info(f"[{label} step {at}] {f'{name}: ' if name else ''}"
                  f"{evaluation.describe(got if name else out)}")
    if not out:
      return None
    result.evals[at] = out
    return out

  meta = lambda s: {"data": {**d.batches.position(s), **data_meta}, "step": s,
                    "trainable": shapes, "early": dataclasses.asdict(early)}
  try:
    if result.start_step < cfg.train.steps:
      result.before = run_eval("before", result.start_step, state.params)
      if result.before and result.start_step == 0:  # loss.png draws the curve from its start
        log.write({"step": 0, **{k: v for k, v in result.before.items()
                                 if k.startswith("eval_")}})
    with loop.Signals() as signals:
      put = lambda batch: sharding.put_batch(batch, batch_sh)
      state = loop.Loop(cfg, train_fn, put, frozen, d.batches, setup.lr_schedule, ckpt, best,
                        meta, log, run_eval, result, early, signals).run(state)
    result.final_step = int(state.step)
    ckpt.save(result.final_step, state, meta(result.final_step), force=True)
  finally:
    close()
    log.close()
  result.plot = metrics.plot(out_dir) if main else None
  return result


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m ftjax.train",
                                   description="Fine-tune a pretrained language model.")
  parser.add_argument("--config", required=True, help="a YAML config (see configs/)")
  parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
  args = parser.parse_args(argv)
  metrics.console()
  try:
    cfg = config.load(args.config, args.overrides)
    result = run(cfg)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except loop.Diverged as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if jax.process_index() != 0:
    return 128 + result.interrupted if result.interrupted else 0
  before, after = result.before, result.after
  if before and after:
    line = f"held-out eval loss {before['eval_loss']:.4f} -> {after['eval_loss']:.4f}"
    for key, name in [("eval_rewards/accuracies", "reward accuracy"),
                      ("eval_rewards/margins", "reward margin"),
                      ("eval_accuracy", "accuracy"), ("eval_f1", "macro-F1"),
                      ("eval_exact_match", "exact match"), ("eval_rouge_l", "ROUGE-L")]:
      if key in after and (key != "eval_accuracy" or "eval_f1" in after):
        line += f", {name} {before[key]:.3f} -> {after[key]:.3f}"
    print(line)
  if result.interrupted:
    print(f"interrupted at step {result.final_step}: checkpoint saved; run the same command "
          "to resume")
    return 128 + result.interrupted
  print(f"done: step {result.final_step}, run directory {result.output_dir}")
  return 0

if __name__ == "__main__":
  sys.exit(main())
