"""What a cluster run reports: per edge (its counts and both exits' accuracies) and the run record."""

from __future__ import annotations

import dataclasses

import numpy as np

from hier_jax.run.record import RunRecord


@dataclasses.dataclass
class EdgeReport:
    edge: int
    examples: int  # training examples in its shard
    sent: int = 0  # payloads it produced
    delivered: int = 0  # payloads the cloud trained on
    dropped: int = 0  # produced but never trained on (dropped by its link, or its edge was lost meanwhile)
    link_dropped: list[int] = dataclasses.field(default_factory=list)  # steps its link's outage buffer dropped
    lost: bool = False
    last_delivered_step: int = -1
    restarts: int = 0  # times its process died and was brought back
    replayed: int = 0  # steps recomputed after restarts, their payloads not sent again
    max_in_flight: int = 0  # most steps submitted and not yet trained on by the cloud
    edge_accuracy: float | None = None
    cloud_accuracy: float | None = None  # the cloud exit on this edge's features


@dataclasses.dataclass
class ClusterResult:
    schedule: str
    order: str
    steps_per_edge: int
    edges: list[EdgeReport]
    record: RunRecord  # every edge's steps and the cloud's, in the order it trained, since step 0
    wall_s: float  # of this run (since its resume, if resumed)
    placement: dict[str, str]
    precision: str  # the resolved policy every worker computed in
    resumed_cloud_steps: int = 0  # cloud steps taken before the checkpoint this run resumed from

    @property
    def cloud_order(self) -> list[tuple[int, int]]:
        """(edge, edge step) of every cloud step, in the order the cloud trained on them."""
        return list(zip(self.record.cloud["edge"], self.record.cloud["step"], strict=True))

    @property
    def cloud_losses(self) -> list[float]:
        return list(self.record.cloud["loss"])

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
        def median(values: list[float]) -> float | None:
            finite = [v for v in values if np.isfinite(v)]
            return float(np.median(finite)) if finite else None

        return {
            "schedule": self.schedule,
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
                dataclasses.asdict(e) | {"median_step_s": median(self.record.edges[e.edge]["step_s"])}
                for e in self.edges
            ],
            "median_cloud_step_s": median(self.record.cloud["step_s"]),
        }
