"""The edge-cloud link: its spec and presets (`spec`), and its clock (`clock`: serialisation, latency,
scripted outages, and the edge's drop-oldest buffer while the link is down), which the scheduler
replays between an edge's step and the cloud's, on every backend."""

from hier_jax.link.clock import BufferedLink, LinkClock
from hier_jax.link.spec import LINKS, Link, LinkConfig, custom_link, get_link, validate_link

__all__ = ["LINKS", "BufferedLink", "Link", "LinkClock", "LinkConfig", "custom_link", "get_link", "validate_link"]
