"""A run's output directory: checked before any work, never mixed with another run, written atomically.

`prepare_run_dir` runs first, before data is loaded: it refuses a path that is a file or cannot be
written, and a directory that already holds a run unless the caller resumes it or overwrites it; an
overwrite then calls `remove_run` once every other check has passed, so old and new outputs never sit
side by side and a refused run never costs the old one. Files are
written to a temporary name and renamed into place, so a file that exists is complete, and every
file a run reports as written was written. JSON is always valid: NaN and infinities become null.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hier_jax.errors import UserError


def prepare_run_dir(
    out: str | Path, *, outputs: Sequence[str], resume: bool = False, overwrite: bool = False, resume_hint: str = ""
) -> Path:
    """Check (and create) `out` before any work; UserError for anything that would lose or mix outputs.
    `outputs` are the names a run writes there (any one of them means `out` holds a run); `resume_hint`
    is the flag that would continue it, for the refusal's message (empty: the run cannot be resumed)."""
    path = Path(out)
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other: resume continues a run, overwrite replaces it")
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    existing = run_outputs(path, outputs)
    if existing and not (resume or overwrite):
        raise UserError(
            f"--out {out} already holds a run ({', '.join(existing)}); "
            + (f"pass {resume_hint} to continue it, --overwrite" if resume_hint else "pass --overwrite")
            + " to replace it, or another --out"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as error:
        raise UserError(f"--out {out} cannot be written: {error.strerror or error}") from None
    return path


def run_outputs(path: Path, outputs: Sequence[str]) -> list[str]:
    """The outputs of a run that `path` holds (an empty directory, e.g. a run stopped before its first
    checkpoint, does not count)."""
    return [
        name
        for name in outputs
        if (path / name).exists() and not ((path / name).is_dir() and not any((path / name).iterdir()))
    ]


def remove_run(path: Path, outputs: Sequence[str]) -> None:
    """Delete the outputs of the run in `path` (what --overwrite replaces); call it once every check
    has passed, just before the new run starts, so a refused run never costs the old one."""
    for name in outputs:
        target = path / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[str]:
    """A temporary file name beside `path` (same suffix) to write to; renamed onto `path` on success,
    removed on failure."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write `data` to a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    with _replacing(path) as tmp:
        Path(tmp).write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def json_safe(value: Any) -> Any:
    """`value` with NumPy scalars and arrays as Python values and non-finite floats as None."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | Path, value: Any) -> Path:
    """Strict JSON (no bare NaN), written atomically."""
    return write_atomic(path, json.dumps(json_safe(value), indent=2, allow_nan=False, default=str) + "\n")


def save_figure(fig, path: str | Path, **kwargs) -> Path:
    """matplotlib's savefig, atomically (the temporary file keeps the suffix that picks the format)."""
    path = Path(path)
    with _replacing(path) as tmp:
        fig.savefig(tmp, **kwargs)
    return path
