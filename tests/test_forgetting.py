"""Forgetting, measured and fought: named eval sets, replay mixing, L2-SP and EWC in runs."""

import json
import os

import numpy as np
import pytest
import transformers

import tiny
from ftjax import config, data, hf, train


def _cfg(model_dir, train_file, out_dir, *words):
  base = [f"model.path={model_dir}", f"data.train={train_file}", f"train.output_dir={out_dir}",
          "data.format=prompt_completion", "data.seq_len=64", "train.batch_size=8",
          "train.steps=4", "optim.lr=1e-3", "precision.compute=fp32", "peft.method=lora"]
  return config.load(None, base + list(words))


def _records(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def test_named_eval_sets_log_each_loss_and_match_transformers(tiny_llama_dir, reverse_data,
                                                              tmp_path):
  general = tiny.write_jsonl(str(tmp_path / "general.jsonl"), tiny.reverse_records(6, seed=7))
  out = tmp_path / "run"
  result = train.run(_cfg(tiny_llama_dir, reverse_data[0], out, "eval.every=2",
                          f"data.eval={{target: {reverse_data[1]}, general: {general}}}"))
  records = _records(out / "metrics.jsonl")
  first = records[0]
  assert first["step"] == 0
  for name in ("target", "general"):
    assert {f"eval_{name}_loss", f"eval_{name}_ppl", f"eval_{name}_accuracy"} <= set(first)
    assert [r["step"] for r in records if f"eval_{name}_loss" in r] == [0, 2, 4]
  assert first["eval_loss"] == first["eval_target_loss"]  # the first set is early stopping's
  want, _ = tiny.torch_token_loss(
      transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).float().eval(),
      tiny.make_tokenizer(), _records(general))
  assert abs(first["eval_general_loss"] - want) < 1e-4
  assert first["eval_general_ppl"] == pytest.approx(np.exp(first["eval_general_loss"]))
  assert result.after["eval_general_loss"] == records[-1]["eval_general_loss"]
  assert os.path.isfile(out / "loss.png")
  assert {"eval_target_loss", "eval_general_loss", "eval_general_ppl"} <= _tensorboard_tags(
      out / "tensorboard")


def _tensorboard_tags(folder) -> set:
  """The scalar tags in a TensorBoard event folder (TFRecord framing: length, crc, data, crc)."""
  from tensorboardX.proto import event_pb2
  tags = set()
  for name in os.listdir(folder):
    with open(os.path.join(folder, name), "rb") as f:
      raw = f.read()
    at = 0
    while at < len(raw):
      n = int.from_bytes(raw[at:at + 8], "little")
      event = event_pb2.Event.FromString(raw[at + 12:at + 12 + n])
      tags |= {v.tag for v in event.summary.value}
      at += 12 + n + 4
  return tags


def test_mix_repeats_and_subsamples_sources_by_weight_deterministically(tiny_llama_dir,
                                                                       reverse_data, tmp_path):
  replay = tiny.write_jsonl(str(tmp_path / "replay.jsonl"), tiny.reverse_records(10, seed=3))
  extra = tiny.write_jsonl(str(tmp_path / "extra.jsonl"), tiny.reverse_records(4, seed=4))
  cfg = _cfg(tiny_llama_dir, reverse_data[0], "unused",
             f"data.mix=[{{train: {replay}, weight: 0.5}}, {{train: {extra}, weight: 2}}]").data
  tok = hf.load_tokenizer(tiny_llama_dir)
  a = [e.where for e in data.load_splits(cfg, tok).train.examples]
  b = [e.where for e in data.load_splits(cfg, tok).train.examples]
  assert a == b  # the same mixture every time (and so on resume)
  count = lambda f: sum(w.startswith(f + ":") for w in a)
  assert (count(reverse_data[0]), count(replay), count(extra)) == (64, 5, 8)
  assert all(sum(w == x for w in a) == 2 for x in a if x.startswith(extra))
  other = data.load_splits(config.load(None, [f"model.path={tiny_llama_dir}",
                                              f"data.train={reverse_data[0]}",
                                              "data.split_seed=1", "data.format=prompt_completion",
                                              f"data.mix=[{{train: {replay}, weight: 0.5}}]"]
                                       ).data, tok).train.examples
  assert {e.where for e in other if e.where.startswith(replay)} != \
      {w for w in a if w.startswith(replay)}  # data.split_seed picks another half


def _distance(run_dir, step, start):
  from ftjax import checkpoint, tree
  ckpt = checkpoint.Checkpointer(str(run_dir), 0, 1, read_only=True)
  try:
    after = tree.flatten(ckpt.restore_params(step))
  finally:
    ckpt.close()
  return float(np.sqrt(sum(np.sum((np.asarray(v) - start[p]) ** 2) for p, v in after.items())))


@pytest.mark.slow
def test_l2sp_and_ewc_runs_stay_closer_to_the_start_and_resume(tiny_llama_dir, reverse_data,
                                                               tmp_path):
  from ftjax import assembly, regularize, tree
  words = ["peft.method=none", "peft.trainable=[mlp]", "optim.lr=1e-2", "optim.schedule=constant",
           "train.steps=6"]
  cfg = _cfg(tiny_llama_dir, reverse_data[0], tmp_path / "plain", *words)
  start = {p: np.asarray(v) for p, v in tree.flatten(assembly.from_config(cfg).split()[0]).items()}
  train.run(cfg)
  plain = _distance(tmp_path / "plain", 6, start)
  train.run(_cfg(tiny_llama_dir, reverse_data[0], tmp_path / "l2sp", *words,
                 "regularize.l2sp=100"))
  assert _distance(tmp_path / "l2sp", 6, start) < 0.5 * plain
  ewc = [*words, "regularize.ewc.lambda=1e4", f"regularize.ewc.data={reverse_data[1]}"]
  full = train.run(_cfg(tiny_llama_dir, reverse_data[0], tmp_path / "ewc", *ewc))
  assert _distance(tmp_path / "ewc", 6, start) < 0.5 * plain
  fisher = tree.flatten(regularize.load(str(tmp_path / "ewc" / "ewc_fisher.safetensors")))
  assert set(fisher) == set(start) and all(np.all(f >= 0) for f in fisher.values())
  with pytest.raises(config.UserError, match="ewc_fisher.safetensors was computed from"):
    train.run(_cfg(tiny_llama_dir, reverse_data[0], tmp_path / "ewc", *ewc,
                   "regularize.ewc.max_examples=3"))
  # stopped and resumed: the saved Fisher and the state's θ₀ give the same losses
  out = tmp_path / "ewc_resumed"
  train.run(_cfg(tiny_llama_dir, reverse_data[0], out, *ewc, "train.stop_after=3"))
  rest = train.run(_cfg(tiny_llama_dir, reverse_data[0], out, *ewc))
  assert {s: rest.losses[s] for s in (4, 5, 6)} == {s: full.losses[s] for s in (4, 5, 6)}
