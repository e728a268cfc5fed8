"""The two processes of a run over the network: the cloud (`run`: it serves, holds the scheduler and
its own worker, and writes the run's files) and an edge (`serve_edge`: it dials, holds its shard and
its worker, and does what the cloud's scheduler asks, nothing else)."""

from __future__ import annotations

import dataclasses
import math
import os
import sys

import jax
from tqdm.auto import tqdm

from hier_jax import flags
from hier_jax.config import ExperimentConfig, as_run, differences, from_dict, run_only_fields, validate
from hier_jax.data import ImageDataset
from hier_jax.errors import RunInterrupted, UserError
from hier_jax.link import wire
from hier_jax.remote import codec, edge
from hier_jax.remote.backend import RemoteBackend
from hier_jax.remote.config import CloudConfig, EdgeConfig
from hier_jax.remote.transport import CloudServer, dial, split_address, token
from hier_jax.run import driver
from hier_jax.run.result import RunResult
from hier_jax.run.workers import CloudWorker, EdgeWorker, Programs, _compiled, crash_process

CONNECT_S = 20.0  # one dial's wait; `redial` tries again with backoff until --timeout


def limits(config: ExperimentConfig, setup) -> tuple[int, int]:
    """(the largest payload message, the largest frame of the run): the payload's from its shapes; a
    frame's from the largest reply (an edge's state, or its test split's payloads for the cloud exit)."""
    split, dataset = setup.split, setup.dataset
    payload = wire.max_message_bytes(split.feature_shape, config.batch_size, config.bits, split.num_classes)
    widest = max(math.prod(dataset.image_shape), math.prod(split.feature_shape)) * 4
    state = sum(a.nbytes for a in jax.tree.leaves((setup.initial_edge_state, setup.initial_cloud_state)))
    frame = 16 * 2**20 + 2 * state + (dataset.num_test + config.batch_size) * (widest + 8)
    return payload, min(frame, 2**31 - 1)


def hello_of(config: ExperimentConfig, dataset: ImageDataset, edge: int) -> dict:
    return {
        "edge": edge,
        "config": dataclasses.asdict(config),
        "image_shape": list(dataset.image_shape),
        "num_classes": dataset.num_classes,
    }


def check_hello(config: ExperimentConfig, dataset: ImageDataset):
    """The cloud's check of an edge's hello: None, or the one line that refuses it."""

    def check(hello: dict) -> str | None:
        edge = hello.get("edge")
        if not isinstance(edge, int) or not 0 <= edge < config.edges:
            return f"--edge {edge} is not an edge of this run (0..{config.edges - 1})"
        theirs = from_dict(ExperimentConfig, hello["config"])
        found = differences(config, theirs, "on the edge")
        if theirs.scheme != config.scheme:
            found.insert(0, f"--scheme ({config.scheme!r} here, {theirs.scheme!r} on the edge)")
        if list(dataset.image_shape) != hello["image_shape"] or dataset.num_classes != hello["num_classes"]:
            found.append(
                f"the data's shape ({tuple(dataset.image_shape)}, {dataset.num_classes} classes here, "
                f"{tuple(hello['image_shape'])}, {hello['num_classes']} on the edge)"
            )
        return f"the cloud's run differs in {'; '.join(found)}" if found else None

    return check


def run(
    config: ExperimentConfig,
    dataset: ImageDataset,
    cloud_config: CloudConfig | None = None,
    *,
    progress: bool = False,
    checkpoint_dir=None,
    resume: bool = False,
    evaluate: bool = True,
    final_states: bool = True,
    log=None,
) -> RunResult:
    """The cloud's side of the run `config` describes: serve `--listen`, take `config.edges` edges."""
    from hier_jax import train

    cloud_config = cloud_config or CloudConfig()
    validate(config)
    config = as_run(config)
    shards = driver.shards_of(config, dataset)
    steps = driver.steps_per_edge(config, shards)
    setup = train.build(config, dataset)
    payload_limit, frame_limit = limits(config, setup)
    log = log or (lambda line: tqdm.write(f"cloud: {line}", file=sys.stderr))  # above the progress bar
    server = CloudServer(cloud_config.listen, cloud_config.security(), frame_limit, check_hello(config, dataset), log)
    log(f"listening on {cloud_config.listen} for {config.edges} edge(s)")
    programs = Programs.of(setup, config.scheme)
    known = codec.structures(programs.edge_state, programs.cloud_state)
    backend = RemoteBackend(
        server,
        lambda: CloudWorker(programs, kill_at=config.kill_cloud),
        payload_limit,
        known,
        config.timeout_s,
        log,
        max_restarts=config.max_restarts,
    )
    return driver.drive(
        backend,
        config,
        shards,
        steps,
        policy=setup.precision,
        payload=driver.payload_bytes(setup, config.scheme),
        progress=progress,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        timeout_s=config.timeout_s,
        evaluate=evaluate,
        final_states=final_states,  # the cloud's are here; the edges' come over the wire, as checkpoints do
    )


def check_cloud(cloud_config: CloudConfig) -> None:
    """Every mistake in the cloud's network set-up, as one line, before it loads any data."""
    host, _ = split_address(cloud_config.listen, "--listen")
    cloud_config.security().check(host, "cloud")
    token()


def check_edge(config: ExperimentConfig, edge_config: EdgeConfig) -> None:
    """Every mistake in an edge's own set-up, as one line, before it loads any data or dials."""
    e = edge_config.edge
    if not 0 <= e < config.edges:
        raise UserError(f"--edge {e} is invalid; valid: 0..{config.edges - 1} (this run has --edges {config.edges})")
    host, _ = split_address(edge_config.connect, "--connect")
    edge_config.security().check(host, "edge")
    token()


def serve_edge(
    config: ExperimentConfig, dataset: ImageDataset, edge_config: EdgeConfig, log=None, again: str = ""
) -> dict:
    """The edge's side: build its worker on its shard, dial the cloud (again, with backoff, when the
    connection drops), answer its calls until it says goodbye; what it did. Ctrl-C stops it with
    `again`, the command that starts it again (the cloud takes it back while it has restarts left)."""
    from hier_jax import train

    validate(config)
    config = as_run(config)
    check_edge(config, edge_config)
    e = edge_config.edge
    shards = driver.shards_of(config, dataset)
    log = log or (lambda line: print(f"edge {e}: {line}", file=sys.stderr, flush=True))
    device = f"{jax.default_backend()}:0"
    setup = train.build(dataclasses.replace(config, edge_device=device, cloud_device=device, out=""), dataset)
    setup = dataclasses.replace(setup, dataset=shards[e])
    kill_at = dict(config.kill_edges).get(e)  # fault injection: this process dies there
    worker = EdgeWorker(
        e, Programs.of(setup, config.scheme), setup, kill_at=kill_at, crash=crash_process, host_payloads=True
    )
    payload_limit, frame_limit = limits(config, setup)
    known = codec.structures(worker.programs.edge_state, worker.programs.cloud_state)
    hello = hello_of(config, dataset, e)
    training = {path: value for path, value, _ in flags.paths(config) if path not in run_only_fields()}
    own = edge.OwnCheckpoints(edge_config.checkpoints, {**hello, "config": training}, known)
    _compiled(worker)
    security = edge_config.security()

    def attempt(hello: dict):
        return dial(edge_config.connect, security, frame_limit, hello, min(config.timeout_s, CONNECT_S))

    host = edge.EdgeHost(worker, own, payload_limit, log)
    try:
        served = edge.serve(host, e, attempt, hello, config.timeout_s, known, log)
    except KeyboardInterrupt:
        hint = f"; the cloud waits --timeout for it while it has --max-restarts left: {again}" if again else ""
        raise RunInterrupted(worker.next_step, own.directory, hint) from None
    log(
        f"done: {served.calls} calls in {served.wall_s:.1f} s over {served.connections} connection(s), "
        f"{served.bytes_up:,} B up, {served.bytes_down:,} B down"
    )
    return {**dataclasses.asdict(served), "pid": os.getpid()}
