"""The ways a run can end other than by finishing, as exception types the CLI maps to exit codes.

A `UserError` is a mistake in what was asked for (a bad flag, an unusable --out, an unprepared data
set, a resume that does not match its checkpoint): the experiments print it as one line and exit 2,
before any training where it can be known before. The others are faults of the run itself, each
carrying what a user needs to act on it (the side and step that diverged; the checkpoint file that
is damaged; the step a stopped run can resume from).
"""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """Bad input: shown as one line (no traceback), exit status 2."""


class ConfigError(UserError, ValueError):
    """A configuration value that is out of range or unknown; the message names it and the valid choices."""


def invalid(flag: str, value: object, valid: str) -> ConfigError:
    """The one message for a bad value: "--flag VALUE is invalid; valid: VALID". Strings are quoted
    (an empty or spaced value stays visible); a list of values is shown space-separated, as typed."""
    shown = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else repr(value)
    return ConfigError(f"{flag} {shown} is invalid; valid: {valid}")


def check(ok: bool, flag: str, value: object, valid: str) -> None:
    """`invalid(flag, value, valid)` raised unless `ok`."""
    if not ok:
        raise invalid(flag, value, valid)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, damaged or incomplete; the message names the file and the side."""


class ResumeMismatchError(UserError, ValueError):
    """Resuming with a configuration that differs from the one the checkpoint was made with."""


class WorkerError(RuntimeError):
    """A worker of a run died or stopped answering (the cloud, or Ray itself); exit 1."""


class WorkerTimeout(WorkerError, TimeoutError):
    """No worker finished a task within the run's timeout (`--timeout`)."""


class DivergenceError(FloatingPointError):
    """A non-finite training loss: names the side ("edge" or "cloud"), the edge where a run has
    several, and the step it first appeared at."""

    def __init__(
        self, side: str, step: int, value: float, last_checkpoint: Path | None = None, edge: int | None = None
    ):
        self.side, self.step, self.value, self.last_checkpoint, self.edge = side, step, value, last_checkpoint, edge
        kept = (
            f"; the last finite checkpoint is {last_checkpoint}"
            if last_checkpoint is not None
            else "; no checkpoint was saved before it"
        )
        which = "" if edge is None else (f" on edge {edge}'s payload" if side == "cloud" else f" of edge {edge}")
        super().__init__(
            f"training diverged: the {side} loss{which} is {value} at step {step}{kept} "
            f"(a lower --learning-rate usually helps)"
        )

    def with_checkpoint(self, last_checkpoint: Path | None) -> DivergenceError:
        return DivergenceError(self.side, self.step, self.value, last_checkpoint, self.edge)


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C or SIGTERM after its last complete step, with its threads joined.

    `step` is the number of steps both sides completed; `checkpoint` is where that state was saved
    (None when the run had nowhere to save it).
    """

    def __init__(self, step: int, checkpoint: Path | None = None, resume_hint: str = ""):
        self.step, self.checkpoint = step, checkpoint
        where = f"; saved {checkpoint}" if checkpoint is not None else "; nothing was saved"
        super().__init__(f"interrupted after step {step}{where}{resume_hint}")


class RunAborted(KeyboardInterrupt):
    """A run stopped at once by a second Ctrl-C: its threads are joined, nothing new is saved."""
