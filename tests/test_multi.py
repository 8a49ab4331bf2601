"""Many adapters over one base: per-row routing against each adapter alone, gradients, training
with tasks, export, generation and config errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from ftjax import assembly, config, loss, tree
from ftjax.config import NamedLoraConfig, PeftConfig, UserError
from ftjax.peft import multi


def _adapters(family):
  targets = ["all-linear"]
  narrow = ["q_proj", "v_proj"] if family != "gpt2" else ["c_attn"]
  return {"math": NamedLoraConfig(r=4, alpha=8.0, targets=targets),
          "code": NamedLoraConfig(r=8, alpha=4.0, targets=narrow, dora=True),
          "chat": NamedLoraConfig(r=2, alpha=2.0, targets=targets, rslora=True)}


def _model(path, family, routing="mask", seed=0):
  """A tiny model with three adapters whose B (and DoRA magnitudes) are random: non-trivial."""
  model = assembly.load_model(path, PeftConfig(adapters=_adapters(family)), compute="fp32")
  assert model.trainable == {p for p in tree.flatten(model.params) if "/lora_" in p}
  rng = np.random.default_rng(seed)
  flat = {p: (jnp.asarray(v + 0.1 * rng.standard_normal(v.shape), v.dtype)
              if p.endswith(("lora_b", "lora_magnitude")) else v)
          for p, v in tree.flatten(model.params).items()}
  spec = dataclasses.replace(model.spec, routing=routing)
  return dataclasses.replace(model, module=model.module.clone(peft=spec),
                             params=tree.unflatten(flat))


def _batch(rows=6, length=10, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, 300, (rows, length)).astype(np.int32)
  segment_ids = (np.arange(length)[None] < rng.integers(4, length + 1, (rows, 1))).astype(
      np.int32)
  positions = np.maximum(np.cumsum(segment_ids, 1) - 1, 0).astype(np.int32)
  loss_mask = segment_ids.copy()
  return {"tokens": tokens, "positions": positions, "segment_ids": segment_ids,
          "loss_mask": loss_mask}


def _alone(model, name):
  """The model with adapter `name` only, as a plain LoRA model."""
  spec, flat = model.spec.single(name, tree.flatten(model.params))
  return model.module.clone(peft=spec), tree.unflatten(flat)


@pytest.fixture(scope="module", params=["llama", pytest.param("gpt2", marks=pytest.mark.slow)])
def family_dir(request, tmp_path_factory):
  path = str(tmp_path_factory.mktemp(request.param))
  tiny.save_model(path, request.param)
  return request.param, path


@pytest.mark.parametrize("routing", ["auto", pytest.param("mask", marks=pytest.mark.slow),
                                     pytest.param("gather", marks=pytest.mark.slow)])
def test_mixed_rows_equal_each_adapter_alone(family_dir, routing):
  family, path = family_dir
  model = _model(path, family, routing)
  batch = _batch()
  ids = np.array([0, 1, 2, 1, 0, 2], np.int32)
  mixed = np.asarray(model.apply(model.params, {**batch, "adapter": ids[:, None]}))
  for k, name in enumerate(model.spec.names):
    module, params = _alone(model, name)
    alone, _ = module.apply({"params": params}, batch["tokens"], batch["positions"],
                            batch["segment_ids"])
    rows = ids == k
    real = batch["segment_ids"][rows].astype(bool)
    np.testing.assert_allclose(mixed[rows][real], np.asarray(alone)[rows][real], atol=1e-5,
                               rtol=0)
  # and the adapters differ from each other (the comparison above can fail)
  module, params = _alone(model, "math")
  other = np.asarray(module.apply({"params": params}, batch["tokens"], batch["positions"],
                                  batch["segment_ids"])[0])
  assert np.abs(other[1] - mixed[1]).max() > 1e-3


def _grads(module, params, frozen, batch):
  """Gradients of the summed next-token loss of `batch`."""
  summed = loss.cross_entropy(loss.logits_fn(module))
  return jax.jit(jax.grad(lambda p, b: summed(tree.merge(p, frozen), b, None, None)[0]))(
      params, batch)


@pytest.mark.slow
@pytest.mark.parametrize("routing", ["mask", "gather"])
def test_mixed_batch_gradients_are_the_sum_of_each_adapters(family_dir, routing):
  family, path = family_dir
  model = _model(path, family, routing)
  batch = _batch()
  ids = np.array([0, 1, 2, 1, 0, 2], np.int32)
  params, frozen = model.split()
  grads = tree.flatten(_grads(model.module, params, frozen, {**batch, "adapter": ids[:, None]}))
  want = {p: np.zeros(v.shape, np.float32) for p, v in grads.items()}
  for k, name in enumerate(model.spec.names):
    rows = ids == k
    module, single = _alone(model, name)
    part = {key: v[rows] for key, v in batch.items()}
    s_params, s_frozen = tree.split(single, {p for p in tree.flatten(single)
                                             if p.rsplit("/", 1)[-1].startswith("lora_")})
    g = _grads(module, s_params, s_frozen, part)
    for p, v in multi.place(name, tree.flatten(g)).items():
      want[p] += np.asarray(v)
  for p in grads:
    np.testing.assert_allclose(np.asarray(grads[p]), want[p], atol=2e-5, rtol=1e-4, err_msg=p)
  assert max(np.abs(v).max() for v in want.values()) > 1e-3


def test_unrouted_apply_is_an_error(family_dir):
  family, path = family_dir
  model = _model(path, family)
  with pytest.raises(UserError, match="adapter id"):
    model.apply(model.params, _batch())
  batch = _batch()
  step = jax.jit(lambda p, b: model.module.apply({"params": p}, b["tokens"], b["positions"],
                                                 b["segment_ids"])[0])
  with pytest.raises(UserError, match="outside the traced"):  # ids would be compiled in
    with multi.rows(np.zeros(6, np.int32)):
      step(model.params, batch)


def test_an_adapter_name_must_not_read_as_another_module_kind(tiny_llama_dir):
  path = tiny_llama_dir
  bad = {"layernorm": NamedLoraConfig(targets=["all-linear"])}
  with pytest.raises(UserError, match="reads as a norm module"):
    assembly.load_model(path, PeftConfig(adapters=bad))


# --- training with tasks ---------------------------------------------------------------------

def _copy_records(n, seed=1):
  words = "apple river stone cloud fox dog bird time nine early".split()
  rng = np.random.default_rng(seed)
  return [{"prompt": "copy: " + " ".join(p) + " ->", "completion": " " + " ".join(p)}
          for p in (list(rng.choice(words, size=3, replace=False)) for _ in range(n))]


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
  root = tmp_path_factory.mktemp("tasks")
  return {"rev": tiny.write_jsonl(str(root / "rev.jsonl"), tiny.reverse_records(48)),
          "copy": tiny.write_jsonl(str(root / "copy.jsonl"), _copy_records(48))}


def _task_cfg(model_dir, files, out_dir, tasks=("rev", "copy"), *words):
  base = [f"model.path={model_dir}", f"train.output_dir={out_dir}",
          "data.format=prompt_completion", "data.seq_len=64", "train.batch_size=4",
          "train.steps=6", "optim.lr=1e-2", "precision.compute=fp32", "train.log_every=1"]
  base += [f"data.train.{t}={files[t]}" for t in tasks]
  base += [f"peft.adapters.{t}.targets=[all-linear]" for t in tasks]
  base += ["peft.adapters.copy.r=4"] if "copy" in tasks else []
  return config.load(None, base + list(words))


@pytest.mark.slow
def test_two_task_run_equals_single_task_runs(tiny_llama_dir, task_files, tmp_path):
  """With one task per batch and a stateless optimizer (SGD, constant lr), each adapter sees
  exactly what it would see alone: the two-task run's losses are the single-task runs'."""
  from ftjax import train  # pylint: disable=import-outside-toplevel

  sgd = ["optim.name=sgd", "optim.lr=0.5", "optim.schedule=constant", "data.task_batches=single"]
  both = _task_cfg(tiny_llama_dir, task_files, str(tmp_path / "both"), ("rev", "copy"), *sgd)
  batches = train._data(both).batches
  order = [int(batches.get(s)["adapter"][0, 0]) for s in range(6)]
  assert all(len(set(batches.get(s)["adapter"][:, 0])) == 1 for s in range(6))
  assert set(order) == {0, 1}, "the draw should hold both tasks"
  together = train.run(both).losses
  for k, name in enumerate(("rev", "copy")):
    steps = [s + 1 for s in range(6) if order[s] == k]
    alone = train.run(_task_cfg(tiny_llama_dir, task_files, str(tmp_path / name), (name,), *sgd,
                                f"train.steps={len(steps)}")).losses
    np.testing.assert_allclose([together[s] for s in steps],
                               [alone[i + 1] for i in range(len(steps))], rtol=1e-5)
    assert alone[len(steps)] < alone[1]


@pytest.mark.slow
def test_mixed_batches_train_both_tasks_and_resume_exactly(tiny_llama_dir, task_files,
                                                           tmp_path):
  from ftjax import train  # pylint: disable=import-outside-toplevel

  words = ["data.eval_fraction=0.25", "train.steps=8", "checkpoint.every=4"]
  cfg = _task_cfg(tiny_llama_dir, task_files, str(tmp_path / "a"), ("rev", "copy"), *words)
  batches = train._data(cfg).batches
  assert any(len(set(batches.get(s)["adapter"][:, 0])) == 2 for s in range(8))
  whole = train.run(cfg)
  for name in ("rev", "copy"):
    key = f"eval_{name}_loss"
    assert whole.after[key] < whole.before[key] - 0.3, (name, whole.before, whole.after)
  part = _task_cfg(tiny_llama_dir, task_files, str(tmp_path / "b"), ("rev", "copy"), *words,
                   "train.stop_after=4")
  train.run(part)
  resumed = train.run(_task_cfg(tiny_llama_dir, task_files, str(tmp_path / "b"),
                                ("rev", "copy"), *words))
  assert resumed.start_step == 4
  np.testing.assert_allclose([resumed.losses[s] for s in range(5, 9)],
                             [whole.losses[s] for s in range(5, 9)], rtol=1e-5)
  with pytest.raises(UserError, match="cannot resume step 8 exactly"):  # another task mix
    train.run(_task_cfg(tiny_llama_dir, task_files, str(tmp_path / "b"), ("rev", "copy"),
                        *words, "train.steps=10", "data.task_weights.rev=3"))


def test_task_weights_share_out_an_epoch(task_files, tiny_llama_dir):
  from ftjax import data, hf  # pylint: disable=import-outside-toplevel

  cfg = _task_cfg(tiny_llama_dir, task_files, "unused", ("rev", "copy"),
                  "data.task_weights.rev=3", "data.task_weights.copy=1")
  tokenizer = hf.load_tokenizer(tiny_llama_dir)
  loaded = data.load_splits(cfg.data, tokenizer, ["rev", "copy"])
  b = data.Batches(loaded.train.examples, 4, 64, 0, 0, tasks=loaded.tasks,
                   task_weights=cfg.data.task_weights)
  assert b.task_counts == [72, 24]
  rows = np.concatenate([b.global_rows(s) for s in range(b.steps_per_epoch)])
  tasks = np.array([loaded.train.examples[b.rows[r][0]].task for r in rows])
  assert (tasks == 0).sum() == 72 and (tasks == 1).sum() == 24
  again = data.Batches(loaded.train.examples, 4, 64, 0, 0, tasks=loaded.tasks,
                       task_weights=cfg.data.task_weights)
  assert all((again.global_rows(s) == b.global_rows(s)).all() for s in (0, 5, 30))
  packed = data.Batches(loaded.train.examples, 4, 256, 0, 0, tasks=loaded.tasks, packing=True)
  assert len(packed.rows) < len(loaded.train.examples)
  for row in packed.rows:  # a packed row holds one task's examples
    assert len({loaded.train.examples[i].task for i in row}) == 1
  batch = packed.get(0)
  first = [loaded.train.examples[packed.rows[r][0]].task for r in packed.global_rows(0)]
  assert batch["adapter"][:, 0].tolist() == first


def test_data_dry_run_shows_the_tasks(task_files, tiny_llama_dir, tmp_path, capsys):
  from ftjax.data import __main__ as dry  # pylint: disable=import-outside-toplevel

  cfg = tmp_path / "tasks.yaml"
  cfg.write_text(f"""model: {{path: {tiny_llama_dir}}}
peft: {{adapters: {{copy: {{r: 4}}, rev: {{r: 4}}}}}}
data:
  train: {{rev: {task_files['rev']}, copy: {task_files['copy']}}}
  format: prompt_completion
  seq_len: 64
  task_batches: single
  task_weights: {{rev: 5, copy: 1}}
train: {{batch_size: 6}}
""")
  assert dry.main(["--config", str(cfg)]) == 0
  out = capsys.readouterr().out
  assert "tasks (rows per epoch): copy 16, rev 80; single batches" in out  # adapters' order
  assert "batches: 15 steps per epoch" in out  # 80 // 6 + 16 // 6


@pytest.mark.parametrize("words, message", [
    (["data.train.rev=x.jsonl"], "give each its adapter in peft.adapters"),
    (["data.train=x.jsonl", "peft.adapters.rev.r=4"], "must name each adapter's data"),
    (["data.train.rev=x.jsonl", "peft.adapters.other.r=4"], "no adapter of that name"),
    (["data.train.rev=x.jsonl", "peft.adapters.rev.r=0"], "r and alpha must be > 0"),
    (["data.train.kernel=x.jsonl", "peft.adapters.kernel.r=4"], "adapter name"),
    (["data.train.rev=x.jsonl", "peft.adapters.rev.r=4", "peft.method=prefix"],
     "cannot be combined with peft.method prefix"),
    (["data.train.rev=x.jsonl", "peft.adapters.rev.r=4", "data.task_weights.copy=2"],
     "data.task_weights.copy"),
    (["data.train.rev=x.jsonl", "peft.adapters.rev.r=4", "data.eval=y.jsonl"],
     "name each eval set after its task"),
    (["data.train.rev=x.jsonl", "peft.adapters.rev.r=4", "data.format=preference"],
     "cannot be combined with data.format preference"),
    (["data.train.rev=x.jsonl", "peft.adapters.rev.r=4", "peft.lora.r=64"],
     "peft.lora is not used with peft.adapters"),
    (["data.train=x.jsonl", "data.task_batches=single"], "data.task_batches needs tasks"),
    (["data.train.rev=x.jsonl", "peft.adapters.rev.r=4", "data.task_weights.rev=.inf"],
     "expected a finite float"),
])
def test_task_config_errors(words, message):
  with pytest.raises(UserError, match=message):
    config.load(None, ["model.path=m"] + words)


# --- export and generation -------------------------------------------------------------------

def test_generation_with_two_adapters_in_one_batch_equals_each_alone(family_dir):
  from ftjax import generate  # pylint: disable=import-outside-toplevel

  family, path = family_dir
  model = _model(path, family)
  prompts = [[1, 40, 41, 42], [1, 50, 51], [1, 60, 61, 62, 63], [1, 70]]
  ids = [0, 1, 1, 0]
  mixed = generate.sample(model.module, model.params, prompts, 8, adapters=ids)
  outs = {}
  for k, name in enumerate(model.spec.names[:2]):
    module, params = _alone(model, name)
    outs[name] = generate.sample(module, params, prompts, 8)
    for i in np.flatnonzero(np.array(ids) == k):
      assert mixed[i] == outs[name][i], (name, i)
  assert outs["math"] != outs["code"]  # the adapters do generate differently


@pytest.mark.slow
def test_export_each_adapter_and_generate_from_peft_dirs(tiny_llama_dir, tmp_path, capsys):
  """`--to peft` of a run writes one PEFT adapter per name; HF PEFT over the base gives that
  adapter's logits; `generate --adapter NAME=DIR --prompt NAME:TEXT` decodes both in one batch
  exactly as each adapter alone, and `--run` takes NAME: prompts likewise."""
  import peft as hf_peft  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  from ftjax import export, generate, train  # pylint: disable=import-outside-toplevel

  from ftjax import evaluate  # pylint: disable=import-outside-toplevel

  files = {"rev": tiny.write_jsonl(str(tmp_path / "rev.jsonl"), tiny.reverse_records(24)),
           "copy": tiny.write_jsonl(str(tmp_path / "copy.jsonl"), _copy_records(24))}
  held = tiny.write_jsonl(str(tmp_path / "copy_eval.jsonl"), _copy_records(8, seed=5))
  run = str(tmp_path / "run")
  result = train.run(_task_cfg(tiny_llama_dir, files, run, ("rev", "copy"), "train.steps=4",
                               "optim.lr=5e-2", f"data.eval.copy={held}"))
  alone = evaluate.run(evaluate.Request(data=[held], run=run, adapter="copy"))
  np.testing.assert_allclose(alone["loss"], result.after["eval_copy_loss"], rtol=1e-5)
  with pytest.raises(UserError, match="choose one with --adapter NAME"):
    evaluate.run(evaluate.Request(data=[held], run=run))
  assert export.main(["--run", run, "--to", "peft", "--out", str(tmp_path / "peft")]) == 0
  assert export.main(["--run", run, "--to", "hf", "--adapter", "copy",
                      "--out", str(tmp_path / "hf_copy")]) == 0
  assert export.main(["--run", run, "--to", "hf", "--out", str(tmp_path / "x")]) == 2
  assert "name it with --adapter" in capsys.readouterr().err

  _, model, params, _ = export.load_run(run)
  batch = _batch(4)
  ours = np.asarray(model.apply(params, {**batch, "adapter": np.array([[0], [1], [1], [0]])}))
  real = batch["segment_ids"].astype(bool)
  for k, name in enumerate(("rev", "copy")):
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    hf_model = hf_peft.PeftModel.from_pretrained(base, str(tmp_path / "peft" / name)).eval()
    with torch.no_grad():
      theirs = hf_model(input_ids=torch.tensor(batch["tokens"], dtype=torch.long),
                        attention_mask=torch.tensor(batch["segment_ids"])).logits.numpy()
    rows = np.array([0, 1, 1, 0]) == k
    np.testing.assert_allclose(ours[rows][real[rows]], theirs[rows][real[rows]], atol=1e-4)
  merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf_copy"))
  with torch.no_grad():
    theirs = merged(input_ids=torch.tensor(batch["tokens"], dtype=torch.long),
                    attention_mask=torch.tensor(batch["segment_ids"])).logits.numpy()
  np.testing.assert_allclose(ours[1][real[1]], theirs[1][real[1]], atol=1e-4)

  prompts = ["reverse these words: fox dog bird ->", "copy: fox dog bird ->"]
  capsys.readouterr()
  assert generate.main(["--model", tiny_llama_dir, "--max-new-tokens", "6",
                        "--adapter", f"rev={tmp_path / 'peft' / 'rev'}",
                        "--adapter", f"copy={tmp_path / 'peft' / 'copy'}",
                        "--prompt", f"rev:{prompts[0]}", "--prompt", f"copy:{prompts[1]}"]) == 0
  together = capsys.readouterr().out
  assert generate.main(["--run", run, "--max-new-tokens", "6", "--prompt", f"rev:{prompts[0]}",
                        "--prompt", f"copy:{prompts[1]}"]) == 0
  from_run = capsys.readouterr().out
  alone = []
  for name, prompt in zip(("rev", "copy"), prompts):
    assert generate.main(["--model", tiny_llama_dir, "--max-new-tokens", "6", "--adapter",
                          str(tmp_path / "peft" / name), "--prompt", prompt]) == 0
    alone.append(capsys.readouterr().out.strip())
  texts = [block.split("\n", 1)[1].strip() for block in together.split("### ")[1:]]
  assert texts == alone
  assert from_run == together
  assert generate.main(["--run", run, "--prompt", "nobody:hi"]) == 2
  assert "NAME:TEXT" in capsys.readouterr().err


@pytest.mark.slow
def test_tasks_on_a_mesh_equal_one_device(tiny_llama_dir, task_files, tmp_path):
  """Adapters shard with their layers (rank whole); routed rows split over data x fsdp."""
  from ftjax import train  # pylint: disable=import-outside-toplevel

  words = ["train.steps=3", "peft.adapters.copy.dora=true"]
  one = train.run(_task_cfg(tiny_llama_dir, task_files, str(tmp_path / "one"), ("rev", "copy"),
                            *words)).losses
  mesh = train.run(_task_cfg(tiny_llama_dir, task_files, str(tmp_path / "mesh"), ("rev", "copy"),
                             *words, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")).losses
  np.testing.assert_allclose([mesh[s] for s in (1, 2, 3)], [one[s] for s in (1, 2, 3)], rtol=1e-5)
