"""Sources: data files and globs resolved to paths, each read as a `datasets.Dataset` of records.

jsonl and txt files are read line by line (a record per non-blank line, numbered by its line, so a
malformed line is an error of that record, not of the file); json, csv and parquet go through the
`datasets` loaders; a directory is a `save_to_disk` dataset (its `train` split if it holds several).
"""

from __future__ import annotations

import glob
import hashlib
import os

import datasets

from ftjax.config import UserError

LINE_FILES = (".jsonl", ".txt")  # read by line; their records are named by line number
LOADERS = {".json": "json", ".csv": "csv", ".parquet": "parquet"}


def resolve(patterns: list[str], what: str) -> list[str]:
  """Files and directories named by `patterns` (globs expanded, sorted), or a UserError."""
  paths = []
  for pattern in patterns:
    if glob.has_magic(pattern):
      found = sorted(glob.glob(pattern, recursive=True))
      if not found:
        raise UserError(f"{what}: pattern '{pattern}' matches no files")
      paths += found
    elif os.path.exists(pattern):
      paths.append(pattern)
    else:
      raise UserError(f"{what}: data file not found: {pattern}")
  for path in paths:
    ext = os.path.splitext(path)[1].lower()
    if not os.path.isdir(path) and ext not in LINE_FILES + tuple(LOADERS):
      raise UserError(f"{path}: unsupported data file type '{ext}' (use .jsonl, .json, .csv, "
                      ".parquet, .txt or a saved datasets directory)")
  return paths


def by_line(path: str) -> bool:
  return os.path.splitext(path)[1].lower() in LINE_FILES


def identity(path: str) -> str:
  """What the cache key knows of a source: its path, size and modification time (or, for a saved
  dataset directory, the same of each file in it)."""
  files = [path]
  if os.path.isdir(path):
    files = sorted(glob.glob(os.path.join(path, "**", "*"), recursive=True))
  parts = []
  for f in files:
    st = os.stat(f)
    parts.append(f"{os.path.abspath(f)}:{st.st_size}:{st.st_mtime_ns}")
  return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def read(path: str, text_field: str) -> datasets.Dataset:
  """The file's records: a `_line` column of raw lines (jsonl), `text_field` lines (txt), or the
  loader's typed columns. Line files also carry `_number`, the line number of each record."""
  if os.path.isdir(path):
    try:
      ds = datasets.load_from_disk(path)
    except FileNotFoundError:
      raise UserError(f"{path}: not a saved datasets directory") from None
    if isinstance(ds, datasets.DatasetDict):
      if "train" not in ds:
        raise UserError(f"{path}: saved dataset has splits {sorted(ds)}, but no 'train' split")
      ds = ds["train"]
    return ds
  ext = os.path.splitext(path)[1].lower()
  if ext in LINE_FILES:
    lines, numbers = [], []
    with open(path, "rb") as f:
      for number, raw in enumerate(f, start=1):
        try:
          line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
          raise UserError(f"{path}: line {number} is not UTF-8 text") from None
        if line.strip():
          lines.append(line)
          numbers.append(number)
    column = "_line" if ext == ".jsonl" else text_field
    table = datasets.table.InMemoryTable.from_pydict({column: lines, "_number": numbers})
    return datasets.Dataset(table, fingerprint=identity(path))
  try:
    return datasets.load_dataset(LOADERS[ext], data_files=path, split="train")
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"{path}: cannot read ({str(e).splitlines()[0]})") from None
