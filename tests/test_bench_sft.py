"""scripts/bench_sft.py: the Alpaca-shaped length sampler and the marginal-rate summary."""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts"))
import bench_sft  # noqa: E402


def test_lengths_follow_the_alpaca_table():
  prompt, completion, cut = bench_sft.sample_lengths(20000, 0, 255)
  assert prompt.min() >= 1 and completion.min() >= 1
  assert (prompt + completion).max() <= 255
  assert 0 < cut < 0.03 * len(prompt)
  for values, table in ((prompt, bench_sft.ALPACA_PROMPT),
                        (completion, bench_sft.ALPACA_COMPLETION)):
    for q in (10, 50, 90):
      target = np.interp(q, bench_sft.ALPACA_LEVELS, table)
      assert abs(np.percentile(values, q) - target) <= max(2.0, 0.06 * target), q
  rank = lambda a: np.argsort(np.argsort(a))
  assert np.corrcoef(rank(prompt), rank(completion))[0, 1] < -0.15  # long inputs, short outputs
  again = bench_sft.sample_lengths(20000, 0, 255)
  assert (again[0] == prompt).all() and (again[1] == completion).all()


def _run(fw, mode, size, rnd, wall, trained):
  return {"framework": fw, "mode": mode, "size": size, "round": rnd, "wall_s": wall,
          "tokens": {"trained": trained, "real": trained, "computed": 2 * trained},
          "peak_rss_mib": 100.0, "steps": 1, "foreign_cores": 0.0, "first_loss": 1.0}


def test_summary_rates_ratios_and_noise():
  runs = []
  for rnd in range(2):
    runs += [_run("trl", "default", "small", rnd, 100, 1000),
             _run("trl", "default", "large", rnd, 200, 2000),  # 1000 tokens in 100 s
             _run("trl", "packing", "small", rnd, 50, 1000),
             _run("trl", "packing", "large", rnd, 100, 2000),  # 20 tok/s
             _run("ftjax", "default", "small", rnd, 100, 1000),
             _run("ftjax", "default", "large", rnd, 140, 2000),  # 25 tok/s
             _run("ftjax", "packing", "small", rnd, 300, 1000),
             _run("ftjax", "packing", "large", rnd, 301 + 30 * rnd, 2000)]  # swamped by start-up
  modes = [("ftjax", "default"), ("ftjax", "packing"), ("trl", "default"), ("trl", "packing")]
  check = {"losses": {"ftjax_unpacked": 1.0, "trl_padded": 1.0, "trl_packed": 1.0}}
  rows = {(r["framework"], r["mode"]): r for r in bench_sft.summarise(runs, modes, check, 500)}
  ft = rows[("ftjax", "default")]
  assert ft["trained_tokens_per_s"] == 25.0 and ft["epoch_extra_s"] == 20.0
  assert ft["vs_trl_default"] == 2.5 and ft["vs_trl_best"] == 1.25
  assert ft["trl_best_mode"] == "packing" and ft["step0_loss"] == 1.0 and not ft["noisy"]
  assert rows[("ftjax", "packing")]["noisy"]
  assert "(noisy)" in bench_sft.table(list(rows.values()))
