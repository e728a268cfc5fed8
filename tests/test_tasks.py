"""tasks.py's accelerator test run: its options, and the summary it writes from a real JUnit XML file."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import tasks  # noqa: E402

SAMPLE = """
import pytest

def test_passes(record_property):
    record_property("golden_loss_max_rel_deviation", "2.5e-07")

def test_fails():
    assert 1 == 2, "one is not two"

@pytest.mark.skip(reason="needs two accelerators; this host has 0")
def test_skipped_a():
    pass

@pytest.mark.skip(reason="needs two accelerators; this host has 0")
def test_skipped_b():
    pass
"""


@pytest.mark.slow
def test_the_summary_counts_a_real_junit_file(tmp_path):
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    junit = tmp_path / "junit.xml"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--junitxml={junit}",
            "-o",
            "junit_family=xunit1",
            "test_sample.py",
        ],
        cwd=tmp_path,
        capture_output=True,
        timeout=120,
    )
    summary = tasks.summarize(junit, "gpu", {"JAX_PLATFORMS": "cuda,cpu", "XLA_FLAGS": "--x"})
    assert "# hier-jax tests on gpu" in summary and "JAX_PLATFORMS=cuda,cpu  XLA_FLAGS=--x" in summary
    assert "**1 passed, 1 failed, 2 skipped** (4 tests)" in summary
    assert "`test_sample::test_fails`: AssertionError: one is not two" in summary
    assert "- 2 x needs two accelerators; this host has 0" in summary
    assert "- loss_max_rel_deviation: 2.5e-07" in summary


@pytest.mark.parametrize(
    "args, message",
    [
        (["--backend", "xpu"], "--backend 'xpu' is not one of cpu, gpu, tpu"),
        (["--backend"], "--backend needs a value"),
        (["--out", "dir"], "--out goes with --backend"),
    ],
)
def test_bad_options_are_one_line(args, message):
    with pytest.raises(SystemExit, match=message.replace("'", ".")):
        tasks.split_test_options(args)


def test_options_stop_at_the_first_pytest_argument():
    options, rest = tasks.split_test_options(["--system", "--fast", "--backend", "gpu", "-x", "--backend", "tpu"])
    assert options == {"backend": "gpu", "out": None, "system": True, "fast": True}
    assert rest == ["-x", "--backend", "tpu"]
