"""What every experiment's command line shares: one-line user errors, --debug, and clean stops.

    @cli.entry_point
    def main(argv):
        parser = cli.Parser(description=__doc__)
        ...

- A `UserError` (a bad flag value, an unusable --out, an unprepared data set) is printed as one line,
  `experiments.NAME: error: ...`, with exit status 2; argparse's own errors take the same path.
- A stopped run (`RunInterrupted`, from Ctrl-C or SIGTERM) prints where it was saved, exit status 130;
  a Ctrl-C outside a run (loading data, compiling) exits 130 with one line too.
- A diverged run or a damaged checkpoint is printed as one line, exit status 1.
- Anything else is a bug and keeps its traceback; `--debug` shows tracebacks for all of the above (on
  the command line with the same exit status; from Python, `main(argv)` raises the error itself).

`main(argv)` stays callable from Python (tests, notebooks): it returns what the experiment returns,
and raises SystemExit with the codes above.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import NoReturn, TypeVar

from hier_jax.errors import CheckpointError, DivergenceError, RunAborted, RunInterrupted, UserError, WorkerError

EXIT_USER_ERROR = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130

T = TypeVar("T")


class Parser(argparse.ArgumentParser):
    """argparse whose errors are `UserError`s (one line, exit 2, via `entry_point`), with --debug."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help="show tracebacks for user errors too")

    def error(self, message: str):  # argparse calls this for every parse error
        raise UserError(message)


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises KeyboardInterrupt in the main thread, so it stops a run like Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def entry_point(main: Callable[[list[str]], T]) -> Callable[[Sequence[str] | None], T]:
    """Wrap an experiment's `main(argv)` with the exit conventions of this module."""
    prog = main.__module__
    if prog == "__main__":  # python -m experiments.NAME: the module's own name, not its file
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        prog = spec.name if spec is not None else (sys.argv[0] or "hier_jax")

    @functools.wraps(main)
    def wrapped(argv: Sequence[str] | None = None) -> T:
        args = list(sys.argv[1:] if argv is None else argv)
        debug = "--debug" in args

        def fail(error: BaseException, code: int) -> NoReturn:
            """One line and `code`; with --debug the traceback first (and from Python the error itself)."""
            if debug and argv is not None:
                raise error
            if debug:
                traceback.print_exc()
            print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
            raise SystemExit(code) from None

        with sigterm_as_interrupt():
            try:
                return main(args)
            except UserError as error:
                fail(error, EXIT_USER_ERROR)
            except (DivergenceError, CheckpointError, WorkerError) as error:
                fail(error, EXIT_FAILED)
            except (RunInterrupted, RunAborted) as stopped:
                print(f"{prog}: {one_line(stopped)}", file=sys.stderr)
                raise SystemExit(EXIT_INTERRUPTED) from None
            except KeyboardInterrupt:
                print(
                    f"{prog}: interrupted outside the training steps (loading, compiling, evaluating or "
                    f"writing); nothing more was saved",
                    file=sys.stderr,
                )
                raise SystemExit(EXIT_INTERRUPTED) from None

    return wrapped
