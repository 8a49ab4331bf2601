"""KV-cache decoding (greedy or sampled) for eval samples and `python -m ftjax.generate`.

Prompts are left-padded into one batch; padding has segment id 0 so real tokens never attend to
it, and positions count real tokens only. One jitted prefill, then one jitted step per token;
each row stops at its first stop token (kept in the output). Sampling divides the logits by the
temperature, keeps the `top_k` most likely tokens and the smallest set whose probability
reaches `top_p`, and draws with a key folded from the seed and the step. It works with unmerged
LoRA, adapters, prefix tuning and prompt tuning (soft tokens are prepended in the prefill only).

    python -m ftjax.generate --model DIR [--adapter DIR | --run RUN_DIR] --prompt TEXT ...

Several LoRA adapters decode in one batch, each row with its own (ftjax.peft.multi):

    python -m ftjax.generate --model DIR --adapter math=DIR1 --adapter code=DIR2 \
        --prompt "math:2+2=" --prompt "code:def f():"

and `--run` of a run with `peft.adapters` takes NAME:TEXT prompts likewise.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import sys
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import assembly, export, hf, metrics, models, vocab
from ftjax.config import PeftConfig, UserError
from ftjax.peft import hf_adapter, multi


logger = logging.getLogger("ftjax.generate")  # not __main__ under python -m


@functools.partial(jax.jit, static_argnames=("module", "prefill", "top_k"))
def _forward(module, params, tokens, positions, segment_ids, cache, rng, temperature, top_p,
             adapter, prefill, top_k):
  with multi.rows(adapter):  # each row's adapter (peft.adapters), or None
    logits, cache = module.apply({"params": params}, tokens, positions, segment_ids, cache,
                                 virtual_tokens=prefill)
  return pick(logits[:, -1], rng, temperature, top_p, top_k), cache


def pick(logits_BxV: jax.Array, rng: jax.Array, temperature: jax.Array, top_p: jax.Array,
         top_k: int = 0) -> jax.Array:
  """The next token per row: argmax at temperature 0, else a top-k / top-p sample."""
  greedy = jnp.argmax(logits_BxV, axis=-1)
  scaled = logits_BxV / jnp.maximum(temperature, 1e-6)
  if top_k:
    kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]
    scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
  order = jnp.argsort(-scaled, axis=-1)
  sorted_p = jax.nn.softmax(jnp.take_along_axis(scaled, order, axis=-1), axis=-1)
  before = jnp.cumsum(sorted_p, axis=-1) - sorted_p  # mass of the more likely tokens
  keep_sorted = before < top_p  # the most likely token is always kept
  keep = jnp.zeros_like(keep_sorted).at[jnp.arange(scaled.shape[0])[:, None], order].set(
      keep_sorted)
  sampled = jax.random.categorical(rng, jnp.where(keep, scaled, -jnp.inf), axis=-1)
  return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


def sample(module: Any, params: dict, prompts: list[list[int]], max_new_tokens: int,
           stop_ids: Sequence[int] = (), temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0, seed: int = 0, adapters: Optional[Sequence[int]] = None
           ) -> list[list[int]]:
  """Continuations of token-id prompts, each cut after its first stop token; `adapters`: each
  prompt's adapter (its index in a several-adapter model's `peft.adapters`)."""
  b, p = len(prompts), max(len(x) for x in prompts)
  top_k = min(top_k, module.cfg.vocab_size)
  tokens = np.zeros((b, p), np.int32)
  segment_ids = np.zeros((b, p), np.int32)
  for i, x in enumerate(prompts):
    tokens[i, p - len(x):] = x
    segment_ids[i, p - len(x):] = 1
  positions = np.maximum(np.cumsum(segment_ids, axis=1) - 1, 0).astype(np.int32)
  soft = module.peft.prompt_len  # prompt tuning's soft tokens occupy the cache's first slots
  family = models.for_module(module)
  if not family.causal_lm:
    raise UserError(f"{family.name} models do not generate text")
  cache = models.family.init_cache(module.cfg, b, soft + p + max_new_tokens, module.dtype)
  key = jax.random.PRNGKey(seed)
  if adapters is not None and not isinstance(module.peft, multi.MultiLora):
    raise UserError("adapters: per-prompt adapters need a model with named adapters "
                    "(peft.adapters)")
  knobs = (jnp.float32(temperature), jnp.float32(top_p),
           None if adapters is None else np.asarray(adapters, np.int32).reshape(b, 1))
  nxt, cache = _forward(module, params, tokens, positions, segment_ids, cache,
                        jax.random.fold_in(key, 0), *knobs, prefill=True, top_k=top_k)
  pos = positions[:, -1:] + 1
  out, done = [], np.zeros(b, bool)
  ones = np.ones((b, 1), np.int32)
  stops = np.asarray(list(stop_ids), np.int32)
  for t in range(max_new_tokens):
    token = np.asarray(nxt)
    out.append(token)
    done |= np.isin(token, stops)
    if done.all() or t == max_new_tokens - 1:
      break
    nxt, cache = _forward(module, params, token[:, None], pos, ones, cache,
                          jax.random.fold_in(key, t + 1), *knobs, prefill=False, top_k=top_k)
    pos = pos + 1
  result, stop_set = [], set(stop_ids)
  for row in np.stack(out, axis=1).tolist():
    cut = next((i for i, tok in enumerate(row) if tok in stop_set), None)
    result.append(row if cut is None else row[:cut + 1])
  return result


def greedy(module: Any, params: dict, prompts: list[list[int]], max_new_tokens: int,
           eos_id: Optional[int] = None, adapters: Optional[Sequence[int]] = None
           ) -> list[list[int]]:
  """Greedy continuations (each stops after its EOS, which is kept)."""
  return sample(module, params, prompts, max_new_tokens, () if eos_id is None else (eos_id,),
                adapters=adapters)


def load_for_generation(model_dir: Optional[str], adapter: Optional[str | list[str]],
                        run: Optional[str]):
  """(module, params, tokenizer, model dir) of a base model, a base model + PEFT adapter (or
  several, as NAME=DIR words), or a run."""
  adapters = [adapter] if isinstance(adapter, str) else list(adapter or [])
  named = named_adapters(adapters)
  adapter = None if named else (adapters[0] if adapters else None)
  if model_dir and not run and not getattr(hf.build(model_dir)[0], "causal_lm", True):
    raise UserError(f"{model_dir} is an encoder: it does not generate text")
  if run:
    cfg, model, params, step = export.load_run(run, None, model_dir)
    if model.module.num_labels:
      raise UserError(f"{run} trained a classifier: it does not generate text")
    logger.info(f"{run}: checkpoint of step {step} ({cfg.peft.method})")
    return model.module, params, vocab.run_tokenizer(run, cfg.model.path), cfg.model.path
  if not model_dir:
    raise UserError("pass --model DIR (with --adapter DIR) or --run RUN_DIR")
  if named:
    tokenizer = hf.load_tokenizer(model_dir)
    model = assembly.load_adapters(model_dir, named, compute="fp32", tokenizer=tokenizer)
    return model.module, model.params, tokenizer, model_dir
  peft_cfg = PeftConfig()
  if adapter:
    method = hf_adapter.method_of(*hf_adapter.read_config(adapter, "--adapter"))
    peft_cfg = PeftConfig(method=method, init_from=adapter)
  tokenizer = hf.load_tokenizer(model_dir)
  model = assembly.load_model(model_dir, peft_cfg, compute="fp32", tokenizer=tokenizer)
  return model.module, model.params, tokenizer, model_dir


def named_adapters(words: list[str]) -> dict[str, str]:
  """--adapter words as {NAME: DIR} when they are NAME=DIR (several adapters, one per row), or
  {} for a single adapter directory."""
  if len(words) <= 1 and not any("=" in w and not os.path.isdir(w) for w in words):
    return {}
  named = {}
  for word in words:
    name, sep, path = word.partition("=")
    if not sep or not name or not path:
      raise UserError(f"--adapter {word}: with several adapters, each is NAME=DIR")
    if name in named:
      raise UserError(f"--adapter {word}: the name {name} is given twice")
    named[name] = path
  return named


def route_prompts(prompts: list[str], names: Sequence[str]) -> tuple[list[str], list[int]]:
  """NAME:TEXT prompts of a several-adapter model: (the texts, each one's adapter index)."""
  texts, ids = [], []
  for prompt in prompts:
    name, sep, text = prompt.partition(":")
    if not sep or name not in names:
      raise UserError(f"--prompt {prompt!r}: with several adapters, each prompt is NAME:TEXT "
                      f"with NAME one of {', '.join(names)}")
    texts.append(text)
    ids.append(list(names).index(name))
  return texts, ids


def stop_ids(model_dir: str, tokenizer: Any) -> list[int]:
  """The tokenizer's EOS and the model's generation_config.json eos_token_id(s) (end of turn)."""
  ids = {tokenizer.eos_token_id}
  path = os.path.join(model_dir, "generation_config.json")
  if os.path.isfile(path):
    with open(path) as f:
      eos = json.load(f).get("eos_token_id")
    ids |= set(eos if isinstance(eos, list) else [eos])
  return sorted(i for i in ids if i is not None)


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m ftjax.generate",
                                   description="Generate text with a model, adapter or run.")
  parser.add_argument("--model", help="an HF model directory (the base, with --adapter)")
  parser.add_argument("--adapter", action="append",
                      help="an HF PEFT adapter directory for --model; or NAME=DIR, repeated, "
                      "for several adapters in one batch (then each --prompt is NAME:TEXT)")
  parser.add_argument("--run", help="an ftjax run directory (its newest checkpoint)")
  parser.add_argument("--prompt", action="append", required=True,
                      help="a prompt (repeat for a batch); NAME:TEXT with several adapters")
  parser.add_argument("--max-new-tokens", type=int, default=64)
  parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
  parser.add_argument("--top-k", type=int, default=0, help="0: no top-k cut")
  parser.add_argument("--top-p", type=float, default=1.0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--raw", action="store_true",
                      help="do not apply the tokenizer's chat template to the prompts")
  args = parser.parse_args(argv)
  metrics.console()
  try:
    if args.adapter and args.run:
      raise UserError("pass --adapter or --run, not both")
    if args.max_new_tokens < 1 or args.temperature < 0 or args.top_k < 0 \
        or not 0 < args.top_p <= 1:
      raise UserError("--max-new-tokens >= 1, --temperature >= 0, --top-k >= 0, 0 < --top-p <= 1")
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the generated text only
      module, params, tokenizer, model_dir = load_for_generation(args.model, args.adapter,
                                                                 args.run)
    texts, ids = args.prompt, None
    if isinstance(module.peft, multi.MultiLora):
      texts, ids = route_prompts(args.prompt, module.peft.names)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  chat = bool(getattr(tokenizer, "chat_template", None)) and not args.raw
  prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=True,
                                           add_generation_prompt=True, return_dict=False)
             if chat else tokenizer(p)["input_ids"] for p in texts]
  outputs = sample(module, params, prompts, args.max_new_tokens, stop_ids(model_dir, tokenizer),
                   args.temperature, args.top_k, args.top_p, args.seed, ids)
  for prompt, out in zip(args.prompt, outputs):
    if len(args.prompt) > 1:
      print(f"### {prompt}")
    print(tokenizer.decode(out, skip_special_tokens=True))
  return 0


if __name__ == "__main__":
  sys.exit(main())
