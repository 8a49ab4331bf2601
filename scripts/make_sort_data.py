#!/usr/bin/env python
"""Writes the second task of configs/multitask.yaml: sort a few words alphabetically.

Its words and prompt shape are the quickstart's (reverse the order of words), so the two tasks
read alike and differ in what they ask: one adapter per task keeps them apart. The files in
data/sort/ were written by this script with its defaults:

  python scripts/make_sort_data.py --out data/sort --seed 1
"""

import random

from make_quickstart_data import WORDS, write_splits


def example(rng: random.Random) -> dict:
  words = rng.sample(WORDS, rng.randint(3, 5))
  return {"prompt": f"Sort the words alphabetically: {' '.join(words)}\nSorted:",
          "completion": " " + " ".join(sorted(words))}


if __name__ == "__main__":
  write_splits(__doc__.split("\n")[0], example, "prompt", "data/sort", 1000, 64)
