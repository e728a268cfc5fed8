"""End to end on real data: the quickstart trains, both exits beat chance, bad configs fail clearly."""

import dataclasses
import json
import re

import pytest

from experiments import quickstart
from hier_jax import devices, train
from hier_jax.config import ExperimentConfig, optimizers
from hier_jax.data import load_dataset
from hier_jax.errors import ConfigError
from hier_jax.models import ExitHeadConfig
from hier_jax.optim import OptimConfig
from hier_jax.run.record import METRICS_COLUMNS


def test_quickstart_trains_on_digits_and_writes_summary(tmp_path):
    quickstart.main(["--epochs", "2", "--width", "8", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())  # what the file says, checked against facts
    assert summary["wall_s_sequential"] > 0 and summary["wall_s_pipelined"] > 0
    assert summary["pipelined_bit_identical_to_sequential"] is True
    assert summary["steps"] == 2 * (1437 // 64) and summary["precision"] == "fp32"
    edge, cloud = (devices.device_name(devices.resolve_device("auto", role)) for role in devices.ROLES)
    assert summary["placement"] == {"edge": edge, "cloud": cloud}
    # 10 classes: chance is 0.1. Both exits must clearly beat it after 2 epochs (44 steps).
    assert summary["edge_accuracy"] > 0.5 and summary["cloud_accuracy"] > 0.5
    assert summary["test_examples"] == 360
    # resnet18_tv width 8 cut after layer1_1: 8x8x8 features, 64 per batch at 4 bits, + scale, offset, labels.
    assert summary["payload_bytes_per_batch"] == 64 * 8 * 8 * 8 // 2 + 4 + 4 + 64
    assert summary["raw_bytes_per_batch"] == 64 * 32 * 32 * 3 + 64


def test_both_losses_fall(digits):
    config = ExperimentConfig(
        model="resnet18",
        dataset="digits",
        split="layer2_0",
        width=8,
        batch_size=32,
        epochs=1,
        max_steps=40,
        head=ExitHeadConfig(channels=16),
        **optimizers(learning_rate=0.1),
    )
    setup = train.build(config, digits)
    result = train.train(setup, schedule="pipelined", progress=False)
    for metrics in (result.edge_metrics, result.cloud_metrics):
        assert metrics["loss"].shape == (40,)
        assert metrics["loss"][-8:].mean() < 0.7 * metrics["loss"][:8].mean()
    acc = train.evaluate(setup, result)
    assert acc["edge_accuracy"] > 0.3 and acc["cloud_accuracy"] > 0.3


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model": "alexnet"}, "--model 'alexnet' is invalid; valid: vgg16, resnet18, resnet18_tv"),
        ({"split": "layer9_9"}, "--split 'layer9_9' is invalid; valid: a stage of resnet18: stem, layer1_0"),
        ({"bits": 9}, "--bits 9 is invalid; valid: 1, 2, 3, 4, 5, 6, 7, 8, 16, 32"),
        ({"cloud_device": "cpu:5"}, "device 'cpu:5' does not exist"),
        ({"edge_device": "gpu:64"}, "device 'gpu:64' does not exist"),
        ({"edge_device": ":1"}, "device ':1' does not exist"),
        ({"queue_size": 0}, "--queue-size 0 is invalid; valid: an integer >= 1"),
        (optimizers(learning_rate=-1.0), "--learning-rate -1.0 is invalid; valid: a finite number > 0"),
        ({"cloud_optimizer": OptimConfig(momentum=1.0)}, "--cloud-momentum 1.0 is invalid; valid: a number in [0, 1)"),
        ({"head": ExitHeadConfig(grid=0)}, "--head-grid 0 is invalid; valid: an integer >= 1"),
        ({"batch_size": 4000}, "--batch-size 4000 is larger than the training split of digits (1437 images)"),
    ],
)
def test_bad_configs_fail_clearly(digits, change, message):
    config = dataclasses.replace(ExperimentConfig(dataset="digits", width=4), **change)
    with pytest.raises(ConfigError, match=re.escape(message)):
        train.build(config, digits)


def test_unknown_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="mnist"):
        load_dataset("mnist")


def test_training_schedule_length(digits):
    config = ExperimentConfig(dataset="digits", batch_size=64, epochs=3)
    assert train.total_steps(config, digits) == 3 * (1437 // 64)
    assert train.total_steps(dataclasses.replace(config, max_steps=7), digits) == 7
    assert len(train.TrainBatches(train.build(dataclasses.replace(config, max_steps=7, width=4), digits))) == 7


def test_train_experiment_writes_summary_metrics_and_plot(tmp_path):
    from experiments import train as train_experiment

    summary = train_experiment.main(
        [
            "--dataset",
            "digits",
            "--model",
            "vgg16",
            "--split",
            "pool2",
            "--width",
            "4",
            "--batch-size",
            "32",
            "--max-steps",
            "6",
            "--head-channels",
            "8",
            "--out",
            str(tmp_path),
        ]
    )
    assert json.loads((tmp_path / "summary.json").read_text())["steps_per_edge"] == summary["steps_per_edge"] == 6
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0] == ",".join(METRICS_COLUMNS) and len(rows) == 1 + 6
    assert [r.split(",")[:2] for r in rows[1:]] == [["0", str(t)] for t in range(6)]  # edge 0, steps 0..5
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["6"]
    # vgg16 width 4 after pool2: 8x8 maps of 8 channels, 32 per batch at 4 bits.
    assert summary["payload_bytes_per_batch"] == 32 * 8 * 8 * 8 // 2 + 4 + 4 + 32


def test_train_experiment_over_a_simulated_link_with_an_outage(tmp_path):
    from experiments import train as train_experiment

    summary = train_experiment.main(
        [
            "--dataset",
            "digits",
            "--model",
            "vgg16",
            "--split",
            "pool2",
            "--width",
            "4",
            "--batch-size",
            "32",
            "--max-steps",
            "10",
            "--head-channels",
            "8",
            "--link",
            "4g",
            "--time-scale",
            "1e-3",
            "--outage",
            "3:8",
            "--link-buffer",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    link = summary["link"]
    assert link["sent"] == 10 and link["delivered"] + link["dropped"] == 10
    # Down while the edge sends steps 3..7 (5 payloads) with room for 2: at least 3 dropped, oldest first
    # (an earlier payload still held back by a busy cloud may be among them), none after the outage.
    dropped = link["dropped_steps"]["0"]  # per edge; here one
    assert link["dropped"] == len(dropped) >= 3 and dropped == sorted(dropped) and set(dropped) <= set(range(8))
    assert summary["cloud_steps"] == link["delivered"]
    rows = [r.split(",") for r in (tmp_path / "metrics.csv").read_text().splitlines()[1:]]
    assert [int(r[1]) for r in rows] == list(range(10))  # every edge step has its row
    assert [int(r[1]) for r in rows if r[5] == ""] == dropped  # the dropped ones no cloud step
