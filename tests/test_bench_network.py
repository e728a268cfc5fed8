"""bench_network's arithmetic: the timed intervals, the row names, the reductions against cloud-only,
and its refusals before any work."""

import pytest

from experiments import bench_network
from hier_jax.bench import network


def test_step_times_are_the_intervals_after_the_warm_up():
    assert network.step_times([10.0, 13.0, 14.0, 15.5, 17.5], warmup=2) == [1.5, 2.0]


def test_a_rows_name_gives_its_scheme_and_schedule():
    assert network.scheme_and_schedule("hierarchical_pipelined") == ("hierarchical", "pipelined")
    assert network.scheme_and_schedule("split_learning") == ("split_learning", "sequential")
    assert network.scheme_and_schedule("end_to_end") == ("end_to_end", "pipelined")


def test_reductions_are_against_end_to_end_at_the_same_cut_and_link():
    def row(scheme, preset, measured, modeled):
        return {"model": "vgg16", "split": "pool3", "scheme": scheme, "preset": preset, "measured_step_s": measured,
                "modeled_step_s": modeled, "modeled_step_with_latency_s": modeled + 0.1}  # fmt: skip

    rows = [row("end_to_end", "3g", 4.0, 5.0), row("hierarchical_pipelined", "3g", 1.0, 2.5),
            row("hierarchical_pipelined", "4g", 1.0, 1.0)]  # fmt: skip
    network.reductions(rows)
    assert rows[1]["reduction_measured"] == pytest.approx(0.75) and rows[1]["reduction_modeled"] == pytest.approx(0.5)
    assert rows[1]["reduction_modeled_with_latency"] == pytest.approx(1 - 2.6 / 5.1)
    assert rows[1]["reduction_paper"] == 0.29 and rows[0]["reduction_measured"] == 0.0
    assert rows[2]["reduction_measured"] is None  # no cloud-only row over 4g


@pytest.mark.parametrize(
    ("argv", "says"),
    [(["--presets", "9g"], "--presets '9g' is invalid"), (["--schemes", "pipelined"], "--schemes 'pipelined'"),
     (["--split", "pool3"], "--split needs --model"), (["--model", "vgg16", "--split", "nope"], "--split 'nope'")],
)  # fmt: skip
def test_bad_input_is_one_line_before_any_work(tmp_path, capsys, argv, says):
    with pytest.raises(SystemExit) as exited:
        bench_network.main([*argv, "--out", str(tmp_path / "out")])
    assert exited.value.code == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_side_that_fails_ends_the_run_at_once_naming_it_and_its_last_line(tmp_path):
    import subprocess
    import sys
    import time

    from hier_jax.errors import WorkerError

    cloud = subprocess.Popen(["sleep", "30"])  # a cloud that would wait its whole timeout for the edge
    with open(tmp_path / "edge.log", "w") as log:
        edge = subprocess.Popen([sys.executable, "-c", "print('no such data set'); raise SystemExit(3)"], stdout=log)
    start = time.monotonic()
    try:
        with pytest.raises(WorkerError, match=r"the edge process failed \(3\): no such data set"):
            network._wait_for_both(cloud, edge, tmp_path, timeout_s=25)
        assert time.monotonic() - start < 10
    finally:
        cloud.kill()
        cloud.wait()
