"""Config schema, every shipped config, and one-line errors for bad input from the CLI."""

import dataclasses
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

import tiny
from ftjax import config, train
from conftest import REPO


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml"))))
def test_every_shipped_config_loads(path):
  cfg = config.load(path)
  assert cfg.model.path and cfg.data.train


def test_overrides_are_typed():
  cfg = config.load(None, ["model.path=m", "data.train=t", "train.steps=20", "optim.lr=3e-4",
                           "optim.no_decay=[bias]", "data.format=prompt_completion"])
  assert cfg.train.steps == 20 and cfg.optim.lr == 3e-4 and cfg.optim.no_decay == ["bias"]
  assert cfg.data.format == "prompt_completion"


@pytest.mark.parametrize("words, needle", [
    (["train.stepz=3"], "unknown key 'train.stepz'"),
    (["nosuch.key=3"], "unknown key 'nosuch'"),
    (["train.steps=abc"], "train.steps: expected int"),
    (["train.steps=1.5"], "train.steps: expected int"),
    (["optim.lr=fast"], "optim.lr: expected float"),
    (["data.format=xml"], "data.format: 'xml' is not one of"),
    (["train.batch_size=6", "train.grad_accum=4"], "must divide by train.grad_accum"),
    (["train.steps"], "not of the form key.sub=value"),
    (["optim.lr=inf"], "optim.lr: expected a finite float"),
    (["optim.b1=1.5"], "optim.b1 and optim.b2 must be in [0, 1)"),
    (["train.seed=-1"], "train.seed must be >= 0"),
    (["eval.max_new_tokens=0"], "eval.max_new_tokens must be >= 1"),
    (["optim.no_decay=[a"], "override optim.no_decay: cannot parse value"),
    (["train=0"], "train: expected a mapping"),
])
def test_bad_config_names_the_key(words, needle):
  with pytest.raises(config.UserError, match=None) as e:
    config.load(None, ["model.path=m", "data.train=t"] + words)
  assert needle in str(e.value)


def test_config_file_errors_name_the_file(tmp_path):
  path = tmp_path / "bad.yaml"
  path.write_text("train:\n  steps: 3\n  batchsize: 4\n")
  with pytest.raises(config.UserError, match=r"bad.yaml: unknown key 'train.batchsize'"):
    config.load(str(path))
  with pytest.raises(config.UserError, match="config file not found"):
    config.load(str(tmp_path / "missing.yaml"))


def _main(capsys, *words):
  code = train.main(["--config", os.path.join(REPO, "configs", "quickstart.yaml"), *words])
  err = capsys.readouterr().err.strip()
  return code, err


@pytest.fixture
def not_a_model(tmp_path):
  path = tmp_path / "t5"
  path.mkdir()
  (path / "config.json").write_text(json.dumps({"architectures": ["T5ForConditionalGeneration"]}))
  return str(path)


@pytest.fixture
def incomplete_model(tmp_path):
  path = tmp_path / "bert"
  path.mkdir()
  (path / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
  return str(path)


@pytest.fixture
def malformed_jsonl(tmp_path):
  path = tmp_path / "bad.jsonl"
  lines = [json.dumps(r) for r in tiny.reverse_records(4)]
  lines[2] = '{"prompt": "x", "completion": '
  path.write_text("\n".join(lines) + "\n")
  return str(path)


@pytest.mark.parametrize("case", ["unknown_key", "wrong_type", "missing_model", "no_config_json",
                                  "unsupported_arch", "missing_data", "malformed_jsonl",
                                  "missing_field", "unsupported_activation", "incomplete_config",
                                  "empty_data", "output_dir_is_a_file", "truncated_weights"])
def test_cli_bad_input_is_one_clear_line(case, capsys, tmp_path, tiny_llama_dir, not_a_model,
                                         malformed_jsonl, incomplete_model):
  gelu_model = tmp_path / "gelu"
  gelu_model.mkdir()
  with open(os.path.join(tiny_llama_dir, "config.json")) as f:
    (gelu_model / "config.json").write_text(json.dumps({**json.load(f), "hidden_act": "gelu"}))
  missing_field = tiny.write_jsonl(str(tmp_path / "nf.jsonl"), [{"prompt": "a"}])
  good = [f"model.path={tiny_llama_dir}", f"train.output_dir={tmp_path / 'run'}"]
  (tmp_path / "empty.jsonl").write_text("")
  (tmp_path / "a_file").write_text("not a directory")
  truncated = tmp_path / "truncated"
  shutil.copytree(tiny_llama_dir, truncated)
  weights = truncated / "model.safetensors"
  os.truncate(weights, os.path.getsize(weights) // 2)
  words, needle = {
      "unknown_key": (["optim.lrr=1"], "unknown key 'optim.lrr'"),
      "wrong_type": (["train.steps=ten"], "train.steps: expected int, got 'ten'"),
      "missing_model": ([f"model.path={tmp_path / 'nope'}"], "model.path: directory not found"),
      "no_config_json": ([f"model.path={tmp_path}"], "is not an HF model directory"),
      "unsupported_arch": ([f"model.path={not_a_model}"],
                           "architecture 'T5ForConditionalGeneration' is not supported "
                           "(supported: "),
      "incomplete_config": ([f"model.path={incomplete_model}"],
                            "config.json lacks 'vocab_size', which a BertModel needs"),
      "missing_data": (good + [f"data.train={tmp_path / 'none.jsonl'}"], "data file not found"),
      "malformed_jsonl": (good + [f"data.train={malformed_jsonl}"],
                          "bad.jsonl: line 3 is malformed JSON"),
      "missing_field": (good + [f"data.train={missing_field}"],
                        "nf.jsonl: line 1 has no 'completion' field"),
      "unsupported_activation": ([f"model.path={gelu_model}"],
                                 "hidden_act 'gelu' is not supported"),
      "empty_data": (good + [f"data.train={tmp_path / 'empty.jsonl'}"],
                     f"{tmp_path / 'empty.jsonl'}: no records (the file is empty)"),
      "output_dir_is_a_file": ([f"model.path={tiny_llama_dir}",
                                f"train.output_dir={tmp_path / 'a_file'}"],
                               f"train.output_dir: {tmp_path / 'a_file'} exists and is not a "
                               "directory"),
      "truncated_weights": ([f"model.path={truncated}", f"train.output_dir={tmp_path / 'run'}"],
                            f"{weights}: not a readable safetensors file"),
  }[case]
  code, err = _main(capsys, f"train.output_dir={tmp_path / 'run'}", *words)  # not ./runs
  assert code == 2
  assert err.startswith("error: ") and needle in err, err
  assert len(err.splitlines()) == 1 and "Traceback" not in err


KNOWN_TRAIN_KEYS = [f.name for f in dataclasses.fields(config.TrainConfig)]


def test_cli_entry_point_exit_code(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "ftjax.train", "--config",
                         os.path.join(REPO, "configs", "quickstart.yaml"), "train.stepz=1"],
                        capture_output=True, text=True, cwd=REPO, timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      f"error: {os.path.join(REPO, 'configs', 'quickstart.yaml')}: unknown key 'train.stepz' "
      f"(did you mean 'steps'? known: {', '.join(sorted(KNOWN_TRAIN_KEYS))})"]
