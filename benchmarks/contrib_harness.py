"""optax's contrib test harness, run on each rank-taking alias in place of its galore.

optax ships the common tests of its contributed optimizers in the wheel
(``optax/contrib/_common_test.py``): jit without recompilation, extra
arguments, ``optax.tree.map_params``, convergence on four small problems (30 000
steps), ``optax.inject_hyperparams``, dtype preservation, ``optax.MultiSteps``,
state stability under ``lax.cond`` for float16 to float64, learning-rate
schedules. They are parameterized over a list of optimizers in which
``optax.contrib.galore`` appears as ``{'opt_name': 'galore', 'opt_kwargs':
{'learning_rate': 1e-2, 'rank': 8}}``. This script runs, from the installed
wheel, every harness test of that entry with one of our aliases substituted for
``optax.contrib.galore`` (the harness's ``_get_opt_factory("galore")`` returns
the alias; arguments, problems and tolerances are the harness's own), for every
alias of ``optax_lowrank.optimizers`` that takes a ``rank`` (``frugal`` takes a
``density`` instead), and prints a table of pass / FAIL / skip per test::

  python benchmarks/contrib_harness.py [alias ...]

``tests/test_contrib_harness.py`` runs the same for a few representative
aliases.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import re
import sys
import time
import unittest
import warnings

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import optax_lowrank  # noqa: E402  pylint: disable=g-import-not-at-top

HARNESS = "optax.contrib._common_test"
SUBSTITUTED = "galore"  # the harness entry our aliases stand in for


def harness():
  """The harness module of the installed optax wheel."""
  return importlib.import_module(HARNESS)


def rank_taking() -> list[str]:
  """The registered aliases that take a ``rank`` (the harness passes one)."""
  return [name for name, factory in optimizers().items()
          if "rank" in inspect.signature(factory).parameters]


def optimizers() -> dict:
  return dict(optax_lowrank.optimizers)


def harness_tests(module) -> list[str]:
  """The ``ContribTest`` methods parameterized with the substituted entry."""
  names = unittest.TestLoader().getTestCaseNames(module.ContribTest)
  return [n for n in names
          if f"opt_name='{SUBSTITUTED}'" in _params(module, n)]


def _params(module, name: str) -> str:
  return str(getattr(getattr(module.ContribTest, name), "__x_params_repr__", ""))


def label(module, name: str) -> str:
  """``test_optimizers[rosenbrock]``: the method and its varying parameters."""
  params = _params(module, name)
  base = re.sub(r"\d+$", "", name)
  parts = re.findall(r"target=<function _setup_(\w+)", params)
  parts += re.findall(r"dtype=(?:<class ')?'?(?:jax\.numpy\.)?(\w+)", params)
  parts += [f"wrap={w}" for w in re.findall(r"wrap=(True|False)", params)]
  return f"{base}[{','.join(parts)}]" if parts else base


@contextlib.contextmanager
def substituted(module, factory):
  """The harness's ``_get_opt_factory`` returns ``factory`` for its galore."""
  original = module._get_opt_factory  # pylint: disable=protected-access

  def get(opt_name):
    return factory if opt_name == SUBSTITUTED else original(opt_name)

  module._get_opt_factory = get  # pylint: disable=protected-access
  try:
    yield
  finally:
    module._get_opt_factory = original  # pylint: disable=protected-access


class _Result(unittest.TestResult):
  """Records each test's outcome, sub-tests' failures included."""

  def __init__(self):
    super().__init__()
    self.outcome: dict[str, tuple[str, str]] = {}

  def _name(self, test) -> str:
    return getattr(test, "test_case", test)._testMethodName  # pylint: disable=protected-access

  def _set(self, test, status, detail=""):
    name = self._name(test)
    if self.outcome.get(name, ("pass",))[0] == "pass":
      self.outcome[name] = (status, detail)

  def addSuccess(self, test):
    self.outcome.setdefault(self._name(test), ("pass", ""))

  def addSkip(self, test, reason):
    self._set(test, "skip", reason)

  def addFailure(self, test, err):
    self._set(test, "FAIL", _last_line(err))

  def addError(self, test, err):
    self._set(test, "FAIL", _last_line(err))

  def addSubTest(self, test, subtest, err):
    if err is not None:
      self._set(test, "FAIL", f"{subtest._subDescription()}: {_last_line(err)}")  # pylint: disable=protected-access


def _last_line(err) -> str:
  exc = err[1]
  text = f"{type(exc).__name__}: {exc}".strip().splitlines()
  return text[0][:200] if text else type(exc).__name__


def run(alias: str) -> dict[str, tuple[str, str]]:
  """Runs the harness's galore tests with ``alias`` substituted.

  Args:
    alias: A name of ``optax_lowrank.optimizers``.

  Returns:
    ``{label: (status, detail)}``, status ``pass``, ``FAIL`` or ``skip``.
  """
  module = harness()
  names = harness_tests(module)
  result = _Result()
  with substituted(module, optimizers()[alias]), warnings.catch_warnings():
    # The harness's 3-axis leaf is left unprojected, with a warning.
    warnings.simplefilter("ignore")
    unittest.TestSuite(module.ContribTest(n) for n in names).run(result)
  return {label(module, n): result.outcome.get(n, ("FAIL", "did not run"))
          for n in names}


def main(argv=None) -> int:
  aliases = list(argv if argv is not None else sys.argv[1:]) or rank_taking()
  results, seconds = {}, {}
  for alias in aliases:
    start = time.time()
    results[alias] = run(alias)
    seconds[alias] = time.time() - start
    failed = sum(s == "FAIL" for s, _ in results[alias].values())
    print(f"{alias}: {len(results[alias])} tests, {failed} failed, "
          f"{seconds[alias]:.0f} s", file=sys.stderr)
  tests = sorted({t for r in results.values() for t in r})
  width = max(len(t) for t in tests)
  short = {a: a.replace("_", "")[:8] for a in aliases}
  print(f"optax {importlib.import_module('optax').__version__}, harness "
        f"{harness().__file__}")
  print(f"{'test (substituted for galore)':<{width}} | "
        + " | ".join(f"{short[a]:>8}" for a in aliases))
  print("-" * width + "-|-" + "-|-".join("-" * 8 for _ in aliases))
  for t in tests:
    print(f"{t:<{width}} | " + " | ".join(
        f"{results[a].get(t, ('-',))[0]:>8}" for a in aliases))
  print(f"{'seconds':<{width}} | "
        + " | ".join(f"{seconds[a]:>8.0f}" for a in aliases))
  failures = [(a, t, d) for a in aliases for t, (s, d) in results[a].items()
              if s == "FAIL"]
  for a, t, d in failures:
    print(f"FAIL {a} {t}: {d}")
  skips = {(t, d) for a in aliases for t, (s, d) in results[a].items()
           if s == "skip"}
  for t, d in sorted(skips):
    print(f"skip {t}: {d}")
  print(f"aliases: {', '.join(aliases)}; not rank-taking (skipped): "
        f"{', '.join(sorted(set(optimizers()) - set(rank_taking())))}")
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
