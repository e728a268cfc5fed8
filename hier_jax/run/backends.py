"""Where a run's workers live, behind one small interface the scheduler drives (`Backend`): start a
worker, submit one of its methods, wait for some of the results, get one, stop everything.

`ThreadBackend` keeps every worker in this process, each with a dispatch thread of its own (so each
device's work is queued by its own thread, which is what lets the edge's next step overlap the
cloud's); a worker runs its tasks in the order they were submitted, and a task's future completes
when its work is done (the workers wait for their steps' results), so back-pressure means what it
means on Ray. Futures passed as arguments are resolved before the task runs, as Ray resolves object
references. `cluster.RayBackend` is the other implementation: one process per worker.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from hier_jax.errors import WorkerError


class WorkerLost(WorkerError):
    """A worker that died (its process, or in this process a crash injected for a test): every task
    of it that had not finished fails with this."""


class WorkerCrashed(BaseException):
    """Raised inside a thread worker to make it die as a crashed process would (fault injection)."""


class Backend(Protocol):
    """What the scheduler needs of where the workers run."""

    @property
    def lost_errors(self) -> tuple[type[BaseException], ...]:
        """What `get` raises for a task whose worker died."""
        ...

    def spawn_edge(self, edge: int, first_life: bool = True) -> Any:
        """Start a worker for edge `edge` (`first_life`: not a restart); its handle."""
        ...

    def spawn_cloud(self) -> Any:
        """Start the cloud's worker; its handle."""
        ...

    def submit(self, worker: Any, method: str, *args: Any, returns: int = 1) -> Any:
        """Run `worker.method(*args)` after the worker's earlier tasks; a future (a tuple of `returns`
        futures when the method returns that many values). Futures among `args` are resolved first."""
        ...

    def wait(self, futures: Sequence[Any], timeout_s: float) -> list[Any]:
        """Block until at least one of `futures` is done (at most `timeout_s`); the ones done."""
        ...

    def get(self, future: Any, timeout_s: float) -> Any:
        """The result; `WorkerLost` if its worker died, the task's own exception if it raised."""
        ...

    def alive(self, worker: Any) -> bool: ...

    def kill(self, worker: Any) -> None: ...

    def stop(self, finished: bool = True) -> None:
        """Stop every worker started (each finishes the task it is running); idempotent. `finished`:
        the run ended (not stopped part-way, to be resumed), for workers elsewhere to be told which."""
        ...

    def traffic(self) -> dict[str, str]:
        """What the progress line shows of the transport (bytes/s, reconnects); {}: nothing to show."""
        ...

    def report(self) -> dict | None:
        """The transport's part of the summary (per edge: bytes, connection events); None: none."""
        ...


class _Worker:
    """One worker object and the thread that runs its tasks in order."""

    def __init__(self, name: str, obj: Any):
        self.name, self.obj, self.dead = name, obj, False
        self.tasks: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, name=f"hier-{name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (task := self.tasks.get()) is not None:
            method, args, futures = task
            if self.dead:
                fail_all(futures, WorkerLost(f"{self.name} died"))
                continue
            try:
                args = [resolved(a) for a in args]
                result = getattr(self.obj, method)(*args)
            except WorkerCrashed:
                self.dead = True
                fail_all(futures, WorkerLost(f"{self.name} died (a crash injected at this step)"))
                continue
            except BaseException as error:  # noqa: BLE001 - handed to whoever waits on the future
                fail_all(futures, error)
                continue
            results = (result,) if len(futures) == 1 else result
            for future, value in zip(futures, results, strict=True):
                future.set_result(value)


def fail_all(futures: list[concurrent.futures.Future], error: BaseException) -> None:
    """Fail every future not already done (a worker that died fails what it still owed)."""
    for future in futures:
        if not future.done():
            future.set_exception(error)


def resolved(arg: Any) -> Any:
    return arg.result() if isinstance(arg, concurrent.futures.Future) else arg


class ThreadBackend:
    """Every worker in this process, on a dispatch thread of its own (see the module docstring):
    `make_edge(edge, first_life)` and `make_cloud()` build the worker objects."""

    lost_errors: tuple[type[BaseException], ...] = (WorkerLost,)

    def __init__(self, make_edge: Callable[[int, bool], Any], make_cloud: Callable[[], Any]):
        self.make_edge, self.make_cloud = make_edge, make_cloud
        self.workers: list[_Worker] = []

    def spawn_edge(self, edge: int, first_life: bool = True) -> _Worker:
        worker = _Worker(f"edge{edge}", self.make_edge(edge, first_life))
        self.workers.append(worker)
        return worker

    def spawn_cloud(self) -> _Worker:
        worker = _Worker("cloud", self.make_cloud())
        self.workers.append(worker)
        return worker

    def submit(self, worker: _Worker, method: str, *args: Any, returns: int = 1) -> Any:
        futures = [concurrent.futures.Future() for _ in range(returns)]
        worker.tasks.put((method, args, futures))
        return futures[0] if returns == 1 else tuple(futures)

    def wait(self, futures: Sequence[Any], timeout_s: float) -> list[Any]:
        done, _ = concurrent.futures.wait(futures, timeout=timeout_s, return_when=concurrent.futures.FIRST_COMPLETED)
        return [f for f in futures if f in done]

    def get(self, future: concurrent.futures.Future, timeout_s: float) -> Any:
        try:
            return future.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"no result within {timeout_s:g} s") from None

    def alive(self, worker: _Worker) -> bool:
        return not worker.dead

    def kill(self, worker: _Worker) -> None:
        worker.dead = True
        worker.tasks.put(None)

    def traffic(self) -> dict[str, str]:
        return {}  # one process: nothing crosses a network

    def report(self) -> dict | None:
        return None

    def stop(self, finished: bool = True, join_s: float = 60.0) -> None:
        for worker in self.workers:
            worker.dead = True
            worker.tasks.put(None)
        stuck = [w.name for w in _joined(self.workers, join_s)]
        if stuck:
            raise RuntimeError(f"worker thread(s) {', '.join(stuck)} did not stop within {join_s:g} s")


def _joined(workers: Iterable[_Worker], timeout_s: float) -> list[_Worker]:
    """Join every worker's thread (each finishes the task it runs); those still alive after `timeout_s`."""
    stuck = []
    for worker in workers:
        worker.thread.join(timeout_s)
        if worker.thread.is_alive():
            stuck.append(worker)
    return stuck
