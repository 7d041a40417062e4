"""Simulate 8 CPU devices for the sharding tests (before JAX is imported).

XLA:CPU's concurrency-optimized scheduler can deadlock when several
conditionals holding collectives (our per-leaf refresh ``lax.cond`` with a
reshard inside) run at once on simulated devices sharing two cores; the
default scheduler runs them in program order. GPU and TPU runtimes are not
affected.
"""

import os

os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8"
    " --xla_cpu_enable_concurrency_optimized_scheduler=false",
)
