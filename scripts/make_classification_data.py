#!/usr/bin/env python
"""Writes the classification quickstart task: the topic of a short sentence (4 labels).

Sentences are built from templates, topic words and shared filler, so the label is never one
fixed word. An encoder with a fresh classification head starts near chance (25%); a short
fine-tune learns it. The files in data/topics/ were written by this script with its defaults:

  python scripts/make_classification_data.py --out data/topics
"""

import random

from make_quickstart_data import write_splits

TOPICS = {
    "sports": "the match|the final|our striker|the goalkeeper|the coach|the marathon|the league|"
              "a penalty kick|the relay team|the tennis player|the home crowd|the referee",
    "food": "the soup|the chef|fresh bread|the curry|a ripe mango|the bakery|the pasta sauce|"
            "dessert|the grilled fish|the spice market|the dumplings|breakfast",
    "weather": "the storm|heavy rain|the forecast|a cold front|the fog|the heatwave|thunder|"
               "the snowfall|strong wind|the humidity|the sunny spell|a hail shower",
    "technology": "the new phone|the software update|the laptop|the server|the app|the robot|"
                  "the chip maker|the battery|the network|the database|the startup|the compiler",
}
TEMPLATES = [
    "{a} surprised everyone {when}.", "I heard that {a} was the talk of the town {when}.",
    "{when}, {a} and {b} made the news.", "Nobody expected {a} to matter so much {when}.",
    "People kept talking about {a} {when}.", "{a} was better than {b} {when}, they said.",
    "My neighbour complained about {a} {when}.", "According to the report, {a} changed {when}.",
]
WHEN = ["yesterday", "last weekend", "this morning", "all week", "on Monday", "after lunch",
        "in the city", "at the festival", "during the holidays", "again"]


def example(rng: random.Random) -> dict:
  label = rng.choice(sorted(TOPICS))
  a, b = rng.sample(TOPICS[label].split("|"), 2)
  text = rng.choice(TEMPLATES).format(a=a, b=b, when=rng.choice(WHEN))
  return {"text": text[0].upper() + text[1:], "label": label}


if __name__ == "__main__":
  write_splits(__doc__.split("\n")[0], example, "text", "data/topics", 800, 200)
