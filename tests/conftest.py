"""Test configuration: the process set-up the experiments make in `main` (hier_jax.process.setup: two
host CPU devices, XLA:CPU convolutions on Eigen), made before any test starts JAX."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from hier_jax import process  # noqa: E402 - after the environment above

process.setup()
