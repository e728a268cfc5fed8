"""Train one split model hierarchically and report both exits: the general-purpose experiment.

    python -m experiments.train --model vgg16 --dataset cifar10 --split pool3 --bits 4 --epochs 30 --out DIR
    python -m experiments.train --dataset folder:../shared/data/cifar10-jpeg --model resnet18_tv --width 32 ...
    python -m experiments.train ... --link 3g --time-scale 0.001 --outage 100:150   # over a simulated link
    python -m experiments.train --resume DIR      # continue a stopped run where its last checkpoint left it

Writes DIR/summary.json (config, the resolved --precision policy, accuracies, bytes, wall time),
DIR/metrics.csv (per-step losses and accuracies of both sides), DIR/curves.png, and
DIR/checkpoints/STEP (both states, every --checkpoint-every steps and at the end; the latest
--keep-checkpoints kept). An --out that already holds a run is refused unless --resume (continue it)
or --overwrite (replace it) is given. Ctrl-C or SIGTERM stops both sides after the steps in flight,
saves them, prints how to resume and exits 130.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from pathlib import Path

from hier_jax import cli, outputs, process, train
from hier_jax.config import ExperimentConfig, add_config_flags, config_from_args, explicit_flags, validate
from hier_jax.data import load_dataset
from hier_jax.devices import device_name
from hier_jax.errors import RunInterrupted, UserError
from hier_jax.link import LINKS, SimulatedLink, get_link
from hier_jax.precision import resolve
from hier_jax.quantization import raw_image_nbytes
from hier_jax.run.checkpoint import RunCheckpoints

DEFAULTS = ExperimentConfig(model="resnet18", dataset="cifar10", split="layer2_1", bits=4, epochs=1)


def write_outputs(out: Path, summary: dict, result) -> list[str]:
    """summary.json, metrics.csv and curves.png, each written atomically; returns the names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outputs.write_json(out / "summary.json", summary)
    edge, cloud = result.edge_metrics, result.cloud_metrics
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["step", "edge_loss", "edge_accuracy", "cloud_step", "cloud_loss", "cloud_accuracy"])
    for i, t in enumerate(result.cloud_steps):
        writer.writerow([int(t), edge["loss"][t], edge["accuracy"][t], i, cloud["loss"][i], cloud["accuracy"][i]])
    outputs.write_atomic(out / "metrics.csv", table.getvalue())
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(edge["loss"], label=f"edge (early exit), test acc {summary['edge_accuracy']:.3f}", lw=1)
    ax.plot(
        result.cloud_steps, cloud["loss"], label=f"cloud (final exit), test acc {summary['cloud_accuracy']:.3f}", lw=1
    )
    ax.set(
        xlabel="step",
        ylabel="training loss",
        yscale="log",
        title=f"{summary['config']['model']} on {summary['dataset']}, split after {summary['split']}, "
        f"{summary['config']['bits']} bits",
    )
    ax.legend()
    fig.tight_layout()
    outputs.save_figure(fig, out / "curves.png", dpi=120)
    plt.close(fig)
    return ["summary.json", "metrics.csv", "curves.png"]


def resumed_config(resume_dir: Path, parsed: ExperimentConfig, given: set[str]) -> ExperimentConfig:
    """The config recorded in `resume_dir`'s latest checkpoint, with the flags given now laid over it
    (`train.train` then refuses any that would change the training trajectory)."""
    if not (resume_dir / "checkpoints").is_dir():
        raise UserError(f"--resume {resume_dir}: no run to resume there ({resume_dir / 'checkpoints'} does not exist)")
    with RunCheckpoints(resume_dir / "checkpoints", read_only=True) as checkpoints:
        recorded = checkpoints.read_meta()["config"]
    known = {f.name for f in dataclasses.fields(ExperimentConfig)}
    config = ExperimentConfig(**{k: v for k, v in recorded.items() if k in known})
    config = dataclasses.replace(
        config, **{name: getattr(parsed, name) for name in given - {"out"}}, out=str(resume_dir)
    )
    train.check_resumable(config, recorded, resume_dir / "checkpoints")
    return config


def make_link(args) -> SimulatedLink | None:
    """The simulated link the flags ask for, validated before any work (UserError otherwise)."""
    if args.outage and not args.link:
        raise UserError("--outage needs --link")
    if not args.link:
        return None
    if args.link not in LINKS:
        raise UserError(f"--link {args.link!r} is invalid; valid: {', '.join(LINKS)}")
    if not (math.isfinite(args.time_scale) and args.time_scale > 0):
        raise UserError(f"--time-scale {args.time_scale} is invalid; valid: a finite number > 0")
    if args.link_buffer < 1:
        raise UserError(f"--link-buffer {args.link_buffer} is invalid; valid: an integer >= 1")
    return SimulatedLink(
        get_link(args.link),
        capacity=args.link_buffer,
        outages=cli.parse_outages(args.outage),
        time_scale=args.time_scale,
    )


@cli.entry_point
def main(argv: list[str]) -> dict:
    process.setup()
    parser = cli.Parser(description=__doc__)
    add_config_flags(parser, DEFAULTS)
    parser.add_argument("--mode", choices=train.MODES, default="overlapped")
    parser.add_argument("--link", default="", help=f"simulate a link: {', '.join(LINKS)} (default: none)")
    parser.add_argument("--time-scale", type=float, default=1.0, help="multiply the link's delays by this")
    parser.add_argument(
        "--outage", action="append", default=[], metavar="A:B", help="link down from step A until step B (repeatable)"
    )
    parser.add_argument("--link-buffer", type=int, default=4, help="payloads buffered at the edge during outages")
    parser.add_argument(
        "--resume",
        default="",
        metavar="DIR",
        help="continue the run in DIR (its --out) from its latest checkpoint, with its config",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    args = parser.parse_args(argv)
    config = config_from_args(args)
    if args.resume:
        resume_dir = Path(args.resume)
        if config.out and Path(config.out).absolute() != resume_dir.absolute():
            raise UserError(
                f"--resume {args.resume} continues the run in {args.resume}; --out must be that "
                f"directory or be left out, got --out {config.out}"
            )
        config = resumed_config(resume_dir, config, explicit_flags(parser, argv))
    validate(config)
    link = make_link(args)
    out = (
        outputs.prepare_run_dir(config.out, resume=bool(args.resume), overwrite=args.overwrite) if config.out else None
    )
    dataset = load_dataset(config.dataset, data_dir=config.data_dir or None)
    train.check_data(config, dataset)
    setup = train.build(config, dataset)
    if out is not None and args.overwrite:
        outputs.remove_run(out)
    print(
        f"{config.model} (width {config.width}) on {dataset.name} {dataset.image_shape}: "
        f"{dataset.num_train} train / {dataset.num_test} test, split after {setup.split.point}, "
        f"{config.bits} bits, {setup.total_steps} steps of {config.batch_size}, {args.mode}; precision "
        f"{resolve(setup.precision).describe()}; edge on "
        f"{device_name(setup.hierarchy.edge_device)}, cloud on {device_name(setup.hierarchy.cloud_device)}"
        + (
            f"; checkpoints every {config.checkpoint_every} steps in {out / 'checkpoints'}"
            if out
            else "; no --out: nothing is saved"
        )
    )
    try:
        result = train.train(
            setup,
            args.mode,
            channel=link,
            checkpoint_dir=out / "checkpoints" if out else None,
            resume=bool(args.resume),
        )
    except RunInterrupted as stopped:
        hint = f"; resume with: python -m experiments.train --resume {out}" if stopped.checkpoint else ""
        raise RunInterrupted(stopped.step, stopped.checkpoint, hint) from None
    if result.start_step == setup.total_steps:
        print(f"the run was already complete ({setup.total_steps} steps); evaluating its last checkpoint")
    elif result.start_step:
        print(f"resumed at step {result.start_step} of {setup.total_steps}")
    accuracy = train.evaluate(setup, result)
    summary = {
        "config": dataclasses.asdict(config),
        "mode": args.mode,
        "dataset": dataset.name,
        "split": setup.split.point,
        "steps": setup.total_steps,
        "resumed_from_step": result.start_step,
        "precision": setup.precision,
        "placement": {
            "edge": device_name(setup.hierarchy.edge_device),
            "cloud": device_name(setup.hierarchy.cloud_device),
        },
        "wall_s": result.wall_s,
        "edge_accuracy": accuracy["edge_accuracy"],
        "cloud_accuracy": accuracy["cloud_accuracy"],
        "test_examples": accuracy["examples"],
        "payload_bytes_per_batch": result.payload_bytes,
        "raw_bytes_per_batch": raw_image_nbytes(config.batch_size, *dataset.image_shape, dataset.num_classes),
        "final_edge_loss": float(result.edge_metrics["loss"][-10:].mean()),
        "final_cloud_loss": float(result.cloud_metrics["loss"][-10:].mean()),
        "cloud_steps": len(result.cloud_steps),
    }
    if link is not None:
        stats = link.stats()
        summary["link"] = {
            "name": link.link.name,
            "time_scale": args.time_scale,
            "outages": link.outages,
            "sent": stats.sent,
            "delivered": stats.delivered,
            "dropped": stats.dropped,
            "dropped_steps": list(stats.dropped_steps),
        }
        print(
            f"link {link.link.name}: {stats.sent} payloads sent, {stats.delivered} delivered, "
            f"{stats.dropped} dropped (steps {list(stats.dropped_steps)})"
        )
    print(
        f"edge-exit accuracy {summary['edge_accuracy']:.4f}, cloud-exit accuracy {summary['cloud_accuracy']:.4f} "
        f"on {accuracy['examples']} test images; payload {result.payload_bytes:,} B/batch vs raw "
        f"{summary['raw_bytes_per_batch']:,} B; {result.wall_s:.1f} s"
    )
    if out is not None:
        written = write_outputs(out, summary, result)
        print(
            f"wrote {', '.join(str(out / name) for name in written)} and {out / 'checkpoints' / str(result.end_step)}"
        )
    return summary


if __name__ == "__main__":
    main()
