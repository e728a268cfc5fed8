"""Training-time model of the edge-cloud schemes: pure Python over per-batch times, bytes and a link.

Everything here is arithmetic on numbers that come from elsewhere (a profile measured by
`hier_jax.runtime_model.profiler`, or typed in from a real board), so it runs without JAX. docs/runtime_model.md
derives the formulas; in brief, for one batch of B examples at a separation point k:

    F_e, B_e   edge stages 0..k, forward / backward+update (edge device)
    Hf, Hb     early-exit head, forward / backward+update (edge device)
    C          cloud stages k+1.. and classifier, forward+backward+update (cloud device)
    T          the whole model, forward+backward+update (cloud device)
    P, A, G, D bytes: quantized payload, float32 activations (+labels), float32 boundary gradient,
               raw uint8 batch (+labels); all counted from real arrays by the profiler
    up(n) = 8n / R_up + L,  down(n) = 8n / R_down + L,  ser(n) = 8n / R_up  (L: one-way latency)
    N batches per epoch, E epochs, M = N * E batches in all

    end_to_end              up(D) + T + (M - 1) * max(ser(D), T)      raw data streamed every epoch
    end_to_end_once         [up(D) + T + (N - 1) * max(ser(D), T)] + (E - 1) * N * T
                                                                       raw data set uploaded once
    split_learning          M * (F_e + up(A) + C + down(G) + B_e)     strictly sequential
    hierarchical_sequential M * (W + up(P) + C),  W = F_e + Hf + B_e + Hb
                                                                       the edge waits for the cloud
    hierarchical_per_batch  M * (F_e + Hf + max(B_e + Hb, up(P) + C)) per batch, as the paper describes
    hierarchical_pipelined  W + up(P) + C + (M - 1) * max(W, ser(P), C)
                                                                       the edge runs ahead of the cloud

The names are the training scheme (end_to_end, split_learning, hierarchical: what trains) with the
schedule (sequential, pipelined: how edge and cloud take turns) where a scheme has more than one;
`end_to_end` is the paper's "cloud-only" baseline: the whole model trained in the cloud on raw data.
`per_batch` is the paper's schedule: each batch's edge backward pass overlaps its own upload and
cloud step, but the next batch waits. Epoch time is the total divided by E. In the pipelined forms
the link is a pipeline stage: it serializes one transfer after the other (ser), while the latency
of each transfer overlaps the next, so latency enters once, in the fill term. The assumption that
matters most is whether the raw data must cross the link every epoch (a sensor that streams new
data, `end_to_end`) or only once (`end_to_end_once`): hierarchical training sends fresh feature maps
every epoch either way, because the edge's weights, and so its features, change as it trains.
"""

from __future__ import annotations

import dataclasses
import math

from hier_jax.link import Link

MODELED = (
    "end_to_end",
    "end_to_end_once",
    "split_learning",
    "hierarchical_sequential",
    "hierarchical_per_batch",
    "hierarchical_pipelined",
)
"""Valid names for `training_time` and `epoch_time`: a scheme, with its schedule where it has several."""


def modeled(scheme: str, schedule: str = "pipelined") -> str:
    """The cost model's name of a run's (scheme, schedule): split learning is always sequential, and
    end-to-end training streams its data while it trains."""
    if scheme == "hierarchical":
        return f"hierarchical_{schedule}"
    return scheme


@dataclasses.dataclass(frozen=True)
class Workload:
    """Per-batch times (s) and bytes of one separation point and bit width, at the modeled batch size."""

    edge_fwd_s: float  # F_e: edge stages, forward (edge device)
    edge_bwd_s: float  # B_e: edge stages, backward + update
    head_fwd_s: float  # Hf: early exit, forward
    head_bwd_s: float  # Hb: early exit, backward + update
    cloud_train_s: float  # C: cloud stages + classifier, forward + backward + update (cloud device)
    full_train_s: float  # T: the whole model on the cloud device
    payload_bytes: int  # P: quantized feature map + labels, one batch
    activation_bytes: int  # A: float32 feature map + labels (vanilla split learning)
    gradient_bytes: int  # G: float32 boundary gradient
    raw_bytes: int  # D: uint8 images + labels
    batches_per_epoch: int  # N

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"workload {field.name} must be finite and >= 0, got {value!r}")
        if self.batches_per_epoch < 1:
            raise ValueError(f"batches_per_epoch must be >= 1, got {self.batches_per_epoch}")


def _pipelined(first: float, period: float, batches: int) -> float:
    """A pipeline whose first batch takes `first` and each later one `period` (its slowest stage)."""
    return first + (batches - 1) * period


def training_time(scheme: str, w: Workload, link: Link, epochs: int = 1) -> float:
    """Total seconds to train `epochs` epochs under `scheme` (formulas in the module docstring)."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    n = w.batches_per_epoch
    m = n * epochs
    if scheme == "end_to_end":
        return _pipelined(
            link.up_s(w.raw_bytes) + w.full_train_s, max(link.serialize_s(w.raw_bytes), w.full_train_s), m
        )
    if scheme == "end_to_end_once":
        first_epoch = _pipelined(
            link.up_s(w.raw_bytes) + w.full_train_s, max(link.serialize_s(w.raw_bytes), w.full_train_s), n
        )
        return first_epoch + (epochs - 1) * n * w.full_train_s
    if scheme == "split_learning":
        return m * (
            w.edge_fwd_s
            + link.up_s(w.activation_bytes)
            + w.cloud_train_s
            + link.down_s(w.gradient_bytes)
            + w.edge_bwd_s
        )
    if scheme == "hierarchical_sequential":
        edge = w.edge_fwd_s + w.head_fwd_s + w.edge_bwd_s + w.head_bwd_s
        return m * (edge + link.up_s(w.payload_bytes) + w.cloud_train_s)
    if scheme == "hierarchical_per_batch":
        return m * (
            w.edge_fwd_s + w.head_fwd_s + max(w.edge_bwd_s + w.head_bwd_s, link.up_s(w.payload_bytes) + w.cloud_train_s)
        )
    if scheme == "hierarchical_pipelined":
        edge = w.edge_fwd_s + w.head_fwd_s + w.edge_bwd_s + w.head_bwd_s
        return _pipelined(
            edge + link.up_s(w.payload_bytes) + w.cloud_train_s,
            max(edge, link.serialize_s(w.payload_bytes), w.cloud_train_s),
            m,
        )
    raise ValueError(f"unknown scheme {scheme!r}; valid: {', '.join(MODELED)}")


def step_time(scheme: str, w: Workload, link: Link) -> float:
    """Seconds between two consecutive cloud steps once a run is under way (its fill paid): what a
    benchmark times after its warm-up. The total for two batches less the total for one, so it is
    the formula's own period (pipelined forms) or per-batch cycle (the others)."""
    one, two = (dataclasses.replace(w, batches_per_epoch=n) for n in (1, 2))
    return training_time(scheme, two, link) - training_time(scheme, one, link)


def epoch_time(scheme: str, w: Workload, link: Link, epochs: int = 1) -> float:
    """Average seconds per epoch over `epochs` epochs (fill and one-time uploads amortized)."""
    return training_time(scheme, w, link, epochs) / epochs


def reduction(time_s: float, baseline_s: float) -> float:
    """Fractional time saved against a baseline: 0.29 means 29 % faster, negative means slower."""
    return 1.0 - time_s / baseline_s
