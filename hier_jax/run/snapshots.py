"""Checkpoints taken while a run goes on: every worker's state at one step, paired, and written by a
thread of its own so that saving never holds the next step back (unless saving is the slowest part).

A checkpoint at step k pairs each edge's state after its step k - 1 with the cloud's state before its
first step on a payload of a step >= k. The scheduler asks each worker for a copy of its state at
that point of the worker's own queue of tasks (`Snapshots.take_edge`, `take_cloud`), so no worker
waits for another: an edge running ahead of the cloud (through a link outage, say) keeps training.
Once every part of step k has arrived, the writer thread saves it (after checking that every state is
finite). Copies are bounded: while `WRITE_BACKLOG` checkpoints wait for the writer the scheduler
starts no new edge step, and at most `UNPAIRED` checkpoints wait for their parts, the oldest dropped.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hier_jax.errors import DivergenceError
from hier_jax.run.checkpoint import RunCheckpoints
from hier_jax.run.record import tree_is_finite

WRITE_BACKLOG = 2  # checkpoints complete and not yet written: past this, no new edge step starts
UNPAIRED = 4  # checkpoints still waiting for a part; past this the oldest gets no checkpoint


@dataclasses.dataclass
class Pending:
    """One checkpoint being gathered: the state futures of each live edge and of the cloud."""

    step: int
    edges: dict[int, Any] = dataclasses.field(default_factory=dict)
    cloud: Any = None
    cloud_index: int | None = None  # how many cloud steps come before the cloud's state


class Snapshots:
    """The checkpoints of one run (see the module docstring). `meta(step, cloud_index)` gives a
    checkpoint's metadata when its parts are all there."""

    def __init__(
        self,
        store: RunCheckpoints | None,
        every: int,
        steps: int,
        first: int,
        meta: Callable[[int, int, list[int]], dict],
    ):
        self.store, self.every, self.steps, self.meta = store, every if store is not None else 0, steps, meta
        self.pending: dict[int, Pending] = {}
        self.saved_step = first  # the latest checkpoint written (or resumed from)
        self.saved_path: Path | None = store.path(first) if store is not None and first else None
        # The edges' states of the latest checkpoint gathered (written or not): what a restarted edge starts from.
        self.restart_step, self.restart_states = first, {}
        self.errors: list[BaseException] = []
        self._queue: queue.Queue = queue.Queue()
        self._unwritten = 0
        self._lock = threading.Lock()
        self._writer: threading.Thread | None = None

    def due(self, step: int) -> bool:
        """Is a checkpoint taken at `step`? Every `every` steps, and at the end."""
        return self.store is not None and (step == self.steps or (self.every > 0 and step % self.every == 0))

    def backlogged(self) -> bool:
        with self._lock:
            return self._unwritten >= WRITE_BACKLOG

    def take_edge(self, step: int, edge: int, future: Any) -> None:
        pending = self.pending.setdefault(step, Pending(step))
        pending.edges[edge] = future
        while len(self.pending) > UNPAIRED:
            del self.pending[min(self.pending)]

    def forget_edge(self, edge: int, failed: Callable[[Any], bool], resume_at: int) -> None:
        """Edge `edge` restarts at `resume_at`: a checkpoint its dead worker's state was to come from
        takes the new worker's, if that worker will reach its step; otherwise it is dropped."""
        for step, pending in list(self.pending.items()):
            if edge in pending.edges and failed(pending.edges[edge]):
                if step >= resume_at:
                    del pending.edges[edge]
                else:
                    del self.pending[step]

    def waiting_for_cloud(self, below: int) -> list[Pending]:
        """The checkpoints at steps <= `below` whose cloud state is still to be taken."""
        return [p for k, p in sorted(self.pending.items()) if k <= below and p.cloud is None]

    def take_cloud(self, pending: Pending, future: Any, cloud_index: int) -> None:
        pending.cloud, pending.cloud_index = future, cloud_index

    def ready(self, live: list[int], done: Callable[[Any], bool], recorded: int) -> list[Pending]:
        """The gathered checkpoints whose every part has arrived (the cloud's record included)."""
        complete = [
            p
            for p in self.pending.values()
            if p.cloud is not None
            and done(p.cloud)
            and p.cloud_index is not None
            and p.cloud_index <= recorded
            and all(e in p.edges and done(p.edges[e]) for e in live)
        ]
        for p in complete:
            del self.pending[p.step]
        return sorted(complete, key=lambda p: p.step)

    def write(self, pending: Pending, get: Callable[[Any], Any], live: list[int], *, wait: bool = False) -> None:
        """Hand a complete checkpoint to the writer (with `wait`, write it here and now)."""
        edges = {e: get(pending.edges[e]) for e in live}
        cloud = get(pending.cloud)
        self.restart_step, self.restart_states = pending.step, edges
        assert pending.cloud_index is not None
        item = (pending.step, edges, cloud, self.meta(pending.step, pending.cloud_index, live))
        if wait:
            self._save(*item)
            return
        with self._lock:
            self._unwritten += 1
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_all, name="hier-checkpoint", daemon=True)
            self._writer.start()
        self._queue.put(item)

    def _write_all(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                if not self.errors:
                    self._save(*item)
            except BaseException as error:  # noqa: BLE001 - raised by the scheduler
                self.errors.append(error)
            finally:
                with self._lock:
                    self._unwritten -= 1

    def _save(self, step: int, edges: dict[int, Any], cloud: Any, meta: dict) -> None:
        """Save (unless a state is not finite, or a checkpoint of this step exists from before a stop)."""
        assert self.store is not None
        for name, state in [*((f"edge {e}", s) for e, s in edges.items()), ("cloud", cloud)]:
            if not tree_is_finite(state):
                side, _, edge = name.partition(" ")
                raise DivergenceError(side, step - 1, float("nan"), self.saved_path, edge=int(edge) if edge else None)
        if step not in self.store.steps():
            self.store.save(step, {str(e): s for e, s in edges.items()}, cloud, meta)
        self.saved_step, self.saved_path = step, self.store.path(step)

    def close(self) -> None:
        """Write what is queued (Ctrl-C lands between writes, never inside one) and stop the writer."""
        if self._writer is not None:
            self._queue.put(None)
            while self._writer.is_alive():
                try:
                    self._writer.join()
                except KeyboardInterrupt:  # the writes finish first; the stop is noted by the caller
                    continue
            self._writer = None
