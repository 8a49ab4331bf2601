"""The data pipeline: masks per format, sources, the tokenisation cache, packing, batches,
bad records, and the dry run."""

import hashlib
import json
import os
import re

import datasets
import numpy as np
import pytest
import yaml

import tiny
from ftjax import config, data, hf, train
from ftjax.loss import token_losses
from ftjax.data import __main__ as dry_run
from test_data_chat import CONVERSATION

TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant: {% endif %}")


def _cfg(*words) -> config.Config:
  return config.load(None, ["model.path=m", "data.train=unused", *words])


def _same(a, b):
  return ([(e.tokens.tolist(), e.loss_mask.tolist(), e.prompt_len, e.label) for e in a] ==
          [(e.tokens.tolist(), e.loss_mask.tolist(), e.prompt_len, e.label) for e in b])


@pytest.fixture(scope="module")
def smol_tokenizer(smollm2_dir):
  return hf.load_tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def chat_model_dir(tiny_llama_dir, tmp_path_factory):
  """The tiny model's config and tokenizer, with a chat template (enough for the dry run)."""
  path = tmp_path_factory.mktemp("chat_model")
  with open(os.path.join(tiny_llama_dir, "config.json")) as f:
    (path / "config.json").write_text(f.read())
  tok = hf.load_tokenizer(tiny_llama_dir)
  tok.chat_template = TEMPLATE
  tok.save_pretrained(str(path))
  return str(path)


@pytest.mark.smollm2
@pytest.mark.parametrize("fmt,record,pieces,label", [
    ("text", {"text": "The cat sat."}, [("The", 0), (" cat sat.", 1), ("<|im_end|>", 1)], -1),
    ("prompt_completion", {"prompt": "Q: 2+2?\nA:", "completion": " 4"},
     [("Q: 2+2?\nA:", 0), (" 4", 1), ("<|im_end|>", 1)], -1),
    ("classification", {"text": "a great film", "label": "pos"}, [("a great film", 0)], 1),
    ("classification", {"text": "a dull film", "label": 0}, [("a dull film", 0)], 0),
])
def test_each_format_masks_the_hand_checked_tokens(smol_tokenizer, fmt, record, pieces, label):
  cfg = _cfg(f"data.format={fmt}", "data.labels=[neg, pos]").data
  (ex,) = data.tokenize([record], cfg, smol_tokenizer, "mem")
  want_tokens, want_mask = [], []
  for text, trained in pieces:
    ids = smol_tokenizer(text, add_special_tokens=False)["input_ids"]
    want_tokens += ids
    want_mask += [trained] * len(ids)
  assert ex.tokens.tolist() == want_tokens
  assert ex.loss_mask.tolist() == want_mask
  assert ex.label == label


def _write_sources(tmp_path, records):
  """The same records as jsonl, json, csv, parquet, a saved dataset and two jsonl halves."""
  ds = datasets.Dataset.from_list(records)
  paths = {"jsonl": tiny.write_jsonl(str(tmp_path / "all.jsonl"), records),
           "json": str(tmp_path / "all.json"), "csv": str(tmp_path / "all.csv"),
           "parquet": str(tmp_path / "all.parquet"), "saved": str(tmp_path / "saved")}
  with open(paths["json"], "w") as f:
    json.dump(records, f)
  ds.to_csv(paths["csv"], index=False)
  ds.to_parquet(paths["parquet"])
  ds.save_to_disk(paths["saved"])
  half = len(records) // 2
  tiny.write_jsonl(str(tmp_path / "parts" / "a.jsonl"), records[:half])
  tiny.write_jsonl(str(tmp_path / "parts" / "b.jsonl"), records[half:])
  paths["glob"] = str(tmp_path / "parts" / "*.jsonl")
  return paths


def test_every_source_kind_gives_the_same_examples(tiny_llama_dir, tmp_path):
  tok = hf.load_tokenizer(tiny_llama_dir)
  records = tiny.reverse_records(10)
  paths = _write_sources(tmp_path, records)
  cfg = _cfg("data.format=prompt_completion", f"data.cache_dir={tmp_path / 'cache'}").data
  want = data.tokenize(records, cfg, tok, "mem")
  for kind, path in paths.items():
    assert _same(data.load(path, cfg, tok), want), kind
  # a txt file is one text record per non-blank line
  (tmp_path / "lines.txt").write_text("the quick fox\n\nthe lazy dog\n")
  text_cfg = _cfg(f"data.cache_dir={tmp_path / 'cache'}").data
  got = data.load(str(tmp_path / "lines.txt"), text_cfg, tok)
  assert _same(got, data.tokenize([{"text": "the quick fox"}, {"text": "the lazy dog"}],
                                  text_cfg, tok, "mem"))
  assert [e.where for e in got] == [f"{tmp_path / 'lines.txt'}: line {n}" for n in (1, 3)]


def test_tokenisation_is_cached_and_invalidated_by_what_it_depends_on(tiny_llama_dir, tmp_path):
  tok = hf.load_tokenizer(tiny_llama_dir)
  tok.chat_template = TEMPLATE
  chats = [{"messages": [{"role": "user", "content": f"say {w}"},
                         {"role": "assistant", "content": w}]} for w in "fox dog bird".split()]
  path = tiny.write_jsonl(str(tmp_path / "chat.jsonl"), chats)

  def load(tokenizer=tok, **overrides):
    words = [f"data.train={path}", "data.format=chat", f"data.cache_dir={tmp_path / 'c'}"]
    loaded = data.load_splits(_cfg(*words, *[f"{k}={v}" for k, v in overrides.items()]).data,
                              tokenizer)
    return loaded.train.stats.cached_files, loaded.train.examples

  cached, first = load()
  assert cached == 0
  cached, again = load()
  assert cached == 1 and _same(again, first)
  n = min(len(e.tokens) for e in first) - 1
  cached, short = load(**{"data.seq_len": n})  # applied after the cache
  assert cached == 1 and all(len(e.tokens) == n for e in short)
  cached, last = load(**{"data.assistant_turns": "last", "data.add_eos": False})
  assert cached == 0
  other = hf.load_tokenizer(tiny_llama_dir)
  other.chat_template = TEMPLATE.replace(": ", ":: ")
  cached, templated = load(other)
  assert cached == 0 and not _same(templated, first)
  os.utime(path, ns=(1, 1))  # the file changed (its modification time is part of the key)
  assert load()[0] == 0
  two = load(**{"data.num_proc": 2})
  assert two[0] == 0 and _same(two[1], first)


def test_eval_fraction_is_a_seeded_disjoint_split(tiny_llama_dir, tmp_path):
  tok = hf.load_tokenizer(tiny_llama_dir)
  records = [{"text": f"the fox {i}"} for i in range(40)]
  path = tiny.write_jsonl(str(tmp_path / "t.jsonl"), records)

  def split(seed):
    cfg = _cfg(f"data.train={path}", "data.eval_fraction=0.25", f"data.split_seed={seed}",
               f"data.cache_dir={tmp_path / 'c'}").data
    loaded = data.load_splits(cfg, tok)
    return [e.where for e in loaded.train.examples], [e.where for e in loaded.eval.examples]

  train_where, eval_where = split(0)
  assert len(eval_where) == 10 and len(train_where) == 30
  assert not set(train_where) & set(eval_where)
  assert split(0) == (train_where, eval_where)
  assert split(1)[1] != eval_where
  with pytest.raises(config.UserError, match="set data.eval or data.eval_fraction, not both"):
    _cfg(f"data.eval={path}", "data.eval_fraction=0.1")


def _per_example_losses(module, params, batch, rows):
  """{example index: (summed loss, trained tokens)} from a batch whose row r holds `rows[r]`."""
  logits, _ = module.apply({"params": params}, batch["tokens"], batch["positions"],
                           batch["segment_ids"])
  nll, weights, _ = token_losses(logits, batch)
  nll, weights, seg = np.asarray(nll), np.asarray(weights), batch["segment_ids"][:, 1:]
  out = {}
  for r, row in enumerate(rows):
    for k, i in enumerate(row, start=1):
      at = seg[r] == k
      out[i] = (float(nll[r][at].sum()), float(weights[r][at].sum()))
  return out


@pytest.mark.slow
@pytest.mark.parametrize("family,words", [
    ("llama", []), ("mistral", ["peft.method=prefix", "peft.prefix.length=4"])],
    ids=["llama", "mistral-window-prefix"])
def test_packed_and_unpacked_batches_give_the_same_per_example_losses(family, words, tmp_path):
  tiny.save_model(str(tmp_path), family)
  tok = hf.load_tokenizer(str(tmp_path))
  cfg = _cfg(f"model.path={tmp_path}", "data.format=prompt_completion", "data.seq_len=96",
             "precision.compute=fp32", *words)
  records = tiny.reverse_records(4) + [{"prompt": f"the {w}", "completion": f" {w} dog"}
                                       for w in "fox bird lazy time nine early".split()]
  examples = data.tokenize(records, cfg.data, tok, "mem")
  model = train.build_model(cfg, tok)
  rows = data.pack(np.array([len(e.tokens) for e in examples]), 96)
  assert len(rows) < len(examples) and max(len(r) for r in rows) >= 3
  packed = data.collate([[examples[i] for i in r] for r in rows], 96, tok.pad_token_id)
  single = [[i] for i in range(len(examples))]
  longest = max(len(e.tokens) for e in examples)
  unpacked = data.collate([[e] for e in examples], longest, tok.pad_token_id)
  want = _per_example_losses(model.module, model.params, unpacked, single)
  got = _per_example_losses(model.module, model.params, packed, rows)
  assert sorted(got) == list(range(len(examples)))
  for i, (loss, count) in want.items():
    assert got[i][1] == count and count == examples[i].loss_mask[1:].sum()
    np.testing.assert_allclose(got[i][0], loss, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_resume_mid_epoch_sees_the_batches_of_an_uninterrupted_run(tiny_llama_dir, tmp_path,
                                                                    monkeypatch):
  seen = []
  get = data.Batches.get

  def recording_get(self, s):
    batch = get(self, s)
    seen.append((s, hashlib.sha1(b"".join(v.tobytes() for v in batch.values())).hexdigest()))
    return batch

  monkeypatch.setattr(data.Batches, "get", recording_get)
  path = tiny.write_jsonl(str(tmp_path / "t.jsonl"), tiny.reverse_records(14))

  def run(out, **overrides):
    words = [f"model.path={tiny_llama_dir}", f"data.train={path}", f"train.output_dir={out}",
             "data.format=prompt_completion", "data.seq_len=64",  # packing: auto packs
             "train.batch_size=2", "train.steps=9", "precision.compute=fp32",
             f"data.cache_dir={tmp_path / 'c'}"] + [f"{k}={v}" for k, v in overrides.items()]
    return train.run(config.load(None, words))

  whole = run(tmp_path / "whole")
  uninterrupted, seen[:] = list(seen), []
  run(tmp_path / "parts", **{"train.stop_after": 4})
  resumed = run(tmp_path / "parts")
  assert resumed["start_step"] == 4
  assert seen == uninterrupted and [s for s, _ in seen] == list(range(9))
  assert resumed["losses"] == {s: whole["losses"][s] for s in resumed["losses"]}
  # the stop fell inside an epoch and the run crossed epochs
  tok = hf.load_tokenizer(tiny_llama_dir)
  cfg = config.load(str(tmp_path / "whole" / "config.yaml"))
  assert cfg.data.packing is True  # what auto chose, recorded
  b = data.Batches(data.load(path, cfg.data, tok), 2, 64, 0, 0, packing=True)
  assert 4 % b.steps_per_epoch and b.steps_per_epoch < 9


def test_each_process_gets_its_share_of_the_global_batch(tiny_llama_dir):
  tok = hf.load_tokenizer(tiny_llama_dir)
  cfg = _cfg("data.format=prompt_completion", "data.seq_len=64").data
  examples = data.tokenize(tiny.reverse_records(40), cfg, tok, "mem")
  kw = dict(packing=True, buckets=4)
  whole = data.Batches(examples, 4, 64, 0, 3, **kw)
  shares = [data.Batches(examples, 4, 64, 0, 3, process_index=p, process_count=2, **kw)
            for p in range(2)]
  for s in range(2 * whole.steps_per_epoch + 1):
    want = whole.get(s)
    parts = [b.get(s) for b in shares]
    for k, v in want.items():
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), v)
    assert want["tokens"].shape[1] in (16, 32, 64)  # the bucket that fits the global batch
    assert want["tokens"].shape[1] == data.batches.fit(int(whole.row_tokens[
        whole.global_rows(s)].max()), [16, 32, 64])
  with pytest.raises(config.UserError, match=r"train.batch_size \(4\) must divide by the number "
                     r"of processes \(3\)"):
    data.Batches(examples, 4, 64, 0, 3, process_count=3)
  assert data.bucket_lengths(512, 4) == [64, 128, 256, 512]
  assert data.bucket_lengths(100, 3) == [32, 56, 100]


def test_truncation_policies_and_classification_labels(tiny_llama_dir, tmp_path):
  tok = hf.load_tokenizer(tiny_llama_dir)
  long = {"text": "the quick brown fox jumps over the lazy dog " * 3}
  short = {"text": "the dog"}
  text = lambda policy: _cfg("data.seq_len=12", f"data.truncation={policy}").data
  got = data.tokenize([short, long], text("truncate"), tok, "mem")
  assert [len(e.tokens) for e in got] == [len(tok("the dog").input_ids) + 1, 12]
  assert len(data.tokenize([short, long], text("drop"), tok, "mem")) == 1
  with pytest.raises(config.UserError, match=r"mem: record 2 has \d+ tokens, more than "
                     r"data.seq_len \(12\) and data.truncation is 'error'"):
    data.tokenize([short, long], text("error"), tok, "mem")

  cls = _cfg("data.format=classification", f"data.cache_dir={tmp_path / 'c'}")
  records = [{"text": "good dog", "label": "pos"}, {"text": "bad fox", "label": "neg"},
             {"text": "ok bird", "label": "meh"}]
  train_file = tiny.write_jsonl(str(tmp_path / "train.jsonl"), records)
  eval_file = tiny.write_jsonl(str(tmp_path / "eval.jsonl"), [{"text": "odd", "label": "wow"}])
  cls.data.train = [train_file]
  loaded = data.load_splits(cls.data, tok)
  assert loaded.labels == ["meh", "neg", "pos"]  # found in data.train, sorted
  assert [e.label for e in loaded.train.examples] == [2, 1, 0]
  cls.data.eval = [eval_file]
  with pytest.raises(config.UserError, match=r"eval.jsonl: line 1 label 'wow' is not one of the "
                     r"labels \(meh, neg, pos\)"):
    data.load_splits(cls.data, tok)
  mixed = tiny.write_jsonl(str(tmp_path / "mixed.jsonl"), records[:2] + [{"text": "x", "label": 1}])
  cls.data.train, cls.data.eval = [mixed], []
  with pytest.raises(config.UserError, match="mixes label names and integer ids"):
    data.load_splits(cls.data, tok)
  with pytest.raises(config.UserError, match="data.packing cannot be used with peft.method prompt"):
    _cfg("data.packing=true", "peft.method=prompt")


def test_packing_auto_packs_the_language_model_formats_where_exact():
  """data.packing auto (the default) packs text, prompt_completion and chat, and nothing that
  packing would change: classification, preference, prompt tuning, cuDNN attention."""
  assert _cfg().data.packing == "auto"
  for fmt in ("text", "prompt_completion", "chat"):
    assert config.packing(_cfg(f"data.format={fmt}")) is True
  for words in (["data.format=classification"], ["data.format=preference"],
                ["peft.method=prompt"], ["model.attention=cudnn"]):
    assert config.packing(_cfg(*words)) is False, words
  assert config.packing(_cfg("data.packing=false")) is False
  assert config.packing(_cfg("data.format=classification", "data.packing=auto")) is False


def test_packing_auto_packs_a_soft_capped_model_even_where_cudnn_is_asked_for(tmp_path):
  """Soft-capped attention (Gemma 2) never runs cuDNN's kernel, so it gains nothing from unpacked
  rows: auto packs it; a model without a cap, under `model.attention: cudnn`, stays unpacked."""
  for cap, packs in ((50.0, True), (None, False)):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma2",
                                                      "attn_logit_softcapping": cap}))
    cfg = config.load(None, [f"model.path={tmp_path}", "data.train=unused",
                             "model.attention=cudnn"])
    assert config.packing(cfg) is packs, cap
  with pytest.raises(config.UserError, match="data.packing: 'sometimes' is not one of auto"):
    _cfg("data.packing=sometimes")


BAD = {  # case: (format, bad record as a jsonl line, the error it must name)
    "missing_column": ("prompt_completion", '{"prompt": "a"}', "line 2 has no 'completion' field"),
    "wrong_type": ("prompt_completion", '{"prompt": "a", "completion": 5}',
                   "line 2 field 'completion' is int, expected a string"),
    "empty_example": ("prompt_completion", '{"prompt": "a", "completion": ""}',
                      "line 2 field 'completion' is empty"),
    "unknown_role": ("chat", '{"messages": [{"role": "robot", "content": "hi"}]}',
                     "line 2 message 1 has unknown role 'robot'"),
    "no_assistant_turn": ("chat", '{"messages": [{"role": "user", "content": "hi"}]}',
                          "line 2 has no assistant turn to train on"),
    "label_outside_set": ("classification", '{"text": "a", "label": "meh"}',
                          "line 2 label 'meh' is not one of the labels (neg, pos)"),
    "malformed_line": ("prompt_completion", '{"prompt": "a", ', "line 2 is malformed JSON"),
}
GOOD = {"prompt_completion": {"prompt": "the fox", "completion": " dog"},
        "chat": {"messages": [{"role": "user", "content": "a"},
                              {"role": "assistant", "content": "b"}]},
        "classification": {"text": "the fox", "label": "pos"}}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_records_stop_with_their_line_or_are_skipped_and_counted(case, chat_model_dir,
                                                                    tmp_path, capsys):
  fmt, line, needle = BAD[case]
  path = tmp_path / "bad.jsonl"
  path.write_text(json.dumps(GOOD[fmt]) + "\n" + line + "\n" + json.dumps(GOOD[fmt]) + "\n")
  cfg_file = tmp_path / "c.yaml"
  cfg_file.write_text(yaml.safe_dump({
      "model": {"path": chat_model_dir},
      "data": {"train": str(path), "format": fmt, "labels": ["neg", "pos"],
               "cache_dir": str(tmp_path / "cache")},
      "train": {"batch_size": 1}}))
  assert dry_run.main(["--config", str(cfg_file)]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"error: {path}: {needle}") and len(err.splitlines()) == 1, err
  assert dry_run.main(["--config", str(cfg_file), "data.on_error=skip"]) == 0
  out = capsys.readouterr().out
  assert "3 records -> 2 examples (1 bad record(s) skipped" in out
  assert f"first skipped: {path}: {needle}" in out


@pytest.mark.smollm2
def test_dry_run_renders_exactly_the_trained_tokens_of_a_chat(smollm2_dir, smol_tokenizer,
                                                              tmp_path, capsys):
  path = tiny.write_jsonl(str(tmp_path / "chat.jsonl"), [{"messages": CONVERSATION}] * 3)
  cfg_file = tmp_path / "c.yaml"
  cfg_file.write_text(yaml.safe_dump({
      "model": {"path": smollm2_dir}, "train": {"batch_size": 1},
      "data": {"train": path, "format": "chat", "seq_len": 128, "packing": False,
               "cache_dir": str(tmp_path / "cache")}}))
  assert dry_run.main(["--config", str(cfg_file), "--show", "1"]) == 0
  out = capsys.readouterr().out
  assert "3 records -> 3 examples" in out and "3 steps per epoch of 1 rows" in out
  rendered = out.split("trained (between [[ and ]])\n", 1)[1][:-1]  # print adds one newline
  assert re.findall(r"\[\[(.*?)\]\]", rendered, re.S) == ["Hello!<|im_end|>", "4<|im_end|>"]
  assert rendered.replace("[[", "").replace("]]", "") == smol_tokenizer.apply_chat_template(
      CONVERSATION, tokenize=False)
