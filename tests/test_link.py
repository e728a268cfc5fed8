"""The link: its clock against hand-derived times, the outage buffer's drops, and runs over it
through the scheduler (delays really waited for, drops counted, checkpoints paired across an outage)."""

import dataclasses

import numpy as np
import pytest

from hier_jax import train
from hier_jax.config import ExperimentConfig
from hier_jax.link import BufferedLink, LinkClock, LinkConfig, custom_link, get_link
from hier_jax.run.checkpoint import RunCheckpoints
from hier_jax.run.record import RunRecord, read_meta


def test_one_transfer_takes_its_bits_on_the_wire_plus_the_latency():
    clock = LinkClock(custom_link(1.0, latency_ms=20.0))  # 10,000 B at 1 Mbit/s: 80 ms on the wire
    assert clock.transmit(10_000, now=5.0) == pytest.approx(5.0 + 0.080 + 0.020)


def test_consecutive_transfers_share_the_wire_and_overlap_their_latencies():
    clock = LinkClock(custom_link(1.0, latency_ms=30.0))  # 5,000 B: 40 ms each on the wire
    arrivals = [clock.transmit(5_000, now=0.0) for _ in range(3)]
    # the last bit of transfer i leaves at 40 (i + 1) ms and arrives 30 ms later
    assert arrivals == pytest.approx([0.070, 0.110, 0.150])
    assert clock.transmit(5_000, now=1.0) == pytest.approx(1.070)  # an idle wire starts at once
    clock.reset()
    assert clock.transmit(5_000, now=0.0) == pytest.approx(0.070)


def test_time_scale_multiplies_both_delays():
    clock = LinkClock(get_link("3g"), time_scale=1e-3)  # 137,500 B: 1 s on 3G's 1.1 Mbit/s
    link = get_link("3g")
    assert clock.transmit(137_500, now=0.0) == pytest.approx(1e-3 * (1.0 + link.latency_s))


def test_bad_clock_and_buffer_arguments():
    link = custom_link(1.0)
    with pytest.raises(ValueError, match="outage"):
        LinkClock(link, outages=[(5, 5)])
    with pytest.raises(ValueError, match="time_scale"):
        LinkClock(link, time_scale=0)
    with pytest.raises(ValueError, match="capacity"):
        BufferedLink(LinkClock(link), 0)


def test_an_outage_buffers_then_drops_the_oldest_and_releases_in_step_order():
    link = BufferedLink(LinkClock(custom_link(1000.0), outages=[(3, 9)]), capacity=4)
    released, dropped = [], []
    for t in range(12):
        leaving, lost = link.send(t, 100, now=float(t))
        released += [s for s, _ in leaving]
        dropped += lost
        if t == 8:  # six payloads (3..8) met a buffer of four: the two oldest went
            assert (dropped, link.held, released) == ([3, 4], 4, [0, 1, 2])
    assert dropped == [3, 4] and released == [0, 1, 2, 5, 6, 7, 8, 9, 10, 11]


def test_an_outage_loses_nothing_when_the_buffer_suffices_and_one_past_the_end_ends_at_close():
    link = BufferedLink(LinkClock(custom_link(1000.0), outages=[(2, 7)]), capacity=5)
    sent = [link.send(t, 100, now=0.0) for t in range(10)]
    assert all(not lost for _, lost in sent)
    assert [s for leaving, _ in sent for s, _ in leaving] == list(range(10))
    link = BufferedLink(LinkClock(custom_link(1000.0), outages=[(1, 100)]), capacity=8)
    assert [s for t in range(5) for s, _ in link.send(t, 10, now=0.0)[0]] == [0]
    assert [s for s, _ in link.close(now=1.0)] == [1, 2, 3, 4] and link.held == 0


def test_link_config_gives_each_edge_its_preset():
    assert LinkConfig().preset(0) is None
    assert LinkConfig(presets=("3g",)).preset(3) == get_link("3g")
    assert LinkConfig(presets=("3g", "wifi")).preset(1) == get_link("wifi")


# ----------------------------------------------------------------------------- runs over a link

CONFIG = ExperimentConfig(
    model="resnet18_tv", dataset="digits", split="layer1_1", width=4, batch_size=16, max_steps=10, checkpoint_every=0
)


@pytest.fixture(scope="module")
def setup(digits):
    return train.build(CONFIG, digits)


def over(setup, **link) -> train.Setup:
    config = dataclasses.replace(setup.config, link=LinkConfig(**link))
    return dataclasses.replace(setup, config=config)


def test_a_run_through_an_outage_trains_the_edge_throughout_and_the_cloud_on_what_arrived(setup):
    result = train.train(over(setup, presets=("wifi",), time_scale=1e-3, outages=((3, 8),), buffer=2), progress=False)
    edge = result.edges[0]
    assert len(result.edge_metrics["loss"]) == 10  # the edge trained through the outage
    # steps 3..7 met a buffer of two: 3, 4 and 5 dropped, 6 and 7 released when step 8 is sent
    assert edge.link_dropped == [3, 4, 5] and (edge.sent, edge.delivered, edge.dropped) == (10, 7, 3)
    np.testing.assert_array_equal(result.cloud_steps, [0, 1, 2, 6, 7, 8, 9])
    assert result.record.cloud["edge"] == [0] * 7


def test_a_run_whose_buffer_holds_the_outage_trains_exactly_the_run_without_a_link(setup):
    reference = train.train(setup, schedule="sequential", progress=False)
    result = train.train(over(setup, presets=("wifi",), time_scale=1e-3, outages=((3, 8),), buffer=10), progress=False)
    assert result.edges[0].dropped == 0
    np.testing.assert_array_equal(result.cloud_steps, np.arange(10))
    np.testing.assert_array_equal(result.cloud_metrics["loss"], reference.cloud_metrics["loss"])
    np.testing.assert_array_equal(result.edge_metrics["loss"], reference.edge_metrics["loss"])


def test_the_cloud_waits_for_each_payload_to_cross_the_link(setup):
    """Ten payloads over 3G slowed so that each takes 0.15 s on the wire: the run cannot end before
    the last one has arrived, however fast the steps are."""
    nbytes = train.payload_nbytes(setup, "hierarchical")
    link = get_link("3g")
    scale = 0.15 / link.serialize_s(nbytes)
    result = train.train(over(setup, presets=("3g",), time_scale=scale), progress=False)
    assert result.wall_s >= 10 * 0.15


def test_outage_checkpoints_pair_the_cloud_state_before_the_first_later_payload(setup, tmp_path):
    """With payloads dropped, the checkpoint at step k holds the cloud's state before it trained on the
    first payload of a step >= k, and the edge's after its step k - 1."""
    run = over(setup, presets=("wifi",), time_scale=1e-3, outages=((2, 8),), buffer=1)
    run = dataclasses.replace(run, config=dataclasses.replace(run.config, checkpoint_every=2, keep_checkpoints=10))
    result = train.train(run, progress=False, checkpoint_dir=tmp_path)
    dropped = set(result.edges[0].link_dropped)
    assert dropped == {2, 3, 4, 5, 6}
    edge_template, cloud_template = train.fresh_states(setup)
    with RunCheckpoints(tmp_path, read_only=True) as checkpoints:
        assert checkpoints.steps() == [2, 4, 6, 8, 10]
        for k in checkpoints.steps():
            edges, cloud, meta = checkpoints.restore({"0": edge_template}, cloud_template, k)
            consumed = [t for t in range(10) if t not in dropped and t < k]
            assert int(edges["0"]["step"]) == k and int(cloud["step"]) == len(consumed)
            record = RunRecord.from_json(read_meta(meta)["record"])
            np.testing.assert_array_equal(record.cloud_metrics()["step"], consumed)
    assert int(result.cloud_state["step"]) == 10 - len(dropped)
