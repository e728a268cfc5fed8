"""The driver's loop over one cluster run: which steps each edge has been asked for, which the cloud
has trained on, what waits on what. It decides what each worker does next, and nothing else does.

Flow control: an edge may be at most `ahead` steps past what the cloud has settled of its payloads
(trained on, dropped by the link, or held in the edge's outage buffer): queue_size + 1 in the
pipelined schedule, 1 in the sequential one. Barriers hold every edge at the next model average
(`edge_sync`) and the next checkpoint until every live edge has reached it (and, for a checkpoint,
the cloud has settled everything before it).

Links (`ExperimentConfig.link`): each edge's payloads go through a `link.BufferedLink` on the
driver, whose clock starts from the wall-clock time the edge step finished; the cloud step sleeps
until its payload has arrived. While an edge's link is down its payloads wait in its buffer and the
oldest are dropped (every payload is delivered or counted as dropped); payloads held at a
checkpoint are not in it, as a link would have lost them.

Lost edges: an edge whose process dies is restarted while it has restarts left
(`ClusterConfig.max_restarts`), else dropped. A restart waits until nothing of the dead process is
outstanding, then starts a new process from the state of the last checkpoint (the initial state when
there is none), which replays the steps from there to the first step the cloud has not trained on,
without sending their payloads (the cloud has them), and goes on from that step. Replayed steps give
the edge the state it had, bit for bit on the same hardware, unless an edge_sync average fell
between the checkpoint and the loss (a replay does not average).

Divergence: every loss that comes back is checked; the first NaN or infinity stops the run with a
`DivergenceError` naming the side, the edge and the step (the last checkpoint is kept).
"""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Callable
from typing import Any

from hier_jax.cluster.config import ClusterConfig, ClusterError
from hier_jax.cluster.host import alive, get
from hier_jax.cluster.results import ClusterResult, EdgeReport
from hier_jax.config import ExperimentConfig
from hier_jax.link import BufferedLink, LinkClock
from hier_jax.run.progress import Progress
from hier_jax.run.record import RunRecord, check_finite


def edge_links(config: ExperimentConfig, edges: int) -> list[BufferedLink | None]:
    """Each edge's link as the driver replays it (None: an instant hand-off)."""
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


class Driver:
    """One run's loop (see the module docstring). `checkpoint(step, reports, record)` saves every
    live worker at `step` and returns the edges' saved states, `checkpoint_path(step)` says where;
    `average(edges)` averages the given edges' models."""

    def __init__(
        self,
        ray,
        edges: list,
        cloud,
        spawn_edge: Callable,
        cluster: ClusterConfig,
        config: ExperimentConfig,
        reports: list[EdgeReport],
        record: RunRecord,
        steps: int,
        first: int,
        checkpoint: Callable | None,
        checkpoint_path: Callable | None,
        average: Callable,
        saved_states: dict[int, Any],
        policy: str,
    ):
        self.ray, self.edges, self.cloud, self.spawn_edge = ray, edges, cloud, spawn_edge
        self.cluster, self.config, self.steps, self.policy = cluster, config, steps, policy
        self.checkpoint, self.checkpoint_path, self.average = checkpoint, checkpoint_path, average
        n = self.n = len(edges)
        self.reports, self.record = reports, record
        self.resumed_cloud_steps = len(record.cloud["step"])
        self.delivered = [record.delivered(e) for e in range(n)]  # edge steps the cloud trained on
        # The state every live edge had at the last checkpoint: what a restarted edge starts from.
        self.checkpointed: tuple[int, dict[int, Any]] = (first, saved_states)
        self.submitted = [first] * n  # edge steps submitted
        self.settled = [first] * n  # edge steps trained on, skipped as already trained on, or dropped
        self.pending: dict[Any, tuple[str, int, int]] = {}  # ref -> (kind, edge, step)
        self.payloads: dict[tuple[int, int], Any] = {}  # payload refs of edge steps not yet given to the cloud
        self.arrived: dict[tuple[int, int], float] = {}  # round robin: the turns the cloud may be handed, when ready
        self.dropped_turns: set[tuple[int, int]] = set()
        self.links = edge_links(config, n)
        # Without restarts or links, round robin queues a cloud step on the payload's reference at once
        # (Ray starts it when the payload exists), which keeps the driver's round trip off the pipeline's
        # critical path. Otherwise the cloud is handed only finished edge steps, so no cloud step ever
        # waits on a payload a dying edge will never produce, and the link's clock knows when it was ready.
        self.eager = cluster.order == "round_robin" and cluster.max_restarts == 0 and not any(self.links)
        self.rr_next = collections.deque(
            sorted(((e, t) for t in range(first, steps) for e in range(n)), key=self.turn_order)
        )
        self.restarting: set[int] = set()  # edges whose process died and that will come back
        self.restarted_placement: dict[int, Any] = {}
        self.synced_through = first - first % cluster.edge_sync if cluster.edge_sync else 0
        self.every = config.checkpoint_every if checkpoint is not None else 0
        self.saved_through = first
        self.ahead = config.queue_size + 1 if config.schedule == "pipelined" else 1
        self.cloud_done: dict[int, dict] = {}  # cloud results by the cloud's own step index, until in order

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

    def get(self, ref, what: str):
        return get(self.ray, ref, self.cluster, what)

    def last_checkpoint(self):
        return self.checkpoint_path(self.saved_through) if self.checkpoint_path and self.saved_through else None

    def held(self, e: int) -> int:
        link = self.links[e]
        return 0 if link is None else link.held

    # --- the loop ------------------------------------------------------------------------------

    def drive(self, placement: dict, progress: bool) -> ClusterResult:
        start = time.perf_counter()
        bar = Progress(progress, self.steps * self.n, "cluster", self.resumed_cloud_steps)
        try:
            while True:
                for e in sorted(self.restarting):
                    if not any(edge == e for _, edge, _ in self.pending.values()):
                        self.restart(e)
                next_save = (self.saved_through // self.every + 1) * self.every if self.every else self.steps
                sync = self.synced_through + self.cluster.edge_sync if self.cluster.edge_sync else self.steps
                barrier = min(sync, next_save, self.steps)
                self.submit_edge_steps(barrier)
                if self.cluster.order == "round_robin":
                    self.feed_round_robin()
                if self.sync_due(barrier):
                    self.average([self.edges[e] for e in range(self.n) if self.alive(e)])
                    self.synced_through = barrier
                    continue
                if self.save_due(next_save, barrier):
                    assert self.checkpoint is not None
                    self.checkpointed = (next_save, self.checkpoint(next_save, self.reports, self.record))
                    self.saved_through = next_save
                    continue
                if not self.pending:
                    break
                ready, _ = self.ray.wait(list(self.pending), num_returns=1, timeout=self.cluster.timeout_s)
                if not ready:
                    raise ClusterError(
                        f"no worker finished a step within {self.cluster.timeout_s:g} s "
                        f"({len(self.pending)} steps outstanding)"
                    )
                kind, e, t = self.pending.pop(ready[0])
                taken = len(self.record.cloud["step"])
                {"edge": self.on_edge_step, "cloud": self.on_cloud_step, "restart": self.on_restart}[kind](
                    ready[0], e, t
                )
                for _ in range(len(self.record.cloud["step"]) - taken):
                    bar.update(self.record.cloud["loss"][-1])
        finally:
            bar.close()
        return self.finish(placement, time.perf_counter() - start)

    def submit_edge_steps(self, barrier: int) -> None:
        """Ask each live edge for its next steps, up to the barrier and `ahead` steps past the cloud."""
        for e in range(self.n):
            while (
                self.alive(e)
                and self.submitted[e] < min(self.steps, barrier)
                and self.submitted[e] < self.settled[e] + self.held(e) + self.ahead
            ):
                t = self.submitted[e]
                payload, metrics = self.edges[e].step.options(num_returns=2).remote(t)
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
        self.pending[self.cloud.step.remote(e, t, self.payloads.pop((e, t)), ready_at)] = ("cloud", e, t)

    def deliver(self, e: int, t: int, ready_at: float) -> None:
        """Edge e's step-t payload may go to the cloud, arriving at `ready_at` (wall clock)."""
        if self.cluster.order == "async":
            self.submit_cloud(e, t, ready_at)
        else:
            self.arrived[(e, t)] = ready_at

    def drop(self, e: int, t: int) -> None:
        """Edge e's step-t payload will never reach the cloud."""
        self.payloads.pop((e, t), None)
        self.settled[e] += 1
        self.dropped_turns.add((e, t))

    def sync_due(self, barrier: int) -> bool:
        """Every live edge has reached a multiple of edge_sync (the last step too), not yet averaged."""
        return bool(
            self.cluster.edge_sync
            and self.synced_through < barrier
            and barrier % self.cluster.edge_sync == 0
            and not self.restarting
            and all(r.lost or r.sent >= barrier for r in self.reports)
        )

    def save_due(self, next_save: int, barrier: int) -> bool:
        """Every live edge has reached the checkpoint step and the cloud has settled all of it."""
        return bool(
            self.every
            and next_save < self.steps
            and barrier == next_save
            and not self.restarting
            and all(r.lost or self.settled[r.edge] + self.held(r.edge) >= next_save for r in self.reports)
        )

    # --- what came back -------------------------------------------------------------------------

    def on_edge_step(self, ref, e: int, t: int) -> None:
        try:
            metrics = self.ray.get(ref, timeout=self.cluster.timeout_s)
        except self.ray.exceptions.RayActorError:
            self.fail(e, t)
            return
        report = self.reports[e]
        if t in self.delivered[e]:  # recomputed after a restart; the cloud already trained on it
            self.payloads.pop((e, t))
            self.settled[e] += 1
            report.replayed += 1
            return
        check_finite("edge", t, metrics["loss"], edge=e, last_checkpoint=self.last_checkpoint())
        report.sent += 1
        self.record.add_edge_step(e, t, metrics)
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

    def on_cloud_step(self, ref, e: int, t: int) -> None:
        ray = self.ray
        try:
            metrics = ray.get(ref, timeout=self.cluster.timeout_s)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as error:
            if not alive(ray, self.cloud, self.cluster):
                raise ClusterError(
                    f"the cloud worker died at its step {len(self.record.cloud['step'])} (edge {e}, "
                    f"step {t}): {str(error).splitlines()[0]}"
                ) from None
            if (
                isinstance(error, ray.exceptions.RayTaskError)
                and "ActorDiedError" not in type(error).__name__
                and not isinstance(error, ray.exceptions.RayActorError)
            ):
                raise  # the cloud step itself raised: a bug, not a lost edge
            self.fail(e, t)  # the payload's edge died before handing it over
            return
        check_finite("cloud", t, metrics["loss"], edge=e, last_checkpoint=self.last_checkpoint())
        self.settled[e] += 1
        self.delivered[e].add(t)
        report = self.reports[e]
        report.delivered += 1
        report.last_delivered_step = max(report.last_delivered_step, t)
        self.cloud_done[metrics["index"]] = metrics
        while (index := len(self.record.cloud["step"])) in self.cloud_done:  # the order the cloud trained in
            done = self.cloud_done.pop(index)
            self.record.add_cloud_step(done["edge"], done["step"], done)

    def on_restart(self, ref, e: int, t: int) -> None:
        try:
            self.ray.get(ref, timeout=self.cluster.timeout_s)
        except self.ray.exceptions.RayActorError:
            self.fail(e, t)

    # --- lost edges -----------------------------------------------------------------------------

    def fail(self, e: int, at: int) -> None:
        """Edge e's process died; its steps from `at` on will never come (those before may still
        have finished). It comes back if it has restarts left, else it is lost for good (with what
        its link still held)."""
        for ref, (kind, edge, t) in list(self.pending.items()):
            if kind == "edge" and edge == e and t >= at:
                self.pending.pop(ref)
        if self.reports[e].lost or e in self.restarting:
            return
        if (link := self.links[e]) is not None:
            link.buffer.clear()
        if self.reports[e].restarts < self.cluster.max_restarts:
            self.restarting.add(e)
        else:
            self.reports[e].lost = True

    def restart(self, e: int) -> None:
        """A new process for edge e, from the last checkpoint, replaying up to the cloud's position."""
        self.restarting.discard(e)
        resume_at = next(t for t in itertools.count() if t not in self.delivered[e])
        saved_step, saved_states = self.checkpointed
        if e not in saved_states or saved_step > resume_at:
            saved_step, state = 0, None  # no checkpoint holds this edge: from the initial state
        else:
            state = saved_states[e]
        worker = self.edges[e] = self.spawn_edge(e, False)
        self.pending[worker.resume.remote(state, saved_step, resume_at)] = ("restart", e, resume_at)
        self.restarted_placement[e] = worker.placement.remote()
        report = self.reports[e]
        report.restarts += 1
        report.replayed += resume_at - saved_step
        self.record.forget_edge_steps(e, resume_at)
        report.sent = len(self.record.edges[e]["step"])
        self.submitted[e] = self.settled[e] = resume_at
        for key in [key for key in self.payloads if key[0] == e]:
            del self.payloads[key]
        for key in [key for key in self.arrived if key[0] == e]:
            del self.arrived[key]
        if self.cluster.order == "round_robin":
            turns = set(self.rr_next) | {(e, t) for t in range(resume_at, self.steps) if t not in self.delivered[e]}
            self.rr_next = collections.deque(sorted(turns, key=self.turn_order))

    # --- the end --------------------------------------------------------------------------------

    def finish(self, placement: dict, wall_s: float) -> ClusterResult:
        for e, ref in self.restarted_placement.items():
            if self.alive(e):
                placement[f"edge {e}"] = self.get(ref, f"restarted edge {e} to start")
        for e, report in enumerate(self.reports):
            if self.alive(e):
                accuracy_ref, bundle = self.edges[e].evaluate.options(num_returns=2).remote()
                report.edge_accuracy = self.get(accuracy_ref, f"edge {e}'s evaluation")["edge_accuracy"]
                report.cloud_accuracy = self.get(
                    self.cloud.evaluate.remote(bundle), f"the cloud's evaluation on edge {e}'s features"
                )
            report.dropped = report.sent - report.delivered
        return ClusterResult(
            self.config.schedule,
            self.cluster.order,
            self.steps,
            self.reports,
            self.record,
            wall_s,
            placement,
            self.policy,
            self.resumed_cloud_steps,
        )
