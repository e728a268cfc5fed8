"""Reproduce the paper's grid: accuracy of both exits per model, cut and bit width, against end-to-end
training and vanilla split learning, with the modeled runtime of each cut; then the report.

    python -m experiments.paper --profile smoke --out DIR            # about a minute: digits, tiny widths
    python -m experiments.paper --profile cpu --out DIR              # about 75 minutes on 2 CPU cores
    python -m experiments.paper --profile full --out DIR --seeds 3   # the paper's scale, for a GPU
    python -m experiments.paper --profile cpu --out DIR --models vgg16 --cuts pool3 --bits 4 32

Every cell is one training run through the library (`train.build` and `train.train`, the code path
of experiments.train) in DIR/cells/NAME/: its checkpoints, then its result.json once it is done.
Running the same command again skips finished cells and resumes an interrupted one from its last
checkpoint (a killed grid loses at most one checkpoint interval of one cell); a cell that crashed is
recorded with its error (DIR/cells/NAME/error.json) and retried on the next run, and the grid goes
on. A DIR holds one profile's grid only (and refuses it if the profile's settings have changed since).
After every cell, DIR/results.csv is rewritten from every finished cell in DIR (a narrowed rerun keeps
the others); at the end DIR/REPORT.md and its figures (DIR/*.png) are written.

Cells: `hierarchical` at every cut of each model with the profile's bit widths at every cut and its
bit sweep at one cut; `end_to_end` (the unsplit model, what cloud-only training computes) and
`split_learning` (at the sweep cut) at the same budget; `hierarchical_outage`, the link down for
20 % of the steps (SimulatedLink), at the sweep cut. --bits narrows the hierarchical cells (the
baselines send float32 and always run); --cuts without the sweep cut leaves out split learning and the
outage. The modeled runtime columns are computed when results.csv is written, from a profile of each
model at the profile's runtime width with the trained exit head.
"""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

from hier_jax import cli, outputs, process
from hier_jax.config import validate
from hier_jax.errors import ConfigError, UserError
from hier_jax.paper.grid import check_args, check_grid_dir, load_datasets, run_grid
from hier_jax.paper.profiles import SCHEMES, grid_profiles, plan


@cli.entry_point
def main(argv: list[str]) -> list[dict]:
    process.setup()
    profiles = grid_profiles()
    parser = cli.Parser(description=__doc__)
    parser.add_argument("--profile", required=True, help=f"the budget: {', '.join(profiles)}")
    parser.add_argument("--out", required=True, help="the grid's directory (rerun the same command to resume)")
    parser.add_argument(
        "--dataset",
        nargs="+",
        default=None,
        help="data sets (default: the profile's): cifar10, tiny_imagenet, digits, folder:PATH",
    )
    parser.add_argument("--models", nargs="+", default=None, help="narrow the grid to these models")
    parser.add_argument("--cuts", nargs="+", default=None, help="narrow the grid to these cuts")
    parser.add_argument(
        "--bits",
        nargs="+",
        type=int,
        default=None,
        help="narrow the hierarchical cells to these bit widths (the baselines always run)",
    )
    parser.add_argument("--schemes", nargs="+", default=None, help=f"narrow the grid: {', '.join(SCHEMES)}")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per cell (the report gives mean ± std)")
    parser.add_argument(
        "--tolerance-pts",
        type=float,
        default=1.0,
        help="the chosen cut's cloud exit may be at most this many points below end-to-end",
    )
    parser.add_argument("--edge-device", default=None, help="where the edge trains (default: auto)")
    parser.add_argument("--cloud-device", default=None, help="where the cloud trains (default: auto)")
    parser.add_argument("--data-dir", default="", help="tfds data directory (default: tfds's own)")
    args = parser.parse_args(argv)
    if args.profile not in profiles:
        raise ConfigError(f"--profile {args.profile!r} is invalid; valid: {', '.join(profiles)}")
    profile = profiles[args.profile]
    devices = {k: v for k, v in (("edge_device", args.edge_device), ("cloud_device", args.cloud_device)) if v}
    profile = dataclasses.replace(profile, config=dataclasses.replace(profile.config, **devices))
    models, cuts, bits, schemes = check_args(args, profile)
    specs = args.dataset or list(profile.datasets)
    for spec in specs:  # every field of every cell, before any data is loaded
        for model in models:
            validate(dataclasses.replace(profile.config, model=model, dataset=spec, split=profile.sweep_cut[model]))
    if not plan(profile, specs, models, cuts, bits, schemes, args.seeds):
        raise ConfigError("the flags leave no cell to run (--models, --cuts, --bits and --schemes together)")
    out = Path(args.out)
    check_grid_dir(out, profile)
    datasets, skipped = load_datasets(specs, explicit=args.dataset is not None, data_dir=args.data_dir)
    if not datasets:
        raise UserError("no data set is ready: " + "; ".join(skipped))
    cells = plan(profile, list(datasets), models, cuts, bits, schemes, args.seeds)
    out.mkdir(parents=True, exist_ok=True)
    outputs.write_json(
        out / "grid.json",
        {"profile": profile.name, "description": profile.description, "config": dataclasses.asdict(profile.config)},
    )
    command = "python -m experiments.paper " + shlex.join(argv)
    return run_grid(out, profile, cells, datasets, skipped, args.tolerance_pts, command)


if __name__ == "__main__":
    main()
