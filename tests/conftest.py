"""Simulate 8 CPU devices for the sharding tests (before JAX is imported).

XLA:CPU's concurrency-optimized scheduler can deadlock when several
conditionals holding collectives (our per-leaf refresh ``lax.cond`` with a
reshard inside) run at once on simulated devices sharing two cores; the
default scheduler runs them in program order. GPU and TPU runtimes are not
affected.

jaxlib's CPU LAPACK (the SVD) runs on scipy's OpenBLAS, whose threads contend
with XLA's for two cores and slow an SVD by 10-70x; one thread avoids that.

The suite's time is mostly XLA:CPU compiles of small programs that then run a
few steps; LLVM backend optimization level 0 cuts each compile by about 40% (the
tiny LLaMA train step: 10 -> 6 s CPU). The HLO program is the same; the CPU code
is less optimized and may round differently in the last bit (e.g. without fused
multiply-adds), which every tolerance covers; the bit-exact tests compare runs
compiled under the same flags.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8"
    " --xla_cpu_enable_concurrency_optimized_scheduler=false"
    " --xla_backend_optimization_level=0",
)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# A persistent compilation cache private to this test process (each pytest-xdist worker
# has its own: JAX's cache files are written without a lock): the trainer's tests compile
# the same init, step and eval programs many times, and programs that take over a second
# to compile (JAX's default threshold) are then loaded instead. Subprocesses the tests
# start inherit it through the environment.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="xla_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)


import jax  # noqa: E402  (after the flags above)
import pytest  # noqa: E402


@pytest.fixture(scope="module")
def mesh():
  """A 4 x 2 mesh of simulated CPU devices with axes ("a", "b")."""
  if jax.device_count() < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
  return jax.make_mesh((4, 2), ("a", "b"))
