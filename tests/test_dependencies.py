"""The library needs jax, optax and numpy only; flax and orbax belong to models/ and train/."""

import pathlib
import subprocess
import sys

import pytest


def test_library_imports_neither_flax_nor_orbax():
  code = ("import sys, optax_lowrank; "
          "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('flax', 'orbax')); "
          "print(bad); sys.exit(1 if bad else 0)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stdout + out.stderr


def test_pyproject_runtime_dependencies():
  tomllib = pytest.importorskip("tomllib")  # the standard library from Python 3.11
  with open(pathlib.Path(__file__).parents[1] / "pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
  names = {d.split(">")[0].split("=")[0].split("<")[0].strip()
           for d in project["dependencies"]}
  assert names == {"jax", "optax", "numpy"}, names
  train = " ".join(project["optional-dependencies"]["train"])
  assert "flax" in train and "orbax-checkpoint" in train
