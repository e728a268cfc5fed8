"""Test configuration: two host CPU devices, set before JAX is imported anywhere, and the XLA:CPU
convolution option the experiments run with (experiments/__init__.py)."""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=2"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from hier_jax.models.layers import configure_xla_cpu  # noqa: E402 - after XLA_FLAGS, before any computation

configure_xla_cpu()
