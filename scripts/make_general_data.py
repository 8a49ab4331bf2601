#!/usr/bin/env python
"""Writes a small "general English" probe: sentences of data/topics cut in two, the model asked
to continue them. It sits next to a task's own eval set to show what fine-tuning costs outside
the task (see the README's section on partitions and forgetting). data/general/eval.jsonl was
written by this script with its defaults:

  python scripts/make_general_data.py --out data/general
"""

import argparse
import json
import os


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--source", default="data/topics/eval.jsonl")
  parser.add_argument("--out", default="data/general")
  parser.add_argument("--count", type=int, default=64)
  args = parser.parse_args()
  with open(args.source) as f:
    texts = [json.loads(line)["text"] for line in f if line.strip()][:args.count]
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "eval.jsonl"), "w") as f:
    for text in texts:
      words = text.split()
      cut = len(words) // 2
      f.write(json.dumps({"prompt": " ".join(words[:cut]),
                          "completion": " " + " ".join(words[cut:])}) + "\n")
  print(f"wrote {len(texts)} examples to {args.out}/eval.jsonl")


if __name__ == "__main__":
  main()
