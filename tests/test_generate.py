"""Sampling knobs, stop tokens, and `python -m ftjax.generate` with a run or an adapter."""

import numpy as np
import pytest

import tiny
from ftjax import config, export, generate, hf, train


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
  return hf.load(tiny_llama_dir)


def _prompts(tiny_llama_dir, n=1):
  tok = hf.load_tokenizer(tiny_llama_dir)
  return [tok("the quick brown fox").input_ids] * n


@pytest.mark.slow
def test_top_k_one_and_tiny_top_p_are_greedy(model, tiny_llama_dir):
  prompts = _prompts(tiny_llama_dir, 2)
  want = generate.sample(model.module, model.params, prompts, 6)
  for knobs in ({"top_k": 1}, {"top_p": 1e-6}):
    got = generate.sample(model.module, model.params, prompts, 6, temperature=1.0, seed=3,
                          **knobs)
    assert got == want, knobs


@pytest.mark.slow
def test_sampling_is_seeded_and_stays_in_the_top_k(model, tiny_llama_dir):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  prompts = _prompts(tiny_llama_dir, 32)
  first = lambda **kw: [row[0] for row in generate.sample(model.module, model.params, prompts, 1,
                                                          temperature=1.0, **kw)]
  assert first(seed=1) == first(seed=1)
  assert first(seed=1) != first(seed=2)
  n = len(prompts[0])
  logits, _ = model.module.apply({"params": model.params}, jnp.asarray(prompts[:1]),
                                 jnp.arange(n)[None], jnp.ones((1, n), jnp.int32))
  top2 = set(np.argsort(-np.asarray(logits[0, -1]))[:2].tolist())
  drawn = first(seed=5, top_k=2)
  assert set(drawn) <= top2 and len(set(drawn)) == 2


def test_rows_stop_at_their_own_stop_token(model, tiny_llama_dir):
  prompts = _prompts(tiny_llama_dir, 1) + [_prompts(tiny_llama_dir)[0][:3]]
  free = generate.sample(model.module, model.params, prompts, 6)
  stop = free[0][2]
  got = generate.sample(model.module, model.params, prompts, 6, stop_ids=[stop])
  for row, full in zip(got, free):
    cut = full.index(stop) + 1 if stop in full else len(full)
    assert row == full[:cut]


@pytest.mark.slow
def test_generate_cli_run_equals_its_exported_adapter(tiny_llama_dir, reverse_data, tmp_path,
                                                      capsys):
  cfg = config.load(None, [f"model.path={tiny_llama_dir}", f"data.train={reverse_data[0]}",
                           f"train.output_dir={tmp_path / 'run'}", "peft.method=lora",
                           "data.format=prompt_completion", "data.seq_len=64", "train.steps=6",
                           "optim.lr=1e-2", "precision.compute=fp32"])
  train.run(cfg)
  export.export(str(tmp_path / "run"), "peft", str(tmp_path / "adapter"))
  prompt = tiny.reverse_records(1, seed=9)[0]["prompt"]
  outputs = []
  for words in (["--run", str(tmp_path / "run")],
                ["--model", tiny_llama_dir, "--adapter", str(tmp_path / "adapter")],
                ["--model", tiny_llama_dir]):
    capsys.readouterr()
    assert generate.main(words + ["--prompt", prompt, "--max-new-tokens", "8"]) == 0
    outputs.append(capsys.readouterr().out)
  assert outputs[0] == outputs[1] and outputs[0] != outputs[2]  # the adapter changed something
  assert generate.main(["--run", str(tmp_path / "run"), "--adapter", "x", "--prompt", "p"]) == 2

