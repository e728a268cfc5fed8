"""A link replayed in real time between the edge and cloud threads: `SimulatedLink` replays a `Link`
for `threads.run_pipelined`, with real delays, scripted outages and drops: it implements
`channel.Channel` (open / send / close / receive / join, each given the run's stop event).

A background delivery thread moves payloads from the edge's buffer onto the link one at a time, on
the link's clock (`clock.LinkClock`: serialisation, overlapping latencies, delays scaled by
`time_scale`, so 1e-3 replays a 3G link a thousand times faster; compute is not scaled), and the
clock's outages (a, b) hold the link down from the edge's step a until its step b (or the stream's
close). While the link is up, a full buffer blocks the edge (backpressure: the edge cannot outrun the
link for long, as in the cost model). While it is down the edge never waits: it keeps training on its
early exit, its payloads are buffered up to `capacity`, and past that the oldest buffered payload is
dropped.

Drop-oldest, not drop-newest: the newest feature map comes from the edge's current weights and the
newest data, so it is what the cloud should learn from when the link comes back; an old one describes
an edge that no longer exists (the edge has trained since) and, for a sensor, older data. The buffer
stays a window of the latest `capacity` steps, still in step order, so the cloud consumes strictly
increasing steps and the labels, which travel inside each payload, stay aligned with their features.

Every payload is either delivered to the cloud or counted as dropped (`stats()`): after a finished
run, sent == delivered + dropped. A transfer already on the wire when an outage starts completes.
The number of payloads in flight or arrived but not yet taken by the cloud is bounded by `capacity`
too (a receive window), so a slow cloud holds payloads back in the edge's buffer, where backpressure
and the drop policy apply.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Sequence
from typing import Any

from hier_jax.link.clock import LinkClock
from hier_jax.link.spec import Link

_POLL_S = 0.05


@dataclasses.dataclass(frozen=True)
class LinkStats:
    """Counters of a SimulatedLink; sent == delivered + dropped + buffered + in_flight at any time."""

    sent: int
    delivered: int
    dropped: int
    dropped_steps: tuple[int, ...]
    buffered: int  # at the edge, not yet on the wire
    in_flight: int  # on the wire or arrived, not yet taken by the cloud


class SimulatedLink:
    """A `channel.Channel` with the delays of `link`, scripted `outages` [(a, b), ...] and a bounded edge
    buffer (see the module docstring)."""

    def __init__(
        self, link: Link, *, capacity: int = 4, outages: Sequence[tuple[int, int]] = (), time_scale: float = 1.0
    ):
        if capacity < 1:
            raise ValueError(f"buffer capacity must be >= 1, got {capacity}")
        self.clock = LinkClock(link, time_scale=time_scale, outages=outages)
        self.link, self.capacity, self.time_scale, self.outages = link, capacity, time_scale, self.clock.outages
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._reset()

    def _reset(self) -> None:
        self._buffer: collections.deque = collections.deque()  # (step, payload, nbytes)
        self._flight: collections.deque = collections.deque()  # (arrival time, step, payload)
        self.clock.reset()
        self._step = -1  # the latest step the edge sent: the outage clock
        self._closed = False
        self._sent = self._delivered = 0
        self._dropped: list[int] = []

    def open(self, stop: threading.Event) -> None:
        """Start a run: counters, buffers and the outage clock begin afresh (`stats()` then describes
        this run). A link still carrying another run is refused rather than shared."""
        with self._cv:
            if self._thread is not None and self._thread.is_alive():
                raise RuntimeError(
                    "this SimulatedLink is still carrying another run; give each concurrent run its own link"
                )
            self._thread = None
            self._reset()

    def join(self, timeout_s: float) -> None:
        """Wait for the delivery thread, which ends with the stream (or the run's stop)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():
                raise RuntimeError(f"the link's delivery thread did not end within {timeout_s} s")

    def _down(self) -> bool:
        return not self._closed and self.clock.down(self._step)

    def send(self, t: int, payload: Any, stop: threading.Event) -> bool:
        """Queue step t's payload (`payload.nbytes` bytes). Blocks only while the link is up and the
        buffer is full; during an outage a full buffer drops its oldest payload instead. Returns
        False once the run is stopped, True otherwise (also when something was dropped)."""
        nbytes = int(payload.nbytes)
        with self._cv:
            self._step = int(t)  # may end or start an outage: wake the delivery thread
            self._start(stop)
            self._cv.notify_all()
            while len(self._buffer) >= self.capacity and not self._down():
                if stop.is_set():
                    return False
                self._cv.wait(_POLL_S)
            if stop.is_set():
                return False
            if len(self._buffer) >= self.capacity:
                self._dropped.append(self._buffer.popleft()[0])
            self._buffer.append((int(t), payload, nbytes))
            self._sent += 1
            self._cv.notify_all()
            return True

    def close(self, stop: threading.Event) -> None:
        """End of the stream; an outage still running ends here, and the buffer drains."""
        with self._cv:
            self._closed = True
            self._start(stop)
            self._cv.notify_all()

    def receive(self, stop: threading.Event) -> tuple[int, Any] | None:
        """The next (step, payload) once it has arrived; None at the end of the stream or when stopped."""
        with self._cv:
            while not stop.is_set():
                now = time.perf_counter()
                if self._flight and self._flight[0][0] <= now:
                    _, t, payload = self._flight.popleft()
                    self._delivered += 1
                    self._cv.notify_all()
                    return t, payload
                if self._closed and not self._buffer and not self._flight:
                    return None
                wait = self._flight[0][0] - now if self._flight else _POLL_S
                self._cv.wait(min(wait, _POLL_S))
            return None

    def stats(self) -> LinkStats:
        with self._cv:
            return LinkStats(
                self._sent,
                self._delivered,
                len(self._dropped),
                tuple(self._dropped),
                len(self._buffer),
                len(self._flight),
            )

    def _start(self, stop: threading.Event) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._deliver, args=(stop,), name="hier-link", daemon=True)
            self._thread.start()

    def _deliver(self, stop: threading.Event) -> None:
        """Put the oldest buffered payload on the wire whenever the link is up, free, and the window open."""
        with self._cv:
            while not stop.is_set() and not (self._closed and not self._buffer):
                now = time.perf_counter()
                if self._buffer and not self._down() and len(self._flight) < self.capacity:
                    if now < self.clock.free_at:
                        self._cv.wait(min(self.clock.free_at - now, _POLL_S))
                        continue
                    t, payload, nbytes = self._buffer.popleft()
                    self._flight.append((self.clock.transmit(nbytes, now), t, payload))
                    self._cv.notify_all()
                else:
                    self._cv.wait(_POLL_S)
