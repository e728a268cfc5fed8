"""The one scheduler of every run: which steps each edge has been asked for, which the cloud has
trained on, what waits on what. It decides what each worker does next, on any backend (`backends`:
threads in this process, or Ray processes), and nothing else does.

Flow control: an edge may be at most `ahead` steps past what the cloud has settled of its payloads
(trained on, dropped by the link, or held in the edge's outage buffer): queue_size + 1 in the
pipelined schedule, 1 in the sequential one (and in split learning, whose edge waits for its
gradient). Model averaging (`edge_sync`) is a barrier: no edge starts step K before every live edge
has finished step K - 1 and the average is in. Checkpoints are not barriers (`snapshots`).

Order: round robin hands the cloud edge 0 step 0, edge 1 step 0, ..., edge 0 step 1, ... (fixed, so
a run is reproducible; one edge is the sequential reference); async takes payloads as they come.

Links (`ExperimentConfig.link`): each edge's payloads go through a `link.BufferedLink`, whose clock
starts from the wall-clock time the edge step finished; the cloud step sleeps until its payload has
arrived. While an edge's link is down its payloads wait in its buffer and the oldest are dropped;
every payload is delivered or counted as dropped.

Faults: an edge whose worker dies is restarted while it has restarts left (`max_restarts`): a new
worker starts from the last checkpoint's state (the initial state without one), replays the steps up
to the first one the cloud has not trained on without sending them again, and goes on; past that it
is lost and the others go on. A dead cloud stops the run. A NaN or infinite loss stops it naming the
side, the edge and the step. Every wait is bounded by the run's timeout.

Stopping: Ctrl-C or SIGTERM (noted between decisions, never inside one) starts no new step past the
furthest edge's, lets what is in flight finish, brings every edge to that step, checkpoints it and
raises `RunInterrupted`; a second one stops at once (`RunAborted`), keeping the last checkpoint.
"""

from __future__ import annotations

import collections
import itertools
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from hier_jax.config import ExperimentConfig
from hier_jax.errors import DivergenceError, RunAborted, RunInterrupted, WorkerError, WorkerTimeout
from hier_jax.link import BufferedLink, LinkClock
from hier_jax.run.progress import Progress
from hier_jax.run.record import RunRecord, check_finite
from hier_jax.run.result import EdgeReport
from hier_jax.run.snapshots import Snapshots

POLL_S = 0.1  # how often a wait looks at the interrupt flag


def edge_links(config: ExperimentConfig, edges: int) -> list[BufferedLink | None]:
    """Each edge's link as the scheduler replays it (None: an instant hand-off)."""
    links = []
    for e in range(edges):
        preset = config.link.preset(e)
        links.append(
            None
            if preset is None
            else BufferedLink(
                LinkClock(preset, time_scale=config.link.time_scale, outages=config.link.outages), config.link.buffer
            )
        )
    return links


class Interrupts:
    """Ctrl-C and SIGTERM while the scheduler runs, counted instead of raised where it can install
    handlers (the main thread); elsewhere a KeyboardInterrupt is caught and counted the same way."""

    def __init__(self):
        self.count, self._saved = 0, {}

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._saved[sig] = signal.signal(sig, self._note)
        return self

    def _note(self, signum, frame) -> None:
        self.note()

    def note(self) -> None:
        self.count += 1
        if self.count == 1:
            print(
                "\ninterrupted: finishing the steps in flight, then saving (Ctrl-C again to stop at once)", flush=True
            )
        else:
            raise RunAborted("stopped at once by a second interrupt; the last periodic checkpoint is kept")

    def __exit__(self, *exc) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)


class Scheduler:
    """One run's loop (see the module docstring) over `backend`'s workers: `edges[e]` and `cloud` are
    worker handles, `average(live)` averages the live edges' models."""

    def __init__(
        self,
        backend,
        edges: list,
        cloud,
        config: ExperimentConfig,
        reports: list[EdgeReport],
        record: RunRecord,
        steps: int,
        first: int,
        snapshots: Snapshots,
        average: Callable,
        timeout_s: float,
    ):
        self.backend, self.edges, self.cloud = backend, edges, cloud
        self.config, self.steps, self.snapshots, self.average, self.timeout_s = (
            config,
            steps,
            snapshots,
            average,
            timeout_s,
        )
        n = self.n = len(edges)
        self.reports, self.record = reports, record
        self.resumed_cloud_steps = len(record.cloud["step"])
        self.delivered = [record.delivered(e) for e in range(n)]  # edge steps the cloud trained on
        self.submitted = [first] * n  # edge steps submitted
        self.settled = [first] * n  # edge steps trained on, skipped as already trained on, or dropped
        self.pending: dict[Any, tuple[str, int, int]] = {}  # future -> (kind, edge, step)
        self.payloads: dict[tuple[int, int], Any] = {}  # payload futures of edge steps not yet given to the cloud
        self.arrived: dict[tuple[int, int], float] = {}  # round robin: the turns the cloud may be handed, when ready
        self.dropped_turns: set[tuple[int, int]] = set()
        self.links = edge_links(config, n)
        self.split = config.scheme == "split_learning"
        # Without restarts, links or a reply, round robin queues a cloud step on the payload's future at once
        # (the worker starts it when the payload exists), which keeps the scheduler's round trip off the
        # pipeline's critical path. Otherwise the cloud is handed only finished edge steps, so no cloud step
        # ever waits on a payload a dying edge will never produce, and the link's clock knows when it was ready.
        self.eager = config.order == "round_robin" and config.max_restarts == 0 and not any(self.links)
        self.rr_next = collections.deque(
            sorted(((e, t) for t in range(first, steps) for e in range(n)), key=self.turn_order)
        )
        self.restarting: set[int] = set()  # edges whose worker died and that will come back
        self.redone: set[tuple[int, int]] = set()  # steps a restarted edge recomputes that the cloud trained on
        self.restarted_placement: dict[int, Any] = {}
        self.synced_through = first - first % config.edge_sync if config.edge_sync else 0
        self.ahead = 1 if config.schedule == "sequential" or self.split else config.queue_size + 1
        self.first = first  # the step the run starts (or resumes) at
        self.cloud_submitted = len(record.cloud["step"])  # cloud steps handed over, since step 0
        self.cloud_done: dict[int, dict] = {}  # cloud results by the cloud's own step index, until in order
        self.limit = steps  # the step every edge stops at: the run's end, or where an interrupt stops it
        self.interrupts = Interrupts()
        self.payload_bytes = 0  # what one batch sends, as measured (split learning: up and down)
        self.deadline = time.monotonic() + timeout_s

    def turn_order(self, turn: tuple[int, int]) -> tuple[int, int, int]:
        """Round robin's order: edge 0 step 0, edge 1 step 0, ..., edge 0 step 1, ...; a payload held by
        its link's outage takes its turn in the round its link comes back up in (the first step at
        which it is up again, or the last step), just before that step's own payload. The outages are
        scripted in steps, so this order is as fixed as the rest."""
        e, t = turn
        link, release = self.links[e], t
        while link is not None and link.clock.down(release) and release < self.steps - 1:
            release += 1
        return release, e, t

    def alive(self, e: int) -> bool:
        return not self.reports[e].lost and e not in self.restarting

    def live(self) -> list[int]:
        return [e for e in range(self.n) if not self.reports[e].lost]

    def get(self, future, what: str):
        try:
            return self.backend.get(future, self.timeout_s)
        except TimeoutError:
            raise WorkerTimeout(f"timed out after {self.timeout_s:g} s waiting for {what}") from None

    def held(self, e: int) -> int:
        link = self.links[e]
        return 0 if link is None else link.held

    # --- the loop ------------------------------------------------------------------------------

    def drive(self, progress: bool) -> float:
        """Run to the end (or the interrupt's step); this run's wall time."""
        start = time.perf_counter()
        bar = Progress(progress, self.steps * self.n, "cloud steps", self.resumed_cloud_steps, self.backend.traffic)
        try:
            with self.interrupts:
                self._loop(bar)
        except DivergenceError as diverged:
            raise diverged.with_checkpoint(self.keep_checkpoints_before(diverged.step)) from None
        finally:
            bar.close()
        return time.perf_counter() - start

    def keep_checkpoints_before(self, step: int):
        """A run that diverged at `step` still writes the checkpoints it has gathered up to that step
        (their states come before it); the last one written."""
        if not self.snapshots.errors:

            def done(future) -> bool:
                return self.backend.wait([future], 0) != []

            for pending in self.snapshots.ready(self.live(), done, len(self.record.cloud["step"])):
                if pending.step <= step:
                    self.snapshots.write(pending, lambda f: self.get(f, "a worker's state"), self.live())
        self.snapshots.close()
        return self.snapshots.saved_path

    def _loop(self, bar: Progress) -> None:
        while True:
            if self.snapshots.errors:
                raise self.snapshots.errors[0]
            if self.interrupts.count and self.limit == self.steps:
                self.limit = max(self.submitted[e] for e in self.live())
            for e in sorted(self.restarting):
                if not any(edge == e for _, edge, _ in self.pending.values()):
                    self.restart(e)
            sync = self.synced_through + self.config.edge_sync if self.config.edge_sync else self.steps
            barrier = min(sync, self.limit)
            self.submit_edge_steps(barrier)
            if self.config.order == "round_robin":
                self.feed_round_robin()
            self.take_cloud_snapshots()
            self.write_snapshots()
            if self.sync_due(barrier):
                self.average([self.edges[e] for e in range(self.n) if self.alive(e)])
                self.synced_through = barrier
                continue
            if not self.pending:
                if not self.snapshots.backlogged():
                    break
                time.sleep(POLL_S)  # the writer is behind: no step starts until it catches up
                continue
            for future in self.wait():
                taken = len(self.record.cloud["step"])
                self.handle(future)
                for _ in range(len(self.record.cloud["step"]) - taken):
                    bar.update(self.record.cloud["loss"][-1])
        self.finish_links()
        self.write_snapshots()
        self.final_snapshot()
        if self.limit < self.steps:
            raise RunInterrupted(
                self.limit, self.snapshots.saved_path if self.snapshots.saved_step == self.limit else None
            )

    def wait(self) -> list:
        """Some finished tasks, waking every POLL_S to notice an interrupt; WorkerTimeout past the timeout."""
        while True:
            try:
                ready = self.backend.wait(list(self.pending), POLL_S)
            except KeyboardInterrupt:  # no handler could be installed (not the main thread)
                self.interrupts.note()
                ready = []
            if ready:
                self.deadline = time.monotonic() + self.timeout_s
                return ready
            if self.interrupts.count and self.limit == self.steps:
                return []  # let the loop set the stop step
            if time.monotonic() > self.deadline:
                raise WorkerTimeout(
                    f"no worker finished a step within {self.timeout_s:g} s ({len(self.pending)} tasks outstanding)"
                )

    def submit_edge_steps(self, barrier: int) -> None:
        """Ask each live edge for its next steps, up to the barrier and `ahead` steps past the cloud
        (none while checkpoints wait for the writer)."""
        for e in range(self.n):
            while (
                self.alive(e)
                and self.submitted[e] < min(self.steps, barrier)
                and self.submitted[e] < self.settled[e] + self.held(e) + self.ahead
                and not self.snapshots.backlogged()
            ):
                t = self.submitted[e]
                if t > self.first and self.snapshots.due(t) and not self.split:  # split: after its backward
                    self.take_edge_snapshot(e, t)
                payload, metrics = self.backend.submit(self.edges[e], "step", t, returns=2)
                self.pending[metrics] = ("edge", e, t)
                self.payloads[(e, t)] = payload
                if self.eager:
                    self.arrived[(e, t)] = 0.0
                self.submitted[e] += 1
                report = self.reports[e]
                report.max_in_flight = max(report.max_in_flight, self.submitted[e] - self.settled[e])

    def feed_round_robin(self) -> None:
        """Hand the cloud its payloads in the fixed order, as far as they may be handed; a lost edge's
        turns and dropped payloads are skipped, a restarting edge's are waited for."""
        while self.rr_next:
            turn = self.rr_next[0]
            if self.reports[turn[0]].lost or turn in self.dropped_turns:
                self.rr_next.popleft()
            elif turn in self.arrived:
                self.rr_next.popleft()
                self.submit_cloud(*turn, self.arrived.pop(turn))
            else:
                return

    def submit_cloud(self, e: int, t: int, ready_at: float) -> None:
        for pending in self.snapshots.waiting_for_cloud(below=t):  # the cloud's state before any step >= k
            self.snapshots.take_cloud(pending, self.backend.submit(self.cloud, "state_now"), self.cloud_submitted)
        returns = 2 if self.split else 1
        future = self.backend.submit(self.cloud, "step", e, t, self.payloads.pop((e, t)), ready_at, returns=returns)
        metrics = future[0] if self.split else future
        self.pending[metrics] = ("cloud", e, t)
        if self.split:
            self.payloads[(e, -t - 1)] = future[1]  # the gradient, for the edge's backward pass
        self.cloud_submitted += 1

    def deliver(self, e: int, t: int, ready_at: float) -> None:
        """Edge e's step-t payload may go to the cloud, arriving at `ready_at` (wall clock)."""
        if self.config.order == "async":
            self.submit_cloud(e, t, ready_at)
        else:
            self.arrived[(e, t)] = ready_at

    def drop(self, e: int, t: int) -> None:
        """Edge e's step-t payload will never reach the cloud."""
        self.payloads.pop((e, t), None)
        self.settled[e] += 1
        self.dropped_turns.add((e, t))

    def sync_due(self, barrier: int) -> bool:
        """Every live edge has finished the step before a multiple of edge_sync, not yet averaged."""
        return bool(
            self.config.edge_sync
            and self.synced_through < barrier
            and barrier % self.config.edge_sync == 0
            and not self.restarting
            and all(r.lost or r.sent >= barrier for r in self.reports)
        )

    # --- checkpoints ------------------------------------------------------------------------------

    def take_edge_snapshot(self, e: int, k: int) -> None:
        self.snapshots.take_edge(k, e, self.backend.submit(self.edges[e], "state_now"))

    def take_cloud_snapshots(self) -> None:
        """A checkpoint's cloud state once nothing below its step can still reach the cloud."""
        for pending in self.snapshots.waiting_for_cloud(below=self.steps):
            if all(r.lost or (self.settled[r.edge] >= pending.step and not self.held(r.edge)) for r in self.reports):
                self.snapshots.take_cloud(pending, self.backend.submit(self.cloud, "state_now"), self.cloud_submitted)

    def write_snapshots(self) -> None:
        def done(future) -> bool:
            return future not in self.pending and self.backend.wait([future], 0) != []

        for pending in self.snapshots.ready(self.live(), done, len(self.record.cloud["step"])):
            self.snapshots.write(pending, lambda f: self.get(f, "a worker's state"), self.live())

    def final_snapshot(self) -> None:
        """The checkpoint at the end (or the interrupt's step), written before the run returns."""
        k = self.limit
        if not self.snapshots.due(k) and self.limit == self.steps:
            self.snapshots.close()
            return
        self.snapshots.close()  # the periodic ones first, in step order
        if self.snapshots.store is None or self.snapshots.saved_step >= k:
            return
        for e in self.live():
            self.take_edge_snapshot(e, k)
        pending = self.snapshots.pending[k]
        self.snapshots.take_cloud(pending, self.backend.submit(self.cloud, "state_now"), self.cloud_submitted)
        self.snapshots.write(pending, lambda f: self.get(f, "a worker's state"), self.live(), wait=True)
        self.snapshots.pending.pop(k, None)

    def finish_links(self) -> None:
        """An outage past the last step ends with the stream: what the buffers hold goes to the cloud."""
        released = False
        for e, link in enumerate(self.links):
            if link is not None and link.held and self.alive(e):
                for s, ready_at in link.close(time.time()):
                    self.deliver(e, s, ready_at)
                released = True
        if released:
            self.feed_round_robin()
            while self.pending:
                for future in self.wait():
                    self.handle(future)

    # --- what came back -------------------------------------------------------------------------

    def handle(self, future) -> None:
        """A finished task, unless a lost edge's failure already took it off the books."""
        if future not in self.pending:
            return
        kind, e, t = self.pending.pop(future)
        {"edge": self.on_edge_step, "cloud": self.on_cloud_step, "apply": self.on_apply, "restart": self.on_restart}[
            kind
        ](future, e, t)

    def last_checkpoint(self):
        return self.snapshots.saved_path

    def on_edge_step(self, future, e: int, t: int) -> None:
        try:
            metrics = self.backend.get(future, self.timeout_s)
        except self.backend.lost_errors:
            self.fail(e, t)
            return
        report = self.reports[e]
        if (e, t) in self.redone:  # recomputed after a restart; the cloud already trained on it
            self.redone.discard((e, t))
            self.payloads.pop((e, t))
            self.settled[e] += 1
            report.replayed += 1
            return
        if "loss" in metrics:
            check_finite(
                "edge", t, metrics["loss"], edge=e if self.n > 1 else None, last_checkpoint=self.last_checkpoint()
            )
            self.record.add_edge_step(e, t, metrics)
        report.sent += 1
        if not self.payload_bytes and self.config.scheme != "end_to_end":  # end-to-end sends raw data: 0
            self.payload_bytes = metrics["nbytes"]
        link = self.links[e]
        if link is None:
            if not self.eager:
                self.deliver(e, t, 0.0)
            return
        released, dropped = link.send(t, metrics["nbytes"], metrics["done_at"])
        if t == self.steps - 1:
            released += link.close(metrics["done_at"])
        for s in dropped:
            report.link_dropped.append(s)
            self.drop(e, s)
        for s, ready_at in released:
            self.deliver(e, s, ready_at)

    def on_cloud_step(self, future, e: int, t: int) -> None:
        try:
            metrics = self.backend.get(future, self.timeout_s)
        except self.backend.lost_errors as error:
            if not self.backend.alive(self.cloud):
                raise WorkerError(
                    f"the cloud worker died at its step {len(self.record.cloud['step'])} (edge {e}, "
                    f"step {t}): {str(error).splitlines()[0]}"
                ) from None
            self.fail(e, t)  # the payload's edge died before handing it over
            return
        check_finite(
            "cloud", t, metrics["loss"], edge=e if self.n > 1 else None, last_checkpoint=self.last_checkpoint()
        )
        self.delivered[e].add(t)
        report = self.reports[e]
        report.delivered += 1
        report.last_delivered_step = max(report.last_delivered_step, t)
        self.cloud_done[metrics["index"]] = metrics
        while (index := len(self.record.cloud["step"])) in self.cloud_done:  # the order the cloud trained in
            done = self.cloud_done.pop(index)
            self.record.add_cloud_step(done["edge"], done["step"], done)
        if self.split:  # the gradient goes back down; the edge's step ends with its backward pass
            self.pending[self.backend.submit(self.edges[e], "apply", t, self.payloads.pop((e, -t - 1)))] = (
                "apply",
                e,
                t,
            )
            if t + 1 < self.steps and self.snapshots.due(t + 1):
                self.take_edge_snapshot(e, t + 1)
            return
        self.settled[e] += 1

    def on_apply(self, future, e: int, t: int) -> None:
        try:
            metrics = self.backend.get(future, self.timeout_s)
        except self.backend.lost_errors:
            self.fail(e, t)
            return
        if t == self.first:
            self.payload_bytes += metrics["nbytes_down"]
        self.settled[e] += 1

    def on_restart(self, future, e: int, t: int) -> None:
        try:
            self.backend.get(future, self.timeout_s)
        except self.backend.lost_errors:
            self.fail(e, t)

    # --- lost edges -----------------------------------------------------------------------------

    def fail(self, e: int, at: int) -> None:
        """Edge e's worker died; its steps from `at` on will never come (those before may still have
        finished). It comes back if it has restarts left, else it is lost for good (with what its link
        still held)."""
        for future, (kind, edge, t) in list(self.pending.items()):
            if kind in ("edge", "apply") and edge == e and t >= at:
                self.pending.pop(future)
        if self.reports[e].lost or e in self.restarting:
            return
        if (link := self.links[e]) is not None:
            link.buffer.clear()
        if self.reports[e].restarts < self.config.max_restarts:
            self.restarting.add(e)
        else:
            self.reports[e].lost = True

    def failed(self, future) -> bool:
        """Did this finished task's worker die before it completed?"""
        try:
            self.backend.get(future, self.timeout_s)
        except self.backend.lost_errors:
            return True
        return False

    def restart(self, e: int) -> None:
        """A new worker for edge e, from the last checkpoint's state of it, replaying up to the first step
        the cloud has not trained on. Exact when no model averaging falls between the two (a checkpoint
        every edge_sync steps, or a multiple, guarantees it); replays never average."""
        self.restarting.discard(e)
        resume_at = next(t for t in itertools.count() if t not in self.delivered[e])
        # The newest state of this edge a checkpoint holds at or before resume_at: written, or still being
        # gathered (its edge part is there before the cloud's); none: the initial state, step 0.
        saved_step, state = 0, None
        if e in self.snapshots.restart_states and self.snapshots.restart_step <= resume_at:
            saved_step, state = self.snapshots.restart_step, self.snapshots.restart_states[e]
        for k, pending in sorted(self.snapshots.pending.items()):
            if saved_step < k <= resume_at and e in pending.edges and not self.failed(pending.edges[e]):
                saved_step, state = k, self.get(pending.edges[e], f"edge {e}'s checkpointed state")
        self.snapshots.forget_edge(e, self.failed, resume_at)
        worker = self.edges[e] = self.backend.spawn_edge(e, first_life=False)  # no fault injected again
        self.pending[self.backend.submit(worker, "resume", state, saved_step, resume_at)] = ("restart", e, resume_at)
        self.restarted_placement[e] = self.backend.submit(worker, "placement")
        report = self.reports[e]
        report.restarts += 1
        report.replayed += resume_at - saved_step
        self.record.forget_edge_steps(e, resume_at)
        report.sent = len(self.record.edges[e]["step"])
        self.submitted[e] = self.settled[e] = resume_at
        self.redone = {(x, t) for x, t in self.redone if x != e} | {(e, t) for t in self.delivered[e] if t >= resume_at}
        for key in [key for key in self.payloads if key[0] == e]:
            del self.payloads[key]
        for key in [key for key in self.arrived if key[0] == e]:
            del self.arrived[key]
        if self.config.order == "round_robin":
            turns = set(self.rr_next) | {(e, t) for t in range(resume_at, self.steps) if t not in self.delivered[e]}
            self.rr_next = collections.deque(sorted(turns, key=self.turn_order))
