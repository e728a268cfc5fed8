"""What a cluster run reports: per edge, and for the cloud."""

from __future__ import annotations

import dataclasses

import numpy as np


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
