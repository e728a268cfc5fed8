"""Train one split model and report both exits: the general-purpose experiment.

    python -m experiments.train --model vgg16 --dataset cifar10 --split pool3 --bits 4 --epochs 30 --out DIR
    python -m experiments.train --dataset folder:../shared/data/cifar10-jpeg --model resnet18_tv --width 32 ...
    python -m experiments.train ... --link 3g --time-scale 0.001 --outage 100:150   # over a simulated link
    python -m experiments.train ... --scheme end_to_end      # a baseline: end_to_end | split_learning
    python -m experiments.train --resume DIR      # continue a stopped run where its last checkpoint left it

Writes DIR/summary.json (config, scheme, schedule, the resolved --precision policy, accuracies, bytes,
wall time), DIR/metrics.csv (per-step losses and accuracies of both sides, the layout every runner
writes), DIR/curves.png, and DIR/checkpoints/STEP (both states, every --checkpoint-every steps and at
the end; the latest --keep-checkpoints kept). An --out that already holds any part of a run is
refused unless --resume (continue it) or --overwrite (replace it) is given. Ctrl-C or SIGTERM stops
both sides after the steps in flight, saves them, prints how to resume and exits 130.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from hier_jax import cli, flags, outputs, process, train
from hier_jax.config import ExperimentConfig, from_dict, validate
from hier_jax.data import load_dataset
from hier_jax.devices import device_name
from hier_jax.errors import RunInterrupted, UserError
from hier_jax.precision import resolve
from hier_jax.quantization import raw_image_nbytes
from hier_jax.run.checkpoint import RunCheckpoints
from hier_jax.run.record import RUN_FILES, read_meta, write_run_files

DEFAULTS = ExperimentConfig(model="resnet18", dataset="cifar10", split="layer2_1", bits=4, epochs=1)
OUTPUTS = (*RUN_FILES, "checkpoints")


def resumed_config(resume_dir: Path, given: dict) -> ExperimentConfig:
    """The config recorded in `resume_dir`'s latest checkpoint (either format), with the flags given
    now laid over it (`train.train` then refuses any that would change the training trajectory)."""
    if not (resume_dir / "checkpoints").is_dir():
        raise UserError(f"--resume {resume_dir}: no run to resume there ({resume_dir / 'checkpoints'} does not exist)")
    with RunCheckpoints(resume_dir / "checkpoints", read_only=True) as checkpoints:
        recorded = read_meta(checkpoints.read_meta())["config"]
    given = {path: value for path, value in given.items() if path != "out"}
    return flags.replace_paths(from_dict(ExperimentConfig, recorded), {**given, "out": str(resume_dir)})


def summarize(setup: train.Setup, result, accuracy: dict, link) -> dict:
    config, dataset, h = setup.config, setup.dataset, setup.hierarchy
    summary = {
        "config": dataclasses.asdict(config),
        "scheme": result.scheme,
        "schedule": result.schedule,
        "dataset": dataset.name,
        "split": setup.split.point,
        "steps": setup.total_steps,
        "resumed_from_step": result.start_step,
        "precision": setup.precision,
        "placement": {"edge": device_name(h.edge_device), "cloud": device_name(h.cloud_device)},
        "wall_s": result.wall_s,
        "edge_accuracy": accuracy["edge_accuracy"],
        "cloud_accuracy": accuracy["cloud_accuracy"],
        "test_examples": accuracy["examples"],
        "payload_bytes_per_batch": result.payload_bytes,
        "raw_bytes_per_batch": raw_image_nbytes(config.batch_size, *dataset.image_shape, dataset.num_classes),
        "final_edge_loss": float(result.edge_metrics["loss"][-10:].mean())
        if len(result.edge_metrics["loss"])
        else None,
        "final_cloud_loss": float(result.cloud_metrics["loss"][-10:].mean()),
        "cloud_steps": len(result.cloud_steps),
    }
    if link is not None:
        stats = link.stats()
        summary["link"] = {
            "name": link.link.name,
            "time_scale": link.time_scale,
            "outages": link.outages,
            "sent": stats.sent,
            "delivered": stats.delivered,
            "dropped": stats.dropped,
            "dropped_steps": list(stats.dropped_steps),
        }
    return summary


@cli.entry_point
def main(argv: list[str]) -> dict:
    process.setup()
    parser = cli.Parser(description=__doc__)
    flags.add_flags(parser, ExperimentConfig, DEFAULTS)
    parser.add_argument(
        "--resume",
        default="",
        metavar="DIR",
        help="continue the run in DIR (its --out) from its latest checkpoint, with its config",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    args = parser.parse_args(argv)
    config = flags.parse(ExperimentConfig, args, DEFAULTS)
    if args.resume:
        resume_dir = Path(args.resume)
        if config.out and Path(config.out).absolute() != resume_dir.absolute():
            raise UserError(
                f"--resume {args.resume} continues the run in {args.resume}; --out must be that "
                f"directory or be left out, got --out {config.out}"
            )
        config = resumed_config(resume_dir, flags.given(ExperimentConfig, args, DEFAULTS))
    validate(config)
    out = (
        outputs.prepare_run_dir(
            config.out,
            resume=bool(args.resume),
            overwrite=args.overwrite,
            outputs=OUTPUTS,
            resume_hint=f"--resume {config.out}",
        )
        if config.out
        else None
    )
    dataset = load_dataset(config.dataset, data_dir=config.data_dir or None)
    train.check_data(config, dataset)
    setup = train.build(config, dataset)
    if out is not None and args.overwrite:
        outputs.remove_run(out, OUTPUTS)
    h = setup.hierarchy
    print(
        f"{config.model} (width {config.width}) on {dataset.name} {dataset.image_shape}: {dataset.num_train} train "
        f"/ {dataset.num_test} test, split after {setup.split.point}, {config.bits} bits, {setup.total_steps} steps "
        f"of {config.batch_size}, {config.scheme}, {config.schedule}; precision "
        f"{resolve(setup.precision).describe()}; edge on {device_name(h.edge_device)}, cloud on "
        f"{device_name(h.cloud_device)}"
        + (
            f"; checkpoints every {config.checkpoint_every} steps in {out / 'checkpoints'}"
            if out
            else "; no --out: nothing is saved"
        )
    )
    link = train.link_channel(config) if config.scheme == "hierarchical" and config.schedule == "pipelined" else None
    try:
        result = train.train(
            setup, channel=link, checkpoint_dir=out / "checkpoints" if out else None, resume=bool(args.resume)
        )
    except RunInterrupted as stopped:
        hint = f"; resume with: python -m experiments.train --resume {out}" if stopped.checkpoint else ""
        raise RunInterrupted(stopped.step, stopped.checkpoint, hint) from None
    if result.start_step == setup.total_steps:
        print(f"the run was already complete ({setup.total_steps} steps); evaluating its last checkpoint")
    elif result.start_step:
        print(f"resumed at step {result.start_step} of {setup.total_steps}")
    accuracy = train.evaluate(setup, result)
    summary = summarize(setup, result, accuracy, link)
    if link is not None:
        s = summary["link"]
        print(
            f"link {s['name']}: {s['sent']} payloads sent, {s['delivered']} delivered, {s['dropped']} dropped "
            f"(steps {s['dropped_steps']})"
        )
    edge = "-" if summary["edge_accuracy"] is None else f"{summary['edge_accuracy']:.4f}"
    print(
        f"edge-exit accuracy {edge}, cloud-exit accuracy {summary['cloud_accuracy']:.4f} on {accuracy['examples']} "
        f"test images; payload {result.payload_bytes:,} B/batch vs raw {summary['raw_bytes_per_batch']:,} B; "
        f"{result.wall_s:.1f} s"
    )
    if out is not None:
        exits = f"test acc {edge}", f"test acc {summary['cloud_accuracy']:.3f}"
        written = write_run_files(
            out,
            summary,
            result.record,
            f"{config.model} on {dataset.name}, split after {setup.split.point}, {config.bits} bits, {config.scheme}",
            [f"edge, {exits[0]}"],
            [f"cloud, {exits[1]}"],
        )
        print(
            f"wrote {', '.join(str(out / name) for name in written)} and {out / 'checkpoints' / str(result.end_step)}"
        )
    return summary


if __name__ == "__main__":
    main()
