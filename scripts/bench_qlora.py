"""QLoRA's memory next to LoRA's: frozen-base bytes per device and peak RSS of training steps.

    python scripts/bench_qlora.py --json benchmarks/qlora_cpu.json
    python scripts/bench_qlora.py --model-dir models/smollm2-135m-instruct --batch 4 --seq 128 \\
        --json benchmarks/qlora_smollm2_cpu.json

Each variant — LoRA (fp32 base), LoRA with `peft.base_dtype: bf16`, QLoRA (`peft.base_quant:
nf4`, double quantisation), and QLoRA with the embeddings and head quantised too
(`peft.base_quant_embeddings: true`, the rest bf16) — is one `scripts/bench.py` worker process
(LoRA r16 on every linear layer, AdamW, the benchmark model of its `cpu` preset unless
`--model-dir` names an HF model directory), so its peak RSS is its own. Reported: the frozen
weights' bytes on one device and their ratio to bf16 storage of the same weights, the peak RSS
and the median step time. Other `bench.py` flags (`--batch`, `--seq`, `--steps`, `--preset`)
pass through.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile

VARIANTS = {
    "lora": [],
    "lora_bf16": ["--base-dtype", "bf16"],
    "qlora_nf4": ["--base-quant", "nf4"],
    "qlora_nf4_all": ["--base-quant", "nf4", "--base-quant-embeddings", "--base-dtype", "bf16"],
}


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--json", default="")
  p.add_argument("--variants", default=",".join(VARIANTS))
  args, rest = p.parse_known_args()
  bench = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.py")
  rows = {}
  for name in args.variants.split(","):
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
      cmd = [sys.executable, bench, "--frameworks", "ftjax", "--modes", "lora", "--rounds", "1",
             "--steps", "4", "--warmup", "1", *rest, *VARIANTS[name], "--json", out.name]
      print(f"{name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
      subprocess.run(cmd, check=True, stdout=sys.stderr)
      with open(out.name) as f:
        run = json.load(f)["runs"][0]
    rows[name] = {k: run.get(k) for k in ("frozen_device_mib", "frozen_bf16_mib", "peak_rss_mib",
                                          "median_step_s", "losses")}
    rows[name]["frozen_over_bf16"] = run["frozen_device_mib"] / run["frozen_bf16_mib"]
  print(f"{'variant':<15}{'frozen MiB':>12}{'x bf16':>8}{'peak RSS MiB':>14}{'step s':>9}")
  for name, r in rows.items():
    print(f"{name:<15}{r['frozen_device_mib']:>12.1f}{r['frozen_over_bf16']:>8.3f}"
          f"{r['peak_rss_mib']:>14.0f}{r['median_step_s']:>9.2f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"date": datetime.date.today().isoformat(), "cores": os.cpu_count(),
                 "command": " ".join(["python"] + sys.argv), "rows": rows}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
