"""Checkpoints: a run resumed from a checkpoint is bit-identical to an uninterrupted run."""

import jax
import numpy as np
import pytest

from hier_jax import checkpoint, runner
from hier_jax.models import ExitHeadConfig, build_model, split
from hier_jax.optim import OptimConfig, make_optimizer


def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path):
    model = build_model("vgg16", num_classes=10, input_shape=(16, 16, 3), width=4)
    tx = make_optimizer(OptimConfig(), total_steps=5)
    h, edge0, cloud0 = runner.build_hierarchy(split(model, "pool2", ExitHeadConfig(channels=8)), bits=4,
                                              edge_tx=tx, cloud_tx=tx)
    rng = np.random.default_rng(0)
    data = [(rng.normal(size=(4, 16, 16, 3)).astype(np.float32), rng.integers(0, 10, 4).astype(np.int32))
            for _ in range(5)]

    def copies():
        return (jax.device_put(edge0, h.edge_device, may_alias=False),
                jax.device_put(cloud0, h.cloud_device, may_alias=False))

    straight = runner.run_sequential(h, *copies(), data)
    first = runner.run_sequential(h, *copies(), data[:3])
    checkpoint.save(tmp_path / "ckpt", 3, first.edge_state, first.cloud_state)
    edge, cloud, step = checkpoint.restore(tmp_path / "ckpt", *copies())
    assert step == 3 and int(edge["step"]) == 3 and int(cloud["step"]) == 3
    assert {d for x in jax.tree.leaves(cloud) for d in x.devices()} == {h.cloud_device}
    resumed = runner.run_sequential(h, edge, cloud, data[3:])
    for a, b in ((straight.edge_state, resumed.edge_state), (straight.cloud_state, resumed.cloud_state)):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(x, y)


def test_restore_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint under"):
        checkpoint.restore(tmp_path / "empty", {}, {})
