"""The Python examples of the README and of docs/frameworks.md run as written."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FRAMEWORKS = ROOT / "docs" / "frameworks.md"


def _blocks(path):
  return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


BLOCKS = _blocks(README)
FRAMEWORK_BLOCKS = _blocks(FRAMEWORKS)


@pytest.mark.parametrize("source", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(source):
  exec(compile(source, str(README), "exec"), {})


def test_readme_has_examples():
  assert len(BLOCKS) >= 2


@pytest.mark.parametrize("source", FRAMEWORK_BLOCKS,
                         ids=[f"block{i}" for i in range(len(FRAMEWORK_BLOCKS))])
def test_frameworks_page_example_runs(source):
  exec(compile(source, str(FRAMEWORKS), "exec"), {})


def test_frameworks_page_has_an_example_per_framework():
  text = "\n".join(FRAMEWORK_BLOCKS)
  for entry in ("nnx.Optimizer", "flax.linen", "eqx.filter", "inject_hyperparams",
                "GaLoreDimensionNumbers"):
    assert entry in text, entry
