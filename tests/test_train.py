"""End-to-end training: a PyTorch AdamW reference, exact resume, accumulation, run files."""

import json
import math
import os

import numpy as np
import pytest
import torch

import tiny
from ftjax import config, data, hf, train


def _cfg(model_dir, train_file, out_dir, **overrides):
  words = [f"model.path={model_dir}", f"data.train={train_file}", f"train.output_dir={out_dir}",
           "data.format=prompt_completion", "data.seq_len=48", "train.batch_size=8",
           "train.steps=10", "optim.lr=1e-3", "optim.warmup_steps=2", "optim.weight_decay=0.1",
           "optim.clip_norm=1.0", "optim.min_lr_ratio=0.1", "precision.compute=fp32"]
  words += [f"{k}={v}" for k, v in overrides.items()]
  return config.load(None, words)


def _torch_reference(model_dir, cfg, steps):
  """The same run in PyTorch: AdamW with no-decay groups, clipping, warmup + cosine."""
  model = tiny.make_model("llama")  # same seed and perturbation as the saved directory
  model.load_state_dict(__import__("transformers").AutoModelForCausalLM.from_pretrained(
      model_dir).state_dict())
  model.train()
  no_decay = lambda n: n.endswith("bias") or "norm" in n or "embed_tokens" in n
  groups = [
      {"params": [p for n, p in model.named_parameters() if not no_decay(n)],
       "weight_decay": cfg.optim.weight_decay},
      {"params": [p for n, p in model.named_parameters() if no_decay(n)], "weight_decay": 0.0},
  ]
  opt = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(cfg.optim.b1, cfg.optim.b2),
                          eps=cfg.optim.eps)
  warm, total, floor = cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.min_lr_ratio

  def factor(s):
    if s < warm:
      return s / warm
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm)))

  sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
  tokenizer = hf.load_tokenizer(model_dir)
  batches = data.Batches(data.load(cfg.data.train, cfg.data, tokenizer), cfg.train.batch_size,
                         cfg.data.seq_len, tokenizer.pad_token_id, cfg.train.seed)
  losses = []
  for s in range(steps):
    b = {k: torch.tensor(v, dtype=torch.long) for k, v in batches.get(s).items()}
    logits = model(b["tokens"], attention_mask=b["segment_ids"], position_ids=b["positions"]).logits
    same = b["segment_ids"][:, 1:] == b["segment_ids"][:, :-1]
    weights = (b["loss_mask"][:, 1:] * same).float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), b["tokens"][:, 1:],
                                            reduction="none")
    loss = (nll * weights).sum() / weights.sum()
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_norm)
    opt.step()
    sched.step()
    losses.append(loss.item())
  return losses


@pytest.mark.slow
def test_full_finetune_matches_pytorch_adamw(tiny_llama_dir, reverse_data, tmp_path):
  cfg = _cfg(tiny_llama_dir, reverse_data[0], str(tmp_path / "run"))
  summary = train.run(cfg)
  ours = [summary["losses"][s] for s in range(1, 11)]
  ref = _torch_reference(tiny_llama_dir, cfg, 10)
  np.testing.assert_allclose(ours, ref, rtol=1e-4)
  assert ours[-1] < ours[0] - 0.5  # it learned something


@pytest.mark.slow
def test_resume_follows_uninterrupted_run(tiny_llama_dir, reverse_data, tmp_path):
  whole = train.run(_cfg(tiny_llama_dir, reverse_data[0], str(tmp_path / "a"),
                         **{"train.steps": 6, "checkpoint.every": 3}))
  out = str(tmp_path / "b")
  first = train.run(_cfg(tiny_llama_dir, reverse_data[0], out,
                         **{"train.steps": 6, "checkpoint.every": 3, "train.stop_after": 3}))
  assert first["final_step"] == 3 and sorted(first["losses"]) == [1, 2, 3]
  second = train.run(_cfg(tiny_llama_dir, reverse_data[0], out,
                          **{"train.steps": 6, "checkpoint.every": 3}))
  assert second["start_step"] == 3
  assert [second["losses"][s] for s in (4, 5, 6)] == [whole["losses"][s] for s in (4, 5, 6)]
  with open(os.path.join(out, "metrics.jsonl")) as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4, 5, 6]
  # A finished run re-run does no more steps.
  again = train.run(_cfg(tiny_llama_dir, reverse_data[0], out, **{"train.steps": 6}))
  assert again["start_step"] == 6 and again["losses"] == {}
  # A config whose data order differs cannot continue this run silently.
  with pytest.raises(config.UserError, match="cannot resume step 6 exactly"):
    train.run(_cfg(tiny_llama_dir, reverse_data[0], out,
                   **{"train.steps": 8, "train.batch_size": 4}))


def test_prompt_completion_mask_and_vocab_check(tiny_llama_dir, tmp_path):
  tokenizer = hf.load_tokenizer(tiny_llama_dir)
  cfg = _cfg(tiny_llama_dir, "unused", str(tmp_path))
  records = [{"prompt": "reverse these words: fox dog ->", "completion": " dog fox"}]
  (ex,) = data.tokenize(records, cfg.data, tokenizer, "mem")
  prompt_len = len(tokenizer(records[0]["prompt"]).input_ids)
  joint = tokenizer(records[0]["prompt"] + records[0]["completion"]).input_ids
  assert ex.tokens.tolist() == joint + [tokenizer.eos_token_id]
  assert ex.loss_mask.tolist() == [0] * prompt_len + [1] * (len(ex.tokens) - prompt_len)
  assert tokenizer.decode(ex.tokens[ex.loss_mask == 1]) == " dog fox</s>"
  with pytest.raises(config.UserError, match="outside the model's vocabulary of 100"):
    data.check_vocab([ex], 100)


@pytest.mark.slow
def test_grad_accumulation_equals_one_big_batch(tiny_llama_dir, reverse_data, tmp_path):
  one = train.run(_cfg(tiny_llama_dir, reverse_data[0], str(tmp_path / "one"),
                       **{"train.steps": 4}))
  four = train.run(_cfg(tiny_llama_dir, reverse_data[0], str(tmp_path / "four"),
                        **{"train.steps": 4, "train.grad_accum": 4}))
  np.testing.assert_allclose([four["losses"][s] for s in range(1, 5)],
                             [one["losses"][s] for s in range(1, 5)], rtol=1e-5)


@pytest.mark.slow
def test_run_directory_contents(tiny_llama_dir, reverse_data, tmp_path):
  out = str(tmp_path / "run")
  cfg = _cfg(tiny_llama_dir, reverse_data[0], out,
             **{"train.steps": 4, "data.eval": reverse_data[1], "eval.every": 2,
                "eval.samples": 2, "eval.max_new_tokens": 4})
  summary = train.run(cfg)
  assert sorted(os.listdir(out)) == ["checkpoints", "config.yaml", "loss.png", "metrics.jsonl",
                                     "run.lock", "tensorboard", "train.log"]
  cfg.data.packing = True  # what data.packing auto chose, as config.yaml records it
  assert config.load(os.path.join(out, "config.yaml")) == cfg
  with open(os.path.join(out, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  # step 0: the eval before training (which loss.png draws too), then one record per step
  assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
  assert records[0]["eval_loss"] == summary["before"]["eval_loss"] and "loss" not in records[0]
  records = records[1:]
  for r in records:
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(r)
  assert "eval_loss" in records[1] and "eval_loss" in records[3] and "eval_loss" not in records[0]
  for key in ("eval_exact_match", "eval_rouge_l", "eval_bleu"):  # generation metrics are logged
    assert key in records[1] and key in records[3]
  with open(os.path.join(out, "train.log")) as f:
    assert "backend cpu" in f.readline()
  assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
  assert os.listdir(os.path.join(out, "tensorboard"))
