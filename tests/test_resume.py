"""A run never loses work: periodic checkpoints, Ctrl-C that saves and joins, bit-identical resume,
divergence caught with its side and step, damaged checkpoints named, stale output refused."""

import _thread
import dataclasses
import json
import shutil
import threading
import time

import jax
import numpy as np
import pytest
from flax import nnx

from hier_jax import train
from hier_jax.config import SCHEDULES, ExperimentConfig, from_dict, optimizers
from hier_jax.data import num_train_steps
from hier_jax.errors import CheckpointError, DivergenceError, ResumeMismatchError, RunInterrupted
from hier_jax.flags import replace_paths
from hier_jax.models import ExitHeadConfig, build_model
from hier_jax.run.checkpoint import RunCheckpoints
from hier_jax.run.record import RunRecord, check_resumable, read_meta
from hier_jax.run.result import RunResult

from backend import tolerance

CONFIG = ExperimentConfig(
    model="vgg16",
    dataset="digits",
    split="pool2",
    width=4,
    batch_size=32,
    max_steps=12,
    head=ExitHeadConfig(channels=8),
    checkpoint_every=4,
    keep_checkpoints=2,
)


@pytest.fixture(scope="module")
def setup(digits):
    return train.build(CONFIG, digits)


@pytest.fixture(scope="module")
def reference(setup):
    """The uninterrupted run (sequential; pipelined is bit-identical to it, tests/test_runner.py)."""
    return train.train(setup, schedule="sequential", progress=False)


def assert_same_run(a: RunResult, b: RunResult) -> None:
    for x, y in zip(
        jax.tree.leaves((a.edge_state, a.cloud_state)), jax.tree.leaves((b.edge_state, b.cloud_state)), strict=True
    ):
        np.testing.assert_array_equal(x, y)
    for k in ("loss", "accuracy"):
        np.testing.assert_array_equal(a.edge_metrics[k], b.edge_metrics[k])
        np.testing.assert_array_equal(a.cloud_metrics[k], b.cloud_metrics[k])
    np.testing.assert_array_equal(a.cloud_steps, b.cloud_steps)


def interrupt_at(monkeypatch, batch: int) -> None:
    """Make the first run raise KeyboardInterrupt in the main thread (as Ctrl-C does) when its
    batch iterator reaches `batch`; resumed runs (start > 0) are left alone."""
    original = train.TrainBatches.__iter__

    def iterate(self):
        for i, item in enumerate(original(self)):
            if self.start == 0 and i == batch:
                _thread.interrupt_main()
            if self.start == 0 and i >= batch:
                time.sleep(0.1)  # steps that take time, as real ones do, so the stop lands mid-run
            yield item

    monkeypatch.setattr(train.TrainBatches, "__iter__", iterate)


def live_run_threads(before: set) -> list[str]:
    """The threads of a run (its workers' dispatch threads, its checkpoint writer) still alive."""
    return [t.name for t in threading.enumerate() if t not in before and t.name.startswith("hier-")]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_interrupt_then_resume_is_bit_identical(setup, reference, tmp_path, monkeypatch, schedule):
    interrupt_at(monkeypatch, 6)
    before = set(threading.enumerate())
    with pytest.raises(RunInterrupted) as stopped:
        train.train(setup, schedule=schedule, progress=False, checkpoint_dir=tmp_path)
    assert not live_run_threads(before)  # nothing trains on in the background after the call
    step = stopped.value.step
    assert 0 < step < CONFIG.max_steps
    assert stopped.value.checkpoint == tmp_path.absolute() / str(step)
    with RunCheckpoints(tmp_path) as checkpoints:
        assert checkpoints.latest_step() == step
    monkeypatch.undo()
    resumed = train.train(setup, schedule=schedule, progress=False, checkpoint_dir=tmp_path, resume=True)
    assert resumed.start_step == step and resumed.end_step == CONFIG.max_steps
    assert_same_run(resumed, reference)


def test_checkpoint_records_step_data_position_rng_and_config(setup, reference, tmp_path):
    result = train.train(setup, schedule="pipelined", progress=False, checkpoint_dir=tmp_path)
    assert_same_run(result, reference)  # snapshots taken every 4 steps change nothing
    with RunCheckpoints(tmp_path) as checkpoints:
        assert checkpoints.steps() == [8, 12]  # every 4 steps and the end; the latest 2 kept
        meta = checkpoints.read_meta(8)
    per_epoch = num_train_steps(setup.dataset, CONFIG.batch_size)
    assert meta["format"] == 2 and meta["step"] == 8 and meta["total_steps"] == CONFIG.max_steps
    assert (meta["scheme"], meta["schedule"], meta["precision"]) == ("hierarchical", "pipelined", "fp32")
    assert from_dict(ExperimentConfig, meta["config"]) == dataclasses.replace(CONFIG, schedule="pipelined")
    assert meta["data"] == {
        "epoch": 8 // per_epoch,
        "batch_in_epoch": 8 % per_epoch,
        "steps_per_epoch": per_epoch,
        "order": "epoch_permutation(seed, epoch)",
    }
    assert meta["rng"]["seed"] == CONFIG.seed
    record = RunRecord.from_json(meta["record"])
    np.testing.assert_array_equal(record.edge_metrics()["loss"], reference.edge_metrics["loss"][:8])
    np.testing.assert_array_equal(record.cloud_metrics()["step"], np.arange(8))
    np.testing.assert_array_equal(record.cloud_metrics()["edge"], np.zeros(8))


def test_resume_from_a_periodic_checkpoint_in_the_other_schedule(setup, reference, tmp_path):
    train.train(setup, schedule="sequential", progress=False, checkpoint_dir=tmp_path)
    shutil.rmtree(tmp_path / "12")  # as if the run had been killed between steps 8 and 12
    resumed = train.train(setup, schedule="pipelined", progress=False, checkpoint_dir=tmp_path, resume=True)
    assert resumed.start_step == 8
    assert_same_run(resumed, reference)


@pytest.mark.parametrize(
    "change, flag",
    [
        ({"bits": 8}, "--bits"),
        ({"split": "pool3"}, "--split"),
        ({"edge_optimizer.learning_rate": 0.1}, "--edge-learning-rate"),
        ({"seed": 1}, "--seed"),
        ({"precision": "bf16"}, "--precision"),
        ({"head.channels": 16}, "--head-channels"),
        ({"link.outages": ((1, 2),)}, "--outage"),
    ],
)
def test_resume_with_another_config_is_refused_naming_the_flag(setup, tmp_path, change, flag):
    train.train(setup, schedule="sequential", progress=False, checkpoint_dir=tmp_path)
    with RunCheckpoints(tmp_path, read_only=True) as checkpoints:
        meta = read_meta(checkpoints.read_meta())
    args = dict(scheme="hierarchical", precision="fp32", total_steps=CONFIG.max_steps, where=tmp_path)
    with pytest.raises(ResumeMismatchError, match=f"differs in {flag} "):
        check_resumable(meta, config=replace_paths(CONFIG, change), **args)
    # Where and how the run happens (devices, queue, checkpoint cadence, schedule) may change.
    check_resumable(
        meta, config=replace_paths(CONFIG, {"queue_size": 5, "checkpoint_every": 2, "schedule": "pipelined"}), **args
    )
    with pytest.raises(ResumeMismatchError, match="belongs to a run of 12 steps, this one has 13"):
        check_resumable(meta, config=CONFIG, **{**args, "total_steps": 13})


@pytest.mark.parametrize("side", ["edge", "cloud"])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_non_finite_loss_stops_the_run_naming_side_and_step(setup, tmp_path, side, schedule):
    """A NaN in step 6's loss on one side: the run stops with that side and step, and the last
    checkpoint (step 4) is kept; nothing is saved after it."""
    h = setup.hierarchy

    def poisoned(step_fn, loss_at):
        def step(*args):
            *rest, metrics = step_fn(*args)
            nan = jax.numpy.where(rest[0]["step"] == loss_at + 1, jax.numpy.nan, metrics["loss"])
            return (*rest, {**metrics, "loss": nan})

        return step

    name = f"{side}_step"
    bad = dataclasses.replace(setup, hierarchy=dataclasses.replace(h, **{name: poisoned(getattr(h, name), 6)}))
    before = set(threading.enumerate())
    with pytest.raises(DivergenceError) as diverged:
        train.train(bad, schedule=schedule, progress=False, checkpoint_dir=tmp_path)
    assert (diverged.value.side, diverged.value.step) == (side, 6)
    assert f"the {side} loss is nan at step 6" in str(diverged.value)
    assert diverged.value.last_checkpoint == tmp_path.absolute() / "4"
    with RunCheckpoints(tmp_path) as checkpoints:
        assert checkpoints.steps() == [4]
    assert not live_run_threads(before)


def test_a_real_divergence_is_caught(tmp_path, digits):
    config = dataclasses.replace(CONFIG, **optimizers(learning_rate=1e3), checkpoint_every=2)
    with pytest.raises(DivergenceError, match="training diverged: the (edge|cloud) loss is (nan|inf)"):
        train.train(train.build(config, digits), schedule="pipelined", progress=False, checkpoint_dir=tmp_path)


def test_damaged_checkpoints_name_the_file_and_the_side(setup, tmp_path):
    train.train(setup, schedule="sequential", progress=False, checkpoint_dir=tmp_path)
    edge, cloud = train.fresh_states(setup)
    edge = {"0": edge}  # every edge's state, keyed by its index
    for item in (tmp_path / "12" / "cloud").rglob("*"):
        if item.is_file() and item.stat().st_size > 0 and "manifest" not in item.name:
            item.write_bytes(b"\0" * 7)  # truncated and garbled
    with RunCheckpoints(tmp_path) as checkpoints:
        with pytest.raises(CheckpointError, match=r"checkpoint .*/12/cloud \(cloud\) is damaged or unreadable"):
            checkpoints.restore(edge, cloud)
    shutil.rmtree(tmp_path / "12" / "edge")
    with RunCheckpoints(tmp_path) as checkpoints:
        with pytest.raises(CheckpointError, match=r"checkpoint .*/12 is incomplete: its edge item"):
            checkpoints.restore(edge, cloud)
    (tmp_path / "8" / "meta" / "metadata").write_text("{not json")
    with RunCheckpoints(tmp_path) as checkpoints:
        with pytest.raises(CheckpointError, match=r"/8/meta \(meta\) is damaged"):
            checkpoints.read_meta(8)


def test_reading_a_missing_checkpoint_directory_creates_nothing(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        RunCheckpoints(missing, read_only=True)
    assert not missing.exists()
    with RunCheckpoints(tmp_path / "empty") as checkpoints:
        with pytest.raises(CheckpointError, match="no checkpoint under"):
            checkpoints.read_meta()


def test_a_checkpoint_is_never_overwritten(setup, tmp_path):
    train.train(setup, schedule="sequential", progress=False, checkpoint_dir=tmp_path)
    edge, cloud = train.fresh_states(setup)
    with RunCheckpoints(tmp_path) as checkpoints:
        with pytest.raises(CheckpointError, match="already exists"):
            checkpoints.save(12, edge, cloud, {"step": 12})


def test_second_interrupt_aborts_without_saving(setup, tmp_path, monkeypatch):
    original = train.TrainBatches.__iter__

    def iterate(self):
        for i, item in enumerate(original(self)):
            if i in (3, 4):
                _thread.interrupt_main()
            if i >= 3:
                time.sleep(0.1)
            yield item

    monkeypatch.setattr(train.TrainBatches, "__iter__", iterate)
    before = set(threading.enumerate())
    with pytest.raises(KeyboardInterrupt) as stopped:
        train.train(setup, schedule="sequential", progress=False, checkpoint_dir=tmp_path)
    assert not live_run_threads(before)
    # Either the second interrupt came before the graceful stop completed (abort: nothing new saved) or
    # after it (a normal RunInterrupted with its checkpoint).
    if isinstance(stopped.value, RunInterrupted):
        assert (tmp_path / str(stopped.value.step)).is_dir()
    else:
        assert "aborted" in str(stopped.value)


def test_summary_json_is_always_valid(tmp_path):
    from hier_jax.outputs import write_json

    path = write_json(tmp_path / "s.json", {"loss": float("nan"), "acc": np.float32(0.5), "x": [np.inf, 1]})
    assert json.loads(path.read_text()) == {"loss": None, "acc": 0.5, "x": [None, 1]}


def test_a_checkpoint_dir_of_another_run_is_refused_without_resume(setup, tmp_path):
    from hier_jax.errors import ConfigError

    train.train(setup, schedule="sequential", progress=False, checkpoint_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"already holds checkpoints \[8, 12\]: pass resume=True"):
        train.train(setup, schedule="sequential", progress=False, checkpoint_dir=tmp_path)


def test_ctrl_c_during_a_save_neither_breaks_the_save_nor_is_lost(setup, reference, tmp_path, monkeypatch):
    """Saves run on a writer thread, so Ctrl-C (which lands in the calling thread) cannot cut one
    short: the save in progress completes, no temporary directory is left, the run stops and resumes."""
    original = RunCheckpoints.save
    completed = []

    def slow_save(self, step, *args, **kwargs):
        if step == 4:
            _thread.interrupt_main()
            time.sleep(0.3)  # the interrupt arrives while this save is in progress
        path = original(self, step, *args, **kwargs)
        completed.append(step)
        return path

    monkeypatch.setattr(RunCheckpoints, "save", slow_save)
    batches = train.TrainBatches.__iter__

    def slow_batches(self):
        for item in batches(self):
            time.sleep(0.1)  # steps that take time, so the run is still going when the interrupt lands
            yield item

    monkeypatch.setattr(train.TrainBatches, "__iter__", slow_batches)
    with pytest.raises(RunInterrupted) as stopped:
        train.train(setup, schedule="pipelined", progress=False, checkpoint_dir=tmp_path)
    monkeypatch.undo()
    assert completed[0] == 4 and completed[-1] == stopped.value.step < CONFIG.max_steps
    assert not [p.name for p in tmp_path.iterdir() if "tmp" in p.name]
    resumed = train.train(setup, schedule="pipelined", progress=False, checkpoint_dir=tmp_path, resume=True)
    assert_same_run(resumed, reference)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", train.BASELINES)
def test_baselines_checkpoint_and_resume_bit_identically(setup, tmp_path, monkeypatch, scheme):
    """The baselines run under the same supervision: periodic checkpoints, Ctrl-C that saves, and a
    resume that ends exactly where an uninterrupted run ends."""
    whole = train.train(setup, scheme=scheme, progress=False)
    assert whole.end_step == CONFIG.max_steps and whole.cloud_metrics["loss"].shape == (CONFIG.max_steps,)
    interrupt_at(monkeypatch, 6)
    with pytest.raises(RunInterrupted) as stopped:
        train.train(setup, scheme=scheme, progress=False, checkpoint_dir=tmp_path)
    assert 0 < stopped.value.step < CONFIG.max_steps
    monkeypatch.undo()
    resumed = train.train(setup, scheme=scheme, progress=False, checkpoint_dir=tmp_path, resume=True)
    assert resumed.start_step == stopped.value.step
    assert_same_run(resumed, whole)
    with pytest.raises(ResumeMismatchError, match=f"checkpoint of {scheme} training, not hierarchical"):
        train.train(setup, schedule="pipelined", progress=False, checkpoint_dir=tmp_path, resume=True)


def test_split_learning_trains_what_end_to_end_trains(setup):
    """Split learning backpropagates through the cut: the same losses as the unsplit model, step for
    step (up to float reassociation), from the very initial weights the hierarchy starts from."""
    e2e = train.train(setup, scheme="end_to_end", progress=False)
    sl = train.train(setup, scheme="split_learning", progress=False)
    np.testing.assert_allclose(sl.cloud_metrics["loss"], e2e.cloud_metrics["loss"], **tolerance("trajectory").kwargs())
    # 32 x float32 features of pool2 (width 4: 8 x 8 x 8) and the labels up, the features' gradient down.
    assert sl.payload_bytes == 2 * 32 * 8 * 8 * 8 * 4 + 32 and e2e.payload_bytes == 0  # + uint8 labels
    # Every scheme starts from the weights of a model built afresh from the config's seed: the hierarchy's
    # edge and cloud stages, the end-to-end model and split learning's parts (exit head and classifier aside).
    fresh = nnx.state(
        build_model(CONFIG.model, num_classes=10, input_shape=(32, 32, 3), width=CONFIG.width, seed=CONFIG.seed),
        nnx.Param,
    )["stages"]
    edge, cloud = (state["params"]["stages"] for state in train.fresh_states(setup))
    _, sl_edge, sl_cloud = train.build_baseline(setup, "split_learning")
    for starts in (
        [*edge.values(), *cloud.values()],
        [*train.build_baseline(setup, "end_to_end")[2]["params"]["stages"].values()],
        [*sl_edge["params"]["stages"].values(), *sl_cloud["params"]["stages"].values()],
    ):
        assert len(starts) == len(fresh)
        for got, want in zip(starts, fresh.values(), strict=True):
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
                np.testing.assert_array_equal(a, b)
    assert len(edge) and len(cloud)  # both sides hold trained stages (pools have no parameters)
