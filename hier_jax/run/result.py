"""What a run reports, on any backend: per edge (its counts and both exits' accuracies), the run
record, and in this process the final states."""

from __future__ import annotations

import dataclasses
from typing import Any

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
    restarts: int = 0  # times its worker died and was brought back
    replayed: int = 0  # steps recomputed after restarts, their payloads not sent again
    max_in_flight: int = 0  # most steps submitted and not yet trained on by the cloud
    edge_accuracy: float | None = None  # the early exit on the test split (None: not evaluated, or no exit)
    cloud_accuracy: float | None = None  # the final exit on this edge's test-split inputs


@dataclasses.dataclass
class RunResult:
    """A run's record since step 0, its reports, and where it ran. `edge_states` and `cloud_state`
    are the final states when the workers ran in this process (None on Ray); `interrupted` runs
    raise instead of returning (`RunInterrupted`), so a result is always of a whole run."""

    scheme: str
    schedule: str
    order: str
    steps_per_edge: int
    edges: list[EdgeReport]
    record: RunRecord
    wall_s: float  # of this run (since its resume, if resumed)
    placement: dict[str, str]
    precision: str  # the resolved policy every worker computed in
    payload_bytes: int  # what one batch sends up (and, in split learning, down), as the cost model counts it
    start_step: int = 0  # the step this run resumed at (0: from the start)
    resumed_cloud_steps: int = 0  # cloud steps taken before the checkpoint this run resumed from
    edge_states: list[Any] | None = None
    cloud_state: Any = None
    network: dict | None = None  # over a network: per edge, its bytes each way and connection events

    @property
    def end_step(self) -> int:
        return self.steps_per_edge

    @property
    def edge_state(self) -> Any:
        """Edge 0's final state (in this process)."""
        return None if self.edge_states is None else self.edge_states[0]

    @property
    def edge_metrics(self) -> dict[str, np.ndarray]:
        """Edge 0's {"loss": [T], "accuracy": [T]} over its steps (empty for the baselines: no early exit)."""
        edge = self.record.edge_metrics(0)
        return {k: edge[k] for k in ("loss", "accuracy")}

    @property
    def cloud_metrics(self) -> dict[str, np.ndarray]:
        """The cloud's {"loss", "accuracy"} in the order it trained."""
        cloud = self.record.cloud_metrics()
        return {k: cloud[k] for k in ("loss", "accuracy")}

    @property
    def cloud_steps(self) -> np.ndarray:
        """cloud_steps[i]: the edge step whose payload the cloud's i-th step consumed."""
        return self.record.cloud_metrics()["step"]

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

    def accuracy(self, exit_: str) -> float | None:
        """The mean over the edges still alive of one exit's test accuracy ("edge" or "cloud"; None:
        not evaluated, or no early exit)."""
        values = [getattr(e, f"{exit_}_accuracy") for e in self.edges if not e.lost]
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else None

    def summary(self) -> dict:
        def median(values: list[float]) -> float | None:
            finite = [v for v in values if np.isfinite(v)]
            return float(np.median(finite)) if finite else None

        return {
            "scheme": self.scheme,
            "schedule": self.schedule,
            "order": self.order,
            "steps_per_edge": self.steps_per_edge,
            "resumed_from_step": self.start_step,
            "wall_s": self.wall_s,
            "cloud_steps": len(self.cloud_order),
            "resumed_cloud_steps": self.resumed_cloud_steps,
            "cloud_steps_per_s": self.cloud_steps_per_s,
            "edge_accuracy": self.accuracy("edge"),
            "cloud_accuracy": self.accuracy("cloud"),
            "placement": self.placement,
            "precision": self.precision,
            "payload_bytes_per_batch": self.payload_bytes,
            "edges": [
                dataclasses.asdict(e) | {"median_step_s": median(self.record.edges[e.edge]["step_s"])}
                for e in self.edges
            ],
            "median_cloud_step_s": median(self.record.cloud["step_s"]),
        } | ({"network": self.network} if self.network is not None else {})
