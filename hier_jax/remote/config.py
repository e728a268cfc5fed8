"""The network flags of the remote backend: where the cloud listens and what it presents
(`CloudConfig`), where an edge dials and what it trusts (`EdgeConfig`). What every backend shares
(edges, order, schedule, link, faults) is in the ExperimentConfig; the token is never a flag
(HIER_JAX_TOKEN)."""

from __future__ import annotations

import dataclasses
import ipaddress
import sys
from pathlib import Path

from hier_jax import flags
from hier_jax.config import ExperimentConfig
from hier_jax.errors import UserError
from hier_jax.flags import option

NOT_THE_EDGES = ("backend", "out", "checkpoint_every", "keep_checkpoints", "kill_cloud")
EDGE_FLAGS = tuple(f.name for f in dataclasses.fields(ExperimentConfig) if f.name not in NOT_THE_EDGES)
"""The training flags an edge takes (the cloud's must match them) and the waits; the run's files are the cloud's."""


def edge_command(config: ExperimentConfig, connect: str, *extra: str) -> list[str]:
    """The command line of an edge process of the run `config` describes, dialling `connect`."""
    values = {p: v for p, v, _ in flags.paths(config) if p.split(".")[0] in EDGE_FLAGS}
    return [sys.executable, "-m", "experiments.edge", *flags.as_argv(ExperimentConfig, values), "--connect", connect,
            *extra]  # fmt: skip


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@dataclasses.dataclass(frozen=True)
class Security:
    """One side's TLS files (empty: none) and whether it runs plaintext."""

    cert: str = ""
    key: str = ""
    ca: str = ""
    insecure: bool = False

    def check(self, host: str, side: str) -> None:
        """One line for a set-up that cannot work, before any connection."""
        if self.insecure:
            if not is_loopback(host):
                raise UserError(f"--insecure sends plaintext: only to a loopback address, not {host}")
            return
        for flag, path in (("--tls-cert", self.cert), ("--tls-key", self.key), ("--tls-ca", self.ca)):
            if path and not Path(path).is_file():
                raise UserError(f"{flag} {path} is not a file")
        if side == "cloud" and not (self.cert and self.key):
            raise UserError("the cloud needs --tls-cert and --tls-key (or --insecure on a loopback address)")
        if side == "edge" and not self.ca:
            raise UserError("the edge needs --tls-ca, the CA that signed the cloud's certificate (or --insecure)")
        if side == "edge" and bool(self.cert) != bool(self.key):
            raise UserError("mutual TLS needs both --tls-cert and --tls-key on the edge")


@dataclasses.dataclass(frozen=True)
class CloudConfig:
    listen: str = option("127.0.0.1:50051", "HOST:PORT the cloud serves its edges on", run_only=True)
    tls_cert: str = option("", "the cloud's certificate (PEM)", run_only=True)
    tls_key: str = option("", "its private key (PEM)", run_only=True)
    tls_ca: str = option("", "ask each edge for a certificate this CA signed (mutual TLS)", run_only=True)
    insecure: bool = option(False, "plaintext, no TLS: only on a loopback address", run_only=True)

    def security(self) -> Security:
        return Security(self.tls_cert, self.tls_key, self.tls_ca, self.insecure)


@dataclasses.dataclass(frozen=True)
class EdgeConfig:
    connect: str = option("127.0.0.1:50051", "HOST:PORT of the cloud", run_only=True)
    edge: int = option(0, "which edge this is (its shard of the training split)", run_only=True)
    tls_ca: str = option("", "the CA that signed the cloud's certificate (PEM)", run_only=True)
    tls_cert: str = option("", "this edge's certificate, for mutual TLS", run_only=True)
    tls_key: str = option("", "its private key", run_only=True)
    insecure: bool = option(False, "plaintext, no TLS: only to a loopback address", run_only=True)
    checkpoints: str = option(
        "",
        "a directory for this edge's own checkpoints, so that the process, started again, resumes from "
        "them without the cloud sending its state (empty: kept in memory, for a dropped connection)",
        run_only=True,
    )

    def security(self) -> Security:
        return Security(self.tls_cert, self.tls_key, self.tls_ca, self.insecure)
