"""Threads and supervision: the side-effecting shell around the pure steps.

`build_hierarchy` jits the edge and cloud steps separately (state buffers donated) and pins each
state to its own device (`devices`). Two ways to run them over the same batches:

- `run_sequential`: edge step, hand-off, cloud step, one after the other (the reference).
- `run_overlapped`: one dispatch thread per side and a `channel.Channel` between them (by default a
  bounded queue of payloads, `channel.QueueChannel`; or a `link.SimulatedLink`). The
  edge's next step waits only on a full queue (backpressure), never on the cloud's compute; one
  thread dispatching to two CPU devices would run them one after the other.

Both modes run the same compiled programs on the same inputs in the same per-device order, so they
give bit-identical states and metrics; the cloud checks that the payload it consumes is step t's.

In both modes the steps run on worker threads and the calling thread supervises them:
- every `snapshot_every` steps each side hands over a copy of its state, and once both sides have
  reached the same step the supervisor hands the pair to a writer thread that calls `on_snapshot`
  (a checkpoint save), in step order: saving never blocks the next step, and a Ctrl-C, which always
  lands in the calling thread, never lands inside a save;
- each side checks its loss a few steps behind the newest (reading a finished step never stalls
  dispatch) and stops the run with a `DivergenceError` naming the side and step at the first NaN/inf;
- Ctrl-C (KeyboardInterrupt in the calling thread) is a graceful stop: the edge starts no new step,
  the cloud consumes what was already sent, and the run returns with `interrupted=True` and both
  sides at the same step. A second Ctrl-C aborts at once.
An exception in either thread stops both and is re-raised in the caller with its traceback; every
wait is bounded and every thread a run starts is joined before it returns, so nothing hangs and no
thread outlives the call. The baselines (`baselines`) run under the same supervision, via `run_pairs`.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import math
import queue
import sys
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
from hier_jax.devices import AUTO, place, resolve_device
from hier_jax.errors import DivergenceError, RunAborted
from hier_jax.link.channel import Channel, QueueChannel
from hier_jax.models import Split

_POLL_S = 0.05  # how often a blocked wait checks the run's stop event
_JOIN_GRACE_S = 60.0  # after a stop, how long a worker may take to finish the step it is running
_FINITE_LAG = 2  # a side checks the loss of the step this many steps behind its newest
_WRITE_BACKLOG = 2  # snapshot pairs queued or being written; a side waits before offering another
_UNPAIRED_PER_SIDE = 4  # copies a side may offer ahead of the other (an outage); older ones are dropped


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


def build_hierarchy(
    split: Split,
    *,
    bits: int,
    edge_tx: optax.GradientTransformation,
    cloud_tx: optax.GradientTransformation,
    edge_device: str | jax.Device = AUTO,
    cloud_device: str | jax.Device = AUTO,
) -> tuple[Hierarchy, steps.State, steps.State]:
    """Jit the steps of `split` and return them with initial edge and cloud states on their devices;
    each side's steps are traced under the precision policy its part was built with."""
    edge_device, cloud_device = resolve_device(edge_device, "edge"), resolve_device(cloud_device, "cloud")
    edge_graphdef, edge_state = steps.init_state(split.edge, edge_tx)
    cloud_graphdef, cloud_state = steps.init_state(split.cloud, cloud_tx)
    edge_policy, cloud_policy = split.edge.precision, split.cloud.precision
    hierarchy = Hierarchy(
        edge_device=edge_device,
        cloud_device=cloud_device,
        edge_step=jax.jit(
            steps.make_edge_step(
                edge_graphdef, edge_tx, bits=bits, num_classes=split.num_classes, precision=edge_policy
            ),
            donate_argnums=0,
        ),
        cloud_step=jax.jit(steps.make_cloud_step(cloud_graphdef, cloud_tx, precision=cloud_policy), donate_argnums=0),
        edge_eval=jax.jit(
            steps.make_edge_eval(edge_graphdef, bits=bits, num_classes=split.num_classes, precision=edge_policy)
        ),
        cloud_eval=jax.jit(steps.make_cloud_eval(cloud_graphdef, precision=cloud_policy)),
        bits=bits,
        num_classes=split.num_classes,
    )
    return hierarchy, place(edge_state, edge_device), place(cloud_state, cloud_device)


@dataclasses.dataclass
class RunResult:
    """Final states, per-step metrics as host arrays ({"loss": [T], "accuracy": [T]}) and wall time.

    The metrics cover the steps this call ran, start_step .. end_step - 1; cloud_steps[i] is the edge
    step whose payload the cloud's i-th step consumed. `interrupted`: stopped early by Ctrl-C, with
    both sides at end_step.
    """

    edge_state: steps.State
    cloud_state: steps.State
    edge_metrics: dict[str, np.ndarray]
    cloud_metrics: dict[str, np.ndarray]
    wall_s: float
    payload_bytes: int
    cloud_steps: np.ndarray
    start_step: int = 0
    end_step: int = 0
    interrupted: bool = False
    mode: str = ""  # set by train.train: sequential, overlapped, end_to_end or split_learning


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """Copies of both states after `step` steps, with the metrics of this run's steps before it."""

    step: int
    edge_state: steps.State
    cloud_state: steps.State
    edge_metrics: dict[str, np.ndarray]
    cloud_metrics: dict[str, np.ndarray]
    cloud_steps: np.ndarray


def _stack(metrics: list[dict[str, jax.Array]]) -> dict[str, np.ndarray]:
    host = jax.device_get(metrics)
    return {k: np.asarray([m[k] for m in host]) for k in (host[0] if host else ())}


class _Progress:
    """A tqdm bar whose postfix shows metrics two steps old, so reading them never blocks dispatch."""

    def __init__(self, enabled: bool, batches: Iterable, desc: str, start: int = 0):
        total = start + len(batches) if hasattr(batches, "__len__") else None
        self.bar = tqdm(total=total, desc=desc, disable=not enabled, leave=False, initial=start)

    def update(self, metrics: list[dict[str, jax.Array]]) -> None:
        if len(metrics) > 2 and not self.bar.disable and len(metrics) % 5 == 0:
            self.bar.set_postfix(loss=f"{float(metrics[-3]['loss']):.3f}", refresh=False)
        self.bar.update()

    def close(self) -> None:
        self.bar.close()


class _FiniteCheck:
    """One side's divergence check, `lag` steps behind its newest step so it never stalls dispatch."""

    def __init__(self, side: str, lag: int):
        self.side, self.lag = side, lag
        self.pending: collections.deque = collections.deque()

    def push(self, t: int, metrics: dict[str, jax.Array]) -> None:
        if "loss" not in metrics:  # a side that trains nothing (the end-to-end baseline's edge)
            return
        self.pending.append((t, metrics["loss"]))
        while len(self.pending) > self.lag:
            self._check(*self.pending.popleft())

    def flush(self) -> None:
        while self.pending:
            self._check(*self.pending.popleft())

    def _check(self, t: int, loss: jax.Array) -> None:
        value = float(loss)
        if not math.isfinite(value):
            raise DivergenceError(self.side, t, value)


class _Supervisor:
    """The calling thread's side of a run: snapshots, Ctrl-C, errors and the deadline.

    Workers report with `fail` (any exception; stops everything at once) and `offer` (a state copy of
    one side at a snapshot step). `stop` makes every wait return; `stop_request` only asks the edge
    to start no new step, so what is already in flight is finished and consumed.

    State copies are bounded. Paired snapshots queue for the writer thread; while `_WRITE_BACKLOG`
    pairs are unwritten, a side waits before copying its state again (when saving is slower than
    the checkpoint cadence, training slows to it rather than piling copies up in memory). A side
    never waits for the other: one running ahead (the edge through a link outage) keeps at most
    `_UNPAIRED_PER_SIDE` unpaired copies, dropping the oldest, whose step then gets no checkpoint.
    """

    def __init__(
        self,
        start_step: int,
        snapshot_every: int,
        on_snapshot: Callable[[Snapshot], None] | None,
        timeout_s: float | None,
    ):
        if snapshot_every < 0:
            raise ValueError(f"snapshot_every must be >= 0, got {snapshot_every}")
        self.start_step = start_step
        self.every = snapshot_every if on_snapshot is not None else 0
        self.on_snapshot = on_snapshot
        self.timeout_s = timeout_s
        self.stop = threading.Event()
        self.stop_request = threading.Event()
        self.errors: list[BaseException] = []
        self.interrupted = False
        self._offers: queue.Queue = queue.Queue()
        self._pending: dict[str, dict[int, steps.State]] = {"edge": {}, "cloud": {}}
        self._pairs: queue.Queue = queue.Queue()  # (step, edge state, cloud state) for the writer; None ends it
        self._unwritten = 0
        self._written = threading.Condition()

    def halted(self) -> bool:
        return self.stop.is_set() or self.stop_request.is_set()

    def fail(self, error: BaseException) -> None:
        self.errors.append(error)
        self.stop.set()

    def is_boundary(self, step: int) -> bool:
        return self.every > 0 and step > self.start_step and step % self.every == 0

    def boundaries_between(self, first: int, last: int) -> range:
        """Snapshot steps k with first <= k <= last."""
        if self.every <= 0:
            return range(0)
        k = max(first, self.start_step + 1)
        k = -(-k // self.every) * self.every
        return range(k, last + 1, self.every)

    def offer(self, side: str, step: int, state: steps.State, device: jax.Device) -> None:
        """Hand over a copy of `side`'s state after `step` steps, once the writer's backlog allows."""
        with self._written:
            while self._unwritten >= _WRITE_BACKLOG and not self.stop.is_set():
                self._written.wait(_POLL_S)
        self._offers.put((side, step, place(state, device)))

    def supervise(self, threads: list[threading.Thread], metrics: Callable[[int], tuple]) -> float:
        """Start `threads`, serve snapshots until they end, then join them; returns the wall time.

        `metrics(k)` gives (edge_metrics, cloud_metrics, cloud_steps) of this run's steps before k.
        """
        start = time.perf_counter()
        deadline = None if self.timeout_s is None else start + self.timeout_s
        writer = threading.Thread(target=self._write, args=(metrics,), name="hier-checkpoint", daemon=True)
        try:
            writer.start()
            for thread in threads:
                thread.start()
            while any(t.is_alive() for t in threads) and not self.errors:
                if deadline is not None and time.perf_counter() > deadline:
                    self.fail(TimeoutError(f"run did not finish within {self.timeout_s} s"))
                    break
                try:
                    self._serve(block=True)
                except KeyboardInterrupt:
                    self._interrupt()
        finally:
            try:
                self._join(threads)
            finally:
                wall_s = time.perf_counter() - start
                while self._serve(block=False):  # the last snapshots, offered just before the workers ended
                    pass
                self._pairs.put(None)
                self._join([writer])
        return wall_s

    def _write(self, metrics: Callable[[int], tuple]) -> None:
        """The writer thread: `on_snapshot` for each paired snapshot, in step order, until None."""
        while (pair := self._pairs.get()) is not None:
            step, edge_state, cloud_state = pair
            try:
                if not self.errors:  # a failed run saves nothing more
                    self.on_snapshot(Snapshot(step, edge_state, cloud_state, *metrics(step)))
            except BaseException as error:  # noqa: BLE001 - a failed save stops the run, re-raised by the caller
                self.fail(error)
            finally:
                del pair, edge_state, cloud_state
                with self._written:
                    self._unwritten -= 1
                    self._written.notify_all()

    def _interrupt(self) -> None:
        if self.stop_request.is_set():
            print("\nsecond interrupt: aborting without finishing the step in flight", file=sys.stderr, flush=True)
            self.stop.set()
            return
        self.interrupted = True
        self.stop_request.set()
        print(
            "\ninterrupted: stopping both sides after the steps in flight (Ctrl-C again to abort)",
            file=sys.stderr,
            flush=True,
        )

    def _serve(self, block: bool) -> bool:
        """Take one offered state; queue a completed pair for the writer. False when nothing was offered."""
        try:
            side, step, state = self._offers.get(timeout=_POLL_S) if block else self._offers.get_nowait()
        except queue.Empty:
            return False
        pending = self._pending[side]
        pending[step] = state
        if step in self._pending["edge"] and step in self._pending["cloud"]:
            with self._written:
                self._unwritten += 1
            self._pairs.put((step, self._pending["edge"].pop(step), self._pending["cloud"].pop(step)))
            for side_pending in self._pending.values():  # older unmatched offers can never pair now
                for old in [k for k in side_pending if k < step]:
                    del side_pending[old]
        while len(pending) > _UNPAIRED_PER_SIDE:
            del pending[min(pending)]
        return True

    def _join(self, threads: list[threading.Thread]) -> None:
        """Join every worker; after an error or abort each gets `_JOIN_GRACE_S` to finish its step."""
        if self.errors:
            self.stop.set()
        deadline = None
        for thread in threads:
            while thread.is_alive():  # False for a thread never started
                try:
                    if self.stop.is_set() and deadline is None:
                        deadline = time.perf_counter() + _JOIN_GRACE_S
                    if deadline is not None and time.perf_counter() > deadline:
                        raise RuntimeError(f"thread {thread.name} did not stop within {_JOIN_GRACE_S} s of the stop")
                    thread.join(_POLL_S)
                except KeyboardInterrupt:
                    self._interrupt()


def _metrics_before(
    edge_metrics: list, cloud_metrics: list, cloud_steps: list, start_step: int
) -> Callable[[int], tuple]:
    def upto(k: int) -> tuple:
        n_cloud = bisect.bisect_left(cloud_steps[: len(cloud_metrics)], k)
        return (
            _stack(edge_metrics[: k - start_step]),
            _stack(cloud_metrics[:n_cloud]),
            np.asarray(cloud_steps[:n_cloud], dtype=np.int64),
        )

    return upto


PairStep = Callable[[steps.State, steps.State, Any, Any], tuple[steps.State, steps.State, dict, dict, int]]
"""(edge_state, cloud_state, images, labels) -> (edge_state, cloud_state, edge_metrics, cloud_metrics,
payload_bytes): one step of both sides, dispatched from the run's worker thread."""


def run_pairs(
    pair_step: PairStep,
    devices: tuple[jax.Device, jax.Device],
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
    run = _Supervisor(start_step, snapshot_every, on_snapshot, timeout_s)
    edge_metrics, cloud_metrics, cloud_steps = [], [], []
    final: dict[str, Any] = {}
    bar = _Progress(progress, batches, desc, start_step)

    def worker(edge_state, cloud_state):
        try:
            checks = (_FiniteCheck("edge", 0), _FiniteCheck("cloud", 0))
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
                bar.update(cloud_metrics)
            if not run.stop.is_set():
                final.update(edge=edge_state, cloud=cloud_state, end_step=t)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            run.fail(exc)

    thread = threading.Thread(target=worker, args=(edge_state, cloud_state), name="hier-sequential", daemon=True)
    del edge_state, cloud_state  # donated to the worker
    try:
        wall_s = run.supervise([thread], _metrics_before(edge_metrics, cloud_metrics, cloud_steps, start_step))
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
    run: _Supervisor,
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
        _stack(edge_metrics),
        _stack(cloud_metrics),
        wall_s,
        final.get("payload_bytes", 0),
        np.asarray(cloud_steps, dtype=np.int64),
        start_step,
        final["end_step"],
        run.interrupted,
    )


def run_overlapped(
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
    run = _Supervisor(start_step, snapshot_every, on_snapshot, timeout_s)
    edge_metrics: list = []
    cloud_metrics: list = []
    cloud_steps: list[int] = []
    final: dict[str, Any] = {}
    bar = _Progress(progress, batches, "overlapped", start_step)

    def edge_worker(state):
        try:
            check = _FiniteCheck("edge", _FINITE_LAG)
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
            check = _FiniteCheck("cloud", _FINITE_LAG)
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
                bar.update(cloud_metrics)
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
        wall_s = run.supervise(threads, _metrics_before(edge_metrics, cloud_metrics, cloud_steps, start_step))
    finally:
        run.stop.set()
        channel.join(_JOIN_GRACE_S)
        bar.close()
    return _result(run, final, edge_metrics, cloud_metrics, cloud_steps, wall_s, start_step)


def evaluate(
    h: Hierarchy, edge_state: steps.State, cloud_state: steps.State, batches: Iterable[tuple[Any, Any, Any]]
) -> dict[str, float]:
    """Accuracy of the early exit (the edge alone, as when the link is down) and of the final exit:
    {"edge_accuracy": float, "cloud_accuracy": float, "examples": int}.

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
    edge_preds, cloud_preds, labels_all, masks = (
        np.concatenate(jax.device_get(x)) if x else np.zeros(0) for x in (edge_preds, cloud_preds, labels_all, masks)
    )
    masks = masks.astype(bool)
    n = int(masks.sum())
    if n == 0:
        raise ValueError("evaluation got no examples")
    return {
        "edge_accuracy": float(((edge_preds == labels_all) & masks).sum()) / n,
        "cloud_accuracy": float(((cloud_preds == labels_all) & masks).sum()) / n,
        "examples": n,
    }
