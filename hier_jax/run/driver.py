"""A whole run on any backend: the edges' shards, the workers, resuming from a checkpoint, the
scheduler's loop, and the end (every edge's exits evaluated, the run's result).

`in_process` runs the workers on threads of this process from a built `train.Setup` (its compiled
steps shared by every edge); `cluster.run` runs each in a Ray process of its own. Both go through
`drive`, the one lifecycle: checkpoints of every worker at a common step in one schema, resume, Ctrl-C
and SIGTERM, divergence, timeouts on every wait, and the same result.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import jax

from hier_jax import precision
from hier_jax.config import ExperimentConfig, validate
from hier_jax.data import ImageDataset, num_train_steps
from hier_jax.data.shards import shard, shard_indices
from hier_jax.errors import ConfigError, RunInterrupted, UserError, WorkerTimeout
from hier_jax.run.backends import Backend, ThreadBackend
from hier_jax.run.checkpoint import RunCheckpoints
from hier_jax.run.record import RunRecord, check_resumable, read_meta, record_of, run_meta
from hier_jax.run.result import EdgeReport, RunResult
from hier_jax.run.scheduler import Scheduler
from hier_jax.run.snapshots import Snapshots
from hier_jax.run.workers import CloudWorker, EdgeWorker, Programs


def shards_of(config: ExperimentConfig, dataset: ImageDataset) -> list[ImageDataset]:
    """Each edge's data: its shard of the training split, the whole test split (one edge: all of it)."""
    if config.edges == 1:
        return [dataset]
    parts = [
        shard(dataset, idx, e)
        for e, idx in enumerate(
            shard_indices(dataset.train_labels, config.edges, dirichlet=config.dirichlet, seed=config.seed)
        )
    ]
    for e, part in enumerate(parts):
        if part.num_train < config.batch_size:
            raise UserError(
                f"edge {e}'s shard has {part.num_train} examples, fewer than one batch of "
                f"{config.batch_size}; use fewer --edges, a smaller --batch-size or a larger --dirichlet"
            )
    return parts


def steps_per_edge(config: ExperimentConfig, shards: list[ImageDataset]) -> int:
    from hier_jax import train

    return min(train.total_steps(config, part) for part in shards)


def payload_bytes(setup: Any, scheme: str) -> int:
    from hier_jax import train

    return train.payload_nbytes(setup, scheme)


def in_process(
    setup: Any,
    *,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    timeout_s: float | None = None,
    evaluate: bool = False,
) -> RunResult:
    """The run `setup.config` describes, its workers on threads of this process (`setup`'s compiled
    steps, every edge on the edge device with its own dispatch thread, the cloud on the cloud device)."""
    config = setup.config
    validate(config)
    shards = shards_of(config, setup.dataset)
    steps = steps_per_edge(config, shards)
    if steps != setup.total_steps:
        raise ConfigError(
            f"the setup was built for {setup.total_steps} steps per edge, this run's {config.edges} "
            f"edge(s) take {steps}: build it from this config (train.build)"
        )
    programs = Programs.of(setup, config.scheme)
    edge_setups = [setup if len(shards) == 1 else dataclasses.replace(setup, dataset=part) for part in shards]
    kills = dict(config.kill_edges)

    def make_edge(e: int, first_life: bool) -> EdgeWorker:
        return EdgeWorker(e, programs, edge_setups[e], kill_at=kills.get(e) if first_life else None)

    backend = ThreadBackend(make_edge, lambda: CloudWorker(programs, kill_at=config.kill_cloud))
    return drive(
        backend,
        config,
        shards,
        steps,
        policy=setup.precision,
        payload=payload_bytes(setup, config.scheme),
        progress=progress,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        timeout_s=config.timeout_s if timeout_s is None else timeout_s,
        evaluate=evaluate,
        final_states=True,
    )


def drive(
    backend: Backend,
    config: ExperimentConfig,
    shards: list[ImageDataset],
    steps: int,
    *,
    policy: str,
    payload: int | None,
    progress: bool,
    checkpoint_dir: str | os.PathLike | None,
    resume: bool,
    timeout_s: float,
    evaluate: bool,
    final_states: bool = False,
) -> RunResult:
    """The lifecycle every backend shares (see the module docstring); stops every worker on the way out.
    `payload`: the bytes one batch sends, from the shapes (None: as the steps measure them)."""
    store, snapshots, finished = None, None, False
    try:
        cloud = backend.spawn_cloud()
        edges = [backend.spawn_edge(e) for e in range(config.edges)]
        placement = {"cloud": _get(backend, backend.submit(cloud, "placement"), timeout_s, "the cloud to start")}
        for e, worker in enumerate(edges):
            placement[f"edge {e}"] = _get(backend, backend.submit(worker, "placement"), timeout_s, f"edge {e} to start")
        if checkpoint_dir is not None:
            store = RunCheckpoints(
                checkpoint_dir, keep=config.keep_checkpoints, read_only=resume and not Path(checkpoint_dir).is_dir()
            )
            if not resume and store.steps():
                raise ConfigError(
                    f"{store.directory} already holds checkpoints {store.steps()}: pass resume=True to "
                    f"continue that run, or another checkpoint_dir"
                )
        meta, saved = (
            (None, {})
            if store is None or not resume
            else _resume(backend, store, edges, cloud, config, steps, policy, timeout_s)
        )
        record = record_of(meta, config.edges)
        reports = _reports(meta, shards, record)
        first = 0 if meta is None else int(meta["step"])
        per_epoch = min(num_train_steps(part, config.batch_size) for part in shards)
        wall_before = 0.0 if meta is None else float(meta.get("wall_s", 0.0))
        started = time.perf_counter()

        def checkpoint_meta(step: int, cloud_index: int, live: list[int]) -> dict:
            return run_meta(
                step=step,
                total_steps=steps,
                scheme=config.scheme,
                schedule=config.schedule,
                precision=policy,
                config=config,
                record=scheduler.record.cut(step, cloud_index),
                wall_s=wall_before + time.perf_counter() - started,
                steps_per_epoch=per_epoch,
                workers={"saved_edges": live, "reports": [dataclasses.asdict(r) for r in reports]},
            )

        snapshots = Snapshots(store, config.checkpoint_every, steps, first, checkpoint_meta)
        snapshots.restart_states = saved

        def average(live: list) -> None:
            _average_edges(backend, live, timeout_s)

        scheduler = Scheduler(
            backend, edges, cloud, config, reports, record, steps, first, snapshots, average, timeout_s
        )
        try:
            wall_s = scheduler.drive(progress)
        except RunInterrupted as stopped:
            raise RunInterrupted(stopped.step, stopped.checkpoint) from None
        for e, future in scheduler.restarted_placement.items():
            if scheduler.alive(e):
                placement[f"edge {e}"] = _get(backend, future, timeout_s, f"restarted edge {e} to start")
        for e, report in enumerate(reports):
            if evaluate and scheduler.alive(e):
                _evaluate(backend, scheduler.edges[e], cloud, report, timeout_s)
            report.dropped = report.sent - report.delivered
        states = None, None
        if final_states:  # a lost edge has none
            states = (
                [
                    _get(backend, backend.submit(w, "state_now"), timeout_s, "the final state")
                    if scheduler.alive(e)
                    else None
                    for e, w in enumerate(scheduler.edges)
                ],
                _get(backend, backend.submit(cloud, "state_now"), timeout_s, "the final state"),
            )
        result = RunResult(
            config.scheme,
            config.schedule,
            config.order,
            steps,
            reports,
            scheduler.record,
            wall_s,
            placement,
            policy,
            scheduler.payload_bytes if payload is None else payload,
            first,
            scheduler.resumed_cloud_steps,
            *states,
            backend.report(),
        )
        finished = True
        return result
    finally:
        if snapshots is not None:  # a run that failed part-way still writes what it had queued, then the writer stops
            snapshots.close()
        if store is not None:
            store.close()
        backend.stop(finished)


def _get(backend: Backend, future: Any, timeout_s: float, what: str) -> Any:
    try:
        return backend.get(future, timeout_s)
    except TimeoutError:
        raise WorkerTimeout(f"timed out after {timeout_s:g} s waiting for {what}") from None


def _reports(meta: dict | None, shards: list[ImageDataset], record: RunRecord) -> list[EdgeReport]:
    """Each edge's report: afresh, or as a checkpoint left it (its counts from the checkpoint's record)."""
    if meta is None:
        return [EdgeReport(e, part.num_train) for e, part in enumerate(shards)]
    reports = []
    saved_reports = meta["workers"].get("reports") or [{} for _ in shards]
    for e, (saved, part) in enumerate(zip(saved_reports, shards, strict=True)):
        delivered = sorted(record.delivered(e))
        reports.append(
            EdgeReport(
                e,
                saved.get("examples", part.num_train),
                sent=len(record.edges[e]["step"]),
                delivered=len(delivered),
                link_dropped=[t for t in saved.get("link_dropped", []) if t < meta["step"]],
                lost=saved.get("lost", False),
                last_delivered_step=delivered[-1] if delivered else -1,
                restarts=saved.get("restarts", 0),
                replayed=saved.get("replayed", 0),
                max_in_flight=saved.get("max_in_flight", 0),
            )
        )
    return reports


def _resume(
    backend: Backend,
    store: RunCheckpoints,
    edges: list,
    cloud: Any,
    config: ExperimentConfig,
    steps: int,
    policy: str,
    timeout_s: float,
) -> tuple[dict | None, dict[int, Any]]:
    """Load the latest checkpoint (either format, either runner) into the workers: its metadata in the
    run record's format, and the edges' states, kept to restart an edge from; (None, {}) without one."""
    if store.latest_step() is None:
        return None, {}
    meta = read_meta(store.read_meta())
    where = store.path(meta["step"])
    check_resumable(meta, config=config, scheme=config.scheme, precision=policy, total_steps=steps, where=where)
    saved = [int(e) for e in meta["workers"]["saved_edges"]]
    host = jax.devices("cpu")[0]
    templates = {
        str(e): _get(backend, backend.submit(edges[e], "state_now"), timeout_s, f"edge {e}'s state") for e in saved
    }
    cloud_template = _get(backend, backend.submit(cloud, "state_now"), timeout_s, "the cloud's state")
    bare = meta["workers"].get("bare_edge_item", False)  # format 1 of the in-process runner: one edge, not keyed
    edge_template = templates[str(saved[0])] if bare else templates
    edge_states, cloud_state, _ = store.restore(
        jax.device_put(edge_template, host), jax.device_put(cloud_template, host), meta["step"]
    )
    if bare:
        edge_states = {str(saved[0]): edge_states}
    loads = [backend.submit(edges[e], "load", jax.device_get(edge_states[str(e)]), meta["step"]) for e in saved]
    loads.append(backend.submit(cloud, "load", jax.device_get(cloud_state), len(meta["record"]["cloud"]["step"])))
    for future in loads:
        _get(backend, future, timeout_s, "the workers to load the checkpoint")
    return meta, {int(e): jax.device_get(s) for e, s in edge_states.items()}


def _average_edges(backend: Backend, edges: list, timeout_s: float) -> None:
    """Replace every given edge's parameters and BatchNorm statistics by their mean over those edges."""
    import numpy as np

    trees = [_get(backend, backend.submit(e, "params"), timeout_s, "the edges' parameters") for e in edges]
    mean = jax.tree.map(lambda *leaves: np.mean(np.stack(leaves), axis=0).astype(leaves[0].dtype), *trees)
    for future in [backend.submit(e, "set_params", mean) for e in edges]:
        _get(backend, future, timeout_s, "the edges to take the averaged model")


def _evaluate(backend: Backend, edge: Any, cloud: Any, report: EdgeReport, timeout_s: float) -> None:
    """Both exits of one edge on the test split: the early exit on the edge, the final one on its inputs."""
    result, bundle = backend.submit(edge, "evaluate", returns=2)
    report.edge_accuracy = _get(backend, result, timeout_s, f"edge {report.edge}'s evaluation")["edge_accuracy"]
    report.cloud_accuracy = _get(
        backend,
        backend.submit(cloud, "evaluate", bundle),
        timeout_s,
        f"the cloud's evaluation on edge {report.edge}'s inputs",
    )


def resolved_policy(config: ExperimentConfig) -> str:
    """One precision policy for every worker: "auto" resolved for the edges' backend (the CPU) without
    starting a backend here, which on a GPU host would take the cloud's GPU memory."""
    return precision.resolve(config.precision, "cpu").name
