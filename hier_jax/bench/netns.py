"""A real link of a given rate on one host: two network namespaces (the edge's, the cloud's) joined
by a veth pair, each direction shaped by the kernel (an `htb` class on each end's egress: the edge's
is the upload, the cloud's the download). Segmentation offload is off on both ends (`gso_max_segs 1`),
so that every frame is one packet of at most the MTU, as on a real link: the shaper and the
interface counters then see each packet's headers (with offload they count one header per 64 kB
super-packet, and a 1 MB send shows 0.2 % overhead instead of the 4.6 % of its TCP/IP/Ethernet
headers at 1500 B). Propagation delay is not added: `netem` is not in every
kernel (not in this one), so a preset's latency is left to the cost model.

Needs root and iproute2 (`ip`, `tc`). Names carry this process's pid, so that a run killed before
it could clean up leaves namespaces the next run finds and removes (`remove_leftovers`).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import shutil
import subprocess
from pathlib import Path

PREFIX = "hj"
_COUNT = itertools.count()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def unavailable() -> str | None:
    """None when namespaces can be made and shaped here; else the one line that says why not."""
    if os.geteuid() != 0:
        return "shaping a link needs root (network namespaces and tc); use --unshaped for loopback"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"shaping a link needs iproute2 ({', '.join(missing)} not found); use --unshaped for loopback"
    probe = f"{PREFIX}{os.getpid()}p"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"network namespaces are not permitted here ({made.stderr.strip()}); use --unshaped for loopback"
    _ip("netns", "del", probe, check=False)
    return None


def namespaces() -> list[str]:
    listed = _ip("netns", "list", check=False).stdout.split("\n")
    return [line.split()[0] for line in listed if line.strip()]


def _owner(name: str) -> int | None:
    digits = "".join(itertools.takewhile(str.isdigit, name[len(PREFIX) :]))
    return int(digits) if name.startswith(PREFIX) and digits else None


def remove_leftovers() -> list[str]:
    """Remove the namespaces (and with them their veths) of runs whose process is gone; their names."""
    removed = []
    for name in namespaces():
        pid = _owner(name)
        if pid is not None and pid != os.getpid() and not Path(f"/proc/{pid}").exists():
            _ip("netns", "del", name, check=False)
            removed.append(name)
    return removed


@dataclasses.dataclass
class ShapedLink:
    """`with ShapedLink(up_mbit, down_mbit) as link:` the two namespaces, up and shaped; `link.run`
    starts a process in one of them; everything is removed on every way out of the block."""

    up_mbit: float
    down_mbit: float
    edge_ip: str = "10.201.0.1"
    cloud_ip: str = "10.201.0.2"

    def __post_init__(self):
        tag = f"{PREFIX}{os.getpid()}x{next(_COUNT)}"
        self.edge_ns, self.cloud_ns = f"{tag}e", f"{tag}c"
        self.edge_if, self.cloud_if = f"{tag}e0", f"{tag}c0"
        for rate in (self.up_mbit, self.down_mbit):
            if not rate > 0:
                raise ValueError(f"a link's rate must be positive, got {rate} Mbit/s")

    def __enter__(self) -> ShapedLink:
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _create(self) -> None:
        _ip("netns", "add", self.edge_ns)
        _ip("netns", "add", self.cloud_ns)
        _ip("link", "add", self.edge_if, "type", "veth", "peer", "name", self.cloud_if)
        for ns, interface, address, rate in (
            (self.edge_ns, self.edge_if, self.edge_ip, self.up_mbit),
            (self.cloud_ns, self.cloud_if, self.cloud_ip, self.down_mbit),
        ):
            _ip("link", "set", interface, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{address}/30", "dev", interface)
            _ip("-n", ns, "link", "set", "dev", interface, "gso_max_segs", "1")
            _ip("-n", ns, "link", "set", interface, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            kbit = f"{round(rate * 1000)}kbit"
            tc = ["ip", "netns", "exec", ns, "tc"]
            subprocess.run([*tc, "qdisc", "add", "dev", interface, "root", "handle", "1:", "htb", "default", "1"],
                           check=True, capture_output=True)  # fmt: skip
            subprocess.run([*tc, "class", "add", "dev", interface, "parent", "1:", "classid", "1:1", "htb",
                            "rate", kbit, "ceil", kbit], check=True, capture_output=True)  # fmt: skip

    def close(self) -> None:
        """Remove both namespaces (their veth ends go with them); idempotent."""
        for ns in (self.edge_ns, self.cloud_ns):
            _ip("netns", "del", ns, check=False)

    def run(self, side: str, argv: list[str], **popen) -> subprocess.Popen:
        """Start `argv` inside the edge's or the cloud's namespace."""
        ns = {"edge": self.edge_ns, "cloud": self.cloud_ns}[side]
        return subprocess.Popen(["ip", "netns", "exec", ns, *argv], **popen)

    def counters(self) -> dict[str, int]:
        """Bytes the edge's end has sent (up) and received (down), every frame and header included."""
        path = f"/sys/class/net/{self.edge_if}/statistics"
        read = ["ip", "netns", "exec", self.edge_ns, "cat", f"{path}/tx_bytes", f"{path}/rx_bytes"]
        up, down = subprocess.run(read, capture_output=True, text=True, check=True).stdout.split()
        return {"up": int(up), "down": int(down)}
