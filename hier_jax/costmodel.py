"""Training-time model of the edge-cloud schemes: pure Python over per-batch times, bytes and a link.

Everything here is arithmetic on numbers that come from elsewhere (a profile measured by
`hier_jax.profiler`, or typed in from a real board), so it runs without JAX. docs/runtime_model.md
derives the formulas; in brief, for one batch of B examples at a separation point k:

    F_e, B_e   edge stages 0..k, forward / backward+update (edge device)
    Hf, Hb     early-exit head, forward / backward+update (edge device)
    C          cloud stages k+1.. and classifier, forward+backward+update (cloud device)
    T          the whole model, forward+backward+update (cloud device)
    P, A, G, D bytes: quantized payload, float32 activations (+labels), float32 boundary gradient,
               raw uint8 batch (+labels); all counted from real arrays by the profiler
    up(n) = 8n / R_up + L,  down(n) = 8n / R_down + L,  ser(n) = 8n / R_up  (L: one-way latency)
    N batches per epoch, E epochs, M = N * E batches in all

    cloud_only              up(D) + T + (M - 1) * max(ser(D), T)      raw data streamed every epoch
    cloud_only_once         [up(D) + T + (N - 1) * max(ser(D), T)] + (E - 1) * N * T
                                                                       raw data set uploaded once
    split_learning          M * (F_e + up(A) + C + down(G) + B_e)     strictly sequential
    hierarchical_paper      M * (F_e + Hf + max(B_e + Hb, up(P) + C)) per batch, as the paper describes
    hierarchical_pipelined  W + up(P) + C + (M - 1) * max(W, ser(P), C),  W = F_e + Hf + B_e + Hb
                                                                       what runner.run_overlapped does

Epoch time is the total divided by E. In the pipelined forms the link is a pipeline stage: it
serializes one transfer after the other (ser), while the latency of each transfer overlaps the
next, so latency enters once, in the fill term. The assumption that matters most is whether the raw
data must cross the link every epoch (a sensor that streams new data, `cloud_only`) or only once
(`cloud_only_once`): hierarchical training sends fresh feature maps every epoch either way, because
the edge's weights, and so its features, change as it trains.
"""

from __future__ import annotations

import dataclasses
import math

SCHEMES = ("cloud_only", "cloud_only_once", "split_learning", "hierarchical_paper", "hierarchical_pipelined")
"""Valid `scheme` names for `training_time` and `epoch_time`."""


@dataclasses.dataclass(frozen=True)
class Link:
    """An edge-cloud link: bit rates in bit/s, one-way latency in s, and where the numbers come from."""
    name: str
    uplink_bps: float
    downlink_bps: float
    latency_s: float = 0.0
    source: str = ""

    def __post_init__(self):
        for field, rate in (("uplink_bps", self.uplink_bps), ("downlink_bps", self.downlink_bps)):
            if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
                raise ValueError(f"link {self.name!r}: {field} must be a positive bit rate, got {rate!r}")
        if not (isinstance(self.latency_s, (int, float)) and math.isfinite(self.latency_s) and self.latency_s >= 0):
            raise ValueError(f"link {self.name!r}: latency_s must be >= 0, got {self.latency_s!r}")

    def serialize_s(self, nbytes: float) -> float:
        """Time the uplink is busy with `nbytes` (no latency): what limits a pipelined stream."""
        return 8.0 * nbytes / self.uplink_bps

    def up_s(self, nbytes: float) -> float:
        """One transfer edge -> cloud, from the first bit sent to the last bit received."""
        return self.serialize_s(nbytes) + self.latency_s

    def down_s(self, nbytes: float) -> float:
        """One transfer cloud -> edge."""
        return 8.0 * nbytes / self.downlink_bps + self.latency_s


_NEUROSURGEON = ("Kang et al., Neurosurgeon, ASPLOS 2017: measured average uplink bandwidth of 3G 1.1 Mbps, "
                 "LTE 5.85 Mbps, Wi-Fi 18.88 Mbps")
_OFCOM = ("Ofcom, 4G and 3G mobile broadband performance, 2015 (five UK cities, 120,000 tests): average "
          "download 5.9 Mbit/s on 3G and 14.7 Mbit/s on 4G, latency 63.5 ms (3G) and 53.1 ms (4G), taken as "
          "round-trip times and halved for one-way")
_OOKLA_5G = ("Ookla, Growing and Slowing: The State of 5G Worldwide in 2021 (Speedtest Intelligence, Q3 2021): "
             "global median 5G download 166.13 Mbps, upload 21.08 Mbps; latency not given there, taken equal to "
             "4G's (Opensignal reported no significant 5G latency improvement over 4G in early deployments)")

LINKS: dict[str, Link] = {
    "3g": Link("3g", 1.1e6, 5.9e6, 63.5e-3 / 2, f"uplink: {_NEUROSURGEON}; downlink, latency: {_OFCOM}"),
    "4g": Link("4g", 5.85e6, 14.7e6, 53.1e-3 / 2, f"uplink: {_NEUROSURGEON}; downlink, latency: {_OFCOM}"),
    "5g": Link("5g", 21.08e6, 166.13e6, 53.1e-3 / 2, _OOKLA_5G),
    "wifi": Link("wifi", 18.88e6, 18.88e6, 0.0,
                 f"uplink: {_NEUROSURGEON}; downlink assumed equal to uplink and latency not modeled (no source)"),
}
"""Link presets; each one's `source` says where every number comes from and what is assumed."""


def get_link(name: str) -> Link:
    """A preset by name; ValueError listing the presets for anything else."""
    if name not in LINKS:
        raise ValueError(f"unknown link preset {name!r}; presets: {', '.join(LINKS)} "
                         f"(or custom_link(uplink_mbps, downlink_mbps, latency_ms))")
    return LINKS[name]


def custom_link(uplink_mbps: float, downlink_mbps: float | None = None, latency_ms: float = 0.0,
                name: str = "custom") -> Link:
    """A link at any rate (Mbit/s, 10^6 bit/s); the downlink defaults to the uplink's rate."""
    downlink_mbps = uplink_mbps if downlink_mbps is None else downlink_mbps
    return Link(name, uplink_mbps * 1e6, downlink_mbps * 1e6, latency_ms * 1e-3, "custom")


@dataclasses.dataclass(frozen=True)
class Workload:
    """Per-batch times (s) and bytes of one separation point and bit width, at the modeled batch size."""
    edge_fwd_s: float        # F_e: edge stages, forward (edge device)
    edge_bwd_s: float        # B_e: edge stages, backward + update
    head_fwd_s: float        # Hf: early exit, forward
    head_bwd_s: float        # Hb: early exit, backward + update
    cloud_train_s: float     # C: cloud stages + classifier, forward + backward + update (cloud device)
    full_train_s: float      # T: the whole model on the cloud device
    payload_bytes: int       # P: quantized feature map + labels, one batch
    activation_bytes: int    # A: float32 feature map + labels (vanilla split learning)
    gradient_bytes: int      # G: float32 boundary gradient
    raw_bytes: int           # D: uint8 images + labels
    batches_per_epoch: int   # N

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
    if scheme == "cloud_only":
        return _pipelined(link.up_s(w.raw_bytes) + w.full_train_s,
                          max(link.serialize_s(w.raw_bytes), w.full_train_s), m)
    if scheme == "cloud_only_once":
        first_epoch = _pipelined(link.up_s(w.raw_bytes) + w.full_train_s,
                                 max(link.serialize_s(w.raw_bytes), w.full_train_s), n)
        return first_epoch + (epochs - 1) * n * w.full_train_s
    if scheme == "split_learning":
        return m * (w.edge_fwd_s + link.up_s(w.activation_bytes) + w.cloud_train_s
                    + link.down_s(w.gradient_bytes) + w.edge_bwd_s)
    if scheme == "hierarchical_paper":
        return m * (w.edge_fwd_s + w.head_fwd_s
                    + max(w.edge_bwd_s + w.head_bwd_s, link.up_s(w.payload_bytes) + w.cloud_train_s))
    if scheme == "hierarchical_pipelined":
        edge = w.edge_fwd_s + w.head_fwd_s + w.edge_bwd_s + w.head_bwd_s
        return _pipelined(edge + link.up_s(w.payload_bytes) + w.cloud_train_s,
                          max(edge, link.serialize_s(w.payload_bytes), w.cloud_train_s), m)
    raise ValueError(f"unknown scheme {scheme!r}; valid: {', '.join(SCHEMES)}")


def epoch_time(scheme: str, w: Workload, link: Link, epochs: int = 1) -> float:
    """Average seconds per epoch over `epochs` epochs (fill and one-time uploads amortized)."""
    return training_time(scheme, w, link, epochs) / epochs


def reduction(time_s: float, baseline_s: float) -> float:
    """Fractional time saved against a baseline: 0.29 means 29 % faster, negative means slower."""
    return 1.0 - time_s / baseline_s
