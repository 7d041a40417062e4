"""The trainer's multi-process data and checkpoint paths, on two CPU processes of two
devices each (`jax.distributed` over localhost, gloo collectives).

    nice python benchmarks/two_processes.py

Each process memory-maps one `.bin` and builds a (2, 8, 17) token batch laid out over a
`data=2, fsdp=2` mesh with `train.loop.put_rows`: it must ask for only the rows its two
devices hold, and the gathered global batch must equal the single-process batch. Then
both save three steps with `train.checkpoint.Checkpointer` (keep 2, process 0 the lead):
steps 2 and 3 must remain, checksummed; a data file of step 3 is damaged and both must
move it to the same `damaged/3`, fall back to step 2, restore it, and save step 4.
Prints one line per check and exits with 1 if one fails (about 1 min on 2 cores).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(pid: int, port: int, root: str) -> None:
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
  import jax.numpy as jnp
  import numpy as np
  from jax.experimental import multihost_utils
  sys.path.insert(0, ROOT)
  from models import sharding as shd
  from train import data, loop, steps
  from train.checkpoint import Checkpointer

  def check(name, ok):
    print(f"process {pid}: {'ok  ' if ok else 'FAIL'} {name}", flush=True)
    if not ok:
      raise SystemExit(1)

  path = os.path.join(root, "t.bin")
  if pid == 0:
    (np.arange(200_000) % 60_000).astype(np.uint16).tofile(path)
  multihost_utils.sync_global_devices("written")
  corpus = data.load_corpus(path, val_fraction=0.0)
  mesh = shd.make_mesh({"data": 2, "fsdp": 2})
  shape, asked = (2, 8, 17), []

  def rows_of(rows):
    asked.append(rows.tolist())
    return data.sample_batch(corpus.train, 0, 5, 16, 16, rows)

  batch = loop.put_rows(rows_of, shape, steps.batch_sharding(mesh))
  mine = [r + 4 * pid for r in (0, 1, 2, 3)] + [r + 8 + 4 * pid for r in (0, 1, 2, 3)]
  check(f"read only rows {mine} of 16", asked == [mine])
  whole = multihost_utils.process_allgather(batch, tiled=True)
  want = data.sample_batch(corpus.train, 0, 5, 16, 16).reshape(shape)
  check("the gathered batch is the single-process batch", np.array_equal(whole, want))

  ckpt = Checkpointer(os.path.join(root, "ckpt"), keep=2, lead=pid == 0)
  sharding = jax.sharding.NamedSharding(mesh, jax.P(("data", "fsdp")))
  state = {"w": jax.device_put(jnp.arange(8.0), sharding)}
  for step in (1, 2, 3):
    ckpt.save(step, state, {"seed": 0})
  ckpt.finish()
  multihost_utils.sync_global_devices("saved")
  check("steps 2, 3 kept, checksummed",
        ckpt.steps() == [2, 3] and ckpt.checksummed(2) and ckpt.checksummed(3))
  if pid == 0:
    files = [os.path.join(d, n) for d, _, names in os.walk(os.path.join(root, "ckpt", "3"))
             for n in names if os.path.basename(d) == "d"]
    with open(max(files, key=os.path.getsize), "r+b") as f:
      f.write(b"\1" * 8)
  multihost_utils.sync_global_devices("damaged")
  lines = []
  check("falls back to step 2", ckpt.newest_intact(say=lines.append) == 2)
  check("both name damaged/3", lines[0].endswith(
      f"moved it to {os.path.join(root, 'ckpt', 'damaged', '3')} and fell back to the "
      "previous step"))
  abstract = {"w": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=sharding)}
  restored = multihost_utils.process_allgather(ckpt.restore(abstract, 2)["w"], tiled=True)
  check("step 2 restored", np.array_equal(restored, np.arange(8.0)))
  ckpt.save(4, state)
  ckpt.close()
  check("then step 4 saved", ckpt.steps() == [2, 4] and sorted(
      os.listdir(os.path.join(root, "ckpt"))) == ["2", "4", "damaged"])


def main() -> None:
  if len(sys.argv) == 4:
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
    return
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "JAX_PLATFORMS": "cpu"}
  with tempfile.TemporaryDirectory() as root:
    procs = [subprocess.Popen([sys.executable, __file__, str(pid), str(port), root],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for pid in (0, 1)]
    codes = []
    for proc in procs:
      out, _ = proc.communicate(timeout=600)
      print("".join(line + "\n" for line in out.splitlines() if line.startswith("process")),
            end="")
      codes.append(proc.returncode)
  print("two processes:", "all checks passed" if codes == [0, 0] else f"exit codes {codes}")
  sys.exit(0 if codes == [0, 0] else 1)


if __name__ == "__main__":
  main()
