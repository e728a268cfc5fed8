"""The shaped link between two network namespaces: made, shaped in each direction, counted, and
removed on every way out (a leftover of a killed run is found and removed). Skips, with the reason,
where namespaces are not permitted."""

import subprocess
import sys

import pytest

from hier_jax.bench import netns

REASON = netns.unavailable()
needs_netns = pytest.mark.skipif(REASON is not None, reason=REASON or "")

RECEIVE = """
import socket, sys
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
conn, _ = server.accept()
total = 0
while data := conn.recv(1 << 16):
    total += len(data)
print(total, flush=True)
"""
SEND = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
start = time.perf_counter()
s.sendall(b"x" * int(sys.argv[3]))
s.shutdown(socket.SHUT_WR)
s.recv(1)  # the peer closes once it has read everything: the bytes have crossed the link
print(time.perf_counter() - start, flush=True)
"""


def transfer(link: netns.ShapedLink, sender: str, nbytes: int) -> float:
    """Seconds to send `nbytes` from `sender`'s namespace to the other one over TCP."""
    receiver = "cloud" if sender == "edge" else "edge"
    address = link.cloud_ip if receiver == "cloud" else link.edge_ip
    server = link.run(receiver, [sys.executable, "-c", RECEIVE, address, "5301"], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        sent = subprocess.run(
            ["ip", "netns", "exec", link.edge_ns if sender == "edge" else link.cloud_ns, sys.executable, "-c", SEND,
             address, "5301", str(nbytes)], capture_output=True, text=True, check=True, timeout=60,
        )  # fmt: skip
        assert int(server.stdout.readline()) == nbytes
        return float(sent.stdout)
    finally:
        server.kill()
        server.wait()


@needs_netns
def test_each_direction_is_shaped_to_its_rate_and_counted_on_the_interface():
    nbytes = 400_000
    with netns.ShapedLink(up_mbit=4, down_mbit=16) as link:
        before = link.counters()
        up_s = transfer(link, "edge", nbytes)
        down_s = transfer(link, "cloud", nbytes)
        after = link.counters()
        names = (link.edge_ns, link.cloud_ns)
        assert set(names) <= set(netns.namespaces())
    assert not set(names) & set(netns.namespaces())  # removed with the block
    # the kernel's shaper, not a model: 400 kB at 4 Mbit/s takes at least 0.8 s, at 16 Mbit/s 0.2 s
    assert up_s >= nbytes * 8 / 4e6 * 0.9 and down_s >= nbytes * 8 / 16e6 * 0.9, (up_s, down_s)
    assert up_s > 2 * down_s  # the two directions have their own rates
    sent, received = after["up"] - before["up"], after["down"] - before["down"]
    # every 1500 B frame's headers (Ethernet 14, IP 20, TCP 32 for 1448 B of data: 4.6 %), counted and
    # shaped as a real link carries them (no segmentation offload into 64 kB super-packets), and the
    # ACKs of the other direction's transfer (66 B for about every second frame: 2.3 %)
    assert nbytes * 1.045 <= sent < nbytes * 1.1 and nbytes * 1.045 <= received < nbytes * 1.1, (sent, received)


@needs_netns
def test_the_link_is_removed_when_its_block_raises_and_a_killed_runs_leftover_by_the_next_run():
    with pytest.raises(RuntimeError, match="inside"):
        with netns.ShapedLink(up_mbit=1, down_mbit=1) as link:
            names = (link.edge_ns, link.cloud_ns)
            raise RuntimeError("inside")
    assert not set(names) & set(netns.namespaces())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = f"{netns.PREFIX}{dead.pid}x0e"  # what a run with that pid, killed, would have left
    subprocess.run(["ip", "netns", "add", stale], check=True)
    mine = netns.ShapedLink(up_mbit=1, down_mbit=1)
    with mine:
        assert stale in netns.remove_leftovers()
        assert mine.edge_ns in netns.namespaces()  # a live run's are not leftovers
    assert stale not in netns.namespaces()


def test_without_root_it_says_so_in_one_line(monkeypatch):
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    line = netns.unavailable()
    assert line is not None and "needs root" in line and "--unshaped" in line and "\n" not in line
    with pytest.raises(ValueError, match="rate must be positive"):
        netns.ShapedLink(up_mbit=0, down_mbit=1)


def test_an_owner_pid_is_read_from_the_name():
    assert netns._owner(f"{netns.PREFIX}4242x3e") == 4242
    assert netns._owner("other") is None and netns._owner(f"{netns.PREFIX}x") is None


@needs_netns
@pytest.mark.slow
def test_hierarchical_training_over_a_shaped_link_carries_its_messages_and_waits_for_them(tmp_path, digits):
    """The edge and the cloud as processes of the network backend, each in its namespace, over TLS: the
    bytes on the edge's interface are the messages' plus a bounded overhead, and the run takes at least
    its payloads' bits over the shaped upload rate."""
    import json
    import os
    import shutil
    from pathlib import Path

    from hier_jax.bench.pki import make_pki

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    root, up_mbit, steps = Path(__file__).resolve().parents[1], 0.25, 8
    pki = tmp_path / "pki"
    pki.mkdir()
    common = ["--dataset", "digits", "--model", "resnet18_tv", "--width", "4", "--split", "layer1_1", "--bits", "4",
              "--batch-size", "32", "--max-steps", str(steps), "--timeout", "120"]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3", "HIER_JAX_TOKEN": "shaped-test-token"}
    with netns.ShapedLink(up_mbit=up_mbit, down_mbit=1) as link:
        make_pki(pki, ips=(link.cloud_ip,))
        address = f"{link.cloud_ip}:50051"
        run = {"cwd": root, "env": env, "stderr": subprocess.PIPE, "stdout": subprocess.DEVNULL, "text": True}
        before = link.counters()
        cloud = link.run("cloud", [sys.executable, "-m", "experiments.cloud", *common, "--listen", address,
                                   "--tls-cert", str(pki / "cloud.pem"), "--tls-key", str(pki / "cloud.key"),
                                   "--out", str(tmp_path / "run")], **run)  # fmt: skip
        edge = link.run("edge", [sys.executable, "-m", "experiments.edge", *common, "--connect", address,
                                 "--tls-ca", str(pki / "ca.pem")], **run)  # fmt: skip
        try:
            outcomes = [p.communicate(timeout=300) for p in (cloud, edge)]
        finally:
            for p in (cloud, edge):
                p.kill()
        wire = {k: v - before[k] for k, v in link.counters().items()}
    assert cloud.returncode == 0 and edge.returncode == 0, outcomes
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    messages = summary["network"]["0"]
    assert messages["bytes_up"] <= wire["up"] <= 1.1 * messages["bytes_up"] + 64 * 1024, (messages, wire)
    assert messages["bytes_down"] <= wire["down"], (messages, wire)
    payload_bits = 8 * summary["payload_bytes_per_batch"]
    assert summary["wall_s"] >= 0.9 * steps * payload_bits / (up_mbit * 1e6), summary["wall_s"]
