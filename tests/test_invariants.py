"""The invariant checks hold on a real LoRA training and name the parameters of a broken one."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ftjax as fj
from ftjax import data, invariants, tree
from ftjax.loss import cross_entropy, logits_fn


def _batch():
  rng = np.random.default_rng(0)
  examples = []
  for n in (9, 14, 6, 12):
    tokens = rng.integers(3, 320, n).astype(np.int32)
    examples.append(data.Example(tokens, (np.arange(n) >= 2).astype(np.int32)))
  return data.collate([[ex] for ex in examples], 16, 0)


@dataclasses.dataclass
class Run:
  model: fj.Model
  before: dict  # every parameter before training, on the host
  after: dict  # every parameter after training
  state: fj.TrainState
  batch: dict


@pytest.fixture(scope="module")
def run(tiny_llama_dir):
  """Three adamw steps of LoRA on the tiny Llama."""
  model = fj.load_model(tiny_llama_dir, fj.PeftConfig(method="lora"), compute="fp32")
  params, frozen = model.split()
  before = jax.tree.map(np.asarray, model.params)
  tx = optax.adamw(1e-2)
  state = fj.init_state(jax.tree.map(jnp.copy, params), tx)  # the step donates its state
  step = fj.make_train_step(cross_entropy(logits_fn(model.module)), tx)
  batch = _batch()
  for _ in range(3):
    state, _ = step(state, frozen, batch)
  return Run(model, before, tree.merge(state.params, frozen), state, batch)


def test_a_short_lora_training_keeps_every_invariant(run):
  trainable = run.model.trainable
  assert trainable and all("lora_" in p for p in trainable)
  invariants.frozen_unchanged(run.before, run.after, trainable)
  invariants.trainable_moved(run.before, run.after, trainable)
  invariants.no_frozen_opt_state(run.state.opt_state, trainable)
  invariants.no_frozen_opt_state(run.state.opt_state, trainable, params=run.before)
  invariants.identity_at_init(run.model, run.batch)


def _edited(params, changes):
  """`params` with the leaves at the paths of `changes` passed through their functions."""
  flat = dict(tree.flatten(params))
  flat.update({p: change(np.asarray(flat[p])) for p, change in changes.items()})
  return tree.unflatten(flat)


def test_a_changed_frozen_leaf_is_named(run):
  bumped = lambda x: np.where(np.arange(x.size).reshape(x.shape) == 7,
                              np.nextafter(x, np.inf), x)  # one entry, one ulp
  after = _edited(run.after, {"layers_1/mlp/up_proj/kernel": bumped,
                              "norm/scale": lambda x: x.astype(jnp.bfloat16)})  # same values
  with pytest.raises(AssertionError, match=r"2 parameter\(s\) frozen but changed: "
                     r"layers_1/mlp/up_proj/kernel, norm/scale$"):
    invariants.frozen_unchanged(run.before, after, run.model.trainable)
  with pytest.raises(AssertionError, match="missing after training: lm_head/kernel"):
    invariants.frozen_unchanged(run.before, tree.split(after, {"lm_head/kernel"})[1],
                                run.model.trainable)


def test_a_trained_leaf_that_did_not_move_is_named(run):
  path = "layers_0/self_attn/v_proj/lora_a"
  after = _edited(run.after, {path: lambda _: tree.flatten(run.before)[path]})
  with pytest.raises(AssertionError, match=f"1 parameter\\(s\\) trained but unchanged: {path}$"):
    invariants.trainable_moved(run.before, after, run.model.trainable)
  n = len(run.model.trainable)
  with pytest.raises(AssertionError, match=rf"{n} parameter\(s\) .* \(and {n - 5} more\)$"):
    invariants.trainable_moved(run.before, run.before, run.model.trainable)


def test_optimizer_state_over_frozen_leaves_is_named(run):
  trainable = run.model.trainable
  everything = optax.adamw(1e-2).init(run.model.params)  # built over all parameters
  frozen = len(tree.flatten(run.before)) - len(trainable)
  for params in (None, run.before):
    with pytest.raises(AssertionError, match=rf"{frozen} parameter\(s\) not trained but in the "
                       r"optimizer state: embed_tokens/embedding, layers_0/input_layernorm/scale"):
      invariants.no_frozen_opt_state(everything, trainable, params=params)
  missing = "layers_1/self_attn/q_proj/lora_b"
  partial = optax.adamw(1e-2).init(tree.split(run.state.params, trainable - {missing})[0])
  with pytest.raises(AssertionError, match=f"trained but absent from the optimizer state: "
                     f"{missing}$"):
    invariants.no_frozen_opt_state(partial, trainable)
  sgd = optax.sgd(1e-2).init(run.state.params)  # no buffers at all
  invariants.no_frozen_opt_state(sgd, trainable, complete=False)
  with pytest.raises(AssertionError, match="absent from the optimizer state"):
    invariants.no_frozen_opt_state(sgd, trainable)


@pytest.fixture(scope="module")
def base(tiny_llama_dir):
  return fj.load_model(tiny_llama_dir, compute="fp32")


@pytest.mark.parametrize("method, atol", [
    (fj.PeftConfig(method="lora", lora=fj.LoraConfig(targets=["all-linear"], dora=True)), 1e-5),
    (fj.PeftConfig(method="ia3"), 1e-6),
    (fj.PeftConfig(method="adapter"), 1e-6),
], ids=["dora", "ia3", "adapter"])
def test_fresh_methods_are_the_base_model(base, method, atol):
  invariants.identity_at_init(base.with_peft(method, seed=1), _batch(), atol=atol)


def test_trained_or_virtual_token_methods_are_not_the_identity(run, base):
  with pytest.raises(AssertionError, match=r"peft.method lora changes the base model's logits "
                     r"by up to .*; its \d+ parameter\(s\): layers_0/self_attn/q_proj/lora_a"):
    invariants.identity_at_init(run.model, run.batch, params=run.after)
  prompt = base.with_peft(fj.PeftConfig(method="prompt", prompt=fj.PromptConfig(init="random")))
  with pytest.raises(ValueError, match="prompt adds virtual tokens"):
    invariants.identity_at_init(prompt, run.batch)
