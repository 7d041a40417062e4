"""memory.state_bytes against the analytic count of GaLore's state."""

import jax
import jax.numpy as jnp
import optax
import pytest

import optax_lowrank as ol


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_state_bytes_matches_the_formula(dtype):
  shapes = {"q": (64, 48), "up": (48, 160), "down": (160, 48), "norm": (48,),
            "stack": (3, 40, 96), "small": (8, 6)}
  params = {k: jax.ShapeDtypeStruct(s, dtype) for k, s in shapes.items()}
  r = 8
  dims = {k: (ol.DimensionNumbers(1, 2) if k == "stack" else None) for k in shapes}
  mem = ol.memory.state_bytes(ol.galore(1e-3, rank=r, dimension_numbers=dims), params)
  size = jnp.dtype(dtype).itemsize

  def projected(m, n, batch=1):  # moments 2·r·max(m, n) + basis r·min(m, n)
    return batch * (2 * r * max(m, n) + r * min(m, n)) * size

  expected = {
      "['q']": projected(64, 48), "['up']": projected(48, 160),
      "['down']": projected(160, 48), "['stack']": projected(40, 96, batch=3),
      "['norm']": 2 * 48 * size, "['small']": 2 * 8 * 6 * size,  # full Adam
  }
  by_path = {leaf.path: leaf for leaf in mem.leaves}
  for path, nbytes in expected.items():
    assert by_path[path].state_bytes == nbytes, path
  assert {p for p, l in by_path.items() if l.projected} == {
      "['q']", "['up']", "['down']", "['stack']"}
  assert all(by_path[p].rank == r for p in ("['q']", "['stack']"))
  assert mem.shared_bytes == 2 * 4  # two int32 step counts
  assert mem.total_bytes == sum(expected.values()) + 8
  assert "total" in mem.table() and "['stack']" in mem.table()


def test_state_bytes_of_plain_adamw_is_two_moments():
  params = {"w": jnp.zeros((10, 7)), "b": jnp.zeros((7,))}
  mem = ol.memory.state_bytes(optax.adamw(1e-3), params)
  assert [l.state_bytes for l in mem.leaves] == [2 * 7 * 4, 2 * 70 * 4]
  assert not any(l.projected for l in mem.leaves)
