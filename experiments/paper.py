"""Reproduce the paper's grid: accuracy of both exits per model, cut and bit width, against end-to-end
training and vanilla split learning, with the modeled runtime of each cut; then the report.

    python -m experiments.paper --profile smoke --out DIR            # about a minute: digits, tiny widths
    python -m experiments.paper --profile cpu --out DIR              # about 75 minutes on 2 CPU cores
    python -m experiments.paper --profile full --out DIR --seeds 3   # the paper's scale, for a GPU
    python -m experiments.paper --profile cpu --out DIR --models vgg16 --cuts pool3 --bits 4 32
    python -m experiments.paper --profile cpu --out DIR --measured docs/results/bench_network/bench_network.json

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
20 % of the steps (the link clock), at the sweep cut. --bits narrows the hierarchical cells (the
baselines send float32 and always run); --cuts without the sweep cut leaves out split learning and the
outage. The modeled runtime columns are computed when results.csv is written, from a profile of each
model at the profile's runtime width with the trained exit head; --measured adds the reductions
experiments.bench_network measured over shaped links (a finished grid only rewrites its report).
"""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

from hier_jax import cli, flags, outputs, process
from hier_jax.config import ExperimentConfig, validate
from hier_jax.errors import ConfigError, UserError, check
from hier_jax.paper.grid import GridRequest, check_grid_dir, check_request, load_datasets, run_grid
from hier_jax.paper.profiles import grid_profiles, plan
from hier_jax.paper.report import read_measured

CONFIG_FLAGS = ("edge_device", "cloud_device", "data_dir")
"""The cells' config fields a grid command may set (the rest is the profile's)."""


@cli.entry_point
def main(argv: list[str]) -> list[dict]:
    process.setup()
    profiles = grid_profiles()
    parser = cli.Parser(description=__doc__)
    flags.add_flags(parser, GridRequest)
    flags.add_flags(parser, ExperimentConfig, include=CONFIG_FLAGS)
    args = parser.parse_args(argv)
    request = flags.parse(GridRequest, args)
    check(request.profile in profiles, "--profile", request.profile, ", ".join(profiles))
    check(bool(request.out), "--out", request.out, "the grid's directory")
    profile = profiles[request.profile]
    given = flags.given(ExperimentConfig, args, include=CONFIG_FLAGS)
    profile = dataclasses.replace(profile, config=flags.replace_paths(profile.config, given))
    models, cuts, bits, schemes = check_request(request, profile)
    specs = list(request.dataset) or list(profile.datasets)
    for spec in specs:  # every field of every cell, before any data is loaded
        for model in models:
            validate(dataclasses.replace(profile.config, model=model, dataset=spec, split=profile.sweep_cut[model]))
    if not plan(profile, specs, models, cuts, bits, schemes, request.seeds):
        raise ConfigError("the flags leave no cell to run (--models, --cuts, --bits and --schemes together)")
    out = Path(request.out)
    check_grid_dir(out, profile)
    measured = read_measured(request.measured) if request.measured else None
    datasets, skipped = load_datasets(specs, explicit=bool(request.dataset), data_dir=profile.config.data_dir)
    if not datasets:
        raise UserError("no data set is ready: " + "; ".join(skipped))
    cells = plan(profile, list(datasets), models, cuts, bits, schemes, request.seeds)
    out.mkdir(parents=True, exist_ok=True)
    outputs.write_json(
        out / "grid.json",
        {"profile": profile.name, "description": profile.description, "config": dataclasses.asdict(profile.config)},
    )
    command = "python -m experiments.paper " + shlex.join(argv)
    return run_grid(out, profile, cells, datasets, skipped, request.tolerance_pts, command, measured)


if __name__ == "__main__":
    main()
