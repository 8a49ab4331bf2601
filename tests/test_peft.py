"""PEFT against HF PEFT: identity at init, adapters both ways, merged export, masks, bad input."""

import json
import os

import jax
import numpy as np
import peft as hf_peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import tiny
from conftest import REPO
from ftjax import checkpoint, config, data, export, generate, hf, loss, peft, train, tree


def _cfg(model_dir, *words, **overrides):
  base = [f"model.path={model_dir}", "data.train=unused", "data.format=prompt_completion",
          "data.seq_len=48", "precision.compute=fp32"]
  return config.load(None, base + list(words) + [f"{k}={v}" for k, v in overrides.items()])


def _batch():
  """Two rows, the second right-padded."""
  tokens = np.array([[1, 17, 90, 33, 250, 8, 61, 140], [1, 45, 12, 200, 7, 0, 0, 0]], np.int32)
  segment_ids = (np.arange(8)[None] < np.array([[8], [5]])).astype(np.int32)
  positions = np.maximum(np.cumsum(segment_ids, 1) - 1, 0).astype(np.int32)
  return tokens, positions, segment_ids


def _ftjax_logits(model, params=None):
  tokens, positions, segment_ids = _batch()
  logits, _ = model.module.apply({"params": params or model.params}, tokens, positions,
                                 segment_ids)
  return np.asarray(logits), segment_ids.astype(bool)


def _torch_logits(model, virtual=0):
  tokens, _, segment_ids = _batch()
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                attention_mask=torch.tensor(segment_ids, dtype=torch.long)).logits
  return out[:, virtual:].numpy()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("words", [
    ["peft.method=lora"],
    ["peft.method=lora", "peft.lora.targets=[all-linear]", "peft.lora.dora=true"],
    ["peft.method=adapter"],
    ["peft.method=adapter", "peft.adapter.positions=[ffn]", "peft.adapter.activation=gelu"],
    ["peft.method=ia3"],
], ids=["lora", "dora", "houlsby", "pfeiffer", "ia3"])
def test_fresh_lora_and_adapters_are_the_base_model(family, words, tmp_path):
  tiny.save_model(str(tmp_path), family)
  tokenizer = hf.load_tokenizer(str(tmp_path))
  base = train.build_model(_cfg(str(tmp_path)), tokenizer)
  model = train.build_model(_cfg(str(tmp_path), *words), tokenizer)
  assert set(tree.flatten(model.params)) > set(tree.flatten(base.params))
  ours, real = _ftjax_logits(model)
  want, _ = _ftjax_logits(base)
  if "peft.lora.dora=true" in words:  # magnitude / norm is 1 up to rounding
    np.testing.assert_allclose(ours[real], want[real], atol=1e-5)
  else:
    np.testing.assert_array_equal(ours, want)


def _peft_config(kind):
  return {
      "lora_rslora": hf_peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True,
                                        target_modules=["q_proj", "v_proj", "down_proj"],
                                        init_lora_weights=False),
      "dora": hf_peft.LoraConfig(r=4, lora_alpha=16, use_dora=True, target_modules="all-linear",
                                 init_lora_weights=False),
      "lora_head": hf_peft.LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj", "o_proj"],
                                      modules_to_save=["lm_head"], init_lora_weights=False),
      "lora_fused": hf_peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj",
                                                                         "gate_up_proj"],
                                       init_lora_weights=False),
      "prefix": hf_peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
      "prefix_projection": hf_peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                      prefix_projection=True,
                                                      encoder_hidden_size=24),
      "prompt": hf_peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
      "lora_conv1d": hf_peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                        fan_in_fan_out=True, init_lora_weights=False),
      "ia3": hf_peft.IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False),
      "ia3_all": hf_peft.IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False,
                                   target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                   "up_proj", "down_proj"],
                                   feedforward_modules=["up_proj", "down_proj"]),
      "ia3_conv1d": hf_peft.IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False,
                                      target_modules=["c_attn", "mlp.c_proj"],
                                      feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True),
  }[kind]


@pytest.mark.parametrize("kind,family", [
    ("lora_rslora", "llama"), ("dora", "llama"), ("lora_head", "qwen2"), ("prefix", "llama"),
    ("prefix_projection", "llama"), ("prefix", "mistral"), ("prompt", "llama"),
    ("lora_conv1d", "gpt2"), ("prefix", "gpt2"), ("prompt", "gpt2"), ("lora_rslora", "qwen3"),
    ("ia3", "llama"), ("ia3_all", "qwen2"), ("ia3", "qwen3"), ("ia3_conv1d", "gpt2"),
    *[pytest.param(kind, family, marks=pytest.mark.slow) for kind, family in [
        ("lora_rslora", "gemma2"), ("prefix", "gemma2"), ("ia3_all", "gemma2"),
        ("lora_rslora", "gemma3"), ("dora", "gemma3"), ("prompt", "gemma3"),
        ("lora_fused", "phi3"), ("prefix", "phi3")]]])
def test_hf_peft_adapter_loads_with_matching_logits(kind, family, tmp_path):
  model_dir, adapter_dir = str(tmp_path / "model"), str(tmp_path / "adapter")
  tiny.save_model(model_dir, family)
  torch.manual_seed(1)
  pm = hf_peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(model_dir),
                              _peft_config(kind))
  if kind == "lora_head":
    with torch.no_grad():  # a trained head differs from the base one
      pm.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
  pm.save_pretrained(adapter_dir)
  pm.eval()
  method = {"lora_rslora": "lora", "dora": "lora", "lora_head": "lora", "lora_fused": "lora",
            "lora_conv1d": "lora", "ia3_all": "ia3", "ia3_conv1d": "ia3"}.get(kind, kind)
  method = "prefix" if method == "prefix_projection" else method
  cfg = _cfg(model_dir, f"peft.method={method}", f"peft.init_from={adapter_dir}")
  model = train.build_model(cfg, hf.load_tokenizer(model_dir))
  ours, real = _ftjax_logits(model)
  want = _torch_logits(pm, virtual=4 if kind == "prompt" else 0)
  assert np.abs(ours[real] - want[real]).max() < 1e-4
  base, _ = _ftjax_logits(train.build_model(_cfg(model_dir), hf.load_tokenizer(model_dir)))
  assert np.abs(ours[real] - base[real]).max() > 1e-2  # the adapter did something
  if kind == "lora_head":
    assert "lm_head/kernel" in model.trainable and cfg.peft.lora.r == 2


def _run(model_dir, data_files, out, *words, steps=8):
  cfg = _cfg(model_dir, f"data.train={data_files[0]}", f"data.eval={data_files[1]}",
             f"train.output_dir={out}", "train.batch_size=8", f"train.steps={steps}",
             "optim.lr=1e-2", "optim.warmup_steps=1", "eval.batch_size=4", *words)
  return cfg, train.run(cfg)


def _torch_eval_loss(model, cfg, tokenizer, virtual=0):
  """Token-weighted eval loss of a PyTorch model on the run's eval set."""
  examples = data.load(cfg.data.eval, cfg.data, tokenizer)
  nll_sum = count = 0.0
  for b in data.eval_batches(examples, 4, cfg.data.seq_len, tokenizer.pad_token_id):
    b = {k: torch.tensor(v, dtype=torch.long) for k, v in b.items()}
    with torch.no_grad():
      logits = model(input_ids=b["tokens"], attention_mask=b["segment_ids"]).logits[:, virtual:]
    weights = (b["loss_mask"][:, 1:] * (b["segment_ids"][:, 1:] == b["segment_ids"][:, :-1]))
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), b["tokens"][:, 1:],
                                            reduction="none")
    nll_sum += float((nll * weights).sum())
    count += float(weights.sum())
  return nll_sum / count


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, tmp_path_factory):
  """Short trained runs, one per exported method (shared by the export tests)."""
  root = tmp_path_factory.mktemp("peft_runs")
  files = (tiny.write_jsonl(str(root / "train.jsonl"), tiny.reverse_records(64)),
           tiny.write_jsonl(str(root / "eval.jsonl"), tiny.reverse_records(8, seed=1)))
  specs = {
      "lora": ["peft.method=lora", "peft.lora.targets=[all-linear]", "peft.lora.dropout=0.1",
               "peft.trainable=[^norm/]"],
      "dora": ["peft.method=lora", "peft.lora.targets=[q_proj, v_proj, up_proj]",
               "peft.lora.dora=true", "peft.lora.rslora=true", "peft.lora.r=4"],
      "prefix": ["peft.method=prefix", "peft.prefix.length=6", "peft.prefix.projection_hidden=32"],
      "prompt": ["peft.method=prompt", "peft.prompt.length=5", "peft.trainable=[^norm/]",
                 "peft.prompt.init=text", "peft.prompt.init_text=reverse these words"],
      "adapter": ["peft.method=adapter", "peft.adapter.size=8"],
      "norms": ["peft.trainable=[norm]"],
      "ia3": ["peft.method=ia3", "peft.ia3.targets=[q_proj, k_proj, v_proj, up_proj, down_proj]",
              "peft.ia3.feedforward=[down_proj]", "optim.lr=5e-2"],
  }
  return {name: _run(tiny_llama_dir, files, str(root / name), *words)
          for name, words in specs.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lora", "dora", "prefix", "prompt", "ia3"])
def test_peft_export_loads_in_hf_peft_with_the_runs_eval_loss(name, runs, tiny_llama_dir,
                                                              tmp_path):
  cfg, summary = runs[name]
  out = export.export(summary["output_dir"], "peft", str(tmp_path / "adapter"))
  with open(os.path.join(out, "adapter_config.json")) as f:
    adapter = json.load(f)
  tensors = load_file(os.path.join(out, "adapter_model.safetensors"))
  if name == "lora":
    assert adapter["modules_to_save"] == ["model.norm"]
    q_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert tensors[q_a].shape == (8, 64)
    assert tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (64, 8)
  if name == "prompt":
    assert adapter["modules_to_save"] == ["model.norm"]
    assert "base_model.model.norm.weight" in tensors
  if name == "prefix":
    assert adapter["prefix_projection"] is False and tensors["prompt_embeddings"].shape == (6, 128)
  pm = hf_peft.PeftModel.from_pretrained(
      transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir), out).eval()
  tokenizer = hf.load_tokenizer(tiny_llama_dir)
  loss = _torch_eval_loss(pm, cfg, tokenizer, virtual=5 if name == "prompt" else 0)
  assert abs(loss - summary["after"]["eval_loss"]) < 1e-4
  assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lora", "dora", "ia3"])
def test_merged_export_matches_unmerged_lora(name, runs, tiny_llama_dir, tmp_path):
  cfg, summary = runs[name]
  merged = export.export(summary["output_dir"], "hf", str(tmp_path / "merged"))
  adapter = export.export(summary["output_dir"], "peft", str(tmp_path / "adapter"))
  model = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
  pm = hf_peft.PeftModel.from_pretrained(
      transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir), adapter).eval()
  _, real = _ftjax_logits(train.build_model(_cfg(tiny_llama_dir), hf.load_tokenizer(merged)))
  assert np.abs(_torch_logits(model)[real] - _torch_logits(pm)[real]).max() < 1e-4
  tokenizer = hf.load_tokenizer(merged)
  assert abs(_torch_eval_loss(model, cfg, tokenizer) - summary["after"]["eval_loss"]) < 1e-4


@pytest.mark.slow
def test_frozen_leaves_stay_bitwise_and_only_trainable_ones_have_state(runs, tiny_llama_dir,
                                                                       tmp_path):
  _, summary = runs["norms"]
  out = export.export(summary["output_dir"], "hf", str(tmp_path / "full"))
  before, after = load_file(os.path.join(tiny_llama_dir, "model.safetensors")), load_file(
      os.path.join(out, "model.safetensors"))
  assert set(before) == set(after)
  for name in before:
    if "norm" in name:
      assert not np.array_equal(before[name], after[name]), name
    else:
      np.testing.assert_array_equal(before[name], after[name], err_msg=name)
  for name in ("lora", "norms"):
    ckpt = checkpoint.Checkpointer(runs[name][1]["output_dir"], 0, 1)
    state = ckpt.manager.restore(ckpt.latest_step(), args=__import__(
        "orbax.checkpoint").checkpoint.args.Composite(
            state=__import__("orbax.checkpoint").checkpoint.args.StandardRestore())).state
    ckpt.close()
    params = tree.flatten(state["params"])
    if name == "lora":
      assert all(p.split("/")[-1] in ("lora_a", "lora_b") or p.startswith("norm/")
                 for p in params)
      assert len(params) == 2 * 7 * 2 + 1
    else:
      assert set(params) == {"norm/scale", "layers_0/input_layernorm/scale",
                             "layers_0/post_attention_layernorm/scale",
                             "layers_1/input_layernorm/scale",
                             "layers_1/post_attention_layernorm/scale"}
    n = tree.count(state["params"])
    moments = sum(np.size(x) for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x) > 0)
    assert moments == 2 * n  # AdamW's mu and nu, for the trainable leaves only


@pytest.mark.slow
def test_bf16_base_weights_train_like_fp32(runs, tiny_llama_dir, tmp_path):
  cfg, summary = runs["adapter"]
  _, bf16 = _run(tiny_llama_dir, (cfg.data.train, cfg.data.eval), str(tmp_path / "bf16"),
                 "peft.method=adapter", "peft.adapter.size=8", "peft.base_dtype=bf16")
  np.testing.assert_allclose([bf16["losses"][s] for s in range(1, 9)],
                             [summary["losses"][s] for s in range(1, 9)], rtol=2e-2)


@pytest.mark.slow
@pytest.mark.parametrize("words", [["peft.method=prefix", "peft.prefix.length=3"],
                                   ["peft.method=prompt", "peft.prompt.length=3"],
                                   ["peft.method=lora", "peft.lora.targets=[all-linear]"]])
def test_kv_cache_generation_equals_recomputation(words, tiny_llama_dir):
  model = train.build_model(_cfg(tiny_llama_dir, *words), hf.load_tokenizer(tiny_llama_dir))
  flat = tree.flatten(model.params)
  key = jax.random.PRNGKey(3)
  for p in flat:  # non-trivial PEFT leaves
    if p not in model.base_paths:
      key, sub = jax.random.split(key)
      flat[p] = flat[p] + 0.3 * jax.random.normal(sub, flat[p].shape)
  params = tree.unflatten(flat)
  prompts = [[1, 17, 90, 33], [1, 45, 12, 200, 7, 9, 31]]
  got = generate.greedy(model.module, params, prompts, 6)
  width = max(map(len, prompts)) + 6
  full = jax.jit(lambda t, s: model.module.apply({"params": params}, t,
                                                 np.arange(width)[None], s)[0])
  for prompt, out in zip(prompts, got):  # recompute the whole sequence for every new token
    seq = list(prompt)
    for _ in range(6):
      t = np.zeros((1, width), np.int32)
      t[0, :len(seq)] = seq
      logits = full(t, (np.arange(width) < len(seq)).astype(np.int32)[None])
      seq.append(int(np.argmax(logits[0, len(seq) - 1])))
    assert out == seq[len(prompt):]


def _cli(capsys, module, argv):
  code = module.main(argv)
  err = capsys.readouterr().err.strip()
  return code, err


@pytest.mark.slow
@pytest.mark.parametrize("case", ["unknown_method", "target_matches_nothing", "zero_rank",
                                  "prefix_too_long", "wrong_adapter_type", "not_an_adapter",
                                  "nothing_trainable"])
def test_peft_bad_config_is_one_clear_line(case, capsys, tiny_llama_dir, runs, tmp_path):
  cfg, _ = runs["adapter"]
  words, needle = {
      "unknown_method": (["peft.method=bogus"], "peft.method: 'bogus' is not one of none | lora"),
      "target_matches_nothing": (["peft.method=lora", "peft.lora.targets=[query]"],
                                 "peft.lora.targets: pattern 'query' matches no parameter"),
      "zero_rank": (["peft.method=lora", "peft.lora.r=0"], "peft.lora.r must be > 0"),
      "prefix_too_long": (["peft.method=prefix", "peft.prefix.length=100"],
                          "peft.prefix.length (100) + data.seq_len (48) exceeds the context"),
      "wrong_adapter_type": (["peft.method=lora", f"peft.init_from={tmp_path / 'prefix'}"],
                             "holds a prefix adapter, but peft.method is lora"),
      "not_an_adapter": (["peft.method=lora", f"peft.init_from={tmp_path}"],
                         "is not a PEFT adapter"),
      "nothing_trainable": (["peft.method=lora", "peft.frozen=[lora]"],
                            "no parameter is left to train"),
  }[case]
  if case == "wrong_adapter_type":
    export.export(runs["prefix"][1]["output_dir"], "peft", str(tmp_path / "prefix"))
  argv = ["--config", os.path.join(REPO, "configs", "quickstart.yaml"),
          f"model.path={tiny_llama_dir}", f"data.train={cfg.data.train}", "data.eval=",
          "data.seq_len=48", f"train.output_dir={tmp_path / 'run'}", *words]
  code, err = _cli(capsys, train, argv)
  assert code == 2 and err.startswith("error: ") and needle in err, err
  assert len(err.splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("name,to,needle", [
    ("adapter", "peft", "bottleneck adapters have no HF PEFT format"),
    ("adapter", "hf", "cannot be merged into the base weights"),
    ("prefix", "hf", "prefix tuning adds virtual tokens that cannot be merged"),
    ("prompt", "hf", "export it with --to peft"),
    ("norms", "peft", "is no adapter: use --to hf"),
])
def test_export_refuses_what_the_format_cannot_hold(name, to, needle, runs, capsys, tmp_path):
  out = tmp_path / "out"
  code, err = _cli(capsys, export, ["--run", runs[name][1]["output_dir"], "--to", to,
                                    "--out", str(out)])
  assert code == 2 and needle in err and len(err.splitlines()) == 1, err
  assert not out.exists()  # nothing half-written


def test_lora_dropout_only_in_training(tiny_llama_dir):
  model = train.build_model(_cfg(tiny_llama_dir, "peft.method=lora", "peft.lora.dropout=0.5"),
                            hf.load_tokenizer(tiny_llama_dir))
  flat = tree.flatten(model.params)
  for p in flat:
    if p.endswith("lora_b"):
      flat[p] = flat[p] + 0.5
  params = tree.unflatten(flat)
  tokens, positions, segment_ids = _batch()
  batch = {"tokens": tokens, "positions": positions, "segment_ids": segment_ids}
  apply = loss.logits_fn(model.module)
  key = jax.random.PRNGKey(0)
  eval_a, eval_b = apply(params, batch), apply(params, batch)
  train_a, train_b = apply(params, batch, key), apply(params, batch, key)
  np.testing.assert_array_equal(eval_a, eval_b)
  np.testing.assert_array_equal(train_a, train_b)  # reproducible from the key
  assert np.abs(np.asarray(train_a) - np.asarray(eval_a)).max() > 1e-2
  assert np.abs(np.asarray(apply(params, batch, jax.random.PRNGKey(1))) -
                np.asarray(train_a)).max() > 1e-2


@pytest.mark.slow
def test_lora_merge_and_unmerge(tiny_llama_dir):
  model = train.build_model(_cfg(tiny_llama_dir, "peft.method=lora", "peft.lora.r=4",
                                 "peft.lora.targets=[all-linear]"),
                            hf.load_tokenizer(tiny_llama_dir))
  flat = tree.flatten(model.params)
  for p in flat:
    if p.endswith("lora_b"):
      flat[p] = flat[p] + 0.1 * jax.random.normal(jax.random.PRNGKey(len(p)), flat[p].shape)
  spec, params = model.module.peft, tree.unflatten(flat)
  merged = peft.merge(spec, params)
  assert not any(p.split("/")[-1].startswith("lora") for p in tree.flatten(merged))
  ours, real = _ftjax_logits(model, params)
  base = train.build_model(_cfg(tiny_llama_dir), hf.load_tokenizer(tiny_llama_dir))
  got, _ = _ftjax_logits(base, merged)
  assert np.abs(got[real] - ours[real]).max() < 1e-4
  back = peft.lora.unmerge(spec, tree.flatten(merged), flat)
  for p, v in tree.flatten(base.params).items():
    np.testing.assert_allclose(back[p], v, atol=1e-6, err_msg=p)


@pytest.mark.slow
def test_tied_embeddings_trained_with_lora_export_to_peft(tmp_path):
  model_dir = str(tmp_path / "tied")
  tiny.save_model(model_dir, "llama", tie_word_embeddings=True)
  files = (tiny.write_jsonl(str(tmp_path / "train.jsonl"), tiny.reverse_records(32)),
           tiny.write_jsonl(str(tmp_path / "eval.jsonl"), tiny.reverse_records(8, seed=1)))
  cfg, summary = _run(model_dir, files, str(tmp_path / "run"), "peft.method=lora",
                      "peft.trainable=[embed_tokens]", steps=4)
  out = export.export(summary["output_dir"], "peft", str(tmp_path / "adapter"))
  pm = hf_peft.PeftModel.from_pretrained(
      transformers.AutoModelForCausalLM.from_pretrained(model_dir), out).eval()
  loss = _torch_eval_loss(pm, cfg, hf.load_tokenizer(model_dir))
  assert abs(loss - summary["after"]["eval_loss"]) < 1e-4
  # and back: the adapter loads into ftjax with the same trained embedding
  again = train.build_model(_cfg(model_dir, "peft.method=lora", f"peft.init_from={out}"),
                            hf.load_tokenizer(model_dir))
  assert "embed_tokens/embedding" in again.trainable


@pytest.mark.slow
@pytest.mark.parametrize("family,words", [
    ("qwen3", ["peft.method=lora", "peft.lora.targets=[q_proj, k_proj, up_proj]"]),
    ("gpt2", ["peft.method=ia3", "peft.ia3.targets=[c_attn, mlp/c_proj]",
              "peft.ia3.feedforward=[mlp/c_proj]", "optim.lr=5e-2"]),
    ("gemma2", ["peft.method=lora", "peft.lora.targets=[all-linear]"]),
    ("gemma3", ["peft.method=lora", "peft.lora.targets=[q_proj, v_proj, gate_proj, down_proj]",
                "peft.trainable=[q_norm]"]),
    ("phi3", ["peft.method=lora", "peft.lora.targets=[all-linear]"]),
], ids=["qwen3_lora", "gpt2_ia3", "gemma2_lora", "gemma3_lora_qk_norms", "phi3_fused_lora"])
def test_round_trip_through_hf_peft(family, words, tmp_path):
  """Train, export to PEFT (PEFT's loss = the run's), load the export back (same logits); the
  merged `--to hf` export loads in transformers with the run's loss too."""
  model_dir = str(tmp_path / "model")
  tiny.save_model(model_dir, family)
  files = (tiny.write_jsonl(str(tmp_path / "train.jsonl"), tiny.reverse_records(32)),
           tiny.write_jsonl(str(tmp_path / "eval.jsonl"), tiny.reverse_records(8, seed=1)))
  cfg, summary = _run(model_dir, files, str(tmp_path / "run"), *words, steps=4)
  out = export.export(summary["output_dir"], "peft", str(tmp_path / "adapter"))
  pm = hf_peft.PeftModel.from_pretrained(
      transformers.AutoModelForCausalLM.from_pretrained(model_dir), out).eval()
  assert abs(_torch_eval_loss(pm, cfg, hf.load_tokenizer(model_dir))
             - summary["after"]["eval_loss"]) < 1e-4
  assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
  method = cfg.peft.method
  again = train.build_model(_cfg(model_dir, f"peft.method={method}", f"peft.init_from={out}"),
                            hf.load_tokenizer(model_dir))
  _, trained, _ = export.load_run(summary["output_dir"])[1:]
  ours, real = _ftjax_logits(again)
  want, _ = _ftjax_logits(again, trained)
  assert np.abs(ours[real] - want[real]).max() < 1e-4
  assert np.abs(ours[real] - _torch_logits(pm)[real]).max() < 1e-4
  merged = transformers.AutoModelForCausalLM.from_pretrained(
      export.export(summary["output_dir"], "hf", str(tmp_path / "merged"))).eval()
  assert abs(_torch_eval_loss(merged, cfg, hf.load_tokenizer(model_dir))
             - summary["after"]["eval_loss"]) < 1e-4


@pytest.mark.slow
def test_resume_refuses_a_different_peft_config(runs):
  cfg, summary = runs["dora"]
  changed = config.load(None, [f"{k}={v}" for k, v in {
      "model.path": cfg.model.path, "data.train": cfg.data.train, "data.format": cfg.data.format,
      "data.seq_len": cfg.data.seq_len, "train.output_dir": summary["output_dir"],
      "train.batch_size": 8, "train.steps": 12, "peft.method": "lora", "peft.lora.r": 2}.items()])
  with pytest.raises(config.UserError, match="cannot resume step 8 exactly: it trained other"):
    train.run(changed)


@pytest.mark.parametrize("option,needle", [
    ({"alpha_pattern": {"q_proj": 64}}, "alpha_pattern={'q_proj': 64} is not supported"),
    ({"lora_bias": True}, "lora_bias=True is not supported"),
    ({"target_modules": ["embed_tokens", "q_proj"]}, "is not part of what ftjax can load"),
])
def test_adapter_options_ftjax_cannot_reproduce_are_refused(option, needle, tiny_llama_dir,
                                                            tmp_path):
  adapter_dir = str(tmp_path / "adapter")
  kwargs = {"r": 2, "target_modules": ["q_proj"], **option}
  hf_peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                         hf_peft.LoraConfig(**kwargs)).save_pretrained(adapter_dir)
  with pytest.raises(config.UserError, match=needle.replace("(", r"\(").replace("[", r"\[")):
    train.build_model(_cfg(tiny_llama_dir, "peft.method=lora", f"peft.init_from={adapter_dir}"),
                      hf.load_tokenizer(tiny_llama_dir))
