"""Checkpoints: both states and their metadata round-trip onto the template's devices, and a run
resumed from one (runner level, `start_step`) is bit-identical to an uninterrupted run."""

import jax
import numpy as np

from hier_jax import devices
from hier_jax.models import ExitHeadConfig, build_model, split
from hier_jax.optim import OptimConfig, make_optimizer
from hier_jax.run import hierarchy, threads
from hier_jax.run.checkpoint import RunCheckpoints


def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path):
    model = build_model("vgg16", num_classes=10, input_shape=(32, 32, 3), width=4)
    tx = make_optimizer(OptimConfig(), total_steps=5)
    h, edge0, cloud0 = hierarchy.build_hierarchy(
        split(model, "pool2", ExitHeadConfig(channels=8)), bits=4, edge_tx=tx, cloud_tx=tx
    )
    rng = np.random.default_rng(0)
    data = [
        (rng.normal(size=(4, 32, 32, 3)).astype(np.float32), rng.integers(0, 10, 4).astype(np.int32)) for _ in range(5)
    ]

    def copies():
        return devices.place(edge0, h.edge_device), devices.place(cloud0, h.cloud_device)

    straight = threads.run_sequential(h, *copies(), data)
    first = threads.run_sequential(h, *copies(), data[:3])
    with RunCheckpoints(tmp_path / "ckpt") as checkpoints:
        checkpoints.save(3, first.edge_state, first.cloud_state, {"step": 3, "note": "three steps"})
    with RunCheckpoints(tmp_path / "ckpt", read_only=True) as checkpoints:
        edge, cloud, meta = checkpoints.restore(*copies())
    assert meta == {"step": 3, "note": "three steps"}
    assert int(edge["step"]) == 3 and int(cloud["step"]) == 3
    assert {d for x in jax.tree.leaves(cloud) for d in x.devices()} == {h.cloud_device}
    assert {d for x in jax.tree.leaves(edge) for d in x.devices()} == {h.edge_device}
    resumed = threads.run_pipelined(h, edge, cloud, data[3:], start_step=3)
    np.testing.assert_array_equal(resumed.cloud_steps, [3, 4])
    assert (resumed.start_step, resumed.end_step) == (3, 5)
    for a, b in ((straight.edge_state, resumed.edge_state), (straight.cloud_state, resumed.cloud_state)):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(straight.cloud_metrics["loss"][3:], resumed.cloud_metrics["loss"])


def test_only_the_latest_checkpoints_are_kept(tmp_path):
    state = {"w": jax.numpy.ones(3)}
    with RunCheckpoints(tmp_path, keep=2) as checkpoints:
        for step in (1, 2, 3):
            checkpoints.save(step, state, state, {"step": step})
        assert checkpoints.steps() == [2, 3] and checkpoints.latest_step() == 3
