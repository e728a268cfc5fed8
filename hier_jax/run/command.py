"""The command line of a run, one for every backend: `experiments.train` and `experiments.cluster` are
this with their own defaults (the cluster's: `--backend ray`).

One parser (every ExperimentConfig flag, Ray's placement flags, --resume, --overwrite); the checks,
the output directory's included, before any work; the run on its backend (threads in this process
via `train.train`, Ray processes via `cluster.run`); one summary, one printed report and one set of
files (summary.json, metrics.csv, curves.png beside checkpoints/). A stopped run prints the command
that continues it, complete: the config comes back from the checkpoint, so it is `--resume DIR` and
the Ray placement flags, which no checkpoint records.
"""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

import numpy as np

from hier_jax import cli, flags, outputs, process, train
from hier_jax.cluster.config import RayConfig
from hier_jax.config import ExperimentConfig, from_dict, validate
from hier_jax.data import ImageDataset, load_dataset
from hier_jax.errors import RunInterrupted, UserError, WorkerError
from hier_jax.precision import resolve
from hier_jax.quantization import raw_image_nbytes
from hier_jax.remote.config import CloudConfig
from hier_jax.run import driver
from hier_jax.run.checkpoint import RunCheckpoints
from hier_jax.run.record import RUN_FILES, read_meta, write_run_files
from hier_jax.run.result import RunResult

OUTPUTS = (*RUN_FILES, "checkpoints")


def resumed_config(resume_dir: Path, given: dict) -> ExperimentConfig:
    """The config recorded in `resume_dir`'s latest checkpoint (either format, either backend), with
    the flags given now laid over it (the run then refuses any that would change its trajectory)."""
    if not (resume_dir / "checkpoints").is_dir():
        raise UserError(f"--resume {resume_dir}: no run to resume there ({resume_dir / 'checkpoints'} does not exist)")
    with RunCheckpoints(resume_dir / "checkpoints", read_only=True) as checkpoints:
        recorded = read_meta(checkpoints.read_meta())["config"]
    given = {path: value for path, value in given.items() if path != "out"}
    return flags.replace_paths(from_dict(ExperimentConfig, recorded), {**given, "out": str(resume_dir)})


def resume_command(prog: str, out: Path, placement_flags: list[str]) -> str:
    """The command that continues the run in `out`, as it can be pasted."""
    return shlex.join(["python", "-m", prog, "--resume", str(out), *placement_flags])


def summarize(config: ExperimentConfig, dataset: ImageDataset, result: RunResult) -> dict:
    """summary.json: the config, the result's summary (per edge and overall), the bytes and the link."""
    record = result.record
    edge_losses = [
        losses[-10:].mean() for e in range(len(record.edges)) if len(losses := record.edge_metrics(e)["loss"])
    ]
    summary = {
        "config": dataclasses.asdict(config),
        "backend": config.backend,
        "dataset": dataset.name,
        "split": config.split,
        **result.summary(),
        "test_examples": dataset.num_test,
        "raw_bytes_per_batch": raw_image_nbytes(
            config.batch_size, *dataset.image_shape, num_classes=dataset.num_classes
        ),
        "final_edge_loss": float(np.mean(edge_losses)) if edge_losses else None,
        "final_cloud_loss": float(result.cloud_metrics["loss"][-10:].mean()),
    }
    if config.link.presets:
        link = config.link
        summary["link"] = {
            "presets": list(link.presets),
            "time_scale": link.time_scale,
            "outages": [list(o) for o in link.outages],
            "buffer": link.buffer,
            "sent": sum(e.sent for e in result.edges),
            "delivered": sum(e.delivered for e in result.edges),
            "dropped": sum(e.dropped for e in result.edges),
            "dropped_steps": {str(e.edge): e.link_dropped for e in result.edges},
        }
    return summary


def report(summary: dict, result: RunResult) -> None:
    """What a run printed at its end: where each worker ran, each edge, the cloud, the link."""
    for name, where in result.placement.items():
        print(f"  {name}: {where}")

    def acc(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    for e in result.edges:
        state = (
            f"LOST after delivering step {e.last_delivered_step}"
            if e.lost
            else f"edge-exit accuracy {acc(e.edge_accuracy)}, cloud-exit accuracy {acc(e.cloud_accuracy)}"
        )
        restarted = f", restarted {e.restarts}x ({e.replayed} steps replayed)" if e.restarts else ""
        link = f" ({len(e.link_dropped)} by its link: steps {e.link_dropped})" if e.link_dropped else ""
        print(
            f"edge {e.edge}: {e.examples} examples, sent {e.sent}, delivered {e.delivered}, dropped {e.dropped}"
            f"{link}{restarted}; {state}"
        )
    this_run = len(result.cloud_order) - result.resumed_cloud_steps
    print(
        f"cloud: {this_run} steps in {result.wall_s:.1f} s ({result.cloud_steps_per_s:.1f}/s)"
        + (f", {len(result.cloud_order)} in all since step 0" if result.resumed_cloud_steps else "")
        + f"; payload {result.payload_bytes:,} B/batch vs raw {summary['raw_bytes_per_batch']:,} B"
    )
    print(
        f"edge-exit accuracy {acc(summary['edge_accuracy'])}, cloud-exit accuracy {acc(summary['cloud_accuracy'])} "
        f"on {summary['test_examples']} test images" + (" (mean over the edges)" if len(result.edges) > 1 else "")
    )


def main(argv: list[str], *, prog: str, doc: str | None, defaults: ExperimentConfig) -> dict:
    """Parse, check, run, report and write (see the module docstring); the summary."""
    process.setup()
    parser = cli.Parser(prog=prog, description=doc)
    flags.add_flags(parser, ExperimentConfig, defaults)
    flags.add_flags(parser, RayConfig)
    flags.add_flags(parser, CloudConfig)
    parser.add_argument(
        "--resume",
        nargs="?",
        const="",
        default=None,
        metavar="DIR",
        help="continue the run in DIR (default: --out) from its latest checkpoint, with its config",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    args = parser.parse_args(argv)
    config = flags.parse(ExperimentConfig, args, defaults)
    ray_config, ray_flags = flags.parse(RayConfig, args), flags.as_argv(RayConfig, flags.given(RayConfig, args))
    cloud_config = flags.parse(CloudConfig, args)
    cloud_flags = flags.as_argv(CloudConfig, flags.given(CloudConfig, args))
    resume = args.resume is not None
    if resume:
        resume_dir = Path(args.resume or config.out)
        if not args.resume and not config.out:
            raise UserError("--resume needs the run's directory: --resume DIR (or its --out)")
        if config.out and Path(config.out).absolute() != resume_dir.absolute():
            raise UserError(
                f"--resume {args.resume} continues the run in {args.resume}; --out must be that "
                f"directory or be left out, got --out {config.out}"
            )
        config = resumed_config(resume_dir, flags.given(ExperimentConfig, args, defaults))
    validate(config)
    if ray_flags and config.backend != "ray":
        raise UserError(f"{ray_flags[0]} places Ray workers: it needs --backend ray (got --backend {config.backend})")
    if cloud_flags and config.backend != "remote":
        raise UserError(
            f"{cloud_flags[0]} is the network's: it needs --backend remote (got --backend {config.backend})"
        )
    if config.backend == "remote":
        from hier_jax.remote import launch

        launch.check_cloud(cloud_config)  # the address, TLS files and token, before any data
    out = (
        outputs.prepare_run_dir(
            config.out, resume=resume, overwrite=args.overwrite, outputs=OUTPUTS, resume_hint=f"--resume {config.out}"
        )
        if config.out
        else None
    )
    dataset = load_dataset(config.dataset, data_dir=config.data_dir or None)
    train.check_data(config, dataset)
    shards = driver.shards_of(config, dataset)  # a shard smaller than a batch is refused before any worker starts
    steps = driver.steps_per_edge(config, shards)
    setup = train.build(config, dataset) if config.backend == "threads" else None
    policy = setup.precision if setup is not None else driver.resolved_policy(config)
    if out is not None and args.overwrite:
        outputs.remove_run(out, OUTPUTS)
    print(
        f"{config.model} (width {config.width}) on {dataset.name} {dataset.image_shape}: {dataset.num_train} train "
        f"/ {dataset.num_test} test, split after {config.split}, {config.bits} bits, {steps} steps of "
        f"{config.batch_size} per edge, {config.scheme}, {config.schedule}; {config.edges} edge(s) on "
        f"{config.backend}"
        + (f", {config.order} order" if config.edges > 1 else "")
        + f"; precision {resolve(policy).describe()}"
        + (
            (
                f"; checkpoints every {config.checkpoint_every} steps in {out / 'checkpoints'}"
                if config.checkpoint_every
                else f"; a checkpoint at the end in {out / 'checkpoints'}"
            )
            if out
            else "; no --out: nothing is saved"
        ),
        flush=True,
    )
    hint = f"; resume with: {resume_command(prog, out, ray_flags + cloud_flags)}" if out is not None else ""
    checkpoints = out / "checkpoints" if out is not None else None
    try:
        if setup is not None:
            result = train.train(setup, checkpoint_dir=checkpoints, resume=resume, evaluate=True)
        elif config.backend == "remote":
            from hier_jax.remote import launch

            result = launch.run(
                config, dataset, cloud_config, progress=True, checkpoint_dir=checkpoints, resume=resume, evaluate=True
            )
        else:
            from hier_jax import cluster

            with cluster.ray_session():
                result = cluster.run(
                    config, dataset, ray_config, progress=True, checkpoint_dir=checkpoints, resume=resume, evaluate=True
                )
    except RunInterrupted as stopped:
        raise RunInterrupted(stopped.step, stopped.checkpoint, hint if stopped.checkpoint else "") from None
    except WorkerError as error:
        saved = checkpoints is not None and checkpoints.is_dir() and any(checkpoints.iterdir())
        raise type(error)(f"{error}{hint if saved else ''}") from None
    if result.start_step == steps:
        print(f"the run was already complete ({steps} steps); evaluating its last checkpoint")
    elif result.start_step:
        print(f"resumed at step {result.start_step} of {steps}")
    summary = summarize(config, dataset, result)
    report(summary, result)
    if out is not None:
        edge_labels = [
            f"edge {e.edge}"
            + (" (lost)" if e.lost else "" if e.edge_accuracy is None else f", test acc {e.edge_accuracy:.3f}")
            for e in result.edges
        ]
        cloud_labels = [
            f"on edge {e.edge}'s payloads" + ("" if e.cloud_accuracy is None else f", test acc {e.cloud_accuracy:.3f}")
            for e in result.edges
        ]
        title = (
            f"{config.model} on {dataset.name}, split after {config.split}, {config.bits} bits, {config.scheme}, "
            f"{config.schedule}, {config.edges} edge(s) on {config.backend}"
        )
        written = write_run_files(out, summary, result.record, title, edge_labels, cloud_labels)
        print(f"wrote {', '.join(str(out / name) for name in written)} and {out / 'checkpoints' / str(steps)}")
    return summary
