"""Micro-benchmarks behind two issue-20 choices, on this machine's JAX backend.

    python scripts/bench_head.py head --against ad755be   # the chunked head, now vs a revision
    python scripts/bench_head.py fused                    # fused q/k/v and gate/up projections

`head`: forward and backward of `loss.chunked_token_losses` on SmolLM2-135M's head shape (8 rows
x 256, hidden 576, vocab 49152), rows packed with prompt/answer spans (answers trained, ~44% of
positions), frozen and trained head; the current code against `ftjax/loss.py` of a git revision
(loaded from `git show`). `fused`: forward and backward of one layer's q/k/v (512 -> 512/256/256)
and gate/up (512 -> 1536 x 2) products on 2048 x 512 activations, three (two) matmuls against one
on the concatenated kernels, split after. Medians of alternating repetitions, in ms.
"""

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from ftjax import loss  # noqa: E402


def median_ms(fns: dict, args: tuple, reps: int) -> dict:
  """Each jitted fn's median time (ms) over `reps` alternating calls, after one warm-up call."""
  for f in fns.values():
    jax.block_until_ready(f(*args))
  times = {name: [] for name in fns}
  for _ in range(reps):
    for name, f in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(f(*args))
      times[name].append(time.perf_counter() - start)
  return {name: round(1e3 * float(np.median(t)), 1) for name, t in times.items()}


def loss_module_at(rev: str):
  """`ftjax/loss.py` as it was at git revision `rev`, imported as a module."""
  text = subprocess.run(["git", "show", f"{rev}:ftjax/loss.py"], cwd=REPO, check=True,
                        capture_output=True, text=True).stdout
  path = os.path.join(tempfile.mkdtemp(), "loss_at_rev.py")
  with open(path, "w") as f:
    f.write(text)
  spec = importlib.util.spec_from_file_location("loss_at_rev", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # its dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


def head(args) -> None:
  b, l, d, v = 8, 256, 576, 49152
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(size=(b, l, d)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(d, v)) * 0.02, jnp.float32)
  mask = np.zeros((b, l), np.int32)
  for row in range(b):  # packed rows: a prompt, then its trained answer, until the row is full
    at = 0
    while at < l:
      p, a = rng.integers(14, 120), rng.integers(7, 110)
      mask[row, at + p:at + p + a] = 1
      at += p + a
  batch = {"tokens": rng.integers(0, v, (b, l)).astype(np.int32), "loss_mask": mask,
           "segment_ids": np.ones((b, l), np.int32)}
  chunk = 2**26 // (4 * v) // 8 * 8  # the CPU default of loss.chunked_loss
  print(f"trained fraction {mask[:, 1:].mean():.2f}, chunk {chunk}")
  versions = {"now": loss, args.against: loss_module_at(args.against)}
  for kernel_grad in (False, True):
    fns = {name: jax.jit(jax.grad(
        lambda h, k, m=m, g=kernel_grad: m.chunked_token_losses(h, k, batch, chunk, jnp.float32,
                                                                  g)[0],
        argnums=(0, 1))) for name, m in versions.items()}
    print("trained head" if kernel_grad else "frozen head", median_ms(fns, (h, kernel), args.reps))


def fused(args) -> None:
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2048, 512)), jnp.float32)
  for label, widths in [("q/k/v", [512, 256, 256]), ("gate/up", [1536, 1536])]:
    ws = [jnp.asarray(rng.normal(size=(512, n)) * 0.02, jnp.float32) for n in widths]

    def apart(x, ws):
      return sum(jnp.sum(jnp.tanh(x @ w)) for w in ws)

    def fused_fn(x, ws, widths=widths):
      y = x @ jnp.concatenate(ws, axis=1)
      return sum(jnp.sum(jnp.tanh(p)) for p in jnp.split(y, np.cumsum(widths)[:-1], axis=1))

    fns = {name: jax.jit(jax.grad(f, argnums=(0, 1)))
           for name, f in [("apart", apart), ("fused", fused_fn)]}
    print(label, median_ms(fns, (x, ws), args.reps))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("what", choices=["head", "fused"])
  p.add_argument("--against", default="ad755be", help="head: the git revision to compare with")
  p.add_argument("--reps", type=int, default=5)
  args = p.parse_args()
  head(args) if args.what == "head" else fused(args)


if __name__ == "__main__":
  main()
