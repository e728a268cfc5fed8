"""N edges and one cloud as separate processes on Ray (hier_jax.cluster): hierarchical training
with each side in its own JAX runtime, pinned to its own cores, the cloud on a GPU where there is one.

    python -m experiments.cluster --dataset digits --model resnet18_tv --width 8 --edges 2 --out runs/c
    python -m experiments.cluster ... --edges 4 --dirichlet 0.3 --edge-sync 50 --order async
    python -m experiments.cluster ... --link 3g,wifi --time-scale 0.01 --outage 20:30  # a simulated link per edge
    python -m experiments.cluster ... --kill-edge 1:20     # edge 1's process dies at its step 20
    python -m experiments.cluster ... --kill-edge 1:20 --max-restarts 1   # ... and comes back
    python -m experiments.cluster ... --address HEAD:6379  # join a running Ray cluster (README)

Writes DIR/summary.json (config, placement, per-edge accuracies and payload counts, cloud steps per
second, wall time), DIR/metrics.csv (every edge step and the cloud step that trained on it: the
layout experiments.train writes, with an `edge` column), DIR/curves.png and DIR/checkpoints/STEP
(every worker's state every --checkpoint-every steps; --resume continues from the latest). An --out
that holds any part of a run is refused before any worker starts, unless --resume or --overwrite.
Needs the `ray` extra: pip install -e .[ray].
"""

from __future__ import annotations

import dataclasses
import shlex

from hier_jax import cli, cluster, flags, outputs, process
from hier_jax.config import ExperimentConfig
from hier_jax.data import load_dataset
from hier_jax.errors import RunInterrupted, UserError
from hier_jax.run.record import RUN_FILES, write_run_files

DEFAULTS = ExperimentConfig(
    model="resnet18_tv", dataset="digits", split="layer1_1", bits=4, width=8, batch_size=32, epochs=1
)
OUTPUTS = (*RUN_FILES, "checkpoints")


def resume_command(argv: list[str]) -> str:
    """The command that continues this run, as it can be pasted."""
    again = [a for a in argv if a not in ("--resume", "--overwrite")]
    return "python -m experiments.cluster " + shlex.join([*again, "--resume"])


def report(result: cluster.ClusterResult) -> None:
    for name, where in result.placement.items():
        print(f"  {name}: {where}")
    for e in result.edges:
        state = (
            f"LOST after delivering step {e.last_delivered_step}"
            if e.lost
            else f"edge exit {e.edge_accuracy:.3f}, cloud exit on its features {e.cloud_accuracy:.3f}"
        )
        restarted = f", restarted {e.restarts}x ({e.replayed} steps replayed)" if e.restarts else ""
        link = f" ({len(e.link_dropped)} by its link)" if e.link_dropped else ""
        print(
            f"edge {e.edge}: {e.examples} examples, sent {e.sent}, delivered {e.delivered}, dropped {e.dropped}"
            f"{link}{restarted}; {state}"
        )
    this_run = len(result.cloud_order) - result.resumed_cloud_steps
    print(
        f"cloud: {this_run} steps in {result.wall_s:.2f} s ({result.cloud_steps_per_s:.1f}/s)"
        + (f", {len(result.cloud_order)} in all since step 0" if result.resumed_cloud_steps else "")
        + (f", mean cloud accuracy {result.mean_cloud_accuracy:.3f}" if result.mean_cloud_accuracy is not None else "")
    )


@cli.entry_point
def main(argv: list[str]) -> dict:
    process.setup()
    parser = cli.Parser(description=__doc__)
    flags.add_flags(parser, ExperimentConfig, DEFAULTS)
    flags.add_flags(parser, cluster.ClusterConfig)
    parser.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its latest checkpoint (same settings)"
    )
    args = parser.parse_args(argv)
    config = flags.parse(ExperimentConfig, args, DEFAULTS)
    topology = flags.parse(cluster.ClusterConfig, args)
    cluster.validate_cluster(topology, config)
    if args.resume and not config.out:
        raise UserError("--resume needs the --out of the run to continue")
    out = (
        outputs.prepare_run_dir(
            config.out, resume=args.resume, overwrite=args.overwrite, outputs=OUTPUTS, resume_hint="--resume"
        )
        if config.out
        else None
    )
    dataset = load_dataset(config.dataset, data_dir=config.data_dir or None)
    if out is not None and args.overwrite:
        outputs.remove_run(out, OUTPUTS)
    print(
        f"{config.model} (width {config.width}) on {dataset.name}, split after {config.split}, {config.bits} bits: "
        f"{topology.edges} edge(s) and a cloud as Ray workers, {config.schedule}, {topology.order} order",
        flush=True,
    )
    hint = f"; continue with: {resume_command(argv)}" if out else ""
    try:
        result = cluster.run(
            config,
            dataset,
            topology,
            progress=True,
            checkpoint_dir=out / "checkpoints" if out else None,
            resume=args.resume,
        )
    except cluster.ClusterError as error:
        raise cluster.ClusterError(f"{error}{hint}") from None
    except RunInterrupted as stopped:
        raise RunInterrupted(stopped.step, stopped.checkpoint, hint if stopped.checkpoint else "") from None
    summary = {
        "config": dataclasses.asdict(config),
        "cluster": dataclasses.asdict(topology),
        "scheme": config.scheme,
        **result.summary(),
    }
    report(result)
    if out is not None:
        edge_labels = [
            f"edge {e.edge}" + (" (lost)" if e.lost else f", test acc {e.edge_accuracy:.3f}") for e in result.edges
        ]
        cloud_labels = [
            f"on edge {e.edge}'s payloads" + ("" if e.cloud_accuracy is None else f", test acc {e.cloud_accuracy:.3f}")
            for e in result.edges
        ]
        written = write_run_files(
            out,
            summary,
            result.record,
            f"{len(result.edges)} edge(s), {result.schedule}, {result.order}",
            edge_labels,
            cloud_labels,
        )
        print(f"wrote {', '.join(str(out / name) for name in written)}")
    return summary


if __name__ == "__main__":
    main()
