"""Evaluation: held-out loss and perplexity (causal LM) or accuracy and macro-F1 (classification),
and generation metrics (exact match, ROUGE-L, BLEU) over greedy completions of eval prompts.

ROUGE-L is `rouge_score`'s F-measure (mean over prompts); BLEU is `sacrebleu`'s corpus BLEU
(0-100) with its default 13a tokenisation.
"""

from __future__ import annotations

import logging

import numpy as np

from ftjax import data, generate
from ftjax.config import Config

logger = logging.getLogger(__name__)


def macro_f1(predicted: np.ndarray, labels: np.ndarray) -> float:
  """The unweighted mean of per-label F1 over the labels that occur in either array (as
  scikit-learn's `f1_score(average="macro")`); a label with no true or predicted positives
  scores 0."""
  scores = []
  for c in np.union1d(predicted, labels):
    tp = np.sum((predicted == c) & (labels == c))
    fp, fn = np.sum((predicted == c) & (labels != c)), np.sum((predicted != c) & (labels == c))
    scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
  return float(np.mean(scores)) if scores else float("nan")


def evaluate(eval_fn, params, frozen, examples, cfg: Config, pad_id: int) -> dict:
  """Loss over the eval examples; perplexity and next-token accuracy for a causal LM, or
  accuracy and macro-F1 for a classifier (`eval_loss` is per token, or per example)."""
  totals = {"loss_sum": 0.0, "tokens": 0.0, "correct": 0.0}
  predicted, labels = [], []
  for batch in data.eval_batches(examples, cfg.eval.batch_size, cfg.data.seq_len, pad_id,
                                 cfg.data.buckets):
    out = eval_fn(params, frozen, batch)
    for k in totals:
      totals[k] += float(out[k])
    if "predicted" in out:
      keep = batch["labels"][:, 0] >= 0
      predicted.append(np.asarray(out["predicted"])[keep])
      labels.append(batch["labels"][keep, 0])
  n = max(totals["tokens"], 1.0)
  loss = totals["loss_sum"] / n
  result = {"eval_loss": loss, "eval_accuracy": totals["correct"] / n}
  if predicted:
    result["eval_f1"] = macro_f1(np.concatenate(predicted), np.concatenate(labels))
  else:
    result["eval_ppl"] = float(np.exp(min(loss, 50.0)))
  return result


def describe(result: dict) -> str:
  """One line for the log: the metrics `evaluate` (and `generated`, or preference.evaluate)
  computed."""
  line = f"eval loss {result['eval_loss']:.4f}"
  if "eval_rewards/accuracies" in result:
    return (line + f", reward accuracy {result['eval_rewards/accuracies']:.3f}, margin "
            f"{result['eval_rewards/margins']:.4f}, logps chosen "
            f"{result['eval_logps/chosen']:.2f} / rejected {result['eval_logps/rejected']:.2f}")
  if "eval_f1" in result:
    return line + f", accuracy {result['eval_accuracy']:.3f}, macro-F1 {result['eval_f1']:.3f}"
  line += f", ppl {result['eval_ppl']:.2f}, token accuracy {result['eval_accuracy']:.3f}"
  if "eval_exact_match" in result:
    line += (f", exact match {result['eval_exact_match']:.2f}, ROUGE-L "
             f"{result['eval_rouge_l']:.3f}, BLEU {result['eval_bleu']:.1f} "
             f"({result['eval_samples']} prompts)")
  return line


def generated(module, params: dict, examples, tokenizer, cfg: Config, show: int = 2) -> dict:
  """Greedy completions of the first `eval.samples` eval prompts against their reference
  completions: exact match (after stripping), mean ROUGE-L F1, and corpus BLEU."""
  import sacrebleu  # pylint: disable=import-outside-toplevel
  from rouge_score import rouge_scorer  # pylint: disable=import-outside-toplevel

  chosen = [ex for ex in examples if ex.prompt_len][:cfg.eval.samples]
  if not chosen:
    return {}
  tasks = [ex.task for ex in chosen] if chosen[0].task >= 0 else None  # rows' adapters
  outputs = generate.greedy(module, params, [ex.tokens[:ex.prompt_len].tolist() for ex in chosen],
                            cfg.eval.max_new_tokens, tokenizer.eos_token_id, tasks)
  got = [tokenizer.decode(out, skip_special_tokens=True).strip() for out in outputs]
  want = [tokenizer.decode(ex.tokens[ex.prompt_len:], skip_special_tokens=True).strip()
          for ex in chosen]
  for ex, g, w in list(zip(chosen, got, want))[:show]:
    prompt = tokenizer.decode(ex.tokens[:ex.prompt_len], skip_special_tokens=True)
    logger.info(f"  prompt: {prompt!r}\n  model:  {g!r}\n  want:   {w!r}")
  scorer = rouge_scorer.RougeScorer(["rougeL"])
  rouge = [scorer.score(w, g)["rougeL"].fmeasure for g, w in zip(got, want)]
  return {"eval_exact_match": float(np.mean([g == w for g, w in zip(got, want)])),
          "eval_rouge_l": float(np.mean(rouge)),
          "eval_bleu": float(sacrebleu.corpus_bleu(got, [want]).score),
          "eval_samples": len(chosen)}
