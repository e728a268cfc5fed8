"""Checkpoints of a run: both states and the run's metadata under one step, written atomically.

A run's checkpoints live under one directory, one subdirectory per step (`DIR/250/`, `DIR/500/`, ...),
each holding three items: `edge` and `cloud` (the two train states, orbax StandardSave) and `meta`
(JSON: the config the run was made with, the position in the data, the RNG seed, the metrics so far).
Orbax writes each step into a temporary directory and renames it into place once complete, so a
run killed mid-save leaves the previous checkpoint as the latest; only the latest `keep` are kept.

Each restored state lands on the device of the template it is restored into (the edge's on the edge
device, the cloud's on the cloud device), whatever devices wrote it. Every failure to read names the
directory and the item (side) at fault, as a `CheckpointError`; reading never creates anything.
"""

from __future__ import annotations

import concurrent.futures
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from hier_jax.errors import CheckpointError
from hier_jax.steps import State

ITEMS = ("edge", "cloud", "meta")


def _abstract(tree: State) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


class RunCheckpoints:
    """The checkpoints of one run under `directory`. Writing creates it; reading requires it to exist."""

    def __init__(self, directory: str | os.PathLike[str], *, keep: int = 3, read_only: bool = False):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory).absolute()
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"no checkpoint directory {self.directory}")
        # cleanup_tmp_directories: a run killed mid-save leaves STEP.orbax-checkpoint-tmp*; the next
        # writer of this directory (a resume) removes it.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=not read_only,
            enable_async_checkpointing=False,
            cleanup_tmp_directories=not read_only,
        )
        self._manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)

    def __enter__(self) -> RunCheckpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._manager.close()

    def steps(self) -> list[int]:
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def path(self, step: int) -> Path:
        return self.directory / str(step)

    def save(self, step: int, edge_state: State, cloud_state: State, meta: dict[str, Any]) -> Path:
        """Write checkpoint `step`; blocks until it is complete on disk. Refuses a step that exists.

        The write runs on a thread of its own, so a Ctrl-C or SIGTERM (a KeyboardInterrupt in the
        calling thread) lands while it is waited for: the checkpoint is completed, then the interrupt
        goes on (an interrupted orbax write would leave a temporary directory and no checkpoint)."""
        if step in self.steps():
            raise CheckpointError(f"checkpoint {self.path(step)} already exists; it is never overwritten")
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hier-save") as pool:
            writing = pool.submit(self._write, step, edge_state, cloud_state, meta)
            try:
                return writing.result()
            except KeyboardInterrupt:
                writing.result()
                raise

    def _write(self, step: int, edge_state: State, cloud_state: State, meta: dict[str, Any]) -> Path:
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(
                edge=ocp.args.StandardSave(edge_state),
                cloud=ocp.args.StandardSave(cloud_state),
                meta=ocp.args.JsonSave(meta),
            ),
        )
        self._manager.wait_until_finished()
        if not saved or not self.path(step).is_dir():
            raise CheckpointError(f"checkpoint {self.path(step)} was not written")
        return self.path(step)

    def _step_or_latest(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint under {self.directory}")
        if not self.path(step).is_dir():
            raise CheckpointError(f"no checkpoint {self.path(step)}; there are: {self.steps()}")
        return step

    def _restore_item(self, step: int, item: str, args: Any) -> Any:
        location = self.path(step) / item
        if not location.is_dir():
            raise CheckpointError(
                f"checkpoint {self.path(step)} is incomplete: its {item} item ({location}) is missing"
            )
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**{item: args}))[item]
        except Exception as error:  # noqa: BLE001 - any read failure is reported as a damaged item
            raise CheckpointError(
                f"checkpoint {location} ({item}) is damaged or unreadable: {_first_line(error)}"
            ) from error

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The metadata of checkpoint `step` (default: the latest)."""
        step = self._step_or_latest(step)
        meta = self._restore_item(step, "meta", ocp.args.JsonRestore())
        if not isinstance(meta, dict) or meta.get("step") != step:
            raise CheckpointError(
                f"checkpoint {self.path(step) / 'meta'} (meta) is damaged: it does not describe step {step}"
            )
        return meta

    def restore(
        self, edge_template: State, cloud_template: State, step: int | None = None
    ) -> tuple[State, State, dict[str, Any]]:
        """Checkpoint `step` (default: the latest) in the structure, dtypes and devices of the templates."""
        step = self._step_or_latest(step)
        meta = self.read_meta(step)
        edge = self._restore_item(step, "edge", ocp.args.StandardRestore(_abstract(edge_template)))
        cloud = self._restore_item(step, "cloud", ocp.args.StandardRestore(_abstract(cloud_template)))
        return edge, cloud, meta
