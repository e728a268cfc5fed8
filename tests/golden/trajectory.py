"""The golden trajectory: one fixed tiny run whose numbers any backend must reproduce.

digits, torchvision-style ResNet-18 at width 4 cut after layer1_1, 4-bit hand-off, 20 steps of batch
32, run in both schedules (sequential, pipelined). `record()` gives its per-step losses, final accuracies, payload
bytes and a SHA-256 of the final parameters and BatchNorm statistics; tests/golden/regenerate.py
stores it as cpu.json with the versions and machine that produced it, and tests/test_golden.py
compares a fresh run with it.
"""

from __future__ import annotations

import hashlib
import platform

import jax
import numpy as np

from hier_jax import train
from hier_jax.config import SCHEDULES, ExperimentConfig, optimizers
from hier_jax.data import load_dataset
from hier_jax.models import ExitHeadConfig
from hier_jax.runtime_model import profiler

CONFIG = ExperimentConfig(
    model="resnet18_tv",
    dataset="digits",
    split="layer1_1",
    bits=4,
    width=4,
    batch_size=32,
    max_steps=20,
    head=ExitHeadConfig(channels=8),
    **optimizers(learning_rate=0.05),
    seed=0,
    precision="fp32",
)  # not "auto": the same policy on every backend


def state_sha256(edge_state, cloud_state) -> str:
    """SHA-256 over every leaf (params, BatchNorm statistics, optimizer state, step), in tree order."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves((edge_state, cloud_state)):
        array = np.asarray(leaf)
        digest.update(str((array.dtype.str, array.shape)).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def record() -> dict:
    """Both schedules of the golden run: {"sequential": {...}, "pipelined": {...}}."""
    setup = train.build(CONFIG, load_dataset("digits"))
    runs = {}
    for schedule in SCHEDULES:
        result = train.train(setup, schedule=schedule, progress=False)
        accuracy = train.evaluate(setup, result)
        runs[schedule] = {
            "edge_loss": [float(x) for x in result.edge_metrics["loss"]],
            "cloud_loss": [float(x) for x in result.cloud_metrics["loss"]],
            "edge_accuracy": accuracy["edge_accuracy"],
            "cloud_accuracy": accuracy["cloud_accuracy"],
            "test_examples": accuracy["examples"],
            "payload_bytes": result.payload_bytes,
            "state_sha256": state_sha256(result.edge_state, result.cloud_state),
        }
    return runs


def machine() -> dict:
    """What produced a record: versions, backend, device and CPU model."""
    import flax
    import jaxlib
    import optax

    return {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "cpu": profiler.host_cpu(),
    }
