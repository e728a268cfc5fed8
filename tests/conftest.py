"""Test configuration: the process set-up the experiments make in `main` (hier_jax.process.setup: two
host CPU devices, XLA:CPU convolutions on Eigen), made before any test starts JAX; the precision
policy of tests/backend.py; and device-pair fixtures that fit whatever backend the suite runs on.

JAX_PLATFORMS defaults to cpu; `python3 tasks.py test --backend gpu|tpu` sets it to the accelerator
with the CPU beside it.

Compiled programs go to a persistent cache made fresh for the session (unless JAX_COMPILATION_CACHE_DIR
is set), which this process and every process it starts share: the cluster tests' Ray workers and the
CLI tests' subprocesses otherwise compile the same small steps again in each new process (on 2 cores:
test_cluster 8 min without, 2 min with; the suite 19 min, 12 min).
"""

import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _SESSION_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="hier-jax-test-xla-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # the tests' steps compile fast
else:
    _SESSION_CACHE = None

from hier_jax import process  # noqa: E402 - after the environment above

process.setup()

import jax  # noqa: E402
import pytest  # noqa: E402

import backend  # noqa: E402

jax.config.update("jax_default_matmul_precision", backend.PRECISION)


def pytest_unconfigure(config):
    if _SESSION_CACHE:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


DEVICE_PAIRS = ("two_host_devices", "two_accelerators", "accelerator_and_host")


def device_pair_for(kind: str) -> tuple[jax.Device, jax.Device]:
    """(edge, cloud) devices of a kind of pair, or pytest.skip saying what is missing."""
    host = jax.devices("cpu") if "cpu" in os.environ["JAX_PLATFORMS"].split(",") else []
    accelerators = [d for d in jax.devices() if d.platform != "cpu"]
    if kind == "two_host_devices":
        if len(host) < 2:
            pytest.skip(f"needs two host CPU devices; this process has {len(host)}")
        return host[0], host[1]
    if kind == "two_accelerators":
        if len(accelerators) < 2:
            pytest.skip(f"needs two accelerators; this host has {len(accelerators)}")
        return accelerators[0], accelerators[-1]
    if not accelerators or not host:
        pytest.skip(
            f"needs an accelerator and the host CPU; this process has {len(accelerators)} "
            f"accelerator(s) and {len(host)} host device(s)"
        )
    return host[0], accelerators[0]  # the edge on the weak side


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's digits at 32x32 (offline), loaded once for every test that trains on real data."""
    from hier_jax.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(params=DEVICE_PAIRS)
def device_pair(request) -> tuple[jax.Device, jax.Device]:
    """Each kind of (edge, cloud) device pair this host offers; the others skip with the reason."""
    return device_pair_for(request.param)


@pytest.fixture(scope="session")
def local_ray():
    """A local cluster for the session (Ray is imported by start_ray, after its authentication is set);
    once shut down, not one of its processes may be left."""
    from processes import processes_with_token, wait_until_gone

    from hier_jax import cluster

    ray = cluster.start_ray(cluster.RayConfig(), num_cpus=4)
    token = os.environ["RAY_AUTH_TOKEN"]
    assert processes_with_token(token)  # the finder sees the cluster's processes (else the check below is void)
    yield
    ray.shutdown()
    left = wait_until_gone(processes_with_token(token))
    assert not left, f"Ray processes left behind after shutdown: {sorted(left)}"
