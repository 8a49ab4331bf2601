"""Preference tuning: the DPO family as losses of the train step, each as TRL defines it.

A batch of preference pairs holds rows in twos, chosen then rejected (see ftjax.data.batches),
so one forward pass scores both. A sequence's score is the sum of the log-probabilities of its
completion tokens (`sequence_logps`, head applied a chunk of positions at a time, like the SFT
loss). With c, r the policy's scores, c₀, r₀ the reference's, Δ = (c - c₀) - (r - r₀), n the
completion lengths and ā = score / n the per-token average:

- `sigmoid` (DPO): -log σ(βΔ)
- `hinge`: max(0, 1 - βΔ)
- `ipo`: ((c - c₀)/n_c - (r - r₀)/n_r - 1/(2β))². TRL divides each log-ratio by its completion
  length, which the IPO paper does not write but its authors confirmed; ftjax follows TRL.
- `robust` (cDPO with label smoothing ε): ((1-ε)·-log σ(βΔ) - ε·-log σ(-βΔ)) / (1 - 2ε)
- `simpo` (reference-free; TRL's CPOTrainer with cpo_alpha 0): with x = ā_c - ā_r - γ/β,
  -(1-ε) log σ(βx) - ε log σ(-βx)
- `orpo` (reference-free; TRL's ORPOTrainer, whose `beta` is ORPO's λ): the chosen sequences'
  NLL averaged over all their tokens, prompt included (TRL's choice; the paper trains the
  response only), minus λ·log σ(log odds(ā_c) - log odds(ā_r)), log odds(a) = a - log(1 - eᵃ).

The loss of a batch is the mean over its pairs (ORPO's NLL: over the batch's chosen tokens), so
k micro-batches of b pairs equal one batch of k·b pairs. The logged metrics are TRL's:
`rewards/chosen` = β(c - c₀) (simpo: β·ā_c, orpo: λ·ā_c), `rewards/rejected`,
`rewards/accuracies` (chosen reward > rejected), `rewards/margins`, `logps/chosen` and
`logps/rejected` (c, r; per-token averages for simpo and orpo), each a mean over pairs.

The reference's scores arrive in the batch as `ref_logps` (rows, 1): `reference_fn` computes
them before each step from the starting model with the PEFT method off (`base`) or from a
frozen copy of the starting trainable parameters (`initial`), always without dropout; or they
are read from `<run>/reference_logps.safetensors`, computed once before training
(`precomputed`). Written by hand: no JAX library has these losses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import assembly, data, loss, peft, sharding, tree
from ftjax.config import Config, PreferenceConfig, UserError
from ftjax.models.layers import soft_cap

logger = logging.getLogger(__name__)

REFERENCE_FREE = ("simpo", "orpo")
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected")
FILE = "reference_logps.safetensors"
LogpsFn = Callable[..., dict]  # (params, batch, rng or None) -> per-row sums, see sequence_logps


def _position_logps(h_NxD: jax.Array, kernel_DxV: jax.Array, targets_N: jax.Array, chunk: int,
                    dtype: Any, softcap: Optional[float] = None) -> jax.Array:
  """log p(target) at each position, `chunk` positions at a time (logits soft-capped by
  `softcap` where the model caps them); each chunk's logits are recomputed in the backward pass
  rather than kept."""
  n, d = h_NxD.shape
  chunk = min(chunk, -(-n // 8) * 8)  # no padding beyond the positions there are
  pad = -n % chunk
  h = jnp.pad(h_NxD, ((0, pad), (0, 0))).reshape(-1, chunk, d)
  t = jnp.pad(targets_N, (0, pad)).reshape(-1, chunk)
  kernel = kernel_DxV.astype(dtype)

  def piece(_, xs):
    h_c, t_c = xs
    logits = soft_cap(jnp.dot(h_c.astype(dtype), kernel).astype(jnp.float32), softcap)
    picked = jnp.take_along_axis(logits, t_c[:, None], axis=-1)[:, 0]
    return None, picked - jax.nn.logsumexp(logits, axis=-1)

  _, lp = jax.lax.scan(jax.checkpoint(piece), None, (h, t))
  return lp.reshape(-1)[:n]


def row_sums(logp_BxT: jax.Array, batch: dict) -> dict:
  """Per row: the summed log-probability of the completion (`sum`) and its length (`count`),
  and the same over every real token after the first (`all_sum`, `all_count`: ORPO's NLL)."""
  same = batch["segment_ids"][:, 1:] == batch["segment_ids"][:, :-1]
  real = (same & (batch["segment_ids"][:, 1:] > 0)).astype(jnp.float32)
  trained = real * batch["loss_mask"][:, 1:]
  return {"sum": jnp.sum(logp_BxT * trained, axis=-1), "count": jnp.sum(trained, axis=-1),
          "all_sum": jnp.sum(logp_BxT * real, axis=-1), "all_count": jnp.sum(real, axis=-1)}


def sequence_logps(module: Any, dtype: Any = jnp.float32, chunk: int = 0) -> LogpsFn:
  """`fn(params, batch, rng=None) -> row_sums(...)` for a causal LM module: the output head
  applied `chunk` positions at a time where the model allows it (see loss.chunked_loss; 0: its
  default size), else (or with `chunk` -1, as train.loss_chunk) from whole logits."""
  chunked = loss.chunked_loss(module, dtype, set(), chunk) if chunk >= 0 else None
  apply_fn = loss.logits_fn(module)

  def fn(params, batch, rng=None):
    targets = batch["tokens"][:, 1:]
    if chunked is None:
      logits = apply_fn(params, batch, rng)[:, :-1].astype(jnp.float32)
      logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None],
                                 axis=-1)[..., 0]
    else:
      h, kernel = chunked.hidden_fn(params, batch, rng)
      b, l, d = h.shape
      logp = _position_logps(h[:, :-1].reshape(-1, d), kernel, targets.reshape(-1),
                             chunked.chunk, chunked.dtype, chunked.softcap).reshape(b, l - 1)
    return row_sums(logp, batch)
  return fn


def _log1mexp(x: jax.Array) -> jax.Array:
  """log(1 - eˣ) for x <= 0, each branch where it is accurate (as TRL's ORPO), with safe
  arguments so the untaken branch's gradient is not NaN."""
  t = -0.6931471805599453
  low = jnp.minimum(x, t)
  high = jnp.minimum(jnp.maximum(x, t), -1e-30)
  return jnp.where(x < t, jnp.log1p(-jnp.exp(low)), jnp.log(-jnp.expm1(high)))


def pair_losses(p: PreferenceConfig, chosen: dict, rejected: dict, ref_chosen: jax.Array,
                ref_rejected: jax.Array) -> tuple[jax.Array, dict]:
  """Each pair's loss (without ORPO's NLL term) and its metrics (see the module docstring).
  `chosen` / `rejected`: `row_sums` of the pair's two rows; `ref_*`: the reference's scores
  (ignored by reference-free losses)."""
  beta, eps = p.beta, p.label_smoothing
  n_c, n_r = jnp.maximum(chosen["count"], 1.0), jnp.maximum(rejected["count"], 1.0)
  logsig = jax.nn.log_sigmoid
  if p.loss in REFERENCE_FREE:
    c, r = chosen["sum"] / n_c, rejected["sum"] / n_r
    if p.loss == "simpo":
      x = c - r - p.simpo_gamma / beta
      per_pair = -(1 - eps) * logsig(beta * x) - eps * logsig(-beta * x)
      scale = beta
    else:
      log_odds = (c - r) - (_log1mexp(c) - _log1mexp(r))
      per_pair = -p.orpo_lambda * logsig(log_odds)
      scale = p.orpo_lambda
    rewards_c, rewards_r = scale * c, scale * r
  else:
    c, r = chosen["sum"], rejected["sum"]
    ratio_c, ratio_r = c - ref_chosen, r - ref_rejected
    delta = ratio_c - ratio_r
    if p.loss == "sigmoid":
      per_pair = -logsig(beta * delta)
    elif p.loss == "hinge":
      per_pair = jax.nn.relu(1 - beta * delta)
    elif p.loss == "ipo":
      per_pair = (ratio_c / n_c - ratio_r / n_r - 1 / (2 * beta)) ** 2
    else:  # robust
      per_pair = ((1 - eps) * -logsig(beta * delta) - eps * -logsig(-beta * delta)) / (1 - 2 * eps)
    rewards_c, rewards_r = beta * ratio_c, beta * ratio_r
  rewards_c, rewards_r = jax.lax.stop_gradient(rewards_c), jax.lax.stop_gradient(rewards_r)
  metrics = {"rewards/chosen": rewards_c, "rewards/rejected": rewards_r,
             "rewards/accuracies": (rewards_c > rewards_r).astype(jnp.float32),
             "rewards/margins": rewards_c - rewards_r,
             "logps/chosen": jax.lax.stop_gradient(c), "logps/rejected": jax.lax.stop_gradient(r)}
  return per_pair, metrics


def _pairs(rows: dict) -> tuple[dict, dict]:
  return ({k: v[0::2] for k, v in rows.items()}, {k: v[1::2] for k, v in rows.items()})


def loss_fn(p: PreferenceConfig, logps_fn: LogpsFn) -> loss.LossFn:
  """The step's loss (see ftjax.loss's contract): the summed pair losses of a micro-batch, with
  `aux["tokens"]` its number of pairs and the metrics summed over them. The batch holds
  `ref_logps` (rows, 1) for losses with a reference; ORPO reads `pair_nll_scale` (pairs of the
  whole batch / its chosen tokens), so its NLL is a mean over the whole batch's tokens."""
  def fn(params, batch, rng=None, context=None):
    del context
    chosen, rejected = _pairs(logps_fn(params, batch, rng))
    valid = (chosen["count"] > 0).astype(jnp.float32)  # empty rows pad an eval batch
    ref = batch.get("ref_logps")
    if ref is None and p.loss not in REFERENCE_FREE:
      raise ValueError(f"preference.loss {p.loss}: the batch has no ref_logps (the reference's "
                       "scores, see reference_fn)")
    ref_c, ref_r = (None, None) if ref is None else (ref[0::2, 0], ref[1::2, 0])
    per_pair, metrics = pair_losses(p, chosen, rejected, ref_c, ref_r)
    total = jnp.sum(per_pair * valid)
    if p.loss == "orpo":
      total = total - batch["pair_nll_scale"][0, 0] * jnp.sum(chosen["all_sum"] * valid)
    aux = {k: jnp.sum(v * valid) for k, v in metrics.items()}
    return total, {"tokens": jnp.sum(valid), **aux}
  return fn


def reference_fn(logps_fn: LogpsFn) -> Callable:
  """`fn(params, frozen, batch) -> ref_logps` of the batch's shape (..., rows, 1): each row's
  summed completion log-probability under the merged parameters, with no dropout and no
  gradient."""
  def fn(params, frozen, batch):
    lead = batch["tokens"].shape[:-1]
    flat = {k: v.reshape(-1, v.shape[-1]) for k, v in batch.items() if k != "ref_logps"}
    merged = jax.lax.stop_gradient(tree.merge(params, frozen))
    return logps_fn(merged, flat, None)["sum"].reshape(*lead, 1)
  return fn


def resolve_reference(cfg: Config, model: Any) -> str:
  """preference.reference as it will run (the default chosen), or a UserError where it would
  not be the starting policy."""
  p, method = cfg.preference, model.spec.method
  if p.loss in REFERENCE_FREE:
    return "none"
  base_trained = sorted(set(model.trainable) & set(model.base_paths))
  mode = p.reference
  if not mode:
    identity = method in ("lora", "adapter", "ia3") and not cfg.peft.init_from
    mode = "base" if identity and not base_trained else "initial"
  if mode == "base":
    if method == "none":
      raise UserError("preference.reference: base is the model with the PEFT method off, but "
                      "peft.method is none (full fine-tuning): use initial or precomputed")
    if cfg.peft.init_from:
      raise UserError(f"preference.reference: base would drop the trained adapter that "
                      f"peft.init_from ({cfg.peft.init_from}) loads, so the reference would not "
                      "be the starting policy: use initial or precomputed")
    if base_trained:
      raise UserError(f"preference.reference: base needs frozen base weights, but the partition "
                      f"trains {len(base_trained)} of them (e.g. {base_trained[0]}): use initial "
                      "or precomputed")
    if method in ("prefix", "prompt"):
      logger.info(f"preference.reference: base is the model without peft.method {method}'s "
                  "virtual tokens, not the starting policy (the step-0 loss is not log 2)")
  return mode


def fingerprint(*splits: list) -> str:
  """A digest of the pairs' tokens, masks and order: what precomputed scores belong to."""
  h = hashlib.sha256()
  for examples in splits:
    h.update(str(len(examples)).encode())
    for ex in examples:
      h.update(np.asarray(ex.tokens, np.int32).tobytes())
      h.update(np.asarray(ex.loss_mask, np.int8).tobytes())
      h.update(str(ex.split).encode())
  return h.hexdigest()


def precompute(path: str, splits: dict[str, list], score: Callable[[list], np.ndarray],
               main: bool = True) -> dict[str, np.ndarray]:
  """The reference scores (examples, 2) of each split, from `path` when it holds them for these
  exact pairs, else from `score(examples)` and then saved there (by process 0)."""
  from safetensors import SafetensorError, safe_open  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import load_file, save_file  # pylint: disable=import-outside-toplevel

  digest = fingerprint(*splits.values())
  if os.path.exists(path):
    try:
      with safe_open(path, "np") as f:
        meta = f.metadata() or {}
      arrays = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
      raise UserError(f"{path}: cannot read the precomputed reference scores ({e}); delete it "
                      "to compute them again") from None
    if meta.get("fingerprint") != digest or set(arrays) != set(splits):
      raise UserError(f"{path}: the precomputed reference scores are of other pairs than this "
                      "run's data (use a new train.output_dir, or delete the file)")
    logger.info(f"reference scores read from {path}")
    return arrays
  arrays = {}
  for name, examples in splits.items():
    arrays[name] = score(examples)
  if main:
    tmp = path + ".tmp"
    save_file(arrays, tmp, metadata={"fingerprint": digest})
    os.replace(tmp, path)  # never a half-written file under the name
    logger.info(f"reference scores of {', '.join(f'{len(v)} {k}' for k, v in arrays.items())} "
                f"pairs saved to {path}")
  return arrays


@dataclasses.dataclass
class Reference:
  """A run's reference model: how each batch gets its `ref_logps`.

  `mode` base and initial score each batch before its step (`attach`), with the PEFT method off
  and the frozen weights, or with `params`, a copy of the starting trainable parameters (frozen
  weights shared, not copied); precomputed scores come with the batches; none adds nothing.
  """

  mode: str
  params: Any = None  # base: {} (the frozen weights alone); initial: the starting trainables
  score_fn: Optional[Callable] = None  # jitted reference_fn

  def attach(self, frozen: dict, batch: dict) -> dict:
    """`batch` (device arrays) with its reference scores, where the mode computes them."""
    if self.score_fn is None:
      return batch
    return {**batch, "ref_logps": self.score_fn(self.params, frozen, batch)}


def reference_for(cfg: Config, model: Any, params: dict, logps_chunk: int = 0) -> Reference:
  """The reference of `cfg.preference.reference` (see `resolve_reference`) for `model` whose
  starting trainable parameters are `params` (copied for initial and precomputed)."""
  mode = resolve_reference(cfg, model)
  if mode == "none":
    return Reference(mode)
  dtype = assembly.compute_dtype(cfg.precision.compute)
  module = model.module.clone(peft=peft.NONE) if mode == "base" else model.module
  score_fn = jax.jit(reference_fn(sequence_logps(module, dtype, logps_chunk)))
  kept = {} if mode == "base" else jax.tree.map(jnp.copy, params)
  what = {"base": f"the base model without peft.method {model.spec.method}",
          "initial": "a frozen copy of the starting trainable parameters",
          "precomputed": f"scores computed once before training ({FILE})"}[mode]
  logger.info(f"preference.loss {cfg.preference.loss}, beta {cfg.preference.beta}; reference: "
              f"{mode} ({what})")
  return Reference(mode, kept, score_fn)


def score_pairs(ref: Reference, frozen: dict, examples: list, batch_size: int, cfg: Config,
                pad_id: int, mesh: Any) -> np.ndarray:
  """Reference scores (pairs, 2) of `examples`, `batch_size` pairs at a time, as a step's
  batches are scored."""
  put = _placer(mesh, 2 * batch_size)
  out = []
  for batch in data.eval_batches(examples, batch_size, cfg.data.seq_len, pad_id,
                                 cfg.data.buckets):
    got = ref.score_fn(ref.params, frozen, put(batch))
    if jax.process_count() > 1:  # rows live on every process: each gathers them all
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      got = multihost_utils.process_allgather(got, tiled=True)
    out.append(np.asarray(jax.device_get(got), np.float32).reshape(-1, 2))
  return np.concatenate(out)[:len(examples)]


def _placer(mesh: Any, rows: int) -> Callable[[dict], dict]:
  """Puts a host batch of `rows` rows on the mesh: split over data x fsdp where the rows divide
  (this process's share in multi-process runs), else replicated."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if rows % (shards * jax.process_count()):
    rep = sharding.replicated(mesh)
    return lambda batch: {k: jax.device_put(v, rep) for k, v in batch.items()}
  sh = sharding.batch_sharding(mesh, 2)
  share = rows // jax.process_count()
  return lambda batch: sharding.put_batch(
      {k: v[jax.process_index() * share:][:share] for k, v in batch.items()}, sh)


def evaluate(ref: Reference, eval_fn: Callable, params: dict, frozen: dict, examples: list,
             scores: Optional[np.ndarray], cfg: Config, pad_id: int, mesh: Any) -> dict:
  """`eval_loss` and TRL's `eval_rewards/*`, `eval_logps/*` over held-out pairs: means over
  pairs. `eval_fn(params, frozen, batch) -> (summed loss, aux)` is the jitted `loss_fn`."""
  put = _placer(mesh, 2 * cfg.eval.batch_size)
  totals: dict = {}
  for batch in data.eval_batches(examples, cfg.eval.batch_size, cfg.data.seq_len, pad_id,
                                 cfg.data.buckets, ref=scores):
    total, aux = jax.device_get(eval_fn(params, frozen, ref.attach(frozen, put(batch))))
    for k, v in {"loss": total, **aux}.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  n = max(totals.pop("tokens"), 1.0)
  return {f"eval_{k}": v / n for k, v in totals.items()}


__all__ = ["METRICS", "REFERENCE_FREE", "FILE", "Reference", "sequence_logps", "row_sums",
           "pair_losses", "loss_fn", "reference_fn", "reference_for", "resolve_reference",
           "precompute", "score_pairs", "fingerprint", "evaluate"]
