"""The golden trajectory (tests/golden/): a fixed tiny run reproduces the stored numbers.

On the machine and software that wrote tests/golden/cpu.json (same backend, jaxlib and CPU model) the
run must match bit for bit: the same compiler on the same CPU emits the same program, and the runner
is deterministic (pipelined == sequential, tests/test_runner.py). Elsewhere the stored values hold
within the backend's "golden" tolerance (tests/backend.py, with the measurement behind it). Either
way the test records its largest deviation as JUnit properties (golden_*), which
`tasks.py test --backend ...` puts in its summary. After a change that is meant to alter the numbers,
regenerate with `python tests/golden/regenerate.py` and say why in the commit.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from golden import trajectory

from hier_jax.config import ExperimentConfig, from_dict

from backend import tolerance

GOLDEN = json.loads((Path(__file__).parent / "golden" / "cpu.json").read_text())
ACCURACY_SLACK_EXAMPLES = 2  # a loss this close can still flip the argmax of a borderline test image


@pytest.fixture(scope="module")
def runs():
    return trajectory.record()


def test_the_golden_config_is_the_one_the_file_was_made_from():
    """The file records the config flat, as format 1 did; read back it is today's config."""
    assert from_dict(ExperimentConfig, GOLDEN["config"]) == trajectory.CONFIG


def test_both_schedules_give_the_same_trajectory(runs):
    assert runs["sequential"] == runs["pipelined"]


def deviation(got: dict, want: dict) -> dict[str, float]:
    """Largest relative deviation of the per-step losses and accuracy change in examples, per key."""
    out = {}
    for key in ("edge_loss", "cloud_loss"):
        a, e = np.asarray(got[key], np.float64), np.asarray(want[key], np.float64)
        out[key] = float(np.max(np.abs(a - e) / np.abs(e)))
    for key in ("edge_accuracy", "cloud_accuracy"):
        out[key] = round(abs(got[key] - want[key]) * want["test_examples"])
    return out


def test_the_run_reproduces_the_golden_trajectory(runs, record_property):
    here, there = trajectory.machine(), GOLDEN["machine"]
    same_build = all(here[k] == there[k] for k in ("backend", "jax", "jaxlib", "cpu"))
    tol = tolerance("golden", here["backend"])
    worst = {
        k: max(deviation(runs[m], w)[k] for m, w in GOLDEN["runs"].items())
        for k in ("edge_loss", "cloud_loss", "edge_accuracy", "cloud_accuracy")
    }
    record_property(
        "golden_build",
        "same as the golden's: compared bit for bit"
        if same_build
        else f"{here['backend']} {here['device']} jax {here['jax']} on {here['cpu']} (golden: "
        f"{there['backend']} jax {there['jax']} on {there['cpu']}): rtol {tol.rtol:g}",
    )
    record_property("golden_loss_max_rel_deviation", f"{max(worst['edge_loss'], worst['cloud_loss']):.3g}")
    record_property("golden_accuracy_max_change_examples", max(worst["edge_accuracy"], worst["cloud_accuracy"]))
    for mode, want in GOLDEN["runs"].items():
        got = runs[mode]
        assert got["payload_bytes"] == want["payload_bytes"] and got["test_examples"] == want["test_examples"]
        if same_build:
            assert got == want, f"{mode}: the golden trajectory changed on the machine that wrote it"
            continue
        for key in ("edge_loss", "cloud_loss"):
            np.testing.assert_allclose(got[key], want[key], rtol=tol.rtol, err_msg=f"{mode} {key} ({tol.why})")
        for key in ("edge_accuracy", "cloud_accuracy"):
            assert abs(got[key] - want[key]) * want["test_examples"] <= ACCURACY_SLACK_EXAMPLES, (mode, key)


def test_the_checksum_sees_one_changed_bit():
    state = {"params": {"w": jax.numpy.ones((3,), jax.numpy.float32)}}
    flipped = {
        "params": {"w": jax.numpy.asarray(np.array([1.0, 1.0, np.nextafter(np.float32(1), np.float32(2))], np.float32))}
    }
    assert trajectory.state_sha256(state, {}) != trajectory.state_sha256(flipped, {})
    assert trajectory.state_sha256(state, {}) == trajectory.state_sha256(jax.tree.map(np.asarray, state), {})
