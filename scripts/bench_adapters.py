"""Many adapters in one batch: the cost of per-row routing, and memory for 1 vs n adapters.

    python scripts/bench_adapters.py --json benchmarks/adapters_cpu.json

Two parts, each setting in its own process (so peak RSS is per setting):
- `layer`: one dense layer of the benchmark model (2048 tokens, 512 -> 1536, LoRA r16) with
  n = 1, 2, 4, 8 adapters, rows spread over them; jitted forward + backward (gradients of the
  adapters and of the input), median of --reps calls, for each routing of ftjax.peft.multi
  ("mask": all adapters' factors side by side, the other rows' columns zeroed; "gather": each
  row's own factors gathered, a batched matmul).
- `step`: the whole train step of scripts/bench.py's cpu-preset model (Llama-style, hidden 512,
  8 layers, vocab 32000, batch 8 x 256, fp32, AdamW, chunked loss, LoRA r16 on every
  projection) with one plain LoRA, and with 1 and 4 named adapters (rows round-robin over
  them): tokens/s (median of --steps after --warmup), peak RSS, bytes of frozen and trained
  parameters. One copy of the base: only the adapters and their optimizer state grow with n.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (scripts/bench.py: presets, timing, environment)

STEP_SETTINGS = [("lora", "mask", 1), ("adapters", "auto", 1), ("adapters", "mask", 4),
                 ("adapters", "gather", 4)]


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--parts", default="layer,step")
  p.add_argument("--counts", default="1,2,4,8", help="adapters per layer (layer part)")
  p.add_argument("--reps", type=int, default=20)
  p.add_argument("--steps", type=int, default=6)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--rounds", type=int, default=2, help="step part: alternating rounds")
  p.add_argument("--settings", default="", help="step part: kind:routing:n,... (default: all)")
  p.add_argument("--json", default="")
  p.add_argument("--worker", default="", help=argparse.SUPPRESS)
  p.add_argument("--setting", default="", help=argparse.SUPPRESS)
  p.add_argument("--model-dir", default="", help=argparse.SUPPRESS)
  p.add_argument("--out", default="", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  for k, v in bench.PRESETS["cpu"].items():
    setattr(args, k, v)
  args.seed = 0
  return args


def named(n: int, rank: int):
  from ftjax import config  # pylint: disable=import-outside-toplevel

  return {f"task{i}": config.NamedLoraConfig(targets=bench.LORA_TARGETS, r=rank, alpha=2.0 * rank)
          for i in range(n)}


def layer_worker(args) -> dict:
  """Forward + backward of one adapted dense layer, for one routing and adapter count."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from ftjax.models import layers  # pylint: disable=import-outside-toplevel
  from ftjax.peft import lora, multi  # pylint: disable=import-outside-toplevel

  routing, n = args.setting.split(":")
  n, tokens, d_in, d_out = int(n), args.batch * args.seq, args.hidden, args.ffn
  one = lora.Lora(frozenset({""}), args.rank, 2.0 * args.rank, 2.0)  # the standalone layer: path ""
  spec = multi.MultiLora(tuple((f"task{i}", one) for i in range(n)), routing)
  dense = layers.Dense(d_out, ("embed", "mlp"), peft=spec)
  x = jax.random.normal(jax.random.PRNGKey(0), (tokens, d_in))
  ids = jnp.arange(args.batch) % n
  with multi.rows(ids):
    params = dict(nn.unbox(dense.init(jax.random.PRNGKey(1), x)["params"]))
  kernel = params.pop("kernel")

  def loss(adapters, x, kernel, ids):  # every array an argument: no constant folding
    with multi.rows(ids):
      y = dense.apply({"params": {"kernel": kernel, **adapters}}, x)
    return jnp.sum(y * y)

  def timed(fn, *inputs):
    jax.block_until_ready(fn(*inputs))
    times = []
    for _ in range(args.reps):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*inputs))
      times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)

  ms = timed(jax.jit(jax.grad(loss, argnums=(0, 1))), params, x, kernel, ids)
  base_ms = timed(jax.jit(jax.grad(lambda x, k: jnp.sum(jnp.dot(x, k) ** 2))), x, kernel)
  return {"routing": routing, "adapters": n, "median_ms": ms, "base_layer_ms": base_ms}


def step_worker(args) -> dict:
  """The jitted train step of the benchmark model with one plain LoRA or n named adapters."""
  import functools  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from ftjax import assembly, config, loss, optim, sharding, step, tree  # pylint: disable=import-outside-toplevel

  kind, routing, n = args.setting.split(":")
  n = int(n)
  if kind == "lora":
    pcfg = config.PeftConfig(method="lora", lora=config.LoraConfig(
        targets=bench.LORA_TARGETS, r=args.rank, alpha=2.0 * args.rank))
  else:
    pcfg = config.PeftConfig(method="lora", adapters=named(n, args.rank))
  model = assembly.load_model(args.model_dir, pcfg, compute="fp32")
  if kind != "lora":
    spec = model.spec.__class__(model.spec.adapters, routing)
    model.module = model.module.clone(peft=spec)
  params, frozen = model.split()
  ocfg = config.OptimConfig(name="adamw", lr=1e-4, schedule="constant", clip_norm=0.0)
  tx, _ = optim.build(ocfg, 100, params, model.config.num_layers, model.family)
  state = step.init_state(params, tx, 0)
  ones = np.ones((1, args.batch, args.seq), np.int32)
  positions = np.broadcast_to(np.arange(args.seq, dtype=np.int32), ones.shape)
  ids = (np.arange(args.batch) % n).astype(np.int32).reshape(1, args.batch, 1)
  batches = [jax.device_put({"tokens": t[None], "positions": positions, "segment_ids": ones,
                             "loss_mask": ones, **({"adapter": ids} if kind != "lora" else {})})
             for t in bench.token_batches(args)]
  chunked = loss.chunked_loss(model.module, jax.numpy.float32, model.trainable)
  jitted = jax.jit(functools.partial(step.train_step, loss_fn=loss.chunked_cross_entropy(chunked),
                                     tx=tx), donate_argnums=(0,))
  holder = {"state": state}
  rss_built = bench.peak_rss_mib()
  compiled = jitted.lower(state, frozen, batches[0]).compile()
  rss_compiled = bench.peak_rss_mib()
  mem = compiled.memory_analysis()
  temp_mib = mem.temp_size_in_bytes / 2**20 if mem is not None else None

  def one(i):
    holder["state"], metrics = compiled(holder["state"], frozen, batches[i % len(batches)])
    return float(metrics["loss"])

  result = bench.timed_steps(one, args)
  with open("/proc/self/status") as f:  # resident now, after the steps (not the peak)
    rss_now = next(int(l.split()[1]) / 1024 for l in f if l.startswith("VmRSS:"))
  return {**result, "kind": kind, "routing": routing, "adapters": n, "xla_temp_mib": temp_mib,
          "peak_rss_after_load_mib": rss_built, "peak_rss_after_compile_mib": rss_compiled,
          "rss_after_steps_mib": rss_now,
          "tokens_per_s": args.batch * args.seq / result["median_step_s"],
          "frozen_mib": sharding.device_bytes(frozen) / 2**20,
          "trained_mib": sharding.device_bytes(holder["state"].params) / 2**20,
          "opt_state_mib": sharding.device_bytes(holder["state"].opt_state) / 2**20,
          "params_trainable": tree.count(holder["state"].params)}


def summarise(runs: list, settings: list) -> list:
  """Per setting, the median over rounds of tokens/s and peak RSS."""
  rows = []
  for kind, routing, n in settings:
    rs = [r for r in runs if (r["kind"], r["routing"], r["adapters"]) == (kind, routing, n)]
    rows.append({"kind": kind, "routing": routing, "adapters": n,
                 "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                 "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in rs),
                 "rss_after_steps_mib": statistics.median(r["rss_after_steps_mib"] for r in rs),
                 "peak_rss_after_compile_mib": statistics.median(
                     r["peak_rss_after_compile_mib"] for r in rs),
                 "xla_temp_mib": rs[0]["xla_temp_mib"], "frozen_mib": rs[0]["frozen_mib"],
                 "trained_mib": rs[0]["trained_mib"], "opt_state_mib": rs[0]["opt_state_mib"]})
  return rows


def make_model(args, path: str) -> None:
  import transformers  # pylint: disable=import-outside-toplevel

  transformers.set_seed(0)
  cfg = transformers.LlamaConfig(
      vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
      num_hidden_layers=args.layers, num_attention_heads=args.heads,
      num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq)
  transformers.LlamaForCausalLM(cfg).save_pretrained(path)


def run_worker(kind: str, setting: str, args) -> dict:
  with tempfile.NamedTemporaryFile(suffix=".json") as out:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--setting", setting,
           "--model-dir", args.model_dir, "--out", out.name, "--reps", str(args.reps),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--rank", str(args.rank),
           "--rounds", str(args.rounds), "--settings", args.settings]
    if subprocess.run(cmd, stdout=sys.stderr, check=False).returncode:
      raise SystemExit(f"worker failed: {' '.join(cmd)}")
    with open(out.name) as f:
      return json.load(f)


def main() -> int:
  args = parse()
  if args.worker:
    result = {"layer": layer_worker, "step": step_worker}[args.worker](args)
    result["peak_rss_mib"] = bench.peak_rss_mib()
    with open(args.out, "w") as f:
      json.dump(result, f)
    return 0
  out = {"environment": bench.environment(), "args": vars(args), "layer": [], "step": []}
  parts = args.parts.split(",")
  if "layer" in parts:
    print("layer (2048 x 512 -> 1536, r%d): routing, adapters, fwd+bwd ms (base layer ms)"
          % args.rank)
    for n in [int(c) for c in args.counts.split(",")]:
      for routing in ("mask", "gather"):
        rec = run_worker("layer", f"{routing}:{n}", args)
        out["layer"].append(rec)
        print(f"  {routing:6s} {n}  {rec['median_ms']:7.2f} ({rec['base_layer_ms']:.2f})",
              flush=True)
  if "step" in parts:
    args.model_dir = tempfile.mkdtemp(prefix="ftjax-bench-adapters-")
    make_model(args, args.model_dir)
    print("step (cpu preset, batch 8 x 256): setting, round, tok/s, peak RSS MiB, XLA temp MiB, "
          "frozen / trained / optimizer MiB")
    settings = [tuple(x.split(":")[:2]) + (int(x.split(":")[2]),)
                for x in args.settings.split(",")] if args.settings else STEP_SETTINGS
    for rnd in range(args.rounds):
      for kind, routing, n in settings[::1 if rnd % 2 == 0 else -1]:
        rec = {**run_worker("step", f"{kind}:{routing}:{n}", args), "round": rnd}
        out["step"].append(rec)
        print(f"  {kind:8s} {routing:6s} {n}  {rnd}  {rec['tokens_per_s']:7.1f}  "
              f"{rec['peak_rss_mib']:7.0f}  {rec['xla_temp_mib']:6.0f}  {rec['frozen_mib']:.1f} / "
              f"{rec['trained_mib']:.1f} / {rec['opt_state_mib']:.1f}", flush=True)
    out["step_summary"] = summarise(out["step"], settings)
    for row in out["step_summary"]:
      print("  median: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                     for k, v in row.items()))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
