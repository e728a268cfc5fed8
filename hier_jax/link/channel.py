"""The hand-off between the edge and cloud threads of `threads.run_pipelined`: the `Channel` interface
and its default, `QueueChannel` (instant delivery). `link.SimulatedLink` is the other implementation."""

from __future__ import annotations

import queue
import threading
from typing import Any, Protocol

_DONE = object()  # QueueChannel's end-of-stream marker
_POLL_S = 0.05  # how often a blocked call checks the run's stop event


class Channel(Protocol):
    """Carries (step, payload) pairs from the edge's thread (`send`, `close`) to the cloud's (`receive`).

    Every call that can block is given the run's stop event and returns soon (within a poll interval)
    after it is set. A run calls `open` once before either thread starts, and `join` once after both
    have ended (also after an error); a channel may be reused by later runs, one at a time.
    """

    def open(self, stop: threading.Event) -> None:
        """Start a run: discard whatever a previous run left in the channel."""
        ...

    def send(self, t: int, payload: Any, stop: threading.Event) -> bool:
        """Hand over step `t`'s payload (steps are sent in increasing order). May block (backpressure)
        or drop payloads, as the channel models; returns False once `stop` is set (the edge then stops
        sending), True otherwise, also when a payload was dropped."""
        ...

    def close(self, stop: threading.Event) -> None:
        """End of the stream: nothing more is sent. Payloads already sent may still be received."""
        ...

    def receive(self, stop: threading.Event) -> tuple[int, Any] | None:
        """The next (step, payload), in strictly increasing step order (a lossy channel may skip steps),
        blocking until one is available; None once the stream is closed and drained, or when `stop` is set."""
        ...

    def join(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` for any thread the channel started; raise RuntimeError if one is still alive."""
        ...


class QueueChannel:
    """A bounded FIFO with instant delivery: the default `Channel`."""

    def __init__(self, capacity: int = 2):
        if capacity < 1:
            raise ValueError(f"queue capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._queue: queue.Queue = queue.Queue(maxsize=capacity)

    def open(self, stop: threading.Event) -> None:
        self._queue = queue.Queue(maxsize=self.capacity)

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

    def join(self, timeout_s: float) -> None:
        """Starts no thread: nothing to wait for."""
