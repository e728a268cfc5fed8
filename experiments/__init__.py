"""Runnable experiments: `python -m experiments.NAME --help`.

Importing this package (which `python -m experiments.NAME` does first) gives JAX two host CPU
devices, so the edge and the cloud get a device each on a CPU-only machine; it must run before jax
is imported, and it leaves a device count already set in XLA_FLAGS alone. It also hands XLA:CPU's
convolutions to Eigen rather than YNNPACK (hier_jax.models.layers.configure_xla_cpu: 1.3-1.4x faster
train steps on a 2-core CPU, docs/speed.md); a process that already set that option keeps its own.
"""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()

from hier_jax.models.layers import configure_xla_cpu  # noqa: E402 - after XLA_FLAGS, before any computation

configure_xla_cpu()
