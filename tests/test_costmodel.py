"""Cost model formulas against hand-computed cases, link presets and errors, and split selection."""

import dataclasses

import pytest

from hier_jax.link import LINKS, Link, custom_link, get_link
from hier_jax.runtime_model import costmodel as cm
from hier_jax.runtime_model import selection
from hier_jax.runtime_model.profile import Profile, SplitProfile, Timing

# 1 Mbit/s up, 2 Mbit/s down, 10 ms one way: 1,000 bytes take 8 ms to serialize up.
LINK = Link("test", 1e6, 2e6, 0.010)
W = cm.Workload(
    edge_fwd_s=0.1,
    edge_bwd_s=0.2,
    head_fwd_s=0.01,
    head_bwd_s=0.02,
    cloud_train_s=0.3,
    full_train_s=0.5,
    payload_bytes=1000,
    activation_bytes=8000,
    gradient_bytes=8000,
    raw_bytes=3000,
    batches_per_epoch=10,
)


def test_link_transfer_times():
    assert LINK.serialize_s(1000) == pytest.approx(0.008)
    assert LINK.up_s(1000) == pytest.approx(0.018)
    assert LINK.down_s(1000) == pytest.approx(0.014)  # 8,000 bit / 2 Mbit/s + 10 ms


def test_formulas_by_hand():
    # end_to_end: up(D) = 24 ms + 10 ms; T = 0.5 dominates ser(D) = 24 ms. 0.534 + 9 * 0.5
    assert cm.training_time("end_to_end", W, LINK) == pytest.approx(5.034)
    # split learning: 0.1 + (64 + 10 ms) + 0.3 + (32 + 10 ms) + 0.2 = 0.716 per batch, 10 batches
    assert cm.training_time("split_learning", W, LINK) == pytest.approx(7.16)
    # paper: 0.1 + 0.01 + max(0.2 + 0.02, 0.018 + 0.3) = 0.428 per batch
    assert cm.training_time("hierarchical_per_batch", W, LINK) == pytest.approx(4.28)
    # pipelined: edge 0.33; fill 0.33 + 0.018 + 0.3 = 0.648; then 9 * max(0.33, 0.008, 0.3)
    assert cm.training_time("hierarchical_pipelined", W, LINK) == pytest.approx(0.648 + 9 * 0.33)


def test_epochs_and_one_time_upload_by_hand():
    slow = Link("slow", 8e3, 8e3, 0.0)  # 1,000 bytes per second: raw 3,000 B takes 3 s per batch
    # streamed: 3 + 0.5 + (20 - 1) * 3 over 2 epochs
    assert cm.training_time("end_to_end", W, slow, epochs=2) == pytest.approx(60.5)
    # uploaded once: first epoch 3.5 + 9 * 3 = 30.5, second epoch compute only 10 * 0.5
    assert cm.training_time("end_to_end_once", W, slow, epochs=2) == pytest.approx(35.5)
    assert cm.epoch_time("end_to_end_once", W, slow, epochs=2) == pytest.approx(17.75)
    # one epoch: both cloud-only variants are the same thing
    assert cm.training_time("end_to_end_once", W, slow) == pytest.approx(cm.training_time("end_to_end", W, slow))
    # link-bound pipelined hierarchical: fill 0.33 + 1 + 0.3, then 19 batches of 1 s
    assert cm.training_time("hierarchical_pipelined", W, slow, epochs=2) == pytest.approx(1.63 + 19)
    assert cm.reduction(7.5, 10.0) == pytest.approx(0.25)


def test_step_time_is_the_period_once_the_pipeline_is_full_by_hand():
    # pipelined: max(W = 0.33, ser(P) = 8 ms, C = 0.3); latency only in the fill
    assert cm.step_time("hierarchical_pipelined", W, LINK) == pytest.approx(0.33)
    # sequential: W + up(P) + C = 0.33 + 0.018 + 0.3; split learning's 0.716 cycle
    assert cm.step_time("hierarchical_sequential", W, LINK) == pytest.approx(0.648)
    assert cm.step_time("split_learning", W, LINK) == pytest.approx(0.716)
    slow = Link("slow", 8e3, 8e3, 0.5)  # the link is the slowest stage: 3 s per raw batch, 1 s per payload
    assert cm.step_time("end_to_end", W, slow) == pytest.approx(3.0)
    assert cm.step_time("hierarchical_pipelined", W, slow) == pytest.approx(1.0)


@pytest.mark.parametrize("scheme", cm.MODELED)
def test_faster_link_is_never_slower(scheme):
    times = [
        cm.training_time(scheme, W, custom_link(mbps, latency_ms=ms))
        for mbps, ms in [(0.1, 100), (1.1, 30), (5.85, 30), (5.85, 5), (100, 5), (1000, 0)]
    ]
    assert all(a >= b for a, b in zip(times, times[1:], strict=False))


def test_scheme_ordering():
    # The paper's per-batch time is at least every pipeline stage and at least the edge's own work, so
    # pipelining can only lose the fill's edge backward; on this workload split learning is slowest.
    for link in LINKS.values():
        assert (
            cm.training_time("hierarchical_pipelined", W, link)
            <= cm.training_time("hierarchical_per_batch", W, link) + W.edge_bwd_s + W.head_bwd_s
        )
        assert cm.training_time("hierarchical_per_batch", W, link) <= cm.training_time("split_learning", W, link)


def test_presets_and_bad_links():
    assert get_link("3g").uplink_bps == 1.1e6 and get_link("4g").uplink_bps == 5.85e6
    assert get_link("wifi").uplink_bps == 18.88e6
    assert all(link.source for link in LINKS.values())
    with pytest.raises(ValueError, match="presets: 3g, 4g, 5g, wifi"):
        get_link("6g")
    for bad in (-1.0, 0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="positive bit rate"):
            custom_link(bad)
    with pytest.raises(ValueError, match="downlink_bps"):
        Link("x", 1e6, 0.0)
    with pytest.raises(ValueError, match="latency"):
        custom_link(1.0, latency_ms=-1)
    with pytest.raises(ValueError, match="unknown scheme"):
        cm.training_time("federated", W, LINK)
    with pytest.raises(ValueError, match="edge_fwd_s"):
        dataclasses.replace(W, edge_fwd_s=-0.1)


def _profile(batch: int = 2) -> Profile:
    """Three stages of known cost; payload shrinks with depth, edge memory grows with it."""
    t = Timing(fwd_s=1.0, train_s=3.0, fwd_flops=1.0, train_flops=3.0)
    head = Timing(fwd_s=0.0, train_s=0.0, fwd_flops=0.0, train_flops=0.0)
    splits = tuple(
        SplitProfile(
            f"s{i}",
            i,
            (1, 1, 1),
            head,
            {4: payload},
            4 * payload,
            4 * payload,
            edge_param_bytes=100 * (i + 1),
            edge_stat_bytes=0,
            edge_residual_bytes_per_example=1000 * (i + 1),
        )
        for i, payload in enumerate((8000, 4000, 500))
    )
    return Profile("toy", (1, 1, 1), 2, "test", batch, ("s0", "s1", "s2"), (t, t, t), t, splits, batch, 1000, None)


def test_selection_finds_true_minimum_and_respects_budget():
    p = _profile()
    link = Link("1 kB/s", 8e3, 8e3, 0.0)
    # per batch: edge 3(k+1) s, link 8 / 4 / 0.5 s, cloud 3(3-k) s -> bottlenecks 9, 6, 9: s1 wins
    sel = selection.select_split(p, p, link, batch=2, num_examples=20, memory_budget_bytes=10**9)
    assert sel.best.split == "s1"
    brute = {c.split: c.epoch_s for c in sel.candidates}
    assert sel.best.epoch_s == min(brute.values())
    assert brute["s1"] == pytest.approx((6 + 4 + 6) + 9 * 6)  # fill 6 + 4 + 6, then 9 batches of 6 s
    assert [c.epoch_s for c in sel.candidates] == sorted(c.epoch_s for c in sel.candidates)
    # memory of s1 at batch 2: 3 * 200 + 2 * 2000 = 4,600 B; a budget of 4,000 B leaves only s0
    assert p.split("s1").edge_memory_bytes(2) == 4600
    tight = selection.select_split(p, p, link, batch=2, num_examples=20, memory_budget_bytes=4000)
    assert tight.best.split == "s0" and all(c.edge_memory_bytes <= 4000 for c in tight.candidates if c.eligible)
    with pytest.raises(ValueError, match="below every separation point"):
        selection.select_split(p, p, link, batch=2, num_examples=20, memory_budget_bytes=2000)


def test_selection_accuracy_tolerance():
    p = _profile()
    link = Link("1 kB/s", 8e3, 8e3, 0.0)
    acc = {"s0": 0.90, "s1": 0.85, "s2": 0.895}
    sel = selection.select_split(
        p, p, link, batch=2, num_examples=20, memory_budget_bytes=10**9, accuracy=acc, max_accuracy_drop=0.01
    )
    # s0 and s2 are within 0.01 of the best; both bottleneck at 9 s, s2 has the shorter fill (12.5 s vs 20 s)
    assert sel.best.split == "s2" and not next(c for c in sel.candidates if c.split == "s1").eligible
    loose = selection.select_split(
        p, p, link, batch=2, num_examples=20, memory_budget_bytes=10**9, accuracy=acc, max_accuracy_drop=0.1
    )
    assert loose.best.split == "s1"


def test_selection_tolerance_from_a_reference_accuracy():
    """Measured from end-to-end's accuracy (0.905) rather than the table's best, a 0.01 tolerance admits
    s0 (0.90) alone; a reference no point comes within fails with both figures named."""
    p = _profile()
    link = Link("1 kB/s", 8e3, 8e3, 0.0)
    acc = {"s0": 0.90, "s1": 0.85, "s2": 0.894}
    sel = selection.select_split(
        p,
        p,
        link,
        batch=2,
        num_examples=20,
        memory_budget_bytes=10**9,
        accuracy=acc,
        max_accuracy_drop=0.01,
        reference_accuracy=0.905,
    )
    assert sel.best.split == "s0"
    assert [c.split for c in sel.candidates if c.eligible] == ["s0"]
    with pytest.raises(ValueError, match=r"reference accuracy 0\.9500 \(best measured: 0\.9000\)"):
        selection.select_split(
            p,
            p,
            link,
            batch=2,
            num_examples=20,
            memory_budget_bytes=10**9,
            accuracy=acc,
            max_accuracy_drop=0.01,
            reference_accuracy=0.95,
        )


def test_workload_checks_batch_and_bits():
    p = _profile()
    with pytest.raises(ValueError, match="with_payload_batch"):
        selection.workload(p, p, "s0", 4, batch=4, num_examples=20)
    with pytest.raises(ValueError, match="bits"):
        selection.workload(p, p, "s0", 8, batch=2, num_examples=20)
    with pytest.raises(ValueError, match="no separation point"):
        selection.workload(p, p, "s9", 4, batch=2, num_examples=20)
