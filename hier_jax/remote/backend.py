"""The remote backend of the one scheduler: the cloud's worker on a thread of this process, each edge
a process elsewhere that dialled in (`transport`). A task for an edge becomes a call frame on its
stream, its result the reply; the futures are the thread backend's, so the scheduler cannot tell.

An edge whose stream ends is lost (its pending tasks fail with `WorkerLost`); a restart
(`spawn_edge(e, first_life=False)`) waits, bounded, for edge e to dial in again.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import queue
import threading
from collections.abc import Callable
from typing import Any

from hier_jax.errors import WorkerError
from hier_jax.remote import codec
from hier_jax.remote.transport import BYE, CALL, FAILED, REPLY, CloudServer, Connection
from hier_jax.run.backends import ThreadBackend, WorkerLost, fail_all, resolved

EDGE_METHODS = frozenset(
    {"placement", "step", "apply", "resume", "params", "set_params", "state_now", "load", "evaluate"}
)
"""What the cloud may ask of an edge: nothing else runs there, whatever a cloud sends."""


class EdgeFailed(WorkerError):
    """A call an edge process could not carry out (its error, one line; exit 1)."""


class RemoteEdge:
    """One connected edge: tasks go down its stream in order, their results come back in order."""

    def __init__(self, connection: Connection, payload_limit: int, known: dict[str, Any]):
        self.connection, self.payload_limit, self.known, self.dead = connection, payload_limit, known, False
        self.edge = connection.edge
        self.tasks: queue.Queue = queue.Queue()
        self.calls: dict[int, list[concurrent.futures.Future]] = {}
        self.ids = itertools.count(1)
        self.lock = threading.Lock()
        self.bytes_down = self.bytes_up = 0
        self.sender = threading.Thread(target=self._send, name=f"hier-send-edge{self.edge}", daemon=True)
        self.receiver = threading.Thread(target=self._receive, name=f"hier-recv-edge{self.edge}", daemon=True)
        self.sender.start()
        self.receiver.start()

    def submit(self, method: str, args: tuple, returns: int) -> list[concurrent.futures.Future]:
        futures = [concurrent.futures.Future() for _ in range(returns)]
        self.tasks.put((method, args, futures))
        return futures

    def _send(self) -> None:
        while (task := self.tasks.get()) is not None:
            method, args, futures = task
            try:
                args = [resolved(a) for a in args]
                body = codec.encode({"method": method, "args": list(args)}, self.known)
            except BaseException as error:  # noqa: BLE001 - handed to whoever waits on the futures
                fail_all(futures, error)
                continue
            with self.lock:
                if self.dead:
                    fail_all(futures, WorkerLost(f"edge {self.edge}'s connection is gone"))
                    continue
                call = next(self.ids)
                self.calls[call] = futures
            self.bytes_down += len(body)
            self.connection.send(CALL, call, body)

    def _receive(self) -> None:
        while (item := self.connection.incoming.get()) is not None:
            kind, call, body = item
            with self.lock:
                futures = self.calls.pop(call, None)
            if futures is None:
                continue
            self.bytes_up += len(body)
            try:
                if kind == FAILED:
                    raise EdgeFailed(f"edge {self.edge} failed: {body.decode()}")
                if kind != REPLY:
                    raise RuntimeError(f"edge {self.edge} sent a frame of kind {kind} for call {call}")
                result = codec.decode(body, payload_limit=self.payload_limit, known=self.known)
            except BaseException as error:  # noqa: BLE001 - handed to whoever waits on the futures
                fail_all(futures, error)
                continue
            results = (result,) if len(futures) == 1 else result
            for future, value in zip(futures, results, strict=True):
                future.set_result(value)
        self._lost(f"edge {self.edge}'s connection ({self.connection.peer}) ended")

    def _lost(self, why: str) -> None:
        with self.lock:
            self.dead = True
            pending, self.calls = list(self.calls.values()), {}
        for futures in pending:
            fail_all(futures, WorkerLost(why))

    def close(self, goodbye: bool) -> None:
        if goodbye and not self.dead:
            self.connection.send(BYE, 0, b"")
        self.tasks.put(None)
        self.connection.close()


class RemoteBackend(ThreadBackend):
    """The thread backend with its edges replaced by the processes that dialled `server`."""

    def __init__(
        self,
        server: CloudServer,
        make_cloud: Callable[[], Any],
        payload_limit: int,
        known: dict[str, Any],
        timeout_s: float,
        log: Callable[[str], None],
    ):
        super().__init__(lambda e, first: None, make_cloud)
        self.server, self.payload_limit, self.known, self.timeout_s = server, payload_limit, known, timeout_s
        self.log = log
        self.waiting: dict[int, Connection] = {}
        self.remote: list[RemoteEdge] = []

    def spawn_edge(self, edge: int, first_life: bool = True) -> RemoteEdge:
        """Edge `edge`'s connection: the one it made (a restart: the next one it makes)."""
        if not first_life:
            self.log(f"edge {edge}'s connection ended; waiting up to {self.timeout_s:g} s for it to dial in again")
        while edge not in self.waiting:
            connection = self.server.accept(self.timeout_s)
            self.waiting[connection.edge] = connection
        connection = self.waiting.pop(edge)
        self.log(f"edge {edge} connected from {connection.peer}" + ("" if first_life else " (a restart)"))
        worker = RemoteEdge(connection, self.payload_limit, self.known)
        self.remote.append(worker)
        return worker

    def submit(self, worker: Any, method: str, *args: Any, returns: int = 1) -> Any:
        if not isinstance(worker, RemoteEdge):
            return super().submit(worker, method, *args, returns=returns)
        futures = worker.submit(method, args, returns)
        return futures[0] if returns == 1 else tuple(futures)

    def alive(self, worker: Any) -> bool:
        return not worker.dead if isinstance(worker, RemoteEdge) else super().alive(worker)

    def kill(self, worker: Any) -> None:
        if isinstance(worker, RemoteEdge):
            worker.close(goodbye=False)
        else:
            super().kill(worker)

    def stop(self, join_s: float = 60.0) -> None:
        for worker in self.remote:
            worker.close(goodbye=True)
            self.log(f"edge {worker.edge}: {worker.bytes_down:,} B of calls down, {worker.bytes_up:,} B of results up")
        try:
            super().stop(join_s)
        finally:
            for worker in self.remote:
                worker.sender.join(join_s)
            self.server.stop()
