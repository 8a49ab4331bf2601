"""Training features: optimizers and schedules, layer-wise learning rates, exact accumulation,
remat, non-finite steps, fp16 loss scaling, dropout, early stopping, epochs, clean stops."""

import functools
import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file, save_file

import tiny
from conftest import REPO
from ftjax import checkpoint, config, data, evaluation, export, hf, loss, optim, step, train, tree


def _cfg(model_dir, out_dir="unused", *words, **overrides):
  base = [f"model.path={model_dir}", "data.train=unused", f"train.output_dir={out_dir}",
          "data.format=prompt_completion", "data.seq_len=64", "train.batch_size=8",
          "precision.compute=fp32"]
  return config.load(None, base + list(words) + [f"{k}={v}" for k, v in overrides.items()])


def _batch(tokenizer, cfg, n=8, seed=0):
  examples = data.tokenize(tiny.reverse_records(n, seed), cfg.data, tokenizer, "mem")
  return data.collate([[e] for e in examples], cfg.data.seq_len, tokenizer.pad_token_id)


def _grads(model, batch, accum=1):
  """(summed gradients / trained tokens, tokens) of the trainable part, `accum` micro-batches."""
  params, frozen = tree.split(model.params, model.trainable)
  micro = {k: v.reshape(accum, -1, v.shape[-1]) for k, v in batch.items()}
  grads, _, aux = step.accumulate(params, frozen, micro, jax.random.PRNGKey(0),
                                  loss.cross_entropy(loss.logits_fn(model.module)))
  count = aux["tokens"]
  return jax.tree.map(lambda g: g / count, grads), float(count)


@pytest.mark.slow
@pytest.mark.parametrize("name,words", [
    ("adamw", ["optim.weight_decay=0.1"]),
    ("adam", ["optim.weight_decay=0.01", "optim.schedule=wsd", "optim.warmup_steps=2"]),
    ("lion", ["optim.lr=1e-3", "optim.b2=0.99", "optim.schedule=linear"]),
    ("sgd", ["optim.lr=0.5", "optim.momentum=0.9", "optim.nesterov=true"]),
    ("adafactor", ["optim.lr=1e-2", "optim.schedule=constant"]),
])
def test_each_optimizer_trains(name, words, tiny_llama_dir, reverse_data, tmp_path):
  cfg = _cfg(tiny_llama_dir, tmp_path, f"optim.name={name}", f"data.train={reverse_data[0]}",
             "train.steps=12", "optim.lr=3e-3", *words)
  losses = train.run(cfg)["losses"]
  assert np.mean([losses[s] for s in (11, 12)]) < losses[1] - 0.5, losses


def test_schedules_equal_their_formulas():
  base = ["model.path=m", "data.train=t", "optim.lr=1.0", "optim.warmup_steps=10",
          "optim.min_lr_ratio=0.1"]
  at = lambda kind, s, *w: float(optim.schedule(config.load(
      None, base + [f"optim.schedule={kind}", *w]).optim, 110)(s))
  for kind in ("cosine", "linear", "constant", "wsd"):
    assert at(kind, 0) == 0.0 and at(kind, 5) == pytest.approx(0.5)  # linear warmup
  assert at("cosine", 60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
  assert at("cosine", 110) == pytest.approx(0.1)
  assert at("linear", 35) == pytest.approx(1.0 - 0.9 * 25 / 100)
  assert at("constant", 100) == 1.0
  # wsd: flat until the last 20% of the 110 steps (22), then linear to 0.1
  assert at("wsd", 88) == pytest.approx(1.0) and at("wsd", 99) == pytest.approx(1.0 - 0.9 / 2)
  assert at("wsd", 110) == pytest.approx(0.1)


@pytest.mark.slow
def test_layerwise_learning_rates_move_each_group_by_its_lr(tiny_llama_dir):
  tok = hf.load_tokenizer(tiny_llama_dir)
  words = ["optim.name=sgd", "optim.lr=0.1", "optim.clip_norm=0", "optim.schedule=constant",
           "optim.layer_decay=0.5",
           "optim.lr_groups=[{pattern: embed_tokens, lr: 0.01}, {pattern: lm_head, lr: 1.0}]"]
  cfg = _cfg(tiny_llama_dir, "unused", *words)
  model = train.build_model(cfg, tok)
  batch = _batch(tok, cfg)
  grads, _ = _grads(model, batch)
  params, frozen = tree.split(model.params, model.trainable)
  tx, _ = optim.build(cfg.optim, 10, params, num_layers=2, family=model.family)
  state = step.init_state(params, tx, 0)
  new, _ = step.train_step(state, frozen, {k: v[None] for k, v in batch.items()},
                           loss_fn=loss.cross_entropy(loss.logits_fn(model.module)), tx=tx)
  # depth: embeddings 0, layer i at i + 1, final norm and head 3 (of 2 layers + 1)
  want_lr = {"embed_tokens": 0.01 * 0.5**3, "layers_0": 0.1 * 0.5**2, "layers_1": 0.1 * 0.5,
             "norm": 0.1, "lm_head": 1.0}
  old, moved, g = tree.flatten(params), tree.flatten(new.params), tree.flatten(grads)
  for path in old:
    lr = want_lr[path.split("/")[0]]
    ulp = 2 * np.finfo(np.float32).eps * max(1.0, float(np.abs(old[path]).max()))
    np.testing.assert_allclose(moved[path] - old[path], -lr * g[path], rtol=1e-4, atol=ulp,
                               err_msg=path)

  lora = _cfg(tiny_llama_dir, "unused", "peft.method=lora", "optim.name=sgd", "optim.lr=0.1",
              "optim.clip_norm=0", "optim.schedule=constant", "optim.loraplus_ratio=16")
  model = train.build_model(lora, tok)
  params, frozen = tree.split(model.params, model.trainable)
  b = {p: np.random.default_rng(1).normal(size=v.shape).astype(np.float32) * 0.1
       for p, v in tree.flatten(params).items() if p.endswith("lora_b")}
  params = tree.unflatten({**tree.flatten(params), **b})  # nonzero B: both A and B get gradients
  model.params = tree.merge(params, frozen)
  grads, _ = _grads(model, batch)
  tx, _ = optim.build(lora.optim, 10, params, num_layers=2, family=model.family)
  new, _ = step.train_step(step.init_state(params, tx, 0), frozen,
                           {k: v[None] for k, v in batch.items()},
                           loss_fn=loss.cross_entropy(loss.logits_fn(model.module)), tx=tx)
  old, moved, g = tree.flatten(params), tree.flatten(new.params), tree.flatten(grads)
  for path in old:
    lr = 0.1 * (16 if path.endswith("lora_b") else 1)
    assert np.abs(g[path]).max() > 0, path
    ulp = 2 * np.finfo(np.float32).eps * max(1.0, float(np.abs(old[path]).max()))
    np.testing.assert_allclose(moved[path] - old[path], -lr * g[path], rtol=1e-4, atol=ulp,
                               err_msg=path)


@pytest.mark.slow
def test_accumulation_matches_one_batch_with_uneven_trained_tokens(tiny_llama_dir):
  tok = hf.load_tokenizer(tiny_llama_dir)
  cfg = _cfg(tiny_llama_dir)
  model = train.build_model(cfg, tok)
  batch = _batch(tok, cfg)
  per_micro = batch["loss_mask"][:, 1:].reshape(4, -1).sum(1)
  assert len(set(per_micro.tolist())) > 1  # micro-batches train different numbers of tokens
  one, n1 = _grads(model, batch, accum=1)
  four, n4 = _grads(model, batch, accum=4)
  assert n1 == n4
  for path, g in tree.flatten(one).items():
    np.testing.assert_allclose(tree.flatten(four)[path], g, rtol=1e-5, atol=1e-7, err_msg=path)


@pytest.mark.slow
def test_remat_gives_identical_gradients(tiny_llama_dir):
  tok = hf.load_tokenizer(tiny_llama_dir)
  batch = _batch(tok, _cfg(tiny_llama_dir))
  want, _ = _grads(train.build_model(_cfg(tiny_llama_dir), tok), batch)
  for policy in ("full", "dots"):
    got, _ = _grads(train.build_model(_cfg(tiny_llama_dir, "unused", f"train.remat={policy}"),
                                      tok), batch)
    for path, g in tree.flatten(want).items():
      np.testing.assert_allclose(tree.flatten(got)[path], g, rtol=1e-5, atol=1e-7, err_msg=path)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_non_finite_gradient_is_skipped_and_counted(precision, tiny_llama_dir):
  tok = hf.load_tokenizer(tiny_llama_dir)
  cfg = _cfg(tiny_llama_dir, "unused", "peft.method=lora", f"precision.compute={precision}")
  model = train.build_model(cfg, tok)
  params, frozen = tree.split(model.params, model.trainable)
  poisoned = tree.flatten(frozen)
  kernel = "layers_0/mlp/up_proj/kernel"
  poisoned[kernel] = poisoned[kernel].at[0, 0].set(jnp.inf)  # the injected fault
  tx, _ = optim.build(cfg.optim, 10, params)
  fp16 = precision == "fp16"
  loss_fn = loss.cross_entropy(loss.logits_fn(model.module))
  fn = jax.jit(lambda s, f, b: step.train_step(s, f, b, loss_fn=loss_fn, tx=tx,
                                               dynamic_scale=fp16))
  state = step.init_state(params, tx, 0, 1024.0 if fp16 else 1.0)
  batch = {k: v[None] for k, v in _batch(tok, cfg).items()}
  before = jax.device_get(state)
  bad, metrics = fn(state, tree.unflatten(poisoned), batch)
  assert not np.isfinite(float(metrics["grad_norm"]))
  assert int(bad.skipped) == 1 and int(bad.bad_run) == 1 and int(bad.step) == 1
  for a, b in zip(jax.tree.leaves((before.params, before.opt_state)),
                  jax.tree.leaves(jax.device_get((bad.params, bad.opt_state)))):
    np.testing.assert_array_equal(a, b)  # bit for bit: nothing was written
  assert float(bad.loss_scale) == (512.0 if fp16 else 1.0)
  good, metrics = fn(bad, frozen, batch)
  assert np.isfinite(float(metrics["loss"])) and int(good.bad_run) == 0 and int(good.skipped) == 1
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before.params),
                                                        jax.tree.leaves(good.params)))


@pytest.mark.slow
def test_a_run_that_keeps_diverging_stops_with_a_diagnostic(tiny_llama_dir, reverse_data,
                                                            tmp_path, capsys):
  model_dir = tmp_path / "model"
  tiny.save_model(str(model_dir), "llama")
  weights = load_file(str(model_dir / "model.safetensors"))
  weights["model.layers.0.mlp.up_proj.weight"][0, 0] = np.inf
  save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
  argv = ["--config", os.path.join(REPO, "configs", "quickstart.yaml"), f"model.path={model_dir}",
          f"data.train={reverse_data[0]}", "data.eval=", "data.seq_len=48", "train.steps=10",
          "train.max_bad_steps=3", "eval.samples=0", f"train.output_dir={tmp_path / 'run'}"]
  assert train.main(argv) == 1
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.startswith("error: step 3: 3 consecutive steps had non-finite gradients (last grad "
                        "norm nan") and "checkpoint of step 3 holds the last finite" in err
  ckpt = checkpoint.Checkpointer(str(tmp_path / "run"), 0, 1, read_only=True)
  saved = tree.flatten(ckpt.restore_params(3))
  ckpt.close()
  assert all(np.isfinite(v).all() for v in saved.values())
  assert all(np.abs(v).max() == 0 for p, v in saved.items() if p.endswith("lora_b"))  # untouched


@pytest.mark.slow
def test_fp16_trains_with_a_dynamic_loss_scale(tiny_llama_dir, reverse_data, tmp_path):
  cfg = _cfg(tiny_llama_dir, tmp_path, "precision.compute=fp16", f"data.train={reverse_data[0]}",
             "train.steps=16", "optim.lr=3e-3", "precision.loss_scale_period=3")
  summary = train.run(cfg)
  records = _metrics(tmp_path)
  scales = [r["loss_scale"] for r in records]
  skipped = [r.get("skipped_steps", 0) for r in records]
  assert scales[0] == 32768.0 and skipped[0] == 1  # 32768 overflows fp16 here
  for t in range(len(records) - 1):
    overflowed = skipped[t] > (skipped[t - 1] if t else 0)
    if overflowed:
      assert scales[t + 1] == scales[t] / 2
    elif t >= 2 and scales[t + 1] != scales[t]:  # doubles after 3 finite steps at one scale
      assert scales[t + 1] == 2 * scales[t] and scales[t - 2] == scales[t]
  assert any(b == 2 * a for a, b in zip(scales, scales[1:]))
  finite = [summary["losses"][s] for s in range(1, 17) if np.isfinite(summary["losses"][s])]
  assert finite[-1] < finite[0] - 0.3


def _metrics(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_attention_dropout_only_in_training(tmp_path):
  tiny.save_model(str(tmp_path), "llama", attention_dropout=0.3)
  tok = hf.load_tokenizer(str(tmp_path))
  cfg = _cfg(str(tmp_path))
  model = train.build_model(cfg, tok)
  assert model.config.attention_dropout == 0.3
  batch = _batch(tok, cfg, n=2)
  apply = loss.logits_fn(model.module)
  evals = [np.asarray(apply(model.params, batch)) for _ in range(2)]
  trains = [np.asarray(apply(model.params, batch, jax.random.PRNGKey(i))) for i in range(2)]
  np.testing.assert_array_equal(evals[0], evals[1])
  assert not np.allclose(trains[0], evals[0]) and not np.allclose(trains[0], trains[1])
  plain = train.build_model(_cfg(str(tmp_path)), tok)
  plain_cfg = plain.module.cfg.__class__(**{**plain.module.cfg.__dict__, "attention_dropout": 0.0})
  logits = plain.module.clone(cfg=plain_cfg).apply({"params": plain.params}, batch["tokens"],
                                                   batch["positions"], batch["segment_ids"])[0]
  np.testing.assert_array_equal(np.asarray(logits), evals[0])  # eval ignores dropout entirely


@pytest.mark.slow
def test_early_stopping_keeps_the_best_checkpoint(tiny_llama_dir, tmp_path):
  # Train on "the fox -> dog"; the crafted eval set wants "bird" after the same prompt, so its
  # loss falls while generic tokens are learned, then rises as "dog" takes over.
  train_file = tiny.write_jsonl(str(tmp_path / "t.jsonl"),
                                [{"prompt": "the fox ->", "completion": " dog"}] * 16)
  eval_file = tiny.write_jsonl(str(tmp_path / "e.jsonl"),
                               [{"prompt": "the fox ->", "completion": " bird"}] * 2)
  out = tmp_path / "run"
  cfg = _cfg(tiny_llama_dir, out, f"data.train={train_file}", f"data.eval={eval_file}",
             "train.steps=60", "optim.lr=1e-2", "optim.schedule=constant", "eval.every=2",
             "eval.patience=2", "data.packing=false")  # 16 rows: two batches
  summary = train.run(cfg)
  stopped = summary["stopped_early"]
  evals = {s: r["eval_loss"] for s, r in summary["evals"].items() if s > 0}
  best_step = min(evals, key=evals.get)
  assert stopped < 60 and stopped == best_step + 4  # two evals without improvement
  assert os.listdir(out / "best") == [str(best_step)]
  export.export(str(out), "hf", str(tmp_path / "best_hf"), step="best")
  tok = hf.load_tokenizer(str(tmp_path / "best_hf"))
  best = train.build_model(_cfg(str(tmp_path / "best_hf"), "unused", f"data.eval={eval_file}"),
                           tok)
  eval_fn = jax.jit(functools.partial(step.eval_step, apply_fn=loss.logits_fn(best.module)))
  examples = data.load(eval_file, cfg.data, tok)
  result = evaluation.evaluate(eval_fn, best.params, {}, examples, cfg, tok.pad_token_id)
  assert result["eval_loss"] == pytest.approx(evals[best_step], rel=1e-5)
  again = train.run(cfg)  # re-running a run that stopped early does nothing
  assert again["final_step"] == stopped and again["stopped_early"] == stopped


@pytest.mark.slow
def test_epochs_set_the_number_of_steps(tiny_llama_dir, reverse_data, tmp_path):
  cfg = _cfg(tiny_llama_dir, tmp_path, f"data.train={reverse_data[0]}", "train.epochs=1.5",
             "data.packing=false")
  summary = train.run(cfg)
  assert summary["final_step"] == 12  # 64 examples / 8 per batch = 8 steps per epoch
  assert config.load(str(tmp_path / "config.yaml")).train.steps == 12


def _cli_config(tmp_path, tiny_llama_dir, reverse_data, steps, **extra):
  cfg = {"model": {"path": tiny_llama_dir},
         "data": {"train": reverse_data[0], "format": "prompt_completion", "seq_len": 48,
                  "cache_dir": str(tmp_path / "cache")},
         "precision": {"compute": "fp32"},
         "train": {"steps": steps, "batch_size": 8, "output_dir": str(tmp_path / "run")},
         "checkpoint": extra.pop("checkpoint", {"every": 0})}
  path = tmp_path / "cfg.yaml"
  path.write_text(yaml.safe_dump(cfg))
  return str(path)


def _start(cfg_file, log_file):
  with open(log_file, "w") as log:  # a file, not a pipe nobody reads while waiting
    return subprocess.Popen([sys.executable, "-m", "ftjax.train", "--config", cfg_file],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)


def _wait_for(predicate, proc, log_file, timeout=240):
  deadline = time.time() + timeout
  while not predicate():
    assert proc.poll() is None, open(log_file).read()[-3000:]
    assert time.time() < deadline, "timed out"
    time.sleep(0.002)


@pytest.mark.slow
def test_sigterm_checkpoints_and_a_rerun_resumes_exactly(tiny_llama_dir, reverse_data, tmp_path):
  steps = 60  # the run is still going when SIGTERM lands (5 steps in), and the re-run is short
  cfg_file = _cli_config(tmp_path, tiny_llama_dir, reverse_data, steps)
  metrics_file = tmp_path / "run" / "metrics.jsonl"
  log_file = tmp_path / "log.txt"
  proc = _start(cfg_file, log_file)
  _wait_for(lambda: metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 5,
            proc, log_file)
  proc.send_signal(signal.SIGTERM)
  proc.wait(timeout=120)
  out = log_file.read_text()
  assert proc.returncode == 128 + signal.SIGTERM, out[-2000:]
  assert "checkpoint saved; run the same command to resume" in out
  ckpt = checkpoint.Checkpointer(str(tmp_path / "run"), 0, 1, read_only=True)
  stopped = ckpt.latest_step()
  ckpt.close()
  assert 5 <= stopped < steps
  resumed = train.run(config.load(cfg_file))
  assert resumed["start_step"] == stopped and resumed["final_step"] == steps
  whole = train.run(config.load(cfg_file, [f"train.output_dir={tmp_path / 'whole'}"]))
  got = {r["step"]: r["loss"] for r in _metrics(tmp_path / "run")}
  assert sorted(got) == list(range(1, steps + 1))
  np.testing.assert_allclose([got[s] for s in range(1, steps + 1)],
                             [whole["losses"][s] for s in range(1, steps + 1)], rtol=1e-6)


@pytest.mark.slow
def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one_usable(
    tiny_llama_dir, reverse_data, tmp_path):
  steps = 60
  cfg_file = _cli_config(tmp_path, tiny_llama_dir, reverse_data, steps,
                         checkpoint={"every": 1, "keep": 2})
  ckpt_dir = tmp_path / "run" / "checkpoints"
  writing = lambda: ckpt_dir.exists() and any(
      n.endswith("orbax-checkpoint-tmp") and n != "1.orbax-checkpoint-tmp"
      for n in os.listdir(ckpt_dir))
  log_file = tmp_path / "log.txt"
  proc = _start(cfg_file, log_file)
  _wait_for(writing, proc, log_file)
  proc.kill()  # SIGKILL while a checkpoint directory is still being written
  proc.wait()
  assert any(n.endswith("orbax-checkpoint-tmp") for n in os.listdir(ckpt_dir))
  resumed = train.run(config.load(cfg_file, ["checkpoint.every=0"]))
  assert 1 <= resumed["start_step"] < steps and resumed["final_step"] == steps
  whole = train.run(config.load(cfg_file, [f"train.output_dir={tmp_path / 'whole'}",
                                           "checkpoint.every=0"]))
  s = steps
  assert resumed["losses"][s] == pytest.approx(whole["losses"][s], rel=1e-6)


@pytest.mark.slow
def test_distillation_from_itself_at_alpha_zero_starts_at_zero(tiny_llama_dir, reverse_data,
                                                               tmp_path):
  cfg = _cfg(tiny_llama_dir, tmp_path, f"data.train={reverse_data[0]}", "train.steps=2",
             f"distill.teacher={tiny_llama_dir}", "distill.alpha=0", "distill.temperature=2")
  summary = train.run(cfg)
  # the teacher is the student's initial weights: zero up to fp32 rounding (the two forward
  # passes are compiled separately)
  assert abs(summary["losses"][1]) < 1e-6 and abs(_metrics(tmp_path)[0]["kl"]) < 1e-6


@pytest.mark.slow
def test_a_distilled_student_moves_toward_its_teacher(tiny_llama_dir, reverse_data, tmp_path):
  teacher = tmp_path / "teacher"
  tiny.save_model(str(teacher), "llama", seed=1)  # other weights, the same tokenizer
  cfg = _cfg(tiny_llama_dir, tmp_path / "run", f"data.train={reverse_data[0]}",
             "train.steps=10", "optim.lr=3e-3", f"distill.teacher={teacher}", "distill.alpha=0")
  summary = train.run(cfg)
  kls = [r["kl"] for r in _metrics(tmp_path / "run")]
  assert summary["losses"][1] == pytest.approx(kls[0]) and kls[0] > 0
  assert kls[-1] < 0.5 * kls[0], kls
  mixed = _cfg(tiny_llama_dir, tmp_path / "mixed", f"data.train={reverse_data[0]}",
               "train.steps=1", f"distill.teacher={teacher}", "distill.alpha=0.25")
  first = train.run(mixed)
  plain = train.run(_cfg(tiny_llama_dir, tmp_path / "plain", f"data.train={reverse_data[0]}",
                         "train.steps=1"))
  kl = _metrics(tmp_path / "mixed")[0]["kl"]
  assert first["losses"][1] == pytest.approx(0.25 * plain["losses"][1] + 0.75 * kl, rel=1e-5)


def test_a_teacher_with_another_tokenizer_is_refused(tiny_llama_dir, reverse_data, tmp_path,
                                                     capsys):
  teacher = tmp_path / "teacher"
  tiny.save_model(str(teacher), "llama", seed=1)
  other = hf.load_tokenizer(tiny_llama_dir)
  other.add_tokens(["<only-the-teacher-has-this>"])
  other.save_pretrained(str(teacher))
  capsys.readouterr()
  argv = ["--config", os.path.join(REPO, "configs", "quickstart.yaml"),
          f"model.path={tiny_llama_dir}", f"data.train={reverse_data[0]}", "data.eval=",
          "data.seq_len=64", f"train.output_dir={tmp_path / 'run'}", f"distill.teacher={teacher}"]
  assert train.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"error: distill.teacher: {teacher} has another tokenizer than") and \
      len(err.splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("family,overrides,method", [
    ("llama", {}, "none"), ("llama", {"tie_word_embeddings": True}, "none"), ("gpt2", {}, "none"),
    ("llama", {}, "lora")], ids=["untied", "tied", "gpt2", "lora_frozen_head"])
def test_chunked_loss_equals_whole_batch_logits(family, overrides, method, tmp_path):
  tiny.save_model(str(tmp_path), family, **overrides)
  cfg = config.load(None, [f"model.path={tmp_path}", "data.train=x", "data.seq_len=32",
                           "train.loss_chunk=24", f"peft.method={method}"])  # 3 rows x 31
  model = train.build_model(cfg, hf.load_tokenizer(str(tmp_path)))  # targets: last chunk padded
  tokens = np.random.default_rng(0).integers(3, 320, (1, 3, 32)).astype(np.int32)
  segment_ids = (np.arange(32)[None, None] < np.array([32, 20, 9])[None, :, None]).astype(np.int32)
  batch = {"tokens": tokens, "positions": np.broadcast_to(np.arange(32), tokens.shape),
           "segment_ids": segment_ids, "loss_mask": segment_ids}
  chunked = loss.chunked_loss(model.module, jnp.float32, model.trainable, cfg.train.loss_chunk)
  assert chunked is not None and chunked.chunk == 24
  assert chunked.kernel_grad == (method == "none")
  params, frozen = tree.split(model.params, model.trainable)
  whole_fn = loss.cross_entropy(loss.logits_fn(model.module))
  run = lambda fn: jax.jit(lambda p: step.accumulate(p, frozen, batch, jax.random.PRNGKey(0),
                                                      fn))(params)
  (g_whole, loss_whole, aux_whole), (g_chunk, loss_chunk, aux_chunk) = \
      run(whole_fn), run(loss.chunked_cross_entropy(chunked))
  n_whole, n_chunk = aux_whole["tokens"], aux_chunk["tokens"]
  assert float(n_chunk) == float(n_whole) == 31 + 19 + 8
  np.testing.assert_allclose(float(loss_chunk), float(loss_whole), rtol=1e-6)
  for path, want in tree.flatten(g_whole).items():
    got = tree.flatten(g_chunk)[path]
    assert np.abs(np.asarray(got - want)).max() <= 1e-5 * np.abs(np.asarray(want)).max(), path
