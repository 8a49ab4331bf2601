"""What a run loads or computes once before its first step (and keeps for its resumes).

- `ewc_fisher`: EWC's diagonal Fisher of the starting model over `regularize.ewc.data`, written
  to `<output_dir>/ewc_fisher.safetensors` with what it was computed from, and read back (and
  checked against the config) when the run resumes.
- `choose_sparse`: `partition.sparse`'s entries, scored on the first batches of the data order
  with no update; they live in the optimizer state, so a resume restores them.
- `teacher`: distillation's frozen teacher, read into the run's mesh.
- `reference`: a preference run's reference model, and for `preference.reference: precomputed`
  the reference scores of every pair, written to `<output_dir>/reference_logps.safetensors` and
  read back on resume.
"""

from __future__ import annotations

import logging
import os

import jax

from ftjax import data, dynamic, hf, loss, preference, regularize, sharding, step, tree
from ftjax.config import Config, UserError

logger = logging.getLogger(__name__)


def ewc_fisher(cfg: Config, examples: list, pad_id: int, loss_fn: loss.LossFn, params: dict,
               frozen: dict, mesh: jax.sharding.Mesh) -> dict:
  """EWC's diagonal Fisher of the starting model over regularize.ewc.data: read from the run
  directory's ewc_fisher.safetensors, or computed once and saved there."""
  path = os.path.join(cfg.train.output_dir, "ewc_fisher.safetensors")
  ewc = cfg.regularize.ewc
  made_from = {"model": os.path.abspath(cfg.model.path), "data": ewc.data,
               "max_examples": ewc.max_examples, "seq_len": cfg.data.seq_len,
               "format": cfg.data.format}
  if os.path.isfile(path):
    try:
      fisher, saved_from = regularize.load(path, with_metadata=True)
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f"{path}: cannot read the saved Fisher ({str(e).splitlines()[0]}); "
                      "delete it to compute it again") from None
    shapes = {p: tuple(v.shape) for p, v in tree.flatten(params).items()}
    if {p: tuple(v.shape) for p, v in tree.flatten(fisher).items()} != shapes:
      raise UserError(f"{path} holds the Fisher of other parameters than this config trains "
                      "(use a new train.output_dir)")
    if saved_from != made_from:
      raise UserError(f"{path} was computed from {saved_from}, this config asks for "
                      f"{made_from} (use a new train.output_dir, or delete the file)")
    logger.info(f"regularize.ewc: the Fisher of the starting model from {path}")
    return fisher
  rep = sharding.replicated(mesh)
  batches = (sharding.put_batch(b, rep) for b in data.eval_batches(
      examples, cfg.eval.batch_size, cfg.data.seq_len, pad_id, cfg.data.buckets))
  try:
    fisher = regularize.fisher(loss_fn, params, frozen, batches)
  except ValueError as e:
    raise UserError(f"regularize.ewc.data: {e}") from None
  if jax.process_count() > 1:  # whole arrays on every host, for process 0 to write
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    host = multihost_utils.process_allgather(fisher, tiled=True)
  else:
    host = fisher
  if jax.process_index() == 0:
    regularize.save(path, host, metadata=made_from)
  logger.info(f"regularize.ewc: the Fisher of the starting model over {len(examples)} examples "
              f"of {', '.join(cfg.regularize.ewc.data)}, saved to {path}")
  return fisher


def choose_sparse(cfg: Config, batches: data.Batches, state: step.TrainState, frozen: dict,
                  loss_fn: loss.LossFn, mesh: jax.sharding.Mesh) -> step.TrainState:
  """partition.sparse: scores the first `warmup_steps` batches of the data order (no update),
  then keeps the top `density` of each trainable tensor's entries in the optimizer state."""
  sparse = cfg.partition.sparse
  batch_sh = sharding.batch_sharding(mesh, 2)
  scored = (sharding.put_batch(batches.get(s), batch_sh) for s in range(sparse.warmup_steps))
  if sparse.score == "fisher":
    scores = regularize.fisher(loss_fn, state.params, frozen, scored)
  else:
    scores = dynamic.scores_grad2(loss_fn, state.params, frozen, scored,
                                  grad_accum=cfg.train.grad_accum)
  index = dynamic.top_entries(scores, sparse.density)
  chosen = sum(int(i.size) for i in jax.tree.leaves(index))
  logger.info(f"partition.sparse: scored {sparse.warmup_steps} batch(es) by {sparse.score}; "
              f"{chosen:,} of {tree.count(state.params):,} trainable entries train "
              f"(density {sparse.density:g})")
  return state.replace(opt_state=dynamic.with_index(state.opt_state, index))


def reference(cfg: Config, model, params: dict, frozen: dict, train: list, evals: dict,
              batches: data.Batches, pad_id: int, mesh: jax.sharding.Mesh, main: bool = True
              ) -> tuple[preference.Reference, dict]:
  """The run's reference (see preference.reference_for) and, for precomputed, each split's
  scores {"train" | "eval_<name>": (pairs, 2)}, which `batches` then carries; the copy of the
  starting parameters is let go once they are scored."""
  ref = preference.reference_for(cfg, model, params, cfg.train.loss_chunk)
  if ref.mode != "precomputed":
    return ref, {}
  splits = {"train": train, **{f"eval_{name}": ex for name, ex in evals.items()}}
  score = lambda examples: preference.score_pairs(ref, frozen, examples, cfg.train.batch_size,
                                                  cfg, pad_id, mesh)
  scores = preference.precompute(os.path.join(cfg.train.output_dir, preference.FILE), splits,
                                 score, main)
  batches.ref = scores["train"]
  return preference.Reference("precomputed"), scores


def teacher(cfg: Config, tokenizer, model_cfg, dtype, mesh):
  """The frozen teacher of `distill.teacher`: (loss.Distill, its params, their shardings)."""
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
  logger.info(f"distilling from {path} (T={cfg.distill.temperature}, alpha={cfg.distill.alpha}, "
              f"{tree.count(params) / 1e6:.2f}M parameters, frozen)")
  return (loss.Distill(loss.logits_fn(module), cfg.distill.temperature, cfg.distill.alpha),
          params, tree.unflatten(layout))
