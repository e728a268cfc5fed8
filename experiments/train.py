"""Train one split model hierarchically and report both exits: the general-purpose experiment.

    python -m experiments.train --model vgg16 --dataset cifar10 --split pool3 --bits 4 --epochs 30 --out DIR
    python -m experiments.train --dataset folder:../shared/data/cifar10-jpeg --model resnet18_tv --width 32 ...
    python -m experiments.train ... --link 3g --time-scale 0.001 --outage 100:150   # over a simulated link

Writes DIR/summary.json (config, accuracies, bytes, wall time), DIR/metrics.csv (per-step losses and
accuracies of both sides), DIR/curves.png and the final edge and cloud states in DIR/checkpoint.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
from pathlib import Path

from hier_jax import checkpoint, costmodel, train
from hier_jax.link import SimulatedLink
from hier_jax.config import ExperimentConfig, add_config_flags, config_from_args
from hier_jax.data import load_dataset
from hier_jax.quantization import raw_image_nbytes

DEFAULTS = ExperimentConfig(model="resnet18", dataset="cifar10", split="layer2_1", bits=4, epochs=1)


def write_outputs(out: Path, summary: dict, result) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    edge, cloud = result.edge_metrics, result.cloud_metrics
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "edge_loss", "edge_accuracy", "cloud_step", "cloud_loss", "cloud_accuracy"])
        for i, t in enumerate(result.cloud_steps):
            writer.writerow([int(t), edge["loss"][t], edge["accuracy"][t], i, cloud["loss"][i], cloud["accuracy"][i]])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(edge["loss"], label=f"edge (early exit), test acc {summary['edge_accuracy']:.3f}", lw=1)
    ax.plot(result.cloud_steps, cloud["loss"], label=f"cloud (final exit), test acc {summary['cloud_accuracy']:.3f}",
            lw=1)
    ax.set(xlabel="step", ylabel="training loss", yscale="log",
           title=f"{summary['config']['model']} on {summary['dataset']}, split after {summary['split']}, "
                 f"{summary['config']['bits']} bits")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(parser, DEFAULTS)
    parser.add_argument("--mode", choices=train.MODES, default="overlapped")
    parser.add_argument("--link", default="", help=f"simulate a link: {', '.join(costmodel.LINKS)} (default: none)")
    parser.add_argument("--time-scale", type=float, default=1.0, help="multiply the link's delays by this")
    parser.add_argument("--outage", action="append", default=[], metavar="A:B",
                        help="link down from step A until step B (repeatable)")
    parser.add_argument("--link-buffer", type=int, default=4, help="payloads buffered at the edge during outages")
    args = parser.parse_args(argv)
    config = config_from_args(args)
    link = None
    if args.outage and not args.link:
        parser.error("--outage needs --link")
    if args.link:
        try:
            outages = [tuple(int(v) for v in o.split(":")) for o in args.outage]
        except ValueError:
            parser.error(f"--outage takes A:B (two step numbers), got {args.outage}")
        link = SimulatedLink(costmodel.get_link(args.link), capacity=args.link_buffer, outages=outages,
                             time_scale=args.time_scale)
    dataset = load_dataset(config.dataset, data_dir=config.data_dir or None)
    setup = train.build(config, dataset)
    print(f"{config.model} (width {config.width}) on {dataset.name} {dataset.image_shape}: "
          f"{dataset.num_train} train / {dataset.num_test} test, split after {setup.split.point}, "
          f"{config.bits} bits, {setup.total_steps} steps of {config.batch_size}, {args.mode}")
    result = train.train(setup, args.mode, channel=link)
    accuracy = train.evaluate(setup, result)
    summary = {
        "config": dataclasses.asdict(config), "mode": args.mode, "dataset": dataset.name,
        "split": setup.split.point, "steps": setup.total_steps, "wall_s": result.wall_s,
        "edge_accuracy": accuracy["edge_accuracy"], "cloud_accuracy": accuracy["cloud_accuracy"],
        "test_examples": accuracy["examples"], "payload_bytes_per_batch": result.payload_bytes,
        "raw_bytes_per_batch": raw_image_nbytes(config.batch_size, *dataset.image_shape, dataset.num_classes),
        "final_edge_loss": float(result.edge_metrics["loss"][-10:].mean()),
        "final_cloud_loss": float(result.cloud_metrics["loss"][-10:].mean()),
        "cloud_steps": len(result.cloud_steps),
    }
    if link is not None:
        stats = link.stats()
        summary["link"] = {"name": link.link.name, "time_scale": args.time_scale, "outages": link.outages,
                           "sent": stats.sent, "delivered": stats.delivered, "dropped": stats.dropped,
                           "dropped_steps": list(stats.dropped_steps)}
        print(f"link {link.link.name}: {stats.sent} payloads sent, {stats.delivered} delivered, "
              f"{stats.dropped} dropped (steps {list(stats.dropped_steps)})")
    print(f"edge-exit accuracy {summary['edge_accuracy']:.4f}, cloud-exit accuracy {summary['cloud_accuracy']:.4f} "
          f"on {accuracy['examples']} test images; payload {result.payload_bytes:,} B/batch vs raw "
          f"{summary['raw_bytes_per_batch']:,} B; {result.wall_s:.1f} s")
    if config.out:
        write_outputs(Path(config.out), summary, result)
        checkpoint.save(Path(config.out) / "checkpoint", setup.total_steps, result.edge_state, result.cloud_state)
        print(f"wrote {config.out}/summary.json, metrics.csv, curves.png, checkpoint/")
    return summary


if __name__ == "__main__":
    main()
