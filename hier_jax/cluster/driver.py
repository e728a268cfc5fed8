"""The driver: starts the workers, decides what each does next, checkpoints and resumes the run."""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import os
import time
from typing import Any

import jax
import numpy as np

from hier_jax import precision
from hier_jax.cluster.config import ClusterConfig, ClusterError, validate_cluster
from hier_jax.cluster.host import alive, core_plan, get, resource, start_ray
from hier_jax.cluster.results import ClusterResult, EdgeReport
from hier_jax.cluster.shards import shard, shard_indices
from hier_jax.cluster.workers import CloudWorker, EdgeWorker
from hier_jax.config import ExperimentConfig
from hier_jax.data import ImageDataset
from hier_jax.errors import RunInterrupted, UserError


def run(
    config: ExperimentConfig,
    dataset: ImageDataset,
    cluster: ClusterConfig,
    *,
    progress: bool = False,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
) -> ClusterResult:
    """Train `cluster.edges` edges and one cloud in their own processes; see the module docstring.

    With `checkpoint_dir`, every worker's state is saved together every `config.checkpoint_every`
    steps per edge, at a step every edge has reached and the cloud has trained on (one orbax
    checkpoint: the edges' states, the cloud's, and the run's history); `resume` continues from the
    latest one, in round-robin order bit for bit as if never stopped.
    """
    validate_cluster(cluster)
    from hier_jax import train

    shards = [
        shard(dataset, idx, e)
        for e, idx in enumerate(
            shard_indices(dataset.train_labels, cluster.edges, dirichlet=cluster.dirichlet, seed=config.seed)
        )
    ]
    for e, part in enumerate(shards):
        if part.num_train < config.batch_size:
            raise UserError(
                f"edge {e}'s shard has {part.num_train} examples, fewer than one batch of "
                f"{config.batch_size}; use fewer --edges, a smaller --batch-size or a larger --dirichlet"
            )
    steps = min(train.total_steps(config, part) for part in shards)
    # One precision policy for every worker: "auto" resolved here, for the edges' backend (the CPU),
    # not by each worker for its own (a TPU cloud would pick bf16 against fp32 edges). Resolved without
    # starting a backend in the driver, which on a GPU host would take the cloud's GPU memory.
    policy = precision.resolve(config.precision, "cpu").name
    worker_config = dataclasses.replace(config, precision=policy)
    ray = start_ray(cluster, num_cpus=max(len(os.sched_getaffinity(0)), cluster.edges + 1))
    cloud_on_gpu = cluster.cloud_gpu and ray.cluster_resources().get("GPU", 0) >= 1
    edge_cores, cloud_cores = core_plan(cluster, cloud_on_gpu)
    kill = dict(cluster.kill_edges)
    # Ray restarts nothing by itself: the driver brings a lost edge back (_Driver.restart), from the
    # state of the last checkpoint, which a process Ray restarted on its own would not have.
    remote_edge = ray.remote(num_cpus=0, max_restarts=0, resources=resource(cluster.edge_resource))(EdgeWorker)
    remote_cloud = ray.remote(
        num_cpus=0, num_gpus=1 if cloud_on_gpu else 0, max_restarts=0, resources=resource(cluster.cloud_resource)
    )(CloudWorker)
    shard_refs = [ray.put(part) for part in shards]

    def spawn_edge(e: int, first_life: bool):
        return remote_edge.remote(
            e,
            worker_config,
            shard_refs[e],
            steps,
            edge_cores[e],
            cluster.link_of(e),
            cluster.time_scale,
            kill.get(e) if first_life else None,
        )

    edges = [spawn_edge(e, True) for e in range(cluster.edges)]
    cloud = remote_cloud.remote(
        worker_config,
        ray.put(dataset),
        steps * cluster.edges,
        cloud_cores,
        "cuda" if cloud_on_gpu else "cpu",
        cluster.kill_cloud,
    )
    store = None
    try:
        placement = {"cloud": get(ray, cloud.placement.remote(), cluster, "the cloud to start")}
        for e, worker in enumerate(edges):
            placement[f"edge {e}"] = get(ray, worker.placement.remote(), cluster, f"edge {e} to start")
        if checkpoint_dir is not None:
            from hier_jax.run.checkpoint import RunCheckpoints

            store = RunCheckpoints(checkpoint_dir, keep=config.keep_checkpoints)
        history = _resume(ray, store, edges, cloud, config, cluster) if store is not None and resume else None
        driver = _Driver(ray, edges, cloud, spawn_edge, cluster, config, shards, steps, store, history, policy)
        try:
            return driver.drive(placement, progress)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the workers go (finally); the last checkpoint stays
            saved = store.latest_step() if store is not None else None
            raise RunInterrupted(saved or 0, None if saved is None else store.path(saved)) from None
    finally:
        if store is not None:
            store.close()
        for worker in [*edges, cloud]:  # `edges` holds each edge's latest process (the driver replaces restarted ones)
            ray.kill(worker)


TRAJECTORY_FIELDS = ("edges", "order", "dirichlet", "edge_sync")  # what a resumed run must share


def _resume(ray, store, edges, cloud, config: ExperimentConfig, cluster: ClusterConfig) -> dict | None:
    """Load the latest checkpoint into the workers; its metadata (the run's history) and the edges'
    states ("edge_states", kept to restart an edge from), or None when there is none."""
    from hier_jax import train
    from hier_jax.errors import ResumeMismatchError

    if store.latest_step() is None:
        return None
    meta = store.read_meta()
    train.check_resumable(config, meta["config"], store.path(meta["step"]))
    for field in TRAJECTORY_FIELDS:
        if meta["cluster"][field] != getattr(cluster, field):
            raise ResumeMismatchError(
                f"checkpoint {store.path(meta['step'])} was made with --{field.replace('_', '-')} "
                f"{meta['cluster'][field]!r}, not {getattr(cluster, field)!r}"
            )
    saved = [int(e) for e in meta["saved_edges"]]
    host = jax.devices("cpu")[0]
    edge_templates = jax.device_put(
        {str(e): get(ray, edges[e].state_now.remote(), cluster, f"edge {e}'s state") for e in saved}, host
    )
    cloud_template = jax.device_put(get(ray, cloud.state_now.remote(), cluster, "the cloud's state"), host)
    edge_states, cloud_state, _ = store.restore(edge_templates, cloud_template, meta["step"])
    loads = [edges[e].load.remote(jax.device_get(edge_states[str(e)]), meta["step"]) for e in saved]
    loads.append(cloud.load.remote(jax.device_get(cloud_state), len(meta["taken"])))
    get(ray, loads, cluster, "the workers to load the checkpoint")
    return meta | {"edge_states": {int(e): jax.device_get(s) for e, s in edge_states.items()}}


class _Driver:
    """The driver's loop over one run: which steps each edge has been asked for, which the cloud has
    trained on, what waits on what; it decides what each worker does next, and nothing else does.

    Lost edges: an edge whose process dies is restarted while it has restarts left
    (`ClusterConfig.max_restarts`), else dropped. A restart waits until nothing of the dead process
    is outstanding, then starts a new process from the state of the last checkpoint (the initial
    state when there is none), which replays the steps from there to the first step the cloud has
    not trained on, without sending their payloads (the cloud has them), and goes on from that
    step. Replayed steps give the edge the state it had, bit for bit on the same hardware, unless
    an edge_sync average fell between the checkpoint and the loss (a replay does not average).
    """

    def __init__(
        self,
        ray,
        edges: list,
        cloud,
        spawn_edge,
        cluster: ClusterConfig,
        config: ExperimentConfig,
        shards: list[ImageDataset],
        steps: int,
        store,
        history: dict | None,
        policy: str,
    ):
        self.ray, self.edges, self.cloud, self.spawn_edge = ray, edges, cloud, spawn_edge
        self.cluster, self.config, self.steps, self.store, self.policy = cluster, config, steps, store, policy
        n = self.n = len(edges)
        first = history["step"] if history else 0  # the step every edge starts from
        self.reports = (
            [EdgeReport(**r) for r in history["reports"]]
            if history
            else [EdgeReport(e, shards[e].num_train) for e in range(n)]
        )
        self.taken: list[dict] = list(history["taken"]) if history else []  # the cloud's step metrics
        self.resumed_cloud_steps = len(self.taken)
        self.delivered: list[set[int]] = [set() for _ in range(n)]  # edge steps the cloud trained on
        for m in self.taken:
            self.delivered[m["edge"]].add(m["step"])
        # The state every live edge had at the last checkpoint: what a restarted edge starts from.
        self.checkpointed: tuple[int, dict[int, Any]] = (first, history["edge_states"]) if history else (0, {})
        self.submitted = [first] * n  # edge steps submitted
        self.consumed = [first] * n  # edge steps the cloud has trained on, or skipped as already trained on
        self.pending: dict[Any, tuple[str, int, int]] = {}  # ref -> (kind, edge, step)
        self.payloads: dict[tuple[int, int], Any] = {}  # payload refs of edge steps not yet given to the cloud
        self.arrived: set[tuple[int, int]] = set()  # round robin: those the cloud may be handed
        # With restarts, round robin hands the cloud only finished edge steps (see feed_round_robin);
        # without, a cloud step is queued on the payload's reference at once (Ray starts it when the
        # payload exists), which keeps the driver's round trip off the pipeline's critical path.
        self.hand_finished_only = cluster.max_restarts > 0
        self.rr_next = collections.deque((e, t) for t in range(first, steps) for e in range(n))
        self.restarting: set[int] = set()  # edges whose process died and that will come back
        self.restarted_placement: dict[int, Any] = {}
        self.synced_through = first - first % cluster.edge_sync if cluster.edge_sync else 0
        self.every = config.checkpoint_every if store is not None else 0
        self.saved_through = first
        self.ahead = config.queue_size + 1 if cluster.flow == "pipelined" else 1  # edge steps ahead of the cloud

    def alive(self, e: int) -> bool:
        return not self.reports[e].lost and e not in self.restarting

    def get(self, ref, what: str):
        return get(self.ray, ref, self.cluster, what)

    # --- the loop ------------------------------------------------------------------------------

    def drive(self, placement: dict, progress: bool) -> ClusterResult:
        start = time.perf_counter()
        while True:
            for e in sorted(self.restarting):
                if not any(edge == e for _, edge, _ in self.pending.values()):
                    self.restart(e)
            next_save = (self.saved_through // self.every + 1) * self.every if self.every else self.steps
            barrier = min(
                self.synced_through + self.cluster.edge_sync if self.cluster.edge_sync else self.steps,
                next_save,
                self.steps,
            )
            self.submit_edge_steps(barrier)
            if self.cluster.order == "round_robin":
                self.feed_round_robin()
            if self.sync_due(barrier):
                _average_edges(self.ray, [self.edges[e] for e in range(self.n) if self.alive(e)], self.cluster)
                self.synced_through = barrier
                continue
            if self.save_due(next_save, barrier):
                self.checkpointed = (
                    next_save,
                    _save(
                        self.ray,
                        self.store,
                        self.edges,
                        self.cloud,
                        self.config,
                        self.cluster,
                        next_save,
                        self.reports,
                        self.taken,
                    ),
                )
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
            {"edge": self.on_edge_step, "cloud": self.on_cloud_step, "restart": self.on_restart}[kind](ready[0], e, t)
            if kind == "cloud" and progress and len(self.taken) % 10 == 0:
                print(
                    f"cloud step {len(self.taken)} of {self.steps * self.n}: loss {self.taken[-1]['loss']:.3f}",
                    flush=True,
                )
        return self.finish(placement, time.perf_counter() - start)

    def submit_edge_steps(self, barrier: int) -> None:
        """Ask each live edge for its next steps, up to the barrier and `ahead` steps past the cloud."""
        for e in range(self.n):
            while (
                self.alive(e)
                and self.submitted[e] < min(self.steps, barrier)
                and self.submitted[e] < self.consumed[e] + self.ahead
            ):
                t = self.submitted[e]
                payload, metrics = self.edges[e].step.options(num_returns=2).remote(t)
                self.pending[metrics] = ("edge", e, t)
                self.payloads[(e, t)] = payload
                if self.cluster.order == "round_robin" and not self.hand_finished_only:
                    self.arrived.add((e, t))
                self.submitted[e] += 1
                report = self.reports[e]
                report.max_in_flight = max(report.max_in_flight, self.submitted[e] - self.consumed[e])

    def feed_round_robin(self) -> None:
        """Hand the cloud its payloads in the fixed order, as far as they may be handed; a lost edge's
        turns are skipped, a restarting edge's are waited for. (With restarts, only finished edge
        steps go to the cloud, so no cloud step ever waits on a payload that a dying edge will never
        produce, and an edge's restart leaves the order as it would have been.)"""
        while self.rr_next:
            turn = self.rr_next[0]
            if self.reports[turn[0]].lost:
                self.rr_next.popleft()
            elif turn in self.arrived:
                self.rr_next.popleft()
                self.arrived.remove(turn)
                self.submit_cloud(*turn)
            else:
                return

    def submit_cloud(self, e: int, t: int) -> None:
        self.pending[self.cloud.step.remote(e, t, self.payloads.pop((e, t)))] = ("cloud", e, t)

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
        """Every live edge has reached the checkpoint step and the cloud has trained on all of it."""
        return bool(
            self.every
            and next_save < self.steps
            and barrier == next_save
            and not self.restarting
            and all(r.lost or self.consumed[r.edge] >= next_save for r in self.reports)
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
            self.consumed[e] += 1
            report.replayed += 1
            return
        report.sent += 1
        report.losses.append(metrics["loss"])
        report.step_s.append(metrics["step_s"])
        if self.cluster.order == "async":
            self.submit_cloud(e, t)
        elif self.hand_finished_only:
            self.arrived.add((e, t))

    def on_cloud_step(self, ref, e: int, t: int) -> None:
        ray = self.ray
        try:
            metrics = ray.get(ref, timeout=self.cluster.timeout_s)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as error:
            if not alive(ray, self.cloud, self.cluster):
                raise ClusterError(
                    f"the cloud worker died at its step {len(self.taken)} (edge {e}, step {t}): "
                    f"{str(error).splitlines()[0]}"
                ) from None
            if (
                isinstance(error, ray.exceptions.RayTaskError)
                and "ActorDiedError" not in type(error).__name__
                and not isinstance(error, ray.exceptions.RayActorError)
            ):
                raise  # the cloud step itself raised: a bug, not a lost edge
            self.fail(e, t)  # the payload's edge died before handing it over
            return
        self.consumed[e] += 1
        self.delivered[e].add(t)
        report = self.reports[e]
        report.delivered += 1
        report.last_delivered_step = max(report.last_delivered_step, t)
        self.taken.append(metrics)

    def on_restart(self, ref, e: int, t: int) -> None:
        try:
            self.ray.get(ref, timeout=self.cluster.timeout_s)
        except self.ray.exceptions.RayActorError:
            self.fail(e, t)

    # --- lost edges -----------------------------------------------------------------------------

    def fail(self, e: int, at: int) -> None:
        """Edge e's process died; its steps from `at` on will never come (those before may still
        have finished). It comes back if it has restarts left, else it is lost for good."""
        for ref, (kind, edge, t) in list(self.pending.items()):
            if kind == "edge" and edge == e and t >= at:
                self.pending.pop(ref)
        if self.reports[e].lost or e in self.restarting:
            return
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
        del report.losses[resume_at:], report.step_s[resume_at:]
        report.sent = len(report.losses)
        self.submitted[e] = self.consumed[e] = resume_at
        for key in [key for key in self.payloads if key[0] == e]:
            del self.payloads[key]
        self.arrived -= {key for key in self.arrived if key[0] == e}
        if self.cluster.order == "round_robin":
            turns = set(self.rr_next) | {(e, t) for t in range(resume_at, self.steps) if t not in self.delivered[e]}
            self.rr_next = collections.deque(sorted(turns, key=lambda turn: (turn[1], turn[0])))

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
        taken = sorted(self.taken, key=lambda m: m["index"])  # the order the cloud trained in
        return ClusterResult(
            self.cluster.flow,
            self.cluster.order,
            self.steps,
            self.reports,
            [(m["edge"], m["step"]) for m in taken],
            [m["loss"] for m in taken],
            [m["step_s"] for m in taken],
            wall_s,
            placement,
            self.policy,
            self.resumed_cloud_steps,
        )


def _save(
    ray,
    store,
    edges,
    cloud,
    config: ExperimentConfig,
    cluster: ClusterConfig,
    step: int,
    reports: list[EdgeReport],
    taken: list[dict],
) -> dict[int, Any]:
    """One checkpoint of every live worker's state at `step`, with the run's history; the edges'
    states saved, by edge."""
    live = [r.edge for r in reports if not r.lost]
    edge_states = get(ray, [edges[e].state_now.remote() for e in live], cluster, "the edges' states")
    cloud_state = get(ray, cloud.state_now.remote(), cluster, "the cloud's state")
    meta = {
        "format": 1,
        "step": step,
        "config": dataclasses.asdict(config),
        "cluster": dataclasses.asdict(cluster),
        "saved_edges": live,
        "reports": [dataclasses.asdict(r) for r in reports],
        "taken": sorted(taken, key=lambda m: m["index"]),
    }
    # Written from a thread of its own, so that Ctrl-C or SIGTERM in the middle lets the checkpoint
    # complete (an interrupted orbax write is left behind as a temporary directory) before the run stops.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        writing = pool.submit(
            store.save, step, {str(e): s for e, s in zip(live, edge_states, strict=True)}, cloud_state, meta
        )
        try:
            writing.result()
        except KeyboardInterrupt:
            writing.result()
            raise
    return dict(zip(live, edge_states, strict=True))


def _average_edges(ray, edges, cluster: ClusterConfig) -> None:
    """Replace every edge's parameters and BatchNorm statistics by their mean over the edges."""
    trees = get(ray, [e.params.remote() for e in edges], cluster, "the edges' parameters")
    mean = jax.tree.map(lambda *leaves: np.mean(np.stack(leaves), axis=0).astype(leaves[0].dtype), *trees)
    shared = ray.put(mean)
    get(ray, [e.set_params.remote(shared) for e in edges], cluster, "the edges to take the averaged model")
