"""Vocabulary extension: new rows by token id, their initialisation, training only them under
LoRA, exports that transformers and PEFT load, and bad input."""

import os

import numpy as np
import peft as hf_peft
import pytest
import transformers
from safetensors.numpy import load_file

import tiny
from conftest import REPO
from ftjax import config, export, generate, hf, train, tree, vocab
from test_peft import _torch_eval_loss

TOKENS = ["model.add_special_tokens=[<tool_call>]", "model.add_tokens=[zork]"]


def _cfg(model_dir, *words):
  base = [f"model.path={model_dir}", "data.train=unused", "data.format=prompt_completion",
          "data.seq_len=48", "precision.compute=fp32"]
  return config.load(None, base + list(words))


def _tables(model_dir, *words):
  """(embedding (V, D), head (V, D) or None, base tokenizer size, new ids, the model)."""
  cfg = _cfg(model_dir, *words)
  tokenizer, ext = vocab.resolve(cfg.model, cfg.train.seed)
  model = train.build_model(cfg, tokenizer)
  flat = {p: np.asarray(v) for p, v in tree.flatten(model.params).items()}
  head = flat["lm_head/kernel"].T if "lm_head/kernel" in flat else None
  return flat["embed_tokens/embedding"], head, ext.base_len, list(ext.ids), model


@pytest.fixture(scope="module")
def grown_dir(tmp_path_factory):
  """A tiny Llama whose table has exactly the tokenizer's rows (new tokens must grow it)."""
  path = str(tmp_path_factory.mktemp("grown"))
  tiny.save_model(path, "llama", vocab_size=len(tiny.make_tokenizer()))
  return path


def test_mean_init_by_id_on_a_padded_vocabulary(tiny_llama_dir):
  embed, head, n, ids, model = _tables(tiny_llama_dir, *TOKENS)
  base = hf.load(tiny_llama_dir).params
  assert embed.shape == (320, 64) and n == 259 and ids == [259, 260]  # no resize: padded
  np.testing.assert_array_equal(embed[ids], np.broadcast_to(embed[:n].mean(axis=0), (2, 64)))
  np.testing.assert_allclose(head[ids], np.broadcast_to(head[:n].mean(axis=0), (2, 64)),
                             atol=1e-7)
  others = [i for i in range(320) if i not in ids]
  np.testing.assert_array_equal(embed[others],
                                np.asarray(base["embed_tokens"]["embedding"])[others])
  assert "embed_tokens/embedding" in model.trainable  # full fine-tuning: no separate leaves
  assert not any(p.startswith("new_tokens/") for p in tree.flatten(model.params))


def test_mean_init_on_a_growing_vocabulary_and_lora_leaves(grown_dir):
  embed, head, n, ids, model = _tables(grown_dir, *TOKENS, "peft.method=lora")
  assert embed.shape == (261, 64) and head.shape == (261, 64) and ids == [259, 260]
  assert model.config.vocab_size == 261
  np.testing.assert_array_equal(embed[ids], np.broadcast_to(embed[:n].mean(axis=0), (2, 64)))
  flat = tree.flatten(model.params)
  assert {"new_tokens/embedding", "new_tokens/lm_head"} <= model.trainable
  assert "embed_tokens/embedding" not in model.trainable
  np.testing.assert_array_equal(np.asarray(flat["new_tokens/embedding"]), embed[ids])
  np.testing.assert_array_equal(np.asarray(flat["new_tokens/lm_head"]), head[ids])


def test_mean_noise_and_description_init(tiny_llama_dir):
  embed, head, n, ids, _ = _tables(tiny_llama_dir, *TOKENS, "model.new_token_init=mean_noise",
                                   "train.seed=3")
  noise = embed[ids] - embed[:n].mean(axis=0)
  assert abs(noise.std() - 1 / np.sqrt(64)) < 0.25 / np.sqrt(64) and abs(noise.mean()) < 0.05
  again, _, _, _, _ = _tables(tiny_llama_dir, *TOKENS, "model.new_token_init=mean_noise",
                              "train.seed=3")
  np.testing.assert_array_equal(again[ids], embed[ids])  # seeded
  other, _, _, _, _ = _tables(tiny_llama_dir, *TOKENS, "model.new_token_init=mean_noise",
                              "train.seed=4")
  assert not np.array_equal(other[ids], embed[ids])
  texts = {"<tool_call>": "a call of a tool", "zork": "the quick brown fox"}
  embed, head, _, ids, _ = _tables(
      tiny_llama_dir, *TOKENS, "model.new_token_init=description",
      "model.token_descriptions={'<tool_call>': 'a call of a tool', zork: the quick brown fox}")
  tokenizer = hf.load_tokenizer(tiny_llama_dir)
  for i, token in zip(ids, ["<tool_call>", "zork"]):
    rows = tokenizer(texts[token], add_special_tokens=False)["input_ids"]
    np.testing.assert_allclose(embed[i], embed[rows].mean(axis=0), atol=1e-7)
    np.testing.assert_allclose(head[i], head[rows].mean(axis=0), atol=1e-7)


@pytest.mark.parametrize("words,needle", [
    (["model.add_tokens=[zork]", "model.new_token_init=description"],
     "model.new_token_init: description needs model.token_descriptions for 'zork'"),
    (["model.add_tokens=[zork]", "model.token_descriptions={blorp: a word}"],
     "model.token_descriptions: 'blorp' is not in model.add_tokens"),
    (["model.add_tokens=[zork]", "model.add_special_tokens=[zork]"],
     "model.add_tokens: 'zork' is given twice"),
])
def test_bad_token_config_is_one_line_and_exits_non_zero(words, needle, capsys, tiny_llama_dir,
                                                         tmp_path):
  with pytest.raises(config.UserError, match=needle.replace("(", r"\(")):
    _cfg(tiny_llama_dir, *words)
  code = train.main(["--config", os.path.join(REPO, "configs", "quickstart.yaml"),
                     f"model.path={tiny_llama_dir}", f"train.output_dir={tmp_path}", *words])
  err = capsys.readouterr().err.strip()
  assert code == 2 and needle in err and len(err.splitlines()) == 1, err


def test_an_existing_token_is_not_new(tiny_llama_dir):
  cfg = _cfg(tiny_llama_dir, "model.add_special_tokens=[</s>, <tool_call>]")
  tokenizer, ext = vocab.resolve(cfg.model)
  assert ext.tokens == ("<tool_call>",) and ext.ids == (259,) and len(tokenizer) == 260
  ids = tokenizer("x <tool_call> y")["input_ids"]
  assert 259 in ids and "<tool_call>" not in tokenizer.decode(ids, skip_special_tokens=True)


def _records(n, seed):
  """Prompt/completion pairs whose completions start with the new special token."""
  return [{"prompt": r["prompt"], "completion": " <tool_call>" + r["completion"] + " zork"}
          for r in tiny.reverse_records(n, seed)]


def _lora_run(model_dir, root, *words, steps=12):
  files = (tiny.write_jsonl(str(root / "train.jsonl"), _records(64, 0)),
           tiny.write_jsonl(str(root / "eval.jsonl"), _records(8, 1)))
  cfg = _cfg(model_dir, f"data.train={files[0]}", f"data.eval={files[1]}",
             f"train.output_dir={root / 'run'}", "train.batch_size=8", f"train.steps={steps}",
             "optim.lr=2e-2", "optim.warmup_steps=1", "eval.batch_size=4", "optim.weight_decay=0.1",
             "peft.method=lora", *TOKENS, *words)
  return cfg, train.run(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["padded", "grown", "tied"])
def test_lora_trains_only_the_new_rows_and_exports_load_in_hf_and_peft(which, tiny_llama_dir,
                                                                        grown_dir, tmp_path):
  model_dir = {"padded": tiny_llama_dir, "grown": grown_dir}.get(which)
  if which == "tied":
    model_dir = str(tmp_path / "tied")
    tiny.save_model(model_dir, "llama", tie_word_embeddings=True)
  cfg, result = _lora_run(model_dir, tmp_path)
  run = result["output_dir"]
  assert result["after"]["eval_loss"] < result["before"]["eval_loss"]
  tokenizer = vocab.run_tokenizer(run, model_dir)
  assert len(tokenizer) == 261 and os.path.isdir(os.path.join(run, "tokenizer"))
  ids = [259, 260]
  # --to hf: resized tables, every row but the new ones bit-identical to the base
  merged = export.export(run, "hf", str(tmp_path / "hf"))
  base, out = (load_file(os.path.join(d, "model.safetensors")) for d in (model_dir, merged))
  rows = 261 if which == "grown" else 320
  assert ("lm_head.weight" in out) == (which != "tied")
  for name in [n for n in ("model.embed_tokens.weight", "lm_head.weight") if n in out]:
    assert out[name].shape == (rows, 64)
    old = [i for i in range(min(rows, base[name].shape[0])) if i not in ids]
    np.testing.assert_array_equal(out[name][old], base[name][old], err_msg=name)
    assert not np.allclose(out[name][ids], out[name][:259].mean(axis=0))  # they trained
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
  hf_tok = transformers.AutoTokenizer.from_pretrained(merged)
  assert hf_model.config.vocab_size == rows and len(hf_tok) == 261
  eval_loss = result["after"]["eval_loss"]
  assert abs(_torch_eval_loss(hf_model, cfg, tokenizer) - eval_loss) < 1e-4
  # --to peft: trainable_token_indices over the base, resized to the run's rows
  adapter = export.export(run, "peft", str(tmp_path / "peft"))
  base_model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
  if which == "grown":
    base_model.resize_token_embeddings(len(tokenizer))
  pm = hf_peft.PeftModel.from_pretrained(base_model, adapter).eval()
  assert pm.peft_config["default"].trainable_token_indices == (
      ids if which == "tied" else {"embed_tokens": ids, "lm_head": ids})
  assert abs(_torch_eval_loss(pm, cfg, tokenizer) - eval_loss) < 1e-4
  assert len(transformers.AutoTokenizer.from_pretrained(adapter)) == 261
  # the new special token is generated after training, and decodes away when skipped
  prompt = tokenizer(_records(1, 1)[0]["prompt"])["input_ids"]
  module, params, gen_tok, _ = generate.load_for_generation(None, None, run)
  out_ids = generate.greedy(module, params, [prompt], 3)[0]
  assert out_ids[0] == 259, out_ids
  assert "<tool_call>" not in gen_tok.decode(out_ids, skip_special_tokens=True)


@pytest.mark.slow
def test_resume_with_other_tokens_is_refused(tiny_llama_dir, tmp_path):
  cfg, _ = _lora_run(tiny_llama_dir, tmp_path, steps=2)
  other = config.load(None, [f"{k}={v}" for k, v in {
      "model.path": cfg.model.path, "data.train": cfg.data.train[0],
      "data.format": cfg.data.format, "data.seq_len": 48, "precision.compute": "fp32",
      "train.output_dir": cfg.train.output_dir, "train.batch_size": 8, "train.steps": 4,
      "peft.method": "lora", "model.add_tokens": "[zork, blorp]"}.items()])
  with pytest.raises(config.UserError, match="has other added tokens than this config"):
    train.run(other)


@pytest.mark.slow
def test_chunked_head_gives_the_new_rows_the_whole_logit_gradient(tiny_llama_dir):
  import jax  # pylint: disable=import-outside-toplevel

  from ftjax import loss  # pylint: disable=import-outside-toplevel

  cfg = _cfg(tiny_llama_dir, *TOKENS, "peft.method=lora")
  model = train.build_model(cfg, vocab.resolve(cfg.model)[0])
  params, frozen = model.split()
  tokens = np.array([[1, 259, 17, 260, 33, 259], [1, 45, 260, 12, 0, 0]], np.int32)
  segment_ids = (tokens > 0).astype(np.int32)
  batch = {"tokens": tokens, "segment_ids": segment_ids, "loss_mask": segment_ids,
           "positions": np.maximum(np.cumsum(segment_ids, 1) - 1, 0).astype(np.int32)}
  chunked = loss.chunked_loss(model.module, np.float32, model.trainable, chunk=8)
  assert chunked.columns == (259, 260) and not chunked.kernel_grad
  grads = [jax.grad(lambda p, fn=fn: fn(tree.merge(p, frozen), batch)[0])(params)
           for fn in (loss.chunked_cross_entropy(chunked),
                      loss.cross_entropy(loss.logits_fn(model.module)))]
  got, want = (tree.flatten(g) for g in grads)
  for path in ("new_tokens/embedding", "new_tokens/lm_head"):
    assert np.abs(want[path]).max() > 1e-4, path
    np.testing.assert_allclose(got[path], want[path], rtol=1e-4, atol=1e-5, err_msg=path)


@pytest.mark.slow
def test_chat_data_with_a_new_special_token_trains_and_generates_it(tiny_llama_dir, tmp_path):
  """A `<tool_call>` marker in assistant turns of chat data: trained under LoRA (only its rows
  and the adapter), then produced by greedy generation after the chat template's prompt."""
  import shutil  # pylint: disable=import-outside-toplevel

  model_dir = str(tmp_path / "chat_model")
  shutil.copytree(tiny_llama_dir, model_dir)
  tok = hf.load_tokenizer(model_dir)
  tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>"
                       "{% endfor %}{% if add_generation_prompt %}<s>assistant: {% endif %}")
  tok.save_pretrained(model_dir)
  chats = lambda n, seed: [{"messages": [
      {"role": "user", "content": r["prompt"]},
      {"role": "assistant", "content": "<tool_call>" + r["completion"]}]}
      for r in tiny.reverse_records(n, seed)]
  files = [tiny.write_jsonl(str(tmp_path / f"{s}.jsonl"), chats(n, i))
           for i, (s, n) in enumerate([("train", 64), ("eval", 8)])]
  cfg = _cfg(model_dir, "data.format=chat", "data.seq_len=112", f"data.train={files[0]}",
             f"data.eval={files[1]}",
             f"train.output_dir={tmp_path / 'run'}", "train.batch_size=8", "train.steps=12",
             "optim.lr=2e-2", "optim.warmup_steps=1", "eval.batch_size=4", "peft.method=lora",
             "model.add_special_tokens=[<tool_call>]")
  result = train.run(cfg)
  assert result["after"]["eval_loss"] < result["before"]["eval_loss"]
  module, params, gen_tok, _ = generate.load_for_generation(None, None, result["output_dir"])
  tool_call = gen_tok.convert_tokens_to_ids("<tool_call>")
  prompt = gen_tok.apply_chat_template(chats(1, 1)[0]["messages"][:1],
                                       add_generation_prompt=True, tokenize=True)
  prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
  out_ids = generate.greedy(module, params, [prompt], 3)[0]
  assert out_ids[0] == tool_call, out_ids
