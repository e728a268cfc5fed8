"""The in-process runner: the steps of a `hierarchy.Hierarchy` on worker threads, supervised.

- `run_sequential`: edge step, hand-off, cloud step, one after the other (the reference).
- `run_pipelined`: one dispatch thread per side and a `link.Channel` between them (by default a
  bounded queue of payloads, `link.QueueChannel`; or a `link.SimulatedLink`). The edge's next step
  waits only on a full queue (backpressure), never on the cloud's compute; one thread dispatching to
  two CPU devices would run them one after the other.

Both schedules run the same compiled programs on the same inputs in the same per-device order, so they
give bit-identical states and metrics; the cloud checks that the payload it consumes is step t's.
The calling thread supervises the workers (`supervisor`). An exception in either thread stops both
and is re-raised in the caller with its traceback; every wait is bounded and every thread a run
starts is joined before it returns, so nothing hangs and no thread outlives the call. The baselines
(`baselines`) run under the same supervision, via `run_pairs`.
"""

from __future__ import annotations

import bisect
import dataclasses
import threading
from collections.abc import Callable, Iterable, Sized
from typing import Any

import jax
import numpy as np

from hier_jax import steps
from hier_jax.devices import Device
from hier_jax.errors import RunAborted
from hier_jax.link.channel import Channel, QueueChannel
from hier_jax.run.hierarchy import Hierarchy
from hier_jax.run.progress import Progress
from hier_jax.run.record import RunRecord
from hier_jax.run.supervisor import FINITE_LAG, JOIN_GRACE_S, FiniteCheck, Snapshot, Supervisor


@dataclasses.dataclass
class RunResult:
    """Final states, the record of the steps this call ran (start_step .. end_step - 1) and wall time.

    `interrupted`: stopped early by Ctrl-C, with both sides at end_step. `scheme` and `schedule` are
    what train.train ran (the runner's own functions leave them empty).
    """

    edge_state: steps.State
    cloud_state: steps.State
    record: RunRecord
    wall_s: float
    payload_bytes: int
    start_step: int = 0
    end_step: int = 0
    interrupted: bool = False
    scheme: str = ""
    schedule: str = ""

    @property
    def edge_metrics(self) -> dict[str, np.ndarray]:
        """The (one) edge's {"loss": [T], "accuracy": [T]} over its steps."""
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


def _record(edge_metrics: list, cloud_metrics: list, cloud_steps: list, start_step: int) -> RunRecord:
    """The record of one edge's steps from `start_step` and the cloud's (device metrics fetched)."""
    edge_host, cloud_host = jax.device_get((edge_metrics, cloud_metrics))
    record = RunRecord.empty(1)
    for i, metrics in enumerate(edge_host):
        if metrics:  # a baseline's edge trains on no loss of its own
            record.add_edge_step(0, start_step + i, metrics)
    for t, metrics in zip(cloud_steps, cloud_host, strict=False):
        record.add_cloud_step(0, t, metrics)
    return record


def _record_before(
    edge_metrics: list, cloud_metrics: list, cloud_steps: list, start_step: int
) -> Callable[[int], RunRecord]:
    """The record of this call's steps before k, read while the workers append to the lists."""

    def upto(k: int) -> RunRecord:
        n_cloud = bisect.bisect_left(cloud_steps[: len(cloud_metrics)], k)
        return _record(edge_metrics[: k - start_step], cloud_metrics[:n_cloud], cloud_steps[:n_cloud], start_step)

    return upto


def _total(batches: Iterable, start_step: int) -> int | None:
    return start_step + len(batches) if isinstance(batches, Sized) else None


def _recent_loss(cloud_metrics: list, bar: Progress) -> float | None:
    """Every fifth step, the loss of the step two before the newest (finished, so reading it never
    blocks dispatch)."""
    if bar.enabled and len(cloud_metrics) > 2 and len(cloud_metrics) % 5 == 0:
        return float(cloud_metrics[-3]["loss"])
    return None


PairStep = Callable[[steps.State, steps.State, Any, Any], tuple[steps.State, steps.State, dict, dict, int]]
"""(edge_state, cloud_state, images, labels) -> (edge_state, cloud_state, edge_metrics, cloud_metrics,
payload_bytes): one step of both sides, dispatched from the run's worker thread."""


def run_pairs(
    pair_step: PairStep,
    devices: tuple[Device, Device],
    edge_state: steps.State,
    cloud_state: steps.State,
    batches: Iterable[tuple[Any, Any]],
    desc: str,
    *,
    start_step: int,
    snapshot_every: int,
    on_snapshot: Callable[[Snapshot], None] | None,
    timeout_s: float | None,
    progress: bool,
) -> RunResult:
    """The supervised sequential core that `run_sequential` and `baselines.run_baseline` share.

    One worker thread runs `pair_step` per batch of `batches` (steps start_step, start_step + 1, ...),
    blocking on both returned states, while the calling thread supervises it as the module docstring
    says (snapshots through `on_snapshot` every `snapshot_every` steps, divergence checks on both sides'
    "loss", Ctrl-C, `timeout_s`). `devices` (edge, cloud) are where the snapshot copies of the states go;
    `desc` labels the progress bar. Donates `edge_state` and `cloud_state` to the worker.
    """
    run = Supervisor(start_step, snapshot_every, on_snapshot, timeout_s)
    edge_metrics, cloud_metrics, cloud_steps = [], [], []
    final: dict[str, Any] = {}
    bar = Progress(progress, _total(batches, start_step), desc, start_step)

    def worker(edge_state, cloud_state):
        try:
            checks = (FiniteCheck("edge", 0), FiniteCheck("cloud", 0))
            t = start_step
            for images, labels in batches:
                if run.halted():
                    break
                edge_state, cloud_state, m_edge, m_cloud, final["payload_bytes"] = pair_step(
                    edge_state, cloud_state, images, labels
                )
                jax.block_until_ready((edge_state, cloud_state))
                edge_metrics.append(m_edge)
                cloud_metrics.append(m_cloud)
                cloud_steps.append(t)
                checks[0].push(t, m_edge)
                checks[1].push(t, m_cloud)
                t += 1
                if run.is_boundary(t):
                    run.offer("edge", t, edge_state, devices[0])
                    run.offer("cloud", t, cloud_state, devices[1])
                bar.update(_recent_loss(cloud_metrics, bar))
            if not run.stop.is_set():
                final.update(edge=edge_state, cloud=cloud_state, end_step=t)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            run.fail(exc)

    thread = threading.Thread(target=worker, args=(edge_state, cloud_state), name="hier-sequential", daemon=True)
    del edge_state, cloud_state  # donated to the worker
    try:
        wall_s = run.supervise([thread], _record_before(edge_metrics, cloud_metrics, cloud_steps, start_step))
    finally:
        run.stop.set()
        bar.close()
    return _result(run, final, edge_metrics, cloud_metrics, cloud_steps, wall_s, start_step)


def run_sequential(
    h: Hierarchy,
    edge_state: steps.State,
    cloud_state: steps.State,
    batches: Iterable[tuple[Any, Any]],
    *,
    start_step: int = 0,
    snapshot_every: int = 0,
    on_snapshot: Callable[[Snapshot], None] | None = None,
    timeout_s: float | None = None,
    progress: bool = False,
) -> RunResult:
    """Edge step then cloud step for each batch, blocking on both: the reference schedule.

    `batches` are steps start_step, start_step + 1, ...; see the module docstring for snapshots,
    divergence checks and Ctrl-C.
    """

    def pair_step(edge_state, cloud_state, images, labels):
        edge_state, payload, m_edge = h.edge_step(
            edge_state, jax.device_put(images, h.edge_device), jax.device_put(labels, h.edge_device)
        )
        cloud_state, m_cloud = h.cloud_step(cloud_state, jax.device_put(payload, h.cloud_device))
        return edge_state, cloud_state, m_edge, m_cloud, payload.nbytes

    return run_pairs(
        pair_step,
        (h.edge_device, h.cloud_device),
        edge_state,
        cloud_state,
        batches,
        "sequential",
        start_step=start_step,
        snapshot_every=snapshot_every,
        on_snapshot=on_snapshot,
        timeout_s=timeout_s,
        progress=progress,
    )


def _result(
    run: Supervisor,
    final: dict,
    edge_metrics: list,
    cloud_metrics: list,
    cloud_steps: list,
    wall_s: float,
    start_step: int,
) -> RunResult:
    if run.errors:
        raise run.errors[0]
    if "edge" not in final or "cloud" not in final:
        raise RunAborted(
            "aborted by a second interrupt during training; nothing was saved after the last periodic checkpoint"
        )
    return RunResult(
        final["edge"],
        final["cloud"],
        _record(edge_metrics, cloud_metrics, cloud_steps, start_step),
        wall_s,
        final.get("payload_bytes", 0),
        start_step,
        final["end_step"],
        run.interrupted,
    )


def run_pipelined(
    h: Hierarchy,
    edge_state: steps.State,
    cloud_state: steps.State,
    batches: Iterable[tuple[Any, Any]],
    *,
    channel: Channel | None = None,
    start_step: int = 0,
    snapshot_every: int = 0,
    on_snapshot: Callable[[Snapshot], None] | None = None,
    timeout_s: float | None = None,
    progress: bool = False,
) -> RunResult:
    """Edge and cloud each on a dispatch thread of their own, joined by `channel` (default: a
    QueueChannel of capacity 2).

    The cloud consumes payloads in strictly increasing step order (a lossy channel may skip steps;
    then the cloud's snapshot at step k is its state before the first payload of a step >= k).
    Raises the first exception of either side (the other side stops within one poll interval) and
    TimeoutError if the run takes longer than `timeout_s`.
    """
    channel = QueueChannel() if channel is None else channel
    run = Supervisor(start_step, snapshot_every, on_snapshot, timeout_s)
    edge_metrics: list = []
    cloud_metrics: list = []
    cloud_steps: list[int] = []
    final: dict[str, Any] = {}
    bar = Progress(progress, _total(batches, start_step), "pipelined", start_step)

    def edge_worker(state):
        try:
            check = FiniteCheck("edge", FINITE_LAG)
            t = start_step
            for images, labels in batches:
                if run.halted():
                    break
                state, payload, metrics = h.edge_step(
                    state, jax.device_put(images, h.edge_device), jax.device_put(labels, h.edge_device)
                )
                edge_metrics.append(metrics)
                final["payload_bytes"] = payload.nbytes
                if run.is_boundary(t + 1):
                    run.offer("edge", t + 1, state, h.edge_device)
                if not channel.send(t, jax.device_put(payload, h.cloud_device), run.stop):
                    return
                check.push(t, metrics)
                t += 1
            check.flush()
            channel.close(run.stop)
            final["edge"] = jax.block_until_ready(state)
            final["end_step"] = t
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            run.fail(exc)

    def cloud_worker(state):
        try:
            check = FiniteCheck("cloud", FINITE_LAG)
            last = start_step - 1
            while (item := channel.receive(run.stop)) is not None:
                t, payload = item
                if t <= last:
                    raise RuntimeError(f"cloud received the payload of step {t} after step {last}")
                for k in run.boundaries_between(last + 2, t):  # snapshot steps whose payloads were dropped
                    run.offer("cloud", k, state, h.cloud_device)
                state, metrics = h.cloud_step(state, payload)
                cloud_metrics.append(metrics)
                cloud_steps.append(t)
                check.push(t, metrics)
                last = t
                if run.is_boundary(t + 1):
                    run.offer("cloud", t + 1, state, h.cloud_device)
                bar.update(_recent_loss(cloud_metrics, bar))
            if not run.stop.is_set():
                check.flush()
                final["cloud"] = jax.block_until_ready(state)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            run.fail(exc)

    channel.open(run.stop)
    threads = [
        threading.Thread(target=edge_worker, args=(edge_state,), name="hier-edge", daemon=True),
        threading.Thread(target=cloud_worker, args=(cloud_state,), name="hier-cloud", daemon=True),
    ]
    del edge_state, cloud_state  # donated to the workers
    try:
        wall_s = run.supervise(threads, _record_before(edge_metrics, cloud_metrics, cloud_steps, start_step))
    finally:
        run.stop.set()
        channel.join(JOIN_GRACE_S)
        bar.close()
    return _result(run, final, edge_metrics, cloud_metrics, cloud_steps, wall_s, start_step)
