"""Peak resident memory (and wall time) of one `python -m ftjax.train` run, in its own process.

    python scripts/peak_rss.py train.steps=3 eval.samples=0 eval.max_examples=8 peft.base_dtype=bf16
    python scripts/peak_rss.py --repeat 2 --json rss.jsonl --label before peft.base_dtype=fp32

Run from the repository root (the config's relative paths, e.g. `model.path`, are read from the
working directory); prepare the quickstart model once with
`python -m ftjax.prepare smollm2 --out models/smollm2-135m-instruct`. Every `key=value` word is
passed on to `ftjax.train` as an override after `--config` (default configs/quickstart.yaml).
Each repetition trains in a fresh scratch `train.output_dir` (a temporary directory, removed
afterwards) unless the overrides name one, so no run resumes from another's checkpoint.

The peak is the child's maximum resident set size as the kernel counts it (`ru_maxrss` of the
rusage `os.wait4` returns for that child; it covers the child's own waited-for children too),
in MiB. Each repetition prints one JSON line on stdout, e.g.
  {"peak_rss_mib": 1234.5, "wall_s": 41.2, "rc": 0, "overrides": [...], ...}
and, with --json FILE, appends the same line to FILE. The child's own output goes to stderr
(or nowhere with --quiet), so stdout holds only the JSON lines. The exit status is the first
non-zero status of a repetition, else 0.
"""

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time


def maxrss_mib(ru_maxrss: int) -> float:
  """`ru_maxrss` in MiB: Linux counts KiB, macOS bytes."""
  return ru_maxrss / (1024 * 1024) if sys.platform == "darwin" else ru_maxrss / 1024


def measure(config: str, overrides: list[str], quiet: bool = False) -> dict:
  """Runs `python -m ftjax.train --config CONFIG OVERRIDES...` once; its peak RSS and wall time."""
  scratch = None
  if not any(o.startswith("train.output_dir=") for o in overrides):
    scratch = tempfile.mkdtemp(prefix="ftjax-peak-rss-")
    overrides = overrides + [f"train.output_dir={os.path.join(scratch, 'run')}"]
  cmd = [sys.executable, "-m", "ftjax.train", "--config", config] + overrides
  out = subprocess.DEVNULL if quiet else sys.stderr
  try:
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=out, stderr=out)
    # wait4 gives this child's own rusage (RUSAGE_CHILDREN would be the maximum over every child
    # this process has waited for, so repetitions would mix).
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
  finally:
    if scratch is not None:
      shutil.rmtree(scratch, ignore_errors=True)
  return {"peak_rss_mib": round(maxrss_mib(usage.ru_maxrss), 1), "wall_s": round(wall, 2),
          "cpu_s": round(usage.ru_utime + usage.ru_stime, 2), "rc": child.returncode,
          "config": config, "overrides": [o for o in overrides if scratch is None
                                          or not o.startswith("train.output_dir=")]}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("overrides", nargs="*", help="key.sub=value overrides for ftjax.train")
  p.add_argument("--config", default="configs/quickstart.yaml", help="the run's YAML config")
  p.add_argument("--repeat", type=int, default=1, help="run this many times, one line each")
  p.add_argument("--json", default="", help="also append each JSON line to this file")
  p.add_argument("--label", default="", help="a tag stored in each line (e.g. before, after)")
  p.add_argument("--quiet", action="store_true", help="discard the training run's own output")
  args = p.parse_args(argv)
  if args.repeat < 1:
    p.error("--repeat must be >= 1")
  if any("=" not in o for o in args.overrides):
    p.error("overrides are key.sub=value words")
  if args.repeat > 1 and any(o.startswith("train.output_dir=") for o in args.overrides):
    p.error("--repeat > 1 with a fixed train.output_dir: later runs would resume the first")
  rc = 0
  for rep in range(args.repeat):
    result = measure(args.config, args.overrides, args.quiet)
    result.update(rep=rep, cores=os.cpu_count(),
                  time=datetime.datetime.now().isoformat(timespec="seconds"))
    if args.label:
      result["label"] = args.label
    line = json.dumps(result)
    print(line, flush=True)
    if args.json:
      with open(args.json, "a") as f:
        f.write(line + "\n")
    rc = rc or result["rc"]
  return rc


if __name__ == "__main__":
  sys.exit(main())
