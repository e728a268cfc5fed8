"""A link's clock, the one both runners replay: one transfer on the wire at a time (serialisation),
each arriving `latency_s` after its last bit left (so the latencies of consecutive transfers overlap,
as on a real link and in the pipelined cost model), both delays multiplied by `time_scale`; and the
scripted outages, in edge steps: outage (a, b) means the link is down from the moment the edge sends
step a until it sends step b.

`LinkClock` is the arithmetic (times are passed in, nothing sleeps); `BufferedLink` adds the edge's
outage buffer. The scheduler (`run.scheduler`) drives both, on every backend: it learns of each
payload when its edge step is done, and the cloud step waits until the payload has arrived.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence

from hier_jax.link.spec import Link


class LinkClock:
    """When the transfers of one link leave and arrive, and whether it is down at an edge step."""

    def __init__(self, link: Link, *, time_scale: float = 1.0, outages: Sequence[tuple[int, int]] = ()):
        if not (math.isfinite(time_scale) and time_scale > 0):
            raise ValueError(f"time_scale must be > 0, got {time_scale}")
        for a, b in outages:
            if not 0 <= a < b:
                raise ValueError(f"an outage is (first step down, first step up again) with 0 <= a < b, got {(a, b)}")
        self.link, self.time_scale = link, time_scale
        self.outages = tuple((int(a), int(b)) for a, b in outages)
        self.free_at = 0.0  # when the wire is free for the next transfer

    def reset(self) -> None:
        self.free_at = 0.0

    def down(self, step: int) -> bool:
        """Is the link down while the edge sends `step`?"""
        return any(a <= step < b for a, b in self.outages)

    def transmit(self, nbytes: int, now: float) -> float:
        """Put `nbytes` on the wire at `now` (or once the wire is free); when they arrive."""
        self.free_at = max(now, self.free_at) + self.link.serialize_s(nbytes) * self.time_scale
        return self.free_at + self.link.latency_s * self.time_scale


class BufferedLink:
    """An edge's link as the scheduler replays it: while the link is down, each payload waits in the
    edge's buffer of `capacity` (the oldest dropped when it is full: the newest feature map comes from
    the edge's current weights and the newest data, so it is what the cloud should learn from when the
    link comes back, and the buffer stays a window of the latest steps, in step order, the labels
    travelling with their features); once it is up again, the buffered payloads leave in step order,
    then the new one. A transfer on the wire when an outage starts completes. The scheduler holds an
    edge back by its own window of steps in flight; while the link is down the edge never waits."""

    def __init__(self, clock: LinkClock, capacity: int):
        if capacity < 1:
            raise ValueError(f"buffer capacity must be >= 1, got {capacity}")
        self.clock, self.capacity = clock, capacity
        self.buffer: collections.deque[tuple[int, int]] = collections.deque()  # (step, nbytes)

    @property
    def held(self) -> int:
        return len(self.buffer)

    def send(self, step: int, nbytes: int, now: float) -> tuple[list[tuple[int, float]], list[int]]:
        """Edge step `step`'s payload is ready at `now`: ([(step, arrival time)] that leave now,
        [steps dropped from the buffer])."""
        if self.clock.down(step):
            self.buffer.append((step, nbytes))
            dropped = []
            while len(self.buffer) > self.capacity:
                dropped.append(self.buffer.popleft()[0])
            return [], dropped
        return self.close(now) + [(step, self.clock.transmit(nbytes, now))], []

    def close(self, now: float) -> list[tuple[int, float]]:
        """The edge sends nothing more (it finished, or it died): what is still buffered leaves now."""
        released = [(t, self.clock.transmit(nbytes, now)) for t, nbytes in self.buffer]
        self.buffer.clear()
        return released
