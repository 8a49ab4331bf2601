"""`python -m ftjax.merge`: adapter algebra over HF PEFT LoRA adapters made over one base model.

Owns reading several LoRA adapters, combining them as HF PEFT 0.21's
`PeftModel.add_weighted_adapter` does, and writing the result as a PEFT adapter (`--to peft`)
or as a merged HF model (`--to hf`). Each adapter i adds ΔW_i = s_i·A_i·B_i to a kernel (ftjax
layout: A (in, r), B (r, out), s = alpha/r or alpha/√r with rsLoRA); a module an adapter does
not adapt has ΔW_i = 0 there, which is what PEFT's skipping of that adapter amounts to.

- `cat`: A = [w_i·s_i·A_i], B = [B_i] (rank Σr): ΔW = Σ w_i·ΔW_i exactly.
- `svd`: Σ w_i·ΔW_i truncated to `rank` singular values (default: the largest adapter rank).
- `linear`: PEFT's factor blend, A = Σ ±√|w_i·s_i|·A_i, B = Σ √|w_i·s_i|·B_i (equal ranks).
- `ties`, `dare_linear`, `dare_ties`: PEFT's merge_utils arithmetic (magnitude or random
  pruning, sign election, disjoint mean) applied to the ΔW_i with weights w_i, as PEFT's
  `*_svd` variants do; the result is factored by truncated SVD only for a PEFT adapter. With
  `peft_compatible`, PEFT's own `ties` / `dare_*`: the arithmetic on the A and on the B factors
  separately, weighted as `linear` (a LoRA of the adapters' rank; not Σ w·ΔW).

A merged adapter has alpha = r (scale 1), as PEFT writes it. Numerics are NumPy float64
(PEFT: torch float32); DARE's random masks come from NumPy (`dare_mask`), not torch.bernoulli.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
import zlib
from typing import Optional, Sequence

import numpy as np

from ftjax import assembly, hf, metrics, tree
from ftjax.config import LoraConfig, UserError
from ftjax.peft import hf_adapter, lora
from ftjax.peft.base import Context

logger = logging.getLogger("ftjax.merge")

METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")
PRUNING = ("ties", "dare_linear", "dare_ties")  # need --density
_PARTS = {"delta": 0, "a": 1, "b": 2}  # which tensor a DARE mask drops entries of


@dataclasses.dataclass(frozen=True)
class Adapter:
  """One LoRA adapter as read: its directory, rank, scale, and factors (float64) by module."""

  path: str
  r: int
  scale: float
  dropout: float
  a: dict  # module path -> A (in, r)
  b: dict  # module path -> B (r, out)

  def delta(self, module: str) -> np.ndarray:
    """ΔW (in, out) = s·A·B of one module it adapts."""
    return self.scale * (self.a[module] @ self.b[module])


@dataclasses.dataclass
class Merged:
  """A merge's result: LoRA factors at scale 1 (alpha = r) or, unfactored, ΔW per module.

  Attributes:
    method: the method applied (with `peft_compatible` and one adapter: linear, as PEFT).
    modules: the adapted module paths, sorted.
    rank: the LoRA rank of `leaves`; None when the result is `deltas` only.
    leaves: {'<module>/lora_a': (in, r), '<module>/lora_b': (r, out)}, float32.
    deltas: {module: ΔW (in, out)}, float32, when the result is not factored.
    dropout: the first adapter's lora_dropout (PEFT's merged adapter copies its config).
  """

  method: str
  modules: tuple
  rank: Optional[int] = None
  leaves: dict = dataclasses.field(default_factory=dict)
  deltas: dict = dataclasses.field(default_factory=dict)
  dropout: float = 0.0

  def delta(self, module: str) -> np.ndarray:
    """What the merge adds to a module's kernel: ΔW (in, out), float64."""
    if module in self.deltas:
      return np.asarray(self.deltas[module], np.float64)
    a, b = (np.asarray(self.leaves[f"{module}/{n}"], np.float64) for n in ("lora_a", "lora_b"))
    return a @ b

  def spec(self) -> Optional[lora.Lora]:
    """The ftjax LoRA spec of the factors (alpha = r: scale 1), or None for ΔW only."""
    if self.rank is None:
      return None
    return lora.Lora(frozenset(self.modules), self.rank, float(self.rank), 1.0, self.dropout)

  def lora_fields(self) -> Optional[dict]:
    """`peft.lora` config fields of the factors (as `hf_adapter.load` gives), or None."""
    if self.rank is None:
      return None
    return {"r": self.rank, "alpha": float(self.rank), "dropout": self.dropout,
            "rslora": False, "dora": False, "targets": [f"^{m}/kernel$" for m in self.modules]}


def dare_mask(seed: int, module: str, index: int, shape: tuple, density: float,
              part: str = "delta") -> np.ndarray:
  """DARE's keep mask (each entry kept with probability `density`) for adapter `index`'s
  tensor `part` (delta: ΔW (in, out); a: A (in, r); b: B (r, out)) of `module`: a pure function
  of its arguments, so a merge is reproducible and a test can draw the same mask."""
  rng = np.random.default_rng([seed, zlib.crc32(module.encode()), index, _PARTS[part]])
  return rng.random(shape) < density


def prune_magnitude(x: np.ndarray, density: float) -> np.ndarray:
  """Keeps the int(density·size) entries largest in magnitude (PEFT's magnitude pruning)."""
  if density >= 1:
    return x
  k = int(density * x.size)
  flat = x.reshape(-1)
  kept = np.zeros_like(flat)
  if k:
    top = np.argpartition(-np.abs(flat), k - 1)[:k]
    kept[top] = flat[top]
  return kept.reshape(x.shape)


def combine(tensors: Sequence[np.ndarray], weights: Sequence[float], method: str,
            density: Optional[float] = None, masks: Optional[Sequence[np.ndarray]] = None
            ) -> np.ndarray:
  """PEFT merge_utils' combination of same-shaped task tensors: linear (Σ w·x), ties (magnitude
  pruning, sign election by total, disjoint mean), dare_linear / dare_ties (DARE's rescaled
  random drop by `masks`, then a weighted sum / as ties). Pruning is off at density 1."""
  x = np.stack(tensors)
  w = np.asarray(weights, x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
  if method != "linear" and density < 1:
    if method == "ties":
      x = np.stack([prune_magnitude(t, density) for t in x])
    else:
      x = np.where(np.stack(masks), x / density, 0.0)
  if method in ("linear", "dare_linear"):
    return (w * x).sum(0)
  elected = np.where(x.sum(0) >= 0, 1.0, -1.0)  # the sign of the unweighted total
  agree = np.sign(x) == elected  # zeros (pruned entries) never count
  return (w * x * agree).sum(0) / np.maximum(agree.sum(0), 1)


def truncated_svd(p: np.ndarray, q: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, float]:
  """(A (in, rank), B (rank, out), relative Frobenius error) of the best rank-`rank` factoring of
  ΔW = p·q (a dense ΔW: q = None), B carrying the singular values as PEFT's lora_B does.
  Low-rank products are factored through QR, exactly, without forming ΔW."""
  if q is None:
    u, s, vt = np.linalg.svd(p, full_matrices=False)
  else:
    qp, rp = np.linalg.qr(p)
    qq, rq = np.linalg.qr(q.T)
    u, s, vt = np.linalg.svd(rp @ rq.T, full_matrices=False)
    u, vt = qp @ u, vt @ qq.T
  k = min(rank, len(s))
  a = np.zeros((u.shape[0], rank))
  b = np.zeros((rank, vt.shape[1]))
  a[:, :k], b[:k] = u[:, :k], s[:k, None] * vt[:k]
  total = float(np.sum(s * s))
  error = math.sqrt(float(np.sum(s[k:] ** 2)) / total) if total else 0.0
  return a, b, error


def context(model_dir: str) -> tuple[Context, dict]:
  """(the PEFT context of a base model, its parameter shapes by path), without its weights."""
  if not os.path.isdir(model_dir):
    raise UserError(f"--model: directory not found: {model_dir}")
  plan = assembly.plan(model_dir)
  return Context(plan.config, plan.family, tuple(plan.base_paths)), plan.base_shapes


def read_adapter(adapter_dir: str, ctx: Context, shapes: dict) -> Adapter:
  """A LoRA adapter directory, checked against the base's kernel shapes.

  Raises:
    UserError: for a missing directory, another PEFT method, DoRA, trained base tensors
      (modules_to_save), or factors that do not fit the base.
  """
  if not os.path.isdir(adapter_dir):
    raise UserError(f"--adapter: directory not found: {adapter_dir}")
  config, _ = hf_adapter.read_config(adapter_dir, "--adapter")
  if config.get("peft_type") != "LORA":
    raise UserError(f"--adapter: {adapter_dir} has peft_type {config.get('peft_type')}: only LoRA "
                    "adapters merge")
  if config.get("use_dora"):
    raise UserError(f"--adapter: {adapter_dir} is a DoRA adapter: its magnitude vectors do not "
                    "combine (PEFT's add_weighted_adapter does not refuse them, it drops them)")
  if not os.path.isfile(os.path.join(adapter_dir, "adapter_model.safetensors")):
    raise UserError(f"--adapter: {adapter_dir} has no adapter_model.safetensors")
  _, fields, leaves, trained = hf_adapter.load(adapter_dir, ctx)
  if trained:
    raise UserError(f"--adapter: {adapter_dir} also trains base tensors (modules_to_save, e.g. "
                    f"{sorted(trained)[0]}), which a LoRA merge cannot combine")
  r, a, b = fields["r"], {}, {}
  for path, value in leaves.items():
    module, leaf = path.rsplit("/", 1)
    in_f, out_f = shapes[f"{module}/kernel"].shape
    want = (in_f, r) if leaf == "lora_a" else (r, out_f)
    if value.shape != want:
      raise UserError(f"--adapter: {adapter_dir}: {module} {leaf} has shape {value.shape}, "
                      f"this base and r={r} need {want} (made over another model?)")
    (a if leaf == "lora_a" else b)[module] = np.asarray(value, np.float64)
  scale = lora.scale(LoraConfig(r=r, alpha=fields["alpha"], rslora=fields["rslora"]))
  return Adapter(adapter_dir, r, scale, fields["dropout"], a, b)


def check_arguments(method: str, count: int, weights: Sequence[float], density: Optional[float],
                    rank: Optional[int], peft_compatible: bool, factored: bool = True) -> None:
  """Refuses arguments that do not fit the method, each with a one-line UserError."""
  if method not in METHODS:
    raise UserError(f"--method: {method!r} is not one of {', '.join(METHODS)}")
  if count < 1:
    raise UserError("--adapter: give at least one adapter directory")
  if len(weights) != count:
    raise UserError(f"--weights: {len(weights)} weight(s) for {count} adapter(s)")
  if not all(math.isfinite(w) for w in weights):
    raise UserError(f"--weights: {list(weights)} holds a non-finite weight")
  if method in PRUNING and density is None:
    raise UserError(f"--density is required for --method {method} (the fraction kept, in (0, 1])")
  if method not in PRUNING and density is not None:
    raise UserError(f"--density applies to {', '.join(PRUNING)}, not --method {method}")
  if density is not None and not 0 < density <= 1:
    raise UserError(f"--density {density} is outside (0, 1]")
  if rank is not None:
    if rank < 1:
      raise UserError(f"--rank must be at least 1, got {rank}")
    svd_form = method == "svd" or (method in PRUNING and not peft_compatible and factored)
    if not svd_form:
      raise UserError(f"--rank applies to svd, and to {', '.join(PRUNING)} factored for "
                      f"--to peft without --peft-compatible; not here (--method {method})")


def parse_weights(text: Optional[str], count: int) -> list[float]:
  """`--weights w1,w2,...` as floats (default: 1 for each of `count` adapters)."""
  if text is None:
    return [1.0] * count
  try:
    return [float(w) for w in text.split(",")]
  except ValueError:
    raise UserError(f"--weights: {text!r} is not a comma-separated list of numbers") from None


def merge_adapters(model_dir: str, adapter_dirs: Sequence[str],
                   weights: Optional[Sequence[float]] = None, method: str = "svd",
                   density: Optional[float] = None, rank: Optional[int] = None, seed: int = 0,
                   peft_compatible: bool = False, factored: bool = True) -> Merged:
  """Combines LoRA adapters made over one base model (see the module docstring).

  Args:
    model_dir: the base model directory the adapters were made over.
    adapter_dirs: HF PEFT LoRA adapter directories.
    weights: one per adapter (default: all 1); negative ones subtract.
    method: linear | cat | svd | ties | dare_linear | dare_ties.
    density: the fraction kept by ties / dare_* pruning, in (0, 1].
    rank: the SVD rank of svd and the factored ΔW forms (default: the largest adapter rank).
    seed: DARE's mask seed (`dare_mask`).
    peft_compatible: ties / dare_* on the factors, as PEFT does (and PEFT's fallback to
      linear for a single adapter).
    factored: False leaves the ΔW forms of ties / dare_* unfactored (`Merged.deltas`, exact).

  Raises:
    UserError: naming the argument, adapter or module that does not fit.
  """
  weights = [1.0] * len(adapter_dirs) if weights is None else [float(w) for w in weights]
  check_arguments(method, len(adapter_dirs), weights, density, rank, peft_compatible, factored)
  ctx, shapes = context(model_dir)
  adapters = [read_adapter(d, ctx, shapes) for d in adapter_dirs]
  return combine_adapters(adapters, weights, method, density, rank, seed, peft_compatible,
                          factored)


def combine_adapters(adapters: Sequence[Adapter], weights: Sequence[float], method: str,
                     density: Optional[float] = None, rank: Optional[int] = None, seed: int = 0,
                     peft_compatible: bool = False, factored: bool = True) -> Merged:
  """`merge_adapters` over adapters already read (arguments as there, already checked)."""
  if peft_compatible and len(adapters) == 1 and method != "linear":
    logger.info(f"--peft-compatible: one adapter, so {method} becomes linear (as PEFT does)")
    method = "linear"
  blend = method == "linear" or (peft_compatible and method in PRUNING)
  ranks = [ad.r for ad in adapters]
  if blend and len(set(ranks)) > 1:
    what = "linear" if method == "linear" else f"--peft-compatible {method}"
    raise UserError(f"--method {what} blends the factors, which needs equal ranks (got r = "
                    f"{', '.join(map(str, ranks))}); use cat, svd or {method} on ΔW instead")
  modules = tuple(sorted(set().union(*(ad.a for ad in adapters))))
  merged = Merged(method, modules, dropout=adapters[0].dropout)
  if method == "cat":
    merged.rank, merged.leaves = sum(ranks), _cat(adapters, weights, modules, sum(ranks))
  elif blend:
    merged.rank = ranks[0]
    merged.leaves = _blend(adapters, weights, modules, method, density, seed)
  else:
    _delta_form(merged, adapters, weights, density, rank or max(ranks), seed, factored)
  return merged


def _present(adapters: Sequence[Adapter], weights: Sequence[float], module: str) -> list:
  """(index, adapter, weight) of the adapters that adapt `module` (PEFT skips the others)."""
  return [(i, ad, w) for i, (ad, w) in enumerate(zip(adapters, weights)) if module in ad.a]


def _cat(adapters, weights, modules, rank) -> dict:
  """PEFT's cat: A = [w_i·s_i·A_i], B = [B_i], the adapters that miss a module zero-padded."""
  leaves = {}
  for m in modules:
    present = _present(adapters, weights, m)
    a = np.concatenate([w * ad.scale * ad.a[m] for _, ad, w in present], axis=1)
    b = np.concatenate([ad.b[m] for _, ad, _ in present], axis=0)
    pad = rank - a.shape[1]
    leaves[f"{m}/lora_a"] = np.pad(a, ((0, 0), (0, pad))).astype(np.float32)
    leaves[f"{m}/lora_b"] = np.pad(b, ((0, pad), (0, 0))).astype(np.float32)
  return leaves


def _blend(adapters, weights, modules, method, density, seed) -> dict:
  """PEFT's factor methods: `combine` over the A_i with weights ±√|w_i·s_i| (the sign on A
  only) and over the B_i with √|w_i·s_i|."""
  leaves = {}
  for m in modules:
    present = _present(adapters, weights, m)
    root = [math.sqrt(abs(w * ad.scale)) for _, ad, w in present]
    signs = [1.0 if w * ad.scale >= 0 else -1.0 for _, ad, w in present]
    for part, ws in (("a", [s * r for s, r in zip(signs, root)]), ("b", root)):
      tensors = [getattr(ad, part)[m] for _, ad, _ in present]
      masks = None
      if method.startswith("dare") and density < 1:
        masks = [dare_mask(seed, m, i, t.shape, density, part)
                 for (i, _, _), t in zip(present, tensors)]
      leaves[f"{m}/lora_{part}"] = combine(tensors, ws, method, density, masks).astype(np.float32)
  return leaves


def _delta_form(merged: Merged, adapters, weights, density, rank, seed, factored) -> None:
  """svd, and ties / dare_* on ΔW: fills `merged` with factors of rank `rank`, or (ties / dare_*
  unfactored) with the exact ΔW."""
  method, worst = merged.method, (0.0, "")
  for m in merged.modules:
    present = _present(adapters, weights, m)
    if method == "svd":  # Σ w·s·A·B, factored through its low-rank form
      p = np.concatenate([w * ad.scale * ad.a[m] for _, ad, w in present], axis=1)
      a, b, error = truncated_svd(p, np.concatenate([ad.b[m] for _, ad, _ in present]), rank)
    else:
      deltas = [ad.delta(m) for _, ad, _ in present]
      masks = None
      if method.startswith("dare") and density < 1:
        masks = [dare_mask(seed, m, i, d.shape, density) for (i, _, _), d in zip(present, deltas)]
      delta = combine(deltas, [w for _, _, w in present], method, density, masks)
      if not factored:
        merged.deltas[m] = delta.astype(np.float32)
        continue
      a, b, error = truncated_svd(delta, None, rank)
    merged.leaves[f"{m}/lora_a"], merged.leaves[f"{m}/lora_b"] = (
        a.astype(np.float32), b.astype(np.float32))
    worst = max(worst, (error, m))
  if not factored and method != "svd":
    logger.info(f"{method}: the combined ΔW of {len(merged.modules)} module(s) is merged exactly "
                "(no SVD)")
    return
  merged.rank = rank
  what = "Σ w·ΔW" if method == "svd" else "the combined ΔW"
  logger.info(f"{method}: {what} of each module factored by truncated SVD to rank {rank} (--rank; "
              f"default: the adapters' largest rank); largest relative error {worst[0]:.2e}"
              + (f" ({worst[1]})" if worst[1] else ""))


def write_peft(merged: Merged, model_dir: str, out_dir: str) -> str:
  """Writes factors as an HF PEFT LoRA adapter over `model_dir` (alpha = r: scale 1)."""
  spec = merged.spec()
  if spec is None:
    raise UserError(f"--to peft: this {merged.method} merge was left as ΔW (factored=False)")
  ctx, _ = context(model_dir)
  hf_adapter.save(out_dir, spec, merged.leaves, set(), ctx, os.path.abspath(model_dir))
  return out_dir


def write_hf(merged: Merged, model_dir: str, out_dir: str) -> str:
  """Writes the base model with each ΔW added to its kernel, as an HF model directory (the
  base's dtype, config and tokenizer files)."""
  loaded = hf.load(model_dir)
  flat = tree.flatten(loaded.params)
  for m in merged.modules:
    kernel = np.asarray(flat[f"{m}/kernel"], np.float64)
    flat[f"{m}/kernel"] = (kernel + merged.delta(m)).astype(np.float32)
  hf.save_model(out_dir, tree.unflatten(flat), model_dir, loaded.family, "auto")
  return out_dir


def merge(model_dir: str, adapter_dirs: Sequence[str], to: str, out_dir: str,
          weights: Optional[Sequence[float]] = None, method: str = "svd",
          density: Optional[float] = None, rank: Optional[int] = None, seed: int = 0,
          peft_compatible: bool = False) -> str:
  """Merges adapters (see `merge_adapters`) and writes a PEFT adapter (`to` peft) or a merged
  HF model (`to` hf) to `out_dir`, which must be new or empty; returns `out_dir`."""
  if to not in ("peft", "hf"):
    raise UserError(f"--to: {to!r} is not peft or hf")
  if os.path.isfile(out_dir) or (os.path.isdir(out_dir) and os.listdir(out_dir)):
    raise UserError(f"--out: {out_dir} already exists and is not empty (choose a new directory)")
  merged = merge_adapters(model_dir, adapter_dirs, weights, method, density, rank, seed,
                          peft_compatible, factored=to == "peft")
  return (write_peft if to == "peft" else write_hf)(merged, model_dir, out_dir)


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m ftjax.merge",
                                   description="Combine HF PEFT LoRA adapters made over one base.")
  parser.add_argument("--model", required=True, help="the base model directory")
  parser.add_argument("--adapter", required=True, action="append",
                      help="an HF PEFT LoRA adapter directory (repeat for each)")
  parser.add_argument("--weights", help="w1,w2,... one per adapter (default: all 1; with a "
                      "negative first one write --weights=-1,1)")
  parser.add_argument("--method", required=True, choices=METHODS)
  parser.add_argument("--density", type=float, help="ties, dare_*: the fraction kept, in (0, 1]")
  parser.add_argument("--rank", type=int, help="svd (and ties/dare_* --to peft): the SVD rank "
                      "(default: the adapters' largest)")
  parser.add_argument("--seed", type=int, default=0, help="dare_*: the random drop's seed")
  parser.add_argument("--peft-compatible", action="store_true",
                      help="ties/dare_* on the A and B factors, as HF PEFT does")
  parser.add_argument("--to", required=True, choices=("peft", "hf"))
  parser.add_argument("--out", required=True, help="the directory to write (new or empty)")
  args = parser.parse_args(argv)
  metrics.console()
  try:
    weights = parse_weights(args.weights, len(args.adapter))
    out = merge(args.model, args.adapter, args.to, args.out, weights, args.method, args.density,
                args.rank, args.seed, args.peft_compatible)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.method} merge of {len(args.adapter)} adapter(s) --to {args.to} in {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
