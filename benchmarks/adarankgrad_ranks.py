"""AdaRankGrad over a training run: switches, ranks and state bytes, from its checkpoints.

Reads every checkpoint of a ``train.pretrain --optimizer adarankgrad`` run (saved with
``--ckpt-dir DIR --ckpt-every N``) without building the model: each projected matrix's
state holds ``switched_at`` (the step of its last subspace switch) and ``rank`` (the rank
in use, ``k ≤ r``). For each checkpoint it prints how many matrices switched in the last
``N`` steps (a lower bound on the switches: a matrix that switched twice counts once), the
ranks in use, and two byte counts of the projected matrices' state:

* ``state``: what the state holds, sized for the maximum rank ``r`` (JAX shapes are static;
  the same at every step, and what ``optax_lowrank.memory.state_bytes`` reports);
* ``at rank k``: what the same state would hold with each matrix's basis and Adam moments
  cut to its rank in use (``(2·max(m, n) + min(m, n))·k`` words per matrix, plus its two
  int32), the footprint rank buckets could at best reach.

Usage:
  python -m train.pretrain --model tiny --optimizer adarankgrad --lr 1e-2 --rank 0.5 \\
      --update-proj-gap 100 --steps 300 --batch-size 16 --seq-len 128 \\
      --ckpt-dir /tmp/ck --ckpt-every 20 --keep 20
  python benchmarks/adarankgrad_ranks.py /tmp/ck
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import orbax.checkpoint as ocp


def _leaves(tree, prefix=()):
  """``(path, array)`` for every array of a restored (nested dict/list) tree."""
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _leaves(v, prefix + (str(k),))
  elif isinstance(tree, (list, tuple)):
    for i, v in enumerate(tree):
      yield from _leaves(v, prefix + (str(i),))
  elif tree is not None:
    yield prefix, np.asarray(tree)


def matrices(tree):
  """Per projected leaf: ``(name, switched_at, rank, r, arrays)``: ``r`` the maximum
  rank and ``arrays`` the basis and the Adam moments, each linear in ``r``.

  The state is ``lowrank_project``'s: ``.../bases/<leaf>/basis/switched_at`` and
  ``.../bases/<leaf>/basis/basis/{rank, basis/u or vh}`` (``<leaf>`` is one key,
  ``"layers/0/attn/q/kernel"``), the moments at ``.../inner_state/{mu, nu}/layers/0/...``.
  """
  leaves = dict(_leaves(tree))
  out = []
  for path, switched_at in leaves.items():
    if path[-1] != "switched_at" or "bases" not in path:
      continue
    i = path.index("bases")
    root, leaf = path[:i], path[i + 1:-2]
    at = root + ("bases",) + leaf + ("basis", "basis")
    rank = leaves[at + ("rank",)]
    (basis_path,) = [p for p in leaves if p[:len(at) + 1] == at + ("basis",)]
    basis = leaves[basis_path]
    r = basis.shape[-1] if basis_path[-1] == "u" else basis.shape[-2]
    param = tuple("/".join(leaf).split("/"))
    arrays = [basis] + [leaves[root + ("inner_state", m) + param]
                        for m in ("mu", "nu")]
    out.append(("/".join(leaf), switched_at, rank, r, arrays))
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("ckpt_dir")
  args = ap.parse_args(argv)
  root = os.path.abspath(args.ckpt_dir)
  steps = sorted(int(s) for s in os.listdir(root) if s.isdigit())
  if not steps:
    sys.exit(f"no checkpoints in {root}")
  checkpointer = ocp.StandardCheckpointer()
  print("| step | matrices that switched since the last checkpoint | rank in use: "
        "min / median / max (of r) | state bytes (projected matrices) | at rank k |")
  print("|--:|--:|---|--:|--:|")
  previous = None
  for step in steps:
    found = matrices(checkpointer.restore(os.path.join(root, str(step), "default")))
    if not found:
      sys.exit("no AdaRankGrad state (switched_at) in the checkpoint")
    switched, ranks, r_max = [], [], set()
    held = at_rank = 0
    for _, switched_at, rank, r, arrays in found:
      switched.append(switched_at.reshape(-1))
      ranks.append(rank.reshape(-1))
      r_max.add(r)
      extra = switched_at.nbytes + rank.nbytes
      matrices_bytes = sum(a.nbytes for a in arrays)
      held += matrices_bytes + extra
      # Every array is linear in r: each matrix's share cut to its own k.
      per_matrix = matrices_bytes // max(rank.size, 1)
      at_rank += int(np.sum(rank.astype(np.int64) * per_matrix // r)) + extra
    switched, ranks = np.concatenate(switched), np.concatenate(ranks)
    recent = int(np.sum(switched >= (0 if previous is None else previous)))
    print(f"| {step} | {recent} of {switched.size} | {ranks.min()} / "
          f"{int(np.median(ranks))} / {ranks.max()} (of "
          f"{'/'.join(map(str, sorted(r_max)))}) | {held:,} | {at_rank:,} |")
    previous = step


if __name__ == "__main__":
  main()
