#!/usr/bin/env python
"""Writes the DPO quickstart's pairs: reverse the order of a few words, preferring the reversal.

The prompts are the quickstart's (scripts/make_quickstart_data.py); `chosen` is the reversed
list, `rejected` the same words in another order (the model's typical mistakes: the words as
given, or shuffled). The files in data/preference/ were written by this script with its defaults:

  python scripts/make_preference_data.py --out data/preference
"""

import random

from make_quickstart_data import WORDS, write_splits


def pair(rng: random.Random) -> dict:
  words = rng.sample(WORDS, rng.randint(3, 5))
  wrong = list(words)
  if rng.random() < 0.5:  # half the rejected completions shuffle, half copy the words
    while wrong in (words, words[::-1]):
      rng.shuffle(wrong)
  return {"prompt": f"Reverse the order of the words: {' '.join(words)}\nReversed:",
          "chosen": " " + " ".join(reversed(words)), "rejected": " " + " ".join(wrong)}


if __name__ == "__main__":
  write_splits(__doc__.split("\n")[0], pair, "prompt", "data/preference", 512, 64)
