"""The driver: starts the workers, resumes, checkpoints, and hands the run to its loop (`loop.Driver`)."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import numpy as np

from hier_jax import precision
from hier_jax.cluster.config import ClusterConfig, validate_cluster
from hier_jax.cluster.host import core_plan, get, resource, start_ray
from hier_jax.cluster.loop import Driver
from hier_jax.cluster.results import ClusterResult, EdgeReport
from hier_jax.cluster.workers import CloudWorker, EdgeWorker
from hier_jax.config import ExperimentConfig
from hier_jax.data import ImageDataset, num_train_steps
from hier_jax.data.shards import shard, shard_indices
from hier_jax.errors import DivergenceError, RunInterrupted, UserError
from hier_jax.run.checkpoint import RunCheckpoints
from hier_jax.run.record import RunRecord, check_resumable, read_meta, record_of, run_meta, tree_is_finite


def run(
    config: ExperimentConfig,
    dataset: ImageDataset,
    cluster: ClusterConfig,
    *,
    progress: bool = False,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
) -> ClusterResult:
    """Train `cluster.edges` edges and one cloud in their own processes (hier_jax.cluster).

    With `checkpoint_dir`, every worker's state is saved together every `config.checkpoint_every`
    steps per edge, at a step every edge has reached and the cloud has settled (one orbax checkpoint:
    the edges' states, the cloud's, and the run's record, in the run record's format); `resume`
    continues from the latest one, in round-robin order bit for bit as if never stopped.
    """
    validate_cluster(cluster, config)
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
    # Ray restarts nothing by itself: the driver brings a lost edge back (loop.Driver.restart), from the
    # state of the last checkpoint, which a process Ray restarted on its own would not have.
    remote_edge = ray.remote(num_cpus=0, max_restarts=0, resources=resource(cluster.edge_resource))(EdgeWorker)  # pyright: ignore[reportArgumentType] - ray types it without its None default
    remote_cloud = ray.remote(
        num_cpus=0,
        num_gpus=1 if cloud_on_gpu else 0,
        max_restarts=0,
        resources=resource(cluster.cloud_resource),  # pyright: ignore[reportArgumentType] - ray types it without its None default
    )(CloudWorker)
    shard_refs = [ray.put(part) for part in shards]

    def spawn_edge(e: int, first_life: bool):
        return remote_edge.remote(
            e, worker_config, shard_refs[e], steps, edge_cores[e], kill.get(e) if first_life else None
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
            store = RunCheckpoints(checkpoint_dir, keep=config.keep_checkpoints)
        meta, saved_states = (
            (None, {})
            if store is None or not resume
            else _resume(ray, store, edges, cloud, config, cluster, steps, policy)
        )
        reports = (
            [EdgeReport(**r) for r in meta["workers"]["reports"]]
            if meta
            else [EdgeReport(e, shards[e].num_train) for e in range(cluster.edges)]
        )
        steps_per_epoch = min(num_train_steps(part, config.batch_size) for part in shards)
        wall_before = 0.0 if meta is None else float(meta.get("wall_s", 0.0))
        started = time.perf_counter()

        def checkpoint(step: int, reports: list[EdgeReport], record: RunRecord) -> dict[int, Any]:
            assert store is not None
            made = run_meta(
                step=step,
                total_steps=steps,
                scheme="hierarchical",
                schedule=config.schedule,
                precision=policy,
                config=config,
                record=record.cut(step),
                wall_s=wall_before + time.perf_counter() - started,
                steps_per_epoch=steps_per_epoch,
                cluster=cluster,
            )
            return _save(ray, store, edges, cloud, cluster, step, reports, made)

        driver = Driver(
            ray,
            edges,
            cloud,
            spawn_edge,
            cluster,
            config,
            reports,
            record_of(meta, cluster.edges),
            steps,
            0 if meta is None else meta["step"],
            checkpoint if store is not None else None,
            store.path if store is not None else None,
            lambda live: _average_edges(ray, live, cluster),
            saved_states,
            policy,
        )
        try:
            return driver.drive(placement, progress)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the workers go (finally); the last checkpoint stays
            saved = store.latest_step() if store is not None else None
            raise RunInterrupted(saved or 0, None if saved is None or store is None else store.path(saved)) from None
    finally:
        if store is not None:
            store.close()
        for worker in [*edges, cloud]:  # `edges` holds each edge's latest process (the driver replaces restarted ones)
            ray.kill(worker)


def _resume(
    ray, store: RunCheckpoints, edges, cloud, config: ExperimentConfig, cluster: ClusterConfig, steps: int, policy: str
) -> tuple[dict | None, dict[int, Any]]:
    """Load the latest checkpoint (either format) into the workers: its metadata in the run record's
    format, and the edges' states, kept to restart an edge from; (None, {}) when there is none."""
    if store.latest_step() is None:
        return None, {}
    meta = read_meta(store.read_meta())
    where = store.path(meta["step"])
    check_resumable(
        meta, config=config, scheme="hierarchical", precision=policy, total_steps=steps, where=where, cluster=cluster
    )
    saved = [int(e) for e in meta["workers"]["saved_edges"]]
    host = jax.devices("cpu")[0]
    edge_templates = jax.device_put(
        {str(e): get(ray, edges[e].state_now.remote(), cluster, f"edge {e}'s state") for e in saved}, host
    )
    cloud_template = jax.device_put(get(ray, cloud.state_now.remote(), cluster, "the cloud's state"), host)
    edge_states, cloud_state, _ = store.restore(edge_templates, cloud_template, meta["step"])
    loads = [edges[e].load.remote(jax.device_get(edge_states[str(e)]), meta["step"]) for e in saved]
    loads.append(cloud.load.remote(jax.device_get(cloud_state), len(meta["record"]["cloud"]["step"])))
    get(ray, loads, cluster, "the workers to load the checkpoint")
    return meta, {int(e): jax.device_get(s) for e, s in edge_states.items()}


def _save(
    ray, store: RunCheckpoints, edges, cloud, cluster: ClusterConfig, step: int, reports: list[EdgeReport], meta: dict
) -> dict[int, Any]:
    """One checkpoint of every live worker's state at `step` (none saved if any is non-finite); the
    edges' saved states, by edge."""
    live = [r.edge for r in reports if not r.lost]
    edge_states = get(ray, [edges[e].state_now.remote() for e in live], cluster, "the edges' states")
    cloud_state = get(ray, cloud.state_now.remote(), cluster, "the cloud's state")
    previous = store.latest_step()
    for name, state in [*((f"edge {e}", s) for e, s in zip(live, edge_states, strict=True)), ("cloud", cloud_state)]:
        if not tree_is_finite(state):
            side, _, edge = name.partition(" ")
            raise DivergenceError(
                side,
                step - 1,
                float("nan"),
                None if previous is None else store.path(previous),
                edge=int(edge) if edge else None,
            )
    meta["workers"] = {"saved_edges": live, "reports": [dataclasses.asdict(r) for r in reports]}
    store.save(step, {str(e): s for e, s in zip(live, edge_states, strict=True)}, cloud_state, meta)
    return dict(zip(live, edge_states, strict=True))


def _average_edges(ray, edges, cluster: ClusterConfig) -> None:
    """Replace every given edge's parameters and BatchNorm statistics by their mean over those edges."""
    trees = get(ray, [e.params.remote() for e in edges], cluster, "the edges' parameters")
    mean = jax.tree.map(lambda *leaves: np.mean(np.stack(leaves), axis=0).astype(leaves[0].dtype), *trees)
    shared = ray.put(mean)
    get(ray, [e.set_params.remote(shared) for e in edges], cluster, "the edges to take the averaged model")
