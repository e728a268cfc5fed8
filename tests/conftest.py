"""Test configuration: the process set-up the experiments run with (experiments/__init__.py: two
host CPU devices, XLA:CPU convolutions on Eigen), made before JAX is imported anywhere."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import experiments  # noqa: E402, F401 - sets XLA_FLAGS; must come first
