"""One progress display for every runner: a bar of the cloud's steps, with a recent loss and what
the transport has to show (over a network: bytes/s each way, reconnects)."""

from __future__ import annotations

from collections.abc import Callable

from tqdm.auto import tqdm


class Progress:
    """A tqdm bar over `total` cloud steps (None: unknown), from `initial` (a resumed run's start)."""

    def __init__(
        self, enabled: bool, total: int | None, desc: str, initial: int = 0, traffic: Callable[[], dict] = dict
    ):
        self.bar = tqdm(total=total, desc=desc, disable=not enabled, leave=False, initial=initial)
        self.traffic = traffic

    @property
    def enabled(self) -> bool:
        return not self.bar.disable

    def update(self, loss: float | None = None) -> None:
        """One more cloud step; `loss`, when given, is shown (the caller passes one it already has,
        so that showing it never waits on a step in flight)."""
        if loss is not None and self.enabled:
            self.bar.set_postfix({"loss": f"{loss:.3f}", **self.traffic()}, refresh=False)  # in this order
        self.bar.update()

    def close(self) -> None:
        self.bar.close()
