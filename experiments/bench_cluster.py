"""Measured overlap across processes: one edge and one cloud as Ray workers, each pinned to one core,
the pipelined schedule against the sequential one, per separation point; and the in-process
sequential step on all cores.

For each split: each side's step time (median of the worker's own timings), the step time of the
sequential schedule (the edge waits for the cloud and the cloud for the edge) and of the pipelined one
(the edge runs up to --queue-size payloads ahead), each the run's wall time over its steps, median
over --repeats runs (the two schedules interleaved, new worker processes each run, compiled before the
clock starts). The ideal pipelined speed-up is (edge + cloud) / max(edge, cloud); `of_ideal` is the
measured speed-up divided by it, `hidden` the fraction of the shorter side that the pipeline hid:
(sequential - pipelined) / min(edge, cloud). `in_process` is the sequential step of the same run on
the thread backend (both sides in this process, on every core), the schedule the pipeline has to beat
on a small machine.

`scaling` is the cloud's throughput with N = 1, 2, 4 edges (pipelined, round robin; --split) on both
backends: images the cloud trained on per second of the run. On Ray each edge is pinned to a core,
round-robin over the host's cores but the last, which the cloud takes: with 2 cores every edge shares
one core, so more edges can only feed the cloud as fast as that one core makes payloads.

    python -m experiments.bench_cluster --model resnet18 --width 32 --batch-size 64 --splits layer1_1,layer2_1 --out DIR

Writes DIR/bench_cluster.json (host CPU, versions, every timing) and DIR/bench_cluster.md (the table).
Time it with nothing else running: the workers are pinned to cores other processes also use.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics

import jax

from hier_jax import cli, cluster, flags, outputs, process, train
from hier_jax.config import ExperimentConfig, validate
from hier_jax.data import load_dataset
from hier_jax.errors import check
from hier_jax.models import ExitHeadConfig, stage_names
from hier_jax.runtime_model import profiler

DEFAULTS = ExperimentConfig(
    model="resnet18",
    dataset="digits",
    split="layer2_1",
    width=32,
    batch_size=64,
    head=ExitHeadConfig(channels=64),
    queue_size=2,
)


SCALING_EDGES = (1, 2, 4)


def in_process_step_s(config: ExperimentConfig, dataset, steps: int, repeats: int) -> float:
    """Median per-step wall time of the sequential schedule on the thread backend (after a warm-up)."""
    setup = train.build(config, dataset)
    train.warm_up(setup)
    runs = [train.train(setup, schedule="sequential", progress=False) for _ in range(repeats)]
    return statistics.median(r.wall_s / steps for r in runs)


def run_on(config: ExperimentConfig, dataset):
    """One run of `config` on its backend (Ray: new worker processes, compiled before the clock starts)."""
    if config.backend == "ray":
        return cluster.run(config, dataset, evaluate=False)
    setup = train.build(config, dataset)
    train.warm_up(setup)
    return train.train(setup, progress=False)


def scaling(config: ExperimentConfig, dataset, steps: int, repeats: int) -> list[dict]:
    """Cloud images per second with N edges on each backend (median over `repeats` runs of `steps`
    steps per edge; enough epochs that every edge's shard lasts them)."""
    rows = []
    for edges in SCALING_EDGES:
        epochs = math.ceil(steps * edges * config.batch_size / dataset.num_train) + 1
        for backend in ("threads", "ray"):
            run = dataclasses.replace(config, edges=edges, backend=backend, schedule="pipelined", epochs=epochs)
            rates = []
            for _ in range(repeats):
                result = run_on(run, dataset)
                rates.append(result.cloud_steps_per_s * config.batch_size)
            rows.append(
                {"edges": edges, "backend": backend, "cloud_images_per_s": statistics.median(rates), "runs": rates}
            )
            print(
                f"scaling: {edges} edge(s) on {backend}: {rows[-1]['cloud_images_per_s']:.0f} cloud images/s",
                flush=True,
            )
    return rows


def measure_split(config: ExperimentConfig, dataset, steps: int, repeats: int) -> dict:
    runs = {"sequential": [], "pipelined": []}
    edge_s, cloud_s = [], []
    for _ in range(repeats):
        for schedule in runs:
            result = run_on(dataclasses.replace(config, schedule=schedule, backend="ray"), dataset)
            runs[schedule].append(result.wall_s / result.steps_per_edge)
            edge_s += result.record.edges[0]["step_s"]
            cloud_s += result.record.cloud["step_s"]
    edge, cloud = statistics.median(edge_s), statistics.median(cloud_s)
    sequential, pipelined = (statistics.median(runs[f]) for f in ("sequential", "pipelined"))
    ideal = (edge + cloud) / max(edge, cloud)
    achieved = sequential / pipelined
    return {
        "split": config.split,
        "edge_step_s": edge,
        "cloud_step_s": cloud,
        "sequential_step_s": sequential,
        "pipelined_step_s": pipelined,
        "sequential_runs_s": runs["sequential"],
        "pipelined_runs_s": runs["pipelined"],
        "ideal_speedup": ideal,
        "speedup": achieved,
        "of_ideal": achieved / ideal,
        "hidden": (sequential - pipelined) / min(edge, cloud),
        "in_process_step_s": in_process_step_s(config, dataset, steps, repeats),
    }


def table(rows: list[dict], scaled: list[dict], cpu: str, config: ExperimentConfig) -> str:
    lines = [
        f"One edge and one cloud as Ray workers, one core each, on {cpu}: {config.model} width {config.width}, "
        f"batch {config.batch_size}, {config.bits} bits (seconds per step, medians).",
        "",
        "| split | edge | cloud | sequential | pipelined | speed-up | ideal | of ideal | hidden "
        "| in-process, all cores |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['split']} | {r['edge_step_s']:.3f} | {r['cloud_step_s']:.3f} | {r['sequential_step_s']:.3f} "
            f"| {r['pipelined_step_s']:.3f} | {r['speedup']:.2f}x | {r['ideal_speedup']:.2f}x "
            f"| {r['of_ideal']:.2f} | {r['hidden']:.2f} | {r['in_process_step_s']:.3f} |"
        )
    if not scaled:
        return "\n".join(lines) + "\n"
    lines += [
        "",
        f"Scaling: the cloud's images per second with N edges (pipelined, round robin, split after {config.split}; "
        f"Ray: edges pinned round-robin to all cores but the last, the cloud on the last).",
        "",
        "| edges | threads | ray |",
        "| --- | --- | --- |",
    ]
    for edges in SCALING_EDGES:
        rate = {r["backend"]: r["cloud_images_per_s"] for r in scaled if r["edges"] == edges}
        lines.append(f"| {edges} | {rate['threads']:.0f} | {rate['ray']:.0f} |")
    return "\n".join(lines) + "\n"


@cli.entry_point
def main(argv: list[str]) -> dict:
    process.setup()
    parser = cli.Parser(description=__doc__)
    flags.add_flags(parser, ExperimentConfig, DEFAULTS)
    parser.add_argument("--splits", default="", help="comma-separated separation points (default: --split)")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=2, help="runs per schedule (interleaved)")
    parser.add_argument("--no-scaling", dest="scaling", action="store_false", help="skip the N-edge scaling runs")
    parser.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    args = parser.parse_args(argv)
    config = flags.parse(ExperimentConfig, args, DEFAULTS)
    splits = [s for s in args.splits.split(",") if s] or [config.split]
    for split in splits:
        check(split in stage_names(config.model), "--splits", split, ", ".join(stage_names(config.model)))
    check(args.steps >= 2, "--steps", args.steps, "an integer >= 2")
    check(args.repeats >= 1, "--repeats", args.repeats, "an integer >= 1")
    config = dataclasses.replace(config, max_steps=args.steps)
    validate(config)
    out = (
        outputs.prepare_run_dir(
            config.out, outputs=("bench_cluster.json", "bench_cluster.md"), overwrite=args.overwrite
        )
        if config.out
        else None
    )
    dataset = load_dataset(config.dataset, data_dir=config.data_dir or None)
    cpu = profiler.host_cpu()
    print(
        f"{cpu}, {len(os.sched_getaffinity(0))} cores; {len(splits)} split(s), {args.repeats} x 2 cluster runs each",
        flush=True,
    )
    rows = []
    with cluster.ray_session():
        for split in splits:
            rows.append(measure_split(dataclasses.replace(config, split=split), dataset, args.steps, args.repeats))
            r = rows[-1]
            print(
                f"{split}: edge {r['edge_step_s']:.3f} s, cloud {r['cloud_step_s']:.3f} s; sequential "
                f"{r['sequential_step_s']:.3f} s, pipelined {r['pipelined_step_s']:.3f} s ({r['of_ideal']:.2f} of "
                f"the ideal {r['ideal_speedup']:.2f}x); in-process on all cores {r['in_process_step_s']:.3f} s",
                flush=True,
            )
        scaled = scaling(config, dataset, args.steps, args.repeats) if args.scaling else []
    text = table(rows, scaled, cpu, config)
    print(text)
    result = {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "jax": jax.__version__,
        "config": dataclasses.asdict(config),
        "steps": args.steps,
        "repeats": args.repeats,
        "rows": rows,
        "scaling": scaled,
    }
    if out is not None:
        outputs.write_json(out / "bench_cluster.json", result)
        outputs.write_atomic(out / "bench_cluster.md", text)
    return result


if __name__ == "__main__":
    main()
