"""Saving and restoring the edge and cloud states together, with orbax.

Both sides are saved under one step so that a restored run resumes with states that belong
together; each restored state lands on the device of the template it is restored into (the edge's
on the edge device, the cloud's on the cloud device), whatever devices wrote it.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from hier_jax.steps import State


def _manager(directory: str | Path) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(Path(directory).absolute(), item_names=("edge", "cloud"))


def save(directory: str | Path, step: int, edge_state: State, cloud_state: State) -> Path:
    """Write both states as checkpoint `step` under `directory`; blocks until written."""
    with _manager(directory) as manager:
        manager.save(step, args=ocp.args.Composite(edge=ocp.args.StandardSave(edge_state),
                                                   cloud=ocp.args.StandardSave(cloud_state)))
        manager.wait_until_finished()
    return Path(directory) / str(step)


def restore(directory: str | Path, edge_template: State, cloud_template: State, step: int | None = None
            ) -> tuple[State, State, int]:
    """Restore checkpoint `step` (default: the latest) into the structure, dtypes and devices of the templates."""
    def abstract(tree):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)

    with _manager(directory) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {Path(directory).absolute()}")
        restored = manager.restore(step, args=ocp.args.Composite(
            edge=ocp.args.StandardRestore(abstract(edge_template)),
            cloud=ocp.args.StandardRestore(abstract(cloud_template))))
    return restored["edge"], restored["cloud"], step
