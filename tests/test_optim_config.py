"""Each side's optimizer (its own learning rate, schedule, warm-up and Nesterov switch) and the flag
generator: shared flags that set both sides, nested configs, old spellings, format-1 configs; a
side's settings reach that side only."""

import argparse
import dataclasses
import re

import jax
import numpy as np
import pytest

from hier_jax import cli, flags, train
from hier_jax.config import ExperimentConfig, from_dict, optimizers, validate
from hier_jax.errors import ConfigError, UserError
from hier_jax.models import ExitHeadConfig
from hier_jax.optim import OptimConfig

BASE = ExperimentConfig(
    model="resnet18_tv",
    dataset="digits",
    split="layer1_1",
    width=4,
    batch_size=16,
    max_steps=3,
    head=ExitHeadConfig(channels=8),
    **optimizers(learning_rate=0.05),
)


def final_states(config, dataset):
    result = train.train(train.build(config, dataset), schedule="sequential", progress=False)
    return result.edge_state, result.cloud_state


def same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.mark.slow
def test_the_cloud_learning_rate_reaches_the_cloud_only(digits):
    """Nothing flows from the cloud to the edge: any cloud setting leaves every edge state bit-identical."""
    edge, cloud = final_states(BASE, digits)
    faster = dataclasses.replace(BASE, cloud_optimizer=OptimConfig(learning_rate=0.2, nesterov=True))
    edge2, cloud2 = final_states(faster, digits)
    assert same(edge, edge2) and not same(cloud["params"], cloud2["params"])


@pytest.mark.slow
def test_the_edge_learning_rate_reaches_the_edge_only(digits):
    """After one step the cloud has consumed only the payload computed before the edge's first update,
    so a different edge learning rate changes the edge and leaves the cloud bit-identical."""
    one = dataclasses.replace(BASE, max_steps=1)
    edge, cloud = final_states(one, digits)
    edge2, cloud2 = final_states(dataclasses.replace(one, edge_optimizer=OptimConfig(learning_rate=0.3)), digits)
    assert same(cloud, cloud2) and not same(edge["params"], edge2["params"])
    # The first SGD step from zero momentum moves each parameter by lr * (grad + wd * param): 6x the lr, 6x the move.
    edge0 = train.fresh_states(train.build(one, digits))[0]["params"]
    moved = [
        np.abs(np.asarray(a) - np.asarray(b)).max()
        for a, b in zip(jax.tree.leaves(edge["params"]), jax.tree.leaves(edge0), strict=False)
    ]
    moved2 = [
        np.abs(np.asarray(a) - np.asarray(b)).max()
        for a, b in zip(jax.tree.leaves(edge2["params"]), jax.tree.leaves(edge0), strict=False)
    ]
    assert np.allclose(np.asarray(moved2), 6 * np.asarray(moved), rtol=1e-3, atol=1e-8)


def parse(argv: list[str], defaults: ExperimentConfig = BASE) -> ExperimentConfig:
    parser = argparse.ArgumentParser()
    flags.add_flags(parser, ExperimentConfig, defaults)
    return flags.parse(ExperimentConfig, parser.parse_args(argv), defaults)


def test_a_shared_flag_sets_both_sides_and_a_side_flag_one_whatever_the_order():
    config = parse(
        [
            "--edge-learning-rate",
            "0.1",
            "--learning-rate",
            "0.3",
            "--cloud-warmup-steps",
            "7",
            "--nesterov",
            "--no-cloud-nesterov",
            "--edge-lr-schedule",
            "constant",
        ]
    )
    assert config.edge_optimizer == OptimConfig(0.1, 0.9, 5e-4, "constant", 0, True)
    assert config.cloud_optimizer == OptimConfig(0.3, 0.9, 5e-4, "cosine", 7, False)
    assert parse([]) == BASE


def test_old_spellings_still_work():
    """--schedule cosine|constant was the learning-rate schedule and --edge-schedule the edge's; --mode
    overlapped (experiments.train) and --flow (experiments.cluster) were the run's schedule."""
    config = parse(["--schedule", "constant", "--edge-schedule", "cosine", "--mode", "sequential"])
    assert (config.edge_optimizer.lr_schedule, config.cloud_optimizer.lr_schedule) == ("cosine", "constant")
    assert config.schedule == "sequential"
    assert parse(["--mode", "overlapped"], dataclasses.replace(BASE, schedule="sequential")).schedule == "pipelined"
    assert parse(["--flow", "sequential"]).schedule == "sequential"
    assert parse(["--batch", "8"]).batch_size == 8


def test_nested_configs_links_and_lists_get_flags():
    config = parse(
        [
            "--head-channels",
            "4",
            "--head-grid",
            "2",
            "--link",
            "3g,wifi",
            "--outage",
            "2:5",
            "--outage",
            "7:9",
            "--link-buffer",
            "3",
        ]
    )
    assert config.head == ExitHeadConfig(channels=4, convs=1, grid=2)
    assert config.link.presets == ("3g", "wifi") and config.link.outages == ((2, 5), (7, 9))
    assert config.link.buffer == 3 and parse(["--links", "4g"]).link.presets == ("4g",)


def test_given_names_exactly_the_fields_the_command_line_set():
    parser = argparse.ArgumentParser()
    flags.add_flags(parser, ExperimentConfig, BASE)
    given = flags.given(
        ExperimentConfig, parser.parse_args(["--learning-rate", "0.2", "--cloud-learning-rate", "0.4", "--bits", "8"])
    )
    assert given == {"edge_optimizer.learning_rate": 0.2, "cloud_optimizer.learning_rate": 0.4, "bits": 8}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--outage", "5:3"], "argument --outage: '5:3' is invalid; valid: A:B, two step numbers with 0 <= A < B"),
        (["--learning-rate", "x"], "argument --learning-rate: invalid float value: 'x'"),
    ],
)
def test_a_bad_flag_value_is_refused_by_the_parser(argv, message):
    parser = cli.Parser()
    flags.add_flags(parser, ExperimentConfig, BASE)
    with pytest.raises(UserError, match=re.escape(message)):
        parser.parse_args(argv)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"edge_optimizer.learning_rate": 0.0}, "--edge-learning-rate 0.0 is invalid; valid: a finite number > 0"),
        ({"cloud_optimizer.learning_rate": float("nan")}, "--cloud-learning-rate nan is invalid"),
        (
            {"edge_optimizer.lr_schedule": "step", "cloud_optimizer.lr_schedule": "step"},
            "--lr-schedule 'step' is invalid; valid: cosine, constant",
        ),
        ({"cloud_optimizer.lr_schedule": "linear"}, "--cloud-lr-schedule 'linear' is invalid; valid: cosine, constant"),
        ({"edge_optimizer.warmup_steps": -1}, "--edge-warmup-steps -1 is invalid; valid: an integer >= 0"),
        ({"link.presets": ("3g", "4g")}, "--link '3g,4g' is invalid; valid: one preset, or one per edge (1)"),
        ({"link.presets": ("dsl",)}, "--link 'dsl' is invalid; valid: 3g, 4g, 5g, wifi"),
        ({"link.outages": ((1, 3),)}, "--outage needs --link"),
        ({"schedule": "overlapped"}, "--schedule 'overlapped' is invalid; valid: sequential, pipelined"),
        ({"scheme": "federated"}, "--scheme 'federated' is invalid; valid: hierarchical, end_to_end, split_learning"),
    ],
)
def test_bad_settings_fail_clearly(change, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(flags.replace_paths(BASE, change))


def test_a_format1_config_reads_as_todays_nested_one():
    """Format 1 recorded the optimizers and the head flat, the side fields None where they fell back."""
    flat = {
        "model": "resnet18_tv",
        "learning_rate": 0.05,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "schedule": "constant",
        "warmup_steps": 2,
        "nesterov": False,
        "edge_learning_rate": 0.2,
        "edge_schedule": None,
        "edge_warmup_steps": None,
        "edge_nesterov": True,
        "cloud_learning_rate": None,
        "cloud_schedule": "cosine",
        "cloud_warmup_steps": None,
        "cloud_nesterov": None,
        "head_channels": 8,
        "head_convs": 0,
        "head_grid": 2,
        "some_field_since_removed": 1,
    }
    config = from_dict(ExperimentConfig, flat)
    assert config.edge_optimizer == OptimConfig(0.2, 0.9, 5e-4, "constant", 2, True)
    assert config.cloud_optimizer == OptimConfig(0.05, 0.9, 5e-4, "cosine", 2, False)
    assert config.head == ExitHeadConfig(8, 0, 2) and config.model == "resnet18_tv"
    assert from_dict(ExperimentConfig, dataclasses.asdict(BASE)) == BASE  # today's layout reads back as it is
