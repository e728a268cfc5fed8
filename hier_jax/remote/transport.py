"""The network between an edge process and the cloud process: gRPC, TLS by default, a bearer token.

The cloud listens (`CloudServer`); each edge dials it (`dial`), so an edge behind NAT can take part.
One bidirectional stream per edge carries everything: the edge's hello (its config and data shape,
checked against the cloud's before any step), then the scheduler's calls down and their results up.
Frames are `kind (u8) | call id (u32) | body`; bodies are JSON or `codec` messages, never pickle.

Security: the cloud presents `--tls-cert/--tls-key` (and, with `--tls-ca`, asks each edge for a
client certificate: mutual TLS); the edge checks it against its `--tls-ca`. Both sides read the
token from HIER_JAX_TOKEN (never a flag, never logged); the cloud compares it in constant time on
every stream before reading a byte of it. Plaintext only with `--insecure`, and only on loopback.
"""

from __future__ import annotations

import hmac
import json
import os
import queue
import socket
import struct
import threading
from collections.abc import Iterator
from concurrent import futures as cf
from pathlib import Path

import grpc

from hier_jax.errors import UserError, WorkerError, WorkerTimeout
from hier_jax.remote.config import Security

TOKEN_ENV = "HIER_JAX_TOKEN"
PROTOCOL = 1  # the edge-cloud conversation (the hello's fields, the frame kinds)
METHOD = "/hier_jax.Cloud/Join"
HELLO, WELCOME, REFUSED, CALL, REPLY, FAILED, BYE = range(1, 8)
_FRAME = struct.Struct("<BI")


class LinkDown(WorkerError):
    """The other side cannot be reached, or the stream to it ended (exit 1)."""


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


def _options(limit: int) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]


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
    edge gets the same line)."""

    def __init__(self, listen: str, security: Security, limit: int, check_hello, log=print):
        host, port = split_address(listen, "--listen")
        security.check(host, "cloud")
        self._token, self._check_hello, self._log = token(), check_hello, log
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
        if hello.get("protocol") != PROTOCOL:
            line = f"this edge speaks protocol {hello.get('protocol')}, the cloud {PROTOCOL}: update one of them"
        else:
            line = self._check_hello(hello)
        if line is not None:
            self._log(f"refused edge {hello.get('edge')} at {context.peer()}: {line}")
            yield frame(REFUSED, 0, line.encode())
            return
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


def dial(connect: str, security: Security, limit: int, hello: dict, timeout_s: float):
    """The edge's side: open the stream, send the hello; (the frames from the cloud, a send function,
    the channel to close). One line (UserError) when the cloud refuses it or cannot be reached."""
    host, _ = split_address(connect, "--connect")
    security.check(host, "edge")
    secret = token()
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
        raise LinkDown(
            f"no cloud answers at {connect} within {timeout_s:g} s (or its certificate is not signed by --tls-ca)"
        ) from None
    outgoing: queue.Queue[bytes | None] = queue.Queue()
    outgoing.put(frame(HELLO, 0, json.dumps({**hello, "protocol": PROTOCOL}).encode()))

    def requests() -> Iterator[bytes]:
        while (message := outgoing.get()) is not None:
            yield message

    stream = channel.stream_stream(METHOD)(requests(), metadata=(("authorization", f"Bearer {secret}"),))
    try:
        kind, _, body = unframe(next(stream))
    except grpc.RpcError as error:
        outgoing.put(None)
        channel.close()
        if error.code() == grpc.StatusCode.UNAUTHENTICATED:  # type: ignore[attr-defined]
            raise UserError(f"the cloud at {connect} refused this edge's {TOKEN_ENV}") from None
        raise LinkDown(f"the cloud at {connect}: {error.details()}") from None  # type: ignore[attr-defined]
    if kind == REFUSED:
        outgoing.put(None)
        channel.close()
        raise UserError(f"the cloud at {connect} refused this edge: {body.decode()}")
    return stream, lambda kind, call, body: outgoing.put(frame(kind, call, body)), outgoing, channel


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
