"""Fighting forgetting: penalties that pull the trained parameters back to where they started.

`l2sp` (Li et al., 2018) and `ewc` (Kirkpatrick et al., 2017) are Optax transforms that add the
gradient of a quadratic penalty around the starting point θ₀ to the incoming gradient:

    l2sp:  λ/2·Σ (θ − θ₀)²       adds λ(θ − θ₀)
    ewc:   λ/2·Σ F(θ − θ₀)²      adds λ·F⊙(θ − θ₀)

θ₀ is a copy of the parameters given to `init`, and EWC's Fisher F a copy of the one given; both
live in the transform's state, so they are saved and resumed with the optimizer state. Leaves a
`mask` leaves out get nothing and store nothing (None in the state). Put the transform first,
before clipping, so that everything after it sees the gradient of loss + penalty:

    tx = optax.chain(regularize.l2sp(0.01, mask), optax.clip_by_global_norm(1.0),
                     optax.adamw(1e-4))

In ftjax's train step the gradient is per trained token, so λ weighs the penalty against the
per-token loss. `fisher` computes the diagonal empirical Fisher over examples; `save` / `load`
keep it as safetensors (a run stores it as `ewc_fisher.safetensors`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ftjax import tree
from ftjax.config import RegularizeConfig
from ftjax.loss import LossFn

Mask = Union[Any, Callable[[Any], Any]]  # a tree of bools like params, or params -> such a tree


class L2SPState(NamedTuple):
  anchor: Any  # θ₀: the parameters given to `init` (None where masked out)


class EWCState(NamedTuple):
  anchor: Any  # θ₀: the parameters given to `init` (None where masked out)
  fisher: Any  # F, fp32 (None where masked out)


def _is_none(x: Any) -> bool:
  return x is None


def _kept(mask: Optional[Mask], params: Any) -> Any:
  """`mask` (a tree, a prefix of one, or a callable) as a tree of bools shaped like `params`."""
  if mask is None:
    return jax.tree.map(lambda _: True, params)
  if callable(mask):
    mask = mask(params)
  return jax.tree.broadcast(mask, params)


def _copy(x: Any, like: Any, dtype: Any = None) -> jax.Array:
  """A new buffer holding `x`, placed like `like`: the train step donates the parameters, so
  the state must not share their buffers, and a state committed to other devices than the
  parameters would compile the step twice."""
  out = jnp.array(x, dtype=dtype, copy=True)
  if isinstance(like, jax.Array) and not isinstance(like, jax.core.Tracer) and like.committed:
    out = jax.device_put(out, like.sharding)
  return out


def _pull(lam: float, a: Optional[jax.Array], w: Optional[jax.Array], g: jax.Array,
          p: jax.Array) -> jax.Array:
  """g + λ·w⊙(p − a) in fp32 (w = 1 for L2-SP), in g's dtype; g where the leaf is masked out."""
  if a is None:
    return g
  d = p.astype(jnp.float32) - a.astype(jnp.float32)
  pull = lam * d if w is None else lam * (w * d)
  return (g.astype(jnp.float32) + pull).astype(g.dtype)


def _need_params(name: str, params: Any) -> None:
  if params is None:
    raise ValueError(f"{name}: update needs the current parameters: "
                     "tx.update(grads, state, params)")


def l2sp(lam: float, mask: Optional[Mask] = None) -> optax.GradientTransformation:
  """Adds λ(θ − θ₀), the gradient of λ/2·|θ − θ₀|², to the updates (L2-SP).

  Args:
    lam: the penalty's weight λ.
    mask: a tree of bools like the parameters (or a prefix of one, or a function params ->
      such a tree), as `optax.add_decayed_weights`' mask: False leaves get no penalty, and no
      copy of them is kept.

  Returns:
    A transform whose state holds θ₀, a copy of the parameters given to `init`; its `update`
    needs the current parameters.
  """
  def init_fn(params):
    anchor = jax.tree.map(lambda p, keep: _copy(p, p) if keep else None, params,
                          _kept(mask, params))
    return L2SPState(anchor)

  def update_fn(updates, state, params=None):
    _need_params("l2sp", params)
    updates = jax.tree.map(lambda a, g, p: _pull(lam, a, None, g, p), state.anchor, updates,
                           params, is_leaf=_is_none)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


def ewc(lam: float, fisher: Any, mask: Optional[Mask] = None) -> optax.GradientTransformation:
  """Adds λ·F⊙(θ − θ₀), the gradient of λ/2·Σ F(θ − θ₀)², to the updates (elastic weight
  consolidation).

  Args:
    lam: the penalty's weight λ.
    fisher: F, a tree shaped like the parameters the transform is given (see `fisher`).
    mask: as `l2sp`'s: False leaves get no penalty, and neither θ₀ nor F is kept for them.

  Returns:
    A transform whose state holds θ₀ (a copy of the parameters given to `init`) and an fp32
    copy of F, so both checkpoint with the optimizer state (twice the kept leaves' size); its
    `update` needs the current parameters.

  Raises:
    ValueError (at `init`): when `fisher` does not match the parameters.
  """
  def init_fn(params):
    _check_like(fisher, params)
    keep = _kept(mask, params)
    anchor = jax.tree.map(lambda p, k: _copy(p, p) if k else None, params, keep)
    weights = jax.tree.map(lambda p, k, f: _copy(f, p, jnp.float32) if k else None, params, keep,
                           fisher)
    return EWCState(anchor, weights)

  def update_fn(updates, state, params=None):
    _need_params("ewc", params)
    updates = jax.tree.map(lambda a, w, g, p: _pull(lam, a, w, g, p), state.anchor, state.fisher,
                           updates, params, is_leaf=_is_none)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


def _names(t: Any) -> dict[str, tuple]:
  """'/'-joined key path -> shape, for every leaf of `t`."""
  flat, _ = jax.tree_util.tree_flatten_with_path(t)
  return {jax.tree_util.keystr(k, simple=True, separator="/"): tuple(np.shape(v))
          for k, v in flat}


def _check_like(fisher: Any, params: Any) -> None:
  """ValueError naming the first leaves where the Fisher tree and the parameters differ."""
  want, got = _names(params), _names(fisher)
  bad = sorted(set(want) ^ set(got)) or sorted(p for p in want if want[p] != got[p])
  if bad:
    detail = ", ".join(f"{p} (parameter {want.get(p, 'missing')}, Fisher {got.get(p, 'missing')})"
                       for p in bad[:3])
    raise ValueError(f"ewc: the Fisher tree does not match the parameters at {len(bad)} "
                     f"leaf/leaves: {detail}")


def fisher(loss_fn: LossFn, params: dict, frozen: dict, batches: Iterable[dict],
           context: Any = None) -> dict:
  """The diagonal empirical Fisher of the model at `params`: F = 1/N Σ_n (∇_θ L_n)², L_n the
  summed loss of example n (one example per row) and N the rows with a trained token.

  Args:
    loss_fn: a loss following ftjax.loss's contract (summed loss, `aux["tokens"]`); it is called
      on `tree.merge(params, frozen)` one row at a time, without dropout.
    params: the parameters to differentiate (the trainable part); F has their shape.
    frozen: the rest of the parameters.
    batches: host batches of (rows, length) arrays, as `ftjax.data.eval_batches` yields; rows
      without a trained token (padding rows) are not counted.
    context: passed to `loss_fn`.

  Returns:
    F as an fp32 tree shaped like `params`. Rows are differentiated one at a time in a jitted
    scan (one compilation per batch shape) whose carry is the running sum, so memory holds the
    model, the sum and one row's gradient, whatever the batch size.

  Raises:
    ValueError: when no row has a trained token.
  """
  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def add(total, rows, params, frozen, batch, context):
    def one_row(carry, row):
      sums, n = carry
      row = jax.tree.map(lambda x: x[None], row)

      def summed(p):
        loss_sum, aux = loss_fn(tree.merge(p, frozen), row, None, context)
        return loss_sum, aux["tokens"]

      grads, tokens = jax.grad(summed, has_aux=True)(params)
      used = tokens > 0
      sums = jax.tree.map(lambda s, g: s + jnp.where(used, jnp.square(g.astype(jnp.float32)), 0.0),
                          sums, grads)
      return (sums, n + used.astype(jnp.int32)), None

    (total, rows), _ = jax.lax.scan(one_row, (total, rows), batch)
    return total, rows

  total = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  rows = jnp.zeros((), jnp.int32)
  for batch in batches:
    total, rows = add(total, rows, params, frozen, {k: jnp.asarray(v) for k, v in batch.items()},
                      context)
  n = int(rows)
  if n == 0:
    raise ValueError("fisher: the batches hold no row with a trained token")
  return jax.tree.map(lambda s: s / n, total)


def save(path: str, fisher_tree: dict, metadata: Optional[dict] = None) -> str:
  """Writes a Fisher tree as safetensors (fp32; keys are the '/'-joined parameter paths), with
  `metadata` (what it was computed from) as JSON in the file's header."""
  import json  # pylint: disable=import-outside-toplevel

  from safetensors.numpy import save_file

  save_file({p: np.asarray(v, np.float32) for p, v in tree.flatten(fisher_tree).items()}, path,
            metadata={"ftjax": json.dumps(metadata or {})})
  return path


def load(path: str, with_metadata: bool = False) -> Any:
  """The Fisher tree `save` wrote (numpy fp32 arrays in a nested dict); with `with_metadata`,
  (tree, the metadata it was saved with)."""
  import json  # pylint: disable=import-outside-toplevel

  from safetensors import safe_open
  from safetensors.numpy import load_file

  fisher_tree = tree.unflatten(dict(load_file(path)))
  if not with_metadata:
    return fisher_tree
  with safe_open(path, "np") as f:
    meta = json.loads((f.metadata() or {}).get("ftjax", "{}"))
  return fisher_tree, meta


def transforms(cfg: RegularizeConfig, decay_mask: Any, fisher_tree: Any = None
               ) -> list[optax.GradientTransformation]:
  """The `regularize` section's transforms, to go first in the chain: L2-SP over the leaves
  that weight decay covers (`decay_mask`), EWC over every trainable leaf (`fisher_tree` needed
  when `regularize.ewc.lambda` is set)."""
  out = []
  if cfg.l2sp:
    out.append(l2sp(cfg.l2sp, decay_mask))
  if cfg.ewc.lam:
    if fisher_tree is None:
      raise ValueError("regularize.ewc.lambda is set, but no Fisher was given")
    out.append(ewc(cfg.ewc.lam, fisher_tree))
  return out
