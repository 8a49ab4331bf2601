"""The README's library example, run exactly as written, and what it leaves behind: an adapter
HF PEFT loads with ftjax's logits, and that ftjax loads back."""

import json
import os
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import peft as hf_peft
import pytest
import torch
import transformers

import ftjax as fj

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_block(heading: str, language: str = "python") -> str:
  """The first ```language block under the README's `heading`."""
  with open(os.path.join(REPO, "README.md")) as f:
    text = f.read()
  section = text.split(f"\n{heading}\n", 1)[1]
  return re.search(rf"```{language}\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
@pytest.mark.smollm2
def test_readme_library_example_runs_as_written(smollm2_dir, tmp_path):
  code = readme_block("## Use ftjax as a library")
  os.makedirs(tmp_path / "models")
  os.symlink(smollm2_dir, tmp_path / "models" / "smollm2-135m-instruct")
  os.symlink(os.path.join(REPO, "data"), tmp_path / "data")
  env = {**os.environ, "PYTHONPATH": REPO}
  env.pop("XLA_FLAGS", None)  # one CPU device, as a user's process has
  out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, text=True,
                       capture_output=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  losses = [float(x) for x in re.findall(r"step \d+: loss ([\d.]+)", out.stdout)]
  assert len(losses) == out.stdout.count("\n") == 12
  assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4])

  adapter = tmp_path / "runs" / "library" / "adapter"
  with open(adapter / "adapter_config.json") as f:
    config = json.load(f)
  assert config["peft_type"] == "LORA" and sorted(config["modules_to_save"]) == [
      "model.layers.29.input_layernorm", "model.layers.29.post_attention_layernorm"]
  # ftjax loads the adapter back, and HF PEFT over transformers gives the same logits
  model = fj.load_model(smollm2_dir, fj.PeftConfig(method="lora", init_from=str(adapter)))
  assert {p for p in model.trainable if "lora_" not in p} == {
      "layers_29/input_layernorm/scale", "layers_29/post_attention_layernorm/scale"}
  tokens = np.asarray([[1, 504, 3458, 282, 260, 2365, 2, 4520]], np.int32)
  batch = {"tokens": tokens, "positions": np.arange(8)[None], "segment_ids": np.ones_like(tokens)}
  ours = np.asarray(model.apply(model.params, {k: jnp.asarray(v) for k, v in batch.items()}))
  pm = hf_peft.PeftModel.from_pretrained(
      transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir), str(adapter)).eval()
  with torch.no_grad():
    want = pm(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  assert np.abs(ours - want).max() < 1e-3  # SmolLM2's fp32 parity (tests/test_smollm2.py)
  with torch.no_grad(), pm.disable_adapter():  # and the training changed the model
    plain = pm(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  assert np.abs(ours - plain).max() > 1e-2
