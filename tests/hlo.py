"""Reading the collectives of compiled HLO text (tests of what a sharded program moves)."""

import re

import numpy as np

COLLECTIVE = re.compile(
    r"=\s*(\(.*?\)|\S+)\s+(all-gather|all-reduce|all-to-all|reduce-scatter|"
    r"collective-permute)(?:-start)?\(")


def collectives(hlo: str) -> list[tuple[str, tuple[int, ...]]]:
  """``(op, shape)`` for every array a collective returns in compiled HLO text."""
  out = []
  for line in hlo.splitlines():
    match = COLLECTIVE.search(line)
    if match:
      for dims in re.findall(r"[a-z]+[0-9]*\[([0-9,]*)\]", match.group(1)):
        out.append((match.group(2), tuple(int(d) for d in dims.split(",") if d)))
  return out


def whole_matrices(found, shapes) -> list[tuple[str, tuple[int, ...]]]:
  """Collectives whose result holds as many numbers as a whole gradient matrix."""
  smallest = min(s[-1] * s[-2] for s in shapes.values())
  return [(op, s) for op, s in found if np.prod(s, dtype=int) >= smallest]
