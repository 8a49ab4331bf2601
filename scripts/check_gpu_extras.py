"""Checks that `pip install ".[cuda12]"` / `".[cuda13]"` would install JAX's CUDA plugin for the
jax that ftjax pins, by asking pip to resolve them (`--dry-run --report`): pip reads the
packages' metadata and downloads no CUDA wheel. Run by .ci/run; exits 1 naming what is wrong.

    python scripts/check_gpu_extras.py [--extras cuda12,cuda13]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pinned_jax() -> str:
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    deps = tomllib.load(f)["project"]["dependencies"]
  (pin,) = [m.group(1) for d in deps if (m := re.fullmatch(r"jax==([\w.]+)", d))]
  return pin


def resolve(extra: str) -> dict[str, str]:
  """{package: version} that pip would install for ftjax[extra] into an empty environment."""
  with tempfile.TemporaryDirectory() as tmp:
    report = os.path.join(tmp, "report.json")
    subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet",
                    "--ignore-installed", "--report", report, f"{REPO}[{extra}]"],
                   check=True, stdout=subprocess.DEVNULL)
    with open(report) as f:
      items = json.load(f)["install"]
  return {re.sub(r"[-_.]+", "-", i["metadata"]["name"]).lower(): i["metadata"]["version"]
          for i in items}


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--extras", default="cuda12,cuda13")
  args = parser.parse_args()
  jax = pinned_jax()
  problems = []
  for extra in args.extras.split(","):
    got = resolve(extra)
    cuda = extra.removeprefix("cuda")
    want = {"jax": jax, "jaxlib": jax, f"jax-cuda{cuda}-plugin": jax,
            f"jax-cuda{cuda}-pjrt": jax}
    for name, version in want.items():
      if got.get(name) != version:
        problems.append(f"ftjax[{extra}] resolves {name} to {got.get(name)}, want {version}")
    libraries = sorted(n for n in got if n.startswith("nvidia-") and n.endswith(f"-cu{cuda}"))
    if not libraries:
      problems.append(f"ftjax[{extra}] brings no nvidia-*-cu{cuda} libraries")
    print(f"ftjax[{extra}]: jax {got.get('jax')}, jaxlib {got.get('jaxlib')}, "
          f"jax-cuda{cuda}-plugin {got.get(f'jax-cuda{cuda}-plugin')}, "
          f"{len(libraries)} CUDA libraries ({', '.join(libraries[:3])}, ...)")
  for p in problems:
    print(f"error: {p}", file=sys.stderr)
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main())
