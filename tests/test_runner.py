"""The one scheduler on the thread backend: pipelined == sequential bit for bit on every device pair,
alignment, the edge running ahead, errors and timeouts that stop every thread, checkpoints that are
the run cut at their step, and the checkpoint writer's back-pressure."""

import concurrent.futures
import dataclasses
import threading
import time

import jax
import numpy as np
import pytest

from hier_jax import devices, train
from hier_jax.config import ExperimentConfig, optimizers
from hier_jax.errors import WorkerTimeout
from hier_jax.models import ExitHeadConfig
from hier_jax.run import snapshots
from hier_jax.run.checkpoint import RunCheckpoints
from hier_jax.run.evaluate import evaluate

STEPS = 5
CONFIG = ExperimentConfig(
    model="resnet18",
    dataset="digits",
    split="layer1_0",
    width=4,
    batch_size=4,
    max_steps=STEPS,
    head=ExitHeadConfig(channels=8),
    checkpoint_every=0,
    **optimizers(learning_rate=0.1),
)


@pytest.fixture(scope="module")
def setup(digits):
    return train.build(CONFIG, digits)


def with_steps(setup, **steps) -> train.Setup:
    """The setup with some of its hierarchy's compiled steps replaced (probes, faults)."""
    return dataclasses.replace(setup, hierarchy=dataclasses.replace(setup.hierarchy, **steps))


def leaves_equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def run_threads_started_since(before):
    """Threads of runs started after `before` still alive (workers' dispatch threads, the writer)."""
    return [t for t in threading.enumerate() if t not in before and t.name.startswith("hier-")]


def test_pipelined_equals_sequential_bit_for_bit(setup):
    seq = train.train(setup, schedule="sequential", progress=False)
    pip = train.train(setup, schedule="pipelined", progress=False)
    assert leaves_equal(seq.edge_state, pip.edge_state)
    assert leaves_equal(seq.cloud_state, pip.cloud_state)
    for key in ("loss", "accuracy"):
        np.testing.assert_array_equal(seq.edge_metrics[key], pip.edge_metrics[key])
        np.testing.assert_array_equal(seq.cloud_metrics[key], pip.cloud_metrics[key])
    np.testing.assert_array_equal(pip.cloud_steps, np.arange(STEPS))
    assert seq.cloud_metrics["loss"].shape == (STEPS,)
    # Training did something: states moved, and the step counters count the steps.
    assert not leaves_equal(setup.initial_edge_state["params"], pip.edge_state["params"])
    assert int(pip.edge_state["step"]) == int(pip.cloud_state["step"]) == STEPS
    # resnet18's stem keeps 32 x 32 digits at full size: 4 x 32 x 32 x 4 codes after layer1_0 at 4 bits,
    # float32 scale and offset, uint8 labels.
    assert pip.payload_bytes == seq.payload_bytes == 4 * 32 * 32 * 4 // 2 + 4 + 4 + 4


def test_end_to_end_streams_its_batches_ahead_when_pipelined_and_trains_the_same_bits(setup):
    """End-to-end's edge only loads (and, over a network, sends) the batches: pipelined, it runs ahead
    of the cloud, as the cost model's end_to_end streams them; the cloud trains on the same batches."""
    seq = train.train(setup, scheme="end_to_end", schedule="sequential", progress=False)
    pip = train.train(setup, scheme="end_to_end", schedule="pipelined", progress=False)
    assert (seq.schedule, pip.schedule) == ("sequential", "pipelined")
    assert seq.edges[0].max_in_flight == 1 and pip.edges[0].max_in_flight > 1
    np.testing.assert_array_equal(seq.cloud_metrics["loss"], pip.cloud_metrics["loss"])
    assert leaves_equal(seq.cloud_state, pip.cloud_state)


def test_pipelined_equals_sequential_on_every_device_pair(device_pair, digits):
    """Two host devices, two accelerators, or the CPU edge beside an accelerator cloud: the schedules
    agree bit for bit wherever the sides run, and each state stays on its side's device."""
    edge_device, cloud_device = device_pair
    config = dataclasses.replace(
        CONFIG,
        max_steps=3,
        edge_device=devices.device_name(edge_device),
        cloud_device=devices.device_name(cloud_device),
    )
    setup = train.build(config, digits)
    seq = train.train(setup, schedule="sequential", progress=False)
    pip = train.train(setup, schedule="pipelined", progress=False)
    assert leaves_equal(seq.edge_state, pip.edge_state) and leaves_equal(seq.cloud_state, pip.cloud_state)
    assert {d for leaf in jax.tree.leaves(pip.edge_state) for d in leaf.devices()} == {edge_device}
    assert {d for leaf in jax.tree.leaves(pip.cloud_state) for d in leaf.devices()} == {cloud_device}


def test_the_cloud_trains_on_each_edge_step_with_that_steps_labels(setup):
    """The labels each cloud step receives are those the edge step that made its payload trained on."""
    h = setup.hierarchy
    edge_labels, cloud_labels = [], []

    def edge_step(state, images, labels):
        edge_labels.append(np.asarray(labels))
        return h.edge_step(state, images, labels)

    def cloud_step(state, payload):
        cloud_labels.append(np.asarray(payload.labels))
        return h.cloud_step(state, payload)

    train.train(with_steps(setup, edge_step=edge_step, cloud_step=cloud_step), schedule="pipelined", progress=False)
    assert len(edge_labels) == len(cloud_labels) == STEPS
    assert not np.array_equal(edge_labels[0], edge_labels[1])  # the check below could tell steps apart
    for a, b in zip(edge_labels, cloud_labels, strict=True):
        np.testing.assert_array_equal(a, b)


def test_edge_runs_ahead_without_waiting_for_the_cloud(setup):
    """The cloud's first step blocks until the edge has started step 2: possible only if the edge
    never waits on the cloud's work (the sequential schedule would time out here)."""
    h = setup.hierarchy
    started = []
    reached = threading.Event()

    def edge_step(state, images, labels):
        started.append(len(started))
        if len(started) == 3:
            reached.set()
        return h.edge_step(state, images, labels)

    def cloud_step(state, payload):
        if not reached.wait(timeout=30):
            raise AssertionError("edge did not run ahead while the cloud was busy")
        return h.cloud_step(state, payload)

    result = train.train(
        with_steps(setup, edge_step=edge_step, cloud_step=cloud_step), schedule="pipelined", progress=False
    )
    np.testing.assert_array_equal(result.cloud_steps, np.arange(STEPS))


class Boom(Exception):
    pass


@pytest.mark.parametrize("side", ["edge", "cloud"])
def test_an_error_on_either_side_stops_the_run_surfaces_and_joins_every_thread(setup, side):
    h = setup.hierarchy
    calls = []

    def failing(*args):
        calls.append(1)
        if len(calls) == 3:
            raise Boom(f"{side} failed")
        return getattr(h, f"{side}_step")(*args)

    before = set(threading.enumerate())
    start = time.perf_counter()
    with pytest.raises(Boom, match=f"{side} failed"):
        train.train(with_steps(setup, **{f"{side}_step": failing}), schedule="pipelined", progress=False)
    assert time.perf_counter() - start < 60
    assert not run_threads_started_since(before)


def test_a_step_that_never_ends_is_a_timeout_not_a_hang(setup):
    h = setup.hierarchy

    def slow_edge_step(state, images, labels):
        if int(state["step"]) == 1:
            time.sleep(3)
        return h.edge_step(state, images, labels)

    start = time.perf_counter()
    with pytest.raises(WorkerTimeout, match="within 0.5 s"):
        train.train(with_steps(setup, edge_step=slow_edge_step), progress=False, timeout_s=0.5)
    assert time.perf_counter() - start < 30


def test_evaluate_counts_masked_examples_once(setup):
    h = setup.hierarchy
    edge_state, cloud_state = train.fresh_states(setup)
    images = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
    labels = np.arange(4, dtype=np.int32)
    mask = np.array([True, True, True, False])
    acc = evaluate(h, edge_state, cloud_state, [(images, labels, mask), (images, labels, mask)])
    assert acc["examples"] == 6
    logits, _ = h.edge_eval(edge_state, jax.device_put(images, h.edge_device))
    hits = (np.argmax(np.asarray(logits), -1) == labels)[:3].sum()
    assert acc["edge_accuracy"] == pytest.approx(hits / 3)


@pytest.mark.parametrize("spec", ["cpu:7", "gpu:64", "tpu:64", "npu:0", "cpu:x", ":1", "", "cpu:-1"])
def test_unknown_devices_are_clear_errors(spec):
    """On any host: the message lists every device of every platform (the CPU's too beside a GPU)."""
    with pytest.raises(ValueError, match=f"device '{spec}' does not exist; available devices: .*cpu:0, cpu:1"):
        devices.resolve_device(spec)


def test_resolve_device():
    assert devices.resolve_device("cpu:1") == jax.devices("cpu")[1]
    assert devices.resolve_device("cpu") == jax.devices("cpu")[0]
    assert devices.resolve_device(jax.devices("cpu")[1]) == jax.devices("cpu")[1]
    with pytest.raises(ValueError, match="unknown role 'fog'"):
        devices.resolve_device("auto", "fog")


def test_auto_follows_this_host():
    """On a CPU host the two host devices; on an accelerator host the first and last accelerator."""
    chosen = devices.resolve_device("auto", "edge"), devices.resolve_device("auto", "cloud")
    if jax.default_backend() == "cpu":
        assert chosen == (jax.devices("cpu")[0], jax.devices("cpu")[1])
    else:
        assert chosen == (jax.devices()[0], jax.devices()[-1]) and chosen[0].platform != "cpu"


class FakeDevice:
    def __init__(self, platform, id):
        self.platform, self.id = platform, id


@pytest.mark.parametrize("count, edge, cloud", [(1, 0, 0), (2, 0, 1), (4, 0, 3), (8, 0, 7)])
def test_auto_on_an_accelerator_host_takes_the_first_and_the_last(monkeypatch, count, edge, cloud):
    gpus = [FakeDevice("gpu", i) for i in range(count)]
    monkeypatch.setattr(jax, "devices", lambda *backend: gpus)
    assert devices.auto_devices() == (gpus[edge], gpus[cloud])


@pytest.mark.parametrize("count, cloud", [(1, 0), (2, 1), (4, 1)])
def test_auto_on_a_cpu_host_with_n_host_devices(monkeypatch, count, cloud):
    cpus = [FakeDevice("cpu", i) for i in range(count)]
    monkeypatch.setattr(jax, "devices", lambda *backend: cpus)
    assert devices.auto_devices() == (cpus[0], cpus[cloud])


@pytest.mark.parametrize("schedule", ["sequential", "pipelined"])
def test_checkpoints_are_the_states_of_the_run_cut_at_their_step(digits, tmp_path, schedule):
    """With a constant learning rate a run of k steps is the first k steps of a longer one: the
    checkpoint at k holds exactly its final states and its record."""
    config = dataclasses.replace(
        CONFIG,
        max_steps=6,
        checkpoint_every=2,
        keep_checkpoints=5,
        **optimizers(learning_rate=0.1, lr_schedule="constant"),
    )
    full = train.train(train.build(config, digits), schedule=schedule, progress=False, checkpoint_dir=tmp_path)
    with RunCheckpoints(tmp_path, read_only=True) as checkpoints:
        assert checkpoints.steps() == [2, 4, 6]
        for k in (2, 4):
            cut = train.train(
                train.build(dataclasses.replace(config, max_steps=k), digits), schedule="sequential", progress=False
            )
            edges, cloud, meta = checkpoints.restore({"0": cut.edge_state}, cut.cloud_state, k)
            assert leaves_equal(edges["0"], cut.edge_state) and leaves_equal(cloud, cut.cloud_state)
            record = meta["record"]
            np.testing.assert_array_equal(record["edges"][0]["loss"], full.edge_metrics["loss"][:k])
            np.testing.assert_array_equal(record["cloud"]["loss"], full.cloud_metrics["loss"][:k])


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["sequential", "pipelined"])
def test_a_slow_checkpoint_writer_holds_training_back_instead_of_piling_up_state_copies(
    digits, tmp_path, monkeypatch, schedule
):
    """Every checkpoint is still written, in order; but with saves far slower than the cadence (one
    per step here), the edge waits for the writer, so only a few state copies exist at any time."""
    steps = 12
    setup = train.build(
        dataclasses.replace(CONFIG, max_steps=steps, checkpoint_every=1, keep_checkpoints=steps), digits
    )
    h = setup.hierarchy
    edge_steps = []

    def counted_edge_step(*args):
        edge_steps.append(1)
        return h.edge_step(*args)

    lead, original = [], RunCheckpoints.save

    def slow_save(self, step, *args, **kwargs):
        lead.append(len(edge_steps) - step)  # how far training ran ahead of the checkpoint being written
        time.sleep(0.2)
        return original(self, step, *args, **kwargs)

    monkeypatch.setattr(RunCheckpoints, "save", slow_save)
    train.train(
        with_steps(setup, edge_step=counted_edge_step), schedule=schedule, progress=False, checkpoint_dir=tmp_path
    )
    assert len(lead) == steps  # every step's checkpoint written
    # Without back-pressure the edge finishes every step during the first 0.2 s save (lead 11).
    # With it: the writer's backlog of checkpoints, plus the steps the edge may run ahead of the cloud.
    ahead = 1 if schedule == "sequential" else CONFIG.queue_size + 1
    assert max(lead) <= snapshots.WRITE_BACKLOG + ahead - 1


def test_an_edge_running_ahead_keeps_only_its_newest_unpaired_checkpoints(tmp_path):
    """The edge offers its states for checkpoints 2..10 before the cloud offers any (an outage): only
    the newest `UNPAIRED` are kept, so 2 gets no checkpoint; the rest pair and are written in order."""

    def done(value):
        future = concurrent.futures.Future()
        future.set_result(value)
        return future

    store = RunCheckpoints(tmp_path, keep=10)
    gathered = snapshots.Snapshots(store, every=2, steps=10, first=0, meta=lambda k, cloud, live: {"step": k})
    assert snapshots.UNPAIRED == 4
    for k in (2, 4, 6, 8, 10):
        gathered.take_edge(k, 0, done({"step": np.int32(k)}))
    assert sorted(gathered.pending) == [4, 6, 8, 10]
    for k in (4, 6, 8, 10):
        gathered.take_cloud(gathered.pending[k], done({"step": np.int32(100 + k)}), cloud_index=k)
        for pending in gathered.ready([0], lambda f: f.done(), recorded=k):
            gathered.write(pending, lambda f: f.result(), [0])
    gathered.close()
    assert store.steps() == [4, 6, 8, 10] and gathered.saved_step == 10
    store.close()


# --- several edges and their faults on the thread backend (the Ray backend's in tests/test_cluster.py) ---

TWO_EDGES = dataclasses.replace(
    CONFIG, model="resnet18_tv", split="layer1_1", batch_size=32, max_steps=6, edges=2, edge_sync=3, checkpoint_every=3
)


@pytest.fixture(scope="module")
def two_edges(digits):
    return train.build(TWO_EDGES, digits)


def on(setup, **change) -> train.Setup:
    return dataclasses.replace(setup, config=dataclasses.replace(setup.config, **change))


@pytest.mark.slow
def test_a_crashed_edge_thread_comes_back_from_the_checkpoint_and_ends_as_if_it_never_died(two_edges, tmp_path):
    clean = train.train(two_edges, progress=False, evaluate=True)
    faulty = train.train(
        on(two_edges, kill_edges=((1, 4),), max_restarts=1), progress=False, evaluate=True, checkpoint_dir=tmp_path
    )
    assert faulty.cloud_order == clean.cloud_order == [(e, t) for t in range(6) for e in range(2)]
    assert faulty.cloud_losses == clean.cloud_losses
    assert [e["loss"] for e in faulty.record.edges] == [e["loss"] for e in clean.record.edges]
    assert [(e.edge_accuracy, e.cloud_accuracy) for e in faulty.edges] == [
        (e.edge_accuracy, e.cloud_accuracy) for e in clean.edges
    ]
    back = faulty.edges[1]
    assert (back.restarts, back.lost, back.sent, back.delivered) == (1, False, 6, 6)
    # from the checkpoint at step 3; step 3 recomputed without being sent again if the cloud already had it
    assert back.replayed in (0, 1)
    for a, b in zip(faulty.edge_states, clean.edge_states, strict=True):
        assert leaves_equal(a, b)


def test_a_lost_edge_thread_is_survived_and_a_lost_cloud_stops_the_run(two_edges):
    from hier_jax.errors import WorkerError

    before = set(threading.enumerate())
    result = train.train(on(two_edges, kill_edges=((1, 3),), order="async", edge_sync=0), progress=False, evaluate=True)
    survivor, lost = result.edges
    assert not survivor.lost and survivor.delivered == 6 and survivor.cloud_accuracy is not None
    assert lost.lost and lost.edge_accuracy is None and lost.delivered == 3 and lost.last_delivered_step == 2
    with pytest.raises(WorkerError, match="the cloud worker died at its step 2"):
        train.train(on(two_edges, kill_cloud=2), progress=False)
    assert not run_threads_started_since(before)


def test_a_run_whose_cloud_dies_writes_the_checkpoints_it_had_queued_and_leaves_no_writer(two_edges, tmp_path):
    """Every exit path closes the checkpoint writer: what was queued is written, its thread ends."""
    from hier_jax.errors import WorkerError

    before = set(threading.enumerate())
    with pytest.raises(WorkerError, match="the cloud worker died at its step 5"):
        train.train(on(two_edges, kill_cloud=5, checkpoint_every=1), progress=False, checkpoint_dir=tmp_path)
    assert not run_threads_started_since(before)
    with RunCheckpoints(tmp_path, read_only=True) as written:
        assert 1 in written.steps()  # all of step 0 trained on by cloud step 1, before the cloud died
