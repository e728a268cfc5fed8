"""Runnable experiments: `python -m experiments.NAME --help`.

Each experiment's `main` calls `hier_jax.process.setup()` before any JAX computation (two host CPU
devices, XLA:CPU convolutions on Eigen); importing this package changes nothing.
"""
