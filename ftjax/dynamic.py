"""Dynamic partitions inside the jitted step: which parameters update is data, not code.

Both are Optax wrappers around the run's chain, so the train step is compiled once:

- `lisa(inner, ...)`: LISA (Pan et al. 2024, "Layerwise Importance Sampled AdamW"). Updates
  are counted in windows of `every`; in each window a seeded random choice of `k` decoder
  layers trains. Leaves of the other layers get a zero update, their gradients are left out of
  the chain (so clipping's global norm is the window's), and their optimizer state is kept as it
  was, bit for bit. Leaves outside the layers (embedding, final norm, head) keep their rules.
  The choice is a pure function of (seed, window index), and the window's layer mask is kept in
  the state, so resuming reproduces it. LMFlow's LISA rebuilds the optimizer at each switch and
  keeps the frozen layers' state; here nothing is rebuilt and nothing of the idle layers moves.
  Each layer keeps its own optimizer state, step count included (Adam's bias correction counts
  the updates of that layer, as torch's per-parameter state does); the lr schedule follows the
  run's steps. Windows count applied updates: a step skipped for non-finite gradients does not
  advance them.
- `sparse(inner, density)`: sparse fine-tuning by importance (as FISH masks, Sung et al. 2021):
  of each trainable tensor only its top `density` fraction of entries, by a score, trains. The
  chosen flat indices live in the state (`SparseState.index`, filled by `with_index` once the
  scores are known); the inner chain runs on the gathered entries only, so its state (Adam's
  moments) is `density` of the dense size plus 4 bytes of index per entry: the optimizer-state
  bytes `ftjax.partition` reports are these. Clipping sees the chosen entries' gradient norm.
  Until `with_index` is called no parameter moves. `scores_grad2` and `ftjax.regularize.fisher`
  give the scores; the train CLI scores the first `partition.sparse.warmup_steps` batches of
  the data order before step 1 (no update happens while scoring).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ftjax import tree


class LisaState(NamedTuple):
  groups: tuple  # the inner chain's state per group of leaves: each decoder layer, the rest
  count: jax.Array  # updates so far
  layers: jax.Array  # bool (num_layers,): the layers the current window trains


class LisaGradState(NamedTuple):
  count: jax.Array  # updates so far (the same count as LisaState's)


def lisa_layers(count: jax.Array, num_layers: int, k: int, every: int, seed: int) -> jax.Array:
  """The bool mask of the layers that train at update `count` (0-based)."""
  key = jax.random.fold_in(jax.random.PRNGKey(seed), count // every)
  chosen = jax.random.choice(key, num_layers, (min(k, num_layers),), replace=False)
  return jnp.zeros((num_layers,), bool).at[chosen].set(True)


def lisa_grads(layer_of: dict[str, Optional[int]], num_layers: int, k: int, every: int,
               seed: int = 0) -> optax.GradientTransformation:
  """Zeroes the gradients of the layers outside the current LISA window: put it ahead of
  clipping, so that the global norm is the window's."""
  def update(grads, state, params=None):
    del params
    on = lisa_layers(state.count, num_layers, k, every, seed)
    flat = tree.flatten(grads)
    out = {p: g if layer_of[p] is None else jnp.where(on[layer_of[p]], g, jnp.zeros_like(g))
           for p, g in flat.items()}
    return tree.unflatten(out), LisaGradState(state.count + 1)
  return optax.GradientTransformation(lambda _: LisaGradState(jnp.zeros((), jnp.int32)), update)


def _only_if(active: jax.Array, updates: Any, new: Any, old: Any) -> tuple[Any, Any]:
  """(updates, new state) where `active`, else (zeros, the old state)."""
  return (jax.tree.map(lambda x: jnp.where(active, x, jnp.zeros_like(x)), updates),
          jax.tree.map(lambda n, o: jnp.where(active, n, o), new, old))


def lisa(inner: optax.GradientTransformation, layer_of: dict[str, Optional[int]],
         num_layers: int, k: int, every: int, seed: int = 0) -> optax.GradientTransformation:
  """`inner` restricted, window by window, to `k` random decoder layers (see the module
  docstring). `layer_of` maps each trainable leaf's path to its layer (None: outside layers).
  Each layer (and the leaves outside layers, together) has its own state of `inner`, updated
  only in the windows that train it, so its step count (Adam's bias correction) is its own, as
  with torch's per-parameter optimizer state. `inner` must be per-leaf (no global norm: clip
  before it) and its step-dependent parts (the lr schedule) belong after it."""
  groups = sorted({i for i in layer_of.values() if i is not None}) + [None]
  members = {g: sorted(p for p, i in layer_of.items() if i == g) for g in groups}
  groups = [g for g in groups if members[g]]

  def part(flat, g):
    return tree.unflatten({p: flat[p] for p in members[g]})

  def init(params):
    flat = tree.flatten(params)
    return LisaState(tuple(inner.init(part(flat, g)) for g in groups), jnp.zeros((), jnp.int32),
                     lisa_layers(jnp.zeros((), jnp.int32), num_layers, k, every, seed))

  def update(grads, state, params=None):
    on = lisa_layers(state.count, num_layers, k, every, seed)
    flat_g, flat_p = tree.flatten(grads), tree.flatten(params) if params is not None else None
    out, states = {}, []
    for g, old in zip(groups, state.groups):
      u, new = inner.update(part(flat_g, g), old, None if flat_p is None else part(flat_p, g))
      if g is not None:  # a layer: only inside its windows
        u, new = _only_if(on[g], u, new, old)
      out.update(tree.flatten(u))
      states.append(new)
    return tree.unflatten(out), LisaState(tuple(states), state.count + 1, on)

  return optax.GradientTransformation(init, update)


class SparseState(NamedTuple):
  inner: Any  # the inner chain's state over the chosen entries (1-D leaves)
  index: Any  # per leaf: int32 (k,) flat indices of the chosen entries
  ready: jax.Array  # whether `index` has been chosen (no update before)


def sparse_size(size: int, density: float) -> int:
  """How many entries of a tensor of `size` entries train: round(density * size), at least 1."""
  return max(1, min(size, int(round(density * size))))


def sparse(inner: optax.GradientTransformation, density: float) -> optax.GradientTransformation:
  """`inner` over the top `density` fraction of each leaf's entries (see the module
  docstring); the entries are chosen by `with_index`."""
  def gather(x, idx):
    return x.reshape(-1)[idx]

  def init(params):
    picked = jax.tree.map(lambda p: jnp.zeros((sparse_size(p.size, density),), p.dtype), params)
    index = jax.tree.map(lambda p: jnp.zeros((sparse_size(p.size, density),), jnp.int32), params)
    return SparseState(inner.init(picked), index, jnp.zeros((), bool))

  def update(grads, state, params=None):
    if params is None:
      raise ValueError("sparse needs the parameters")
    g = jax.tree.map(gather, grads, state.index)
    p = jax.tree.map(gather, params, state.index)
    u, new_inner = inner.update(g, state.inner, p)
    scatter = lambda full, idx, v: jnp.zeros(full.size, v.dtype).at[idx].set(
        jnp.where(state.ready, v, 0)).reshape(full.shape)
    updates = jax.tree.map(scatter, params, state.index, u)
    new_inner = jax.tree.map(lambda n, o: jnp.where(state.ready, n, o), new_inner, state.inner)
    return updates, state._replace(inner=new_inner)

  return optax.GradientTransformation(init, update)


def top_entries(scores: dict, density: float) -> dict:
  """Per leaf, the flat indices of its `sparse_size` highest scores (sorted ascending)."""
  def top(s):
    k = sparse_size(s.size, density)
    _, idx = jax.lax.top_k(s.reshape(-1).astype(jnp.float32), k)
    return jnp.sort(idx.astype(jnp.int32))
  return jax.tree.map(top, scores)


def _is_sparse(x: Any) -> bool:
  return isinstance(x, SparseState)


def sparse_state(opt_state: Any) -> SparseState:
  """The SparseState inside an optimizer state (alone, or in a chain's tuple)."""
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=_is_sparse) if _is_sparse(x)]
  if len(found) != 1:
    raise ValueError(f"expected one sparse state in the optimizer state, found {len(found)}")
  return found[0]


def with_index(opt_state: Any, index: dict) -> Any:
  """The optimizer state with the sparse entries chosen: from here on they (and only they)
  train. `opt_state` is the sparse transform's state, or a chain's holding it."""
  def choose(x):
    if not _is_sparse(x):
      return x
    new = jax.tree.map(lambda n, o: jax.device_put(n.astype(jnp.int32), o.sharding)
                       if isinstance(o, jax.Array) else n, index, x.index)
    return x._replace(index=new, ready=jnp.ones((), bool))
  return jax.tree.map(choose, opt_state, is_leaf=_is_sparse)


def mask_of(opt_state: Any, params: dict) -> dict:
  """A bool tree like `params`: True at the entries that train."""
  def mask(p, idx):
    return np.isin(np.arange(p.size), np.asarray(idx)).reshape(p.shape)
  return jax.tree.map(mask, params, sparse_state(opt_state).index)


def scores_grad2(loss_fn: Callable, params: dict, frozen: dict, batches, context: Any = None,
                 grad_accum: int = 1) -> dict:
  """Importance `grad2`: the sum over batches of each entry's squared batch gradient (the
  gradient the train step takes: the batch's summed loss over its trained tokens, in
  `grad_accum` micro-batches)."""
  from ftjax import step  # pylint: disable=import-outside-toplevel

  @jax.jit
  def one(params, frozen, batch):
    micro = {k: v.reshape(grad_accum, -1, *v.shape[1:]) for k, v in batch.items()}
    grads, _, aux = step.accumulate(params, frozen, micro, jax.random.PRNGKey(0), loss_fn,
                                    context=context)
    denom = jnp.maximum(aux["tokens"], 1.0)
    return jax.tree.map(lambda g: jnp.square(g / denom), grads)

  total = None
  for batch in batches:
    sq = one(params, frozen, batch)
    total = sq if total is None else jax.tree.map(jnp.add, total, sq)
  return total
