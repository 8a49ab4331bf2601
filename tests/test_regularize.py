"""L2-SP and EWC against the gradients of their penalties, and the Fisher against PyTorch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers

import ftjax as fj
from ftjax import checkpoint, data, regularize, tree
from ftjax.loss import cross_entropy, logits_fn

LAM = 0.3


def _params(seed):
  rng = np.random.default_rng(seed)
  return {"a": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
          "b": {"c": jnp.asarray(rng.normal(size=(5,)), jnp.float32),
                "d": jnp.asarray(rng.normal(size=(2, 2)), jnp.float32)}}


MASK = {"a": True, "b": {"c": False, "d": True}}


def _penalty(start, weights):
  """θ -> λ/2·Σ w(θ − θ₀)² over the masked-in leaves."""
  def penalty(p):
    terms = jax.tree.map(lambda x, x0, w, keep: keep * jnp.sum(w * (x - x0) ** 2), p, start,
                         weights, MASK)
    return LAM / 2 * sum(jax.tree.leaves(terms))
  return penalty


@pytest.mark.parametrize("kind", ["l2sp", "ewc"])
def test_the_added_gradient_is_that_of_the_penalty(kind):
  start, now, grads = _params(0), _params(1), _params(2)
  fisher = jax.tree.map(jnp.abs, _params(3))
  ones = jax.tree.map(jnp.ones_like, start)
  weights = fisher if kind == "ewc" else ones
  tx = regularize.ewc(LAM, fisher, MASK) if kind == "ewc" else regularize.l2sp(LAM, MASK)
  state = tx.init(start)
  assert state.anchor["b"]["c"] is None  # no copy of a masked-out leaf is kept
  # From a zero gradient, the update is exactly λ·w⊙(θ − θ₀), as numpy computes it.
  zeros = jax.tree.map(jnp.zeros_like, grads)
  added, _ = tx.update(zeros, state, now)
  for path, x in tree.flatten(added).items():
    if path == "b/c":
      np.testing.assert_array_equal(x, 0.0)
      continue
    d = np.asarray(tree.flatten(now)[path]) - np.asarray(tree.flatten(start)[path])
    w = np.asarray(tree.flatten(weights)[path])
    np.testing.assert_array_equal(x, np.float32(LAM) * (w * d), err_msg=path)
  # From any gradient: the gradient plus jax.grad of the penalty; masked leaves untouched.
  out, _ = tx.update(grads, state, now)
  want = jax.grad(_penalty(start, weights))(now)
  for path, x in tree.flatten(out).items():
    g, w = tree.flatten(grads)[path], tree.flatten(want)[path]
    if path == "b/c":
      np.testing.assert_array_equal(x, g)
    else:
      np.testing.assert_allclose(np.asarray(x) - np.asarray(g), w, rtol=1e-5, atol=1e-6,
                                 err_msg=path)
  # At θ₀ there is nothing to add.
  same, _ = tx.update(grads, state, start)
  jax.tree.map(np.testing.assert_array_equal, same, grads)


def test_masks_may_be_functions_and_update_needs_the_parameters():
  start = _params(0)
  tx = regularize.l2sp(LAM, lambda p: jax.tree.map(lambda x: x.ndim == 2, p))
  state = tx.init(start)
  assert state.anchor["b"]["c"] is None and state.anchor["a"] is not None
  with pytest.raises(ValueError, match="needs the current parameters"):
    tx.update(start, state)
  with pytest.raises(ValueError, match="Fisher tree does not match.*b/d"):
    regularize.ewc(LAM, {"a": start["a"], "b": {"c": start["b"]["c"]}}).init(start)


def _distance(params, start):
  return float(optax.tree.norm(jax.tree.map(jnp.subtract, params, start)))


def _optimise(first, steps=100):
  """adamw on ½|θ − target|² from θ₀ = _params(0), after `first`."""
  start, target = _params(0), jax.tree.map(lambda x: x + 3.0, _params(0))
  tx = optax.chain(first, optax.adamw(0.05))
  grad = jax.grad(lambda p: 0.5 * optax.tree.norm(jax.tree.map(jnp.subtract, p, target),
                                                   squared=True))

  @jax.jit
  def step(p, s):
    u, s = tx.update(grad(p), s, p)
    return optax.apply_updates(p, u), s

  params, state = start, tx.init(start)
  for _ in range(steps):
    params, state = step(params, state)
  return params, start, target


def test_a_large_penalty_keeps_the_parameters_near_the_start():
  free, start, target = _optimise(optax.identity())
  held, _, _ = _optimise(regularize.l2sp(20.0))
  assert _distance(held, start) < 0.2 * _distance(free, start)
  # EWC holds only what the Fisher weighs: leaf `a` stays, the others move as without it.
  fisher = {"a": jnp.ones((3, 4)), "b": {"c": jnp.zeros(5), "d": jnp.zeros((2, 2))}}
  ewc, _, _ = _optimise(regularize.ewc(20.0, fisher))
  assert _distance(ewc["a"], start["a"]) < 0.2 * _distance(free["a"], start["a"])
  np.testing.assert_allclose(ewc["b"]["d"], free["b"]["d"], rtol=1e-6)


def _examples():
  """Five examples of several lengths, one without a trained token."""
  rng = np.random.default_rng(0)
  out = []
  for n, prompt in [(9, 3), (14, 5), (6, 6), (12, 2), (5, 1)]:
    tokens = rng.integers(3, 320, n).astype(np.int32)
    tokens[0] = 1
    mask = (np.arange(n) >= prompt).astype(np.int32)
    out.append(data.Example(tokens, mask))
  return out


def _torch_fisher(model_dir, examples):
  """1/N Σ_n (∇ L_n)² with L_n the summed next-token NLL over example n's trained tokens."""
  model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                        attn_implementation="eager")
  named = dict(model.named_parameters())
  sums = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in named.items()}
  used = 0
  for ex in examples:
    weights = torch.tensor(ex.loss_mask[1:], dtype=torch.float32)
    if not weights.any():
      continue
    tokens = torch.tensor(ex.tokens, dtype=torch.long)
    logp = torch.log_softmax(model(input_ids=tokens[None]).logits[0, :-1], dim=-1)
    nll = -logp.gather(1, tokens[1:, None])[:, 0]
    grads = torch.autograd.grad((nll * weights).sum(), list(named.values()))
    for k, g in zip(named, grads):
      sums[k] += g.double() ** 2
    used += 1
  return {k: (v / used).detach().numpy() for k, v in sums.items()}


def test_the_fisher_equals_pytorch(tiny_llama_dir, tmp_path):
  model = fj.load_model(tiny_llama_dir, compute="fp32")
  params, frozen = model.split()
  examples = _examples()
  batches = list(data.eval_batches(examples, 4, 16, 0))
  assert len(batches) == 2 and batches[1]["segment_ids"][1:].max() == 0  # 3 padding rows
  ours = regularize.fisher(cross_entropy(logits_fn(model.module)), params, frozen, batches)
  want = _torch_fisher(tiny_llama_dir, examples)
  flat = tree.flatten(ours)
  assert set(flat) == set(tree.flatten(params))
  top = max(float(np.max(v)) for v in want.values())
  for path, x in flat.items():
    name, transposed = model.family.to_hf(path)
    ref = want[name].T if transposed else want[name]
    assert x.dtype == jnp.float32
    np.testing.assert_allclose(x, ref, rtol=0, atol=1e-5 * top, err_msg=path)
  # It is stored and read back as safetensors, keyed by parameter path.
  back = regularize.load(regularize.save(str(tmp_path / "ewc_fisher.safetensors"), ours))
  assert set(tree.flatten(back)) == set(flat)
  jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, ours))


def test_ewc_trains_and_resumes_through_the_step_and_a_checkpoint(tiny_llama_dir, tmp_path):
  model = fj.load_model(tiny_llama_dir, fj.PeftConfig(method="lora"), compute="fp32")
  params, frozen = model.split()
  loss_fn = cross_entropy(logits_fn(model.module))
  batch = next(data.eval_batches(_examples()[:4], 4, 16, 0))
  fisher = regularize.fisher(loss_fn, params, frozen, [batch])
  start = jax.tree.map(np.asarray, params)

  # At the start lora_b = 0, so lora_a has no gradient and no Fisher: only lora_b is held.
  assert all(not np.any(v) for p, v in tree.flatten(fisher).items() if p.endswith("lora_a"))
  only_b = lambda p: tree.mask(p, {q for q in tree.flatten(p) if q.endswith("lora_b")})
  tx = optax.chain(regularize.ewc(1e6, fisher, only_b), optax.adamw(1e-2))
  held = fj.init_state(jax.tree.map(jnp.copy, params), tx)  # the step donates its state
  step = fj.make_train_step(loss_fn, tx)
  for _ in range(20):
    held, _ = step(held, frozen, batch)
  # Adam moves every free entry by about the learning rate a step; EWC holds lora_b back.
  moved = {p: np.mean(np.abs(v - tree.flatten(start)[p]))
           for p, v in tree.flatten(held.params).items()}
  a = np.mean([v for p, v in moved.items() if p.endswith("lora_a")])
  b = np.mean([v for p, v in moved.items() if p.endswith("lora_b")])
  assert a > 0.02 and b < 0.2 * a, (a, b)
  # θ₀ and F sit in the optimizer state and come back from a checkpoint with it.
  saver = checkpoint.Checkpointer(str(tmp_path), every=1, keep=1)
  saver.save(20, held, {})
  saver.manager.wait_until_finished()
  restored, _ = saver.restore(20, held)
  saver.close()
  anchor, weights = (tree.flatten(t) for t in restored.opt_state[0])
  assert set(anchor) == set(weights) == set(moved)
  for path, x0 in tree.flatten(start).items():
    if path.endswith("lora_a"):  # masked out: nothing kept
      assert anchor[path] is None and weights[path] is None
    else:
      np.testing.assert_array_equal(anchor[path], x0)
      np.testing.assert_array_equal(weights[path], tree.flatten(fisher)[path])
