"""Runs the README's quickstart commands exactly as written, each in a new virtual environment,
as a new user would (CI runs this before the tests, so a missing install step fails CI).

    python scripts/readme_commands.py --check quickstart classify dpo [--keep]

A command is the first ```bash block after its bold heading (`**Quickstart**`,
`**Classification quickstart**`, `**Preference quickstart**`). Only overrides that shorten the
run are appended (fewer steps, fewer generated samples, a scratch output directory); the
install and prepare steps run as written. Exits 1 naming the command that failed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADINGS = {"quickstart": "**Quickstart**", "classify": "**Classification quickstart**",
            "dpo": "**Preference quickstart**"}
SHORTER = {"quickstart": "train.steps=8 eval.samples=4",
           "classify": "train.steps=8",
           "dpo": "train.steps=6 eval.every=3"}


def command(name: str, readme: str) -> str:
  """The one-line command of the README's block under HEADINGS[name]."""
  start = readme.index(HEADINGS[name])
  block = re.search(r"```bash\n(.*?)\n```", readme[start:], re.S)
  lines = [l for l in block.group(1).splitlines() if l.strip() and not l.startswith("#")]
  if len(lines) != 1:
    raise SystemExit(f"README.md: the {HEADINGS[name]} block should hold one command line")
  return lines[0]


def copy_tree(scratch: str) -> str:
  """A copy of the working tree as git sees it (tracked and untracked files, none it ignores:
  no prepared models, runs or build files), as a fresh clone would be."""
  out = os.path.join(scratch, "repo")
  shutil.rmtree(out, ignore_errors=True)
  files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                         check=True, capture_output=True).stdout.decode().split("\0")
  for f in filter(None, files):
    if os.path.isfile(os.path.join(REPO, f)):
      os.makedirs(os.path.dirname(os.path.join(out, f)), exist_ok=True)
      shutil.copy2(os.path.join(REPO, f), os.path.join(out, f))
  return out


def run_fresh(name: str, line: str, scratch: str) -> None:
  """Runs `line` in a copy of the working tree with a new venv's python and pip first on
  PATH."""
  tree = copy_tree(scratch)
  venv = os.path.join(scratch, f"venv-{name}")
  subprocess.run([sys.executable, "-m", "venv", venv], check=True)
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  env.update(PIP_QUIET="1", VIRTUAL_ENV=venv,
             PATH=os.path.join(venv, "bin") + os.pathsep + env["PATH"])
  full = f"{line} {SHORTER[name]} train.output_dir={os.path.join(scratch, 'run-' + name)}"
  print(f"$ {full}", flush=True)
  began = time.time()
  proc = subprocess.run(["bash", "-c", full], cwd=tree, env=env)
  if proc.returncode:
    raise SystemExit(f"error: the README's {HEADINGS[name]} command failed (exit "
                     f"{proc.returncode}) in a fresh virtual environment")
  print(f"README {HEADINGS[name]}: passed in {time.time() - began:.0f} s", flush=True)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--check", nargs="+", choices=sorted(HEADINGS), required=True)
  parser.add_argument("--keep", action="store_true", help="keep the venvs and runs")
  args = parser.parse_args()
  with open(os.path.join(REPO, "README.md")) as f:
    readme = f.read()
  scratch = tempfile.mkdtemp(prefix="ftjax-readme-")
  try:
    for name in args.check:
      run_fresh(name, command(name, readme), scratch)
  finally:
    if not args.keep:
      shutil.rmtree(scratch, ignore_errors=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
