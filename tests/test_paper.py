"""experiments.paper: the smoke grid end to end (CSV schema, numbers derived by hand, report and
figures), a rerun that trains nothing, an interrupted grid that resumes to the uninterrupted results,
a crashed cell that is recorded while the grid goes on, and clear errors before any work."""

from __future__ import annotations

import _thread
import csv
import dataclasses
import json
import shutil
import time

import pytest

from experiments import paper
from hier_jax import train
from hier_jax.errors import UserError
from hier_jax.flags import replace_paths
from hier_jax.paper import grid, profiles, runtime
from hier_jax.paper.cells import CSV_COLUMNS, load_rows
from hier_jax.paper.profiles import OUTAGE_BUFFER
from hier_jax.run import progress

SMOKE = ["--profile", "smoke"]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def with_profiles(source, target):
    """A grid directory that starts with `source`'s cached runtime profiles (so no test profiles twice)."""
    shutil.copytree(source / "profiles", target / "profiles")
    (target / "grid.json").write_text((source / "grid.json").read_text())
    return target


@pytest.fixture(scope="module")
def smoke_grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("paper") / "smoke"
    rows = paper.main(SMOKE + ["--out", str(out)])
    return out, rows


def by_cell(rows):
    return {(r["cut"], str(r["bits"]), r["scheme"]): r for r in rows}


@pytest.mark.slow
def test_the_smoke_grid_writes_every_cell_the_csv_the_report_and_the_figures(smoke_grid):
    out, _ = smoke_grid
    rows = read_csv(out / "results.csv")
    assert list(rows[0]) == list(CSV_COLUMNS)
    cells = by_cell(rows)
    assert set(cells) == {
        ("layer1_1", "2", "hierarchical"),
        ("layer1_1", "4", "hierarchical"),
        ("layer1_1", "32", "hierarchical"),
        ("layer2_1", "4", "hierarchical"),
        ("layer2_1", "32", "hierarchical"),
        ("layer1_1", "32", "split_learning"),
        ("layer1_1", "4", "hierarchical_outage"),
        ("", "32", "end_to_end"),
    }
    assert all(r["status"] == "done" and r["profile"] == "smoke" and r["steps"] == "20" for r in rows)
    e2e = float(cells[("", "32", "end_to_end")]["cloud_accuracy"])
    for r in rows:
        assert float(r["end_to_end_accuracy"]) == e2e
        assert float(r["cloud_minus_end_to_end_pts"]) == pytest.approx(100 * (float(r["cloud_accuracy"]) - e2e))
        assert r["raw_bytes_per_image"] == str(32 * 32 * 3 + 1)
    # resnet18_tv width 4 on 32x32: stride-2 stem and max-pool leave 8x8x4 features at layer1_1, 4x4x8 at
    # layer2_1. Per image: the packed codes and a uint8 label; per batch of 32: a float32 scale and offset.
    expected = {
        ("layer1_1", 2): 256 / 4 + 1 + 8 / 32,
        ("layer1_1", 4): 256 / 2 + 1 + 8 / 32,
        ("layer1_1", 32): 256 * 4 + 1,
        ("layer2_1", 4): 128 / 2 + 1 + 8 / 32,
        ("layer2_1", 32): 128 * 4 + 1,
    }
    for (cut, bits), value in expected.items():
        assert float(cells[(cut, str(bits), "hierarchical")]["payload_bytes_per_image"]) == value
    # Split learning: float32 features and the label up, their gradient down; cloud-only: the raw image.
    assert float(cells[("layer1_1", "32", "split_learning")]["payload_bytes_per_image"]) == 256 * 4 + 1 + 256 * 4
    assert float(cells[("", "32", "end_to_end")]["payload_bytes_per_image"]) == 32 * 32 * 3 + 1
    # The edge never sees the bit width (nothing flows back): its exit is the same at every width of a cut.
    for cut, widths in (("layer1_1", ("2", "4", "32")), ("layer2_1", ("4", "32"))):
        assert len({cells[(cut, b, "hierarchical")]["edge_accuracy"] for b in widths}) == 1
    # The 4-bit hand-off sends 8x less than the float32 one over the same link: a larger modeled saving.
    for lk in runtime.REPORT_LINKS:
        assert float(cells[("layer1_1", "4", "hierarchical")][f"reduction_vs_end_to_end_{lk}"]) > float(
            cells[("layer1_1", "32", "hierarchical")][f"reduction_vs_end_to_end_{lk}"]
        )
    report = (out / "REPORT.md").read_text()
    for heading in (
        "## Accuracy per cut and bit width",
        "## Baselines at the same budget",
        "## The chosen cut",
        "## Link outage",
        "## Payload and modeled runtime per cut",
    ):
        assert heading in report
    for figure in ("accuracy_vs_cut.png", "accuracy_vs_bits.png", "accuracy_vs_reduction.png"):
        assert f"]({figure})" in report
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_the_outage_cell_trains_the_edge_on_and_counts_every_payload(smoke_grid):
    out, rows = smoke_grid
    outage = next(r for r in rows if r["scheme"] == "hierarchical_outage")
    clean = next(r for r in rows if (r["scheme"], r["cut"], r["bits"]) == ("hierarchical", "layer1_1", 4))
    link = outage["link"]
    assert link["outages"] == [[8, 12]]  # the middle 20 % of 20 steps
    assert link["sent"] == 20 and link["sent"] == link["delivered"] + link["dropped"] and link["dropped"] > 0
    assert outage["cloud_steps"] == 20 - link["dropped"] and outage["dropped_payloads"] == link["dropped"]
    # Dropped: payloads still buffered when the link went down, or sent while it was down; none after.
    assert all(8 - OUTAGE_BUFFER - 2 <= step < 12 for step in link["dropped_steps"])
    # The edge trains exactly as it would with the link up; the cloud trains on fewer payloads.
    assert outage["edge_accuracy"] == clean["edge_accuracy"]


@pytest.mark.slow
def test_split_learning_matches_end_to_end(smoke_grid):
    _, rows = smoke_grid
    cells = {r["scheme"]: r for r in rows if r["scheme"] in ("end_to_end", "split_learning")}
    assert abs(cells["split_learning"]["cloud_accuracy"] - cells["end_to_end"]["cloud_accuracy"]) <= 2 / 360


@pytest.mark.slow
def test_a_second_run_skips_every_finished_cell(smoke_grid, monkeypatch, capsys):
    out, _ = smoke_grid
    results = {p: p.read_text() for p in (out / "cells").rglob("result.json")}
    table = (out / "results.csv").read_text()
    monkeypatch.setattr(train, "train", lambda *a, **k: pytest.fail("a finished cell was trained again"))
    capsys.readouterr()
    rows = paper.main(SMOKE + ["--out", str(out)])
    assert "8 cells, 8 already done, 0 to run" in capsys.readouterr().out
    assert len(rows) == 8 and {p: p.read_text() for p in (out / "cells").rglob("result.json")} == results
    assert (out / "results.csv").read_text() == table
    # A narrowed rerun reports every cell of the grid, not only the ones it asked for.
    rows = paper.main(SMOKE + ["--out", str(out), "--cuts", "layer2_1"])
    assert "3 cells, 3 already done, 0 to run" in capsys.readouterr().out  # layer2_1 at 4 and 32 bits, end-to-end
    assert len(rows) == 8 and (out / "results.csv").read_text() == table


def bench_network_row(**fields):
    row = dict(model="resnet18_tv", split="layer1_1", bits=4, preset="3g", scheme="hierarchical_pipelined",
               measured_step_s=1.25, modeled_step_s=1.0, reduction_measured=0.5, reduction_modeled=0.6)  # fmt: skip
    return {**row, **fields}


@pytest.mark.slow
def test_a_finished_grid_reports_measured_reductions_beside_its_modeled_ones(smoke_grid, monkeypatch, tmp_path):
    out, _ = smoke_grid
    monkeypatch.setattr(train, "train", lambda *a, **k: pytest.fail("a finished cell was trained again"))
    measured = tmp_path / "bench_network.json"
    rows = [bench_network_row(), bench_network_row(scheme="end_to_end"), bench_network_row(split="layer3_1")]
    measured.write_text(json.dumps({"cpu": "a CPU", "settings": {"width": 4, "batch": 32}, "rows": rows}))
    paper.main(SMOKE + ["--out", str(out), "--measured", str(measured)])
    report = (out / "REPORT.md").read_text()
    section = report.split("## Runtime measured over shaped links")[1].split("##")[0]
    cell = by_cell(read_csv(out / "results.csv"))[("layer1_1", "4", "hierarchical")]
    grid_3g = f"{100 * float(cell['reduction_vs_end_to_end_3g']):.0f} %"
    assert "on a CPU" in section and "width 4, batch 32" in section
    assert (
        f"| resnet18_tv | layer1_1 | 4 | 3g | hierarchical_pipelined | 1.250 / 1.000 | 50 % | 60 % | {grid_3g} |"
        in (section)
    )
    assert "end_to_end" not in section  # the baseline of every reduction is not a row of its own
    assert "| layer3_1 | 4 | 3g | hierarchical_pipelined | 1.250 / 1.000 | 50 % | 60 % | – |" in section  # no cell
    assert float(cell["reduction_vs_end_to_end_3g_xla_flops"]) == pytest.approx(
        float(cell["reduction_vs_end_to_end_3g"]), abs=0.05
    )
    paper.main(SMOKE + ["--out", str(out)])  # without the flag the section goes again
    assert "shaped links" not in (out / "REPORT.md").read_text()


@pytest.mark.slow
def test_an_interrupted_grid_resumes_to_the_results_of_an_uninterrupted_one(smoke_grid, tmp_path, monkeypatch, capsys):
    """Ctrl-C in the middle of the second cell; the rerun skips the first and resumes the second from its
    checkpoint; every result equals the uninterrupted grid's."""
    reference, _ = smoke_grid
    out = with_profiles(reference, tmp_path / "grid")
    narrow = SMOKE + ["--out", str(out), "--cuts", "layer1_1", "--bits", "4", "--schemes", "hierarchical", "end_to_end"]
    steps_seen = []
    update = progress.Progress.update

    def counting_update(self, loss=None):
        steps_seen.append(1)
        if len(steps_seen) == 20 + 8:  # the 8th step of the second cell, after its checkpoint at 5
            _thread.interrupt_main()
        if len(steps_seen) >= 20 + 8:
            time.sleep(0.2)  # steps that take time, as real ones do, so the stop lands before the cell ends
        update(self, loss)

    monkeypatch.setattr(progress.Progress, "update", counting_update)
    with pytest.raises(SystemExit) as stopped:
        paper.main(narrow)
    assert stopped.value.code == 130
    assert "resume the grid with the same command" in capsys.readouterr().err
    e2e_dir = out / "cells" / "digits" / "resnet18_tv" / "whole" / "end_to_end-32b" / "seed0"
    assert not (e2e_dir / "result.json").exists() and (e2e_dir / "checkpoints").is_dir()
    monkeypatch.undo()
    rows = paper.main(narrow)
    assert "2 cells, 1 already done, 1 to run" in capsys.readouterr().out
    resumed = json.loads((e2e_dir / "result.json").read_text())
    assert 5 <= resumed["resumed_from_step"] < 20
    expected = {
        (r["cut"], r["bits"], r["scheme"]): r
        for r in load_rows(reference)
        if (r["cut"], r["bits"], r["scheme"]) in (("layer1_1", 4, "hierarchical"), ("", 32, "end_to_end"))
    }
    assert len(rows) == len(expected) == 2
    for r in rows:
        want = expected[(r["cut"], r["bits"], r["scheme"])]
        for key in ("edge_accuracy", "cloud_accuracy", "end_to_end_accuracy", "cloud_steps", "payload_bytes_per_image"):
            assert r[key] == want[key], key


@pytest.mark.slow
def test_a_crashed_cell_is_recorded_and_the_grid_goes_on(smoke_grid, tmp_path, monkeypatch, capsys):
    out = with_profiles(smoke_grid[0], tmp_path / "grid")
    run_cell = grid.run_cell

    def crash_split_learning(cell, *args):
        if cell.scheme == "split_learning":
            raise RuntimeError("the cloud caught fire")
        return run_cell(cell, *args)

    monkeypatch.setattr(grid, "run_cell", crash_split_learning)
    rows = paper.main(SMOKE + ["--out", str(out), "--schemes", "split_learning", "end_to_end"])
    assert "failed: RuntimeError: the cloud caught fire" in capsys.readouterr().err
    assert {r["scheme"]: r["status"] for r in rows} == {"split_learning": "failed", "end_to_end": "done"}
    csv_rows = {r["scheme"]: r for r in read_csv(out / "results.csv")}
    assert csv_rows["split_learning"]["error"] == "RuntimeError: the cloud caught fire"
    error = json.loads(next((out / "cells").rglob("error.json")).read_text())
    assert "the cloud caught fire" in error["traceback"]
    assert "failed: resnet18_tv layer1_1 32 bits split_learning" in (out / "REPORT.md").read_text()


def refuse(*args, **kwargs):
    raise AssertionError("loaded data or trained before checking the arguments")


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--profile", "huge"], "--profile 'huge' is invalid; valid: smoke, cpu, full"),
        (SMOKE + ["--models", "alexnet"], "--models alexnet is invalid; valid: resnet18_tv (the smoke profile's)"),
        (
            SMOKE + ["--cuts", "layer4_1"],
            "--cuts layer4_1 is invalid; valid: layer1_1, layer2_1 (the cuts of resnet18_tv)",
        ),
        (SMOKE + ["--bits", "12"], "--bits 12 is invalid; valid: 1, 2, 3"),
        (SMOKE + ["--bits", "8"], "--bits 8 is invalid; valid: 2, 4, 32 (the smoke grid's)"),
        (SMOKE + ["--edge-device", "tpu:7"], "--edge-device: device 'tpu:7' does not exist"),
        (SMOKE + ["--schemes", "federated"], "--schemes federated is invalid; valid: hierarchical, end_to_end"),
        (SMOKE + ["--seeds", "0"], "--seeds 0 is invalid; valid: an integer >= 1"),
        (SMOKE + ["--dataset", "mnist"], "--dataset 'mnist' is invalid; valid: digits, cifar10, tiny_imagenet"),
        (SMOKE + ["--dataset", "folder:/no/such/dir"], "/no/such/dir is not a directory"),
        (SMOKE + ["--measured", "/no/such.json"], "--measured /no/such.json is not a bench_network.json"),
        (
            SMOKE + ["--bits", "32", "--schemes", "split_learning", "--cuts", "layer2_1"],
            "the flags leave no cell to run",
        ),
    ],
)
def test_bad_input_is_one_line_before_any_work(argv, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(grid, "load_dataset", refuse)
    monkeypatch.setattr(grid, "run_cell", refuse)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        paper.main(argv + ["--out", str(tmp_path / "grid")])
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("experiments.paper: error: "), lines
    assert expected in lines[0]


def test_a_grid_of_another_profile_or_a_foreign_directory_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(grid, "load_dataset", refuse)
    (tmp_path / "cpu_grid").mkdir()
    (tmp_path / "cpu_grid" / "grid.json").write_text(json.dumps({"profile": "cpu"}))
    with pytest.raises(UserError, match="holds a grid of the 'cpu' profile; a 'smoke' grid needs another --out"):
        paper.main.__wrapped__(SMOKE + ["--out", str(tmp_path / "cpu_grid")])
    faster = replace_paths(
        profiles.grid_profiles()["smoke"].config,
        {**{f"{side}_optimizer.learning_rate": 0.1 for side in ("edge", "cloud")}, "edge_device": "cpu:1"},
    )  # run-only: may differ
    (tmp_path / "old_smoke").mkdir()
    (tmp_path / "old_smoke" / "grid.json").write_text(
        json.dumps({"profile": "smoke", "config": dataclasses.asdict(faster)})
    )
    with pytest.raises(
        UserError,
        match=r"made with other settings: --edge-learning-rate \(0\.05 here, 0\.1 there\); "
        r"--cloud-learning-rate \(0\.05 here, 0\.1 there\); use",
    ):
        paper.main.__wrapped__(SMOKE + ["--out", str(tmp_path / "old_smoke")])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine\n")
    with pytest.raises(UserError, match="is not empty and holds no grid"):
        paper.main.__wrapped__(SMOKE + ["--out", str(tmp_path / "other")])


def test_an_unprepared_data_set_is_skipped_with_its_reason_or_fails_when_named(tmp_path):
    """tfds data sets that are not in --data-dir: never downloaded; named explicitly they fail fast,
    left to the profile they are skipped (and with nothing left to run, that is the error)."""
    empty = tmp_path / "tfds"
    empty.mkdir()
    full = ["--profile", "full", "--data-dir", str(empty)]
    with pytest.raises(UserError, match="tiny_imagenet"):
        paper.main.__wrapped__(full + ["--out", str(tmp_path / "a"), "--dataset", "tiny_imagenet"])
    with pytest.raises(UserError, match=r"no data set is ready: data set cifar10: .*; data set tiny_imagenet"):
        paper.main.__wrapped__(full + ["--out", str(tmp_path / "b")])


@pytest.mark.parametrize(
    "content, says",
    [('{"rows": []}', "(no rows)"), ('{"rows": [{"model": "x"}]}', "(rows without bits, measured_step_s"),
     ("not json", "Expecting value")],
)  # fmt: skip
def test_a_measured_file_that_is_not_a_bench_network_json_is_named_with_what_it_lacks(tmp_path, content, says):
    from hier_jax.paper.report import read_measured

    path = tmp_path / "bench_network.json"
    path.write_text(content)
    with pytest.raises(UserError, match="is not a bench_network.json") as refused:
        read_measured(path)
    assert says in str(refused.value)
