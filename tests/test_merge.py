"""`ftjax.merge` against HF PEFT's `add_weighted_adapter` (PyTorch, no mocks), a NumPy reference
of the ΔW forms, and the CLI's refusals."""

import json
import os

import numpy as np
import peft as hf_peft
import pytest
import torch
import transformers
from peft.tuners.lora import LoraLayer

from ftjax import merge
from ftjax.config import UserError

IDS = np.random.default_rng(0).integers(3, 320, (2, 12))
# name: (seed, LoraConfig kwargs); x0 and x1 share a rank, x2 has another and rsLoRA.
ADAPTERS = {
    "x0": (1, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "x1": (2, dict(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
    "x2": (3, dict(r=8, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "up_proj"])),
    "dora": (4, dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"])),
    "saves_head": (5, dict(r=4, lora_alpha=8, target_modules=["q_proj"],
                           modules_to_save=["lm_head"])),
}


def _base(model_dir):
  return transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory):
  """{name: directory} of PEFT adapters with random, non-zero B, and an IA3 one."""
  root, out = tmp_path_factory.mktemp("adapters"), {}
  for name, (seed, kwargs) in ADAPTERS.items():
    torch.manual_seed(seed)
    config = hf_peft.LoraConfig(init_lora_weights=False, **kwargs)
    out[name] = str(root / name)
    hf_peft.get_peft_model(_base(tiny_llama_dir), config).save_pretrained(out[name])
  out["ia3"] = str(root / "ia3")
  hf_peft.get_peft_model(_base(tiny_llama_dir), hf_peft.IA3Config(
      task_type="CAUSAL_LM", init_ia3_weights=False)).save_pretrained(out["ia3"])
  return out


@pytest.fixture(scope="module")
def peft_model(tiny_llama_dir, adapters):
  """PEFT's model with x0, x1 and x2 loaded; tests add their merges to it."""
  pm = hf_peft.PeftModel.from_pretrained(_base(tiny_llama_dir), adapters["x0"], adapter_name="x0")
  for name in ("x1", "x2"):
    pm.load_adapter(adapters[name], adapter_name=name)
  return pm.eval()


def _peft_merge(pm, names, weights, method, **kwargs) -> str:
  """PEFT's add_weighted_adapter under a fresh name (returned)."""
  name = f"m{len(pm.peft_config)}_{method}"
  pm.add_weighted_adapter(names, weights, name, combination_type=method, **kwargs)
  return name


def _peft_deltas(pm, name, model_dir) -> dict:
  """{ftjax module path: ΔW (in, out)} of PEFT adapter `name`."""
  ctx, _ = merge.context(model_dir)
  return {ctx.module_path(key): m.get_delta_weight(name).detach().numpy().T.astype(np.float64)
          for key, m in pm.base_model.model.named_modules()
          if isinstance(m, LoraLayer) and name in m.lora_A}


def _logits(model) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(IDS)).logits.numpy()


def _peft_logits(pm, name) -> np.ndarray:
  pm.set_adapter(name)
  return _logits(pm)


def _max_diff(ours: merge.Merged, want: dict) -> float:
  assert sorted(want) == list(ours.modules)
  return max(np.abs(ours.delta(m) - want[m]).max() for m in want)


def _check_outputs(tmp_path, model_dir, want_logits, *args):
  """Writes --to peft and --to hf through the CLI; each loads in PyTorch with PEFT's logits."""
  for to in ("peft", "hf"):
    out = str(tmp_path / to)
    assert merge.main(["--model", model_dir, *args, "--to", to, "--out", out]) == 0
    model = (hf_peft.PeftModel.from_pretrained(_base(model_dir), out) if to == "peft"
             else transformers.AutoModelForCausalLM.from_pretrained(out).eval())
    assert np.abs(_logits(model) - want_logits).max() < 1e-4, to


@pytest.mark.parametrize("method", ["cat", "svd"])
def test_cat_and_svd_equal_peft(method, tiny_llama_dir, adapters, peft_model, tmp_path):
  """Ranks 4 and 8 (rsLoRA), different targets, a negative weight."""
  name = _peft_merge(peft_model, ["x0", "x2"], [0.8, -0.5], method)
  want = _peft_deltas(peft_model, name, tiny_llama_dir)
  ours = merge.merge_adapters(tiny_llama_dir, [adapters["x0"], adapters["x2"]], [0.8, -0.5],
                              method)
  assert ours.rank == peft_model.peft_config[name].r == (12 if method == "cat" else 8)
  assert _max_diff(ours, want) < 1e-5
  args = ["--adapter", adapters["x0"], "--adapter", adapters["x2"], "--weights", "0.8,-0.5",
          "--method", method]
  _check_outputs(tmp_path, tiny_llama_dir, _peft_logits(peft_model, name), *args)
  config = json.load(open(tmp_path / "peft" / "adapter_config.json"))
  assert config["r"] == config["lora_alpha"] == ours.rank and not config["use_rslora"]
  if method == "cat":  # exact: Σ w·ΔW_i
    x0, x2 = (_peft_deltas(peft_model, n, tiny_llama_dir) for n in ("x0", "x2"))
    exact = {m: 0.8 * x0.get(m, 0) - 0.5 * x2.get(m, 0) for m in want}
    assert _max_diff(ours, exact) < 1e-5


def test_svd_rank_equals_peft(tiny_llama_dir, adapters, peft_model):
  name = _peft_merge(peft_model, ["x1", "x2"], [1.0, 0.7], "svd", svd_rank=3)
  ours = merge.merge_adapters(tiny_llama_dir, [adapters["x1"], adapters["x2"]], [1.0, 0.7], "svd",
                              rank=3)
  assert ours.rank == 3 and _max_diff(ours, _peft_deltas(peft_model, name, tiny_llama_dir)) < 1e-5


@pytest.mark.parametrize("method,density", [("linear", None), ("ties", 0.5), ("dare_ties", 1.0),
                                            ("dare_linear", 1.0)])
def test_peft_compatible_equals_peft(method, density, tiny_llama_dir, adapters, peft_model,
                                     tmp_path):
  """Equal ranks, different targets and alphas, a negative weight."""
  kwargs = {} if density is None else {"density": density}
  name = _peft_merge(peft_model, ["x0", "x1"], [1.0, -0.6], method, **kwargs)
  ours = merge.merge_adapters(tiny_llama_dir, [adapters["x0"], adapters["x1"]], [1.0, -0.6],
                              method, peft_compatible=True, **kwargs)
  assert ours.rank == 4 and _max_diff(ours, _peft_deltas(peft_model, name, tiny_llama_dir)) < 1e-5
  args = ["--adapter", adapters["x0"], "--adapter", adapters["x1"], "--weights", "1,-0.6",
          "--method", method, "--peft-compatible"]
  args += [] if density is None else ["--density", str(density)]
  _check_outputs(tmp_path, tiny_llama_dir, _peft_logits(peft_model, name), *args)


@pytest.mark.parametrize("method,density", [("ties", 0.5), ("dare_ties", 1.0),
                                            ("dare_linear", 1.0)])
def test_delta_forms_factored_equal_peft_svd_variants(method, density, tiny_llama_dir, adapters,
                                                      peft_model):
  """On ΔW then truncated SVD is what PEFT's `<method>_svd` does (ranks may differ there)."""
  name = _peft_merge(peft_model, ["x1", "x2"], [0.9, 0.4], method + "_svd", density=density)
  ours = merge.merge_adapters(tiny_llama_dir, [adapters["x1"], adapters["x2"]], [0.9, 0.4],
                              method, density=density)
  assert ours.rank == 8 and _max_diff(ours, _peft_deltas(peft_model, name, tiny_llama_dir)) < 1e-5


def _reference(deltas: list, weights: list, method: str, density: float, masks: list):
  """TIES / DARE on whole task vectors, written from the papers' description (PEFT's choices:
  TIES keeps the top-k magnitudes, elects the sign of the unweighted total, averages the
  weighted agreeing entries; DARE rescales the kept entries by 1/density)."""
  if method == "ties":
    pruned = []
    for d in deltas:
      k = int(density * d.size)
      threshold = np.sort(np.abs(d).ravel())[-k]
      pruned.append(np.where(np.abs(d) >= threshold, d, 0.0))
  else:
    pruned = [np.where(m, d / density, 0.0) for d, m in zip(deltas, masks)]
  x, w = np.stack(pruned), np.asarray(weights)[:, None, None]
  if method == "dare_linear":
    return (w * x).sum(0)
  sign = np.where(x.sum(0) >= 0, 1.0, -1.0)
  agree = (x != 0) & (np.sign(x) == sign)
  return (w * x * agree).sum(0) / np.maximum(agree.sum(0), 1)


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties"])
def test_delta_forms_equal_numpy_reference(method, tiny_llama_dir, adapters, peft_model, tmp_path):
  names, weights, density, seed = ["x0", "x1", "x2"], [1.0, 0.5, -0.8], 0.6, 7
  tasks = [_peft_deltas(peft_model, n, tiny_llama_dir) for n in names]
  ours = merge.merge_adapters(tiny_llama_dir, [adapters[n] for n in names], weights, method,
                              density=density, seed=seed, factored=False)
  assert ours.rank is None
  for m in ours.modules:
    shape = ours.deltas[m].shape
    deltas = [t.get(m, np.zeros(shape)) for t in tasks]  # a module an adapter lacks: ΔW = 0
    masks = [merge.dare_mask(seed, m, i, shape, density) for i in range(len(names))]
    assert abs(np.mean(masks) - density) < 0.05 and not np.array_equal(masks[0], masks[1])
    want = _reference(deltas, weights, method, density, masks)
    assert np.abs(ours.deltas[m] - want).max() < 1e-6, m
  if method == "ties":  # --to hf adds exactly that ΔW (no SVD) to the base weights
    out = merge.merge(tiny_llama_dir, [adapters[n] for n in names], "hf", str(tmp_path / "hf"),
                      weights, method, density)
    base, merged = _base(tiny_llama_dir).state_dict(), _base(out).state_dict()
    ctx, _ = merge.context(tiny_llama_dir)
    for key, value in merged.items():
      module = ctx.module_path(key.rsplit(".", 1)[0])
      delta = ours.deltas[module].T if module in ours.deltas else 0
      assert np.abs(value.numpy() - base[key].numpy() - delta).max() < 1e-6, key


def test_single_adapter_and_rslora(tiny_llama_dir, adapters, peft_model):
  """One rsLoRA adapter: its own ΔW (scale alpha/√r) back; --peft-compatible ties falls back to
  linear as PEFT's does."""
  own = _peft_deltas(peft_model, "x2", tiny_llama_dir)
  for method in ("svd", "cat"):
    assert _max_diff(merge.merge_adapters(tiny_llama_dir, [adapters["x2"]], [1.0], method),
                     own) < 1e-5
  name = _peft_merge(peft_model, ["x1"], [0.5], "ties", density=0.3)
  ours = merge.merge_adapters(tiny_llama_dir, [adapters["x1"]], [0.5], "ties", density=0.3,
                              peft_compatible=True)
  assert ours.method == "linear"
  assert _max_diff(ours, _peft_deltas(peft_model, name, tiny_llama_dir)) < 1e-5


@pytest.mark.parametrize("names,kwargs,message", [
    (["x0", "dora"], dict(method="cat"), "DoRA"),
    (["x0", "saves_head"], dict(method="cat"), "modules_to_save"),
    (["x0", "ia3"], dict(method="cat"), "peft_type IA3: only LoRA"),
    (["x0", "x2"], dict(method="linear"), "equal ranks"),
    (["x0", "x2"], dict(method="ties", density=0.5, peft_compatible=True), "equal ranks"),
    (["x0", "x2"], dict(method="ties"), "--density is required"),
    (["x0", "x2"], dict(method="svd", rank=0), "--rank must be at least 1"),
    (["x0", "x2"], dict(method="cat", rank=4), "--rank applies to svd"),
    (["x0", "x2"], dict(method="svd", density=0.5), "--density applies to"),
])
def test_refusals(names, kwargs, message, tiny_llama_dir, adapters):
  with pytest.raises(UserError, match=message):
    merge.merge_adapters(tiny_llama_dir, [adapters[n] for n in names], **kwargs)


def test_cli_errors(tiny_llama_dir, adapters, tmp_path, capsys):
  base = ["--model", tiny_llama_dir, "--adapter", adapters["x0"], "--to", "peft"]
  missing = str(tmp_path / "nowhere")
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "file").write_text("x")
  cases = [
      (["--adapter", missing, "--method", "cat"], missing),
      (["--weights", "1,2", "--method", "cat"], "--weights: 2 weight(s) for 1 adapter(s)"),
      (["--method", "ties", "--density", "1.5"], "--density 1.5 is outside (0, 1]"),
      (["--method", "ties", "--density", "0"], "--density 0.0 is outside (0, 1]"),
      (["--method", "cat", "--out", str(tmp_path / "full")], "not empty"),
  ]
  for extra, named in cases:
    out = [] if "--out" in extra else ["--out", str(tmp_path / "out")]
    assert merge.main(base + extra + out) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and named in err and "\n" not in err, err
    assert not os.path.exists(tmp_path / "out")
