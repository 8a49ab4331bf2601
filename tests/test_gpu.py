"""GPU-only checks (skipped elsewhere; run on a GPU machine with JAX_PLATFORMS=cuda): cuDNN's
fused attention gives the XLA attention's logits and gradients in bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from ftjax import hf, loss, peft, tree
from ftjax.config import PeftConfig, PromptConfig

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")


def _batch(n=64):
  tokens = np.random.default_rng(0).integers(3, 320, size=(4, n)).astype(np.int32)
  segment_ids = (np.arange(n)[None] < np.array([[n], [40], [17], [3]])).astype(np.int32)
  return {"tokens": tokens, "positions": np.broadcast_to(np.arange(n), tokens.shape),
          "segment_ids": segment_ids, "loss_mask": segment_ids}


@pytest.mark.parametrize("family,prompt", [("llama", False), ("llama", True), ("gpt2", False),
                                           ("bert", False)])
def test_cudnn_attention_equals_xla(family, prompt, tmp_path):
  tiny.save_model(str(tmp_path), family, hidden_size=128) if family != "gpt2" else \
      tiny.save_model(str(tmp_path), family, n_embd=128)
  loaded = hf.load(str(tmp_path), jnp.bfloat16)
  spec = peft.NONE
  params = loaded.params
  if prompt:
    cfg = PeftConfig(method="prompt", prompt=PromptConfig(length=5))
    spec = peft.build_spec(cfg, list(tree.flatten(params)), loaded.config)
    params = peft.init(loaded.module.clone(peft=spec), params, jax.random.PRNGKey(0))
  batch = _batch()
  mask = batch["segment_ids"].astype(bool)

  def run(attention):
    module = loaded.module.clone(peft=spec, attention=attention)
    apply = lambda p: module.apply({"params": p}, batch["tokens"], batch["positions"],
                                   batch["segment_ids"])[0]
    out = jax.jit(apply)(params)
    if family == "bert":
      grads = jax.jit(jax.grad(lambda p: jnp.sum(apply(p)[mask] ** 2)))(params)
    else:
      grads = jax.jit(jax.grad(lambda p: loss.token_losses(apply(p), batch)[0].sum()))(params)
    return np.asarray(out, np.float32), tree.flatten(grads)

  (out_x, g_x), (out_c, g_c) = run("xla"), run("cudnn")
  np.testing.assert_allclose(out_c[mask], out_x[mask], atol=3e-2, rtol=3e-2)
  for path in g_x:
    a, b = np.asarray(g_c[path], np.float32), np.asarray(g_x[path], np.float32)
    assert np.abs(a - b).max() <= 3e-2 * np.abs(b).max() + 1e-3, path
