"""A run with every worker in a Ray process of its own: `run` starts (or joins) Ray, places the
workers, and hands them to the one lifecycle (`run.driver.drive`)."""

from __future__ import annotations

import dataclasses
import os

from hier_jax.cluster.config import RayConfig
from hier_jax.cluster.host import RayBackend, core_plan, resource, start_ray
from hier_jax.config import ExperimentConfig, as_run, validate
from hier_jax.data import ImageDataset
from hier_jax.run import driver
from hier_jax.run.result import RunResult
from hier_jax.run.workers import RayCloud, RayEdge


def run(
    config: ExperimentConfig,
    dataset: ImageDataset,
    ray_config: RayConfig | None = None,
    *,
    progress: bool = False,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    evaluate: bool = True,
) -> RunResult:
    """The run `config` describes with its edges and its cloud as Ray actors (hier_jax.cluster)."""
    ray_config = ray_config or RayConfig()
    validate(config)
    config = as_run(config)
    shards = driver.shards_of(config, dataset)
    steps = driver.steps_per_edge(config, shards)
    policy = driver.resolved_policy(config)
    worker_config = dataclasses.replace(config, precision=policy)
    ray = start_ray(
        ray_config, num_cpus=max(len(os.sched_getaffinity(0)), config.edges + 1), timeout_s=config.timeout_s
    )
    cloud_on_gpu = ray_config.cloud_gpu and ray.cluster_resources().get("GPU", 0) >= 1
    edge_cores, cloud_cores = core_plan(ray_config, config.edges, cloud_on_gpu)
    kills = dict(config.kill_edges)
    # Ray restarts nothing by itself: the scheduler brings a lost edge back (Scheduler.restart), from the
    # state of the last checkpoint, which a process Ray restarted on its own would not have.
    remote_edge = ray.remote(num_cpus=0, max_restarts=0, resources=resource(ray_config.edge_resource))(RayEdge)
    remote_cloud = ray.remote(
        num_cpus=0, num_gpus=1 if cloud_on_gpu else 0, max_restarts=0, resources=resource(ray_config.cloud_resource)
    )(RayCloud)
    dataset_ref, shard_refs = ray.put(dataset), [ray.put(part) for part in shards]

    def spawn_edge(e: int, first_life: bool):
        return remote_edge.remote(
            e, worker_config, dataset_ref, shard_refs[e], edge_cores[e], kills.get(e) if first_life else None
        )

    def spawn_cloud():
        return remote_cloud.remote(
            worker_config, dataset_ref, cloud_cores, "cuda" if cloud_on_gpu else "cpu", config.kill_cloud
        )

    backend = RayBackend(ray, spawn_edge, spawn_cloud)
    return driver.drive(
        backend,
        config,
        shards,
        steps,
        policy=policy,
        payload=None,
        progress=progress,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        timeout_s=config.timeout_s,
        evaluate=evaluate,
    )
