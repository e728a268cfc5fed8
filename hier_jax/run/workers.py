"""The edge and the cloud as workers: the objects a backend runs (a dispatch thread each in this
process, or a Ray actor each), holding one side's state and running that side's compiled steps.

The same classes serve every backend and every scheme:
- hierarchical: the edge trains on its early exit and sends the packed payload; the cloud trains on it;
- end_to_end: the edge uploads the batch as stored (uint8); the cloud augments it and trains the whole model;
- split_learning: the edge's forward pass sends float32 features, the cloud returns their gradient
  (its step's second result), and the edge's `apply` backpropagates it.
Each method returns once its work is done (metrics are read back), so a task's end means its step's end.
`Programs` is what a worker needs of a built `train.Setup`: the compiled steps of its scheme and the
initial states; in-process workers share one, each Ray worker builds its own (`RayEdge`, `RayCloud`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from hier_jax import steps
from hier_jax.data import augment
from hier_jax.devices import Device, device_name, place
from hier_jax.run.backends import WorkerCrashed
from hier_jax.run.evaluate import accuracy


@dataclasses.dataclass(frozen=True)
class Programs:
    """One scheme's compiled steps on a setup's devices, and the initial states (copied for each edge)."""

    setup: Any  # train.Setup
    scheme: str
    baseline: Any  # baselines.Baseline for the baselines, None for hierarchical training
    edge_state: steps.State
    cloud_state: steps.State

    @classmethod
    def of(cls, setup: Any, scheme: str) -> Programs:
        from hier_jax import train

        if scheme == "hierarchical":
            edge, cloud = train.fresh_states(setup)
            return cls(setup, scheme, None, edge, cloud)
        baseline, edge, cloud = train.build_baseline(setup, scheme)
        return cls(setup, scheme, baseline, edge, cloud)

    @property
    def edge_device(self) -> Device:
        return self.setup.hierarchy.edge_device

    @property
    def cloud_device(self) -> Device:
        return self.setup.hierarchy.cloud_device


def _metrics(metrics: dict) -> dict:
    """A step's metrics as floats (reading them waits for the step)."""
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _nbytes(tree: Any) -> int:
    return sum(int(leaf.size) * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def crash_process() -> None:
    """Fault injection in a worker process: it dies part-way through a step, as a crashed one would.
    The pause lets the replies of the steps before leave first; exiting at once could also lose the
    previous step's reply, which a crash mid-step would not."""
    time.sleep(0.3)
    os._exit(1)


def crash_thread() -> None:
    """Fault injection in a thread worker: the worker dies (its backend fails every task it has left)."""
    raise WorkerCrashed


class EdgeWorker:
    """One edge: its state and its shard's batches from step 0 (or a checkpoint's step) on."""

    def __init__(
        self,
        edge: int,
        programs: Programs,
        setup: Any,
        *,
        kill_at: int | None = None,
        crash: Callable[[], None] = crash_thread,
        host_payloads: bool = False,
    ):
        from hier_jax import train

        self.edge, self.programs, self.setup, self.kill_at, self.crash = edge, programs, setup, kill_at, crash
        self.host_payloads = host_payloads  # a payload another process will read: as NumPy
        self.device = programs.edge_device
        self.state = place(programs.edge_state, self.device)
        self.raw = programs.scheme == "end_to_end"  # cloud-only: the edge uploads the batches as stored
        self.batches = iter(train.TrainBatches(setup, raw=self.raw))
        self.next_step = 0
        self.pending: tuple | None = None  # split learning: the forward pass's VJP until its gradient comes

    def placement(self) -> str:
        return f"pid {os.getpid()}, {device_name(self.device)}, cores {sorted(os.sched_getaffinity(0))}"

    def step(self, t: int) -> tuple[Any, dict]:
        """Edge step t: (what goes to the cloud, metrics with the bytes sent and the wall-clock time the
        payload was ready, which a link's clock starts from). Steps come in order."""
        if t == self.kill_at:
            self.crash()
        if t != self.next_step:
            raise RuntimeError(f"edge {self.edge} was asked for step {t}; its next step is {self.next_step}")
        start = time.perf_counter()
        payload, metrics = self._train()
        metrics = _metrics(metrics)  # waits for the step
        if self.host_payloads:
            payload = jax.device_get(payload)
        return payload, {
            **metrics,
            "step_s": time.perf_counter() - start,
            "nbytes": _nbytes(payload),
            "done_at": time.time(),
        }

    def _train(self) -> tuple[Any, dict]:
        batch = next(self.batches)
        self.next_step += 1
        scheme, b = self.programs.scheme, self.programs.baseline
        if scheme == "end_to_end":
            return batch, {}  # uint8 images, labels, the augmentation's counters: the cloud augments
        images, labels = batch
        if scheme == "hierarchical":
            self.state, payload, metrics = self.setup.hierarchy.edge_step(self.state, images, labels)
            return payload, metrics
        features, vjp, batch_stats = b.edge_forward(self.state, images)
        self.pending = (vjp, batch_stats)
        return (features, labels), {}

    def apply(self, t: int, gradient: Any) -> dict:
        """Split learning: backpropagate the cloud's gradient of step t's features."""
        assert self.pending is not None, f"edge {self.edge}: a gradient for step {t} without its forward pass"
        vjp, batch_stats = self.pending
        self.pending = None
        b = self.programs.baseline
        self.state = b.edge_backward(self.state, vjp, batch_stats, jax.device_put(gradient, self.device))
        jax.block_until_ready(self.state)
        return {"nbytes_down": _nbytes(gradient)}

    def resume(self, state: Any | None, start: int, until: int) -> None:
        """Come back after a crash: from `state` at step `start` (None: the initial state, step 0),
        train steps up to `until` again without sending anything (the cloud has their payloads)."""
        self.load(self.programs.edge_state if state is None else state, start)  # this worker may be a live one
        while self.next_step < until:
            self._train()
        jax.block_until_ready(self.state)

    def params(self) -> Any:
        return jax.device_get({"params": self.state["params"], "batch_stats": self.state["batch_stats"]})

    def set_params(self, averaged: Any) -> None:
        self.state = {**self.state, **place(averaged, self.device)}

    def state_now(self) -> Any:
        """A copy of the state (the next step donates the one it is given)."""
        return jax.device_get(self.state) if self.host_payloads else place(self.state, self.device)

    def load(self, state: Any, start: int) -> None:
        """Continue from a checkpoint: this state, and the batches from step `start` on."""
        from hier_jax import train

        self.state = place(state, self.device)  # a copy: the steps donate it
        self.batches = iter(train.TrainBatches(self.setup, start, raw=self.raw))
        self.next_step, self.pending = start, None

    def evaluate(self) -> tuple[dict, list]:
        """({"edge_accuracy": the early exit's, or None}, [(the cloud's input, labels, mask)] of the test
        split, for the cloud exit)."""
        from hier_jax.data import eval_batches

        h, b, scheme = self.setup.hierarchy, self.programs.baseline, self.programs.scheme
        inputs, kept = [], []

        def early_exit(images):
            logits, payload = h.edge_eval(self.state, images)
            inputs.append(payload)
            return logits

        def batches():
            for images, labels, mask in eval_batches(
                self.setup.dataset, self.setup.config.batch_size, device=self.device
            ):
                kept.append((labels, mask))
                yield images, labels, mask

        if scheme == "hierarchical":
            result = accuracy(early_exit, batches())
            edge = {"edge_accuracy": result["accuracy"], "examples": result["examples"]}
        else:  # no early exit: the cloud's inputs only (the images, or the edge's float32 features)
            for images, _, _ in batches():
                inputs.append(images if scheme == "end_to_end" else b.edge_eval(self.state, images))
            edge = {"edge_accuracy": None}
        bundle = [(x, labels, mask) for x, (labels, mask) in zip(inputs, kept, strict=True)]
        return edge, jax.device_get(bundle) if self.host_payloads else bundle


class CloudWorker:
    """The cloud: its state, trained on the edges' payloads in the order the scheduler hands them over."""

    def __init__(
        self,
        programs: Programs,
        *,
        kill_at: int = -1,
        crash: Callable[[], None] = crash_thread,
        host_states: bool = False,
    ):
        self.programs, self.kill_at, self.crash, self.steps_done = programs, kill_at, crash, 0
        self.host_states = host_states  # states another process will read: as NumPy
        self.device = programs.cloud_device
        self.state = place(programs.cloud_state, self.device)

    def placement(self) -> str:
        return f"pid {os.getpid()}, {device_name(self.device)}, cores {sorted(os.sched_getaffinity(0))}"

    def step(self, edge: int, t: int, payload: Any, ready_at: float) -> Any:
        """Train on edge `edge`'s step-t payload once it has arrived (`ready_at`, wall clock; 0: at once);
        its metrics, with the cloud's own step index (split learning: and the features' gradient)."""
        index = self.steps_done
        if index == self.kill_at:
            self.crash()
        self.steps_done += 1
        if (wait := ready_at - time.time()) > 0:
            time.sleep(wait)
        start = time.perf_counter()
        payload = jax.device_put(payload, self.device)
        scheme, b, reply = self.programs.scheme, self.programs.baseline, None
        if scheme == "hierarchical":
            self.state, metrics = self.programs.setup.hierarchy.cloud_step(self.state, payload)
        elif scheme == "end_to_end":
            images, labels, counters = payload
            images = augment(self.programs.setup.dataset, images, counters)  # on the cloud's device
            self.state, metrics = b.train_step(self.state, images, labels)
        else:
            self.state, reply, metrics = b.cloud_step(self.state, *payload)
        step_s = time.perf_counter() - start
        metrics = {
            **_metrics(metrics),
            "index": index,
            "edge": edge,
            "step": t,
            "step_s": step_s,
            "done_at": time.time(),
        }
        return metrics if scheme != "split_learning" else (metrics, reply)

    def state_now(self) -> Any:
        """A copy of the state (the next step donates the one it is given)."""
        return jax.device_get(self.state) if self.host_states else place(self.state, self.device)

    def load(self, state: Any, steps_done: int) -> None:
        self.state, self.steps_done = place(state, self.device), steps_done

    def evaluate(self, bundle: list) -> float:
        """The final exit's accuracy on one edge's test-split inputs."""
        b, scheme = self.programs.baseline, self.programs.scheme

        def final_exit(x):
            x = jax.device_put(x, self.device)
            if scheme == "hierarchical":
                return self.programs.setup.hierarchy.cloud_eval(self.state, x)
            return b.cloud_eval(self.state, x)

        return accuracy(final_exit, bundle)["accuracy"]


# ------------------------------------------------------------------------------------- on Ray


def start_jax(cores: Sequence[int] | None, platform: str) -> None:
    """Pin this process to `cores` and give JAX one device of `platform`; before JAX starts a backend.
    (Importing jax starts none, but it reads JAX_PLATFORMS then, so the platform goes to its config.)"""
    if cores:
        os.sched_setaffinity(0, set(cores))
    jax.config.update("jax_platforms", platform)
    from hier_jax import process

    process.setup(host_devices=1)


def worker_setup(config: Any, dataset: Any, cores: Sequence[int] | None, platform: str) -> Any:
    """The train.Setup of a worker process: its own JAX runtime, one device for both roles."""
    start_jax(cores, platform)
    from hier_jax import train

    device = f"{jax.default_backend()}:0"
    return train.build(dataclasses.replace(config, edge_device=device, cloud_device=device, out=""), dataset)


def _compiled(worker: EdgeWorker | CloudWorker) -> None:
    """Compile the worker's step now, on throwaway copies, so that no timed step compiles."""
    from hier_jax import train

    setup = worker.programs.setup
    images, labels = next(iter(train.TrainBatches(setup)))
    if worker.programs.scheme != "hierarchical":
        return  # the baselines compile on their first step
    if isinstance(worker, EdgeWorker):
        jax.block_until_ready(setup.hierarchy.edge_step(train.fresh_states(setup)[0], images, labels))
        return
    shape = jax.eval_shape(setup.hierarchy.edge_step, train.fresh_states(setup)[0], images, labels)[1]
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype, device=worker.device), shape)
    jax.block_until_ready(setup.hierarchy.cloud_step(train.fresh_states(setup)[1], zeros))


class RayEdge(EdgeWorker):
    """An edge in a Ray worker process of its own: the run's setup (built from the whole training split,
    so its step count and learning-rate schedules are the run's), trained on its shard."""

    def __init__(
        self, edge: int, config: Any, dataset: Any, shard: Any, cores: Sequence[int] | None, kill_at: int | None
    ):
        setup = worker_setup(config, dataset, cores, "cpu")
        setup = dataclasses.replace(setup, dataset=shard)
        super().__init__(
            edge, Programs.of(setup, config.scheme), setup, kill_at=kill_at, crash=crash_process, host_payloads=True
        )
        _compiled(self)


class RayCloud(CloudWorker):
    """The cloud in a Ray worker process of its own (on a GPU where Ray has one)."""

    def __init__(self, config: Any, dataset: Any, cores: Sequence[int] | None, platform: str, kill_at: int):
        setup = worker_setup(config, dataset, cores, platform)
        super().__init__(Programs.of(setup, config.scheme), kill_at=kill_at, crash=crash_process, host_states=True)
        _compiled(self)
