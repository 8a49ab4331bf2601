"""Meshes: the same losses on every (data, fsdp, tensor) layout of 8 fake CPU devices, sharded
parameter and optimizer bytes, checkpoints moving between meshes, and bad mesh input."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import yaml
from jax.sharding import PartitionSpec as P

import tiny
from conftest import REPO
from ftjax import config, hf, sharding, train, tree

MESHES = [(1, 1, 1), (8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]


def _cfg(model_dir, train_file, out_dir, mesh, *words):
  d, f, t = mesh
  return config.load(None, [
      f"model.path={model_dir}", f"data.train={train_file}", f"train.output_dir={out_dir}",
      "data.format=prompt_completion", "data.seq_len=64", "train.batch_size=8", "train.steps=3",
      "optim.lr=3e-3", "precision.compute=fp32", f"mesh.data={d}", f"mesh.fsdp={f}",
      f"mesh.tensor={t}", *words])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["none", "lora"])
def test_every_mesh_gives_the_same_losses(method, tiny_llama_dir, reverse_data, tmp_path):
  words = [f"peft.method={method}", "peft.lora.targets=[all-linear]"]
  runs = {m: train.run(_cfg(tiny_llama_dir, reverse_data[0], tmp_path / "x".join(map(str, m)),
                            m, *words)) for m in MESHES}
  want = [runs[MESHES[0]]["losses"][s] for s in (1, 2, 3)]
  assert want[2] < want[0]
  for mesh, summary in runs.items():
    np.testing.assert_allclose([summary["losses"][s] for s in (1, 2, 3)], want, rtol=1e-5,
                               atol=1e-5, err_msg=str(mesh))
  sharded = runs[(1, 2, 4)]["memory"]
  assert sharded["params"] < sharded["params_total"] / 2  # split, not replicated


@pytest.mark.slow
def test_gemma2_gives_the_same_losses_on_fsdp_and_tensor_meshes(reverse_data, tmp_path):
  """Gemma 2 (soft-capped attention and logits, alternating windows, tied head, head_dim apart
  from hidden / heads) sharded over fsdp and tensor axes trains as on one device."""
  model_dir = str(tmp_path / "gemma2")
  tiny.save_model(model_dir, "gemma2")
  meshes = [(1, 1, 1), (1, 8, 1), (1, 2, 4), (2, 2, 2)]
  runs = {m: train.run(_cfg(model_dir, reverse_data[0], tmp_path / "x".join(map(str, m)), m))
          for m in meshes}
  want = [runs[meshes[0]]["losses"][s] for s in (1, 2, 3)]
  assert want[2] < want[0]
  for mesh in meshes[1:]:
    np.testing.assert_allclose([runs[mesh]["losses"][s] for s in (1, 2, 3)], want, rtol=1e-5,
                               atol=1e-5, err_msg=str(mesh))


@pytest.mark.slow
def test_fsdp_holds_an_eighth_per_device(tiny_llama_dir, reverse_data, tmp_path):
  memory = train.run(_cfg(tiny_llama_dir, reverse_data[0], tmp_path, (1, 8, 1),
                          "train.steps=1"))["memory"]
  for kind in ("params", "opt_state"):
    share = memory[kind] / memory[f"{kind}_total"]
    assert 1 / 8 <= share < 1 / 8 * 1.1, (kind, share)  # norms stay replicated: a sliver more


@pytest.mark.slow
def test_a_checkpoint_moves_between_meshes(tiny_llama_dir, reverse_data, tmp_path):
  whole = train.run(_cfg(tiny_llama_dir, reverse_data[0], tmp_path / "whole", (1, 1, 1),
                         "train.steps=4"))
  train.run(_cfg(tiny_llama_dir, reverse_data[0], tmp_path / "moved", (2, 2, 2),
                 "train.steps=4", "train.stop_after=2"))
  resumed = train.run(_cfg(tiny_llama_dir, reverse_data[0], tmp_path / "moved", (1, 8, 1),
                           "train.steps=4"))
  assert resumed["start_step"] == 2
  np.testing.assert_allclose([resumed["losses"][s] for s in (3, 4)],
                             [whole["losses"][s] for s in (3, 4)], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("words,needle", [
    (["mesh.data=3"], "mesh: data x fsdp x tensor = 3 does not divide the 8 devices"),
    (["mesh.data=-1", "mesh.fsdp=-1"], "mesh: at most one of data, fsdp, tensor may be -1"),
    (["mesh.tensor=8"], "mesh.tensor=8 does not divide the model's attention heads (4)"),
    (["mesh.fsdp=-1", "train.batch_size=4"],
     "train.batch_size / train.grad_accum (4 / 1) must divide by mesh data x fsdp (8)"),
])
def test_bad_meshes_are_one_clear_line(words, needle, tiny_llama_dir, reverse_data, tmp_path,
                                       capsys):
  argv = ["--config", os.path.join(REPO, "configs", "quickstart.yaml"),
          f"model.path={tiny_llama_dir}", f"data.train={reverse_data[0]}", "data.eval=",
          "data.seq_len=64",
          f"train.output_dir={tmp_path}", *words]
  assert train.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert err == f"error: {needle}", err


def test_weights_load_straight_into_their_shards(tiny_llama_dir):
  tok = hf.load_tokenizer(tiny_llama_dir)
  cfg = _cfg(tiny_llama_dir, "unused", "unused", (1, 2, 4), "peft.method=lora")
  sharded = train.build_model(cfg, tok, mesh=sharding.make_mesh(cfg.mesh))
  plain = tree.flatten(train.build_model(cfg, tok).params)
  for path, value in tree.flatten(sharded.params).items():
    assert value.sharding == sharded.layout[path], path
    np.testing.assert_array_equal(np.asarray(value), np.asarray(plain[path]), err_msg=path)
  flat = tree.flatten(sharded.params)
  q = flat["layers_0/self_attn/q_proj/kernel"]  # (embed 64, heads 64): fsdp x tensor
  assert q.sharding.spec == P("fsdp", "tensor") and q.addressable_shards[0].data.shape == (32, 16)
  assert flat["layers_0/self_attn/q_proj/lora_a"].sharding.spec == P("fsdp", None)  # rank: whole
  assert flat["layers_0/self_attn/q_proj/lora_b"].sharding.spec == P(None, "tensor")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _processes(cfg_file, tmp_path, *words):
  """Runs `python -m ftjax.train` as 2 processes of one run (2 CPU devices each) to the end."""
  port = _free_port()
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "JAX_PLATFORMS": "cpu"}
  procs = []
  for i in range(2):
    log = open(tmp_path / f"process{i}.log", "w")
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "ftjax.train", "--config", cfg_file,
         f"distributed.coordinator=127.0.0.1:{port}", "distributed.num_processes=2",
         f"distributed.process_id={i}", "mesh.data=-1", *words],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
  for i, p in enumerate(procs):
    assert p.wait(timeout=300) == 0, (tmp_path / f"process{i}.log").read_text()[-3000:]
  return [(tmp_path / f"process{i}.log").read_text() for i in range(2)]


@pytest.mark.slow
def test_two_processes_train_checkpoint_resume_and_match_one(tiny_llama_dir, reverse_data,
                                                             tmp_path):
  cfg_file = tmp_path / "cfg.yaml"
  cfg_file.write_text(yaml.safe_dump({
      "model": {"path": tiny_llama_dir},
      "data": {"train": reverse_data[0], "format": "prompt_completion", "seq_len": 64,
               "cache_dir": str(tmp_path / "cache")},
      "precision": {"compute": "fp32"}, "optim": {"lr": 3e-3},
      "train": {"steps": 4, "batch_size": 8, "output_dir": str(tmp_path / "run")}}))
  first = _processes(str(cfg_file), tmp_path, "train.stop_after=2")
  assert "done: step 2" in first[0] and "done:" not in first[1]  # only process 0 prints
  second = _processes(str(cfg_file), tmp_path)
  assert "resumed from step 2" in second[0] and "mesh data=4" in second[0]
  single = train.run(config.load(str(cfg_file), [f"train.output_dir={tmp_path / 'single'}"]))
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    losses = {r["step"]: r["loss"] for r in map(json.loads, f)}
  assert sorted(losses) == [1, 2, 3, 4]
  np.testing.assert_allclose([losses[s] for s in (1, 2, 3, 4)],
                             [single["losses"][s] for s in (1, 2, 3, 4)], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_an_unreachable_coordinator_is_one_clear_error(tiny_llama_dir, reverse_data, tmp_path):
  port = _free_port()
  proc = subprocess.run(
      [sys.executable, "-m", "ftjax.train", "--config",
       os.path.join(REPO, "configs", "quickstart.yaml"), f"model.path={tiny_llama_dir}",
       f"data.train={reverse_data[0]}", "data.eval=", f"train.output_dir={tmp_path}",
       f"distributed.coordinator=127.0.0.1:{port}", "distributed.num_processes=2",
       "distributed.process_id=1", "distributed.timeout_s=2"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip() == (
      f"error: distributed: the coordinator 127.0.0.1:{port} was not reachable within 2s (is "
      "process 0 running, and the address right?)")
