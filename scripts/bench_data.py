"""Times the data pipeline: tokenising N synthetic prompt/completion records, then loading them
again from the cache, then packing them (the figures in the README's Data section).

    python scripts/bench_data.py --model models/smollm2-135m-instruct --records 100000
"""

import argparse
import json
import os
import random
import tempfile
import time

from ftjax import config, data, hf

WORDS = "apple river stone cloud fox dog bird time nine early ocean window zipper turtle".split()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", required=True, help="an HF model directory (its tokenizer)")
  parser.add_argument("--records", type=int, default=100_000)
  parser.add_argument("--seq-len", type=int, default=32)
  args = parser.parse_args()
  work = tempfile.mkdtemp(prefix="ftjax-bench-data-")
  path = os.path.join(work, "train.jsonl")
  rng = random.Random(0)
  with open(path, "w") as f:
    for _ in range(args.records):
      w = rng.sample(WORDS, 5)
      f.write(json.dumps({"prompt": "Reverse: " + " ".join(w) + "\n",
                          "completion": " ".join(reversed(w))}) + "\n")
  cfg = config.load(None, [f"model.path={args.model}", f"data.train={path}",
                           "data.format=prompt_completion", f"data.seq_len={args.seq_len}",
                           f"data.cache_dir={os.path.join(work, 'cache')}"]).data
  tokenizer = hf.load_tokenizer(args.model)
  for label in ("tokenise (cold cache)", "load (warm cache)"):
    start = time.perf_counter()
    loaded = data.load_splits(cfg, tokenizer)
    print(f"{label}: {time.perf_counter() - start:.1f} s, {len(loaded.train.examples)} examples, "
          f"{os.cpu_count()} cores")
  start = time.perf_counter()
  batches = data.Batches(loaded.train.examples, 16, args.seq_len, tokenizer.pad_token_id, 0,
                         packing=True)
  print(f"pack: {time.perf_counter() - start:.1f} s, {len(batches.rows)} rows, "
        f"{100 * batches.efficiency:.1f}% full")


if __name__ == "__main__":
  main()
