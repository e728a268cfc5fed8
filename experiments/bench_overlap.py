"""Measured overlap: edge alone, cloud alone, and the pair in both schedules (sequential, pipelined), per step.

With perfect overlap a step of the pair costs max(edge, cloud); run one after the other it costs
edge + cloud. `hidden` is the fraction of the shorter side that the pipelined schedule hid:
(sequential - pipelined) / min(edge, cloud). Each figure is the median over --repeats runs of
--steps steps (after a warm-up run), from blocking wall time. The pair is the library's own run
(`train.train`: the scheduler over one edge and the cloud, each on its device's dispatch thread), and
every figure makes its batches inside the clock, as a run does.

    python -m experiments.bench_overlap --model resnet18 --split layer2_1 --width 32 --batch-size 64 --out DIR
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics
import time

import jax

from hier_jax import cli, flags, outputs, process, train
from hier_jax.config import ONE_PAIR_FLAGS, ExperimentConfig, validate
from hier_jax.data import load_dataset
from hier_jax.errors import check
from hier_jax.models import ExitHeadConfig

DEFAULTS = ExperimentConfig(
    model="resnet18", dataset="digits", split="layer2_1", width=32, batch_size=64, head=ExitHeadConfig(channels=64)
)


def time_side(step, state, inputs) -> tuple[float, object]:
    """Blocking wall time of running `step` over `inputs` (one side only)."""
    start = time.perf_counter()
    for args in inputs:
        state, *_ = step(state, *args)
    jax.block_until_ready(state)
    return time.perf_counter() - start, state


@cli.entry_point
def main(argv: list[str]) -> dict:
    process.setup()
    parser = cli.Parser(description=__doc__)
    flags.add_flags(parser, ExperimentConfig, DEFAULTS, include=ONE_PAIR_FLAGS)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median reported)")
    args = parser.parse_args(argv)
    config = flags.parse(ExperimentConfig, args, DEFAULTS)
    config = dataclasses.replace(config, max_steps=args.steps, checkpoint_every=0)
    # Every check that needs no data, before anything is loaded or built.
    validate(config)
    for flag, value in (("--steps", args.steps), ("--repeats", args.repeats)):
        check(value >= 1, flag, value, "an integer >= 1")
    out = outputs.prepare_run_dir(config.out, outputs=()) if config.out else None
    dataset = load_dataset(config.dataset, data_dir=config.data_dir or None)
    train.check_data(config, dataset)
    setup = train.build(config, dataset)
    check(
        setup.total_steps == args.steps,
        "--steps",
        args.steps,
        f"at most the {setup.total_steps} steps of --epochs {config.epochs}",
    )
    h = setup.hierarchy
    train.warm_up(setup)
    edge_state, _ = train.fresh_states(setup)
    _, payload, _ = h.edge_step(edge_state, *next(iter(train.TrainBatches(setup))))
    cloud_inputs = [(jax.device_put(payload, h.cloud_device),)] * args.steps

    figures: dict[str, list[float]] = {"edge": [], "cloud": [], "sequential": [], "pipelined": []}
    for repeat in range(args.repeats + 1):  # the first round warms caches and threads up
        edge_state, cloud_state = train.fresh_states(setup)
        edge_s, _ = time_side(h.edge_step, edge_state, itertools.islice(train.TrainBatches(setup), args.steps))
        cloud_s, _ = time_side(h.cloud_step, cloud_state, cloud_inputs)
        seq = train.train(setup, schedule="sequential", progress=False)
        ovl = train.train(setup, schedule="pipelined", progress=False)
        if repeat:
            for key, value in zip(figures, (edge_s, cloud_s, seq.wall_s, ovl.wall_s), strict=True):
                figures[key].append(value / args.steps)
    median = {k: statistics.median(v) for k, v in figures.items()}
    hidden = (median["sequential"] - median["pipelined"]) / min(median["edge"], median["cloud"])
    result = {
        "config": dataclasses.asdict(config),
        "steps": args.steps,
        "repeats": args.repeats,
        "device_edge": str(h.edge_device),
        "device_cloud": str(h.cloud_device),
        "per_step_s": median,
        "spread_s": {k: [min(v), max(v)] for k, v in figures.items()},
        "ideal_pipelined_s": max(median["edge"], median["cloud"]),
        "speedup": median["sequential"] / median["pipelined"],
        "hidden_fraction": hidden,
    }
    print(
        f"{config.model} width {config.width}, split after {setup.split.point}, batch {config.batch_size}, "
        f"{args.steps} steps x {args.repeats} repeats (median per step, [min, max]):"
    )
    for key, values in figures.items():
        print(f"  {key:<11} {median[key] * 1e3:8.1f} ms  [{min(values) * 1e3:.1f}, {max(values) * 1e3:.1f}]")
    print(
        f"  ideal pipelined = max(edge, cloud) = {result['ideal_pipelined_s'] * 1e3:.1f} ms; "
        f"speed-up {result['speedup']:.2f}x; hidden {100 * hidden:.0f} % of the shorter side"
    )
    if out is not None:
        outputs.write_json(out / "bench_overlap.json", result)
    return result


if __name__ == "__main__":
    main()
