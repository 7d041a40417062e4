"""The examples in the library's docstrings run and print what they claim."""

import doctest
import importlib
import pkgutil

import pytest

import optax_lowrank

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(optax_lowrank.__path__, "optax_lowrank.")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
  assert result.failed == 0


def test_public_functions_are_documented():
  for name in optax_lowrank.__all__:
    obj = getattr(optax_lowrank, name)
    if callable(obj) and not isinstance(obj, type):
      doc = obj.__doc__ or ""
      for section in ("Args:", "Returns:", "Example", "References:"):
        assert section in doc, (name, section)
