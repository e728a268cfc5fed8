"""N edges and one cloud as separate processes on Ray (hier_jax.cluster): hierarchical training
with each side in its own JAX runtime, pinned to its own cores, the cloud on a GPU where there is one.

    python -m experiments.cluster --dataset digits --model resnet18_tv --width 8 --edges 2 --out runs/c
    python -m experiments.cluster ... --edges 4 --dirichlet 0.3 --edge-sync 50 --order async
    python -m experiments.cluster ... --links 3g,wifi --time-scale 0.01       # a simulated link per edge
    python -m experiments.cluster ... --kill-edge 1:20     # edge 1's process dies at its step 20
    python -m experiments.cluster ... --kill-edge 1:20 --max-restarts 1   # ... and comes back
    python -m experiments.cluster ... --address HEAD:6379  # join a running Ray cluster (README)

Writes DIR/summary.json (config, placement, per-edge accuracies and payload counts, cloud steps per
second, wall time), DIR/cloud_steps.csv (the cloud's steps in the order it took them: edge, edge
step, loss, step time), DIR/edge_steps.csv (each edge's losses and step times), DIR/curves.png and
DIR/checkpoints/STEP (every worker's state every --checkpoint-every steps;
--resume continues from the latest). Needs the `ray` extra: pip install -e .[ray].
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io

from hier_jax import cli, cluster, outputs, process
from hier_jax.config import ExperimentConfig, add_config_flags, config_from_args, validate
from hier_jax.data import load_dataset
from hier_jax.errors import RunInterrupted, UserError

DEFAULTS = ExperimentConfig(
    model="resnet18_tv", dataset="digits", split="layer1_1", bits=4, width=8, batch_size=32, epochs=1
)
OUTPUTS = ("summary.json", "cloud_steps.csv", "edge_steps.csv", "curves.png")


def add_cluster_flags(parser: cli.Parser) -> None:
    c = cluster.ClusterConfig()
    parser.add_argument("--edges", type=int, default=c.edges, help="edge processes, one cloud")
    parser.add_argument(
        "--flow", default=c.flow, help=f"{' | '.join(cluster.FLOWS)}: the edge runs ahead of the cloud, or waits for it"
    )
    parser.add_argument("--order", default=c.order, help=f"the cloud's order: {' | '.join(cluster.ORDERS)}")
    parser.add_argument(
        "--dirichlet",
        type=float,
        default=c.dirichlet,
        help="> 0: non-IID shards with label proportions ~ Dirichlet(ALPHA); 0: IID",
    )
    parser.add_argument("--edge-sync", type=int, default=c.edge_sync, help="average the edge models every K steps")
    parser.add_argument("--links", default="", help="link presets, one for all or one per edge: 3g,wifi")
    parser.add_argument("--time-scale", type=float, default=c.time_scale, help="multiplies the links' delays")
    parser.add_argument(
        "--pin", action=argparse.BooleanOptionalAction, default=c.pin, help="pin each local worker to its own cores"
    )
    parser.add_argument(
        "--kill-edge",
        action="append",
        default=[],
        metavar="EDGE:STEP",
        help="fault injection: that edge's process exits at that step (repeatable)",
    )
    parser.add_argument(
        "--kill-cloud",
        type=int,
        default=c.kill_cloud,
        metavar="STEP",
        help="fault injection: the cloud's process exits at its step STEP",
    )
    parser.add_argument(
        "--max-restarts",
        type=int,
        default=c.max_restarts,
        metavar="R",
        help="bring a lost edge back up to R times, from the last checkpoint",
    )
    parser.add_argument("--timeout", type=float, default=c.timeout_s, help="the longest any wait may take (s)")
    parser.add_argument("--address", default=c.address, help="join this Ray cluster instead of starting one")
    parser.add_argument(
        "--edge-resource",
        default=c.edge_resource,
        help="a custom Ray resource every edge needs (ray start --resources '{\"edge\": 4}')",
    )
    parser.add_argument("--cloud-resource", default=c.cloud_resource, help="the same for the cloud")


def cluster_from_args(args) -> cluster.ClusterConfig:
    kills = []
    for spec in args.kill_edge:
        edge, _, step = spec.partition(":")
        if not (edge.isdigit() and step.isdigit()):
            raise UserError(f"--kill-edge {spec!r} is invalid; valid: EDGE:STEP, two integers >= 0")
        kills.append((int(edge), int(step)))
    return cluster.ClusterConfig(
        edges=args.edges,
        flow=args.flow,
        order=args.order,
        dirichlet=args.dirichlet,
        edge_sync=args.edge_sync,
        links=tuple(x for x in args.links.split(",") if x),
        time_scale=args.time_scale,
        pin=args.pin,
        kill_edges=tuple(kills),
        kill_cloud=args.kill_cloud,
        max_restarts=args.max_restarts,
        timeout_s=args.timeout,
        address=args.address,
        edge_resource=args.edge_resource,
        cloud_resource=args.cloud_resource,
    )


def _csv(rows: list[list]) -> str:
    table = io.StringIO()
    csv.writer(table, lineterminator="\n").writerows(rows)
    return table.getvalue()


def write_outputs(out, summary: dict, result: cluster.ClusterResult) -> None:
    """summary.json, cloud_steps.csv, edge_steps.csv and curves.png, each written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outputs.write_json(out / "summary.json", summary)
    outputs.write_atomic(
        out / "cloud_steps.csv",
        _csv(
            [["cloud_step", "edge", "edge_step", "loss", "step_s"]]
            + [
                [i, edge, step, loss, step_s]
                for i, ((edge, step), loss, step_s) in enumerate(
                    zip(result.cloud_order, result.cloud_losses, result.cloud_step_s, strict=True)
                )
            ]
        ),
    )
    outputs.write_atomic(
        out / "edge_steps.csv",
        _csv(
            [["edge", "step", "loss", "step_s"]]
            + [
                [e.edge, t, loss, step_s]
                for e in result.edges
                for t, (loss, step_s) in enumerate(zip(e.losses, e.step_s, strict=True))
            ]
        ),
    )
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True)
    for e in result.edges:
        label = f"edge {e.edge}" + (" (lost)" if e.lost else f", test acc {e.edge_accuracy:.3f}")
        left.plot(e.losses, lw=1, label=label)
        steps = [t for edge, t in result.cloud_order if edge == e.edge]
        losses = [loss for (edge, _), loss in zip(result.cloud_order, result.cloud_losses) if edge == e.edge]
        right.plot(
            steps,
            losses,
            lw=1,
            label=f"on edge {e.edge}'s payloads"
            + ("" if e.cloud_accuracy is None else f", test acc {e.cloud_accuracy:.3f}"),
        )
    left.set(title="early exits (each edge)", xlabel="edge step", ylabel="training loss", yscale="log")
    right.set(title="cloud exit", xlabel="edge step")
    for ax in (left, right):
        ax.legend(fontsize=7)
    fig.suptitle(f"{len(result.edges)} edge(s), {result.flow}, {result.order}", fontsize=9)
    fig.tight_layout()
    outputs.save_figure(fig, out / "curves.png", dpi=120)
    plt.close(fig)


def resume_hint(out) -> str:
    return f"; continue with: python -m experiments.cluster ... --out {out} --resume" if out else ""


@cli.entry_point
def main(argv: list[str]) -> dict:
    process.setup()
    parser = cli.Parser(description=__doc__)
    add_config_flags(parser, DEFAULTS)
    add_cluster_flags(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its latest checkpoint (same settings)"
    )
    args = parser.parse_args(argv)
    config = config_from_args(args)
    validate(config)
    topology = cluster_from_args(args)
    cluster.validate_cluster(topology)
    if args.resume and not config.out:
        raise UserError("--resume needs the --out of the run to continue")
    out = (
        outputs.prepare_run_dir(config.out, resume=args.resume, overwrite=args.overwrite, outputs=OUTPUTS)
        if config.out
        else None
    )
    dataset = load_dataset(config.dataset, data_dir=config.data_dir or None)
    print(
        f"{config.model} (width {config.width}) on {dataset.name}, split after {config.split}, {config.bits} bits: "
        f"{topology.edges} edge(s) and a cloud as Ray workers, {topology.flow}, {topology.order} order",
        flush=True,
    )
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
        raise cluster.ClusterError(f"{error}{resume_hint(out)}") from None
    except RunInterrupted as stopped:
        raise RunInterrupted(stopped.step, stopped.checkpoint, resume_hint(out) if stopped.checkpoint else "") from None
    summary = {"config": dataclasses.asdict(config), "cluster": dataclasses.asdict(topology), **result.summary()}
    for name, where in result.placement.items():
        print(f"  {name}: {where}")
    for e in result.edges:
        state = (
            f"LOST after delivering step {e.last_delivered_step}"
            if e.lost
            else f"edge exit {e.edge_accuracy:.3f}, cloud exit on its features {e.cloud_accuracy:.3f}"
        )
        restarted = f", restarted {e.restarts}x ({e.replayed} steps replayed)" if e.restarts else ""
        print(
            f"edge {e.edge}: {e.examples} examples, sent {e.sent}, delivered {e.delivered}, dropped {e.dropped}"
            f"{restarted}; {state}"
        )
    this_run = len(result.cloud_order) - result.resumed_cloud_steps
    print(
        f"cloud: {this_run} steps in {result.wall_s:.2f} s ({result.cloud_steps_per_s:.1f}/s)"
        + (f", {len(result.cloud_order)} in all since step 0" if result.resumed_cloud_steps else "")
        + (f", mean cloud accuracy {result.mean_cloud_accuracy:.3f}" if result.mean_cloud_accuracy is not None else "")
    )
    if out is not None:
        if args.overwrite:
            outputs.remove_run(out, OUTPUTS)
        write_outputs(out, summary, result)
        print(f"wrote {', '.join(str(out / name) for name in OUTPUTS)}")
    return summary


if __name__ == "__main__":
    main()
