"""Runnable experiments: `python -m experiments.NAME --help`.

Importing this package (which `python -m experiments.NAME` does first) gives JAX two host CPU
devices, so the edge and the cloud get a device each on a CPU-only machine; it must run before jax
is imported, and it leaves a device count already set in XLA_FLAGS alone.
"""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
