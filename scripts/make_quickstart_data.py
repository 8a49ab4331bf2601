#!/usr/bin/env python
"""Writes the quickstart task: reverse the order of a few words (checkable by exact match).

SmolLM2-135M-Instruct gets this wrong out of the box; a few minutes of fine-tuning on CPU
teaches it. The files in data/quickstart/ were written by this script with its defaults:

  python scripts/make_quickstart_data.py --out data/quickstart
"""

import argparse
import json
import os
import random

WORDS = """apple river stone cloud table window garden pencil rabbit candle mirror forest
bottle castle dragon engine feather guitar hammer island jacket kettle ladder magnet needle
orange pillow rocket saddle tunnel violin wallet yellow zipper anchor basket button carpet
circle copper desert dinner doctor finger flower hunter jungle kitten lemon marble meadow
monkey napkin ocean parrot pepper planet pocket puzzle silver spider summer teacher ticket
tomato turtle valley wagon winter wizard blanket bridge camera cheese coffee cookie cotton
diamond eagle falcon ginger harbor helmet ivory lantern mango mountain orchard pirate
shadow sugar thunder velvet walnut""".split()


def example(rng: random.Random) -> dict:
  words = rng.sample(WORDS, rng.randint(3, 5))
  return {"prompt": f"Reverse the order of the words: {' '.join(words)}\nReversed:",
          "completion": " " + " ".join(reversed(words))}


def write_splits(description: str, make, key: str, out: str, train: int, evals: int) -> None:
  """The command line of a task script: draws examples with `make(rng)`, distinct by their
  `key` field (so held-out examples never appear in training), and writes train/eval jsonl."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--out", default=out)
  parser.add_argument("--train", type=int, default=train)
  parser.add_argument("--eval", type=int, default=evals)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  rng = random.Random(args.seed)
  seen, rows = set(), []
  while len(rows) < args.train + args.eval:
    ex = make(rng)
    if ex[key] not in seen:
      seen.add(ex[key])
      rows.append(ex)
  os.makedirs(args.out, exist_ok=True)
  for name, part in (("train", rows[:args.train]), ("eval", rows[args.train:])):
    with open(os.path.join(args.out, f"{name}.jsonl"), "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in part)
  print(f"wrote {args.train} train and {args.eval} eval examples to {args.out}")


if __name__ == "__main__":
  write_splits(__doc__.split("\n")[0], example, "prompt", "data/quickstart", 2000, 64)
