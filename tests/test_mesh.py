"""Meshes: the same losses on every (data, fsdp, tensor) layout of 8 fake CPU devices, sharded
parameter and optimizer bytes, checkpoints moving between meshes, and bad mesh input."""

import os

import numpy as np
import pytest

from conftest import REPO
from ftjax import config, train

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


def test_fsdp_holds_an_eighth_per_device(tiny_llama_dir, reverse_data, tmp_path):
  memory = train.run(_cfg(tiny_llama_dir, reverse_data[0], tmp_path, (1, 8, 1),
                          "train.steps=1"))["memory"]
  for kind in ("params", "opt_state"):
    share = memory[kind] / memory[f"{kind}_total"]
    assert 1 / 8 <= share < 1 / 8 * 1.1, (kind, share)  # norms stay replicated: a sliver more


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
