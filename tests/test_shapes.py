"""Matricization and leaf selection."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_lowrank as ol
from optax_lowrank import shapes


@pytest.mark.parametrize(
    "shape, dims, batch, m, n, perm",
    [
        ((5, 7), ol.DimensionNumbers(0, 1), (), 7, 5, (0, 1)),
        ((7, 5), ol.DimensionNumbers(1, 0), (), 7, 5, (1, 0)),
        ((3, 5, 7), ol.DimensionNumbers(1, 2), (3,), 7, 5, (0, 1, 2)),
        ((5, 2, 3), ol.DimensionNumbers(0, (1, 2)), (), 6, 5, (0, 1, 2)),
        ((2, 3, 5), ol.DimensionNumbers((0, 1), -1), (), 5, 6, (0, 1, 2)),
        ((4, 5, 6, 7), ol.DimensionNumbers(2, 0), (5, 7), 4, 6, (1, 3, 2, 0)),
    ],
)
def test_matricize_is_a_transpose_and_reshape(shape, dims, batch, m, n, perm):
  x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
  layout = shapes.MatrixLayout.from_dimension_numbers(shape, dims, "x")
  assert (layout.batch_shape, layout.m, layout.n) == (batch, m, n)
  mat = layout.matricize(jnp.asarray(x))
  # Arrays keep the parameter's layout: (batch..., n, m), reduction first.
  np.testing.assert_array_equal(mat, np.transpose(x, perm).reshape(batch + (n, m)))
  assert layout.matrix_shape == batch + (m, n)
  np.testing.assert_array_equal(layout.unmatricize(mat), x)


def test_plan_rank_fraction_mask_and_small_leaves():
  params = {"a": jnp.zeros((40, 20)), "b": jnp.zeros((20,)), "c": jnp.zeros((6, 100)),
            "d": jnp.zeros((30, 30))}
  plans, _ = shapes.plan_leaves(params, rank=0.25, mask={"a": True, "b": True, "c": True, "d": False})
  by_name = dict(zip(sorted(params), plans))
  assert by_name["a"].rank == 5 and by_name["c"].rank == 2  # 0.25·20, 0.25·6 rounded
  assert by_name["b"] is None and by_name["d"] is None
  plans, _ = shapes.plan_leaves(params, rank=6)
  by_name = dict(zip(sorted(params), plans))
  assert by_name["c"] is None  # smaller side 6 <= rank 6
  assert [p.index for p in plans if p is not None] == [0, 1]


def test_mismatched_mask_tree_is_a_clear_error():
  with pytest.raises(ValueError, match="per-leaf option"):
    shapes.plan_leaves({"a": jnp.zeros((4, 4))}, rank=2, mask={"b": True})


@pytest.mark.parametrize("dims", [ol.DimensionNumbers(5, 1), ol.DimensionNumbers((), 1)])
def test_out_of_range_or_empty_axes_are_a_clear_error(dims):
  with pytest.raises(ValueError, match=r"leaf w .*outside \[-3, 3\) or no axis"):
    shapes.MatrixLayout.from_dimension_numbers((3, 8, 8), dims, "w")
