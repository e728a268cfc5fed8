"""Devices, threads and queues: the side-effecting shell around the pure steps.

`build_hierarchy` jits the edge and cloud steps separately (state buffers donated) and pins each
state to its own device. Two ways to run them over the same batches:

- `run_sequential`: edge step, hand-off, cloud step, one after the other (the reference).
- `run_overlapped`: one dispatch thread per side and a bounded queue of payloads between them. The
  edge's next step waits only on a full queue (backpressure), never on the cloud's compute; one
  thread dispatching to two CPU devices would run them one after the other.

Both modes run the same compiled programs on the same inputs in the same per-device order, so they
give bit-identical states and metrics; the cloud checks that the payload it consumes is step t's.
An exception in either thread stops both and is re-raised in the caller with its traceback; every
wait is bounded, so a failure never hangs.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from hier_jax import steps
from hier_jax.models import Split

_DONE = object()
_POLL_S = 0.05
_JOIN_GRACE_S = 30.0  # after a stop, how long a worker may take to finish the step it is running


def resolve_device(spec: str | jax.Device) -> jax.Device:
    """'cpu:1', 'gpu:0', 'tpu' (index 0) or a jax.Device; ValueError naming the available devices."""
    if isinstance(spec, jax.Device):
        return spec
    available = ", ".join(f"{d.platform}:{d.id}" for d in jax.devices())
    platform, _, index = str(spec).partition(":")
    try:
        idx = int(index) if index else 0
        devices = jax.devices(platform)
    except (RuntimeError, ValueError):
        raise ValueError(f"device {spec!r} does not exist; available devices: {available}") from None
    if not 0 <= idx < len(devices):
        raise ValueError(f"device {spec!r} does not exist; available devices: {available}"
                         + ("" if platform != "cpu" else " (more CPU devices: XLA_FLAGS="
                            "--xla_force_host_platform_device_count=N before importing jax)"))
    return devices[idx]


class QueueChannel:
    """The hand-off between the edge and cloud threads: a bounded FIFO with instant delivery.

    The interface (send / close / receive, each given the run's stop event and each returning soon
    after it is set) is what a simulated link implements to add delays, outages and drops.
    """

    def __init__(self, capacity: int = 2):
        if capacity < 1:
            raise ValueError(f"queue capacity must be >= 1, got {capacity}")
        self._queue: queue.Queue = queue.Queue(maxsize=capacity)

    def _put(self, item, stop: threading.Event) -> bool:
        while not stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                pass
        return False

    def send(self, t: int, payload: Any, stop: threading.Event) -> bool:
        """Blocks only while the queue is full (backpressure); False once the run is stopped."""
        return self._put((t, payload), stop)

    def close(self, stop: threading.Event) -> None:
        self._put(_DONE, stop)

    def receive(self, stop: threading.Event) -> tuple[int, Any] | None:
        """The next (step, payload), or None at the end of the stream or when stopped."""
        while not stop.is_set():
            try:
                item = self._queue.get(timeout=_POLL_S)
                return None if item is _DONE else item
            except queue.Empty:
                pass
        return None


@dataclasses.dataclass(frozen=True)
class Hierarchy:
    """The compiled steps of one split, and the device each side runs on."""
    edge_device: jax.Device
    cloud_device: jax.Device
    edge_step: Callable
    cloud_step: Callable
    edge_eval: Callable
    cloud_eval: Callable
    bits: int
    num_classes: int


def build_hierarchy(split: Split, *, bits: int, edge_tx: optax.GradientTransformation,
                    cloud_tx: optax.GradientTransformation, edge_device: str | jax.Device = "cpu:0",
                    cloud_device: str | jax.Device = "cpu:1") -> tuple[Hierarchy, steps.State, steps.State]:
    """Jit the steps of `split` and return them with initial edge and cloud states on their devices."""
    edge_device, cloud_device = resolve_device(edge_device), resolve_device(cloud_device)
    edge_graphdef, edge_state = steps.init_state(split.edge, edge_tx)
    cloud_graphdef, cloud_state = steps.init_state(split.cloud, cloud_tx)
    hierarchy = Hierarchy(
        edge_device=edge_device, cloud_device=cloud_device,
        edge_step=jax.jit(steps.make_edge_step(edge_graphdef, edge_tx, bits=bits, num_classes=split.num_classes),
                          donate_argnums=0),
        cloud_step=jax.jit(steps.make_cloud_step(cloud_graphdef, cloud_tx), donate_argnums=0),
        edge_eval=jax.jit(steps.make_edge_eval(edge_graphdef, bits=bits, num_classes=split.num_classes)),
        cloud_eval=jax.jit(steps.make_cloud_eval(cloud_graphdef)),
        bits=bits, num_classes=split.num_classes)
    # Copies, never aliases: the steps donate their states, which must not delete the modules' arrays.
    return (hierarchy, jax.device_put(edge_state, edge_device, may_alias=False),
            jax.device_put(cloud_state, cloud_device, may_alias=False))


@dataclasses.dataclass
class RunResult:
    """Final states, per-step metrics as host arrays ({"loss": [T], "accuracy": [T]}) and wall time.

    cloud_steps[i] is the edge step whose payload the cloud's i-th step consumed.
    """
    edge_state: steps.State
    cloud_state: steps.State
    edge_metrics: dict[str, np.ndarray]
    cloud_metrics: dict[str, np.ndarray]
    wall_s: float
    payload_bytes: int
    cloud_steps: np.ndarray


def _stack(metrics: list[dict[str, jax.Array]]) -> dict[str, np.ndarray]:
    host = jax.device_get(metrics)
    return {k: np.asarray([m[k] for m in host]) for k in (host[0] if host else ())}


class _Progress:
    """A tqdm bar whose postfix shows metrics two steps old, so reading them never blocks dispatch."""

    def __init__(self, enabled: bool, total: int | None, desc: str):
        self.bar = tqdm(total=total, desc=desc, disable=not enabled, leave=False)

    def update(self, metrics: list[dict[str, jax.Array]]) -> None:
        if len(metrics) > 2 and not self.bar.disable and len(metrics) % 5 == 0:
            self.bar.set_postfix(loss=f"{float(metrics[-3]['loss']):.3f}", refresh=False)
        self.bar.update()

    def close(self) -> None:
        self.bar.close()


def _total(batches: Iterable) -> int | None:
    return len(batches) if hasattr(batches, "__len__") else None


def run_sequential(h: Hierarchy, edge_state: steps.State, cloud_state: steps.State,
                   batches: Iterable[tuple[Any, Any]], *, progress: bool = False) -> RunResult:
    """Edge step then cloud step for each batch, blocking on both: the reference schedule."""
    edge_metrics, cloud_metrics, payload_bytes = [], [], 0
    bar = _Progress(progress, _total(batches), "sequential")
    start = time.perf_counter()
    for images, labels in batches:
        edge_state, payload, m_edge = h.edge_step(
            edge_state, jax.device_put(images, h.edge_device), jax.device_put(labels, h.edge_device))
        payload_bytes = payload.nbytes
        cloud_state, m_cloud = h.cloud_step(cloud_state, jax.device_put(payload, h.cloud_device))
        jax.block_until_ready((edge_state, cloud_state))
        edge_metrics.append(m_edge)
        cloud_metrics.append(m_cloud)
        bar.update(cloud_metrics)
    wall_s = time.perf_counter() - start
    bar.close()
    return RunResult(edge_state, cloud_state, _stack(edge_metrics), _stack(cloud_metrics), wall_s, payload_bytes,
                     np.arange(len(cloud_metrics)))


def run_overlapped(h: Hierarchy, edge_state: steps.State, cloud_state: steps.State,
                   batches: Iterable[tuple[Any, Any]], *, channel: Any = None, timeout_s: float = 3600.0,
                   progress: bool = False) -> RunResult:
    """Edge and cloud each on a dispatch thread of their own, joined by `channel` (default: a
    QueueChannel of capacity 2).

    The cloud consumes payloads in strictly increasing step order (a lossy channel may skip steps).
    Raises the first exception of either side (the other side stops within one poll interval) and
    TimeoutError if the run takes longer than `timeout_s`.
    """
    channel = QueueChannel() if channel is None else channel
    stop = threading.Event()
    errors: list[BaseException] = []
    edge_metrics: list = []
    cloud_metrics: list = []
    cloud_steps: list[int] = []
    final: dict[str, Any] = {}
    bar = _Progress(progress, _total(batches), "overlapped")

    def edge_worker(state):
        try:
            for t, (images, labels) in enumerate(batches):
                state, payload, metrics = h.edge_step(
                    state, jax.device_put(images, h.edge_device), jax.device_put(labels, h.edge_device))
                edge_metrics.append(metrics)
                final["payload_bytes"] = payload.nbytes
                if not channel.send(t, jax.device_put(payload, h.cloud_device), stop):
                    return
            channel.close(stop)
            final["edge"] = jax.block_until_ready(state)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            errors.append(exc)
            stop.set()

    def cloud_worker(state):
        try:
            while (item := channel.receive(stop)) is not None:
                t, payload = item
                if cloud_steps and t <= cloud_steps[-1]:
                    raise RuntimeError(f"cloud received the payload of step {t} after step {cloud_steps[-1]}")
                state, metrics = h.cloud_step(state, payload)
                cloud_metrics.append(metrics)
                cloud_steps.append(t)
                bar.update(cloud_metrics)
            if not stop.is_set():
                final["cloud"] = jax.block_until_ready(state)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=edge_worker, args=(edge_state,), name="hier-edge", daemon=True),
               threading.Thread(target=cloud_worker, args=(cloud_state,), name="hier-cloud", daemon=True)]
    del edge_state, cloud_state  # donated to the workers
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    deadline = start + timeout_s
    for thread in threads:
        while thread.is_alive() and not errors and time.perf_counter() < deadline:
            thread.join(_POLL_S)
    stop.set()
    for thread in threads:
        thread.join(_JOIN_GRACE_S)
    wall_s = time.perf_counter() - start
    bar.close()
    if errors:
        raise errors[0]
    if "edge" not in final or "cloud" not in final:
        raise TimeoutError(f"overlapped run did not finish within {timeout_s} s")
    return RunResult(final["edge"], final["cloud"], _stack(edge_metrics), _stack(cloud_metrics), wall_s,
                     final.get("payload_bytes", 0), np.asarray(cloud_steps, dtype=np.int64))


@dataclasses.dataclass(frozen=True)
class Baseline:
    """Compiled steps of a baseline: end-to-end training of the unsplit model, or vanilla split learning."""
    edge_device: jax.Device
    cloud_device: jax.Device
    train_step: Callable | None = None         # end-to-end: (state, images, labels) -> (state, metrics)
    edge_forward: Callable | None = None       # split learning: (edge_state, images) -> (features, vjp, bn)
    cloud_step: Callable | None = None         # split learning: (cloud_state, features, labels) -> (.., grad, ..)
    edge_backward: Callable | None = None      # split learning: (edge_state, vjp, bn, grad) -> edge_state


def build_end_to_end(model: Any, tx: optax.GradientTransformation, device: str | jax.Device = "cpu:0"
                     ) -> tuple[Baseline, steps.State]:
    """The unsplit model trained on one device: what cloud-only training computes."""
    device = resolve_device(device)
    graphdef, state = steps.init_state(model, tx)
    baseline = Baseline(device, device, train_step=jax.jit(steps.make_train_step(graphdef, tx), donate_argnums=0))
    return baseline, jax.device_put(state, device, may_alias=False)


def build_split_learning(split: Split, *, edge_tx: optax.GradientTransformation,
                         cloud_tx: optax.GradientTransformation, edge_device: str | jax.Device = "cpu:0",
                         cloud_device: str | jax.Device = "cpu:1") -> tuple[Baseline, steps.State, steps.State]:
    """Vanilla split learning: the cloud's boundary gradient goes back and the edge backpropagates it."""
    edge_device, cloud_device = resolve_device(edge_device), resolve_device(cloud_device)
    edge_graphdef, edge_state = steps.init_state(split.edge, edge_tx)
    cloud_graphdef, cloud_state = steps.init_state(split.cloud, cloud_tx)
    baseline = Baseline(edge_device, cloud_device,
                        edge_forward=jax.jit(steps.make_split_edge_forward(edge_graphdef)),
                        cloud_step=jax.jit(steps.make_split_cloud_step(cloud_graphdef, cloud_tx), donate_argnums=0),
                        edge_backward=jax.jit(steps.make_split_edge_backward(edge_tx), donate_argnums=0))
    return (baseline, jax.device_put(edge_state, edge_device, may_alias=False),
            jax.device_put(cloud_state, cloud_device, may_alias=False))


def run_end_to_end(b: Baseline, state: steps.State, batches: Iterable[tuple[Any, Any]], *,
                   progress: bool = False) -> tuple[steps.State, dict[str, np.ndarray], float]:
    """Train the unsplit model over `batches`; returns (state, per-step metrics, wall seconds)."""
    metrics, bar = [], _Progress(progress, _total(batches), "end-to-end")
    start = time.perf_counter()
    for images, labels in batches:
        state, m = b.train_step(state, jax.device_put(images, b.edge_device), jax.device_put(labels, b.edge_device))
        metrics.append(m)
        bar.update(metrics)
    state = jax.block_until_ready(state)
    bar.close()
    return state, _stack(metrics), time.perf_counter() - start


def run_split_learning(b: Baseline, edge_state: steps.State, cloud_state: steps.State,
                       batches: Iterable[tuple[Any, Any]], *, progress: bool = False) -> RunResult:
    """Edge forward, activations to the cloud, cloud step, boundary gradient back, edge backward."""
    cloud_metrics, bar = [], _Progress(progress, _total(batches), "split learning")
    start = time.perf_counter()
    for images, labels in batches:
        features, edge_vjp, batch_stats = b.edge_forward(edge_state, jax.device_put(images, b.edge_device))
        cloud_state, boundary_grad, m = b.cloud_step(cloud_state, jax.device_put(features, b.cloud_device),
                                                     jax.device_put(labels, b.cloud_device))
        edge_state = b.edge_backward(edge_state, edge_vjp, batch_stats, jax.device_put(boundary_grad, b.edge_device))
        cloud_metrics.append(m)
        bar.update(cloud_metrics)
    edge_state, cloud_state = jax.block_until_ready((edge_state, cloud_state))
    bar.close()
    return RunResult(edge_state, cloud_state, {}, _stack(cloud_metrics), time.perf_counter() - start, 0,
                     np.arange(len(cloud_metrics)))


def evaluate(h: Hierarchy, edge_state: steps.State, cloud_state: steps.State,
             batches: Iterable[tuple[Any, Any, Any]]) -> dict[str, float]:
    """Accuracy of the early exit (the edge alone, as when the link is down) and of the final exit.

    `batches` yields (images, labels, mask); masked-out (padding) examples are not counted. The
    cloud sees the features quantized at the training bit width, as it would in deployment.
    """
    edge_preds, cloud_preds, labels_all, masks = [], [], [], []
    for images, labels, mask in batches:
        edge_logits, payload = h.edge_eval(edge_state, jax.device_put(images, h.edge_device))
        cloud_logits = h.cloud_eval(cloud_state, jax.device_put(payload, h.cloud_device))
        edge_preds.append(jnp.argmax(edge_logits, -1))
        cloud_preds.append(jnp.argmax(cloud_logits, -1))
        labels_all.append(labels)
        masks.append(mask)
    edge_preds, cloud_preds, labels_all, masks = (np.concatenate(jax.device_get(x)) if x else np.zeros(0)
                                                  for x in (edge_preds, cloud_preds, labels_all, masks))
    masks = masks.astype(bool)
    n = int(masks.sum())
    if n == 0:
        raise ValueError("evaluation got no examples")
    return {"edge_accuracy": float(((edge_preds == labels_all) & masks).sum()) / n,
            "cloud_accuracy": float(((cloud_preds == labels_all) & masks).sum()) / n, "examples": n}
