"""How a cluster run is laid out (edges, order, faults, where the workers go), checked before anything
starts. What every runner shares (the schedule, the link) is in the ExperimentConfig."""

from __future__ import annotations

import dataclasses
import math

from hier_jax.config import ExperimentConfig, validate
from hier_jax.errors import ConfigError, WorkerError, check
from hier_jax.flags import int_pair, option

ORDERS = ("async", "round_robin")


class ClusterError(WorkerError):
    """The run cannot go on: the cloud died, or a wait timed out."""


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    edges: int = option(1, "edge processes, one cloud")
    order: str = option("round_robin", "the cloud's order: round_robin (reproducible) | async (arrival order)")
    dirichlet: float = option(0.0, "> 0: non-IID shards, label proportions ~ Dirichlet(ALPHA); 0: IID")
    edge_sync: int = option(0, "> 0: average the edge models every this many steps")
    pin: bool = option(True, "pin each local worker to its own cores", run_only=True)
    cloud_gpu: bool = option(True, "put the cloud on a GPU when Ray has one", run_only=True)
    kill_edges: tuple[tuple[int, int], ...] = option(
        (),
        "fault injection: that edge's process exits at that step (repeatable)",
        flag="--kill-edge",
        repeat=True,
        metavar="EDGE:STEP",
        parse=int_pair("EDGE:STEP", "two integers >= 0"),
        run_only=True,
    )
    kill_cloud: int = option(
        -1, "fault injection: the cloud's process exits at its step STEP (-1: never)", metavar="STEP", run_only=True
    )
    max_restarts: int = option(
        0, "bring a lost edge back up to R times, from the last checkpoint", metavar="R", run_only=True
    )
    timeout_s: float = option(600.0, "the longest any single wait may take (s)", flag="--timeout", run_only=True)
    address: str = option("", "join this Ray cluster instead of starting one", run_only=True)
    edge_resource: str = option(
        "", "a custom Ray resource every edge needs (ray start --resources '{\"edge\": 4}')", run_only=True
    )
    cloud_resource: str = option("", "the same for the cloud", run_only=True)


def validate_cluster(cluster: ClusterConfig, config: ExperimentConfig | None = None) -> None:
    """ConfigError naming the flag, before anything starts; with `config`, the run's config too (for
    this many edges, and a scheme the Ray workers train)."""
    check(cluster.edges >= 1, "--edges", cluster.edges, "an integer >= 1")
    check(cluster.order in ORDERS, "--order", cluster.order, ", ".join(ORDERS))
    check(
        cluster.dirichlet >= 0 and math.isfinite(cluster.dirichlet),
        "--dirichlet",
        cluster.dirichlet,
        "a number > 0 (non-IID), or 0 (IID)",
    )
    check(cluster.edge_sync >= 0, "--edge-sync", cluster.edge_sync, "an integer >= 0")
    check(cluster.kill_cloud >= -1, "--kill-cloud", cluster.kill_cloud, "a cloud step >= 0, or -1 (never)")
    check(cluster.max_restarts >= 0, "--max-restarts", cluster.max_restarts, "an integer >= 0")
    check(
        math.isfinite(cluster.timeout_s) and cluster.timeout_s > 0,
        "--timeout",
        cluster.timeout_s,
        "a number of seconds > 0",
    )
    for edge, step in cluster.kill_edges:
        check(
            0 <= edge < cluster.edges and step >= 0,
            "--kill-edge",
            f"{edge}:{step}",
            f"EDGE:STEP with EDGE in 0..{cluster.edges - 1}",
        )
    if config is not None:
        validate(config, edges=cluster.edges)
        if config.scheme != "hierarchical":
            raise ConfigError(
                f"--scheme {config.scheme} runs in this process (experiments.train); the Ray workers "
                f"train the hierarchical scheme"
            )
