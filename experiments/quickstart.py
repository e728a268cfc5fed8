"""Quickstart: hierarchical training of a split ResNet-18 on an offline data set, both schedules.

Trains the same split model twice from the same initial states, once sequentially (edge step, then
cloud step) and once pipelined (a dispatch thread per device), checks that both give bit-identical
parameters, and reports both exits' test accuracy, payload vs raw-image bytes and the two wall times.

    python -m experiments.quickstart [--out DIR] [--epochs N] [--width W] ...
"""

from __future__ import annotations

import dataclasses
import sys

import jax
import numpy as np

from hier_jax import cli, flags, outputs, process, train
from hier_jax.config import ONE_PAIR_FLAGS, SCHEDULES, ExperimentConfig, optimizers, validate
from hier_jax.data import load_dataset
from hier_jax.devices import device_name
from hier_jax.models import ExitHeadConfig, param_count
from hier_jax.precision import resolve
from hier_jax.quantization import raw_image_nbytes
from hier_jax.runtime_model.profiler import edge_footprint

DEFAULTS = ExperimentConfig(
    model="resnet18_tv",
    dataset="digits",
    split="layer1_1",
    bits=4,
    width=16,
    batch_size=64,
    epochs=6,
    **optimizers(learning_rate=0.05),
    head=ExitHeadConfig(channels=32),
)


def states_equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@cli.entry_point
def main(argv: list[str]) -> dict:
    process.setup()
    parser = cli.Parser(description=__doc__)
    flags.add_flags(parser, ExperimentConfig, DEFAULTS, include=ONE_PAIR_FLAGS)
    parser.add_argument("--overwrite", action="store_true", help="replace a summary.json already in --out")
    args = parser.parse_args(argv)
    config = flags.parse(ExperimentConfig, args, DEFAULTS)
    validate(config)
    out = (
        outputs.prepare_run_dir(config.out, overwrite=args.overwrite, outputs=("summary.json",)) if config.out else None
    )
    dataset = load_dataset(config.dataset, data_dir=config.data_dir or None)
    setup = train.build(config, dataset)
    if out is not None and args.overwrite:
        outputs.remove_run(out, ("summary.json",))
    narrowed = (
        "" if config.width == 64 else f" (narrowed: width {config.width} of 64, to finish in minutes on 2 CPU cores)"
    )
    print(
        f"{config.model}{narrowed} on {dataset.name} {dataset.image_shape}, split after {setup.split.point}, "
        f"{config.bits}-bit payload, batch {config.batch_size}, {setup.total_steps} steps, precision "
        f"{resolve(setup.precision).describe()}, "
        f"edge on {device_name(setup.hierarchy.edge_device)}, cloud on {device_name(setup.hierarchy.cloud_device)}"
    )
    print("compiling ...", flush=True)
    train.warm_up(setup)

    runs = {schedule: train.train(setup, scheme="hierarchical", schedule=schedule) for schedule in SCHEDULES}
    sequential, pipelined = runs["sequential"], runs["pipelined"]
    identical = (
        states_equal(sequential.edge_state, pipelined.edge_state)
        and states_equal(sequential.cloud_state, pipelined.cloud_state)
        and all(
            np.array_equal(sequential.cloud_metrics[k], pipelined.cloud_metrics[k]) for k in sequential.cloud_metrics
        )
    )
    accuracy = train.evaluate(setup, pipelined)
    raw_bytes = raw_image_nbytes(config.batch_size, *dataset.image_shape, num_classes=dataset.num_classes)
    footprint = edge_footprint(setup.split, config.batch_size, config.bits)
    if footprint.payload_bytes != pipelined.payload_bytes:
        raise AssertionError(f"payload bytes: modeled {footprint.payload_bytes}, sent {pipelined.payload_bytes}")
    summary = {
        "config": dataclasses.asdict(config),
        "precision": setup.precision,
        "placement": {
            "edge": device_name(setup.hierarchy.edge_device),
            "cloud": device_name(setup.hierarchy.cloud_device),
        },
        "edge_accuracy": accuracy["edge_accuracy"],
        "cloud_accuracy": accuracy["cloud_accuracy"],
        "test_examples": accuracy["examples"],
        "payload_bytes_per_batch": pipelined.payload_bytes,
        "raw_bytes_per_batch": raw_bytes,
        "wall_s_sequential": sequential.wall_s,
        "wall_s_pipelined": pipelined.wall_s,
        "pipelined_bit_identical_to_sequential": identical,
        "final_edge_loss": float(pipelined.edge_metrics["loss"][-5:].mean()),
        "final_cloud_loss": float(pipelined.cloud_metrics["loss"][-5:].mean()),
        "steps": setup.total_steps,
        "edge_params": footprint.params,
        "cloud_params": param_count(setup.split.cloud),
        "edge_memory_bytes": footprint.memory_bytes,
    }
    rows = [
        ("edge-exit accuracy (edge alone)", f"{summary['edge_accuracy']:.4f}"),
        ("cloud-exit accuracy", f"{summary['cloud_accuracy']:.4f}"),
        ("edge / cloud parameters", f"{footprint.params:,} / {summary['cloud_params']:,}"),
        ("edge training memory (estimate)", f"{footprint.memory_bytes / 2**20:.1f} MiB at batch {config.batch_size}"),
        ("payload bytes per batch", f"{pipelined.payload_bytes:,}"),
        ("raw-image bytes per batch", f"{raw_bytes:,} ({raw_bytes / pipelined.payload_bytes:.1f}x the payload)"),
        ("wall time, sequential", f"{sequential.wall_s:.2f} s"),
        ("wall time, pipelined", f"{pipelined.wall_s:.2f} s (speed-up {sequential.wall_s / pipelined.wall_s:.2f}x)"),
        ("pipelined == sequential, bit for bit", "yes" if identical else "NO"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"  {k:<{width}}  {v}" for k, v in rows))
    if out is not None:
        print(f"wrote {outputs.write_json(out / 'summary.json', summary)}")
    if not identical:
        sys.exit("pipelined training diverged from sequential training")
    return summary


if __name__ == "__main__":
    main()
