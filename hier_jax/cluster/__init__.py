"""Ray as a backend of the one scheduler: every edge and the cloud in a process of its own.

Each worker is a Ray actor, a process with its own JAX runtime, which runs the library's own
workers (`run.workers`) over a `train.Setup` it builds itself: the jitted steps, the packed payload
and the optimizers are the in-process runner's, and the scheduler, the checkpoints, the links and the
faults are the same code (`run.scheduler`, `run.driver`). The driver moves nothing but references:
an edge step returns its payload into Ray's object store, and the cloud step that consumes it is
handed the reference, so the payload goes from the edge's process to the cloud's without passing
through the driver.

On one host every worker is pinned to its own CPU cores before JAX starts (the edges one core each,
round-robin over the host's cores, the cloud on the last core or on a GPU where Ray has one), so two
sides do not compete for the same cores. `RayConfig.address` joins an existing Ray cluster instead
(README), within the run's timeout. Ray's token authentication stays on (RAY_AUTH_MODE=token unless
the environment says otherwise), a local cluster binds to the loopback interface only, and a reaper
removes its processes if the driver is killed (`host`).
"""

from hier_jax.cluster.config import RayConfig
from hier_jax.cluster.host import RayBackend, ray_session, start_ray, stop_ray
from hier_jax.cluster.launch import run

__all__ = ["RayBackend", "RayConfig", "ray_session", "run", "start_ray", "stop_ray"]
