"""One progress display for every runner: a bar of the cloud's steps, with a recent loss."""

from __future__ import annotations

from tqdm.auto import tqdm


class Progress:
    """A tqdm bar over `total` cloud steps (None: unknown), from `initial` (a resumed run's start)."""

    def __init__(self, enabled: bool, total: int | None, desc: str, initial: int = 0):
        self.bar = tqdm(total=total, desc=desc, disable=not enabled, leave=False, initial=initial)

    @property
    def enabled(self) -> bool:
        return not self.bar.disable

    def update(self, loss: float | None = None) -> None:
        """One more cloud step; `loss`, when given, is shown (the caller passes one it already has,
        so that showing it never waits on a step in flight)."""
        if loss is not None and self.enabled:
            self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        self.bar.update()

    def close(self) -> None:
        self.bar.close()
