"""The remote backend of the one scheduler: the cloud's worker on a thread of this process, each edge
a process elsewhere that dialled in (`transport`). A task for an edge becomes a call frame on its
stream, its result the reply; the futures are the thread backend's, so the scheduler cannot tell.

An edge whose stream ends is lost (its pending tasks fail with `WorkerLost`); a restart
(`spawn_edge(e, first_life=False)`) waits, bounded, for edge e to dial in again, and an edge that
holds the checkpoint it is to restart from (the same digest, listed in its hello) continues from its
own instead of being sent the state. An edge may dial in 1 + `max_restarts` times; a new connection
of an edge that is still connected replaces the old one (the old one may be dead without a word).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from hier_jax.errors import WorkerError
from hier_jax.remote import codec
from hier_jax.remote.transport import BYE, CALL, FAILED, FINISHED, REPLY, STOPPED, CloudServer, Connection
from hier_jax.run.backends import ThreadBackend, WorkerLost, fail_all, resolved


class EdgeFailed(WorkerError):
    """A call an edge process could not carry out (its error, one line; exit 1)."""


class RemoteEdge:
    """One connected edge: tasks go down its stream in order, their results come back in order."""

    def __init__(
        self, connection: Connection, payload_limit: int, known: dict[str, Any], on_lost: Callable[[str], None]
    ):
        self.connection, self.payload_limit, self.known, self.dead = connection, payload_limit, known, False
        self.edge, self.on_lost, self.closing = connection.edge, on_lost, False
        self.own = {int(k): str(v) for k, v in connection.hello.get("checkpoints", {}).items()}
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
            was_dead, self.dead = self.dead, True
            pending, self.calls = list(self.calls.values()), {}
        for futures in pending:
            fail_all(futures, WorkerLost(why))
        if not was_dead and not self.closing:  # the end of the run closes it: no drop
            self.on_lost(why)

    def close(self, goodbye: bool, finished: bool = True) -> None:
        """End the connection; `goodbye`: tell the edge whether the run `finished` or stopped (it then
        waits, bounded, for the cloud to resume)."""
        self.closing = True
        if goodbye and not self.dead:
            self.connection.send(BYE, 0, FINISHED if finished else STOPPED)
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
        max_restarts: int = 0,
    ):
        super().__init__(lambda e, first: None, make_cloud)
        self.server, self.payload_limit, self.known, self.timeout_s = server, payload_limit, known, timeout_s
        self.log, self.max_connections = log, 1 + max_restarts
        self.waiting: dict[int, Connection] = {}
        self.remote: list[RemoteEdge] = []
        self.dialled: dict[int, int] = {}  # connections each edge was let in with
        self.events: list[dict] = []  # per edge: connected, dropped, replaced, refused; seconds since the start
        self.start = time.monotonic()
        self.lock = threading.Lock()
        server.admit = self.admit

    def event(self, edge: int, what: str, **details: Any) -> None:
        with self.lock:
            at = round(time.monotonic() - self.start, 3)
            self.events.append({"at_s": at, "edge": edge, "event": what, **details})

    def admit(self, edge: int) -> str | None:
        """Let edge `edge` in while it has connections left; a still connected one is replaced."""
        with self.lock:
            if self.dialled.get(edge, 0) >= self.max_connections:
                line = f"edge {edge} has dialled in {self.max_connections} times, all this run allows (--max-restarts)"
            else:
                self.dialled[edge] = self.dialled.get(edge, 0) + 1
                line = None
            live = [w for w in self.remote if w.edge == edge and not w.dead]
        if line is not None:
            self.event(edge, "refused", why=line)
            return line
        for old in live:
            old._lost(f"edge {edge} dialled in again: its connection from {old.connection.peer} is replaced")
            old.close(goodbye=False)
        return None

    def spawn_edge(self, edge: int, first_life: bool = True) -> RemoteEdge:
        """Edge `edge`'s connection: the one it made (a restart: the next one it makes)."""
        if not first_life:
            self.log(f"waiting up to {self.timeout_s:g} s for edge {edge} to dial in again")
        while edge not in self.waiting:
            connection = self.server.accept(self.timeout_s)
            self.waiting[connection.edge] = connection
        connection = self.waiting.pop(edge)
        self.log(f"edge {edge} connected from {connection.peer}" + ("" if first_life else " (a restart)"))
        self.event(edge, "connected" if first_life else "reconnected", peer=connection.peer)

        def lost(why: str) -> None:
            self.log(why)
            self.event(edge, "dropped", why=why)

        worker = RemoteEdge(connection, self.payload_limit, self.known, lost)
        self.remote.append(worker)
        return worker

    def submit(self, worker: Any, method: str, *args: Any, returns: int = 1) -> Any:
        if not isinstance(worker, RemoteEdge):
            return super().submit(worker, method, *args, returns=returns)
        if method in ("resume", "load") and args[0] is not None:
            method, args = self.from_own(worker, method, args)
        futures = worker.submit(method, args, returns)
        return futures[0] if returns == 1 else tuple(futures)

    def from_own(self, worker: RemoteEdge, method: str, args: tuple) -> tuple[str, tuple]:
        """`resume`/`load` from the edge's own checkpoint when it holds this one, else as asked."""
        state, start = resolved(args[0]), args[1]
        if worker.own.get(start) == codec.digest(state):
            self.log(f"edge {worker.edge} continues from its own checkpoint of step {start} (no state sent)")
            return f"{method}_own", args[1:]
        self.log(f"edge {worker.edge} holds no checkpoint of step {start}: sending it the cloud's copy")
        return method, (state, *args[1:])

    def traffic(self) -> dict[str, str]:
        """Bytes/s each way since the first connection, and the reconnects, for the progress line."""
        elapsed = max(time.monotonic() - self.start, 1e-9)
        up, down = sum(w.bytes_up for w in self.remote), sum(w.bytes_down for w in self.remote)
        reconnects = sum(1 for e in self.events if e["event"] == "reconnected")
        rate = {"up": up / elapsed, "down": down / elapsed}
        return {k: f"{v / 1e3:.0f}kB/s" for k, v in rate.items()} | {"rejoined": str(reconnects)}

    def report(self) -> dict:
        """The summary's "network": per edge, its bytes each way and its connection events."""
        edges = sorted({w.edge for w in self.remote} | {e["edge"] for e in self.events})
        return {
            str(e): {
                "bytes_up": sum(w.bytes_up for w in self.remote if w.edge == e),
                "bytes_down": sum(w.bytes_down for w in self.remote if w.edge == e),
                "connections": [x for x in self.events if x["edge"] == e],
            }
            for e in edges
        }

    def alive(self, worker: Any) -> bool:
        return not worker.dead if isinstance(worker, RemoteEdge) else super().alive(worker)

    def kill(self, worker: Any) -> None:
        if isinstance(worker, RemoteEdge):
            worker.close(goodbye=False)
        else:
            super().kill(worker)

    def stop(self, finished: bool = True, join_s: float = 60.0) -> None:
        for worker in self.remote:
            worker.close(goodbye=True, finished=finished)
            self.log(f"edge {worker.edge}: {worker.bytes_down:,} B of calls down, {worker.bytes_up:,} B of results up")
        try:
            super().stop(finished, join_s)
        finally:
            for worker in self.remote:
                worker.sender.join(join_s)
            self.server.stop()
