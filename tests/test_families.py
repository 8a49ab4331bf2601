"""GPT-2 and BERT against `transformers`, sequence classifiers of each family, the real MiniLM
encoder, and classification training with HF / PEFT exports."""

import json

import jax.numpy as jnp
import numpy as np
import peft as hf_peft
import pytest
import torch
import transformers

import tiny
from ftjax import config, evaluation, export, generate, hf, train

CASES = {  # name: (family, classifier)
    "gpt2": ("gpt2", False), "gpt2_classifier": ("gpt2", True),
    "bert": ("bert", False), "bert_classifier": ("bert", True),
    "llama_classifier": ("llama", True), "qwen2_classifier": ("qwen2", True),
    "qwen3_classifier": ("qwen3", True), "gemma2_classifier": ("gemma2", True),
    "gemma3_classifier": ("gemma3", True), "phi3_classifier": ("phi3", True),
}


def _padded_batch(n=20, pad_id=0):
  """Three rows of random tokens, right-padded with the pad id (HF's decoder classifiers find
  each row's last token by it)."""
  tokens = np.random.default_rng(0).integers(3, 320, size=(3, n)).astype(np.int32)
  mask = (np.arange(n)[None] < np.array([[n], [13], [7]])).astype(np.int32)
  return np.where(mask > 0, tokens, pad_id), mask, np.broadcast_to(np.arange(n), tokens.shape)


@pytest.mark.parametrize("case", sorted(CASES))
def test_outputs_match_transformers(case, tmp_path):
  family, classifier = CASES[case]
  kwargs = {"num_labels": 3} if classifier else {}
  torch_model = tiny.save_model(str(tmp_path), family, classifier=classifier, **kwargs)
  model = hf.load(str(tmp_path), num_labels=3 if classifier else 0)
  assert not model.fresh  # the saved classifier's head was loaded, not initialised
  tokens, mask, positions = _padded_batch()
  with torch.no_grad():
    out = torch_model(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask))
  want = (out.last_hidden_state if family == "bert" and not classifier else out.logits).numpy()
  got, _ = model.module.apply({"params": model.params}, tokens, positions, mask)
  got = np.asarray(got)
  assert got.shape == want.shape
  if classifier:
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  else:
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[valid], want[valid], atol=1e-4, rtol=0)


def test_bare_base_checkpoints_load(tmp_path):
  """`GPT2Model` / `BertModel` checkpoints name tensors without the task model's prefix."""
  torch.manual_seed(0)
  bare = transformers.GPT2Model(tiny.hf_config("gpt2")).eval()
  bare.save_pretrained(str(tmp_path))
  model = hf.load(str(tmp_path))
  want = bare.state_dict()["h.1.mlp.c_fc.weight"].numpy()
  np.testing.assert_array_equal(np.asarray(model.params["h_1"]["mlp"]["c_fc"]["kernel"]), want)


@pytest.mark.slow
def test_minilm_hidden_states_match_transformers(minilm_dir):
  tok = hf.load_tokenizer(minilm_dir)
  sentences = ["A man is playing a guitar on the street.", "The new movie is awesome!",
               "Fine-tuning pretrained language models with JAX is fast."]
  enc = tok(sentences, padding=True, return_tensors="np")
  reference = transformers.AutoModel.from_pretrained(minilm_dir).eval()
  with torch.no_grad():
    want = reference(input_ids=torch.tensor(enc["input_ids"]),
                     attention_mask=torch.tensor(enc["attention_mask"])).last_hidden_state.numpy()
  model = hf.load(minilm_dir)
  ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
  got, _ = model.module.apply({"params": model.params}, ids,
                              np.broadcast_to(np.arange(ids.shape[1]), ids.shape), mask)
  valid = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(got)[valid], want[valid], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_gpt2_greedy_decoding_matches_transformers_and_recomputation(tmp_path):
  torch_model = tiny.save_model(str(tmp_path), "gpt2")
  model = hf.load(str(tmp_path))
  prompts = [[5, 17, 90, 33], [7, 250, 8, 61, 140, 12, 99]]
  got = generate.greedy(model.module, model.params, prompts, 8)
  for prompt, out in zip(prompts, got):
    with torch.no_grad():
      want = torch_model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert out == want
    # The cache path equals recomputing the whole sequence each step.
    seq = list(prompt)
    for _ in range(8):
      logits, _ = model.module.apply({"params": model.params}, jnp.asarray([seq]),
                                     jnp.arange(len(seq))[None], jnp.ones((1, len(seq)), jnp.int32))
      seq.append(int(jnp.argmax(logits[0, -1])))
    assert seq[len(prompt):] == out


def test_macro_f1_is_the_mean_of_per_label_f1():
  predicted, labels = np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 2, 0])
  # label 0: tp 1, fp 1, fn 1 -> 0.5; label 1: tp 1, fp 0, fn 1 -> 2/3; label 2: tp 2, fp 1 -> 0.8
  assert evaluation.macro_f1(predicted, labels) == pytest.approx((0.5 + 2 / 3 + 0.8) / 3)
  assert evaluation.macro_f1(np.array([1, 1]), np.array([0, 0])) == 0.0


def _topic_data(tmp_path, n_train=96, n_eval=32):
  words = {"red": "apple cherry rose blood ruby", "green": "grass leaf frog lime pea",
           "blue": "sky sea ocean river sapphire"}
  rng = np.random.default_rng(0)
  rows = []
  for i in range(n_train + n_eval):
    label = sorted(words)[i % 3]
    picked = rng.choice(words[label].split(), size=2, replace=False)
    rows.append({"text": f"the {picked[0]} and the {picked[1]}", "label": label})
  return (tiny.write_jsonl(str(tmp_path / "train.jsonl"), rows[:n_train]),
          tiny.write_jsonl(str(tmp_path / "eval.jsonl"), rows[n_train:]))


def _classifier_logits_ftjax(run_dir, texts, tokenizer):
  cfg, model, params, _ = export.load_run(run_dir)
  enc = tokenizer(texts, padding=True, return_tensors="np")
  ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
  logits, _ = model.module.apply({"params": params}, ids,
                                 np.broadcast_to(np.arange(ids.shape[1]), ids.shape), mask)
  return cfg, np.asarray(logits), enc


@pytest.mark.slow
@pytest.mark.parametrize("family,method", [("llama", "lora"), ("bert", "none"), ("gpt2", "lora"),
                                           ("gemma3", "lora")])
def test_classifier_trains_and_exports_load_in_transformers(family, method, tmp_path):
  model_dir = str(tmp_path / "model")
  tiny.save_model(model_dir, family)
  train_file, eval_file = _topic_data(tmp_path)
  run_dir = str(tmp_path / "run")
  cfg = config.load(None, [
      f"model.path={model_dir}", f"data.train={train_file}", f"data.eval={eval_file}",
      "data.format=classification", "data.seq_len=16", f"peft.method={method}",
      "peft.lora.targets=[all-linear]", "train.steps=30", "train.batch_size=16",
      "optim.lr=3e-3", "precision.compute=fp32", f"train.output_dir={run_dir}"])
  summary = train.run(cfg)
  assert summary["after"]["eval_accuracy"] >= summary["before"]["eval_accuracy"] + 0.3
  assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
  with open(f"{run_dir}/config.yaml") as f:
    assert "- blue" in f.read()  # the label order is recorded with the run

  tokenizer = hf.load_tokenizer(model_dir)
  texts = [json.loads(line)["text"] for line in open(eval_file)][:6]
  _, want, enc = _classifier_logits_ftjax(run_dir, texts, tokenizer)
  inputs = {"input_ids": torch.tensor(enc["input_ids"], dtype=torch.long),
            "attention_mask": torch.tensor(enc["attention_mask"])}
  export.export(run_dir, "hf", str(tmp_path / "hf"))
  merged = transformers.AutoModelForSequenceClassification.from_pretrained(
      str(tmp_path / "hf")).eval()
  assert merged.config.id2label == {0: "blue", 1: "green", 2: "red"}
  with torch.no_grad():
    np.testing.assert_allclose(merged(**inputs).logits.numpy(), want, atol=1e-4, rtol=0)
  if method == "lora":  # the PEFT adapter keeps the head as modules_to_save
    export.export(run_dir, "peft", str(tmp_path / "peft"))
    adapter = json.load(open(tmp_path / "peft" / "adapter_config.json"))
    assert adapter["task_type"] == "SEQ_CLS" and adapter["modules_to_save"] == ["score"]
    base = transformers.AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=3, pad_token_id=tokenizer.pad_token_id)
    peft_model = hf_peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    with torch.no_grad():
      np.testing.assert_allclose(peft_model(**inputs).logits.numpy(), want, atol=1e-4, rtol=0)


def test_encoders_refuse_causal_lm_training(minilm_dir, tmp_path):
  cfg = config.load(None, [f"model.path={minilm_dir}", "data.train=x.jsonl", "data.format=text",
                           f"train.output_dir={tmp_path}"])
  with pytest.raises(config.UserError, match="encoder: it trains with data.format: "
                                             "classification only"):
    train.run(cfg)
  assert generate.main(["--model", minilm_dir, "--prompt", "hello"]) == 2


@pytest.mark.parametrize("family", ["gpt2", "bert"])
@pytest.mark.parametrize("words", [["peft.method=lora", "peft.lora.targets=[all-linear]"],
                                   ["peft.method=adapter"]], ids=["lora", "adapter"])
def test_fresh_peft_on_gpt2_and_bert_is_the_base_model(family, words, tmp_path):
  tiny.save_model(str(tmp_path), family)
  base = [f"model.path={tmp_path}", "data.train=x", "data.seq_len=64", "precision.compute=fp32"]
  tokenizer = hf.load_tokenizer(str(tmp_path))
  plain = train.build_model(config.load(None, base), tokenizer)
  model = train.build_model(config.load(None, base + words), tokenizer)
  assert len(model.trainable) > 0 and not model.trainable & set(plain.base_paths)
  tokens, mask, positions = _padded_batch()
  apply = lambda m: np.asarray(m.module.apply({"params": m.params}, tokens, positions, mask)[0])
  np.testing.assert_array_equal(apply(model), apply(plain))


def test_sequences_longer_than_learned_positions_are_refused(tmp_path):
  tiny.save_model(str(tmp_path), "gpt2")  # n_positions 128
  cfg = config.load(None, [f"model.path={tmp_path}", "data.train=x", "data.seq_len=200"])
  with pytest.raises(config.UserError, match=r"^data.seq_len \(200\) exceeds the context"):
    train.build_model(cfg, hf.load_tokenizer(str(tmp_path)))
