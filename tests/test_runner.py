"""The sequential and the pipelined schedule: bit-identical results, devices, alignment, errors, no hangs."""

import dataclasses
import threading
import time

import jax
import numpy as np
import pytest

from hier_jax import devices
from hier_jax.link.channel import QueueChannel
from hier_jax.models import ExitHeadConfig, build_model, split
from hier_jax.optim import OptimConfig, make_optimizer
from hier_jax.run import supervisor, threads
from hier_jax.run.evaluate import evaluate
from hier_jax.run.hierarchy import build_hierarchy

NUM_CLASSES = 10
STEPS = 5


@pytest.fixture(scope="module")
def hierarchy():
    model = build_model("resnet18", num_classes=NUM_CLASSES, input_shape=(16, 16, 3), width=4)
    parts = split(model, "layer1_0", ExitHeadConfig(channels=8))
    tx = make_optimizer(OptimConfig(learning_rate=0.1), total_steps=STEPS)
    h, edge_state, cloud_state = build_hierarchy(
        parts, bits=4, edge_tx=tx, cloud_tx=tx, edge_device="cpu:0", cloud_device="cpu:1"
    )
    return h, edge_state, cloud_state


def fresh(hierarchy):
    h, edge_state, cloud_state = hierarchy
    return h, devices.place(edge_state, h.edge_device), devices.place(cloud_state, h.cloud_device)


def batches(n=STEPS, seed=0):
    rng = np.random.default_rng(seed)
    return [
        (rng.normal(size=(4, 16, 16, 3)).astype(np.float32), rng.integers(0, NUM_CLASSES, 4).astype(np.int32))
        for _ in range(n)
    ]


def leaves_equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_pipelined_equals_sequential_bit_for_bit(hierarchy):
    data = batches()
    seq = threads.run_sequential(*fresh(hierarchy), data)
    pip = threads.run_pipelined(*fresh(hierarchy), data, channel=QueueChannel(1))
    assert leaves_equal(seq.edge_state, pip.edge_state)
    assert leaves_equal(seq.cloud_state, pip.cloud_state)
    for key in ("loss", "accuracy"):
        np.testing.assert_array_equal(seq.edge_metrics[key], pip.edge_metrics[key])
        np.testing.assert_array_equal(seq.cloud_metrics[key], pip.cloud_metrics[key])
    np.testing.assert_array_equal(pip.cloud_steps, np.arange(STEPS))
    assert seq.cloud_metrics["loss"].shape == (STEPS,)
    # Training did something: states moved, and the step counters count the steps.
    h, edge0, cloud0 = hierarchy
    assert not leaves_equal(edge0["params"], pip.edge_state["params"])
    assert int(pip.edge_state["step"]) == int(pip.cloud_state["step"]) == STEPS
    # 4 x 16 x 16 x 4 codes at 4 bits, float32 scale and offset, uint8 labels.
    assert pip.payload_bytes == seq.payload_bytes == 4 * 16 * 16 * 4 // 2 + 4 + 4 + 4


def test_pipelined_equals_sequential_on_every_device_pair(device_pair):
    """Two host devices, two accelerators, or the CPU edge beside an accelerator cloud: the schedules
    agree bit for bit wherever the sides run, and each state stays on its side's device."""
    edge_device, cloud_device = device_pair
    model = build_model("resnet18", num_classes=NUM_CLASSES, input_shape=(16, 16, 3), width=4)
    parts = split(model, "layer1_0", ExitHeadConfig(channels=8))
    tx = make_optimizer(OptimConfig(learning_rate=0.1), total_steps=STEPS)
    built = build_hierarchy(parts, bits=4, edge_tx=tx, cloud_tx=tx, edge_device=edge_device, cloud_device=cloud_device)
    data = batches(3)
    seq = threads.run_sequential(*fresh(built), data)
    pip = threads.run_pipelined(*fresh(built), data, channel=QueueChannel(1))
    assert leaves_equal(seq.edge_state, pip.edge_state) and leaves_equal(seq.cloud_state, pip.cloud_state)
    assert {d for leaf in jax.tree.leaves(pip.edge_state) for d in leaf.devices()} == {edge_device}
    assert {d for leaf in jax.tree.leaves(pip.cloud_state) for d in leaf.devices()} == {cloud_device}


def test_states_stay_on_their_devices(hierarchy):
    result = threads.run_pipelined(*fresh(hierarchy), batches(2))
    edge_devices = {d for leaf in jax.tree.leaves(result.edge_state) for d in leaf.devices()}
    cloud_devices = {d for leaf in jax.tree.leaves(result.cloud_state) for d in leaf.devices()}
    assert edge_devices == {jax.devices("cpu")[0]} and cloud_devices == {jax.devices("cpu")[1]}


def test_cloud_consumes_step_t_payload_with_step_t_labels(hierarchy):
    """Shuffling the batches changes the cloud's metrics exactly as the sequential reference does."""
    data = batches(4, seed=1)
    swapped = [data[1], data[0], *data[2:]]
    a = threads.run_pipelined(*fresh(hierarchy), swapped)
    b = threads.run_sequential(*fresh(hierarchy), swapped)
    c = threads.run_sequential(*fresh(hierarchy), data)
    np.testing.assert_array_equal(a.cloud_metrics["loss"], b.cloud_metrics["loss"])
    assert not np.array_equal(a.cloud_metrics["loss"], c.cloud_metrics["loss"])


def test_edge_runs_ahead_without_waiting_for_the_cloud(hierarchy):
    """The cloud's first step blocks until the edge has dispatched step 2: possible only if the edge
    never waits on the cloud's work (a sequential schedule would deadlock here)."""
    h, edge_state, cloud_state = fresh(hierarchy)
    edge_dispatched = []
    reached = threading.Event()

    def edge_step(state, images, labels):
        edge_dispatched.append(len(edge_dispatched))
        if len(edge_dispatched) == 3:
            reached.set()
        return h.edge_step(state, images, labels)

    def cloud_step(state, payload):
        if not reached.wait(timeout=30):
            raise AssertionError("edge did not run ahead while the cloud was busy")
        return h.cloud_step(state, payload)

    probe = dataclasses.replace(h, edge_step=edge_step, cloud_step=cloud_step)
    result = threads.run_pipelined(probe, edge_state, cloud_state, batches(4), channel=QueueChannel(2))
    np.testing.assert_array_equal(result.cloud_steps, np.arange(4))


class Boom(Exception):
    pass


def runner_threads_started_since(before):
    """Edge/cloud threads of runs started after `before` that are still alive (other tests' leftovers excluded)."""
    names = ("hier-edge", "hier-cloud", "hier-sequential", "hier-checkpoint")
    return [t for t in threading.enumerate() if t not in before and t.name in names]


def test_error_in_edge_data_stops_both_and_surfaces(hierarchy):
    def failing_batches():
        yield from batches(2)
        raise Boom("bad batch")

    before = set(threading.enumerate())
    start = time.perf_counter()
    with pytest.raises(Boom, match="bad batch"):
        threads.run_pipelined(*fresh(hierarchy), failing_batches())
    assert time.perf_counter() - start < 60
    assert not runner_threads_started_since(before)


def test_error_in_cloud_step_stops_both_and_surfaces(hierarchy):
    h, edge_state, cloud_state = fresh(hierarchy)

    def cloud_step(state, payload):
        raise Boom("cloud failed")

    # A queue of one and many steps: the edge would block forever on a full queue without the stop.
    before = set(threading.enumerate())
    with pytest.raises(Boom, match="cloud failed"):
        threads.run_pipelined(
            dataclasses.replace(h, cloud_step=cloud_step), edge_state, cloud_state, batches(12), channel=QueueChannel(1)
        )
    assert not runner_threads_started_since(before)


def test_timeout_instead_of_hang(hierarchy):
    h, edge_state, cloud_state = fresh(hierarchy)

    def slow_batches():
        yield from batches(1)
        time.sleep(5)

    with pytest.raises(TimeoutError):
        threads.run_pipelined(h, edge_state, cloud_state, slow_batches(), timeout_s=0.5)


def test_evaluate_counts_masked_examples_once(hierarchy):
    h, edge_state, cloud_state = fresh(hierarchy)
    images, labels = batches(1)[0]
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


@pytest.mark.parametrize("run", [threads.run_sequential, threads.run_pipelined])
def test_snapshots_are_the_states_of_a_run_cut_at_that_step(hierarchy, run):
    data = batches(6)
    snapshots = []
    full = run(*fresh(hierarchy), data, snapshot_every=2, on_snapshot=snapshots.append)
    assert [s.step for s in snapshots] == [2, 4, 6]
    for snap in snapshots:
        cut = threads.run_sequential(*fresh(hierarchy), data[: snap.step])
        assert leaves_equal(snap.edge_state, cut.edge_state) and leaves_equal(snap.cloud_state, cut.cloud_state)
        np.testing.assert_array_equal(snap.record.edge_metrics()["loss"], full.edge_metrics["loss"][: snap.step])
        np.testing.assert_array_equal(snap.record.cloud_metrics()["loss"], full.cloud_metrics["loss"][: snap.step])


@pytest.mark.parametrize("run", [threads.run_sequential, threads.run_pipelined])
def test_keyboard_interrupt_stops_both_sides_at_one_step_and_joins_every_thread(hierarchy, run):
    import _thread

    data = batches(12)

    def interrupted_batches():
        for i, item in enumerate(data):
            if i == 3:
                _thread.interrupt_main()  # what Ctrl-C does: KeyboardInterrupt in the main thread
            if i >= 3:
                time.sleep(0.2)  # steps that take time, as real ones do, so the stop lands mid-run
            yield item

    before = set(threading.enumerate())
    result = run(*fresh(hierarchy), interrupted_batches())
    assert not runner_threads_started_since(before)
    assert result.interrupted and 3 <= result.end_step < 12
    assert int(result.edge_state["step"]) == int(result.cloud_state["step"]) == result.end_step
    cut = threads.run_sequential(*fresh(hierarchy), data[: result.end_step])
    assert leaves_equal(result.edge_state, cut.edge_state) and leaves_equal(result.cloud_state, cut.cloud_state)


@pytest.mark.parametrize("run", [threads.run_sequential, threads.run_pipelined])
def test_a_slow_checkpoint_writer_holds_training_back_instead_of_piling_up_state_copies(hierarchy, run):
    """Every pair is still written, in order; but with saves far slower than the cadence (one per
    step here), the sides wait for the writer, so only a few state copies exist at any time."""
    h, edge_state, cloud_state = fresh(hierarchy)
    edge_steps = []

    def counted_edge_step(*args):
        edge_steps.append(1)
        return h.edge_step(*args)

    lead = []

    def slow_save(snap):
        lead.append(len(edge_steps) - snap.step)  # how far training ran ahead of the snapshot being written
        time.sleep(0.2)

    data = batches(12)
    run(
        dataclasses.replace(h, edge_step=counted_edge_step),
        edge_state,
        cloud_state,
        data,
        snapshot_every=1,
        on_snapshot=slow_save,
    )
    assert len(lead) == 12  # every step's snapshot written
    # Without backpressure the edge finishes all 12 steps during the first 0.2 s save (lead 11).
    # With it: at most the writer's backlog of pairs, plus the steps the edge runs ahead of the cloud.
    assert max(lead) <= supervisor.WRITE_BACKLOG + 2 + 2


def test_a_side_running_ahead_keeps_only_its_newest_unpaired_copies():
    """The edge offers snapshots 2..10 before the cloud offers any (an outage): only the newest
    `_UNPAIRED_PER_SIDE` are kept, so step 2 can no longer pair and is skipped; the rest pair in order."""
    device = jax.devices("cpu")[0]
    run = supervisor.Supervisor(start_step=0, snapshot_every=2, on_snapshot=lambda snap: None, timeout_s=None)
    boundaries = [2, 4, 6, 8, 10]
    assert supervisor.UNPAIRED_PER_SIDE == 4
    for k in boundaries:
        run.offer("edge", k, {"step": np.int32(k)}, device)
        assert run._serve(block=False)
    assert sorted(run._pending["edge"]) == [4, 6, 8, 10]
    paired = []
    for k in boundaries:
        run.offer("cloud", k, {"step": np.int32(100 + k)}, device)
        run._serve(block=False)
        while not run._pairs.empty():
            step, edge_state, cloud_state = run._pairs.get_nowait()
            paired.append((step, int(edge_state["step"]), int(cloud_state["step"])))
            run._unwritten -= 1  # stands in for the writer thread
    assert paired == [(k, k, 100 + k) for k in [4, 6, 8, 10]]
    assert run._pending == {"edge": {}, "cloud": {}}
