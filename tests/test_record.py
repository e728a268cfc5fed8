"""The one run record: its cut and join, the metrics layout every runner writes, the link clock both
runners replay, and checkpoints of format 1 (both runners, made before the record existed) resuming
to the end an uninterrupted run of today's code reaches."""

import dataclasses
import importlib.util
import math
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from hier_jax import cluster, train
from hier_jax.config import ExperimentConfig
from hier_jax.errors import DivergenceError
from hier_jax.link import BufferedLink, LinkClock, custom_link
from hier_jax.models import ExitHeadConfig
from hier_jax.run.checkpoint import RunCheckpoints
from hier_jax.run.record import METRICS_COLUMNS, RunRecord, check_finite, metrics_csv, read_meta

FORMAT1 = Path(__file__).parent / "data" / "format1"
# What tests/data/format1/make.py ran (format 1 recorded it flat; this is the same config today).
CONFIG = ExperimentConfig(
    model="resnet18_tv",
    dataset="digits",
    split="layer1_1",
    bits=4,
    width=4,
    batch_size=32,
    max_steps=6,
    head=ExitHeadConfig(channels=8),
    queue_size=1,
    checkpoint_every=3,
    keep_checkpoints=3,
)


def two_edge_record() -> RunRecord:
    """Edge 0 took steps 0..2, edge 1 steps 0..1; the cloud took (0,0), (1,0), (0,2): edge 0's step 1
    was dropped and edge 1's step 1 is not trained on yet."""
    record = RunRecord.empty(2)
    for e, t, loss in ((0, 0, 2.0), (0, 1, 1.5), (0, 2, 1.0), (1, 0, 2.5), (1, 1, 2.25)):
        record.add_edge_step(e, t, {"loss": loss, "accuracy": 0.1 * t})
    for i, (e, t, loss) in enumerate(((0, 0, 3.0), (1, 0, 2.75), (0, 2, 2.5))):
        record.add_cloud_step(e, t, {"loss": loss, "accuracy": 0.5, "step_s": 0.25, "done_at": 100.0 + i})
    return record


def test_the_metrics_csv_has_a_row_per_edge_step_with_the_cloud_step_that_trained_on_it():
    lines = metrics_csv(two_edge_record()).splitlines()
    assert lines[0] == ",".join(METRICS_COLUMNS)
    assert lines[1:] == [
        "0,0,2.0,0.0,,0,3.0,0.5,0.25,100.0",
        "0,1,1.5,0.1,,,,,,",
        "0,2,1.0,0.2,,2,2.5,0.5,0.25,102.0",
        "1,0,2.5,0.0,,1,2.75,0.5,0.25,101.0",
        "1,1,2.25,0.1,,,,,,",
    ]


def test_a_record_written_before_done_at_reads_with_nan_at_every_cloud_step():
    old = two_edge_record().to_json()
    del old["cloud"]["done_at"]
    read = RunRecord.from_json(old)
    assert len(read.cloud["done_at"]) == 3 and all(math.isnan(v) for v in read.cloud["done_at"])
    assert read.cloud["loss"] == [3.0, 2.75, 2.5]


def test_a_cut_keeps_the_steps_before_it_and_a_join_puts_them_back():
    record = two_edge_record()
    cut = record.cut(1, cloud_steps=2)  # the cloud had taken 2 steps when the checkpoint's state was saved
    assert [e["step"] for e in cut.edges] == [[0], [0]]
    assert cut.cloud["step"] == [0, 0]
    later = RunRecord(
        [{k: [v for v, t in zip(e[k], e["step"], strict=False) if t >= 1] for k in e} for e in record.edges],
        {k: v[2:] for k, v in record.cloud.items()},
    )
    assert cut.joined(later).to_json() == {**record.to_json()}
    assert RunRecord.from_json(record.to_json()).to_json() == record.to_json()
    record.forget_edge_steps(0, 1)  # a restarted edge recomputes from step 1
    assert record.edges[0]["step"] == [0] and record.delivered(0) == {0, 2}


@pytest.mark.parametrize(
    "side, edge, words",
    [
        ("edge", None, "the edge loss is nan at step 3"),
        ("edge", 1, "the edge loss of edge 1 is nan at step 3"),
        ("cloud", 0, "the cloud loss on edge 0's payload is nan at step 3"),
    ],
)
def test_a_non_finite_loss_names_side_edge_and_step(side, edge, words):
    check_finite(side, 3, 1.25, edge=edge)  # finite: nothing happens
    with pytest.raises(DivergenceError, match=words):
        check_finite(side, 3, math.nan, edge=edge)


def test_the_link_clock_serialises_transfers_and_overlaps_their_latency():
    """1 Mbit/s and 100 ms: 12,500 bytes take 0.1 s on the wire and arrive 0.1 s after their last bit;
    the second transfer waits for the wire, not for the first one's latency."""
    clock = LinkClock(custom_link(1.0, latency_ms=100.0))
    assert clock.transmit(12_500, now=10.0) == pytest.approx(10.2)
    assert clock.transmit(12_500, now=10.05) == pytest.approx(10.3)  # the wire is busy until 10.1
    assert clock.transmit(12_500, now=11.0) == pytest.approx(11.2)  # idle wire: from now
    scaled = LinkClock(custom_link(1.0, latency_ms=100.0), time_scale=0.5)
    assert scaled.transmit(12_500, now=0.0) == pytest.approx(0.1)


def test_the_edge_buffer_holds_payloads_while_the_link_is_down_and_drops_the_oldest():
    link = BufferedLink(LinkClock(custom_link(8.0), outages=[(2, 6)]), capacity=2)  # 1 byte per microsecond
    assert link.send(0, 1000, now=0.0) == ([(0, pytest.approx(0.001))], [])
    assert link.send(1, 1000, now=1.0) == ([(1, pytest.approx(1.001))], [])
    assert link.send(2, 1000, now=2.0) == ([], []) and link.send(3, 1000, now=3.0) == ([], [])
    assert link.send(4, 1000, now=4.0) == ([], [2])  # the buffer holds 2: the oldest goes
    assert link.send(5, 1000, now=5.0) == ([], [3]) and link.held == 2
    released, dropped = link.send(6, 1000, now=6.0)  # up again: the buffered ones first, in step order
    assert [t for t, _ in released] == [4, 5, 6] and dropped == [] and link.held == 0
    assert [at for _, at in released] == pytest.approx([6.001, 6.002, 6.003])
    tail = BufferedLink(LinkClock(custom_link(8.0), outages=[(1, 99)]), capacity=4)
    tail.send(0, 1000, now=0.0)
    tail.send(1, 1000, now=1.0)
    assert [t for t, _ in tail.close(now=2.0)] == [1]  # an outage past the end ends with the stream


@pytest.mark.slow
def test_a_format1_checkpoint_of_the_in_process_runner_resumes_to_the_uninterrupted_end(tmp_path, digits):
    """tests/data/format1/train: step 3 of 6, written by the code before the run record (flat config,
    "mode" and "metrics" in its metadata)."""
    shutil.copytree(FORMAT1 / "train", tmp_path / "train")
    with RunCheckpoints(tmp_path / "train", read_only=True) as checkpoints:
        meta = read_meta(checkpoints.read_meta())
    assert (meta["format"], meta["scheme"], meta["schedule"], meta["step"]) == (2, "hierarchical", "sequential", 3)
    setup = train.build(CONFIG, digits)
    resumed = train.train(setup, schedule="sequential", progress=False, checkpoint_dir=tmp_path / "train", resume=True)
    straight = train.train(setup, schedule="sequential", progress=False)
    assert resumed.start_step == 3
    for a, b in zip(
        jax.tree.leaves((resumed.edge_state, resumed.cloud_state)),
        jax.tree.leaves((straight.edge_state, straight.cloud_state)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    for key in ("loss", "accuracy"):  # the history before step 3 came from the format-1 metadata
        np.testing.assert_array_equal(resumed.edge_metrics[key], straight.edge_metrics[key])
        np.testing.assert_array_equal(resumed.cloud_metrics[key], straight.cloud_metrics[key])


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="the cluster runner needs the ray extra")
def test_a_format1_checkpoint_of_the_ray_runner_resumes_to_the_uninterrupted_end(local_ray, tmp_path, digits):
    """tests/data/format1/cluster: two edges in round robin, step 3 of 6 per edge, written by the code
    before the run record ("reports" and "taken" in its metadata, the flow in its cluster settings)."""
    shutil.copytree(FORMAT1 / "cluster", tmp_path / "cluster")
    config = dataclasses.replace(CONFIG, backend="ray", edges=2)
    resumed = cluster.run(config, digits, checkpoint_dir=tmp_path / "cluster", resume=True)
    straight = cluster.run(config, digits)
    assert resumed.resumed_cloud_steps == 6
    assert resumed.cloud_order == straight.cloud_order == [(e, t) for t in range(6) for e in range(2)]
    assert resumed.cloud_losses == straight.cloud_losses
    assert [e["loss"] for e in resumed.record.edges] == [e["loss"] for e in straight.record.edges]
    assert [(e.edge_accuracy, e.cloud_accuracy) for e in resumed.edges] == [
        (e.edge_accuracy, e.cloud_accuracy) for e in straight.edges
    ]
