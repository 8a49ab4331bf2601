"""ftjax logits against `transformers` PyTorch on tiny random models of each Llama family."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import tiny
from ftjax import generate, hf

CASES = {
    "llama": ("llama", {}),
    "mistral_sliding_window": ("mistral", {}),
    "qwen2_qkv_bias": ("qwen2", {}),
    "qwen3_qk_norm": ("qwen3", {}),
    "qwen3_tied_biases_sliding": ("qwen3", {"tie_word_embeddings": True, "attention_bias": True,
                                            "use_sliding_window": True, "sliding_window": 6,
                                            "max_window_layers": 1}),
    "tied_embeddings": ("llama", {"tie_word_embeddings": True}),
    "llama3_rope_scaling": ("llama", {"rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}, "rope_theta": 500000.0}),
    "head_dim_and_biases": ("llama", {"head_dim": 24, "attention_bias": True, "mlp_bias": True}),
    "gemma2_softcaps_alternating_windows": ("gemma2", {}),
    "gemma3_local_global_rope_scaling": ("gemma3", {}),
    "phi3_fused_projections_sliding": ("phi3", {}),
    # LongRoPE with a partial rotation: every test sequence reaches past the pretraining length
    # (long factors), or none does (short factors); both scale the rotation.
    "phi3_longrope_long_factors": ("phi3", tiny.longrope(8)),
    "phi3_longrope_short_factors": ("phi3", tiny.longrope(64)),
}


def _ftjax_logits(model, tokens, segment_ids, positions):
  logits, _ = jax.jit(model.module.apply)({"params": model.params}, jnp.asarray(tokens),
                                          jnp.asarray(positions), jnp.asarray(segment_ids))
  return np.asarray(logits)


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
  family, overrides = CASES[case]
  torch_model = tiny.save_model(str(tmp_path), family, **overrides)
  model = hf.load(str(tmp_path))
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 320, size=(3, 20)).astype(np.int32)
  lengths = np.array([20, 13, 7])
  mask = (np.arange(20)[None] < lengths[:, None]).astype(np.int32)  # right padding
  positions = np.broadcast_to(np.arange(20), tokens.shape)

  with torch.no_grad():
    full = torch_model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    padded = torch_model(torch.tensor(tokens, dtype=torch.long),
                         attention_mask=torch.tensor(mask)).logits.numpy()
  ours_full = _ftjax_logits(model, tokens, np.ones_like(tokens), positions)
  ours_padded = _ftjax_logits(model, tokens, mask, positions)
  np.testing.assert_allclose(ours_full, full, atol=1e-4, rtol=0)
  valid = mask.astype(bool)
  np.testing.assert_allclose(ours_padded[valid], padded[valid], atol=1e-4, rtol=0)
  # Padding must not change the real tokens' logits.
  np.testing.assert_allclose(ours_padded[1, :13], _ftjax_logits(
      model, tokens[1:2, :13], np.ones((1, 13), np.int32), positions[:1, :13])[0], atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3", "phi3"])
def test_left_padding_with_positions_matches_transformers(family, tmp_path):
  torch_model = tiny.save_model(str(tmp_path), family)
  model = hf.load(str(tmp_path))
  tokens = np.random.default_rng(1).integers(3, 320, size=(2, 12)).astype(np.int32)
  mask = np.ones_like(tokens)
  mask[1, :5] = 0  # left padding
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    ref = torch_model(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                      position_ids=torch.tensor(positions, dtype=torch.long)).logits.numpy()
  ours = _ftjax_logits(model, tokens, mask, positions)
  valid = mask.astype(bool)
  np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_bf16_compute_within_bf16_tolerance(family, tmp_path):
  torch_model = tiny.save_model(str(tmp_path), family)
  model = hf.load(str(tmp_path), dtype=jnp.bfloat16)
  tokens = np.random.default_rng(2).integers(3, 320, size=(2, 16)).astype(np.int32)
  with torch.no_grad():
    ref = torch_model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  ours = _ftjax_logits(model, tokens, np.ones_like(tokens),
                       np.broadcast_to(np.arange(16), tokens.shape))
  assert ours.dtype == np.float32
  err = np.abs(ours - ref).max()
  assert err < 0.05 * np.abs(ref).max(), err
  assert err > 0  # the compute really ran in bf16


@pytest.mark.slow
@pytest.mark.parametrize("family,overrides", [
    ("qwen2", {}), ("gemma2", {}), ("gemma3", {}), ("phi3", tiny.longrope(64))],
    ids=["qwen2", "gemma2", "gemma3", "phi3_longrope"])
def test_greedy_generation_matches_transformers(family, overrides, tmp_path):
  """Greedy decoding with the KV cache; the Gemma and Phi-3 models' sliding layers (windows 5
  and 6) see their window move past the prompt while decoding."""
  torch_model = tiny.save_model(str(tmp_path), family, **overrides)
  model = hf.load(str(tmp_path))
  prompts = [[1, 40, 41, 42, 43, 44], [1, 50, 51]]
  ours = generate.greedy(model.module, model.params, prompts, max_new_tokens=8)
  for prompt, got in zip(prompts, ours):
    with torch.no_grad():
      ref = torch_model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert got == ref


def test_round_trip_names(tmp_path):
  tiny.save_model(str(tmp_path), "qwen2")
  model = hf.load(str(tmp_path))
  from ftjax import tree
  for path in tree.flatten(model.params):
    name, _ = hf.path_to_hf(model.family.table, path)
    assert hf.hf_to_path(model.family.table, name)[0] == path


def test_sharded_safetensors_with_index(tmp_path):
  torch_model = tiny.make_model("llama")
  torch_model.save_pretrained(str(tmp_path), safe_serialization=True, max_shard_size="100KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  model = hf.load(str(tmp_path))
  tokens = np.random.default_rng(3).integers(3, 320, size=(1, 10)).astype(np.int32)
  with torch.no_grad():
    ref = torch_model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  ours = _ftjax_logits(model, tokens, np.ones_like(tokens), np.arange(10)[None])
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_shape_mismatch_and_pickles_are_refused(tmp_path):
  import json
  from ftjax.config import UserError
  tiny.save_model(str(tmp_path), "llama")
  with open(tmp_path / "config.json") as f:
    cfg = json.load(f)
  (tmp_path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
  with pytest.raises(UserError, match=r"mlp\.\w+_proj\.weight' has shape"):
    hf.load(str(tmp_path))
  (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
  with pytest.raises(UserError, match="found pickled weights"):
    hf.load(str(tmp_path))


def test_a_transformers_4_phi3_longrope_config_reads_as_transformers_5_does():
  """Phi-3-128k's config.json as transformers 4 wrote it (top-level `rope_scaling` of type `su`,
  `rope_theta`, `original_max_position_embeddings`): ftjax's frequencies and rotation scale
  equal transformers' LongRoPE initialisation, short and long. (transformers 5.24 itself wants
  the original length inside `rope_scaling`, so its config gets it there.)"""
  import transformers  # pylint: disable=import-outside-toplevel
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # pylint: disable=import-outside-toplevel

  from ftjax.models import layers, phi3  # pylint: disable=import-outside-toplevel

  n = 8
  old = {**tiny.FAMILIES["phi3"][3], "model_type": "phi3", "rope_theta": 5000.0,
         "max_position_embeddings": 512, "original_max_position_embeddings": 32,
         "rope_scaling": {"type": "su", "short_factor": [1.0 + 0.2 * i for i in range(n)],
                          "long_factor": [3.0 + i for i in range(n)]}}
  cfg = phi3.config_from_hf(old)
  hf_config = transformers.Phi3Config(**{
      **{k: v for k, v in old.items() if k != "model_type"},
      "rope_scaling": {**old["rope_scaling"], "original_max_position_embeddings": 32}})
  for length in (16, 64):  # within, and past, the original length
    want, want_scale = ROPE_INIT_FUNCTIONS["longrope"](hf_config, seq_len=length)
    got, scale = layers.rope_frequencies(cfg.rotary_dim, *cfg.rope(0),
                                         jnp.arange(length)[None])
    np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-6)
    assert scale == pytest.approx(want_scale, rel=1e-6) and scale > 1.1
