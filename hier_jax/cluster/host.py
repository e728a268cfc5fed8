"""Ray as a backend of the one scheduler: joining or starting a cluster (bounded by the run's
timeout, with token authentication, and leaving no process behind), pinning workers to cores, and
`RayBackend`, the scheduler's interface over Ray actors.

A local cluster is watched by a small reaper process: it notes every process descended from the
driver while the driver lives, and if the driver dies without shutting Ray down (SIGKILL), it kills
them, Ray's agents included (which Ray itself leaves behind, re-parented to init).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from hier_jax.cluster.config import RayConfig
from hier_jax.errors import UserError, WorkerError
from hier_jax.run.backends import WorkerLost

TOKEN_FILE = os.path.expanduser("~/.ray/auth_token")
_REAPER = r"""
import os, signal, sys, time
driver = int(sys.argv[1])

def stat(pid):
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(") ", 1)[1].split()
        return fields[0], int(fields[1]), fields[19]  # state, parent, start time
    except (OSError, IndexError):
        return None

def descendants(roots):  # this reaper is the driver's child too: never itself
    table = {int(p): stat(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()}
    found, frontier = {}, set(roots)
    while frontier:
        frontier = {p for p, s in table.items() if s and s[1] in frontier and p not in found}
        found.update({p: table[p][2] for p in frontier})
    return found

seen = {}
while (s := stat(driver)) is not None and s[0] != "Z":
    seen.update(descendants({driver}))
    time.sleep(0.25)
for _ in range(40):
    alive = {p: t for p, t in seen.items() if (s := stat(p)) is not None and s[2] == t and s[0] != "Z"}
    alive.update(descendants(set(alive)))
    if not alive:
        break
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    seen = alive
    time.sleep(0.25)
"""
_reaper: subprocess.Popen | None = None


def _ray():
    try:
        import ray
    except ImportError:
        raise UserError("the Ray backend needs Ray: pip install -e .[ray]") from None
    return ray


def _has_token() -> bool:
    return bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.exists(TOKEN_FILE))


def _reachable(address: str, timeout_s: float) -> None:
    """WorkerError in one line unless a gRPC server (a Ray head's GCS) answers at HOST:PORT within the
    timeout: checked here, before Ray's own join, which retries for minutes and prints every retry."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--address {address!r} is invalid; valid: HOST:PORT of a Ray head (ray start --head)")
    deadline = time.monotonic() + timeout_s
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as error:
        raise WorkerError(
            f"cannot reach the Ray cluster at {address} within {timeout_s:g} s: {error.strerror or error}"
        ) from None
    if os.environ.get("RAY_USE_TLS", "0") not in ("0", ""):
        return  # a TLS head needs Ray's credentials to shake hands; Ray's join checks it
    import grpc

    channel = grpc.insecure_channel(address)
    try:
        grpc.channel_ready_future(channel).result(timeout=max(deadline - time.monotonic(), 0.1))
    except grpc.FutureTimeoutError:
        raise WorkerError(
            f"could not join the Ray cluster at {address} within {timeout_s:g} s (--timeout): "
            f"something listens there, but no Ray head answers"
        ) from None
    finally:
        channel.close()


def start_ray(ray_config: RayConfig, num_cpus: int, timeout_s: float = 600.0):
    """Join `ray_config.address`, or start a local cluster on the loopback interface with token
    authentication (a fresh token for this run, unless one is given) and its reaper; the ray module.
    Must come before anything else imports Ray in this process (Ray reads its authentication mode when
    it is imported). Joining is bounded by `timeout_s`, and a Ctrl-C or SIGTERM stops the wait at once."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # before Ray is imported: it reads the mode then
    token_auth = os.environ["RAY_AUTH_MODE"] == "token"
    if ray_config.address and token_auth and not _has_token():
        raise UserError(
            "joining a Ray cluster with token authentication needs its token: set RAY_AUTH_TOKEN "
            "(or RAY_AUTH_TOKEN_PATH) in the environment"
        )
    if not ray_config.address and token_auth and not _has_token():
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # this run's own secret, inherited by its workers
    if ray_config.address:  # the core worker prints its retries to stderr; a refusal is ours to report
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    ray = _ray()
    if ray.is_initialized():
        return ray
    if ray_config.address:
        _reachable(ray_config.address, timeout_s)
    # ray.init installs its own SIGTERM handler (a stack dump, then death); keep the caller's, which
    # turns SIGTERM into KeyboardInterrupt like Ctrl-C (cli.sigterm_as_interrupt).
    main_thread = threading.current_thread() is threading.main_thread()
    sigterm = signal.getsignal(signal.SIGTERM) if main_thread else None
    outcome: list = []

    def init() -> None:
        try:
            with warnings.catch_warnings():  # Ray forks only to exec its own binaries, which JAX cannot upset
                warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
                if ray_config.address:  # its refusals are ours to report, in one line
                    ray.init(address=ray_config.address, log_to_driver=False, logging_level=logging.ERROR)
                else:
                    ray.init(
                        num_cpus=num_cpus,
                        include_dashboard=False,
                        log_to_driver=False,
                        _node_ip_address="127.0.0.1",
                        configure_logging=False,
                    )
            outcome.append(None)
        except BaseException as error:  # noqa: BLE001 - raised in the caller
            outcome.append(error)

    if ray_config.address:  # joining may retry for minutes: wait for it on a thread, bounded
        joining = threading.Thread(target=init, name="hier-ray-join", daemon=True)
        joining.start()
        deadline = time.monotonic() + timeout_s
        while joining.is_alive() and time.monotonic() < deadline:
            joining.join(0.1)
        if not outcome:
            raise WorkerError(
                f"could not join the Ray cluster at {ray_config.address} within {timeout_s:g} s (--timeout)"
            )
    else:
        init()
    if sigterm is not None:
        signal.signal(signal.SIGTERM, sigterm)
    if outcome[0] is not None:
        error = outcome[0]
        if "Authentication" in type(error).__name__ or "authentication" in str(error).lower():
            raise UserError(
                f"the Ray cluster refused this process's token: check RAY_AUTH_TOKEN ({type(error).__name__})"
            ) from None
        raise error
    if not ray_config.address:
        _start_reaper()
    return ray


def _start_reaper() -> None:
    global _reaper
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN"}  # the reaper holds no secret
    _reaper = subprocess.Popen(
        [sys.executable, "-c", _REAPER, str(os.getpid())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )


def stop_ray() -> None:
    """Shut the local cluster down (or leave the one joined), and its reaper with it; nothing when Ray
    was never imported."""
    global _reaper
    if "ray" in sys.modules:
        sys.modules["ray"].shutdown()
    if _reaper is not None:
        _reaper.kill()
        _reaper.wait()
        _reaper = None


@contextlib.contextmanager
def ray_session() -> Iterator[None]:
    """Within: the runs started may start Ray; on the way out Ray is stopped, unless it was already
    running on the way in (a caller's cluster, a test session's)."""
    running = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    try:
        yield
    finally:
        if not running:
            stop_ray()


def core_plan(ray_config: RayConfig, edges: int, cloud_on_gpu: bool) -> tuple[list[list[int] | None], list[int] | None]:
    """(cores of each edge, cores of the cloud) on this host: one core each, the cloud on the last."""
    if ray_config.address or not ray_config.pin:
        return [None] * edges, None
    cores = sorted(os.sched_getaffinity(0))
    if cloud_on_gpu or len(cores) == 1:
        return [[cores[i % len(cores)]] for i in range(edges)], None if cloud_on_gpu else cores
    edge_cores = cores[:-1]
    return [[edge_cores[i % len(edge_cores)]] for i in range(edges)], [cores[-1]]


def resource(name: str) -> dict[str, float]:
    return {name: 1} if name else {}


class RayBackend:
    """The scheduler's backend over Ray actors (`backends.Backend`): one process per worker."""

    def __init__(self, ray, spawn_edge: Callable[[int, bool], Any], spawn_cloud: Callable[[], Any]):
        self.ray, self._spawn_edge, self._spawn_cloud = ray, spawn_edge, spawn_cloud
        self.lost_errors: tuple[type[BaseException], ...] = (WorkerLost,)
        self.workers: list = []

    def spawn_edge(self, edge: int, first_life: bool = True) -> Any:
        worker = self._spawn_edge(edge, first_life)
        self.workers.append(worker)
        return worker

    def spawn_cloud(self) -> Any:
        worker = self._spawn_cloud()
        self.workers.append(worker)
        return worker

    def submit(self, worker: Any, method: str, *args: Any, returns: int = 1) -> Any:
        call = getattr(worker, method)
        return call.options(num_returns=returns).remote(*args) if returns > 1 else call.remote(*args)

    def wait(self, futures: Sequence[Any], timeout_s: float) -> list[Any]:
        ready, _ = self.ray.wait(list(futures), num_returns=1, timeout=timeout_s)
        return ready

    def get(self, future: Any, timeout_s: float) -> Any:
        ray = self.ray
        try:
            return ray.get(future, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"no result within {timeout_s:g} s") from None
        except ray.exceptions.RayActorError as error:
            raise WorkerLost(str(error).splitlines()[0]) from None
        except ray.exceptions.RayTaskError as error:
            if "ActorDiedError" in type(error).__name__ or "RayActorError" in str(type(error).__mro__):
                raise WorkerLost(str(error).splitlines()[0]) from None
            cause = error.as_instanceof_cause()  # the task's own exception, with Ray's traceback in its text
            raise cause from None

    def alive(self, worker: Any) -> bool:
        """Does the worker still answer? (a cloud task can fail because its payload's edge died)"""
        try:
            self.ray.get(worker.placement.remote(), timeout=60)
            return True
        except (self.ray.exceptions.RayActorError, self.ray.exceptions.GetTimeoutError):
            return False

    def traffic(self) -> dict[str, str]:
        return {}  # Ray's object store moves the payloads; it does not count them per edge

    def report(self) -> dict | None:
        return None

    def kill(self, worker: Any) -> None:
        self.ray.kill(worker)

    def stop(self, finished: bool = True) -> None:
        for worker in self.workers:
            self.ray.kill(worker)
        self.workers.clear()
