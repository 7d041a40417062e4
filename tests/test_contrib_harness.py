"""optax's own contrib test harness, from the installed wheel, on our aliases.

``optax/contrib/_common_test.py`` (shipped in the optax wheel) tests every
contributed optimizer the same way: jit without recompilation, extra
arguments, ``optax.tree.map_params``, convergence on four problems,
``optax.inject_hyperparams`` (with its own ``static_args``: ``rank`` and
``update_proj_gap``), dtype preservation, ``optax.MultiSteps``, state
stability for float16 to float64, learning-rate schedules. Here one of our
aliases stands in for its ``optax.contrib.galore`` entry and every harness
test of that entry runs unchanged (``benchmarks/contrib_harness.py``). Three
representative aliases keep the suite short (an SVD subspace, a rank-1 random
projection with tensor scaling, a regrouped random projection with a factored
second moment); the script runs every rank-taking alias.
"""

import importlib

import pytest

pytest.importorskip("absl.testing.parameterized")  # the harness is absltest's

contrib_harness = importlib.import_module("benchmarks.contrib_harness")

REPRESENTATIVE = ("galore", "apollo_mini", "vlorp")


def test_the_harness_has_a_galore_entry_with_its_tests():
  module = contrib_harness.harness()
  tests = {contrib_harness.label(module, n)
           for n in contrib_harness.harness_tests(module)}
  assert "test_optimizers_can_be_wrapped_in_inject_hyperparams" in tests, tests
  assert "test_optimizers[rosenbrock,float32]" in tests, tests
  assert len(tests) >= 10, tests


@pytest.mark.parametrize("alias", REPRESENTATIVE)
def test_contrib_harness_passes_with_the_alias_for_galore(alias):
  outcome = contrib_harness.run(alias)
  failed = {t: d for t, (s, d) in outcome.items() if s != "pass"}
  assert not failed, failed
