"""ftjax vs HF transformers (+PEFT): one model, batch, data and optimizer; alternating A/B runs.

    python scripts/bench.py --modes full,lora,prefix,prompt --rounds 3 --json bench.json
    python scripts/bench.py --preset gpu1b --modes full,lora --json bench_h100.json

A random Llama-style model is built once with transformers and saved as safetensors; the ftjax
worker loads it through `ftjax.load_model` (as `ftjax.train` does), the HF worker through
`from_pretrained`, so both start from the same weights, see the same 4 seeded batches (all tokens
trained), and start their PEFT parameters from the same numpy-drawn values (`adapter_init`):
their loss curves are comparable.
Every (framework, mode, round) runs in its own process (`--worker`), so peak RSS is per setting.
Rounds alternate the order (ftjax first, then HF first, ...). Modes: full fine-tuning; LoRA on
q,k,v,o,gate,up,down; prefix tuning (flat, no projection); prompt tuning; AdamW without clipping
at a constant lr for all. Timing: the first step (ftjax: lower + compile + run) apart, then
--warmup steps, then --steps timed steps each ended by a host sync; the median is reported.

Model FLOPs per step (PaLM, appendix B), with T = batch*seq trained tokens, N = all matmul
weights (the layers' projections plus the LM head; the embedding lookup is no matmul) and
A = 12 * layers * hidden * S * T for attention scores and values, forward and backward, counted
over the full S x S matrix (PaLM's convention, the same for both frameworks; causal kernels do
about half of it):
  full:   6*N*T + A                      (forward 2N, input gradients 2N, weight gradients 2N)
  lora:   4*N*T + A + 6*T*r*sum(in+out)  (frozen weights: forward and input gradients only)
  prefix: 4*N*T + A with S = seq + m     (every query also attends to the m prefix slots)
  prompt: 4*N_layers*T' + 4*N_head*T + A with S = T'/batch, T' = batch*(seq + m)
Prompt tuning: PEFT also trains the first real token (predicted from the last soft token), ftjax
does not, so their losses differ by that one position per row.
MFU = model FLOPs / median step time / peak, the peak measured in the same invocation by a jitted
JAX matmul in the compute dtype on the same device (best of several repetitions and shapes).
"""

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

PRESETS = {
    "cpu": dict(hidden=512, layers=8, heads=8, kv_heads=4, ffn=1536, vocab=32000, batch=8,
                seq=256, compute="fp32"),
    # Llama-3.2-1B's shape (untied head); batch 2 x 2048 fits 80 GB for both frameworks.
    "gpu1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, ffn=8192, vocab=128256, batch=2,
                  seq=2048, compute="bf16"),
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEAK_SHAPES = {"cpu": [(2048, 512, 1536), (2048, 2048, 2048)],
               "gpu": [(4096, 4096, 4096), (8192, 8192, 8192), (16384, 8192, 8192)]}


def parse(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
  for name in PRESETS["cpu"]:
    p.add_argument("--" + name.replace("_", "-"), default=None,
                   type=str if name == "compute" else int, help=f"(preset: {name})")
  p.add_argument("--modes", default="full,lora,prefix,prompt")
  p.add_argument("--frameworks", default="ftjax,hf")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--lr", type=float, default=1e-4)
  p.add_argument("--weight-decay", type=float, default=0.01)
  p.add_argument("--lora-r", type=int, default=16)
  p.add_argument("--lora-alpha", type=float, default=32.0)
  p.add_argument("--virtual-tokens", type=int, default=16, help="prefix / prompt length")
  p.add_argument("--fused-adamw", choices=["auto", "on", "off"], default="auto",
                 help="torch AdamW(fused=True); auto: on CUDA only")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--attention", choices=["auto", "xla", "cudnn"], default="auto",
                 help="ftjax model.attention")
  p.add_argument("--loss-chunk", type=int, default=0,
                 help="ftjax train.loss_chunk (0: auto, -1: whole-batch logits)")
  p.add_argument("--base-dtype", choices=["fp32", "bf16"], default="fp32",
                 help="ftjax peft.base_dtype (frozen weights of PEFT modes)")
  p.add_argument("--base-quant", choices=["none", "nf4", "int8"], default="none",
                 help="ftjax peft.base_quant (QLoRA: frozen dense kernels stored quantised)")
  p.add_argument("--base-quant-embeddings", action="store_true",
                 help="ftjax peft.base_quant_embeddings (the embedding and head too)")
  p.add_argument("--model-dir", default="", help="reuse this saved random model")
  p.add_argument("--json", default="", help="write all results here")
  p.add_argument("--wait-idle", type=float, default=0.0,
                 help="before each run, wait up to this many seconds for other load to go away")
  p.add_argument("--worker", default="", help=argparse.SUPPRESS)  # ftjax | hf | make | peak
  p.add_argument("--mode", default="", help=argparse.SUPPRESS)
  p.add_argument("--out", default="", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  for key, value in PRESETS[args.preset].items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  if args.compute not in ("fp32", "bf16"):
    p.error("--compute: fp32 or bf16")
  return args


def log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def token_batches(args, n: int = 4) -> list:
  """The seeded (batch, seq) int32 token arrays both frameworks train on, in turn."""
  rng = np.random.default_rng(args.seed + 1)
  return [rng.integers(0, args.vocab, (args.batch, args.seq), dtype=np.int32) for _ in range(n)]


def adapter_init(mode: str, shapes: dict, seed: int) -> dict:
  """Initial PEFT values by canonical name ('layers.0.self_attn.q_proj' -> LoRA A as (in, r);
  'prefix' (m, layers*2*kv_width), N(0, 1) like PEFT; 'prompt' (m, hidden), N(0, 0.02)); LoRA B
  stays zero, PEFT's init (A ~ U(+-1/sqrt(in)), torch's kaiming-uniform)."""
  rng = np.random.default_rng(seed + 2)
  out = {}
  for name in sorted(shapes):
    shape = shapes[name]
    if mode == "lora":
      bound = 1 / np.sqrt(shape[0])
      out[name] = rng.uniform(-bound, bound, shape).astype(np.float32)
    else:
      out[name] = rng.normal(0.0, 1.0 if mode == "prefix" else 0.02, shape).astype(np.float32)
  return out


def model_flops(args, mode: str) -> float:
  """Model FLOPs of one training step (see the module docstring)."""
  hd = args.hidden // args.heads
  q, kv = args.heads * hd, args.kv_heads * hd
  per_layer = args.hidden * (2 * q + 2 * kv) + 3 * args.hidden * args.ffn
  n_layers, n_head = args.layers * per_layer, args.hidden * args.vocab
  t, m = args.batch * args.seq, args.virtual_tokens
  attention = lambda s, tokens: 12 * args.layers * q * s * tokens
  if mode == "full":
    return 6 * (n_layers + n_head) * t + attention(args.seq, t)
  if mode == "lora":
    dims = [(args.hidden, q), (args.hidden, kv), (args.hidden, kv), (q, args.hidden)]
    dims += [(args.hidden, args.ffn)] * 2 + [(args.ffn, args.hidden)]
    lora = 6 * t * args.lora_r * sum(i + o for i, o in dims) * args.layers
    return 4 * (n_layers + n_head) * t + attention(args.seq, t) + lora
  if mode == "prefix":
    return 4 * (n_layers + n_head) * t + attention(args.seq + m, t)
  t_all = args.batch * (args.seq + m)
  return 4 * n_layers * t_all + 4 * n_head * t + attention(args.seq + m, t_all)


def _busy_cores() -> float:
  """Busy core-seconds of the whole machine so far (from /proc/stat)."""
  with open("/proc/stat") as f:
    fields = [float(x) for x in f.readline().split()[1:8]]
  return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def timed_steps(step, args) -> dict:
  """Runs `step(i) -> loss` (synchronised) for warmup + steps; the first step is timed apart.

  Each step also records the cores other processes kept busy meanwhile (`foreign`): on a shared
  machine the median is taken over the steps with foreign < 0.15 cores when there are at least
  3 of them, else over all (and `clean_steps` says how many were clean).
  """
  losses, times, cpu, foreign = [], [], [], []
  for i in range(1 + args.warmup + args.steps):
    t0, c0, b0 = time.perf_counter(), time.process_time(), _busy_cores()
    losses.append(step(i))
    times.append(time.perf_counter() - t0)
    mine = time.process_time() - c0
    cpu.append(mine / times[-1])
    foreign.append(max(_busy_cores() - b0 - mine, 0.0) / times[-1])
    log(f"    step {i:2d} {times[-1]:8.3f}s loss {losses[-1]:.5f} cpu/wall {cpu[-1]:.2f} "
        f"others {foreign[-1]:.2f}")
  n = 1 + args.warmup
  timed = times[n:]
  clean = [t for t, o in zip(timed, foreign[n:]) if o < 0.15]
  return {"first_step_s": times[0], "step_times_s": timed, "foreign_cores": foreign[n:],
          "median_step_s": statistics.median(clean if len(clean) >= 3 else timed),
          "clean_steps": len(clean), "median_all_steps_s": statistics.median(timed),
          "losses": losses, "cpu_over_wall": statistics.median(cpu[n:]),
          "loadavg": open("/proc/loadavg").read().split()[:3]}


def busy_fraction(seconds: float = 1.0) -> float:
  """The fraction of all cores busy over `seconds` (from /proc/stat)."""
  def sample():
    with open("/proc/stat") as f:
      fields = [float(x) for x in f.readline().split()[1:]]
    return sum(fields), fields[3] + fields[4]  # total, idle + iowait
  (t0, i0), _, (t1, i1) = sample(), time.sleep(seconds), sample()
  return 1 - (i1 - i0) / max(t1 - t0, 1e-9)


def wait_for_idle(limit_s: float) -> None:
  """On a shared machine, waits (up to `limit_s`) until other processes leave the cores idle."""
  start = time.perf_counter()
  while limit_s > 0 and (busy := busy_fraction()) > 0.1:
    if time.perf_counter() - start > limit_s:
      log(f"  warning: cores still {100 * busy:.0f}% busy after {limit_s:.0f} s; measuring anyway")
      return
    time.sleep(4)


# ---- workers ---------------------------------------------------------------------------------

def _ftjax_params(args, model_dir: str):
  """(model, params) built by `ftjax.assembly.load_model`, as ftjax.train builds it, with the
  adapters initialised as the HF worker initialises its own."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from ftjax import assembly, config, tree  # pylint: disable=import-outside-toplevel

  pcfg = config.PeftConfig(
      method=args.mode if args.mode != "full" else "none", base_dtype=args.base_dtype,
      base_quant=args.base_quant, base_quant_embeddings=args.base_quant_embeddings,
      lora=config.LoraConfig(targets=LORA_TARGETS, r=args.lora_r, alpha=args.lora_alpha),
      prefix=config.PrefixConfig(length=args.virtual_tokens, projection=False),
      prompt=config.PromptConfig(length=args.virtual_tokens, init="random"))
  model = assembly.load_model(model_dir, pcfg, compute=args.compute, seed=args.seed,
                              attention=args.attention)
  flat = tree.flatten(model.params)
  names = {p: p.rsplit("/", 1)[0].replace("layers_", "layers.").replace("/", ".")
           for p in flat if p.endswith("/lora_a")}
  names.update({p: p.split("/")[0] for p in ("prefix/kv", "prompt/embedding") if p in flat})
  init = adapter_init(args.mode, {n: flat[p].shape for p, n in names.items()}, args.seed)
  flat.update({p: jnp.asarray(init[n], flat[p].dtype) for p, n in names.items()})
  return model, tree.unflatten(flat)


def ftjax_worker(args) -> dict:
  """One ftjax setting: the jitted `step.train_step` on (1, B, L) batches, as ftjax.train runs
  it."""
  import functools  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from ftjax import config, loss, optim, step, tree  # pylint: disable=import-outside-toplevel

  from ftjax import sharding  # pylint: disable=import-outside-toplevel
  sharding.return_compiler_memory()  # as ftjax.train does
  dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[args.compute]
  model, params = _ftjax_params(args, args.model_dir)
  module, trainable = model.module, model.trainable
  params, frozen = tree.split(params, trainable)
  ocfg = config.OptimConfig(name="adamw", lr=args.lr, schedule="constant", no_decay=[],
                            weight_decay=args.weight_decay, clip_norm=0.0)
  total = 1 + args.warmup + args.steps
  tx, _ = optim.build(ocfg, total, params, model.config.num_layers, model.family)
  state = step.init_state(params, tx, args.seed)
  rss_built = peak_rss_mib()

  ones = np.ones((1, args.batch, args.seq), np.int32)
  positions = np.broadcast_to(np.arange(args.seq, dtype=np.int32), ones.shape)
  batches = [jax.device_put({"tokens": t[None], "positions": positions, "segment_ids": ones,
                             "loss_mask": ones}) for t in token_batches(args)]
  chunked = (loss.chunked_loss(module, dtype, trainable, args.loss_chunk)
             if args.loss_chunk >= 0 else None)  # the loss ftjax.train.loss_for picks
  loss_fn = loss.chunked_cross_entropy(chunked) if chunked else \
      loss.cross_entropy(loss.logits_fn(module))
  jitted = jax.jit(functools.partial(step.train_step, loss_fn=loss_fn, tx=tx), donate_argnums=(0,))
  holder = {"state": state}
  compiled, info = None, {}

  def one(i):
    nonlocal compiled
    if compiled is None:
      t0 = time.perf_counter()
      compiled = jitted.lower(holder["state"], frozen, batches[0]).compile()
      info["compile_s"] = time.perf_counter() - t0
      cost = compiled.cost_analysis()
      cost = cost[0] if isinstance(cost, list) else cost
      info["xla_flops"] = float((cost or {}).get("flops", -1))
      mem = compiled.memory_analysis()
      if mem is not None:
        info["xla_memory_mib"] = {k: getattr(mem, k + "_size_in_bytes") / 2**20 for k in
                                  ("argument", "output", "temp", "generated_code")}
    holder["state"], metrics = compiled(holder["state"], frozen, batches[i % len(batches)])
    return float(metrics["loss"])

  result = timed_steps(one, args)
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  frozen_leaves = tree.flatten(frozen).values()
  info["frozen_device_mib"] = sharding.device_bytes(frozen) / 2**20
  info["frozen_bf16_mib"] = sum(2 * int(np.prod(v.shape)) for v in frozen_leaves) / 2**20
  return {**result, **info, "rss_after_build_mib": rss_built,
          "params_total": tree.count(params) + tree.count(frozen),
          "params_trainable": tree.count(params), "device": str(device.device_kind),
          "peak_device_mib": stats.get("peak_bytes_in_use", 0) / 2**20 or None}


def peak_worker(args) -> dict:
  """The best matmul FLOP/s of a jitted JAX matmul in the compute dtype on this device."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[args.compute]
  kind = "cpu" if jax.default_backend() == "cpu" else "gpu"
  best, shapes = 0.0, {}
  matmul = jax.jit(jnp.dot)
  for m, k, n in PEAK_SHAPES[kind]:
    x = jax.random.normal(jax.random.PRNGKey(0), (m, k), dtype)
    y = jax.random.normal(jax.random.PRNGKey(1), (k, n), dtype)
    matmul(x, y).block_until_ready()
    reps, rates = 4 if kind == "cpu" else 20, []
    for _ in range(5):
      t0 = time.perf_counter()
      for _ in range(reps):
        z = matmul(x, y)
      z.block_until_ready()
      rates.append(2 * m * k * n * reps / (time.perf_counter() - t0))
    shapes[f"{m}x{k}x{n}"] = max(rates)
    best = max(best, max(rates))
    log(f"  peak {m}x{k}x{n} {args.compute}: {max(rates) / 1e9:.1f} GFLOP/s")
  return {"peak_flops": best, "by_shape": shapes, "device": str(jax.devices()[0].device_kind),
          "backend": jax.default_backend()}


# ---- the parent: rounds, table, JSON ---------------------------------------------------------

def run_worker(kind: str, args, mode: str = "") -> dict:
  here = os.path.dirname(os.path.abspath(__file__))
  script = os.path.join(here, "bench_hf.py" if kind in ("hf", "make") else "bench.py")
  with tempfile.NamedTemporaryFile(suffix=".json") as out:
    cmd = [sys.executable, script, *sys.argv[1:], "--worker", kind, "--mode", mode,
           "--model-dir", args.model_dir, "--out", out.name]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=sys.stderr, check=False)
    if proc.returncode:
      raise SystemExit(f"worker {kind} {mode} failed (exit {proc.returncode}): {' '.join(cmd)}")
    with open(out.name) as f:
      return {**json.load(f), "wall_s": time.perf_counter() - t0}


def environment() -> dict:
  env = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
         "command": " ".join([sys.executable] + sys.argv), "host": platform.node(),
         "python": platform.python_version(), "cores": os.cpu_count()}
  with open("/proc/cpuinfo") as f:
    env["cpu"] = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
  for pkg in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "peft"):
    try:
      from importlib.metadata import version  # pylint: disable=import-outside-toplevel
      env[pkg] = version(pkg)
    except Exception:  # pylint: disable=broad-except
      env[pkg] = None
  return env


def summarise(args, runs: list, peak: dict) -> dict:
  """Per mode and framework: medians over rounds, MFU, and the ftjax/HF ratios."""
  out = {}
  for mode in args.modes.split(","):
    row = {}
    for fw in args.frameworks.split(","):
      rs = [r for r in runs if r["mode"] == mode and r["framework"] == fw]
      if not rs:
        continue
      med = lambda key, rs=rs: statistics.median(r[key] for r in rs if r.get(key) is not None) \
          if any(r.get(key) is not None for r in rs) else None
      step_s = med("median_step_s")
      flops = model_flops(args, mode)
      row[fw] = {"step_s": step_s, "tokens_per_s": args.batch * args.seq / step_s,
                 "peak_rss_mib": med("peak_rss_mib"), "first_step_s": med("first_step_s"),
                 "compile_s": med("compile_s"), "peak_device_mib": med("peak_device_mib"),
                 "model_flops": flops, "mfu": flops / step_s / peak["peak_flops"],
                 "clean_steps": sum(r["clean_steps"] for r in rs), "steps": args.steps * len(rs),
                 "losses": rs[0]["losses"]}
    if "ftjax" in row and "hf" in row:
      a, b = row["ftjax"], row["hf"]
      diff = [abs(x - y) for x, y in zip(a["losses"], b["losses"])]
      row["ratio"] = {"tokens_per_s": a["tokens_per_s"] / b["tokens_per_s"],
                      "peak_rss": a["peak_rss_mib"] / b["peak_rss_mib"],
                      "loss_max_abs_diff_first5": max(diff[:5]), "loss_max_abs_diff": max(diff)}
      if a["peak_device_mib"] and b["peak_device_mib"]:
        row["ratio"]["peak_device"] = a["peak_device_mib"] / b["peak_device_mib"]
    out[mode] = row
  return out


def table(summary: dict) -> str:
  f = lambda x, spec: "-" if x is None else format(x, spec)
  pair = lambda row, key, spec, scale=1.0: "/".join(
      f(row[fw][key] * scale if row.get(fw) and row[fw][key] is not None else None, spec)
      for fw in ("ftjax", "hf"))
  lines = ["mode   | ftjax tok/s | HF tok/s | ratio | step ms ftjax/HF | peak RSS MiB ftjax/HF "
           "| ratio | first step s ftjax/HF (compile) | MFU % ftjax/HF | loss |d| 5 steps"
           " | peak dev MiB | clean steps"]
  for mode, row in summary.items():
    ratio = row.get("ratio", {})
    tok = lambda fw, row=row: f(row[fw]["tokens_per_s"], ".1f") if fw in row else "-"
    compile_s = f(row.get("ftjax", {}).get("compile_s"), ".1f")
    lines.append(
        f"{mode:6s} | {tok('ftjax'):>11s} | {tok('hf'):>8s} |"
        f" {f(ratio.get('tokens_per_s'), '.2f'):>5s} | {pair(row, 'step_s', '.0f', 1e3):>16s} |"
        f" {pair(row, 'peak_rss_mib', '.0f'):>21s} | {f(ratio.get('peak_rss'), '.2f'):>5s} |"
        f" {pair(row, 'first_step_s', '.1f'):>20s} ({compile_s}) |"
        f" {pair(row, 'mfu', '.1f', 100):>14s} | {f(ratio.get('loss_max_abs_diff_first5'), '.1e')}"
        f" | {pair(row, 'peak_device_mib', '.0f')} | {pair(row, 'clean_steps', '.0f')}")
  return "\n".join(lines)


def main() -> int:
  args = parse()
  if args.worker:
    args.model_dir = args.model_dir or ""
    result = {"ftjax": ftjax_worker, "peak": peak_worker}[args.worker](args)
    result.update(framework=args.worker, mode=args.mode, peak_rss_mib=peak_rss_mib())
    with open(args.out, "w") as f:
      json.dump(result, f)
    return 0
  if not args.model_dir:
    args.model_dir = tempfile.mkdtemp(prefix="ftjax-bench-model-")
    log(f"building the random model in {args.model_dir}")
    run_worker("make", args)
  wait_for_idle(args.wait_idle)
  log("measuring the matmul peak")
  peak = run_worker("peak", args)
  runs = []
  frameworks = args.frameworks.split(",")
  for rnd in range(args.rounds):
    for mode in args.modes.split(","):
      for fw in frameworks if rnd % 2 == 0 else frameworks[::-1]:
        wait_for_idle(args.wait_idle)
        log(f"round {rnd} {mode} {fw}")
        rec = run_worker(fw, args, mode)
        rec["round"] = rnd
        runs.append(rec)
        log(f"  {fw} {mode}: {args.batch * args.seq / rec['median_step_s']:.1f} tok/s, first "
            f"step {rec['first_step_s']:.1f} s, peak RSS {rec['peak_rss_mib']:.0f} MiB, cpu/wall "
            f"{rec['cpu_over_wall']:.2f}, {rec['clean_steps']}/{args.steps} steps clean")
  summary = summarise(args, runs, peak)
  print(f"{args.preset} config: hidden {args.hidden}, {args.layers} layers, {args.heads}/"
        f"{args.kv_heads} heads, FFN {args.ffn}, vocab {args.vocab}, batch {args.batch} x "
        f"{args.seq}, {args.compute}; {args.rounds} rounds x {args.steps} steps; matmul peak "
        f"{peak['peak_flops'] / 1e9:.1f} GFLOP/s ({peak['device']})")
  print(table(summary))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"environment": environment(), "args": vars(args), "peak": peak,
                 "summary": summary, "runs": runs}, f, indent=1)
    log(f"wrote {args.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
