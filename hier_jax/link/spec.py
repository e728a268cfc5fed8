"""A link between the edge and the cloud: its bit rates and latency (`Link`), as the cost model reads
them, and the presets (`LINKS`) with the source of every number; `get_link` and `custom_link` build one."""

from __future__ import annotations

import dataclasses
import math

from hier_jax.errors import ConfigError, check
from hier_jax.flags import comma_list, int_pair, option


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


_NEUROSURGEON = (
    "Kang et al., Neurosurgeon, ASPLOS 2017: measured average uplink bandwidth of 3G 1.1 Mbps, "
    "LTE 5.85 Mbps, Wi-Fi 18.88 Mbps"
)
_OFCOM = (
    "Ofcom, 4G and 3G mobile broadband performance, 2015 (five UK cities, 120,000 tests): average "
    "download 5.9 Mbit/s on 3G and 14.7 Mbit/s on 4G, latency 63.5 ms (3G) and 53.1 ms (4G), taken as "
    "round-trip times and halved for one-way"
)
_OOKLA_5G = (
    "Ookla, Growing and Slowing: The State of 5G Worldwide in 2021 (Speedtest Intelligence, Q3 2021): "
    "global median 5G download 166.13 Mbps, upload 21.08 Mbps; latency not given there, taken equal to "
    "4G's (Opensignal reported no significant 5G latency improvement over 4G in early deployments)"
)

LINKS: dict[str, Link] = {
    "3g": Link("3g", 1.1e6, 5.9e6, 63.5e-3 / 2, f"uplink: {_NEUROSURGEON}; downlink, latency: {_OFCOM}"),
    "4g": Link("4g", 5.85e6, 14.7e6, 53.1e-3 / 2, f"uplink: {_NEUROSURGEON}; downlink, latency: {_OFCOM}"),
    "5g": Link("5g", 21.08e6, 166.13e6, 53.1e-3 / 2, _OOKLA_5G),
    "wifi": Link(
        "wifi",
        18.88e6,
        18.88e6,
        0.0,
        f"uplink: {_NEUROSURGEON}; downlink assumed equal to uplink and latency not modeled (no source)",
    ),
}
"""Link presets; each one's `source` says where every number comes from and what is assumed."""


def get_link(name: str) -> Link:
    """A preset by name; ValueError listing the presets for anything else."""
    if name not in LINKS:
        raise ValueError(
            f"unknown link preset {name!r}; presets: {', '.join(LINKS)} "
            f"(or custom_link(uplink_mbps, downlink_mbps, latency_ms))"
        )
    return LINKS[name]


def custom_link(
    uplink_mbps: float, downlink_mbps: float | None = None, latency_ms: float = 0.0, name: str = "custom"
) -> Link:
    """A link at any rate (Mbit/s, 10^6 bit/s); the downlink defaults to the uplink's rate."""
    downlink_mbps = uplink_mbps if downlink_mbps is None else downlink_mbps
    return Link(name, uplink_mbps * 1e6, downlink_mbps * 1e6, latency_ms * 1e-3, "custom")


@dataclasses.dataclass(frozen=True)
class LinkConfig:
    """The simulated link of a run, the same for the in-process threads and the Ray workers: a preset
    for every edge (or one per edge), its delays scaled, outages scripted in edge steps, and the
    payloads an edge buffers while its link is down (older ones are dropped)."""

    presets: tuple[str, ...] = option(
        (),
        f"simulate a link: one preset for every edge, or one per edge (3g,wifi); presets: {', '.join(LINKS)}",
        flag="--link",
        aliases=("--links",),
        parse=comma_list,
        metavar="PRESET[,PRESET...]",
    )
    time_scale: float = option(1.0, "multiply the link's delays by this", run_only=True)
    outages: tuple[tuple[int, int], ...] = option(
        (),
        "link down from edge step A until step B (repeatable)",
        flag="--outage",
        repeat=True,
        metavar="A:B",
        parse=int_pair("A:B", "two step numbers with 0 <= A < B", ordered=True),
    )
    buffer: int = option(4, "payloads an edge buffers while its link is down", flag="--link-buffer")

    def preset(self, edge: int) -> Link | None:
        """The link of edge `edge` (None: an instant hand-off)."""
        if not self.presets:
            return None
        return LINKS[self.presets[0] if len(self.presets) == 1 else self.presets[edge]]


def validate_link(config: LinkConfig, edges: int = 1) -> None:
    """ConfigError naming the flag, before anything starts."""
    check(
        len(config.presets) in (0, 1, edges),
        "--link",
        ",".join(config.presets),
        f"one preset, or one per edge ({edges})",
    )
    for name in config.presets:
        check(name in LINKS, "--link", name, ", ".join(LINKS))
    check(
        math.isfinite(config.time_scale) and config.time_scale > 0,
        "--time-scale",
        config.time_scale,
        "a finite number > 0",
    )
    check(config.buffer >= 1, "--link-buffer", config.buffer, "an integer >= 1")
    for a, b in config.outages:
        check(0 <= a < b, "--outage", f"{a}:{b}", "A:B, two step numbers with 0 <= A < B")
    if config.outages and not config.presets:
        raise ConfigError("--outage needs --link (outages are scripted on a simulated link)")
