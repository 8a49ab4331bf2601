"""QLoRA: LoRA over a frozen base stored as bitsandbytes stores it (NF4, double-quantised NF4,
int8). The oracle is PyTorch: the same model with each linear weight replaced by bitsandbytes'
own dequantisation of it, plus the same PEFT LoRA adapter."""

import os

import bitsandbytes.functional as bnb
import jax
import numpy as np
import peft as hf_peft
import pytest
import torch
import transformers

import tiny
from ftjax import config, export, hf, quant, sharding, train, tree

QUANT = {"nf4": ["peft.base_quant=nf4"],
         "nf4_single": ["peft.base_quant=nf4", "peft.base_quant_double=false"],
         "int8": ["peft.base_quant=int8"]}


def _cfg(model_dir, *words):
  return config.load(None, [f"model.path={model_dir}", "data.train=unused",
                            "data.format=prompt_completion", "data.seq_len=48",
                            "precision.compute=fp32", *words])


def _bnb_dequantised(weight: torch.Tensor, kind: str) -> torch.Tensor:
  """bitsandbytes' quantisation of a weight (out, in), dequantised by bitsandbytes."""
  if kind == "int8":
    return bnb.int8_vectorwise_dequant(*bnb.int8_vectorwise_quant(weight)[:2])
  packed, state = bnb.quantize_4bit(weight, blocksize=64, quant_type="nf4",
                                    compress_statistics=kind == "nf4")
  return bnb.dequantize_4bit(packed, state)


def _torch_over_dequantised(model_dir: str, kind: str, adapter_dir: str | None = None):
  """The HF model whose linear weights (not the head) are bitsandbytes' dequantised ones, with
  the PEFT adapter `adapter_dir` on top."""
  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
  with torch.no_grad():
    for name, module in model.named_modules():
      if isinstance(module, torch.nn.Linear) and name != "lm_head":
        module.weight.copy_(_bnb_dequantised(module.weight.data, kind))
  if adapter_dir:
    model = hf_peft.PeftModel.from_pretrained(model, adapter_dir)
  return model.eval()


def _batch():
  tokens = np.array([[1, 17, 90, 33, 250, 8, 61, 140], [1, 45, 12, 200, 7, 0, 0, 0]], np.int32)
  segment_ids = (np.arange(8)[None] < np.array([[8], [5]])).astype(np.int32)
  positions = np.maximum(np.cumsum(segment_ids, 1) - 1, 0).astype(np.int32)
  return tokens, positions, segment_ids


@pytest.fixture(scope="module")
def lora_adapter(tiny_llama_dir, tmp_path_factory):
  """A PEFT LoRA adapter (all linear layers, random A and B) made on the tiny model."""
  out = str(tmp_path_factory.mktemp("qlora_adapter"))
  torch.manual_seed(1)
  config_ = hf_peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                               init_lora_weights=False)
  hf_peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                         config_).save_pretrained(out)
  return out


@pytest.mark.parametrize("kind", ["nf4", pytest.param("nf4_single", marks=pytest.mark.slow),
                                  pytest.param("int8", marks=pytest.mark.slow)])
def test_qlora_logits_equal_torch_over_bitsandbytes_dequantised_weights(kind, tiny_llama_dir,
                                                                        lora_adapter):
  cfg = _cfg(tiny_llama_dir, "peft.method=lora", f"peft.init_from={lora_adapter}", *QUANT[kind])
  model = train.build_model(cfg, hf.load_tokenizer(tiny_llama_dir))
  flat = tree.flatten(model.params)
  kernels = [p for p in flat if p.endswith("/kernel") and p != "lm_head/kernel"]
  assert kernels and all(isinstance(flat[p], quant.QuantKernel) for p in kernels)
  assert not isinstance(flat["lm_head/kernel"], quant.QuantKernel)  # heads stay, as in bnb
  tokens, positions, segment_ids = _batch()
  ours, _ = model.module.apply({"params": model.params}, tokens, positions, segment_ids)
  with torch.no_grad():
    want = _torch_over_dequantised(tiny_llama_dir, kind, lora_adapter)(
        input_ids=torch.tensor(tokens, dtype=torch.long),
        attention_mask=torch.tensor(segment_ids, dtype=torch.long)).logits.numpy()
  real = segment_ids.astype(bool)
  assert np.abs(np.asarray(ours)[real] - want[real]).max() < 1e-4
  full = train.build_model(_cfg(tiny_llama_dir, "peft.method=lora",
                                f"peft.init_from={lora_adapter}"), None)
  unquantised, _ = full.module.apply({"params": full.params}, tokens, positions, segment_ids)
  assert np.abs(np.asarray(ours) - np.asarray(unquantised))[real].max() > 1e-3  # it did quantise


def test_stored_blocks_are_the_bytes_bitsandbytes_stores(tiny_llama_dir):
  """The loader's device state of a layer equals bitsandbytes' state of the HF weight."""
  from safetensors.numpy import load_file

  model = train.build_model(_cfg(tiny_llama_dir, "peft.method=lora", *QUANT["nf4"]), None)
  q = tree.flatten(model.params)["layers_1/mlp/down_proj/kernel"]
  weight = load_file(os.path.join(tiny_llama_dir, "model.safetensors"))[
      "model.layers.1.mlp.down_proj.weight"]
  packed, state = bnb.quantize_4bit(torch.tensor(weight), blocksize=64, quant_type="nf4",
                                    compress_statistics=True)
  ours = quant.nf4_state(jax.device_get(q))
  np.testing.assert_array_equal(ours.packed, packed.numpy().reshape(-1))
  np.testing.assert_array_equal(ours.absmax, state.absmax.numpy())
  np.testing.assert_array_equal(ours.absmax2, state.state2.absmax.numpy())
  assert ours.offset == np.float32(state.offset.item())
  np.testing.assert_array_equal(np.asarray(q.value()).T, bnb.dequantize_4bit(packed, state))


def test_no_dequantised_weight_is_saved_for_the_backward_pass(tiny_llama_dir):
  """Residuals of the loss's gradient hold no array of a dense kernel's shape (under any remat:
  here none, the worst case)."""
  from jax._src.ad_checkpoint import saved_residuals  # pylint: disable=import-outside-toplevel

  model = train.build_model(_cfg(tiny_llama_dir, "peft.method=lora",
                                 "peft.lora.targets=[all-linear]", *QUANT["nf4"]), None)
  params, frozen = model.split()
  tokens, positions, segment_ids = _batch()

  def loss(p):
    logits, _ = model.module.apply({"params": tree.merge(p, frozen)}, tokens, positions,
                                   segment_ids)
    return logits.sum()

  shapes = {tuple(v.shape) for v in tree.flatten(model.params).values()
            if isinstance(v, quant.QuantKernel)}
  shapes |= {s[::-1] for s in shapes}
  saved = [(a.shape, a.dtype) for a, _ in saved_residuals(loss, params)]
  assert not [s for s in saved if s[0] in shapes and np.issubdtype(s[1], np.floating)], saved
  plain = train.build_model(_cfg(tiny_llama_dir, "peft.method=lora",
                                 "peft.lora.targets=[all-linear]"), None)
  p_params, p_frozen = plain.split()
  plain_saved = [a.shape for a, _ in saved_residuals(
      lambda p: plain.module.apply({"params": tree.merge(p, p_frozen)}, tokens, positions,
                                   segment_ids)[0].sum(), p_params)]
  assert [s for s in plain_saved if s in shapes]  # the check can see a saved kernel


def test_bad_quantisation_config_is_one_line(tiny_llama_dir):
  with pytest.raises(config.UserError, match="base_quant_double applies to peft.base_quant nf4"):
    _cfg(tiny_llama_dir, "peft.base_quant=int8", "peft.base_quant_double=true")
  with pytest.raises(config.UserError, match="no frozen dense kernel"):
    train.build_model(_cfg(tiny_llama_dir, "peft.base_quant=nf4"), None)


def _run(model_dir, files, out, *words, steps=6):
  cfg = _cfg(model_dir, f"data.train={files[0]}", f"data.eval={files[1]}",
             f"train.output_dir={out}", "train.batch_size=8", f"train.steps={steps}",
             "optim.lr=1e-2", "optim.warmup_steps=1", "eval.batch_size=4", "peft.method=lora",
             "peft.lora.targets=[q_proj, v_proj, up_proj]", *words)  # other kernels: base only
  return cfg, train.run(cfg)


@pytest.fixture(scope="module")
def qlora_run(tiny_llama_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp("qlora_run")
  files = (tiny.write_jsonl(str(root / "train.jsonl"), tiny.reverse_records(64)),
           tiny.write_jsonl(str(root / "eval.jsonl"), tiny.reverse_records(8, seed=1)))
  return files, _run(tiny_llama_dir, files, str(root / "run"), *QUANT["nf4"])


@pytest.mark.slow
def test_qlora_exports_give_the_runs_eval_loss(qlora_run, tiny_llama_dir, tmp_path):
  from test_peft import _torch_eval_loss  # pylint: disable=import-outside-toplevel

  _, (cfg, summary) = qlora_run
  assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
  tokenizer = hf.load_tokenizer(tiny_llama_dir)
  adapter = export.export(summary["output_dir"], "peft", str(tmp_path / "adapter"))
  over_dequantised = _torch_over_dequantised(tiny_llama_dir, "nf4", adapter)
  assert abs(_torch_eval_loss(over_dequantised, cfg, tokenizer)
             - summary["after"]["eval_loss"]) < 1e-4
  # The same adapter over a bitsandbytes 4-bit model (its CPU kernels round absmax to bf16).
  bnb_config = transformers.BitsAndBytesConfig(
      load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
      bnb_4bit_compute_dtype=torch.float32)
  base4 = transformers.AutoModelForCausalLM.from_pretrained(
      tiny_llama_dir, quantization_config=bnb_config, device_map="cpu", dtype=torch.float32)
  over_bnb = hf_peft.PeftModel.from_pretrained(base4, adapter).eval()
  assert abs(_torch_eval_loss(over_bnb, cfg, tokenizer) - summary["after"]["eval_loss"]) < 1e-2
  merged = export.export(summary["output_dir"], "hf", str(tmp_path / "merged"))
  model = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
  assert abs(_torch_eval_loss(model, cfg, tokenizer) - summary["after"]["eval_loss"]) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("words", [["mesh.fsdp=4", "mesh.tensor=2"],
                                   ["train.remat=full", "peft.init_from=ADAPTER"]])
def test_qlora_on_a_mesh_with_remat_and_init_from_trains_like_one_device(
    words, qlora_run, tiny_llama_dir, lora_adapter, tmp_path):
  files, (_, summary) = qlora_run
  words = [w.replace("ADAPTER", lora_adapter) for w in words]
  if "mesh.fsdp=4" in words:
    want = summary
  else:  # init_from changes the start: the one-device run is the same config unremat'ed
    want = _run(tiny_llama_dir, files, str(tmp_path / "one"), *QUANT["nf4"],
                *[w for w in words if w.startswith("peft.init_from")])[1]
  got = _run(tiny_llama_dir, files, str(tmp_path / "run"), *QUANT["nf4"], *words)[1]
  steps = sorted(want["losses"])
  np.testing.assert_allclose([got["losses"][s] for s in steps],
                             [want["losses"][s] for s in steps], rtol=1e-5, atol=1e-5)
  if "mesh.fsdp=4" in words:
    assert got["memory"]["params"] < got["memory"]["params_total"] / 2


def test_quantised_blocks_shard_with_their_layer(tiny_llama_dir):
  mesh = sharding.make_mesh(config.MeshConfig(data=1, fsdp=4, tensor=2))
  model = train.build_model(_cfg(tiny_llama_dir, "peft.method=lora", *QUANT["nf4"]), None,
                            mesh=mesh)
  q = tree.flatten(model.params)["layers_0/mlp/up_proj/kernel"]  # kernel (embed, mlp)
  assert q.data.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  assert sharding.device_bytes(q) < q.nbytes / 4


def test_frozen_base_bytes(tiny_llama_dir):
  """NF4 kernels hold about a quarter of their bf16 bytes; with the embeddings and head
  quantised too (and the norms in bf16), so does the whole frozen base."""
  for extra in ([], ["peft.base_quant_embeddings=true", "peft.base_dtype=bf16"]):
    model = train.build_model(_cfg(tiny_llama_dir, "peft.method=lora", *QUANT["nf4"], *extra),
                              None)
    flat = tree.flatten(model.split()[1])
    bf16 = {p: 2 * int(np.prod(v.shape)) for p, v in flat.items()}
    stored = {p: v.nbytes for p, v in flat.items()}
    quantised = [p for p, v in flat.items() if isinstance(v, quant.QuantKernel)]
    assert sum(stored[p] for p in quantised) <= 0.27 * sum(bf16[p] for p in quantised)
    if extra:
      assert sum(stored.values()) <= 0.3 * sum(bf16.values())
