"""How a cluster run is laid out (edges, order, faults, where the workers go), checked before anything starts."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from hier_jax.errors import UserError, WorkerError

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
