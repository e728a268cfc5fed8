"""Edges and one cloud as separate processes on Ray: N edges train against one cloud.

Each edge and the cloud is a Ray actor, a process with its own JAX runtime, which runs the library's
own pure steps: every worker calls `train.build` on its config and its data (no second copy of the
training logic), so the jitted edge and cloud steps, the packed payload and the optimizers are the
in-process runner's. The driver (the process that calls `run`) moves nothing but references: an
edge step returns its payload into Ray's object store, and the cloud step that consumes it is
handed the reference, so the payload goes from the edge's process to the cloud's without passing
through the driver.

Schedules (`ExperimentConfig.schedule`, as for the in-process runner):
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
edge may have a simulated link (`ExperimentConfig.link`: a preset per edge, outages, the edge's
buffer), replayed on the driver with the clock the in-process runner uses (`link.LinkClock`): the
payload is serialised on the edge's uplink one at a time and arrives `latency_s` later, the cloud
does not start a step before its payload has arrived, and while the link is down the payloads wait
in the edge's buffer, the oldest dropped (`loop`). Delays use the host's wall clock, so links are
simulated on one host only.

Faults: every wait has a timeout. An edge process that dies (or is killed: `kill_edges` injects
that, for tests and demonstrations) comes back up to `max_restarts` times, in a new process from the
last checkpoint's state (the initial state without one), replaying the steps the cloud already has
without sending them again (`loop.Driver`); past that it is dropped: the cloud and the other edges go
on, and the result names the lost edge and its last delivered step. When the cloud dies the run
stops with a `ClusterError`, and a NaN or infinite loss with a `DivergenceError` naming the side,
the edge and the step. With checkpoints (`run(checkpoint_dir=...)`) the last one holds every
worker's state and a rerun with `resume=True` continues from it.

On one host every worker is pinned to its own CPU cores before JAX starts (the edges one core each,
round-robin over the host's cores, the cloud on the last core or on a GPU where Ray has one), so two
sides do not compete for the same cores. `address` joins an existing Ray cluster instead (README).
Ray's token authentication stays on (RAY_AUTH_MODE=token unless the environment says otherwise),
and a local cluster binds to the loopback interface only.
"""

from hier_jax.cluster.config import ORDERS, ClusterConfig, ClusterError, validate_cluster
from hier_jax.cluster.driver import run
from hier_jax.cluster.host import start_ray
from hier_jax.cluster.results import ClusterResult, EdgeReport
from hier_jax.data.shards import shard, shard_indices

__all__ = [
    "ORDERS",
    "ClusterConfig",
    "ClusterError",
    "ClusterResult",
    "EdgeReport",
    "run",
    "shard",
    "shard_indices",
    "start_ray",
    "validate_cluster",
]
