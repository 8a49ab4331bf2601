"""`python -m ftjax.train --config FILE [key.sub=value ...]`: the one host training loop.

`main()` parses the command line and calls `run(cfg)`; tests call `run(cfg)` directly. A run
directory holds the resolved config.yaml, metrics.jsonl, TensorBoard events, Orbax checkpoints
and loss.png; running the same command again resumes from the newest checkpoint.
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
import re
import sys
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import (checkpoint, config, data, evaluation, hf, loop, metrics, optim, peft, sharding,
                   step, tree)
from ftjax.models import common
from ftjax.peft import hf_adapter
from ftjax.config import Config, UserError

logger = logging.getLogger("ftjax.train")  # not __main__ under python -m


def compute_dtype(name: str):
  if name == "auto":
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  return {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}[name]


def chunked_loss(cfg: Config, module, dtype, trainable: set) -> Optional[step.ChunkedLoss]:
  """`step.chunked_loss` unless `train.loss_chunk` is -1 or a teacher compares whole logits."""
  if cfg.train.loss_chunk < 0 or cfg.distill.teacher:
    return None
  return step.chunked_loss(module, dtype, trainable, cfg.train.loss_chunk)


@dataclasses.dataclass
class Model:
  """The model a run trains: its module (with the PEFT spec), all parameters, what trains."""

  module: Any
  params: dict
  trainable: set
  base_paths: list
  loaded: hf.LoadedModel
  layout: Optional[dict] = None  # {path: NamedSharding} when built on a mesh


def build_model(cfg: Config, tokenizer, skip_init_from: bool = False,
                mesh: Optional[jax.sharding.Mesh] = None) -> Model:
  """Loads the base model and adds the PEFT method; resolves `cfg.peft` in place from
  `peft.init_from` (the adapter's own r, alpha, targets, length...), so config.yaml records it.
  With a `mesh`, every parameter is created in its shards (base weights read straight from the
  safetensors files into them) and `Model.layout` holds the shardings."""
  dtype = compute_dtype(cfg.precision.compute)
  num_labels = len(cfg.data.labels) if cfg.data.format == "classification" else 0
  base, model_cfg, hf_cfg, family = hf.build(cfg.model.path, dtype, num_labels)
  # A classification head is never part of the frozen base: it always trains.
  base_paths = [p for p in tree.flatten(hf.abstract_params(base))
                if p.split("/", 1)[0] not in common.HEAD_MODULES]
  from_adapter: dict = {}
  if cfg.peft.init_from and not skip_init_from:
    method, fields, from_adapter, trained = hf_adapter.load(cfg.peft.init_from, family.table,
                                                           model_cfg)
    if method != cfg.peft.method:
      raise UserError(f"peft.init_from: {cfg.peft.init_from} holds a {method} adapter, but "
                      f"peft.method is {cfg.peft.method}")
    setattr(cfg.peft, method, dataclasses.replace(getattr(cfg.peft, method), **fields))
    print(f"peft.init_from {cfg.peft.init_from}: the adapter's own settings replace "
          f"peft.{method}: " + ", ".join(f"{k}={v}" for k, v in fields.items() if k != "targets")
          + (f", {len(trained)} trained base tensor(s)" if trained else ""))
    cfg.peft.trainable = sorted(set(cfg.peft.trainable) | {f"^{re.escape(p)}$" for p in trained})
  spec = peft.build_spec(cfg.peft, base_paths, model_cfg)
  peft.check_context(spec, cfg.data.seq_len, getattr(model_cfg, "max_positions", None)
                     or hf_cfg.get("max_position_embeddings"),
                     cfg.model.path)
  module = base.clone(peft=spec, remat=cfg.train.remat, attention=common.attention_impl(
      cfg.model.attention, dtype, cfg.data.packing))
  layout = sharding.param_shardings(module, mesh) if mesh is not None else None
  loaded = hf.load(cfg.model.path, dtype, shardings=layout, num_labels=num_labels)
  if loaded.fresh:
    base_paths = [p for p in base_paths if p not in loaded.fresh]
  text_ids = None
  if spec.method == "prompt" and spec.prompt_init == "text":
    text_ids = tokenizer(cfg.peft.prompt.init_text)["input_ids"]  # as PEFT does (BOS included)
    if not text_ids:
      raise UserError("peft.prompt.init_text tokenizes to nothing")
  params = peft.init(module, loaded.params, jax.random.PRNGKey(cfg.train.seed), text_ids)
  trainable = peft.trainable_paths(cfg.peft, base_paths, params)
  flat = tree.flatten(params)
  if cfg.peft.base_dtype == "bf16":  # frozen base weights stored in bf16, as trained against
    flat.update({p: flat[p].astype(jnp.bfloat16) for p in base_paths if p not in trainable})
    if spec.dora:  # the magnitude starts at the norm of the kernel the forward pass sees
      flat = peft.lora.finish(spec, flat)
  for path, value in from_adapter.items():
    if path not in flat or tuple(value.shape) != tuple(flat[path].shape):
      got = tuple(flat[path].shape) if path in flat else "no such parameter"
      raise UserError(f"peft.init_from: tensor for '{path}' has shape {tuple(value.shape)}, "
                      f"this model has {got}")
    flat[path] = jnp.asarray(value, flat[path].dtype)
  if layout is not None:  # PEFT leaves join their layers' shards (base leaves are there)
    flat = {p: jax.device_put(v, layout[p]) for p, v in flat.items()}
  return Model(module, tree.unflatten(flat), trainable, base_paths, loaded, layout)


def _teacher(cfg: Config, tokenizer, model_cfg, dtype, mesh):
  """The frozen teacher of `distill.teacher`: (step.Distill, its params, their shardings)."""
  path = cfg.distill.teacher
  teacher_tok = hf.load_tokenizer(path)
  if teacher_tok.get_vocab() != tokenizer.get_vocab():
    raise UserError(f"distill.teacher: {path} has another tokenizer than {cfg.model.path}; "
                    "distillation compares next-token distributions token by token, so teacher "
                    "and student must share one")
  module, teacher_cfg, _, _ = hf.build(path, dtype)
  if teacher_cfg.vocab_size != model_cfg.vocab_size:
    raise UserError(f"distill.teacher: {path} has {teacher_cfg.vocab_size} output tokens, the "
                    f"student {model_cfg.vocab_size}")
  layout = sharding.param_shardings(module, mesh)
  params = hf.load(path, dtype, shardings=layout).params
  print(f"distilling from {path} (T={cfg.distill.temperature}, alpha={cfg.distill.alpha}, "
        f"{tree.count(params) / 1e6:.2f}M parameters, frozen)")
  return (step.Distill(step.logits_fn(module), cfg.distill.temperature, cfg.distill.alpha), params,
          tree.unflatten(layout))


def run(cfg: Config) -> dict:
  """Fine-tunes `cfg.model.path` on `cfg.data`; returns a summary (losses, eval, run dir).

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
    if warning := sharding.missing_accelerator():
      logger.warning(warning)
    return _run(cfg)


def _run(cfg: Config) -> dict:
  out_dir = cfg.train.output_dir
  main = jax.process_index() == 0

  # Cheap checks first: a bad model directory or data file fails before any weights load, and
  # data is tokenised (perhaps in forked workers) before JAX starts its threads.
  base_module, model_cfg, _, _ = hf.build(cfg.model.path)
  hf.check_weights(cfg.model.path)
  tokenizer = hf.load_tokenizer(cfg.model.path)
  pad_id = tokenizer.pad_token_id
  classify = cfg.data.format == "classification"
  if not classify and not getattr(base_module, "causal_lm", True):
    raise UserError(f"{cfg.model.path} is an encoder: it trains with data.format: "
                    "classification only")
  for key, value in [("distill.teacher", cfg.distill.teacher), ("eval.samples", cfg.eval.samples)]:
    if classify and value:
      raise UserError(f"{key} works with causal-LM data formats, not data.format classification")
  loaded_data = data.load_splits(cfg.data, tokenizer)
  if classify:
    cfg.data.labels = list(loaded_data.labels)  # config.yaml records the label order
  train_examples = loaded_data.train.examples
  eval_examples = loaded_data.eval.examples if loaded_data.eval else []
  print(loaded_data.train.stats.describe("data.train", len(train_examples)))
  if loaded_data.eval:
    print(loaded_data.eval.stats.describe("data.eval", len(eval_examples)))
  if cfg.eval.max_examples:
    eval_examples = eval_examples[:cfg.eval.max_examples]
  if cfg.eval.samples and jax.process_count() > 1:
    raise UserError("eval.samples (generation) runs in single-process runs only")
  if cfg.eval.patience and not eval_examples:
    raise UserError("eval.patience (early stopping) needs an eval set: set data.eval or "
                    "data.eval_fraction")
  data.check_vocab(train_examples + eval_examples, model_cfg.vocab_size)
  batches = data.Batches(train_examples, cfg.train.batch_size, cfg.data.seq_len, pad_id,
                         cfg.train.seed, packing=cfg.data.packing, buckets=cfg.data.buckets,
                         process_index=jax.process_index(), process_count=jax.process_count())
  if cfg.data.packing:
    print(f"packing: {len(train_examples)} examples in {len(batches.rows)} rows of "
          f"{cfg.data.seq_len} tokens, {100 * batches.efficiency:.1f}% full")
  if cfg.train.epochs:
    cfg.train.steps = max(1, math.ceil(cfg.train.epochs * batches.steps_per_epoch))
    print(f"train.epochs {cfg.train.epochs} = {cfg.train.steps} steps "
          f"({batches.steps_per_epoch} per epoch)")
  dtype = compute_dtype(cfg.precision.compute)
  mesh = sharding.make_mesh(cfg.mesh, model_cfg)
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if (cfg.train.batch_size // cfg.train.grad_accum) % shards:
    raise UserError(f"train.batch_size / train.grad_accum ({cfg.train.batch_size} / "
                    f"{cfg.train.grad_accum}) must divide by mesh data x fsdp ({shards})")
  model = build_model(cfg, tokenizer, mesh=mesh)
  if model.loaded.fresh:
    print(f"initialised fresh (not in {cfg.model.path}): {', '.join(model.loaded.fresh)}")
  params, frozen = tree.split(model.params, model.trainable)
  params_sh, frozen_sh = tree.split(tree.unflatten(model.layout), model.trainable)
  n_train, n_total = tree.count(params), tree.count(model.params)
  print(f"model {cfg.model.path}: {n_total / 1e6:.2f}M parameters, peft {cfg.peft.method}, "
        f"{n_train:,} trainable ({100 * n_train / n_total:.3g}%), compute "
        f"{jnp.dtype(dtype).name}, optimizer {cfg.optim.name}; {len(train_examples)} train / "
        f"{len(eval_examples)} eval examples")
  tx, lr_schedule = optim.build(cfg.optim, cfg.train.steps, params,
                                model.loaded.config.num_layers)
  fp16 = cfg.precision.compute == "fp16"
  state = step.init_state(params, tx, cfg.train.seed, cfg.precision.loss_scale if fp16 else 1.0)
  state_sh = sharding.state_shardings(state, params_sh, tx, mesh)
  state = jax.device_put(state, state_sh)
  memory = {"params": sharding.device_bytes((state.params, frozen)),
            "opt_state": sharding.device_bytes(state.opt_state),
            "params_total": sum(x.nbytes for x in jax.tree.leaves((state.params, frozen))),
            "opt_state_total": sum(x.nbytes for x in jax.tree.leaves(state.opt_state))}
  print(f"{sharding.describe(mesh)}; per device: parameters {memory['params'] / 2**20:.1f} MB, "
        f"optimizer state {memory['opt_state'] / 2**20:.1f} MB")

  ckpt = checkpoint.Checkpointer(out_dir, cfg.checkpoint.every, cfg.checkpoint.keep)
  best = checkpoint.Checkpointer(out_dir, 0, 1, name="best") if cfg.eval.patience else None
  early = loop.EarlyStop()
  start = 0
  data_meta = {"examples": len(train_examples), "rows": len(batches.rows),
               "batch_size": cfg.train.batch_size, "seed": cfg.train.seed}
  shapes = {p: list(v.shape) for p, v in sorted(tree.flatten(params).items())}
  summary: dict[str, Any] = {"output_dir": out_dir, "start_step": start, "losses": {},
                             "memory": memory}

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

  try:
    restored = ckpt.restore_intact(state, resumable)
  except UserError:
    close()
    raise
  if restored:
    start, state, meta = restored
    summary["start_step"] = start
    early = loop.EarlyStop(**meta.get("early", {}))
    print(f"resumed from step {start} (data epoch {meta['data']['epoch']}, "
          f"index {meta['data']['index']})")
    if early.stopped:
      close()
      print(f"{out_dir} stopped early at step {start} (best step {early.best_step}); nothing to do")
      return {**summary, "final_step": start, "stopped_early": start, "plot": None}
  if main:
    config.dump(cfg, os.path.join(out_dir, "config.yaml"))
  log = metrics.MetricsLog(out_dir, start, enabled=main)

  apply_fn = step.logits_fn(model.module)
  batch_sh = sharding.batch_sharding(mesh, 3)
  distill, teacher, teacher_sh = None, None, None
  if cfg.distill.teacher:
    distill, teacher, teacher_sh = _teacher(cfg, tokenizer, model_cfg, dtype, mesh)
  jitted = jax.jit(functools.partial(step.train_step, apply_fn=apply_fn, tx=tx,
                                     dynamic_scale=fp16,
                                     scale_period=cfg.precision.loss_scale_period,
                                     distill=distill,
                                     chunked=chunked_loss(cfg, model.module, dtype,
                                                          model.trainable)),
                   in_shardings=(state_sh, frozen_sh, batch_sh, teacher_sh),
                   out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))
  train_fn = lambda state, frozen, batch: jitted(state, frozen, batch, teacher)
  eval_sh = sharding.batch_sharding(mesh, 2) if cfg.eval.batch_size % shards == 0 \
      else sharding.replicated(mesh)
  eval_step = jax.jit(functools.partial(step.eval_step, apply_fn=apply_fn),
                      in_shardings=(params_sh, frozen_sh, eval_sh))
  def eval_fn(p, f, batch):
    if eval_sh.spec and jax.process_count() > 1:  # this process's rows of the global batch
      share = cfg.eval.batch_size // jax.process_count()
      batch = {k: v[jax.process_index() * share:][:share] for k, v in batch.items()}
    return eval_step(p, f, sharding.put_batch(batch, eval_sh))

  def run_eval(label: str, at: int, params: dict) -> Optional[dict]:
    if not eval_examples:
      return None
    result = evaluation.evaluate(eval_fn, params, frozen, eval_examples, cfg, pad_id)
    if cfg.eval.samples:
      result.update(evaluation.generated(model.module, tree.merge(params, frozen),
                                         eval_examples, tokenizer, cfg))
    print(f"[{label} step {at}] {evaluation.describe(result)}")
    summary.setdefault("evals", {})[at] = result
    return result

  meta = lambda s: {"data": {**batches.position(s), **data_meta}, "step": s,
                    "trainable": shapes, "early": dataclasses.asdict(early)}
  try:
    if start < cfg.train.steps:
      summary["before"] = run_eval("before", start, state.params)
      if summary["before"] and start == 0:  # loss.png draws the curve from its start
        log.write({"step": 0, **{k: v for k, v in summary["before"].items()
                                 if k.startswith("eval_")}})
    with loop.Signals() as signals:
      put = lambda batch: sharding.put_batch(batch, batch_sh)
      state = loop.Loop(cfg, train_fn, put, frozen, batches, lr_schedule, ckpt, best, meta, log,
                        run_eval, summary, early, signals).run(state)
    final = int(state.step)
    ckpt.save(final, state, meta(final), force=True)
  finally:
    close()
    log.close()
  summary["plot"] = metrics.plot(out_dir) if main else None
  summary["final_step"] = final
  return summary


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m ftjax.train",
                                   description="Fine-tune a pretrained language model.")
  parser.add_argument("--config", required=True, help="a YAML config (see configs/)")
  parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
  args = parser.parse_args(argv)
  metrics.console()
  try:
    cfg = config.load(args.config, args.overrides)
    summary = run(cfg)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except loop.Diverged as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if jax.process_index() != 0:
    return 128 + summary["interrupted"] if summary.get("interrupted") else 0
  before, after = summary.get("before"), summary.get("after")
  if before and after:
    line = f"held-out eval loss {before['eval_loss']:.4f} -> {after['eval_loss']:.4f}"
    for key, name in [("eval_accuracy", "accuracy"), ("eval_f1", "macro-F1"),
                      ("eval_exact_match", "exact match"), ("eval_rouge_l", "ROUGE-L")]:
      if key in after and (key != "eval_accuracy" or "eval_f1" in after):
        line += f", {name} {before[key]:.3f} -> {after[key]:.3f}"
    print(line)
  if summary.get("interrupted"):
    print(f"interrupted at step {summary['final_step']}: checkpoint saved; run the same command "
          "to resume")
    return 128 + summary["interrupted"]
  print(f"done: step {summary['final_step']}, run directory {summary['output_dir']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
