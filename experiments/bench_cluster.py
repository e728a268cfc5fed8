"""Measured overlap across processes: one edge and one cloud as Ray workers, each pinned to one core,
the pipelined schedule against the sequential one, per separation point; and the in-process
sequential step on all cores.

For each split: each side's step time (median of the worker's own timings), the step time of the
sequential schedule (the edge waits for the cloud and the cloud for the edge) and of the pipelined one
(the edge runs up to --queue-size payloads ahead), each the run's wall time over its steps, median
over --repeats runs (the two schedules interleaved, new worker processes each run, compiled before the
clock starts). The ideal pipelined speed-up is (edge + cloud) / max(edge, cloud); `of_ideal` is the
measured speed-up divided by it, `hidden` the fraction of the shorter side that the pipeline hid:
(sequential - pipelined) / min(edge, cloud). `in_process` is threads.run_sequential's step (batches
made inside the clock) with both sides in this process on every core, the schedule the pipeline has
to beat on a small machine.

    python -m experiments.bench_cluster --model resnet18 --width 32 --batch-size 64 --splits layer1_1,layer2_1 --out DIR

Writes DIR/bench_cluster.json (host CPU, versions, every timing) and DIR/bench_cluster.md (the table).
Time it with nothing else running: the workers are pinned to cores other processes also use.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import statistics
import time

import jax

from hier_jax import cli, cluster, flags, outputs, process, train
from hier_jax.config import ExperimentConfig, validate
from hier_jax.data import load_dataset
from hier_jax.errors import check
from hier_jax.models import ExitHeadConfig, stage_names
from hier_jax.run import threads
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


def in_process_step_s(config: ExperimentConfig, dataset, steps: int, repeats: int) -> float:
    """Median per-step wall time of the in-process sequential schedule (after a compiled warm-up)."""
    setup = train.build(config, dataset)
    train.warm_up(setup)
    times = []
    for _ in range(repeats):
        edge_state, cloud_state = train.fresh_states(setup)
        start = time.perf_counter()  # batches made inside the clock, as the edge worker makes its own
        result = threads.run_sequential(
            setup.hierarchy, edge_state, cloud_state, itertools.islice(train.TrainBatches(setup), steps)
        )
        jax.block_until_ready((result.edge_state, result.cloud_state))
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def measure_split(config: ExperimentConfig, dataset, steps: int, repeats: int) -> dict:
    runs = {"sequential": [], "pipelined": []}
    edge_s, cloud_s = [], []
    for _ in range(repeats):
        for schedule in runs:
            result = cluster.run(
                dataclasses.replace(config, schedule=schedule), dataset, cluster.ClusterConfig(edges=1)
            )
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


def table(rows: list[dict], cpu: str, config: ExperimentConfig) -> str:
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
    return "\n".join(lines) + "\n"


@cli.entry_point
def main(argv: list[str]) -> dict:
    process.setup()
    parser = cli.Parser(description=__doc__)
    flags.add_flags(parser, ExperimentConfig, DEFAULTS)
    parser.add_argument("--splits", default="", help="comma-separated separation points (default: --split)")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=2, help="runs per schedule (interleaved)")
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
    for split in splits:
        rows.append(measure_split(dataclasses.replace(config, split=split), dataset, args.steps, args.repeats))
        r = rows[-1]
        print(
            f"{split}: edge {r['edge_step_s']:.3f} s, cloud {r['cloud_step_s']:.3f} s; sequential "
            f"{r['sequential_step_s']:.3f} s, pipelined {r['pipelined_step_s']:.3f} s ({r['of_ideal']:.2f} of the "
            f"ideal {r['ideal_speedup']:.2f}x); in-process on all cores {r['in_process_step_s']:.3f} s",
            flush=True,
        )
    text = table(rows, cpu, config)
    print(text)
    result = {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "jax": jax.__version__,
        "config": dataclasses.asdict(config),
        "steps": args.steps,
        "repeats": args.repeats,
        "rows": rows,
    }
    if out is not None:
        outputs.write_json(out / "bench_cluster.json", result)
        outputs.write_atomic(out / "bench_cluster.md", text)
    return result


if __name__ == "__main__":
    main()
