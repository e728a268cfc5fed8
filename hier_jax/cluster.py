"""Edges and one cloud as separate processes on Ray: N edges train against one cloud.

Each edge and the cloud is a Ray actor, a process with its own JAX runtime, which runs the library's
own pure steps: every worker calls `train.build` on its config and its data (no second copy of the
training logic), so the jitted edge and cloud steps, the packed payload and the optimizers are the
in-process runner's. The driver (the process that calls `run`) moves nothing but references: an
edge step returns its payload into Ray's object store, and the cloud step that consumes it is
handed the reference, so the payload goes from the edge's process to the cloud's without passing
through the driver.

Flows (`ClusterConfig.flow`):
- "pipelined": an edge may run up to `config.queue_size` payloads ahead of the cloud (backpressure:
  never more payloads in flight than that, whatever the speeds), so the edge computes
  step t+1 (its backward pass included) while the cloud trains on step t: the overlap of the paper;
- "sequential": an edge starts step t+1 only after the cloud has finished step t (the baseline a
  pipelined run is measured against, in the same processes).
Orders in which the cloud takes the edges' payloads (`order`):
- "round_robin": edge 0 step 0, edge 1 step 0, ..., edge 0 step 1, ...: fixed, so a run is
  reproducible (the cloud's tasks are submitted in that order, and Ray runs one caller's tasks on
  an actor in submission order);
- "async": in the order the edges finish their steps (fast edges are not held back by slow ones).

Data: the training split is sharded over the edges (`shard_indices`: IID, or non-IID with label
proportions drawn from Dirichlet(alpha)); every edge starts from the same initialisation (the same
seed) with its own optimizer, and `edge_sync` K > 0 averages the edge models every K steps. Each
edge may have a simulated link (`links`: presets of `link.LINKS`): the payload is serialised on the
edge's uplink one at a time and arrives `latency_s` later; the cloud does not start a step before
its payload has arrived. Delays use the host's wall clock, so links are simulated on one host only.

Faults: every wait has a timeout. An edge process that dies (or is killed: `kill_edges` injects
that, for tests and demonstrations) comes back up to `max_restarts` times, in a new process from the
last checkpoint's state (the initial state without one), replaying the steps the cloud already has
without sending them again (`_Driver`); past that it is dropped: the cloud and the other edges go
on, and the result names the lost edge and its last delivered step. When the cloud dies the run
stops with a `ClusterError`; with checkpoints (`run(checkpoint_dir=...)`) the last one holds every
worker's state and a rerun with `resume=True` continues from it.

On one host every worker is pinned to its own CPU cores before JAX starts (the edges one core each,
round-robin over the host's cores, the cloud on the last core or on a GPU where Ray has one), so two
sides do not compete for the same cores. `address` joins an existing Ray cluster instead (README).
Ray's token authentication stays on (RAY_AUTH_MODE=token unless the environment says otherwise),
and a local cluster binds to the loopback interface only.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import os
import secrets
import signal
import threading
import time
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hier_jax import precision
from hier_jax.config import ExperimentConfig
from hier_jax.data import ImageDataset
from hier_jax.errors import RunInterrupted, UserError, WorkerError

FLOWS = ("pipelined", "sequential")
ORDERS = ("async", "round_robin")


class ClusterError(WorkerError):
    """The run cannot go on: the cloud died, or a wait timed out."""


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    edges: int = 1
    flow: str = "pipelined"  # pipelined | sequential
    order: str = "round_robin"  # round_robin (reproducible) | async (arrival order)
    dirichlet: float = 0.0  # > 0: non-IID shards, label proportions ~ Dirichlet(alpha); 0: IID
    edge_sync: int = 0  # > 0: average the edge models every this many steps
    links: tuple[str, ...] = ()  # one link preset per edge (or one for all); () = instant
    time_scale: float = 1.0  # multiplies the links' delays
    pin: bool = True  # pin each local worker to its own cores
    cloud_gpu: bool = True  # put the cloud on a GPU when Ray has one
    kill_edges: tuple[tuple[int, int], ...] = ()  # fault injection: (edge, step) the edge process exits at
    kill_cloud: int = -1  # fault injection: the cloud process exits at its step this (-1: never)
    max_restarts: int = 0  # times a lost edge is brought back from the last checkpoint
    timeout_s: float = 600.0  # the longest any single wait may take
    address: str = ""  # "" = start a local Ray cluster; else join this one
    edge_resource: str = ""  # a custom Ray resource each edge needs (one unit): its node kind
    cloud_resource: str = ""  # the same for the cloud

    def link_of(self, edge: int) -> str:
        if not self.links:
            return ""
        return self.links[0] if len(self.links) == 1 else self.links[edge]


def validate_cluster(cluster: ClusterConfig) -> None:
    """UserError naming the field, before anything starts."""
    from hier_jax.link import LINKS

    def check(ok: bool, field: str, value: Any, valid: str) -> None:
        if not ok:
            raise UserError(f"--{field.replace('_', '-')} {value!r} is invalid; valid: {valid}")

    check(cluster.edges >= 1, "edges", cluster.edges, "an integer >= 1")
    check(cluster.flow in FLOWS, "flow", cluster.flow, ", ".join(FLOWS))
    check(cluster.order in ORDERS, "order", cluster.order, ", ".join(ORDERS))
    check(
        cluster.dirichlet >= 0 and np.isfinite(cluster.dirichlet),
        "dirichlet",
        cluster.dirichlet,
        "a number > 0 (non-IID), or 0 (IID)",
    )
    check(cluster.edge_sync >= 0, "edge_sync", cluster.edge_sync, "an integer >= 0")
    check(
        len(cluster.links) in (0, 1, cluster.edges),
        "links",
        ",".join(cluster.links),
        f"one preset, or one per edge ({cluster.edges})",
    )
    for name in cluster.links:
        check(name in LINKS, "links", name, ", ".join(LINKS))
    check(cluster.time_scale > 0, "time_scale", cluster.time_scale, "a number > 0")
    check(cluster.kill_cloud >= -1, "kill_cloud", cluster.kill_cloud, "a cloud step >= 0, or -1 (never)")
    check(cluster.max_restarts >= 0, "max_restarts", cluster.max_restarts, "an integer >= 0")
    check(cluster.timeout_s > 0, "timeout_s", cluster.timeout_s, "a number of seconds > 0")
    for edge, step in cluster.kill_edges:
        check(
            0 <= edge < cluster.edges and step >= 0,
            "kill_edges",
            f"{edge}:{step}",
            f"EDGE:STEP with EDGE in 0..{cluster.edges - 1}",
        )


def shard_indices(labels: np.ndarray, edges: int, *, dirichlet: float = 0.0, seed: int = 0) -> list[np.ndarray]:
    """Training-example indices of each edge, disjoint and covering every example.

    IID (dirichlet 0): a seeded permutation cut into `edges` near-equal parts. Non-IID: for each class,
    its examples are split over the edges in proportions drawn from Dirichlet(alpha) (small alpha: each
    edge sees few classes), the usual federated-learning partition. Each index list is sorted.
    """
    rng = np.random.default_rng(seed)
    if dirichlet <= 0:
        return [np.sort(part) for part in np.array_split(rng.permutation(len(labels)), edges)]
    parts: list[list[np.ndarray]] = [[] for _ in range(edges)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        cuts = (np.cumsum(rng.dirichlet(np.full(edges, dirichlet))) * len(members)).astype(int)[:-1]
        for edge, part in enumerate(np.split(members, cuts)):
            parts[edge].append(part)
    return [np.sort(np.concatenate(p)) for p in parts]


def shard(dataset: ImageDataset, indices: np.ndarray, edge: int) -> ImageDataset:
    """The data set an edge trains on: its training examples, the whole test split, the same
    normalisation (the full set's mean and std, so every edge sees inputs on one scale)."""
    return dataclasses.replace(
        dataset,
        name=f"{dataset.name}[edge {edge}]",
        train_images=dataset.train_images[indices],
        train_labels=dataset.train_labels[indices],
    )


@dataclasses.dataclass
class EdgeReport:
    edge: int
    examples: int  # training examples in its shard
    sent: int = 0  # payloads it produced
    delivered: int = 0  # payloads the cloud trained on
    dropped: int = 0  # produced but never trained on (the edge was lost meanwhile)
    lost: bool = False
    last_delivered_step: int = -1
    restarts: int = 0  # times its process died and was brought back
    replayed: int = 0  # steps recomputed after restarts, their payloads not sent again
    max_in_flight: int = 0  # most steps submitted and not yet trained on by the cloud
    edge_accuracy: float | None = None
    cloud_accuracy: float | None = None  # the cloud exit on this edge's features
    step_s: list[float] = dataclasses.field(default_factory=list)
    losses: list[float] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ClusterResult:
    flow: str
    order: str
    steps_per_edge: int
    edges: list[EdgeReport]
    cloud_order: list[tuple[int, int]]  # (edge, step) in the order the cloud trained on them
    cloud_losses: list[float]
    cloud_step_s: list[float]
    wall_s: float  # of this run (since its resume, if resumed)
    placement: dict[str, str]
    precision: str  # the resolved policy every worker computed in
    resumed_cloud_steps: int = 0  # cloud steps taken before the checkpoint this run resumed from

    @property
    def cloud_steps_per_s(self) -> float:
        """Cloud steps this run took, per second of this run (a resumed run's earlier steps excluded)."""
        steps = len(self.cloud_order) - self.resumed_cloud_steps
        return steps / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def mean_cloud_accuracy(self) -> float | None:
        values = [e.cloud_accuracy for e in self.edges if e.cloud_accuracy is not None]
        return float(np.mean(values)) if values else None

    def summary(self) -> dict:
        return {
            "flow": self.flow,
            "order": self.order,
            "steps_per_edge": self.steps_per_edge,
            "wall_s": self.wall_s,
            "cloud_steps": len(self.cloud_order),
            "resumed_cloud_steps": self.resumed_cloud_steps,
            "cloud_steps_per_s": self.cloud_steps_per_s,
            "mean_cloud_accuracy": self.mean_cloud_accuracy,
            "placement": self.placement,
            "precision": self.precision,
            "edges": [
                {k: v for k, v in dataclasses.asdict(e).items() if k not in ("losses", "step_s")}
                | {"median_step_s": float(np.median(e.step_s)) if e.step_s else None}
                for e in self.edges
            ],
            "median_cloud_step_s": float(np.median(self.cloud_step_s)) if self.cloud_step_s else None,
        }


# ------------------------------------------------------------------------------------------------
# Workers. Each runs in its own process; `_start_jax` must run before the process touches JAX.
# ------------------------------------------------------------------------------------------------


def _start_jax(cores: Sequence[int] | None, platform: str) -> None:
    """Pin this process to `cores` and give JAX one device of `platform`; before JAX starts a backend.
    (Importing jax starts none, but it reads JAX_PLATFORMS then, so the platform goes to its config.)"""
    if cores:
        os.sched_setaffinity(0, set(cores))
    jax.config.update("jax_platforms", platform)
    from hier_jax import process

    process.setup(host_devices=1)


class _Side:
    """What an edge and the cloud worker share: a train.Setup built in this process."""

    def __init__(self, config: ExperimentConfig, dataset: ImageDataset, cores: Sequence[int] | None, platform: str):
        _start_jax(cores, platform)
        from hier_jax import train

        device = f"{jax.default_backend()}:0"
        self.config = dataclasses.replace(config, edge_device=device, cloud_device=device, out="")
        self.setup = train.build(self.config, dataset)
        self.device = jax.devices()[0]

    def placement(self) -> str:
        cores = sorted(os.sched_getaffinity(0))
        return f"pid {os.getpid()}, {self.device.platform}:{self.device.id}, cores {cores}"


def _crash() -> None:
    """Fault injection: the process dies part-way through a step, as a crashed worker would.
    The pause lets the replies of the steps before leave first; exiting at once could also lose
    the previous step's reply, which a crash mid-step would not."""
    time.sleep(0.3)
    os._exit(1)


class EdgeWorker(_Side):
    def __init__(
        self,
        edge: int,
        config: ExperimentConfig,
        dataset: ImageDataset,
        steps: int,
        cores: Sequence[int] | None,
        link: str,
        time_scale: float,
        kill_at: int | None,
    ):
        super().__init__(dataclasses.replace(config, max_steps=steps), dataset, cores, "cpu")
        from hier_jax import train
        from hier_jax.link import get_link

        self.edge, self.kill_at = edge, kill_at
        self.state = train.fresh_states(self.setup)[0]
        self.batches = iter(train.TrainBatches(self.setup))
        self.next_step = 0
        # Compile now, on a throwaway copy and the first batch, so that no timed step compiles.
        images, labels = next(iter(train.TrainBatches(self.setup)))
        jax.block_until_ready(self.setup.hierarchy.edge_step(train.fresh_states(self.setup)[0], images, labels))
        self.link = get_link(link) if link else None
        self.time_scale, self.link_free = time_scale, 0.0

    def step(self, t: int) -> tuple[Any, dict]:
        """Train edge step t; (the packed payload as numpy, metrics). Steps come in order."""
        if t == self.kill_at:
            _crash()
        if t != self.next_step:
            raise RuntimeError(f"edge {self.edge} was asked for step {t}; its next step is {self.next_step}")
        start = time.perf_counter()
        payload, metrics = jax.device_get(self._train())
        step_s = time.perf_counter() - start
        ready_at = 0.0
        if self.link is not None:
            nbytes = sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(payload))
            self.link_free = max(time.time(), self.link_free) + self.link.serialize_s(nbytes) * self.time_scale
            ready_at = self.link_free + self.link.latency_s * self.time_scale
        return (payload, ready_at), {"loss": float(metrics["loss"]), "step_s": step_s}

    def _train(self) -> tuple[Any, dict]:
        images, labels = next(self.batches)
        self.state, payload, metrics = self.setup.hierarchy.edge_step(self.state, images, labels)
        self.next_step += 1
        return payload, metrics

    def resume(self, state: Any | None, start: int, until: int) -> None:
        """Come back after a crash: from `state` at step `start` (None: the initial state, step 0),
        train steps up to `until` again without sending anything (the cloud has their payloads)."""
        if state is not None:
            self.load(state, start)
        while self.next_step < until:
            self._train()
        jax.block_until_ready(self.state)

    def params(self) -> Any:
        return jax.device_get({"params": self.state["params"], "batch_stats": self.state["batch_stats"]})

    def state_now(self) -> Any:
        return jax.device_get(self.state)

    def load(self, state: Any, start: int) -> None:
        """Continue from a checkpoint: this state, and the batches from step `start` on."""
        from hier_jax import train

        self.state = jax.device_put(state, self.device)
        self.batches = iter(train.TrainBatches(self.setup, start))
        self.next_step = start

    def set_params(self, averaged: Any) -> None:
        self.state = {**self.state, **jax.device_put(averaged, self.device)}

    def evaluate(self) -> tuple[dict, list]:
        """(edge-exit accuracy, [(payload, labels, mask)] of the test split for the cloud exit)."""

        from hier_jax.data import eval_batches

        h, correct, n, bundle = self.setup.hierarchy, 0, 0, []
        for images, labels, mask in eval_batches(self.setup.dataset, self.config.batch_size, device=self.device):
            logits, payload = h.edge_eval(self.state, images)
            hits, labels, mask = jax.device_get((jnp.argmax(logits, -1) == labels, labels, mask))
            correct += int((hits & mask).sum())
            n += int(mask.sum())
            bundle.append((jax.device_get(payload), labels, mask))
        return {"edge_accuracy": correct / n, "examples": n}, bundle


class CloudWorker(_Side):
    def __init__(
        self,
        config: ExperimentConfig,
        dataset: ImageDataset,
        steps: int,
        cores: Sequence[int] | None,
        platform: str,
        kill_at: int,
    ):
        super().__init__(dataclasses.replace(config, max_steps=steps), dataset, cores, platform)
        self.kill_at, self.steps_done = kill_at, 0

        from hier_jax import train

        self.state = train.fresh_states(self.setup)[1]
        # Compile now on a zero payload of the edge's shape, so that no timed step compiles.
        images, labels = next(iter(train.TrainBatches(self.setup)))
        shape = jax.eval_shape(self.setup.hierarchy.edge_step, train.fresh_states(self.setup)[0], images, labels)[1]
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype, device=self.device), shape)
        jax.block_until_ready(self.setup.hierarchy.cloud_step(train.fresh_states(self.setup)[1], zeros))

    def step(self, edge: int, t: int, delivery: tuple[Any, float]) -> dict:
        """Train on edge `edge`'s step-t payload, once it has arrived; metrics."""
        payload, ready_at = delivery
        index = self.steps_done
        if index == self.kill_at:
            _crash()
        self.steps_done += 1
        if (wait := ready_at - time.time()) > 0:
            time.sleep(wait)
        start = time.perf_counter()
        self.state, metrics = self.setup.hierarchy.cloud_step(self.state, jax.device_put(payload, self.device))
        loss = float(metrics["loss"])  # waits for the step
        return {"index": index, "edge": edge, "step": t, "loss": loss, "step_s": time.perf_counter() - start}

    def state_now(self) -> Any:
        return jax.device_get(self.state)

    def load(self, state: Any, steps_done: int) -> None:
        self.state, self.steps_done = jax.device_put(state, self.device), steps_done

    def evaluate(self, bundle: list) -> float:
        correct = n = 0
        for payload, labels, mask in bundle:
            logits = self.setup.hierarchy.cloud_eval(self.state, jax.device_put(payload, self.device))
            hits = np.asarray(jax.device_get(jnp.argmax(logits, -1))) == labels
            correct += int((hits & mask).sum())
            n += int(mask.sum())
        return correct / n


# ------------------------------------------------------------------------------------------------
# The driver.
# ------------------------------------------------------------------------------------------------


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


def _core_plan(cluster: ClusterConfig, cloud_on_gpu: bool) -> tuple[list[list[int] | None], list[int] | None]:
    """(cores of each edge, cores of the cloud) on this host: one core each, the cloud on the last."""
    if cluster.address or not cluster.pin:
        return [None] * cluster.edges, None
    cores = sorted(os.sched_getaffinity(0))
    if cloud_on_gpu or len(cores) == 1:
        return [[cores[i % len(cores)]] for i in range(cluster.edges)], None if cloud_on_gpu else cores
    edge_cores = cores[:-1]
    return [[edge_cores[i % len(edge_cores)]] for i in range(cluster.edges)], [cores[-1]]


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
    edge_cores, cloud_cores = _core_plan(cluster, cloud_on_gpu)
    kill = dict(cluster.kill_edges)
    # Ray restarts nothing by itself: the driver brings a lost edge back (_Driver.restart), from the
    # state of the last checkpoint, which a process Ray restarted on its own would not have.
    remote_edge = ray.remote(num_cpus=0, max_restarts=0, resources=_resource(cluster.edge_resource))(EdgeWorker)
    remote_cloud = ray.remote(
        num_cpus=0, num_gpus=1 if cloud_on_gpu else 0, max_restarts=0, resources=_resource(cluster.cloud_resource)
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
        placement = {"cloud": _get(ray, cloud.placement.remote(), cluster, "the cloud to start")}
        for e, worker in enumerate(edges):
            placement[f"edge {e}"] = _get(ray, worker.placement.remote(), cluster, f"edge {e} to start")
        if checkpoint_dir is not None:
            from hier_jax.checkpoint import RunCheckpoints

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
        {str(e): _get(ray, edges[e].state_now.remote(), cluster, f"edge {e}'s state") for e in saved}, host
    )
    cloud_template = jax.device_put(_get(ray, cloud.state_now.remote(), cluster, "the cloud's state"), host)
    edge_states, cloud_state, _ = store.restore(edge_templates, cloud_template, meta["step"])
    loads = [edges[e].load.remote(jax.device_get(edge_states[str(e)]), meta["step"]) for e in saved]
    loads.append(cloud.load.remote(jax.device_get(cloud_state), len(meta["taken"])))
    _get(ray, loads, cluster, "the workers to load the checkpoint")
    return meta | {"edge_states": {int(e): jax.device_get(s) for e, s in edge_states.items()}}


def _resource(name: str) -> dict[str, float] | None:
    return {name: 1} if name else None


def _get(ray, ref, cluster: ClusterConfig, what: str):
    try:
        return ray.get(ref, timeout=cluster.timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise ClusterError(f"timed out after {cluster.timeout_s:g} s waiting for {what}") from None
    except ray.exceptions.RayActorError as error:
        raise ClusterError(f"a worker died while waiting for {what}: {str(error).splitlines()[0]}") from None


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
        return _get(self.ray, ref, self.cluster, what)

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
            if not _alive(ray, self.cloud, self.cluster):
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
    edge_states = _get(ray, [edges[e].state_now.remote() for e in live], cluster, "the edges' states")
    cloud_state = _get(ray, cloud.state_now.remote(), cluster, "the cloud's state")
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
    trees = _get(ray, [e.params.remote() for e in edges], cluster, "the edges' parameters")
    mean = jax.tree.map(lambda *leaves: np.mean(np.stack(leaves), axis=0).astype(leaves[0].dtype), *trees)
    shared = ray.put(mean)
    _get(ray, [e.set_params.remote(shared) for e in edges], cluster, "the edges to take the averaged model")


def _alive(ray, worker, cluster: ClusterConfig) -> bool:
    """Does the worker still answer? (a cloud task can fail because its payload's edge died)"""
    try:
        ray.get(worker.placement.remote(), timeout=min(cluster.timeout_s, 60))
        return True
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return False
