"""`python -m ftjax.evaluate`: losses against transformers and HF PEFT, a run's checkpoints
against the evals it logged, and one-line errors."""

import json
import math

import numpy as np
import peft as hf_peft
import pytest
import torch
import transformers

import tiny
from ftjax import config, evaluate, train


def _evaluate(capsys, *words) -> dict:
  capsys.readouterr()
  rc = evaluate.main([*words, "--json"])
  out = capsys.readouterr()
  assert rc == 0, out.err
  return json.loads(out.out)  # stdout is exactly one JSON object


def _hf_model(model_dir):
  return transformers.AutoModelForCausalLM.from_pretrained(model_dir).float().eval()


@pytest.mark.parametrize("fmt", ["text", "prompt_completion"])
def test_model_loss_matches_transformers(fmt, tiny_llama_dir, tmp_path, capsys):
  records = tiny.reverse_records(6, seed=2)
  if fmt == "text":
    records = [{"text": r["prompt"] + r["completion"]} for r in records] + \
        [{"text": line} for line in tiny.CORPUS]
  path = tiny.write_jsonl(str(tmp_path / "eval.jsonl"), records)
  got = _evaluate(capsys, "--model", tiny_llama_dir, "--data", path, "--format", fmt,
                  "--batch-size", "4")
  want, count = tiny.torch_token_loss(_hf_model(tiny_llama_dir), tiny.make_tokenizer(), records)
  assert abs(got["loss"] - want) < 1e-4
  assert got["tokens"] == count and got["examples"] == len(records)
  assert got["ppl"] == pytest.approx(math.exp(got["loss"]), rel=1e-12)
  assert 0 <= got["accuracy"] <= 1 and "exact_match" not in got and "step" not in got


def test_adapter_loss_matches_hf_peft_and_samples_generate(tiny_llama_dir, reverse_data,
                                                           tmp_path, capsys):
  adapter = str(tmp_path / "adapter")
  torch.manual_seed(1)
  lora = hf_peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                            init_lora_weights=False)  # random, non-zero lora_B
  pm = hf_peft.get_peft_model(_hf_model(tiny_llama_dir), lora)
  pm.save_pretrained(adapter)
  records = [json.loads(line) for line in open(reverse_data[1])]
  want, count = tiny.torch_token_loss(pm.eval(), tiny.make_tokenizer(), records)
  base, _ = tiny.torch_token_loss(_hf_model(tiny_llama_dir), tiny.make_tokenizer(), records)
  got = _evaluate(capsys, "--model", tiny_llama_dir, "--adapter", adapter, "--data",
                  reverse_data[1], "--format", "prompt_completion", "--samples", "3",
                  "--max-new-tokens", "4")
  assert abs(got["loss"] - want) < 1e-4 and abs(want - base) > 1e-2  # the adapter counts
  assert got["tokens"] == count
  assert got["samples"] == 3 and {"exact_match", "rouge_l", "bleu"} <= set(got)


def test_classifier_loss_accuracy_and_f1_match_transformers(tmp_path, capsys):
  model_dir, labels = str(tmp_path / "model"), ["neg", "neu", "pos"]
  model = tiny.save_model(model_dir, "llama", classifier=True, num_labels=3,
                          id2label=dict(enumerate(labels)))
  rng = np.random.default_rng(0)
  records = [{"text": line, "label": labels[rng.integers(3)]}
             for line in tiny.CORPUS + [r["prompt"] for r in tiny.reverse_records(8)]]
  path = tiny.write_jsonl(str(tmp_path / "eval.jsonl"), records)
  got = _evaluate(capsys, "--model", model_dir, "--data", path, "--format", "classification")
  tokenizer = tiny.make_tokenizer()
  with torch.no_grad():
    logits = torch.cat([model(torch.tensor([tokenizer(r["text"])["input_ids"]])).logits
                        for r in records])
  gold = torch.tensor([labels.index(r["label"]) for r in records])
  pred = logits.argmax(-1).numpy()
  f1 = [2 * np.sum((pred == c) & (gold.numpy() == c)) /
        max(np.sum(pred == c) + np.sum(gold.numpy() == c), 1) for c in np.union1d(pred, gold)]
  assert abs(got["loss"] - torch.nn.functional.cross_entropy(logits, gold).item()) < 1e-4
  assert got["accuracy"] == pytest.approx(np.mean(pred == gold.numpy()))
  assert got["f1"] == pytest.approx(np.mean(f1)) and got["ppl"] is None
  assert got["tokens"] == got["examples"] == len(records)


@pytest.mark.slow
def test_run_checkpoints_reproduce_the_evals_the_run_logged(tiny_llama_dir, reverse_data,
                                                            tmp_path, capsys):
  run_dir = str(tmp_path / "run")
  cfg = config.load(None, [f"model.path={tiny_llama_dir}", f"data.train={reverse_data[0]}",
                           f"data.eval={reverse_data[1]}", f"train.output_dir={run_dir}",
                           "peft.method=lora", "data.format=prompt_completion", "data.seq_len=64",
                           "train.steps=2", "train.batch_size=8", "checkpoint.every=1",
                           "checkpoint.keep=3", "eval.every=1", "eval.batch_size=4",
                           "optim.lr=1e-2", "precision.compute=fp32"])
  result = train.run(cfg)
  newest = _evaluate(capsys, "--run", run_dir, "--data", reverse_data[1])
  older = _evaluate(capsys, "--run", run_dir, "--step", "1", "--data", reverse_data[1])
  base = _evaluate(capsys, "--model", tiny_llama_dir, "--data", reverse_data[1], "--format",
                   "prompt_completion", "--seq-len", "64")  # LoRA starts as the identity
  assert newest["step"] == 2 and abs(newest["loss"] - result.after["eval_loss"]) < 1e-5
  assert older["step"] == 1 and abs(older["loss"] - result.evals[1]["eval_loss"]) < 1e-5
  assert abs(base["loss"] - result.before["eval_loss"]) < 1e-5
  assert abs(newest["loss"] - older["loss"]) > 1e-3
  assert newest["tokens"] == older["tokens"] == base["tokens"]
  assert evaluate.main(["--run", run_dir, "--data", reverse_data[1]]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 2 and lines[0].startswith(f"{run_dir} (step 2) on ")
  assert lines[1].startswith(f"eval loss {newest['loss']:.4f}, ppl ")


def _errors(tiny_llama_dir, reverse_data, tmp_path):
  no_ckpt = tmp_path / "no_ckpt"
  no_ckpt.mkdir()
  config.dump(config.load(None, [f"model.path={tiny_llama_dir}", f"data.train={reverse_data[0]}"]),
              str(no_ckpt / "config.yaml"))
  data = ["--data", reverse_data[1]]
  model = ["--model", tiny_llama_dir, *data]
  return [
      (data, "pass --model DIR (with --adapter DIR) or --run RUN_DIR"),
      (model + ["--run", str(no_ckpt)], "exactly one of them"),
      (["--model", tiny_llama_dir], "the following arguments are required: --data"),
      (["--model", tiny_llama_dir, "--data", str(tmp_path / "nope.jsonl")],
       "data file not found"),
      (["--model", str(tmp_path / "nope"), *data], "--model: directory not found"),
      (["--model", str(tmp_path), *data], "is not an HF model directory (no config.json)"),
      (model + ["--adapter", str(tmp_path)], "is not a PEFT adapter (no adapter_config.json)"),
      (["--run", str(tmp_path), *data], "is not an ftjax run directory"),
      (["--run", str(no_ckpt), *data], "has no checkpoint"),
      (["--run", str(no_ckpt), "--step", "last", *data], "expected a step number or 'best'"),
      (["--run", str(no_ckpt), "--adapter", str(tmp_path), *data],
       "--adapter DIR goes with --model"),
      (model + ["--step", "3"], "--step chooses a checkpoint of --run"),
      (model + ["--format", "tsv"], "invalid choice: 'tsv'"),
      (model + ["--seq-len", "4096"], "longer than the model's context (128 positions)"),
      (model + ["--format", "classification"], "is no classifier with labels"),
      (model + ["--samples", "2"], "--samples completes prompts: --format text has none"),
  ]


def test_bad_input_is_one_line_and_exit_status_2(tiny_llama_dir, reverse_data, tmp_path, capsys):
  for words, needle in _errors(tiny_llama_dir, reverse_data, tmp_path):
    capsys.readouterr()
    try:
      rc = evaluate.main(words)
    except SystemExit as e:  # argparse's own errors exit through _Parser.error
      rc = e.code
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (words, out.err)
    assert needle in lines[0], (words, lines[0])
    assert not out.out.strip(), words
