"""Process set-up for hier-jax's entry points: call `setup()` first thing in `main`, before any JAX
computation (XLA reads its flags once, when JAX initialises a backend).

Nothing here runs on import: a library user who sets up JAX their own way keeps it. What `setup`
does, each step leaving a value the user already set alone:
- gives JAX `host_devices` CPU devices (XLA_FLAGS --xla_force_host_platform_device_count), so that
  on a CPU-only machine the edge and the cloud get a device each;
- hands XLA:CPU's convolutions to Eigen rather than YNNPACK (models.xla_cpu.configure_flags:
  1.3-1.4x faster train steps on a 2-core CPU, docs/speed.md). Where that cannot be done (a jaxlib
  without the option, or JAX already started), the first model built on the CPU warns once, saying
  what it costs.
"""

from __future__ import annotations

import os

from hier_jax.models import xla_cpu

HOST_DEVICES = 2
_DEVICE_COUNT_FLAG = "xla_force_host_platform_device_count"


def setup(host_devices: int = HOST_DEVICES) -> bool:
    """Set XLA_FLAGS for this process (see the module docstring); True if the XLA:CPU option is in
    effect. Safe to call more than once; after JAX has started it changes nothing."""
    flags = os.environ.get("XLA_FLAGS", "")
    if _DEVICE_COUNT_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --{_DEVICE_COUNT_FLAG}={host_devices}".strip()
    return xla_cpu.configure_flags()
