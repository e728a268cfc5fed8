"""The calling thread's side of an in-process run: snapshots for checkpoints, Ctrl-C, errors and
the deadline, while the steps run on worker threads (`threads`).

- every `snapshot_every` steps each side hands over a copy of its state, and once both sides have
  reached the same step the supervisor hands the pair to a writer thread that calls `on_snapshot`
  (a checkpoint save), in step order: saving never blocks the next step, and a Ctrl-C, which always
  lands in the calling thread, never lands inside a save;
- each side checks its loss a few steps behind the newest (`FiniteCheck`: reading a finished step
  never stalls dispatch) and stops the run with a `DivergenceError` naming the side and step;
- Ctrl-C (KeyboardInterrupt in the calling thread) is a graceful stop: the edge starts no new step,
  the cloud consumes what was already sent, and the run returns with both sides at the same step. A
  second Ctrl-C aborts at once.
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import sys
import threading
import time
from collections.abc import Callable

import jax

from hier_jax import steps
from hier_jax.devices import Device, place
from hier_jax.run.record import RunRecord, check_finite

POLL_S = 0.05  # how often a blocked wait checks the run's stop event
JOIN_GRACE_S = 60.0  # after a stop, how long a worker may take to finish the step it is running
FINITE_LAG = 2  # a side checks the loss of the step this many steps behind its newest
WRITE_BACKLOG = 2  # snapshot pairs queued or being written; a side waits before offering another
UNPAIRED_PER_SIDE = 4  # copies a side may offer ahead of the other (an outage); older ones are dropped


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """Copies of both states after `step` steps, with the record of this run's steps before it."""

    step: int
    edge_state: steps.State
    cloud_state: steps.State
    record: RunRecord


class FiniteCheck:
    """One side's divergence check, `lag` steps behind its newest step so it never stalls dispatch."""

    def __init__(self, side: str, lag: int):
        self.side, self.lag = side, lag
        self.pending: collections.deque = collections.deque()

    def push(self, t: int, metrics: dict[str, jax.Array]) -> None:
        if "loss" not in metrics:  # a side that trains nothing (the end-to-end baseline's edge)
            return
        self.pending.append((t, metrics["loss"]))
        while len(self.pending) > self.lag:
            check_finite(self.side, *self.pending.popleft())

    def flush(self) -> None:
        while self.pending:
            check_finite(self.side, *self.pending.popleft())


class Supervisor:
    """The calling thread's side of a run: snapshots, Ctrl-C, errors and the deadline.

    Workers report with `fail` (any exception; stops everything at once) and `offer` (a state copy of
    one side at a snapshot step). `stop` makes every wait return; `stop_request` only asks the edge
    to start no new step, so what is already in flight is finished and consumed.

    State copies are bounded. Paired snapshots queue for the writer thread; while `WRITE_BACKLOG`
    pairs are unwritten, a side waits before copying its state again (when saving is slower than
    the checkpoint cadence, training slows to it rather than piling copies up in memory). A side
    never waits for the other: one running ahead (the edge through a link outage) keeps at most
    `UNPAIRED_PER_SIDE` unpaired copies, dropping the oldest, whose step then gets no checkpoint.
    """

    def __init__(
        self,
        start_step: int,
        snapshot_every: int,
        on_snapshot: Callable[[Snapshot], None] | None,
        timeout_s: float | None,
    ):
        if snapshot_every < 0:
            raise ValueError(f"snapshot_every must be >= 0, got {snapshot_every}")
        self.start_step = start_step
        self.every = snapshot_every if on_snapshot is not None else 0
        self.on_snapshot = on_snapshot
        self.timeout_s = timeout_s
        self.stop = threading.Event()
        self.stop_request = threading.Event()
        self.errors: list[BaseException] = []
        self.interrupted = False
        self._offers: queue.Queue = queue.Queue()
        self._pending: dict[str, dict[int, steps.State]] = {"edge": {}, "cloud": {}}
        self._pairs: queue.Queue = queue.Queue()  # (step, edge state, cloud state) for the writer; None ends it
        self._unwritten = 0
        self._written = threading.Condition()

    def halted(self) -> bool:
        return self.stop.is_set() or self.stop_request.is_set()

    def fail(self, error: BaseException) -> None:
        self.errors.append(error)
        self.stop.set()

    def is_boundary(self, step: int) -> bool:
        return self.every > 0 and step > self.start_step and step % self.every == 0

    def boundaries_between(self, first: int, last: int) -> range:
        """Snapshot steps k with first <= k <= last."""
        if self.every <= 0:
            return range(0)
        k = max(first, self.start_step + 1)
        k = -(-k // self.every) * self.every
        return range(k, last + 1, self.every)

    def offer(self, side: str, step: int, state: steps.State, device: Device) -> None:
        """Hand over a copy of `side`'s state after `step` steps, once the writer's backlog allows."""
        with self._written:
            while self._unwritten >= WRITE_BACKLOG and not self.stop.is_set():
                self._written.wait(POLL_S)
        self._offers.put((side, step, place(state, device)))

    def supervise(self, threads: list[threading.Thread], metrics: Callable[[int], RunRecord]) -> float:
        """Start `threads`, serve snapshots until they end, then join them; returns the wall time.

        `metrics(k)` gives the record of this run's steps before k.
        """
        start = time.perf_counter()
        deadline = None if self.timeout_s is None else start + self.timeout_s
        writer = threading.Thread(target=self._write, args=(metrics,), name="hier-checkpoint", daemon=True)
        try:
            writer.start()
            for thread in threads:
                thread.start()
            while any(t.is_alive() for t in threads) and not self.errors:
                if deadline is not None and time.perf_counter() > deadline:
                    self.fail(TimeoutError(f"run did not finish within {self.timeout_s} s"))
                    break
                try:
                    self._serve(block=True)
                except KeyboardInterrupt:
                    self._interrupt()
        finally:
            try:
                self._join(threads)
            finally:
                wall_s = time.perf_counter() - start
                while self._serve(block=False):  # the last snapshots, offered just before the workers ended
                    pass
                self._pairs.put(None)
                self._join([writer])
        return wall_s

    def _write(self, metrics: Callable[[int], RunRecord]) -> None:
        """The writer thread: `on_snapshot` for each paired snapshot, in step order, until None."""
        while (pair := self._pairs.get()) is not None:
            step, edge_state, cloud_state = pair
            try:
                if not self.errors:  # a failed run saves nothing more
                    assert self.on_snapshot is not None  # pairs are made only when there is one (self.every > 0)
                    self.on_snapshot(Snapshot(step, edge_state, cloud_state, metrics(step)))
            except BaseException as error:  # noqa: BLE001 - a failed save stops the run, re-raised by the caller
                self.fail(error)
            finally:
                del pair, edge_state, cloud_state
                with self._written:
                    self._unwritten -= 1
                    self._written.notify_all()

    def _interrupt(self) -> None:
        if self.stop_request.is_set():
            print("\nsecond interrupt: aborting without finishing the step in flight", file=sys.stderr, flush=True)
            self.stop.set()
            return
        self.interrupted = True
        self.stop_request.set()
        print(
            "\ninterrupted: stopping both sides after the steps in flight (Ctrl-C again to abort)",
            file=sys.stderr,
            flush=True,
        )

    def _serve(self, block: bool) -> bool:
        """Take one offered state; queue a completed pair for the writer. False when nothing was offered."""
        try:
            side, step, state = self._offers.get(timeout=POLL_S) if block else self._offers.get_nowait()
        except queue.Empty:
            return False
        pending = self._pending[side]
        pending[step] = state
        if step in self._pending["edge"] and step in self._pending["cloud"]:
            with self._written:
                self._unwritten += 1
            self._pairs.put((step, self._pending["edge"].pop(step), self._pending["cloud"].pop(step)))
            for side_pending in self._pending.values():  # older unmatched offers can never pair now
                for old in [k for k in side_pending if k < step]:
                    del side_pending[old]
        while len(pending) > UNPAIRED_PER_SIDE:
            del pending[min(pending)]
        return True

    def _join(self, threads: list[threading.Thread]) -> None:
        """Join every worker; after an error or abort each gets `JOIN_GRACE_S` to finish its step."""
        if self.errors:
            self.stop.set()
        deadline = None
        for thread in threads:
            while thread.is_alive():  # False for a thread never started
                try:
                    if self.stop.is_set() and deadline is None:
                        deadline = time.perf_counter() + JOIN_GRACE_S
                    if deadline is not None and time.perf_counter() > deadline:
                        raise RuntimeError(f"thread {thread.name} did not stop within {JOIN_GRACE_S} s of the stop")
                    thread.join(POLL_S)
                except KeyboardInterrupt:
                    self._interrupt()
