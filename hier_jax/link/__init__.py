"""The edge-cloud link: its spec and presets (`spec`), the hand-off between the edge and cloud threads
(`channel`: the `Channel` interface and the default queue), and a link replayed in real time as a
channel (`simulated`: delays, scripted outages, drops)."""

from hier_jax.link.channel import Channel, QueueChannel
from hier_jax.link.simulated import LinkStats, SimulatedLink
from hier_jax.link.spec import LINKS, Link, custom_link, get_link

__all__ = ["LINKS", "Channel", "Link", "LinkStats", "QueueChannel", "SimulatedLink", "custom_link", "get_link"]
