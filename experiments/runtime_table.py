"""Modeled epoch time of cloud-only, split learning and hierarchical training, against the paper.

    python -m experiments.runtime_table --out DIR [--model M ...] [--dataset D ...] [--bits B ...]
        [--batch 128] [--links 3g 4g] [--time-source flops|measured] [--flop-count conventional|xla] [--reprofile]

Profiles every stage, head and classifier of each model on this machine's CPU (cached as
DIR/profiles/*.json), maps them onto the paper's hardware (cloud: RTX 2080 Ti, edge: Quadro K620,
see ASSUMPTIONS), chooses the separation point and bit width of each scheme with
`selection.select_split` under the K620's memory, and writes DIR/runtime_table.csv,
DIR/split_sweep.csv, DIR/runtime_table.png and DIR/split_sweep.png.
"""

from __future__ import annotations

import argparse
import math

from hier_jax import cli, outputs, process
from hier_jax.data import STANDARD_SHAPES
from hier_jax.errors import UserError
from hier_jax.link import LINKS
from hier_jax.models import MODELS
from hier_jax.quantization import VALID_BITS
from hier_jax.runtime_model.hardware import CLOUD_EFFECTIVE_FLOPS, EDGE_SLOWDOWN, K620_MEMORY_BYTES
from hier_jax.runtime_model.profile import FLOP_COUNTS
from hier_jax.runtime_model.table import (
    assumptions,
    model_rows,
    plot_sweep,
    plot_table,
    print_table,
    write_csv,
)


def check_args(args: argparse.Namespace) -> None:
    """Every check that needs no profile, so a bad flag fails before any model is built."""
    for flag, value in (
        ("--batch", args.batch),
        ("--epochs", args.epochs),
        ("--profile-batch", args.profile_batch),
        ("--repeats", args.repeats),
    ):
        if value < 1:
            raise UserError(f"{flag} {value} is invalid; valid: an integer >= 1")
    for flag, value in (
        ("--edge-slowdown", args.edge_slowdown),
        ("--cloud-tflops", args.cloud_tflops),
        ("--memory-budget-gib", args.memory_budget_gib),
    ):
        if not (math.isfinite(value) and value > 0):
            raise UserError(f"{flag} {value:g} is invalid; valid: a finite number > 0")
    bad = [b for b in args.bits if b not in VALID_BITS]
    if bad:
        raise UserError(f"--bits {' '.join(map(str, bad))} is invalid; valid: {', '.join(map(str, VALID_BITS))}")


@cli.entry_point
def main(argv: list[str]) -> list[dict]:
    process.setup()
    parser = cli.Parser(description=__doc__)
    parser.add_argument("--model", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--dataset", nargs="+", default=list(STANDARD_SHAPES), choices=list(STANDARD_SHAPES))
    parser.add_argument(
        "--bits",
        nargs="+",
        type=int,
        default=[4],
        help="candidate bit widths (the selection "
        "picks the fastest; fewer bits always send less, so accuracy is what bounds this)",
    )
    parser.add_argument("--batch", type=int, default=128, help="modeled training batch size")
    parser.add_argument("--out", required=True)
    parser.add_argument("--links", nargs="+", default=["3g", "4g"], choices=list(LINKS))
    parser.add_argument(
        "--epochs", type=int, default=100, help="epochs over which end_to_end_once amortizes its one upload"
    )
    parser.add_argument("--profile-batch", type=int, default=8, help="batch the CPU profile is measured at")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--edge-slowdown", type=float, default=EDGE_SLOWDOWN)
    parser.add_argument("--cloud-tflops", type=float, default=CLOUD_EFFECTIVE_FLOPS / 1e12)
    parser.add_argument("--memory-budget-gib", type=float, default=K620_MEMORY_BYTES / 2**30)
    parser.add_argument("--time-source", choices=("flops", "measured"), default="flops")
    parser.add_argument(
        "--flop-count",
        choices=FLOP_COUNTS,
        default="conventional",
        help="conventional: a convolution's padding taps counted, as the throughput is and hardware computes "
        "them; xla: XLA's count, which leaves them out",
    )
    parser.add_argument("--reprofile", action="store_true", help="measure again even if a cached profile exists")
    args = parser.parse_args(argv)
    check_args(args)

    out = outputs.prepare_run_dir(args.out, outputs=())  # UserError for a file or an unwritable path
    rows, sweep = [], []
    for model_name in args.model:
        for dataset in args.dataset:
            r, s = model_rows(args, model_name, dataset)
            rows += r
            sweep += s
    print_table(rows, assumptions(args))
    write_csv(out / "runtime_table.csv", rows)
    write_csv(out / "split_sweep.csv", sweep)
    plot_table(rows, args, out / "runtime_table.png")
    plot_sweep(sweep, args, out / "split_sweep.png")
    print(
        f"wrote {out / 'runtime_table.csv'}, {out / 'split_sweep.csv'}, {out / 'runtime_table.png'}, "
        f"{out / 'split_sweep.png'}"
    )
    return rows


if __name__ == "__main__":
    main()
