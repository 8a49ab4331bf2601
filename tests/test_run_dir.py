"""A run directory holds one run at a time and survives damaged checkpoints; bad inputs at the
front door are one line; installs name what the commands need."""

import importlib.metadata
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tomllib

import numpy as np
import pytest

import tiny
from conftest import REPO
from ftjax import checkpoint, config, export, prepare, train
from test_training import _cli_config, _start, _wait_for


def _steps(run_dir):
  """Steps of metrics.jsonl's complete lines, in file order."""
  steps = []
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    for line in f:
      try:
        steps.append(json.loads(line)["step"])
      except ValueError:  # the last line of a killed run may be cut short
        pass
  return steps


def test_a_held_run_directory_refuses_a_second_holder(tmp_path):
  with checkpoint.RunLock(str(tmp_path)):
    with pytest.raises(config.UserError) as e:
      with checkpoint.RunLock(str(tmp_path)):
        pass
    assert f"{tmp_path} is in use by another run (pid {os.getpid()} on host " \
           f"{socket.gethostname()}" in str(e.value)
  with checkpoint.RunLock(str(tmp_path)):  # released on exit
    pass


@pytest.mark.slow
def test_a_double_launch_stops_the_second_and_a_sigkilled_holder_blocks_nothing(
    tiny_llama_dir, reverse_data, tmp_path):
  cfg_file = _cli_config(tmp_path, tiny_llama_dir, reverse_data, 100_000,
                         checkpoint={"every": 20, "keep": 1})
  run_dir = str(tmp_path / "run")
  first = _start(cfg_file, tmp_path / "first.txt")
  metrics_file = tmp_path / "run" / "metrics.jsonl"
  _wait_for(lambda: metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 3,
            first, tmp_path / "first.txt")
  second = subprocess.run([sys.executable, "-m", "ftjax.train", "--config", cfg_file],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert second.returncode == 2
  err = second.stderr.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f"error: {run_dir} is in use by another run "
                                             f"(pid {first.pid} on host "), second.stderr
  assert first.poll() is None  # the first run goes on
  _wait_for(lambda: len(metrics_file.read_text().splitlines()) >= 25, first,
            tmp_path / "first.txt")
  first.kill()  # SIGKILL: the kernel drops the lock with the process
  first.wait()
  steps = _steps(run_dir)
  assert steps == list(range(1, len(steps) + 1))  # each step exactly once, in order
  saved = len(steps) // 20 * 20  # the last checkpoint due before the kill (every 20 steps)
  resumed = train.run(config.load(cfg_file, [f"train.steps={saved + 5}"]))
  start = resumed["start_step"]  # that one, or the one before if the kill cut its write
  assert start % 20 == 0 and 20 <= start <= saved and resumed["final_step"] == saved + 5
  assert _steps(run_dir) == list(range(1, saved + 6))


def _damage(step_dir, how):
  files = sorted((os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs
                  if os.sep + "d" + os.sep in os.path.join(d, f)), key=os.path.getsize)
  assert files, os.listdir(step_dir)
  if how == "truncate":
    for f in files:
      os.truncate(f, os.path.getsize(f) // 2)
  elif how == "delete":
    for f in files:
      os.remove(f)
  elif how == "metadata":
    os.remove(os.path.join(step_dir, "meta", "metadata"))
  elif how == "stale":  # readable arrays, but another step's: only the sums can tell
    shutil.rmtree(os.path.join(step_dir, "state"))
    shutil.copytree(os.path.join(os.path.dirname(step_dir), "2", "state"),
                    os.path.join(step_dir, "state"))


@pytest.fixture(scope="module")
def uninterrupted(tiny_llama_dir, tmp_path_factory):
  tmp = tmp_path_factory.mktemp("whole")
  data = os.path.join(tmp, "train.jsonl")
  tiny.write_jsonl(data, tiny.reverse_records(64))
  words = _words(tiny_llama_dir, data, tmp / "run")
  return data, train.run(config.load(None, words))["losses"]


def _words(model_dir, data, out):
  return [f"model.path={model_dir}", f"data.train={data}", f"train.output_dir={out}",
          "data.format=prompt_completion", "data.seq_len=48", "train.batch_size=8",
          "train.steps=6", "checkpoint.every=2", "checkpoint.keep=2", "peft.method=lora",
          "precision.compute=fp32"]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncate", "delete", "metadata", "stale"])
def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_previous_one_resumes_exactly(
    how, tiny_llama_dir, uninterrupted, tmp_path):
  data, whole = uninterrupted
  words = _words(tiny_llama_dir, data, tmp_path)
  train.run(config.load(None, words + ["train.stop_after=4"]))
  _damage(str(tmp_path / "checkpoints" / "4"), how)
  records = []
  handler = logging.Handler(logging.WARNING)  # on ftjax's logger: the CLIs stop propagation
  handler.emit = records.append
  logging.getLogger("ftjax").addHandler(handler)
  try:
    resumed = train.run(config.load(None, words))
  finally:
    logging.getLogger("ftjax").removeHandler(handler)
  assert resumed["start_step"] == 2
  assert [resumed["losses"][s] for s in range(3, 7)] == [whole[s] for s in range(3, 7)]
  assert os.path.isdir(tmp_path / "checkpoints" / "4.corrupt")  # kept, never deleted
  (line,) = [r.getMessage() for r in records if "damaged" in r.getMessage()]
  assert line.startswith("checkpoint 4 is damaged (") and "resuming from step 2" in line
  assert _steps(tmp_path) == list(range(1, 7))


def test_checkpoint_sums_see_one_changed_bit_and_swapped_values():
  a = {"x": np.arange(8, dtype=np.float32), "n": np.int32(3)}
  flipped = {"x": a["x"].copy(), "n": a["n"]}
  flipped["x"].view(np.uint32)[5] ^= 1 << 7
  swapped = {"x": a["x"][[1, 0, 2, 3, 4, 5, 6, 7]], "n": a["n"]}
  assert checkpoint.fingerprint(a) == checkpoint.fingerprint({"x": a["x"].copy(), "n": a["n"]})
  assert checkpoint.fingerprint(a)["['x']"] != checkpoint.fingerprint(flipped)["['x']"]
  assert checkpoint.fingerprint(a)["['x']"] != checkpoint.fingerprint(swapped)["['x']"]


@pytest.mark.slow
def test_with_no_intact_checkpoint_the_run_stops_in_one_line_and_deletes_nothing(
    tiny_llama_dir, uninterrupted, tmp_path, capsys):
  data, _ = uninterrupted
  words = _words(tiny_llama_dir, data, tmp_path) + ["checkpoint.keep=1"]
  train.run(config.load(None, words + ["train.stop_after=2"]))
  _damage(str(tmp_path / "checkpoints" / "2"), "truncate")
  capsys.readouterr()
  cfg_file = tmp_path / "cfg.yaml"
  config.dump(config.load(None, words), str(cfg_file))
  assert train.main(["--config", str(cfg_file)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(
      f"error: {tmp_path / 'checkpoints'}: no intact checkpoint to resume from (step 2: "), err
  assert os.listdir(tmp_path / "checkpoints") == ["2"]
  with open(tmp_path / "train.log") as f:  # the details are in the run's log
    assert "Traceback" in f.read()
  # export reads checkpoints too: one line naming the checkpoint
  assert export.main(["--run", str(tmp_path), "--to", "peft", "--out",
                      str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and f"{tmp_path / 'checkpoints'}: checkpoint 2 cannot be read (" in err[0]


def test_the_run_says_its_backend_and_warns_when_a_gpu_plugin_sees_no_gpu(tmp_path):
  fake = tmp_path / "site" / "jax_cuda12_plugin-0.10.2.dist-info"  # metadata only, no plugin
  fake.mkdir(parents=True)
  (fake / "METADATA").write_text("Metadata-Version: 2.1\nName: jax-cuda12-plugin\n"
                                 "Version: 0.10.2\n")
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  env["PYTHONPATH"] = str(tmp_path / "site")
  words = [f"train.output_dir={tmp_path / 'run'}", f"model.path={tmp_path / 'none'}"]
  proc = subprocess.run([sys.executable, "-m", "ftjax.train", "--config",
                         os.path.join(REPO, "configs", "quickstart.yaml"), *words],
                        cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 2
  assert re.match(r"backend cpu: \d+ device\(s\) \(cpu\)", proc.stdout.splitlines()[0])
  err = proc.stderr.strip().splitlines()
  assert err[0].startswith("warning: jax-cuda12-plugin is installed, but JAX sees no GPU"), err
  assert err[1:] == [f"error: model.path: directory not found: {tmp_path / 'none'}"], err


def test_extras_hold_what_the_commands_need():
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  names = lambda reqs: {re.split(r"[\[<>=; ]", r)[0].lower() for r in reqs}
  # `python -m ftjax.prepare smollm2` (the quickstart's first command) needs these.
  assert set(prepare.GGUF_NEEDS) <= names(project["optional-dependencies"]["prepare"])
  (jax_pin,) = [r for r in project["dependencies"] if r.startswith("jax")]
  version = jax_pin.split("==")[1]
  jax_meta = importlib.metadata.requires("jax")
  for cuda in ("cuda12", "cuda13"):
    assert project["optional-dependencies"][cuda] == [f"jax[{cuda}]=={version}"]
    # and jax's own metadata maps that extra to its CUDA plugin of the same version
    assert any(r.startswith(f"jax-{cuda}-plugin[with-cuda]") and version in r
               and f'extra == "{cuda}"' in r for r in jax_meta), jax_meta
  assert importlib.metadata.version("jax") == version
