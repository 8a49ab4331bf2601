"""Partitions: declarative rules (and the older keys as their sugar), the partition CLI, LISA and
sparse fine-tuning inside the jitted step."""

import logging
import re

import jax
import numpy as np
import pytest

import tiny
from ftjax import (checkpoint, config, dynamic, invariants, loss, partition, regularize, rules,
                   train, tree)
from ftjax.config import UserError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory):
  """A tiny Llama with 4 decoder layers (hidden 64, FFN 128, vocab 320, untied head)."""
  path = str(tmp_path_factory.mktemp("tiny4"))
  tiny.save_model(path, "llama", num_hidden_layers=4)
  return path


def _cfg(model_dir, train_file, out_dir, *words):
  base = [f"model.path={model_dir}", f"data.train={train_file}", f"train.output_dir={out_dir}",
          "data.format=prompt_completion", "data.seq_len=64", "train.batch_size=8",
          "train.steps=4", "optim.lr=1e-3", "precision.compute=fp32", "data.buckets=1"]
  return config.load(None, base + list(words))


def _params(run_dir, step):
  ckpt = checkpoint.Checkpointer(run_dir, 0, 1, read_only=True)
  try:
    return {p: np.asarray(v) for p, v in tree.flatten(ckpt.restore_params(step)).items()}
  finally:
    ckpt.close()


@pytest.mark.slow
def test_rules_equal_to_the_older_keys_give_bitwise_equal_runs(tiny4, reverse_data, tmp_path):
  old = ["peft.method=lora", "peft.trainable=[norm]", "peft.frozen=[layers_0/.*lora]",
         "optim.weight_decay=0.1", "optim.no_decay=[scale$, embedding$]",
         "optim.lr_groups=[{pattern: q_proj, lr: 5e-4}]"]
  rules = ("partition.rules=[{pattern: 'layers_0/.*lora', train: false}, "
           "{kind: norm, train: true}, {pattern: q_proj, lr: 0.5}, "
           "{pattern: 'scale$', weight_decay: 0}, {pattern: 'embedding$', weight_decay: 0}]")
  new = ["peft.method=lora", "optim.weight_decay=0.1", "optim.no_decay=[]", rules]
  a = train.run(_cfg(tiny4, reverse_data[0], tmp_path / "a", *old))
  b = train.run(_cfg(tiny4, reverse_data[0], tmp_path / "b", *new))
  assert a.losses == b.losses  # bitwise: the same floats at every step
  pa, pb = _params(tmp_path / "a", 4), _params(tmp_path / "b", 4)
  assert pa.keys() == pb.keys() and all(np.array_equal(pa[k], pb[k]) for k in pa)
  assert not any(k.startswith("layers_0/") and "lora" in k for k in pa)
  assert {k for k in pa if "norm" in k} == {f"layers_{i}/{n}/scale" for i in range(4) for n in
                                            ("input_layernorm", "post_attention_layernorm")
                                            } | {"norm/scale"}


def test_selectors_and_first_match_per_setting(tiny4, reverse_data, tmp_path):
  cfg = _cfg(tiny4, reverse_data[0], "unused", "partition.rules=[{layers: '1-2,3', kind: mlp, "
             "train: true, lr: 2}, {kind: mlp, lr: 3}, {pattern: up_proj, weight_decay: 0.5}]",
             "optim.weight_decay=0.1", "peft.method=lora")
  rep = partition.report(cfg)
  d = rep.decisions
  assert d["layers_2/mlp/up_proj/kernel"] == rules.Decision(
      True, 2.0, 0.5, (("train", "partition.rules[0]"), ("lr", "partition.rules[0]"),
                       ("weight_decay", "partition.rules[2]")))
  assert not d["layers_0/mlp/up_proj/kernel"].train  # layer 0 is not selected
  # under method none, a rule that chooses what trains freezes the rest (as peft.trainable)
  full = partition.report(_cfg(tiny4, reverse_data[0], "unused",
                               "partition.rules=[{layers: 1, train: true}]")).decisions
  assert {p for p, x in full.items() if x.train} == {p for p in full if p.startswith("layers_1/")}
  assert d["layers_0/self_attn/q_proj/lora_a"].rule("train") == "default: method's own"
  assert d["layers_0/self_attn/q_proj/lora_a"].weight_decay == 0.1
  for bad, message in [("[{layers: '4', train: true}]", r"partition.rules\[0\]: layers 4 selects "
                        "no parameter"),
                       ("[{kind: mlp, pattern: lm_head, train: true}]",
                        r"partition.rules\[0\]: pattern 'lm_head' and kind mlp selects no"),
                       ("[{layers: '3-1', train: true}]", r"partition.rules\[0\].layers: '3-1'"),
                       ("[{kind: mlp}]", "each rule must set train, lr or weight_decay")]:
    with pytest.raises(UserError, match=message):
      train.run(_cfg(tiny4, reverse_data[0], tmp_path / "bad", f"partition.rules={bad}"))


def test_partition_cli_table_matches_hand_counted_groups(tiny4, reverse_data, tmp_path, capsys):
  a = tmp_path / "a.yaml"
  a.write_text(f"""model: {{path: {tiny4}}}
data: {{train: {reverse_data[0]}, seq_len: 64}}
peft: {{method: lora, lora: {{r: 4, targets: [q_proj, v_proj]}}}}
partition:
  rules:
    - {{kind: norm, train: true}}
    - {{layers: "0-1", lr: 0.5}}
""")
  assert partition.main(["--config", str(a), "--devices", "1"]) == 0
  out = capsys.readouterr().out
  cells = [re.split(r"\s{2,}", line) for line in out.splitlines()
           if line.startswith(("yes", "no"))]
  rows = {tuple(c[:4]): c for c in cells}
  hidden, layers, vocab, r, kv = 64, 4, 320, 4, 32  # 2 of 4 heads of 16 for keys and values
  lora_per_layer = (hidden * r + r * hidden) + (hidden * r + r * kv)  # q and v, A and B
  # LoRA in layers 0-1 at lr x0.5; 2-3 at x1; adamw holds mu and nu (fp32) per entry
  assert rows[("yes", "peft", "attention", "0-1")][5] == f"{2 * lora_per_layer:,}"
  assert rows[("yes", "peft", "attention", "2-3")][5] == f"{2 * lora_per_layer:,}"
  assert rows[("yes", "base", "norm", "-")][5] == f"{hidden:,}"  # the final norm
  assert rows[("yes", "base", "norm", "0-1")][5] == f"{2 * 2 * hidden:,}"
  assert rows[("no", "base", "mlp", "0-3")][5] == f"{layers * 3 * hidden * 128:,}"
  assert rows[("no", "base", "attention", "0-3")][5] == \
      f"{layers * (2 * hidden * hidden + 2 * hidden * kv):,}"
  assert rows[("no", "base", "embedding", "-")][5] == f"{vocab * hidden:,}"
  trained = 4 * lora_per_layer + (2 * layers + 1) * hidden
  assert f"partition: {trained:,} of " in out
  opt = partition.report(config.load(str(a)), 1).opt_bytes
  assert opt == 2 * 4 * trained + 4 + 4  # mu and nu; adam's and the schedule's step counts
  # --diff: freezing layer 3's LoRA and dropping the norms
  b = tmp_path / "b.yaml"
  b.write_text(a.read_text().replace("- {kind: norm, train: true}",
                                     "- {pattern: 'layers_3/.*lora', train: false}"))
  assert partition.main(["--config", str(a), "--diff", str(b), "--devices", "1"]) == 0
  out = capsys.readouterr().out
  # layer 3's LoRA, the norms of layers 2-3 and the final norm; the norms of layers 0-1
  assert f"train, lr x1, decay 0 -> frozen: {lora_per_layer + 5 * hidden:,} parameters" in out
  assert "train, lr x0.5, decay 0 -> frozen: 256 parameters" in out
  assert partition.main(["--config", str(tmp_path / "missing.yaml")]) == 2
  assert "config file not found" in capsys.readouterr().err


def _compiles(caplog):
  return sum("train_step" in r.getMessage() and "Compiling" in r.getMessage()
             for r in caplog.records)


@pytest.mark.slow
def test_lisa_windows_train_exactly_k_layers_without_recompiling_and_resume(tiny4, reverse_data,
                                                                            tmp_path, caplog):
  lisa = ["partition.lisa.layers=1", "partition.lisa.every=2", "train.steps=6",
          "checkpoint.every=2", "checkpoint.keep=5", "optim.weight_decay=0.1",
          "regularize.l2sp=0.1",  # L2-SP's pull stays out of idle layers too
          f"data.mix=[{{train: {reverse_data[1]}, weight: 0.5}}]"]  # and replay resumes exactly
  out = tmp_path / "lisa"
  jax.config.update("jax_log_compiles", True)
  try:
    with caplog.at_level(logging.WARNING):
      full = train.run(_cfg(tiny4, reverse_data[0], out, *lisa))
  finally:
    jax.config.update("jax_log_compiles", False)
  assert _compiles(caplog) == 1  # one compilation of the step for 3 windows
  from ftjax import hf
  before = {p: np.asarray(v) for p, v in tree.flatten(hf.load(tiny4).params).items()}
  snaps = [before] + [_params(out, s) for s in (2, 4, 6)]
  for w in range(3):
    a, b = snaps[w], snaps[w + 1]
    moved = {int(p.split("/")[0].split("_")[1]) for p in a
             if p.startswith("layers_") and not np.array_equal(a[p], b[p])}
    want = np.flatnonzero(np.asarray(dynamic.lisa_layers(np.int32(2 * w), 4, 1, 2, 0)))
    assert moved == set(want.tolist()), (w, moved, want)
    in_layer = {p for p in a if p.startswith(f"layers_{want[0]}/")}
    invariants.frozen_unchanged(a, b, in_layer | {p for p in a if not p.startswith("layers_")})
    assert not np.array_equal(a["embed_tokens/embedding"], b["embed_tokens/embedding"])
  # stop after step 3 (mid-window) and resume: the same windows and losses
  out2 = tmp_path / "resumed"
  train.run(_cfg(tiny4, reverse_data[0], out2, *lisa, "train.stop_after=3"))
  rest = train.run(_cfg(tiny4, reverse_data[0], out2, *lisa))
  assert rest.start_step == 3
  assert {s: rest.losses[s] for s in (4, 5, 6)} == {s: full.losses[s] for s in (4, 5, 6)}


@pytest.mark.slow
@pytest.mark.parametrize("score", ["grad2", "fisher"])
def test_sparse_trains_only_the_top_entries_of_each_tensor(score, tiny_llama_dir, reverse_data,
                                                          tmp_path):
  out = tmp_path / "sparse"
  steps = 3 if score == "grad2" else 1
  extra = [] if score == "grad2" else ["regularize.l2sp=0.1"]  # the sparse state in a chain
  cfg = _cfg(tiny_llama_dir, reverse_data[0], out, "partition.sparse.density=0.05",
             f"partition.sparse.score={score}", "partition.sparse.warmup_steps=2",
             f"train.steps={steps}", "optim.weight_decay=0.1", *extra)
  train.run(cfg)
  from ftjax import assembly, data, hf
  tok = hf.load_tokenizer(tiny_llama_dir)
  model = assembly.from_config(cfg, tok)
  params, frozen = model.split()
  examples = data.load(cfg.data.train, cfg.data, tok)
  batches = data.train_batches(cfg, examples, tok.pad_token_id)  # the run's batches
  loss_fn = loss.cross_entropy(loss.logits_fn(model.module))
  score_fn = dynamic.scores_grad2 if score == "grad2" else regularize.fisher
  scores = score_fn(loss_fn, params, frozen, [batches.get(s) for s in range(2)])
  after = _params(out, steps)
  index = tree.flatten(dynamic.top_entries(scores, 0.05))
  for p, before in tree.flatten(params).items():
    s = np.asarray(tree.flatten(scores)[p]).reshape(-1)
    k = dynamic.sparse_size(s.size, 0.05)
    top = np.argsort(-s, kind="stable")[:k]  # the reference top-d in NumPy
    np.testing.assert_array_equal(np.asarray(index[p]), np.sort(top))
    moved = np.flatnonzero(np.asarray(before).reshape(-1) != after[p].reshape(-1))
    assert set(moved.tolist()) <= set(top.tolist()), p  # nothing outside the mask moved
    assert len(moved) >= 0.9 * k, p  # (and the chosen entries did)
  if score == "fisher":
    return
  # the optimizer state is the chosen entries' (Adam mu and nu) plus their int32 indices
  rep = partition.report(cfg, 1)
  chosen = sum(dynamic.sparse_size(int(np.prod(v.shape)), 0.05) for v in
               tree.flatten(params).values())
  assert rep.opt_bytes == chosen * (4 + 4 + 4) + 4 + 4 + 1  # + two step counts, the ready flag


def test_lisa_gives_each_layer_its_own_adam_state_and_the_runs_schedule():
  """Per layer, LISA's updates are those of a fresh AdamW that steps only in that layer's
  windows (torch's per-parameter state), at the lr of the run's step."""
  import optax

  from ftjax import models, optim
  from ftjax.config import LisaConfig, OptimConfig, PartitionConfig
  family = models.for_model_type("llama")
  shapes = {"embed_tokens/embedding": (5, 3), "norm/scale": (3,),
            **{f"layers_{i}/mlp/up_proj/kernel": (3, 4) for i in range(4)}}
  rng = np.random.default_rng(0)
  params = tree.unflatten({p: jax.numpy.asarray(rng.normal(size=s), jax.numpy.float32)
                           for p, s in shapes.items()})
  cfg = OptimConfig(lr=0.01, schedule="linear", weight_decay=0.1, clip_norm=0.0)
  steps, every = 12, 3
  tx, lr = optim.build(cfg, steps, params, 4, family,
                       dynamic=PartitionConfig(lisa=LisaConfig(layers=1, every=every)), seed=3)
  state, got = tx.init(params), params
  grads = [tree.unflatten({p: jax.numpy.asarray(rng.normal(size=s), jax.numpy.float32)
                           for p, s in shapes.items()}) for _ in range(steps)]
  for g in grads:
    u, state = tx.update(g, state, got)
    got = optax.apply_updates(got, u)
  # the reference, leaf by leaf: adam direction + decoupled decay, times the step's lr
  for p, value in tree.flatten(params).items():
    layer = family.layer_index(p)
    adam = optax.scale_by_adam(cfg.b1, cfg.b2, cfg.eps)
    s, x = adam.init(value), value
    wd = 0.0 if p.endswith(("embedding", "scale")) else 0.1
    for t, g in enumerate(grads):
      if layer is not None and not bool(dynamic.lisa_layers(np.int32(t), 4, 1, every, 3)[layer]):
        continue
      d, s = adam.update(tree.flatten(g)[p], s)
      x = x - lr(t) * (d + wd * x)
    np.testing.assert_allclose(np.asarray(tree.flatten(got)[p]), np.asarray(x), rtol=1e-6,
                               atol=1e-7, err_msg=p)
