"""The Ray cluster runner: shards, checks, and real worker processes on a local cluster (loopback)."""

import dataclasses
import importlib.util
import os
import re

import numpy as np
import pytest
from processes import processes_with_token, wait_until_gone

from hier_jax import cluster, train
from hier_jax.cluster import driver
from hier_jax.config import ExperimentConfig, optimizers
from hier_jax.errors import DivergenceError, ResumeMismatchError, RunInterrupted, UserError
from hier_jax.flags import replace_paths
from hier_jax.link import QueueChannel
from hier_jax.models import ExitHeadConfig
from hier_jax.run.record import METRICS_COLUMNS

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
)


def test_iid_shards_are_disjoint_near_equal_and_cover_everything():
    labels = np.repeat(np.arange(10, dtype=np.int32), 31)
    parts = cluster.shard_indices(labels, 3, seed=1)
    assert sorted(len(p) for p in parts) == [103, 103, 104]
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
    assert all(np.array_equal(a, b) for a, b in zip(parts, cluster.shard_indices(labels, 3, seed=1), strict=False))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, cluster.shard_indices(labels, 3, seed=2), strict=False))


def test_dirichlet_shards_skew_the_labels_and_still_cover_everything():
    labels = np.repeat(np.arange(10, dtype=np.int32), 100)
    iid = cluster.shard_indices(labels, 4, seed=0)
    skewed = cluster.shard_indices(labels, 4, dirichlet=0.1, seed=0)
    assert np.array_equal(np.sort(np.concatenate(skewed)), np.arange(len(labels)))

    def top_class_share(parts):  # the share of each edge's examples that its most common class has
        return np.mean([np.bincount(labels[p], minlength=10).max() / max(len(p), 1) for p in parts if len(p)])

    assert top_class_share(iid) < 0.15 and top_class_share(skewed) > 0.3  # IID: about 1/10


@pytest.mark.parametrize(
    "change, message",
    [
        ({"edges": 0}, "--edges 0 is invalid"),
        ({"order": "random"}, "--order 'random' is invalid; valid: async, round_robin"),
        ({"dirichlet": -1.0}, "--dirichlet -1.0 is invalid"),
        ({"kill_edges": ((2, 0),)}, "--kill-edge '2:0' is invalid; valid: EDGE:STEP with EDGE in 0..1"),
        ({"timeout_s": 0}, "--timeout 0 is invalid"),
        ({"max_restarts": -1}, "--max-restarts -1 is invalid; valid: an integer >= 0"),
    ],
)
def test_bad_cluster_settings_fail_before_anything_starts(change, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cluster.validate_cluster(dataclasses.replace(cluster.ClusterConfig(edges=2), **change))


def test_a_shard_smaller_than_a_batch_is_refused_before_ray_starts(digits):
    with pytest.raises(UserError, match="edge .'s shard has .* fewer than one batch of 512"):
        cluster.run(dataclasses.replace(CONFIG, batch_size=512), digits, cluster.ClusterConfig(edges=3))


# --- real workers ------------------------------------------------------------------------------------


def needs_ray(test):
    """A test that starts Ray workers: slow, and skipped without the ray extra."""
    missing = importlib.util.find_spec("ray") is None
    return pytest.mark.slow(pytest.mark.skipif(missing, reason="the cluster runner needs the ray extra")(test))


@needs_ray
def test_one_edge_in_its_own_process_trains_exactly_what_the_in_process_runner_trains(local_ray, digits):
    """The workers run the library's own steps: one edge, round robin, the same config and data give
    the in-process sequential run's cloud losses and both exits' accuracies, bit for bit."""
    result = cluster.run(CONFIG, digits, cluster.ClusterConfig(edges=1))
    setup = train.build(CONFIG, digits)
    local = train.train(setup, schedule="sequential", progress=False)
    accuracy = train.evaluate(setup, local)
    assert result.cloud_order == [(0, t) for t in range(CONFIG.max_steps)]
    assert result.cloud_losses == local.cloud_metrics["loss"].tolist()
    assert result.record.edges[0]["loss"] == local.edge_metrics["loss"].tolist()
    assert result.record.edges[0]["accuracy"] == local.edge_metrics["accuracy"].tolist()
    assert result.record.cloud["accuracy"] == local.cloud_metrics["accuracy"].tolist()
    assert (result.edges[0].edge_accuracy, result.edges[0].cloud_accuracy) == (
        accuracy["edge_accuracy"],
        accuracy["cloud_accuracy"],
    )
    report = result.edges[0]
    assert (report.sent, report.delivered, report.dropped, report.lost) == (6, 6, 0, False)
    assert report.max_in_flight <= CONFIG.queue_size + 1  # backpressure: the edge is never further ahead
    # Pinned: the edge to core 0 and the cloud to the last core, each process on its own (2 cores here).
    cores = sorted(os.sched_getaffinity(0))
    assert result.placement["edge 0"].endswith(f"cores {[cores[0]]}")
    assert result.placement["cloud"].endswith(f"cores {[cores[-1]]}")
    assert result.precision == setup.precision == "fp32"  # "auto", resolved once for every worker


TWO_EDGES = dataclasses.replace(CONFIG, checkpoint_every=3)
TWO_EDGES_SYNCED = cluster.ClusterConfig(edges=2, edge_sync=3)


@pytest.fixture(scope="module")
def two_edges_uninterrupted(local_ray, digits):
    """Two edges, models averaged every 3 steps: the run that faulty ones must end as (shared, as
    each cluster run costs tens of seconds on two cores)."""
    return cluster.run(TWO_EDGES, digits, TWO_EDGES_SYNCED)


@needs_ray
def test_round_robin_is_reproducible_resumes_bit_for_bit_and_edge_sync_averages(
    two_edges_uninterrupted, digits, tmp_path
):
    """Two edges, models averaged every 3 steps, checkpoints every 3: a run whose cloud dies at its
    step 8 (after the checkpoint at edge step 3, cloud step 6), resumed from that checkpoint, ends
    exactly as the run that was never stopped."""
    config, settings, first = TWO_EDGES, TWO_EDGES_SYNCED, two_edges_uninterrupted
    with pytest.raises(cluster.ClusterError, match="the cloud worker died at its step 8"):
        cluster.run(config, digits, dataclasses.replace(settings, kill_cloud=8), checkpoint_dir=tmp_path)
    again = cluster.run(config, digits, settings, checkpoint_dir=tmp_path, resume=True)
    assert first.cloud_order == again.cloud_order == [(e, t) for t in range(6) for e in range(2)]
    # Throughput counts this run's steps over this run's time, not the steps taken before the resume.
    assert (first.resumed_cloud_steps, again.resumed_cloud_steps) == (0, 6)
    assert again.cloud_steps_per_s == pytest.approx(6 / again.wall_s)
    assert first.cloud_losses == again.cloud_losses
    assert [(e.edge_accuracy, e.cloud_accuracy, e.delivered) for e in first.edges] == [
        (e.edge_accuracy, e.cloud_accuracy, e.delivered) for e in again.edges
    ]
    with pytest.raises(ResumeMismatchError, match="--edge-sync 3, not 2"):
        cluster.run(config, digits, dataclasses.replace(settings, edge_sync=2), checkpoint_dir=tmp_path, resume=True)
    # Averaged at steps 3 and 6 (the last): both edges end with one model, so the same exits.
    assert first.edges[0].edge_accuracy == first.edges[1].edge_accuracy
    assert first.edges[0].cloud_accuracy == first.edges[1].cloud_accuracy
    assert first.record.edges[0]["loss"] != first.record.edges[1]["loss"]  # trained apart between, on their own shards


@needs_ray
def test_a_dead_edge_is_survived_and_a_dead_cloud_stops_the_run(local_ray, digits):
    settings = cluster.ClusterConfig(edges=2, order="async", kill_edges=((1, 3),), timeout_s=120)
    result = cluster.run(dataclasses.replace(CONFIG, schedule="sequential"), digits, settings)
    survivor, lost = result.edges
    assert survivor.max_in_flight == 1  # sequential: never a step ahead of the cloud
    assert not survivor.lost and survivor.delivered == 6 and survivor.cloud_accuracy is not None
    assert lost.lost and lost.edge_accuracy is None and lost.last_delivered_step < 3
    assert lost.sent == lost.delivered + lost.dropped
    assert sorted(t for e, t in result.cloud_order if e == 0) == list(range(6))
    with pytest.raises(cluster.ClusterError, match="the cloud worker died at its step 2"):
        cluster.run(CONFIG, digits, cluster.ClusterConfig(edges=1, kill_cloud=2, timeout_s=120))


@needs_ray
def test_a_restarted_edge_replays_from_the_checkpoint_and_the_run_ends_as_if_it_never_died(
    two_edges_uninterrupted, digits, tmp_path
):
    """Edge 1 dies at its step 4 and comes back from the checkpoint at step 3 (taken after the
    models were averaged there), recomputing the steps the cloud already has without sending them
    again; in round-robin order every loss and accuracy then equals the run without the fault."""
    clean = two_edges_uninterrupted
    faulty = cluster.run(
        TWO_EDGES,
        digits,
        dataclasses.replace(TWO_EDGES_SYNCED, kill_edges=((1, 4),), max_restarts=1),
        checkpoint_dir=tmp_path,
    )
    assert faulty.cloud_order == clean.cloud_order
    assert faulty.cloud_losses == clean.cloud_losses
    assert [e["loss"] for e in faulty.record.edges] == [e["loss"] for e in clean.record.edges]
    assert [(e.edge_accuracy, e.cloud_accuracy) for e in faulty.edges] == [
        (e.edge_accuracy, e.cloud_accuracy) for e in clean.edges
    ]
    back = faulty.edges[1]
    assert (back.restarts, back.lost, back.sent, back.delivered, back.dropped) == (1, False, 6, 6, 0)
    assert faulty.edges[0].restarts == 0
    assert faulty.placement["edge 1"] != clean.placement["edge 1"]  # a new process (pid)


@needs_ray
def test_without_a_checkpoint_a_restarted_edge_replays_from_its_initial_state(local_ray, digits):
    settings = cluster.ClusterConfig(edges=1, order="async", kill_edges=((0, 2),), max_restarts=1)
    result = cluster.run(CONFIG, digits, settings)
    local = train.train(train.build(CONFIG, digits), schedule="sequential", progress=False)
    assert result.cloud_losses == local.cloud_metrics["loss"].tolist()
    assert result.record.edges[0]["loss"] == local.edge_metrics["loss"].tolist()
    assert result.record.edges[0]["accuracy"] == local.edge_metrics["accuracy"].tolist()
    assert result.record.cloud["accuracy"] == local.cloud_metrics["accuracy"].tolist()
    assert (result.edges[0].restarts, result.edges[0].lost, result.edges[0].delivered) == (1, False, 6)
    # Step 0 at least is recomputed from the initial state; step 1 too unless its reply died with the
    # process, in which case the new process sends it (the equalities above hold either way).
    assert result.edges[0].replayed >= 1


@needs_ray
def test_ctrl_c_stops_the_workers_keeps_the_checkpoint_and_the_run_resumes_from_it(
    local_ray, digits, tmp_path, monkeypatch
):
    """Ctrl-C arriving just after the checkpoint at step 2 (KeyboardInterrupt in the driver, as the
    SIGINT handler raises it): one RunInterrupted naming that checkpoint, no worker left running, and
    --resume then ends exactly as the in-process run that was never stopped."""
    config = dataclasses.replace(CONFIG, checkpoint_every=2)
    save = driver._save

    def save_then_interrupt(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(driver, "_save", save_then_interrupt)
    before = processes_with_token(os.environ["RAY_AUTH_TOKEN"])
    with pytest.raises(RunInterrupted, match=f"interrupted after step 2; saved {tmp_path / '2'}"):
        cluster.run(config, digits, cluster.ClusterConfig(edges=1), checkpoint_dir=tmp_path)
    assert not wait_until_gone(processes_with_token(os.environ["RAY_AUTH_TOKEN"]) - before)
    monkeypatch.setattr(driver, "_save", save)
    resumed = cluster.run(config, digits, cluster.ClusterConfig(edges=1), checkpoint_dir=tmp_path, resume=True)
    local = train.train(train.build(config, digits), schedule="sequential", progress=False)
    assert resumed.resumed_cloud_steps == 2
    assert resumed.cloud_losses == local.cloud_metrics["loss"].tolist()


@pytest.mark.parametrize(
    "module_name, argv, expected",
    [
        ("cluster", ["--edges", "0"], "--edges 0 is invalid"),
        ("cluster", ["--flow", "eager"], "--schedule 'eager' is invalid"),
        ("cluster", ["--link", "3g,wifi,3g", "--edges", "2"], "one preset, or one per edge (2)"),
        ("cluster", ["--kill-edge", "x"], "argument --kill-edge: 'x' is invalid; valid: EDGE:STEP"),
        ("cluster", ["--kill-edge", "3:1", "--edges", "2"], "--kill-edge '3:1' is invalid"),
        ("cluster", ["--timeout", "0"], "--timeout 0.0 is invalid"),
        ("cluster", ["--scheme", "split_learning"], "the Ray workers train the hierarchical scheme"),
        ("cluster", ["--model", "alexnet"], "--model 'alexnet' is invalid"),
        ("cluster", ["--resume"], "--resume needs the --out of the run to continue"),
        ("cluster", ["--max-restarts", "-1"], "--max-restarts -1 is invalid"),
        ("bench_cluster", ["--splits", "layer9"], "--splits 'layer9' is invalid"),
        ("bench_cluster", ["--steps", "0"], "--steps 0 is invalid; valid: an integer >= 2"),
    ],
)
def test_the_cluster_experiments_refuse_bad_flags_in_one_line_before_any_work(
    monkeypatch, capsys, module_name, argv, expected
):
    import importlib

    module = importlib.import_module(f"experiments.{module_name}")

    def refuse(*args, **kwargs):
        raise AssertionError("loaded data or started workers before checking the arguments")

    monkeypatch.setattr(module, "load_dataset", refuse)
    monkeypatch.setattr(cluster, "run", refuse)
    with pytest.raises(SystemExit) as stopped:
        module.main(argv)
    lines = capsys.readouterr().err.splitlines()
    assert stopped.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"experiments.{module_name}: error: ") and expected in lines[0], lines[0]


@needs_ray
def test_the_experiment_writes_its_tables_and_figure(local_ray, tmp_path):
    from experiments import cluster as experiment

    summary = experiment.main(
        ["--edges", "1", "--max-steps", "3", "--width", "4", "--head-channels", "8", "--out", str(tmp_path)]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(experiment.OUTPUTS)
    assert summary["cloud_steps"] == 3 and summary["edges"][0]["delivered"] == 3
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0] == ",".join(METRICS_COLUMNS) and len(rows) == 1 + 3  # the layout experiments.train writes
    # The run's worker processes end with it, while the cluster goes on.
    workers = {int(re.search(r"pid (\d+)", where).group(1)) for where in summary["placement"].values()}
    assert len(workers) == 2 and not wait_until_gone(workers)


@needs_ray
def test_a_non_finite_loss_stops_the_ray_run_naming_side_edge_and_step(local_ray, digits, tmp_path):
    """The driver checks every loss that comes back, as the in-process runner does: a learning rate
    of 1e6 blows the run up within a few steps, and the error names the side, the edge and the step,
    keeps the last checkpoint, and leaves no worker behind."""
    config = dataclasses.replace(CONFIG, **optimizers(learning_rate=1e6), max_steps=12, checkpoint_every=1)
    before = processes_with_token(os.environ["RAY_AUTH_TOKEN"])
    with pytest.raises(DivergenceError) as diverged:
        cluster.run(config, digits, cluster.ClusterConfig(edges=2), checkpoint_dir=tmp_path)
    error = diverged.value
    assert error.side in ("edge", "cloud") and error.edge in (0, 1) and 0 <= error.step < 12
    which = f" of edge {error.edge}" if error.side == "edge" else f" on edge {error.edge}'s payload"
    assert f"the {error.side} loss{which} is {error.value} at step {error.step}" in str(error)
    assert error.last_checkpoint is None or error.last_checkpoint.parent == tmp_path.absolute()
    assert not wait_until_gone(processes_with_token(os.environ["RAY_AUTH_TOKEN"]) - before)


class DroppingChannel(QueueChannel):
    """A queue that loses the given steps' payloads: the in-process twin of an outage's drops."""

    def __init__(self, dropped: set[int]):
        super().__init__(capacity=8)
        self.dropped = dropped

    def send(self, t, payload, stop):
        return True if t in self.dropped else super().send(t, payload, stop)


@needs_ray
def test_an_outage_on_the_ray_backend_buffers_drops_oldest_and_counts_every_payload(local_ray, digits):
    """The link is down while the edge sends steps 2..5 and its buffer holds 2: steps 2 and 3 are
    dropped (the oldest), 4 and 5 reach the cloud when the link is back (at step 6), every payload is
    delivered or counted as dropped, and the cloud's losses are those of an in-process run that loses
    the same two payloads."""
    config = replace_paths(
        CONFIG,
        {"max_steps": 8, "link.presets": ("4g",), "link.time_scale": 1e-3, "link.outages": ((2, 6),), "link.buffer": 2},
    )
    result = cluster.run(config, digits, cluster.ClusterConfig(edges=1))
    edge = result.edges[0]
    assert edge.link_dropped == [2, 3] and (edge.sent, edge.delivered, edge.dropped) == (8, 6, 2)
    assert result.cloud_order == [(0, t) for t in (0, 1, 4, 5, 6, 7)]
    assert len(result.record.edges[0]["loss"]) == 8  # the edge trained through the outage
    local = train.train(
        train.build(dataclasses.replace(config, link=CONFIG.link), digits),
        schedule="pipelined",
        channel=DroppingChannel({2, 3}),
        progress=False,
    )
    assert local.cloud_steps.tolist() == [0, 1, 4, 5, 6, 7]
    assert result.cloud_losses == local.cloud_metrics["loss"].tolist()
    assert result.record.edges[0]["loss"] == local.edge_metrics["loss"].tolist()


def test_a_held_payload_takes_its_round_robin_turn_when_its_link_is_back():
    """Round robin's order with an outage on edge 1 from step 1 to 3: its steps 1 and 2 come just
    before its step 3, so no turn ever waits on a payload that a barrier holds back."""
    from hier_jax.cluster.loop import Driver, edge_links

    config = replace_paths(CONFIG, {"link.presets": ("4g", "4g"), "link.outages": ((1, 3),)})
    driver = Driver.__new__(Driver)  # only the order: no workers
    driver.steps, driver.links = 5, edge_links(config, 2)
    driver.links[0] = None  # edge 0 on an instant link
    turns = sorted(((e, t) for t in range(5) for e in range(2)), key=driver.turn_order)
    assert turns == [(0, 0), (1, 0), (0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3), (0, 4), (1, 4)]
