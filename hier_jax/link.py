"""The edge-cloud network link: its spec (`Link`, the presets `LINKS`), and its replay as a channel.

`Link` is a link's bit rates and latency, as the cost model (`costmodel`) reads them; `get_link` and
`custom_link` build one. `SimulatedLink` replays a `Link` for `runner.run_overlapped`, with real
delays, scripted outages and drops: it implements `channel.Channel` (open / send / close / receive /
join, each given the run's stop event).

A background delivery thread moves payloads from the edge's buffer onto the link one at a time: the
link is busy for 8 * nbytes / uplink_bps (serialization), and each payload arrives `latency_s` after
its last bit left, so latencies of consecutive payloads overlap, as on a real link and as in the
pipelined cost model (`costmodel`). Both delays are multiplied by `time_scale` (1e-3 replays a 3G
link a thousand times faster; compute is not scaled).

Outages are scripted in the edge's steps: outage (a, b) means the link is down from the moment the
edge sends step a until it sends step b (or closes the stream). While the link is up, a full buffer
blocks the edge (backpressure: the edge cannot outrun the link for long, as in the cost model). While
it is down the edge never waits: it keeps training on its early exit, its payloads are buffered up to
`capacity`, and past that the oldest buffered payload is dropped.

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
import math
import threading
import time
from collections.abc import Sequence
from typing import Any

_POLL_S = 0.05


@dataclasses.dataclass(frozen=True)
class Link:
    """An edge-cloud link: bit rates in bit/s, one-way latency in s, and where the numbers come from."""

    name: str
    uplink_bps: float
    downlink_bps: float
    latency_s: float = 0.0
    source: str = ""

    def __post_init__(self):
        for field, rate in (("uplink_bps", self.uplink_bps), ("downlink_bps", self.downlink_bps)):
            if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
                raise ValueError(f"link {self.name!r}: {field} must be a positive bit rate, got {rate!r}")
        if not (isinstance(self.latency_s, (int, float)) and math.isfinite(self.latency_s) and self.latency_s >= 0):
            raise ValueError(f"link {self.name!r}: latency_s must be >= 0, got {self.latency_s!r}")

    def serialize_s(self, nbytes: float) -> float:
        """Time the uplink is busy with `nbytes` (no latency): what limits a pipelined stream."""
        return 8.0 * nbytes / self.uplink_bps

    def up_s(self, nbytes: float) -> float:
        """One transfer edge -> cloud, from the first bit sent to the last bit received."""
        return self.serialize_s(nbytes) + self.latency_s

    def down_s(self, nbytes: float) -> float:
        """One transfer cloud -> edge."""
        return 8.0 * nbytes / self.downlink_bps + self.latency_s


_NEUROSURGEON = (
    "Kang et al., Neurosurgeon, ASPLOS 2017: measured average uplink bandwidth of 3G 1.1 Mbps, "
    "LTE 5.85 Mbps, Wi-Fi 18.88 Mbps"
)
_OFCOM = (
    "Ofcom, 4G and 3G mobile broadband performance, 2015 (five UK cities, 120,000 tests): average "
    "download 5.9 Mbit/s on 3G and 14.7 Mbit/s on 4G, latency 63.5 ms (3G) and 53.1 ms (4G), taken as "
    "round-trip times and halved for one-way"
)
_OOKLA_5G = (
    "Ookla, Growing and Slowing: The State of 5G Worldwide in 2021 (Speedtest Intelligence, Q3 2021): "
    "global median 5G download 166.13 Mbps, upload 21.08 Mbps; latency not given there, taken equal to "
    "4G's (Opensignal reported no significant 5G latency improvement over 4G in early deployments)"
)

LINKS: dict[str, Link] = {
    "3g": Link("3g", 1.1e6, 5.9e6, 63.5e-3 / 2, f"uplink: {_NEUROSURGEON}; downlink, latency: {_OFCOM}"),
    "4g": Link("4g", 5.85e6, 14.7e6, 53.1e-3 / 2, f"uplink: {_NEUROSURGEON}; downlink, latency: {_OFCOM}"),
    "5g": Link("5g", 21.08e6, 166.13e6, 53.1e-3 / 2, _OOKLA_5G),
    "wifi": Link(
        "wifi",
        18.88e6,
        18.88e6,
        0.0,
        f"uplink: {_NEUROSURGEON}; downlink assumed equal to uplink and latency not modeled (no source)",
    ),
}
"""Link presets; each one's `source` says where every number comes from and what is assumed."""


def get_link(name: str) -> Link:
    """A preset by name; ValueError listing the presets for anything else."""
    if name not in LINKS:
        raise ValueError(
            f"unknown link preset {name!r}; presets: {', '.join(LINKS)} "
            f"(or custom_link(uplink_mbps, downlink_mbps, latency_ms))"
        )
    return LINKS[name]


def custom_link(
    uplink_mbps: float, downlink_mbps: float | None = None, latency_ms: float = 0.0, name: str = "custom"
) -> Link:
    """A link at any rate (Mbit/s, 10^6 bit/s); the downlink defaults to the uplink's rate."""
    downlink_mbps = uplink_mbps if downlink_mbps is None else downlink_mbps
    return Link(name, uplink_mbps * 1e6, downlink_mbps * 1e6, latency_ms * 1e-3, "custom")


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
        if not (math.isfinite(time_scale) and time_scale > 0):
            raise ValueError(f"time_scale must be > 0, got {time_scale}")
        for a, b in outages:
            if not 0 <= a < b:
                raise ValueError(f"an outage is (first step down, first step up again) with 0 <= a < b, got {(a, b)}")
        self.link, self.capacity, self.time_scale = link, capacity, time_scale
        self.outages = tuple((int(a), int(b)) for a, b in outages)
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._reset()

    def _reset(self) -> None:
        self._buffer: collections.deque = collections.deque()  # (step, payload, nbytes)
        self._flight: collections.deque = collections.deque()  # (arrival time, step, payload)
        self._link_free_at = 0.0
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
        return not self._closed and any(a <= self._step < b for a, b in self.outages)

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
                    if now < self._link_free_at:
                        self._cv.wait(min(self._link_free_at - now, _POLL_S))
                        continue
                    t, payload, nbytes = self._buffer.popleft()
                    self._link_free_at = now + self.link.serialize_s(nbytes) * self.time_scale
                    self._flight.append((self._link_free_at + self.link.latency_s * self.time_scale, t, payload))
                    self._cv.notify_all()
                else:
                    self._cv.wait(_POLL_S)
