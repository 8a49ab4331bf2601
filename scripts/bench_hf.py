"""The PyTorch side of scripts/bench.py: the random model both frameworks load, and the HF
transformers (+PEFT) worker. Run by bench.py (`--worker make | hf`), never directly.

The HF step is the usual PyTorch loop: sdpa attention, model.train(), loss =
model(input_ids=ids, labels=ids).loss, backward, AdamW.step (torch's default implementation on
CPU; fused on CUDA unless --fused-adamw off), zero_grad(set_to_none=True). Under --compute bf16
on CUDA the forward runs in torch.autocast(bfloat16) over fp32 parameters.
"""

import os
import json
import re
import sys
import warnings

import numpy as np

import bench

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import torch  # noqa: E402  # pylint: disable=wrong-import-position
import transformers  # noqa: E402  # pylint: disable=wrong-import-position


def make_model(args) -> dict:
  """Saves a random-init LlamaForCausalLM (fp32 safetensors) to args.model_dir."""
  torch.manual_seed(args.seed)
  cfg = transformers.LlamaConfig(
      vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
      num_hidden_layers=args.layers, num_attention_heads=args.heads,
      num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq + 256,
      tie_word_embeddings=False, rms_norm_eps=1e-5, attention_dropout=0.0, use_cache=False)
  model = transformers.LlamaForCausalLM(cfg)
  model.save_pretrained(args.model_dir)
  return {"params_total": sum(p.numel() for p in model.parameters())}


def _peft_model(model, args):
  """Wraps `model` in the PEFT method of args.mode, its parameters set from bench.adapter_init."""
  import peft  # pylint: disable=import-outside-toplevel

  task = peft.TaskType.CAUSAL_LM
  if args.mode == "lora":
    pcfg = peft.LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                           bias="none", task_type=task, target_modules=bench.LORA_TARGETS)
  elif args.mode == "prefix":
    pcfg = peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=args.virtual_tokens,
                                   prefix_projection=False)
  else:
    pcfg = peft.PromptTuningConfig(task_type=task, num_virtual_tokens=args.virtual_tokens)
  model = peft.get_peft_model(model, pcfg)
  named = {n: p for n, p in model.named_parameters() if p.requires_grad}
  if args.mode == "lora":  # bench names A by module, (in, r); torch keeps (r, in)
    names = {n: re.search(r"(layers\.\d+\.\w+\.\w+)\.lora_A", n) for n in named}
    names = {n: m.group(1) for n, m in names.items() if m}
    init = bench.adapter_init("lora", {k: tuple(named[n].shape[::-1]) for n, k in names.items()},
                              args.seed)
    values = {n: init[k].T for n, k in names.items()}
  else:
    (name, param), = named.items()
    values = {name: bench.adapter_init(args.mode, {args.mode: tuple(param.shape)},
                                       args.seed)[args.mode]}
  with torch.no_grad():
    for n, v in values.items():
      named[n].copy_(torch.from_numpy(np.ascontiguousarray(v)))
  return model


def hf_worker(args) -> dict:
  cuda = torch.cuda.is_available()
  device = torch.device("cuda" if cuda else "cpu")
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(args.seed)
  model = transformers.LlamaForCausalLM.from_pretrained(
      args.model_dir, dtype=torch.float32, attn_implementation="sdpa").to(device)
  if args.mode != "full":
    model = _peft_model(model, args)
  model.train()
  trainable = [p for p in model.parameters() if p.requires_grad]
  fused = args.fused_adamw == "on" or (args.fused_adamw == "auto" and cuda)
  opt = torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                          weight_decay=args.weight_decay, **({"fused": True} if fused else {}))
  rss_built = bench.peak_rss_mib()
  batches = [torch.from_numpy(t.astype(np.int64)).to(device) for t in bench.token_batches(args)]
  autocast = args.compute == "bf16"

  def one(i):
    ids = batches[i % len(batches)]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
      loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if cuda:
      torch.cuda.synchronize()
    return float(loss)

  if cuda:
    torch.cuda.reset_peak_memory_stats()
  result = bench.timed_steps(one, args)
  return {**result, "rss_after_build_mib": rss_built,
          "params_total": sum(p.numel() for p in model.parameters()),
          "params_trainable": sum(p.numel() for p in trainable),
          "device": torch.cuda.get_device_name() if cuda else "cpu",
          "peak_device_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
          "adamw": "fused" if fused else "default (foreach)" if cuda else "default",
          "torch_threads": torch.get_num_threads(),
          "attn_impl": getattr(model.config, "_attn_implementation", None)}


def main() -> int:
  args = bench.parse()
  result = {"make": make_model, "hf": hf_worker}[args.worker](args)
  result.update(framework=args.worker, mode=args.mode, peak_rss_mib=bench.peak_rss_mib())
  with open(args.out, "w") as f:
    json.dump(result, f)
  return 0


if __name__ == "__main__":
  sys.exit(main())
