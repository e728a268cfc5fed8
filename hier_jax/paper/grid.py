"""Running a grid: its flags checked against the profile, its directory checked, its data sets loaded, every cell not yet done run (results.csv rewritten after each), then the report."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from hier_jax import cli, outputs
from hier_jax.config import RUN_ONLY_FIELDS, ExperimentConfig
from hier_jax.data import ImageDataset, load_dataset
from hier_jax.errors import ConfigError, RunInterrupted, UserError
from hier_jax.paper.cells import load_rows, run_cell, write_results
from hier_jax.paper.profiles import SCHEMES, Cell, GridProfile, dataset_key
from hier_jax.paper.report import write_report
from hier_jax.paper.runtime import DataShape, RuntimeModel, add_runtime
from hier_jax.quantization import VALID_BITS


def check_args(args, profile: GridProfile) -> tuple[list[str], list[str] | None, list[int] | None, list[str]]:
    """Validate the narrowing flags against the profile (ConfigError listing the valid choices)."""
    models = args.models or list(profile.cuts)
    bad = [m for m in models if m not in profile.cuts]
    if bad:
        raise ConfigError(
            f"--models {' '.join(bad)} is invalid for the {profile.name} profile; valid: {', '.join(profile.cuts)}"
        )
    valid_cuts = sorted({c for m in models for c in profile.cuts[m]})
    bad = [c for c in args.cuts or () if c not in valid_cuts]
    if bad:
        raise ConfigError(f"--cuts {' '.join(bad)} is invalid; valid for {', '.join(models)}: {', '.join(valid_cuts)}")
    bad = [b for b in args.bits or () if b not in VALID_BITS]
    if bad:
        raise ConfigError(f"--bits {' '.join(map(str, bad))} is invalid; valid: {', '.join(map(str, VALID_BITS))}")
    grid_bits = sorted(set(profile.bits) | set(profile.sweep_bits))
    bad = [b for b in args.bits or () if b not in grid_bits]
    if bad:
        raise ConfigError(
            f"--bits {' '.join(map(str, bad))} is not in the {profile.name} grid; valid: "
            f"{', '.join(map(str, grid_bits))}"
        )
    schemes = args.schemes or list(SCHEMES)
    bad = [s for s in schemes if s not in SCHEMES]
    if bad:
        raise ConfigError(f"--schemes {' '.join(bad)} is invalid; valid: {', '.join(SCHEMES)}")
    if args.seeds < 1:
        raise ConfigError(f"--seeds {args.seeds} is invalid; valid: an integer >= 1")
    if not (math.isfinite(args.tolerance_pts) and args.tolerance_pts >= 0):
        raise ConfigError(f"--tolerance-pts {args.tolerance_pts} is invalid; valid: a finite number >= 0")
    return models, args.cuts, args.bits, schemes


def check_grid_dir(out: Path, profile: GridProfile) -> None:
    """A DIR holds one profile's grid: refuse to mix another profile's cells into it."""
    marker = out / "grid.json"
    if marker.exists():
        grid = json.loads(marker.read_text())
        recorded = grid.get("profile")
        if recorded != profile.name:
            raise UserError(
                f"--out {out} holds a grid of the {recorded!r} profile; a {profile.name!r} grid needs "
                f"another --out (results of two profiles are never mixed)"
            )
        current = dataclasses.asdict(profile.config)
        # A field added since the grid was started had its default value then (as train.check_resumable).
        there = {**json.loads(json.dumps(dataclasses.asdict(ExperimentConfig()))), **grid.get("config", {})}
        changed = [
            f"{k} ({there.get(k)!r} there, {v!r} now)"
            for k, v in current.items()
            if k not in RUN_ONLY_FIELDS and json.loads(json.dumps(v)) != there.get(k)
        ]
        if changed:
            raise UserError(
                f"--out {out} holds a {profile.name} grid made with other settings: "
                + "; ".join(changed)
                + "; use another --out"
            )
    elif out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {out} is not empty and holds no grid (no grid.json); choose another directory")


def load_datasets(specs: list[str], explicit: bool, data_dir: str) -> tuple[dict[str, ImageDataset], list[str]]:
    """Load every data set; an unprepared one is skipped with its reason, unless it was named explicitly."""
    loaded, skipped = {}, []
    for spec in specs:
        try:
            loaded[spec] = load_dataset(spec, data_dir=data_dir or None)
        except UserError as error:
            if explicit:
                raise
            skipped.append(f"data set {spec}: {cli.one_line(error)}")
    return loaded, skipped


def run_grid(
    out: Path,
    profile: GridProfile,
    cells: list[Cell],
    datasets: dict[str, ImageDataset],
    skipped: list[str],
    tolerance_pts: float,
    command: str,
) -> list[dict]:
    """Run every cell not yet done, rewriting results.csv after each; then the report."""
    from tqdm.auto import tqdm

    started = time.perf_counter()
    todo = [c for c in cells if not (out / "cells" / c.name / "result.json").exists()]
    print(
        f"{profile.name} grid in {out}: {len(cells)} cells, {len(cells) - len(todo)} already done, "
        f"{len(todo)} to run; rerun this command to resume after a stop",
        flush=True,
    )
    shapes = {dataset_key(spec): DataShape.of(ds) for spec, ds in datasets.items()}
    runtime = RuntimeModel(out, profile)
    for dataset, model in sorted({(dataset_key(c.dataset), c.model) for c in cells}):
        print(
            f"runtime model: profiling {model} at width {profile.runtime_width} on {dataset}'s shapes "
            f"(cached in {runtime.dir})",
            flush=True,
        )
        runtime.devices(model, shapes[dataset])

    def rewrite_results() -> list[dict]:
        rows = load_rows(out)
        add_runtime(rows, runtime, shapes)
        write_results(out, rows)
        return rows

    bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc="grid", unit="cell")
    durations = []
    try:
        for i, cell in enumerate(todo):
            cell_dir = out / "cells" / cell.name
            cell_dir.mkdir(parents=True, exist_ok=True)
            bar.set_postfix_str(cell.name)
            t0 = time.perf_counter()
            try:
                row = run_cell(cell, profile, datasets[cell.dataset], cell_dir)
            except RunInterrupted as stopped:
                raise RunInterrupted(
                    stopped.step, stopped.checkpoint, f"; resume the grid with the same command ({command})"
                ) from None
            except Exception as error:  # noqa: BLE001 - a crashed cell is recorded; the grid goes on
                message = f"{type(error).__name__}: {cli.one_line(error)}"
                outputs.write_json(cell_dir / "error.json", {"error": message, "traceback": traceback.format_exc()})
                bar.write(
                    f"cell {cell.name} failed: {message} (recorded in {cell_dir / 'error.json'}; "
                    f"the grid goes on, and a rerun retries it)",
                    file=sys.stderr,
                )
            else:
                (cell_dir / "error.json").unlink(missing_ok=True)
                outputs.write_json(cell_dir / "result.json", row)
                durations.append(time.perf_counter() - t0)
                left = (len(todo) - i - 1) * float(np.mean(durations))
                edge = "–" if row["edge_accuracy"] is None else f"{row['edge_accuracy']:.4f}"
                bar.write(
                    f"[{len(cells) - len(todo) + i + 1}/{len(cells)}] {cell.name}: edge {edge}, cloud "
                    f"{row['cloud_accuracy']:.4f} ({durations[-1]:.0f} s; about {left / 60:.0f} min left)"
                )
            bar.update()
            rewrite_results()
    finally:
        bar.close()
    rows = rewrite_results()
    write_report(
        out, profile, rows, cells, skipped, runtime, shapes, tolerance_pts, time.perf_counter() - started, command
    )
    print(f"wrote {out / 'results.csv'}, {out / 'REPORT.md'} and its figures")
    return rows
