"""Where Ray puts the workers: pinning on one host, the cloud on a GPU, joining a cluster and the
resources that pick its nodes. What every backend shares (edges, order, schedule, link, faults) is
in the ExperimentConfig."""

from __future__ import annotations

import dataclasses

from hier_jax.flags import option


@dataclasses.dataclass(frozen=True)
class RayConfig:
    pin: bool = option(True, "pin each local worker to its own cores", run_only=True)
    cloud_gpu: bool = option(True, "put the cloud on a GPU when Ray has one", run_only=True)
    address: str = option("", "join this Ray cluster instead of starting one", run_only=True)
    edge_resource: str = option(
        "", "a custom Ray resource every edge needs (ray start --resources '{\"edge\": 4}')", run_only=True
    )
    cloud_resource: str = option("", "the same for the cloud", run_only=True)
