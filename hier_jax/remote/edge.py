"""An edge process's side of a run over the network: it answers the cloud's calls on its worker,
keeps its own checkpoints, and dials again with backoff when its connection drops.

Its own checkpoints are the states the cloud asked it for (`state_now`, at the run's checkpoint
steps), kept on this side (in `--checkpoints DIR`, or in memory) and listed with their digests in
every hello. When the cloud takes this edge back (a dropped link, or this process started again),
it tells it the first step it has not trained on; if the edge holds the checkpoint the cloud would
restart it from (the same digest), it resumes from its own and recomputes up to there without
sending anything, and no state crosses the wire.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hier_jax.errors import UserError
from hier_jax.remote import codec
from hier_jax.remote.transport import BYE, CALL, FAILED, FINISHED, REPLY, Link, LinkDown, redial

EDGE_METHODS = frozenset(
    {"placement", "step", "apply", "resume", "params", "set_params", "state_now", "load", "evaluate"}
)
"""What the cloud may ask of an edge's worker: nothing else runs there, whatever a cloud sends."""
OWN_METHODS = frozenset({"resume_own", "load_own"})
"""...and of the edge itself: continue from its own checkpoint of a step."""
KEEP = 4  # own checkpoints kept: the cloud restarts from its newest written or still gathered one
_DIGEST = 64  # the hex sha256 at the head of a checkpoint file


class OwnCheckpoints:
    """The edge's states at checkpoint steps, with their digests: in `directory` (kept across a
    restart of the process; refused if it holds another run's: `run` is what makes it one, the
    training flags, the data's shape and the edge), or in memory."""

    def __init__(self, directory: str, run: dict, known: dict[str, Any]):
        self.directory, self.known = Path(directory) if directory else None, known
        self.memory: dict[int, tuple[bytes, str]] = {}
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        marker, run = self.directory / "run.json", json.loads(json.dumps(run))
        if marker.exists() and (theirs := json.loads(marker.read_text())) != run:
            differ = sorted(k for k in run.keys() | theirs.keys() if run.get(k) != theirs.get(k))
            raise UserError(
                f"--checkpoints {self.directory} holds another run's edge states (it differs in "
                f"{', '.join(differ)}): give an empty directory"
            )
        marker.write_text(json.dumps(run, sort_keys=True))

    def _file(self, step: int) -> Path:
        assert self.directory is not None
        return self.directory / f"{step}.state"

    def steps(self) -> dict[int, str]:
        """{step: digest} of what is kept."""
        if self.directory is None:
            return {k: digest for k, (_, digest) in self.memory.items()}
        found = {}
        for path in self.directory.glob("*.state"):
            with path.open("rb") as f:
                found[int(path.stem)] = f.read(_DIGEST).decode()
        return found

    def save(self, step: int, state: Any) -> None:
        body, digest = codec.encode(state, self.known), codec.digest(state)
        if self.directory is None:
            self.memory[step] = (body, digest)
        else:  # one file, the digest first: a crash leaves the old file or the new one, never half of one
            partial = self._file(step).with_name(f"{step}.state.partial")
            partial.write_bytes(digest.encode() + body)
            os.replace(partial, self._file(step))
        for old in sorted(self.steps())[:-KEEP]:
            self.memory.pop(old, None)
            if self.directory is not None:
                self._file(old).unlink(missing_ok=True)

    def load(self, step: int, limit: int) -> Any:
        body = self.memory[step][0] if self.directory is None else self._file(step).read_bytes()[_DIGEST:]
        return codec.decode(body, payload_limit=limit, known=self.known)


class EdgeHost:
    """The worker behind the calls: the worker's own methods, and resuming from its own checkpoints."""

    def __init__(self, worker: Any, own: OwnCheckpoints, payload_limit: int, log: Callable[[str], None]):
        self.worker, self.own, self.payload_limit, self.log = worker, own, payload_limit, log

    def call(self, method: str, args: list) -> Any:
        if method in OWN_METHODS:
            return getattr(self, method)(*args)
        if method not in EDGE_METHODS:
            raise UserError(f"the cloud asked for {method!r}, which no edge does")
        result = getattr(self.worker, method)(*args)
        if method == "state_now":  # the cloud checkpoints at this step: so does the edge
            self.own.save(self.worker.next_step, result)
        return result

    def resume_own(self, start: int, until: int) -> None:
        self.log(
            f"the cloud has trained on this edge's steps before {until}: recomputing steps {start}..{until - 1} "
            f"from its own checkpoint of step {start}, sending nothing"
        )
        self.worker.resume(self.own.load(start, self.payload_limit), start, until)

    def load_own(self, start: int) -> None:
        self.log(f"the cloud resumes the run at step {start}: from this edge's own checkpoint of it")
        self.worker.load(self.own.load(start, self.payload_limit), start)


@dataclasses.dataclass
class Served:
    """What an edge process did: calls answered, bytes each way, connections, seconds."""

    edge: int
    calls: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    connections: int = 0
    wall_s: float = 0.0


def serve(
    host: EdgeHost,
    edge: int,
    attempt: Callable[[dict], Link],
    hello: dict,
    timeout_s: float,
    known: dict[str, Any],
    log: Callable[[str], None],
) -> Served:
    """Dial (`attempt(hello)`), answer the cloud's calls until it says goodbye; when the connection
    drops, dial again with backoff for up to `timeout_s`, the hello listing the own checkpoints."""
    served, start = Served(edge), time.perf_counter()
    while True:
        link = redial(lambda: attempt({**hello, "checkpoints": host.own.steps()}), timeout_s, log)
        served.connections += 1
        log(f"connected ({'the first time' if served.connections == 1 else f'again: connection {served.connections}'})")
        try:
            if _answer(host, link, timeout_s, known, served) == FINISHED:
                break
            log(f"the cloud stopped the run before its end; dialling it for up to {timeout_s:g} s, until it resumes")
        except LinkDown as down:
            log(f"{down}; dialling again")
        finally:
            link.close()
    served.wall_s = time.perf_counter() - start
    return served


def _answer(host: EdgeHost, link: Link, timeout_s: float, known: dict[str, Any], served: Served) -> bytes:
    """Answer calls on one connection until the cloud's goodbye, which it returns (FINISHED: the run
    ended; STOPPED: it will be resumed); LinkDown when the connection dropped."""
    while True:
        kind, call, body = link.receive(timeout_s)
        if kind == BYE:
            return body
        if kind != CALL:
            continue
        served.bytes_down += len(body)
        try:
            request = codec.decode(body, payload_limit=host.payload_limit, known=known)
            reply = codec.encode(host.call(request["method"], request["args"]), known)
        except Exception as error:  # noqa: BLE001 - reported to the cloud as one line
            link.send(FAILED, call, f"{type(error).__name__}: {error}".splitlines()[0].encode())
            continue
        served.bytes_up += len(reply)
        link.send(REPLY, call, reply)
        served.calls += 1
