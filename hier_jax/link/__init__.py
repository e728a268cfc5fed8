"""The edge-cloud link: its spec and presets (`spec`), the hand-off between the edge and cloud threads
(`channel`: the `Channel` interface and the default queue), the link's clock that both runners
replay (`clock`: serialisation, latency, outages, and the edge's outage buffer for the Ray driver),
and a link replayed in real time as a channel between threads (`simulated`)."""

from hier_jax.link.channel import Channel, QueueChannel
from hier_jax.link.clock import BufferedLink, LinkClock
from hier_jax.link.simulated import LinkStats, SimulatedLink
from hier_jax.link.spec import LINKS, Link, LinkConfig, custom_link, get_link, validate_link

__all__ = [
    "LINKS",
    "BufferedLink",
    "Channel",
    "Link",
    "LinkClock",
    "LinkConfig",
    "LinkStats",
    "QueueChannel",
    "SimulatedLink",
    "custom_link",
    "get_link",
    "validate_link",
]
