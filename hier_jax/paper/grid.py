"""Running a grid: its flags checked against the profile, its directory checked, its data sets loaded,
every cell not yet done run (results.csv rewritten after each), then the report."""

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
from hier_jax.config import ExperimentConfig, differences, from_dict
from hier_jax.data import DataShape, ImageDataset, load_dataset
from hier_jax.errors import RunInterrupted, UserError, check
from hier_jax.flags import option
from hier_jax.paper.cells import load_rows, run_cell, write_results
from hier_jax.paper.profiles import SCHEMES, Cell, GridProfile, dataset_key, grid_profiles
from hier_jax.paper.report import write_report
from hier_jax.paper.runtime import RuntimeModel, add_runtime
from hier_jax.quantization import VALID_BITS


@dataclasses.dataclass(frozen=True)
class GridRequest:
    """What `experiments.paper` asks for: a profile's grid in a directory, optionally narrowed."""

    profile: str = option("", f"the budget: {', '.join(grid_profiles())} (required)")
    out: str = option("", "the grid's directory (rerun the same command to resume; required)")
    dataset: tuple[str, ...] = option(
        (), "data sets (default: the profile's): cifar10, tiny_imagenet, digits, folder:PATH", many=True
    )
    models: tuple[str, ...] = option((), "narrow the grid to these models", many=True)
    cuts: tuple[str, ...] = option((), "narrow the grid to these cuts", many=True)
    bits: tuple[int, ...] = option(
        (), "narrow the hierarchical cells to these bit widths (the baselines always run)", many=True
    )
    schemes: tuple[str, ...] = option((), f"narrow the grid: {', '.join(SCHEMES)}", many=True)
    seeds: int = option(1, "seeds per cell (the report gives mean ± std)")
    tolerance_pts: float = option(1.0, "the chosen cut's cloud exit may be at most this many points below end-to-end")
    measured: str = option(
        "", "a bench_network.json (experiments.bench_network): the report shows its measured reductions too"
    )


def check_request(
    request: GridRequest, profile: GridProfile
) -> tuple[list[str], list[str] | None, list[int] | None, list[str]]:
    """Validate the narrowing flags against the profile (ConfigError listing the valid choices):
    (models, cuts or None, bits or None, schemes)."""
    models = list(request.models) or list(profile.cuts)
    bad = [m for m in models if m not in profile.cuts]
    check(not bad, "--models", bad, f"{', '.join(profile.cuts)} (the {profile.name} profile's)")
    valid_cuts = sorted({c for m in models for c in profile.cuts[m]})
    bad = [c for c in request.cuts if c not in valid_cuts]
    check(not bad, "--cuts", bad, f"{', '.join(valid_cuts)} (the cuts of {', '.join(models)})")
    bad = [b for b in request.bits if b not in VALID_BITS]
    check(not bad, "--bits", bad, ", ".join(map(str, VALID_BITS)))
    grid_bits = sorted(set(profile.bits) | set(profile.sweep_bits))
    bad = [b for b in request.bits if b not in grid_bits]
    check(not bad, "--bits", bad, f"{', '.join(map(str, grid_bits))} (the {profile.name} grid's)")
    schemes = list(request.schemes) or list(SCHEMES)
    bad = [s for s in schemes if s not in SCHEMES]
    check(not bad, "--schemes", bad, ", ".join(SCHEMES))
    check(request.seeds >= 1, "--seeds", request.seeds, "an integer >= 1")
    check(
        math.isfinite(request.tolerance_pts) and request.tolerance_pts >= 0,
        "--tolerance-pts",
        request.tolerance_pts,
        "a finite number >= 0",
    )
    return models, list(request.cuts) or None, list(request.bits) or None, schemes


def check_grid_dir(out: Path, profile: GridProfile) -> None:
    """A DIR holds one profile's grid: refuse to mix another profile's cells into it."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    marker = out / "grid.json"
    if marker.exists():
        grid = json.loads(marker.read_text())
        recorded = grid.get("profile")
        if recorded != profile.name:
            raise UserError(
                f"--out {out} holds a grid of the {recorded!r} profile; a {profile.name!r} grid needs "
                f"another --out (results of two profiles are never mixed)"
            )
        changed = differences(profile.config, from_dict(ExperimentConfig, grid.get("config", {})), "there")
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
    measured: dict | None = None,
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
        out,
        profile,
        rows,
        cells,
        skipped,
        runtime,
        shapes,
        tolerance_pts,
        time.perf_counter() - started,
        command,
        measured,
    )
    print(f"wrote {out / 'results.csv'}, {out / 'REPORT.md'} and its figures")
    return rows
