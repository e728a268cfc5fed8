"""Each side's optimizer: its own learning rate, schedule, warm-up and Nesterov switch, from flat flags
that fall back to the shared ones; a side's settings reach that side only."""

import argparse
import dataclasses

import jax
import numpy as np
import pytest

from hier_jax import train
from hier_jax.config import ExperimentConfig, add_config_flags, config_from_args, validate
from hier_jax.data import load_dataset
from hier_jax.errors import ConfigError
from hier_jax.optim import OptimConfig

BASE = ExperimentConfig(
    model="resnet18_tv",
    dataset="digits",
    split="layer1_1",
    width=4,
    batch_size=16,
    max_steps=3,
    head_channels=8,
    learning_rate=0.05,
)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def final_states(config, dataset):
    result = train.train(train.build(config, dataset), "sequential", progress=False)
    return result.edge_state, result.cloud_state


def same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_the_cloud_learning_rate_reaches_the_cloud_only(digits):
    """Nothing flows from the cloud to the edge: any cloud setting leaves every edge state bit-identical."""
    edge, cloud = final_states(BASE, digits)
    edge2, cloud2 = final_states(dataclasses.replace(BASE, cloud_learning_rate=0.2, cloud_nesterov=True), digits)
    assert same(edge, edge2) and not same(cloud["params"], cloud2["params"])


def test_the_edge_learning_rate_reaches_the_edge_only(digits):
    """After one step the cloud has consumed only the payload computed before the edge's first update,
    so a different edge learning rate changes the edge and leaves the cloud bit-identical."""
    one = dataclasses.replace(BASE, max_steps=1)
    edge, cloud = final_states(one, digits)
    edge2, cloud2 = final_states(dataclasses.replace(one, edge_learning_rate=0.3), digits)
    assert same(cloud, cloud2) and not same(edge["params"], edge2["params"])
    # The first SGD step from zero momentum moves each parameter by lr * (grad + wd * param): 6x the lr, 6x the move.
    edge0 = train.fresh_states(train.build(one, digits))[0]["params"]
    moved = [
        np.abs(np.asarray(a) - np.asarray(b)).max()
        for a, b in zip(jax.tree.leaves(edge["params"]), jax.tree.leaves(edge0))
    ]
    moved2 = [
        np.abs(np.asarray(a) - np.asarray(b)).max()
        for a, b in zip(jax.tree.leaves(edge2["params"]), jax.tree.leaves(edge0))
    ]
    assert np.allclose(np.asarray(moved2), 6 * np.asarray(moved), rtol=1e-3, atol=1e-8)


def test_side_settings_fall_back_to_the_shared_ones():
    config = dataclasses.replace(
        BASE,
        schedule="constant",
        warmup_steps=5,
        nesterov=True,
        edge_learning_rate=0.2,
        cloud_schedule="cosine",
        cloud_nesterov=False,
    )
    assert config.optimizer("edge") == OptimConfig(0.2, 0.9, 5e-4, "constant", 5, True)
    assert config.optimizer("cloud") == OptimConfig(0.05, 0.9, 5e-4, "cosine", 5, False)
    with pytest.raises(ValueError, match="unknown side"):
        config.optimizer("fog")


def test_flat_flags_set_each_side():
    parser = argparse.ArgumentParser()
    add_config_flags(parser, BASE)
    config = config_from_args(
        parser.parse_args(
            [
                "--edge-learning-rate",
                "0.1",
                "--cloud-warmup-steps",
                "7",
                "--nesterov",
                "--no-cloud-nesterov",
                "--edge-schedule",
                "constant",
            ]
        )
    )
    assert config.optimizer("edge") == OptimConfig(0.1, 0.9, 5e-4, "constant", 0, True)
    assert config.optimizer("cloud") == OptimConfig(0.05, 0.9, 5e-4, "cosine", 7, False)
    assert config_from_args(parser.parse_args([])) == BASE


@pytest.mark.parametrize(
    "change, message",
    [
        ({"edge_learning_rate": 0.0}, "--edge-learning-rate 0.0 is invalid; valid: a finite number > 0"),
        ({"cloud_learning_rate": float("nan")}, "--cloud-learning-rate nan is invalid"),
        ({"schedule": "step"}, "--schedule 'step' is invalid; valid: cosine, constant"),
        ({"cloud_schedule": "linear"}, "--cloud-schedule 'linear' is invalid; valid: cosine, constant"),
        ({"edge_warmup_steps": -1}, "--edge-warmup-steps -1 is invalid; valid: an integer >= 0"),
    ],
)
def test_bad_side_settings_fail_clearly(change, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(dataclasses.replace(BASE, **change))


def test_a_checkpoint_written_before_a_field_existed_still_resumes(tmp_path):
    """Fields added since a checkpoint was written had their defaults then: not a mismatch."""
    recorded = {
        k: v
        for k, v in dataclasses.asdict(BASE).items()
        if not k.startswith(("edge_", "cloud_")) or k in ("edge_device", "cloud_device")
    }
    train.check_resumable(BASE, recorded, tmp_path)
