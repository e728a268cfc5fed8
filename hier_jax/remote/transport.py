"""The network between an edge process and the cloud process: gRPC, TLS by default, a bearer token.

The cloud listens (`CloudServer`); each edge dials it (`dial`), so an edge behind NAT can take part.
One bidirectional stream per edge carries everything: the edge's hello (its config and data shape,
checked against the cloud's before any step), then the scheduler's calls down and their results up.
Frames are `kind (u8) | call id (u32) | body`; bodies are JSON or `codec` messages, never pickle.

An edge that cannot reach the cloud, or whose stream drops, dials again with backoff (`redial`) for
up to `--timeout`; the cloud takes it back as a restart while it has `--max-restarts` left.

Security: the cloud presents `--tls-cert/--tls-key` (and, with `--tls-ca`, asks each edge for a
client certificate: mutual TLS); the edge checks it against its `--tls-ca`. Both sides read the
token from HIER_JAX_TOKEN (never a flag, never logged); the cloud compares it in constant time on
every stream before reading a byte of it. Plaintext only with `--insecure`, and only on loopback.
"""

from __future__ import annotations

import hmac
import importlib.metadata
import json
import os
import queue
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures as cf
from pathlib import Path

import grpc

from hier_jax.errors import UserError, WorkerError, WorkerTimeout
from hier_jax.link import wire
from hier_jax.remote.config import Security

TOKEN_ENV = "HIER_JAX_TOKEN"
PROTOCOL = 2  # the edge-cloud conversation (the hello's fields, the frame kinds)
METHOD = "/hier_jax.Cloud/Join"
HELLO, WELCOME, REFUSED, CALL, REPLY, FAILED, BYE = range(1, 8)
FINISHED, STOPPED = b"finished", b"stopped"  # a goodbye's body: the run ended, or it will be resumed
_FRAME = struct.Struct("<BI")


class LinkDown(WorkerError):
    """The other side cannot be reached, or the stream to it ended (exit 1)."""


class CloudRefused(WorkerError):
    """The cloud will not take this edge (back) now: it has no reconnects left for it, say (exit 1)."""


def frame(kind: int, call: int, body: bytes) -> bytes:
    return _FRAME.pack(kind, call) + body


def unframe(message: bytes) -> tuple[int, int, bytes]:
    kind, call = _FRAME.unpack_from(message)
    return kind, call, message[_FRAME.size :]


def token() -> str:
    """The shared secret, from the environment; one line naming the variable when it is not set."""
    value = os.environ.get(TOKEN_ENV, "")
    if not value:
        raise UserError(f"set {TOKEN_ENV} to the token the cloud and its edges share (it is never a flag)")
    return value


def split_address(address: str, flag: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"{flag} {address!r} is invalid; valid: HOST:PORT")
    return host.strip("[]"), int(port)


def versions() -> dict[str, object]:
    """What must match for an edge and a cloud to train together: the conversation, the payload's wire
    format and hier-jax itself (its steps and their compiled programs). A different JAX only warns."""
    return {"protocol": PROTOCOL, "wire": wire.VERSION, "hier_jax": _version("hier-jax"), "jax": _version("jax")}


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def incompatible(theirs: dict) -> str | None:
    """The one line that refuses an edge of another version (None: compatible)."""
    ours = versions()
    for key, what in (("protocol", "protocol"), ("wire", "wire format"), ("hier_jax", "hier-jax")):
        if theirs.get(key) != ours[key]:
            return f"this edge runs {what} {theirs.get(key)}, the cloud {ours[key]}: run the same version on both"
    return None


# Keepalive pings find a link that died without a word (no FIN) within ~2 minutes; generous, since on a
# slow link a ping's answer waits behind the payload bytes already queued.
_KEEPALIVE = [("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 90_000)]


def _options(limit: int) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit), *_KEEPALIVE]


def too_large(error: grpc.RpcError) -> str | None:
    """gRPC's refusal of an over-size message, as one line naming both sizes (None: another error)."""
    if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:  # type: ignore[attr-defined]
        return None
    details = str(error.details())  # type: ignore[attr-defined]
    sizes = details[details.find("(") + 1 : details.find(")")].split(" vs. ")
    if len(sizes) != 2 or not all(x.strip().isdigit() for x in sizes):
        return f"a message over the size limit: {details}"
    size, limit = (int(x) for x in sizes)
    return f"a message of {size:,} B is over the limit of {limit:,} B (the largest this run's config can produce)"


class Connection:
    """One edge's stream, seen from the cloud: send frames down, and the frames that came up."""

    def __init__(self, edge: int, hello: dict, peer: str):
        self.edge, self.hello, self.peer = edge, hello, peer
        self.outgoing: queue.Queue[bytes | None] = queue.Queue()
        self.incoming: queue.Queue[tuple[int, int, bytes] | None] = queue.Queue()  # None: the stream ended

    def send(self, kind: int, call: int, body: bytes) -> None:
        self.outgoing.put(frame(kind, call, body))

    def close(self) -> None:
        self.outgoing.put(None)


class CloudServer:
    """The cloud's listening socket; `accept` hands out each edge's stream once its hello is checked.

    `check_hello(hello)` returns None for an edge this run takes, or the one line that refuses it (the
    edge gets the same line and exits 2: its set-up differs); `admit(edge)` likewise, for an edge this
    run cannot take back now (the edge exits 1)."""

    def __init__(self, listen: str, security: Security, limit: int, check_hello, log=print):
        host, port = split_address(listen, "--listen")
        security.check(host, "cloud")
        self._token, self._check_hello, self._log = token(), check_hello, log
        self.admit: Callable[[int], str | None] = lambda edge: None
        self._ready: queue.Queue[Connection] = queue.Queue()
        self._server = grpc.server(cf.ThreadPoolExecutor(max_workers=64), options=_options(limit))
        handler = grpc.stream_stream_rpc_method_handler(self._join)
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("hier_jax.Cloud", {"Join": handler}),)
        )
        address = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        if security.insecure:
            self.port = self._server.add_insecure_port(address)
        else:
            ca = Path(security.ca).read_bytes() if security.ca else None
            credentials = grpc.ssl_server_credentials(
                [(Path(security.key).read_bytes(), Path(security.cert).read_bytes())],
                root_certificates=ca,
                require_client_auth=ca is not None,
            )
            self.port = self._server.add_secure_port(address, credentials)
        if not self.port:
            raise UserError(f"--listen {listen}: cannot listen there (in use, or not this machine's address)")
        self._server.start()

    def _join(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        sent = str(dict(context.invocation_metadata()).get("authorization", ""))
        if not hmac.compare_digest(sent.encode(), f"Bearer {self._token}".encode()):
            self._log(f"refused an edge at {context.peer()}: its {TOKEN_ENV} is not this cloud's")
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"the cloud refused this edge's {TOKEN_ENV}")
        kind, _, body = unframe(next(requests))
        hello = json.loads(body) if kind == HELLO else {}
        line = incompatible(hello.get("versions", {})) or self._check_hello(hello)
        code = 2
        if line is None:
            line, code = self.admit(int(hello["edge"])), 1
        if line is not None:
            self._log(f"refused edge {hello.get('edge')} at {context.peer()}: {line}")
            yield frame(REFUSED, 0, json.dumps({"line": line, "exit": code}).encode())
            return
        if (theirs := hello["versions"].get("jax")) != (ours := versions()["jax"]):
            self._log(f"edge {hello['edge']} runs jax {theirs}, the cloud {ours}: steps may differ in the last bits")
        connection = Connection(int(hello["edge"]), hello, context.peer())

        def read() -> None:
            try:
                for message in requests:
                    connection.incoming.put(unframe(message))
            except grpc.RpcError:
                pass
            finally:
                connection.incoming.put(None)

        threading.Thread(target=read, name=f"hier-net-edge{connection.edge}", daemon=True).start()
        context.add_callback(connection.close)
        yield frame(WELCOME, 0, b"{}")
        self._ready.put(connection)
        while (message := connection.outgoing.get()) is not None:
            yield message

    def accept(self, timeout_s: float) -> Connection:
        """The next edge that was let in; TimeoutError after `timeout_s`."""
        try:
            return self._ready.get(timeout=timeout_s)
        except queue.Empty:
            raise WorkerTimeout(f"no edge connected within {timeout_s:g} s (--timeout)") from None

    def stop(self) -> None:
        self._server.stop(grace=1.0).wait(5.0)


class Link:
    """The edge's end of one stream: frames from the cloud (each wait bounded), frames to it; the
    first frame up is the hello."""

    def __init__(self, channel: grpc.Channel, secret: str, hello: dict):
        self.channel = channel
        self.outgoing: queue.Queue[bytes | None] = queue.Queue()
        self.incoming: queue.Queue[tuple[int, int, bytes] | BaseException] = queue.Queue()
        self.outgoing.put(frame(HELLO, 0, json.dumps(hello).encode()))

        def requests() -> Iterator[bytes]:
            while (message := self.outgoing.get()) is not None:
                yield message

        self.stream = channel.stream_stream(METHOD)(requests(), metadata=(("authorization", f"Bearer {secret}"),))
        threading.Thread(target=self._read, name="hier-net-cloud", daemon=True).start()

    def _read(self) -> None:
        try:
            for message in self.stream:
                self.incoming.put(unframe(message))
            self.incoming.put(LinkDown("the cloud closed the stream"))
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.UNAUTHENTICATED:  # type: ignore[attr-defined]
                self.incoming.put(UserError(f"the cloud refused this edge's {TOKEN_ENV}"))
                return
            line = too_large(error) or str(error.details())  # type: ignore[attr-defined]
            self.incoming.put(LinkDown(f"the connection to the cloud ended: {line}"))

    def receive(self, timeout_s: float) -> tuple[int, int, bytes]:
        """The next frame; LinkDown when the stream ended or nothing came for `timeout_s`."""
        try:
            item = self.incoming.get(timeout=timeout_s)
        except queue.Empty:
            raise LinkDown(f"the cloud sent nothing for {timeout_s:g} s (--timeout)") from None
        if isinstance(item, BaseException):
            raise item
        return item

    def send(self, kind: int, call: int, body: bytes) -> None:
        self.outgoing.put(frame(kind, call, body))

    def close(self) -> None:
        self.outgoing.put(None)
        self.stream.cancel()
        self.channel.close()


def probe(host: str, port: int, security: Security, timeout_s: float) -> None:
    """Is a cloud listening there, with a certificate `--tls-ca` signed? LinkDown: nobody answers
    (yet); one line (UserError) for a certificate that can never be right, so that a wrong CA is
    said at once instead of after `--timeout` of retries."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw:
            if security.insecure:
                return
            context = ssl.create_default_context(cafile=security.ca)
            context.set_alpn_protocols(["h2"])
            if security.cert:
                context.load_cert_chain(security.cert, security.key)
            with context.wrap_socket(raw, server_hostname=host) as tls:
                tls.settimeout(min(timeout_s, 2.0))
                try:
                    closed = tls.recv(1) == b""  # a gRPC server speaks first (its settings); closed: it refused us
                except (TimeoutError, ssl.SSLError):
                    closed = False
                if closed:
                    which = "refused this edge's certificate" if security.cert else "asks for a client certificate"
                    raise UserError(f"the cloud at {host}:{port} {which} (mutual TLS: --tls-cert, --tls-key)")
    except ssl.SSLCertVerificationError as error:
        raise UserError(
            f"the cloud at {host}:{port} presents a certificate --tls-ca does not accept ({error.verify_message})"
        ) from None
    except OSError as error:
        raise LinkDown(f"no cloud answers at {host}:{port} ({error.strerror or error})") from None


def dial(connect: str, security: Security, limit: int, hello: dict, timeout_s: float) -> Link:
    """One attempt of the edge's: open the stream, send the hello, read the welcome. LinkDown when
    no cloud answers within `timeout_s`; one line (UserError) when the cloud refuses this edge for its
    set-up; CloudRefused when it cannot take this edge back now."""
    host, port = split_address(connect, "--connect")
    security.check(host, "edge")
    secret = token()
    probe(host, port, security, timeout_s)
    if security.insecure:
        channel = grpc.insecure_channel(connect, options=_options(limit))
    else:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=Path(security.ca).read_bytes(),
            private_key=Path(security.key).read_bytes() if security.key else None,
            certificate_chain=Path(security.cert).read_bytes() if security.cert else None,
        )
        channel = grpc.secure_channel(connect, credentials, options=_options(limit))
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
    except grpc.FutureTimeoutError:
        channel.close()
        raise LinkDown(f"no cloud answers at {connect} within {timeout_s:g} s") from None
    link = Link(channel, secret, {**hello, "versions": versions()})
    try:
        kind, _, body = link.receive(timeout_s)
    except (LinkDown, UserError):
        link.close()
        raise
    if kind == REFUSED:
        link.close()
        refusal = json.loads(body)
        if refusal["exit"] == 2:
            raise UserError(f"the cloud at {connect} refused this edge: {refusal['line']}")
        raise CloudRefused(f"the cloud at {connect} refused this edge: {refusal['line']}")
    return link


def redial(
    attempt: Callable[[], Link], timeout_s: float, log: Callable[[str], None], first_wait_s: float = 1.0
) -> Link:
    """`attempt()` until it connects, waiting 1, 2, 4, ... (at most 30) s between tries, for up to
    `timeout_s` in all; LinkDown (the last reason) after that. Refusals are not retried."""
    deadline, wait = time.monotonic() + timeout_s, first_wait_s
    while True:
        try:
            return attempt()
        except LinkDown as down:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LinkDown(f"{down} (dialled for {timeout_s:g} s, --timeout)") from None
            log(f"{down}; dialling again in {min(wait, left):.0f} s")
            time.sleep(min(wait, left))
            wait = min(2 * wait, 30.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
