"""Ray itself: joining or starting a cluster, pinning workers to cores, and waiting on its futures with a timeout."""

from __future__ import annotations

import os
import secrets
import signal
import threading
import warnings

from hier_jax.cluster.config import ClusterConfig, ClusterError
from hier_jax.errors import UserError


def _ray():
    try:
        import ray
    except ImportError:
        raise UserError("the cluster runner needs Ray: pip install -e .[ray]") from None
    return ray


def start_ray(cluster: ClusterConfig, num_cpus: int):
    """Join `cluster.address`, or start a local cluster on the loopback interface with token
    authentication; the ray module. Must come before anything else imports Ray in this process (Ray
    reads its authentication mode when it is imported)."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # before Ray is imported: it reads the mode then
    token_file = os.path.expanduser("~/.ray/auth_token")
    if (
        not cluster.address
        and os.environ["RAY_AUTH_MODE"] == "token"
        and not os.environ.get("RAY_AUTH_TOKEN")
        and not os.environ.get("RAY_AUTH_TOKEN_PATH")
        and not os.path.exists(token_file)
    ):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # this run's own secret, inherited by its workers
    ray = _ray()
    if ray.is_initialized():
        return ray
    # ray.init installs its own SIGTERM handler (a stack dump, then death); keep the caller's, which
    # turns SIGTERM into KeyboardInterrupt like Ctrl-C (cli.sigterm_as_interrupt).
    main_thread = threading.current_thread() is threading.main_thread()
    sigterm = signal.getsignal(signal.SIGTERM) if main_thread else None
    with warnings.catch_warnings():  # Ray forks only to exec its own binaries, which JAX's threads cannot upset
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
        if cluster.address:
            ray.init(address=cluster.address, log_to_driver=False)
        else:
            ray.init(
                num_cpus=num_cpus,
                include_dashboard=False,
                log_to_driver=False,
                _node_ip_address="127.0.0.1",
                configure_logging=False,
            )
    if sigterm is not None:
        signal.signal(signal.SIGTERM, sigterm)
    return ray


def core_plan(cluster: ClusterConfig, cloud_on_gpu: bool) -> tuple[list[list[int] | None], list[int] | None]:
    """(cores of each edge, cores of the cloud) on this host: one core each, the cloud on the last."""
    if cluster.address or not cluster.pin:
        return [None] * cluster.edges, None
    cores = sorted(os.sched_getaffinity(0))
    if cloud_on_gpu or len(cores) == 1:
        return [[cores[i % len(cores)]] for i in range(cluster.edges)], None if cloud_on_gpu else cores
    edge_cores = cores[:-1]
    return [[edge_cores[i % len(edge_cores)]] for i in range(cluster.edges)], [cores[-1]]


def resource(name: str) -> dict[str, float] | None:
    return {name: 1} if name else None


def get(ray, ref, cluster: ClusterConfig, what: str):
    try:
        return ray.get(ref, timeout=cluster.timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise ClusterError(f"timed out after {cluster.timeout_s:g} s waiting for {what}") from None
    except ray.exceptions.RayActorError as error:
        raise ClusterError(f"a worker died while waiting for {what}: {str(error).splitlines()[0]}") from None


def alive(ray, worker, cluster: ClusterConfig) -> bool:
    """Does the worker still answer? (a cloud task can fail because its payload's edge died)"""
    try:
        ray.get(worker.placement.remote(), timeout=min(cluster.timeout_s, 60))
        return True
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return False
