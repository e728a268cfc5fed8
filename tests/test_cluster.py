"""The Ray backend: the same scheduler as the thread backend over real worker processes on a local
cluster (loopback), and the faults only Ray has (joining, tokens, a killed driver)."""

import _thread
import dataclasses
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from processes import processes_with_token, wait_until_gone

from hier_jax import cluster, train
from hier_jax.cluster import host
from hier_jax.config import ExperimentConfig, optimizers, validate
from hier_jax.data.shards import shard_indices
from hier_jax.errors import ConfigError, DivergenceError, ResumeMismatchError, RunInterrupted, UserError, WorkerError
from hier_jax.flags import replace_paths
from hier_jax.models import ExitHeadConfig
from hier_jax.run import command
from hier_jax.run.checkpoint import RunCheckpoints
from hier_jax.run.record import METRICS_COLUMNS

REPO = Path(__file__).resolve().parents[1]
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
    parts = shard_indices(labels, 3, seed=1)
    assert sorted(len(p) for p in parts) == [103, 103, 104]
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
    assert all(np.array_equal(a, b) for a, b in zip(parts, shard_indices(labels, 3, seed=1), strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, shard_indices(labels, 3, seed=2), strict=True))


def test_dirichlet_shards_skew_the_labels_and_still_cover_everything():
    labels = np.repeat(np.arange(10, dtype=np.int32), 100)
    iid = shard_indices(labels, 4, seed=0)
    skewed = shard_indices(labels, 4, dirichlet=0.1, seed=0)
    assert np.array_equal(np.sort(np.concatenate(skewed)), np.arange(len(labels)))

    def top_class_share(parts):  # the share of each edge's examples that its most common class has
        return np.mean([np.bincount(labels[p], minlength=10).max() / max(len(p), 1) for p in parts if len(p)])

    assert top_class_share(iid) < 0.15 and top_class_share(skewed) > 0.3  # IID: about 1/10


@pytest.mark.parametrize(
    "change, message",
    [
        ({"edges": 0}, "--edges 0 is invalid"),
        ({"order": "random"}, "--order 'random' is invalid; valid: round_robin, async"),
        ({"backend": "mpi"}, "--backend 'mpi' is invalid; valid: threads, ray"),
        ({"dirichlet": -1.0}, "--dirichlet -1.0 is invalid"),
        ({"kill_edges": ((2, 0),)}, "--kill-edge '2:0' is invalid; valid: EDGE:STEP with EDGE in 0..1"),
        ({"timeout_s": 0}, "--timeout 0 is invalid"),
        ({"max_restarts": -1}, "--max-restarts -1 is invalid; valid: an integer >= 0"),
        ({"scheme": "split_learning"}, "--edges 2 is invalid; valid: 1 with --scheme split_learning"),
    ],
)
def test_bad_topologies_fail_before_anything_starts(change, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(dataclasses.replace(CONFIG, **{"edges": 2, **change}))


def test_a_shard_smaller_than_a_batch_is_refused_before_ray_starts(digits, monkeypatch):
    monkeypatch.setattr(cluster.launch, "start_ray", lambda *a, **k: pytest.fail("Ray started"))
    with pytest.raises(UserError, match="edge .'s shard has .* fewer than one batch of 512"):
        cluster.run(dataclasses.replace(CONFIG, batch_size=512, edges=3), digits)
    with pytest.raises(UserError, match="edge .'s shard has .* fewer than one batch of 512"):
        train.build(dataclasses.replace(CONFIG, batch_size=512, edges=3), digits)


def test_a_missing_token_for_a_cluster_to_join_is_one_line_naming_it(monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setattr(host, "TOKEN_FILE", "/nonexistent/auth_token")
    with pytest.raises(UserError, match="needs its token: set RAY_AUTH_TOKEN"):
        host.start_ray(cluster.RayConfig(address="127.0.0.1:6379"), num_cpus=1)


def test_ray_flags_without_the_ray_backend_are_refused(monkeypatch, capsys):
    from experiments import train as experiment

    monkeypatch.setattr(command, "load_dataset", lambda *a, **k: pytest.fail("loaded data"))
    with pytest.raises(SystemExit) as stopped:
        experiment.main(["--address", "head:6379"])
    assert stopped.value.code == 2
    assert "--address places Ray workers: it needs --backend ray" in capsys.readouterr().err


def test_an_out_left_by_an_interrupted_run_is_refused_before_any_worker_starts(tmp_path, monkeypatch, capsys):
    """Only checkpoints/ inside (a run stopped before it wrote its summary): still a run."""
    from experiments import cluster as experiment

    (tmp_path / "checkpoints" / "10").mkdir(parents=True)
    monkeypatch.setattr(command, "load_dataset", lambda *a, **k: pytest.fail("loaded data"))
    monkeypatch.setattr(cluster, "run", lambda *a, **k: pytest.fail("started workers"))
    with pytest.raises(SystemExit) as stopped:
        experiment.main(["--out", str(tmp_path)])
    line = capsys.readouterr().err.strip()
    assert stopped.value.code == 2 and "\n" not in line
    assert f"--out {tmp_path} already holds a run (checkpoints); pass --resume {tmp_path} to continue it" in line


@pytest.mark.parametrize(
    "module_name, argv, expected",
    [
        ("cluster", ["--edges", "0"], "--edges 0 is invalid"),
        ("cluster", ["--flow", "eager"], "--schedule 'eager' is invalid"),
        ("cluster", ["--link", "3g,wifi,3g", "--edges", "2"], "one preset, or one per edge (2)"),
        ("cluster", ["--kill-edge", "x"], "argument --kill-edge: 'x' is invalid; valid: EDGE:STEP"),
        ("cluster", ["--kill-edge", "3:1", "--edges", "2"], "--kill-edge '3:1' is invalid"),
        ("cluster", ["--timeout", "0"], "--timeout 0.0 is invalid"),
        ("cluster", ["--model", "alexnet"], "--model 'alexnet' is invalid"),
        ("cluster", ["--resume"], "--resume needs the run's directory: --resume DIR (or its --out)"),
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

    monkeypatch.setattr(command, "load_dataset", refuse)
    if hasattr(module, "load_dataset"):
        monkeypatch.setattr(module, "load_dataset", refuse)
    monkeypatch.setattr(cluster, "run", refuse)
    with pytest.raises(SystemExit) as stopped:
        module.main(argv)
    lines = capsys.readouterr().err.splitlines()
    assert stopped.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"experiments.{module_name}: error: ") and expected in lines[0], lines[0]


# --- real workers ------------------------------------------------------------------------------------


def needs_ray(test):
    """A test that starts Ray workers: slow, and skipped without the ray extra."""
    missing = importlib.util.find_spec("ray") is None
    return pytest.mark.slow(pytest.mark.skipif(missing, reason="the Ray backend needs the ray extra")(test))


def on_threads(config: ExperimentConfig, digits, **kwargs):
    """The same run on the thread backend."""
    return train.train(train.build(dataclasses.replace(config, backend="threads"), digits), progress=False, **kwargs)


@needs_ray
def test_one_edge_in_its_own_process_trains_exactly_what_the_in_process_runner_trains(local_ray, digits):
    """The workers run the library's own steps: one edge, round robin, the same config and data give
    the in-process sequential run's cloud losses and both exits' accuracies, bit for bit."""
    result = cluster.run(CONFIG, digits)
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
    assert report.max_in_flight <= CONFIG.queue_size + 1  # back-pressure: the edge is never further ahead
    assert result.payload_bytes == train.payload_nbytes(setup, "hierarchical")  # measured == from the shapes
    # Pinned: the edge to core 0 and the cloud to the last core, each process on its own (2 cores here).
    cores = sorted(os.sched_getaffinity(0))
    assert result.placement["edge 0"].endswith(f"cores {[cores[0]]}")
    assert result.placement["cloud"].endswith(f"cores {[cores[-1]]}")
    assert result.precision == setup.precision == "fp32"  # "auto", resolved once for every worker


TWO_EDGES = dataclasses.replace(CONFIG, checkpoint_every=3, edges=2, edge_sync=3)


@pytest.fixture(scope="module")
def two_edges_uninterrupted(local_ray, digits):
    """Two edges, models averaged every 3 steps: the run that faulty ones must end as (shared, as
    each Ray run costs tens of seconds on two cores)."""
    return cluster.run(TWO_EDGES, digits)


@needs_ray
def test_two_edges_in_round_robin_train_the_same_on_both_backends(two_edges_uninterrupted, digits):
    """The scheduler is the same code on both backends and the workers run the same compiled steps on
    the same shards, so two edges in round robin with averaging agree bit for bit: every loss, both
    exits of each edge, and the averaged models."""
    ray_run, local = two_edges_uninterrupted, on_threads(TWO_EDGES, digits, evaluate=True)
    assert local.cloud_order == ray_run.cloud_order == [(e, t) for t in range(6) for e in range(2)]
    assert local.cloud_losses == ray_run.cloud_losses
    assert [e["loss"] for e in local.record.edges] == [e["loss"] for e in ray_run.record.edges]
    assert [(e.edge_accuracy, e.cloud_accuracy) for e in local.edges] == [
        (e.edge_accuracy, e.cloud_accuracy) for e in ray_run.edges
    ]
    assert [(e.examples, e.sent, e.delivered) for e in local.edges] == [(719, 6, 6), (718, 6, 6)]


@needs_ray
def test_round_robin_is_reproducible_resumes_bit_for_bit_and_edge_sync_averages(
    two_edges_uninterrupted, digits, tmp_path
):
    """Two edges, models averaged every 3 steps, checkpoints every 3: a run whose cloud dies at its
    step 8 (after the checkpoint at edge step 3, cloud step 6), resumed from that checkpoint, ends
    exactly as the run that was never stopped."""
    first = two_edges_uninterrupted
    with pytest.raises(WorkerError, match="the cloud worker died at its step 8"):
        cluster.run(dataclasses.replace(TWO_EDGES, kill_cloud=8), digits, checkpoint_dir=tmp_path)
    again = cluster.run(TWO_EDGES, digits, checkpoint_dir=tmp_path, resume=True)
    assert first.cloud_order == again.cloud_order == [(e, t) for t in range(6) for e in range(2)]
    # Throughput counts this run's steps over this run's time, not the steps taken before the resume.
    assert (first.resumed_cloud_steps, again.resumed_cloud_steps) == (0, 6)
    assert again.cloud_steps_per_s == pytest.approx(6 / again.wall_s)
    assert first.cloud_losses == again.cloud_losses
    assert [(e.edge_accuracy, e.cloud_accuracy, e.delivered) for e in first.edges] == [
        (e.edge_accuracy, e.cloud_accuracy, e.delivered) for e in again.edges
    ]
    with pytest.raises(ResumeMismatchError, match=re.escape("--edge-sync (2 here, 3 in the checkpoint)")):
        cluster.run(dataclasses.replace(TWO_EDGES, edge_sync=2), digits, checkpoint_dir=tmp_path, resume=True)
    # Averaged at steps 3 and 6 (the last): both edges end with one model, so the same exits.
    assert first.edges[0].edge_accuracy == first.edges[1].edge_accuracy
    assert first.edges[0].cloud_accuracy == first.edges[1].cloud_accuracy
    assert first.record.edges[0]["loss"] != first.record.edges[1]["loss"]  # trained apart between, on their own shards


@needs_ray
def test_a_ray_checkpoint_resumes_on_the_thread_backend(two_edges_uninterrupted, digits, tmp_path):
    """One checkpoint schema for both backends: a Ray run stopped at its cloud step 8 finishes in
    this process, exactly as the Ray run that never stopped."""
    with pytest.raises(WorkerError):
        cluster.run(dataclasses.replace(TWO_EDGES, kill_cloud=8), digits, checkpoint_dir=tmp_path)
    again = on_threads(TWO_EDGES, digits, checkpoint_dir=tmp_path, resume=True, evaluate=True)
    assert again.start_step == 3
    assert again.cloud_losses == two_edges_uninterrupted.cloud_losses
    assert [e.cloud_accuracy for e in again.edges] == [e.cloud_accuracy for e in two_edges_uninterrupted.edges]


@needs_ray
def test_a_dead_edge_is_survived_and_a_dead_cloud_stops_the_run(local_ray, digits):
    config = dataclasses.replace(
        CONFIG, schedule="sequential", edges=2, order="async", kill_edges=((1, 3),), timeout_s=120
    )
    result = cluster.run(config, digits)
    survivor, lost = result.edges
    assert survivor.max_in_flight == 1  # sequential: never a step ahead of the cloud
    assert not survivor.lost and survivor.delivered == 6 and survivor.cloud_accuracy is not None
    assert lost.lost and lost.edge_accuracy is None and lost.last_delivered_step < 3
    assert lost.sent == lost.delivered + lost.dropped
    assert sorted(t for e, t in result.cloud_order if e == 0) == list(range(6))
    with pytest.raises(WorkerError, match="the cloud worker died at its step 2"):
        cluster.run(dataclasses.replace(CONFIG, kill_cloud=2, timeout_s=120), digits)


@needs_ray
def test_a_restarted_edge_replays_from_the_checkpoint_and_the_run_ends_as_if_it_never_died(
    two_edges_uninterrupted, digits, tmp_path
):
    """Edge 1 dies at its step 4 and comes back from the checkpoint at step 3 (taken after the
    models were averaged there), recomputing the steps the cloud already has without sending them
    again; in round-robin order every loss and accuracy then equals the run without the fault."""
    clean = two_edges_uninterrupted
    faulty = cluster.run(
        dataclasses.replace(TWO_EDGES, kill_edges=((1, 4),), max_restarts=1), digits, checkpoint_dir=tmp_path
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
    config = dataclasses.replace(CONFIG, order="async", kill_edges=((0, 2),), max_restarts=1)
    result = cluster.run(config, digits)
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
    """Ctrl-C while the checkpoint at step 2 is written (SIGINT in the driver's main thread): the
    steps in flight finish, every side is brought to one step and saved there, one RunInterrupted
    names that checkpoint, no worker is left running, and a resume ends exactly as the in-process
    run that was never stopped."""
    config = dataclasses.replace(CONFIG, checkpoint_every=2, max_steps=12)  # long enough to stop mid-run
    save = RunCheckpoints.save

    def save_then_interrupt(self, step, *args, **kwargs):
        path = save(self, step, *args, **kwargs)
        if step == 2:
            _thread.interrupt_main()
        return path

    monkeypatch.setattr(RunCheckpoints, "save", save_then_interrupt)
    before = processes_with_token(os.environ["RAY_AUTH_TOKEN"])
    with pytest.raises(RunInterrupted) as stopped:
        cluster.run(config, digits, checkpoint_dir=tmp_path)
    step = stopped.value.step
    assert 2 <= step < 12 and stopped.value.checkpoint == tmp_path.absolute() / str(step)
    assert f"interrupted after step {step}; saved {tmp_path.absolute() / str(step)}" in str(stopped.value)
    assert not wait_until_gone(processes_with_token(os.environ["RAY_AUTH_TOKEN"]) - before)
    monkeypatch.setattr(RunCheckpoints, "save", save)
    resumed = cluster.run(config, digits, checkpoint_dir=tmp_path, resume=True)
    local = train.train(train.build(config, digits), schedule="sequential", progress=False)
    assert resumed.resumed_cloud_steps == step
    assert resumed.cloud_losses == local.cloud_metrics["loss"].tolist()


@needs_ray
def test_the_experiment_writes_what_experiments_train_writes(local_ray, tmp_path):
    from experiments import cluster as experiment

    summary = experiment.main(
        ["--edges", "1", "--max-steps", "3", "--width", "4", "--head-channels", "8", "--out", str(tmp_path)]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(command.OUTPUTS)
    assert summary["backend"] == "ray" and summary["cloud_steps"] == 3 and summary["edges"][0]["delivered"] == 3
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0] == ",".join(METRICS_COLUMNS) and len(rows) == 1 + 3  # the layout experiments.train writes
    # The run's worker processes end with it.
    workers = {int(re.search(r"pid (\d+)", where).group(1)) for where in summary["placement"].values()}
    assert len(workers) == 2 and not wait_until_gone(workers)


@needs_ray
def test_a_non_finite_loss_stops_the_ray_run_naming_side_edge_and_step(local_ray, digits, tmp_path):
    """The scheduler checks every loss that comes back: a learning rate of 1e6 blows the run up within
    a few steps, and the error names the side, the edge and the step, keeps the last checkpoint, and
    leaves no worker behind."""
    config = dataclasses.replace(CONFIG, **optimizers(learning_rate=1e6), max_steps=12, checkpoint_every=1, edges=2)
    before = processes_with_token(os.environ["RAY_AUTH_TOKEN"])
    with pytest.raises(DivergenceError) as diverged:
        cluster.run(config, digits, checkpoint_dir=tmp_path)
    error = diverged.value
    assert error.side in ("edge", "cloud") and error.edge in (0, 1) and 0 <= error.step < 12
    which = f" of edge {error.edge}" if error.side == "edge" else f" on edge {error.edge}'s payload"
    assert f"the {error.side} loss{which} is {error.value} at step {error.step}" in str(error)
    assert error.last_checkpoint is None or error.last_checkpoint.parent == tmp_path.absolute()
    assert not wait_until_gone(processes_with_token(os.environ["RAY_AUTH_TOKEN"]) - before)


@needs_ray
def test_an_outage_on_the_ray_backend_drops_and_counts_exactly_as_in_process(local_ray, digits):
    """The link is down while the edge sends steps 2..5 and its buffer holds 2: steps 2 and 3 are
    dropped (the oldest), 4 and 5 reach the cloud when the link is back (at step 6), every payload is
    delivered or counted as dropped, and the thread backend drops, counts and trains the same."""
    config = replace_paths(
        CONFIG,
        {"max_steps": 8, "link.presets": ("4g",), "link.time_scale": 1e-3, "link.outages": ((2, 6),), "link.buffer": 2},
    )
    result, local = cluster.run(config, digits), on_threads(config, digits)
    for run in (result, local):
        edge = run.edges[0]
        assert edge.link_dropped == [2, 3] and (edge.sent, edge.delivered, edge.dropped) == (8, 6, 2)
        assert run.cloud_order == [(0, t) for t in (0, 1, 4, 5, 6, 7)]
        assert len(run.record.edges[0]["loss"]) == 8  # the edge trained through the outage
    assert result.cloud_losses == local.cloud_losses
    assert result.record.edges[0]["loss"] == local.record.edges[0]["loss"]


def test_a_held_payload_takes_its_round_robin_turn_when_its_link_is_back():
    """Round robin's order with an outage on edge 1 from step 1 to 3: its steps 1 and 2 come just
    before its step 3, so no turn ever waits on a payload that a barrier holds back."""
    from hier_jax.run.scheduler import Scheduler, edge_links

    config = replace_paths(CONFIG, {"link.presets": ("4g", "4g"), "link.outages": ((1, 3),), "edges": 2})
    scheduler = Scheduler.__new__(Scheduler)  # only the order: no workers
    scheduler.steps, scheduler.links = 5, edge_links(config, 2)
    scheduler.links[0] = None  # edge 0 on an instant link
    turns = sorted(((e, t) for t in range(5) for e in range(2)), key=scheduler.turn_order)
    assert turns == [(0, 0), (1, 0), (0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3), (0, 4), (1, 4)]


# --- faults of the Ray backend alone, each in a process of its own ----------------------------------------


def experiment(*argv: str, token: str | None, **kwargs) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    if token is not None:
        env["RAY_AUTH_TOKEN"] = token
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.cluster", *argv],
        cwd=REPO,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kwargs,
    )


@needs_ray
@pytest.mark.parametrize("listening", [False, True], ids=["refused", "silent"])
def test_an_unreachable_cluster_fails_in_one_line_within_the_timeout(listening):
    """Nothing at the address (refused at once), or something that accepts and never answers as Ray
    would (joining retries): either way one line, exit 1, within --timeout and a few seconds."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    if not listening:
        server.close()
    try:
        start = time.monotonic()
        run = experiment(
            "--max-steps",
            "2",
            "--address",
            f"127.0.0.1:{port}",
            "--timeout",
            "5",
            token="0123456789abcdef0123456789abcdef",
        )
        _, err = run.communicate(timeout=120)
        took = time.monotonic() - start
    finally:
        server.close()
    lines = err.strip().splitlines()
    assert run.returncode == 1 and len(lines) == 1, err
    assert f"127.0.0.1:{port}" in lines[0] and "within 5 s" in lines[0]
    assert took < 5 + 30  # the interpreter's and JAX's start-up included


@needs_ray
def test_a_killed_driver_leaves_no_process_of_its_run_behind(tmp_path):
    """kill -9 of the driver mid-run: the reaper takes every process of its local cluster with it
    (the workers and Ray's own agents), read from /proc by the run's token."""
    token = os.urandom(16).hex()
    run = experiment(
        "--edges", "2", "--epochs", "4", "--out", str(tmp_path / "run"), "--checkpoint-every", "5", token=token
    )
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "run" / "checkpoints" / "5").is_dir():
            assert run.poll() is None and time.monotonic() < deadline, run.stderr.read() if run.stderr else ""
            time.sleep(0.5)
        assert len(processes_with_token(token)) > 3  # the head's processes and the workers
    finally:
        os.kill(run.pid, signal.SIGKILL)
        run.wait()
    left = wait_until_gone(processes_with_token(token), timeout_s=30)
    assert not left, [open(f"/proc/{p}/cmdline").read().replace("\0", " ")[:80] for p in left]


@needs_ray
def test_sigterm_stops_a_join_at_once():
    """A join that would retry for the whole timeout stops when SIGTERM comes, with one line."""
    server = socket.create_server(("127.0.0.1", 0))
    try:
        run = experiment(
            "--max-steps",
            "2",
            "--address",
            f"127.0.0.1:{server.getsockname()[1]}",
            "--timeout",
            "120",
            token="0123456789abcdef0123456789abcdef",
        )
        threading.Timer(15, run.send_signal, (signal.SIGTERM,)).start()
        start = time.monotonic()
        _, err = run.communicate(timeout=120)
        took = time.monotonic() - start
    finally:
        server.close()
    assert run.returncode == 130 and took < 15 + 10, (run.returncode, took, err)
    assert len(err.strip().splitlines()) == 1, err


@needs_ray
def test_a_run_joins_a_live_cluster_by_its_address(local_ray, tmp_path):
    """The probe before the join lets a real head through: a driver in another process joins this
    session's cluster with its token, trains, and leaves the cluster running."""
    import ray

    address, token = ray.get_runtime_context().gcs_address, os.environ["RAY_AUTH_TOKEN"]
    run = experiment("--max-steps", "2", "--address", address, "--out", str(tmp_path / "run"), token=token)
    _, err = run.communicate(timeout=300)
    assert run.returncode == 0, err
    assert (tmp_path / "run" / "summary.json").is_file()
    assert ray.cluster_resources()  # still up
