"""Tiny random HF models with a small tokenizer, built with `transformers` (no downloads)."""

from __future__ import annotations

import json
import os

import numpy as np

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a stitch in time saves nine and the early bird catches the worm",
    "reverse these words: apple river stone cloud -> cloud stone river apple",
    "0 1 2 3 4 5 6 7 8 9 + - = ? ! . , : ;",
]

_LLAMA = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
              pad_token_id=0)
_GEMMA = {**_LLAMA, "head_dim": 24, "query_pre_attn_scalar": 16, "sliding_window": 5,
          "initializer_range": 0.1, "tie_word_embeddings": True}


def longrope(original: int, partial: float = 0.5, head_dim: int = 16) -> dict:
  """Phi-3 LongRoPE settings (128k-style) for a tiny model: distinct short and long factors per
  rotated frequency, a partial rotation, and `original` as the pretraining length."""
  n = int(head_dim * partial) // 2
  return {"rope_scaling": {"rope_type": "longrope",
                           "short_factor": [1.0 + 0.1 * i for i in range(n)],
                           "long_factor": [2.0 + 3.0 * i for i in range(n)]},
          "partial_rotary_factor": partial, "original_max_position_embeddings": original}


# family: (config class, causal-LM (or base) class, classifier class, config kwargs)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", "LlamaForSequenceClassification", _LLAMA),
    "mistral": ("MistralConfig", "MistralForCausalLM", "MistralForSequenceClassification",
                {**_LLAMA, "sliding_window": 8}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "Qwen2ForSequenceClassification", _LLAMA),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "Qwen3ForSequenceClassification",
              {**_LLAMA, "head_dim": 24}),
    # Gemma: head_dim apart from hidden/heads, a window shorter than the test sequences, a query
    # scale apart from head_dim, weights large enough (and caps small enough) that every cap
    # bends the scores and logits far beyond the parity tolerance.
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", "Gemma2ForSequenceClassification",
               {**_GEMMA, "attn_logit_softcapping": 1.0, "final_logit_softcapping": 3.0}),
    # Six layers: five sliding, one global (the 5:1 pattern); the global layer's RoPE has its own
    # base and linear scaling.
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", "Gemma3TextForSequenceClassification",
               {**_GEMMA, "num_hidden_layers": 6, "rope_theta": 1000000.0,
                "rope_scaling": {"rope_type": "linear", "factor": 8.0},
                "final_logit_softcapping": 3.0}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", "Phi3ForSequenceClassification",
             {**_LLAMA, "sliding_window": 6, "initializer_range": 0.1}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", "GPT2ForSequenceClassification",
             dict(vocab_size=320, n_embd=64, n_inner=128, n_layer=2, n_head=4, n_positions=128,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)),
    "bert": ("BertConfig", "BertModel", "BertForSequenceClassification",
             dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128, pad_token_id=0)),
}


def make_tokenizer(vocab_size: int = 256):
  """A byte-level BPE tokenizer with <s>, </s> and <pad>, trained on a fixed corpus."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, processors, trainers
  import transformers

  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(CORPUS * 4, trainer)
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                              eos_token="</s>", pad_token="<pad>")


def hf_config(family: str = "llama", **overrides):
  import transformers

  config_cls, _, _, kwargs = FAMILIES[family]
  return getattr(transformers, config_cls)(**{**kwargs, **overrides})


def make_model(family: str = "llama", seed: int = 0, classifier: bool = False, **overrides):
  """A random HF PyTorch model (the family's sequence classifier with `classifier`, given
  `num_labels`); weights are perturbed so norms and biases are not trivial."""
  import torch
  import transformers

  torch.manual_seed(seed)
  cls = FAMILIES[family][2 if classifier else 1]
  model = getattr(transformers, cls)(hf_config(family, **overrides)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name.lower() or ".ln_" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def save_model(path: str, family: str = "llama", seed: int = 0, classifier: bool = False,
               **overrides):
  """Writes a tiny HF model directory (config.json, model.safetensors, tokenizer) to `path`."""
  model = make_model(family, seed, classifier, **overrides)
  model.save_pretrained(path, safe_serialization=True)
  make_tokenizer().save_pretrained(path)
  return model


def write_jsonl(path: str, records: list[dict]) -> str:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  return path


def reverse_records(n: int, seed: int = 0) -> list[dict]:
  words = "apple river stone cloud fox dog bird time nine early".split()
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    picked = list(rng.choice(words, size=3, replace=False))
    out.append({"prompt": "reverse these words: " + " ".join(picked) + " ->",
                "completion": " " + " ".join(reversed(picked))})
  return out


def torch_token_loss(model, tokenizer, records) -> tuple[float, int]:
  """Mean next-token NLL over the trained tokens, one record at a time in fp32: every token
  after BOS for `text`, the completion and EOS for prompt/completion records."""
  import torch  # pylint: disable=import-outside-toplevel

  eos, nll_sum, count = tokenizer.eos_token_id, 0.0, 0
  for r in records:
    ids = tokenizer(r.get("text") or r["prompt"] + r["completion"])["input_ids"] + [eos]
    start = 1
    if "prompt" in r:
      start = len(tokenizer(r["prompt"])["input_ids"])
      assert tokenizer(r["prompt"] + r["completion"])["input_ids"][:start] == \
          tokenizer(r["prompt"])["input_ids"]  # the prompt's tokens do not merge across
    x = torch.tensor([ids])
    with torch.no_grad():
      logp = torch.log_softmax(model(x).logits[0, :-1].float(), dim=-1)
    nll = -logp[torch.arange(len(ids) - 1), x[0, 1:]]
    nll_sum += nll[start - 1:].sum().item()  # position t - 1 predicts token t
    count += len(ids) - start
  return nll_sum / count, count
