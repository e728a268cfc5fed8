"""experiments.train and experiments.quickstart as a user meets them: one-line errors before any work,
stale output refused, Ctrl-C and SIGTERM that save and say how to resume, resume to the same result."""

import _thread
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import quickstart
from experiments import train as train_experiment
from hier_jax import train
from hier_jax.run import command

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "--dataset",
    "digits",
    "--model",
    "vgg16",
    "--split",
    "pool2",
    "--width",
    "4",
    "--batch",
    "32",
    "--head-channels",
    "8",
]


@pytest.fixture
def no_work(monkeypatch):
    """Any data loading or model building fails the test: errors must come before both."""

    def forbidden(*args, **kwargs):
        raise AssertionError("loaded data or built a model before validating the arguments")

    for module in (command, quickstart):
        monkeypatch.setattr(module, "load_dataset", forbidden)
    monkeypatch.setattr(train, "build", forbidden)


def untimed_metrics(out: Path) -> list[list[str]]:
    """metrics.csv without its wall-clock columns (step_s, done_at), which no two runs share."""
    rows = [line.split(",") for line in (out / "metrics.csv").read_text().splitlines()]
    keep = [i for i, name in enumerate(rows[0]) if not name.endswith(("step_s", "done_at"))]
    return [[row[i] for i in keep] for row in rows]


def run_cli(main, argv, capsys) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    return exited.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("main", [train_experiment.main, quickstart.main], ids=["train", "quickstart"])
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch", "0"], "--batch-size 0 is invalid; valid: an integer >= 1"),
        (["--queue-size", "0"], "--queue-size 0 is invalid"),
        (["--model", "alexnet"], "--model 'alexnet' is invalid; valid: vgg16, resnet18, resnet18_tv"),
        (["--split", "pool9"], "--split 'pool9' is invalid; valid: a stage of"),
        (["--bits", "9"], "--bits 9 is invalid"),
        (["--learning-rate", "nan"], "--learning-rate nan is invalid"),
        (["--edge-device", "gpu:64"], "device 'gpu:64' does not exist"),
        (["--cloud-device", ":1"], "device ':1' does not exist"),
        (["--dataset", "mnist"], "--dataset 'mnist' is invalid; valid: digits, cifar10, tiny_imagenet, folder:PATH"),
        (["--dataset", "folder:/no/such/dir"], "/no/such/dir is not a directory"),
        (["--epochs", "x"], "argument --epochs: invalid int value: 'x'"),
        (["--checkpoint-every", "-1"], "--checkpoint-every -1 is invalid"),
        (["--precision", "fp16"], "--precision 'fp16' is invalid; valid: auto, fp32, tf32, bf16"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2_before_any_work(no_work, capsys, main, argv, message):
    code, lines = run_cli(main, argv, capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("experiments.") and message in lines[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--outage", "3", "--link", "3g"], "argument --outage: '3' is invalid; valid: A:B, two step numbers"),
        (["--outage", "5:2", "--link", "3g"], "argument --outage: '5:2' is invalid"),
        (["--outage", "1:2"], "--outage needs --link"),
        (["--link", "6g"], "--link '6g' is invalid; valid: 3g, 4g, 5g, wifi"),
        (["--time-scale", "0", "--link", "3g"], "--time-scale 0.0 is invalid"),
        (["--resume", "/no/such/run"], "no run to resume there"),
        (["--resume", "a", "--out", "b"], "--out must be that directory or be left out"),
    ],
)
def test_bad_link_and_resume_flags(no_work, capsys, argv, message):
    code, lines = run_cli(train_experiment.main, argv, capsys)
    assert code == 2 and len(lines) == 1 and message in lines[0], lines


def test_debug_shows_the_traceback(no_work):
    from hier_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="--bits 9"):
        train_experiment.main(["--bits", "9", "--debug"])


def test_unusable_out_is_refused_before_training(no_work, capsys, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for out, message in ((a_file, "is a file, not a directory"), (a_file / "sub", "cannot be written")):
        code, lines = run_cli(train_experiment.main, ["--dataset", "digits", "--out", str(out)], capsys)
        assert code == 2 and len(lines) == 1 and message in lines[0], lines


@pytest.mark.slow
def test_stale_out_is_refused_and_overwrite_replaces_the_whole_run(tmp_path, capsys):
    out = tmp_path / "run"
    train_experiment.main(SMALL + ["--max-steps", "4", "--checkpoint-every", "2", "--out", str(out)])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2", "4"]
    capsys.readouterr()
    code, lines = run_cli(train_experiment.main, SMALL + ["--max-steps", "3", "--out", str(out)], capsys)
    assert code == 2 and len(lines) == 1 and "already holds a run" in lines[0] and "--resume" in lines[0]
    # An --overwrite refused by a later check (here the batch, known only from the data) costs nothing.
    code, lines = run_cli(train_experiment.main, SMALL + ["--batch", "5000", "--overwrite", "--out", str(out)], capsys)
    assert code == 2 and "--batch-size 5000 is larger than the training split" in lines[-1]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2", "4"]
    summary = train_experiment.main(
        SMALL + ["--max-steps", "3", "--checkpoint-every", "0", "--overwrite", "--out", str(out)]
    )
    # Nothing of the old run is left beside the new one: its checkpoints went with it.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["3"]
    assert json.loads((out / "summary.json").read_text())["steps_per_edge"] == summary["steps_per_edge"] == 3


@pytest.mark.slow
def test_precision_reaches_summary_json_and_the_printed_header(tmp_path, capsys):
    summary = train_experiment.main(SMALL + ["--max-steps", "2", "--precision", "bf16", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["precision"] == summary["precision"] == "bf16" and written["config"]["precision"] == "bf16"
    assert "precision bf16 (bfloat16" in capsys.readouterr().out
    # A resumed run must keep the policy: the recorded config is refused with another.
    code, lines = run_cli(train_experiment.main, ["--resume", str(tmp_path), "--precision", "fp32"], capsys)
    assert (
        code == 2 and len(lines) == 1 and "differs in --precision ('fp32' here, 'bf16' in the checkpoint)" in lines[0]
    )


@pytest.mark.slow
def test_interrupted_cli_run_saves_says_how_to_resume_and_resumes_to_the_same_result(tmp_path, capsys, monkeypatch):
    argv = SMALL + ["--max-steps", "12", "--checkpoint-every", "4"]
    straight = train_experiment.main(argv + ["--out", str(tmp_path / "straight")])
    capsys.readouterr()

    original = train.TrainBatches.__iter__

    def iterate(self):
        for i, item in enumerate(original(self)):
            if self.start == 0 and i == 6:
                _thread.interrupt_main()
            if self.start == 0 and i >= 6:
                time.sleep(0.1)  # steps that take time, as real ones do, so the stop lands mid-run
            yield item

    monkeypatch.setattr(train.TrainBatches, "__iter__", iterate)
    out = tmp_path / "stopped"
    code, lines = run_cli(train_experiment.main, argv + ["--out", str(out)], capsys)
    monkeypatch.undo()
    assert code == 130
    assert lines[-1].startswith("experiments.train: interrupted after step ")
    assert lines[-1].endswith(f"resume with: python -m experiments.train --resume {out}")
    assert not (out / "summary.json").exists()  # the run did not finish: no summary claims it did
    resumed = train_experiment.main(["--resume", str(out), "--out", str(out)])  # --out may repeat the run's
    assert 0 < resumed["resumed_from_step"] < 12
    for key in ("edge_accuracy", "cloud_accuracy", "final_edge_loss", "final_cloud_loss", "steps_per_edge"):
        assert resumed[key] == straight[key], key
    assert untimed_metrics(out) == untimed_metrics(tmp_path / "straight")


def test_divergence_exits_1_with_one_line_and_writes_no_summary(tmp_path, capsys):
    out = tmp_path / "run"
    code, lines = run_cli(
        train_experiment.main,
        SMALL + ["--max-steps", "12", "--learning-rate", "1000", "--checkpoint-every", "2", "--out", str(out)],
        capsys,
    )
    # Above the error only the progress bar's lines (stderr); the error is the last line, no traceback.
    assert code == 1 and not any("Traceback" in line for line in lines), lines
    assert lines[-1].startswith("experiments.train: error: training diverged: the") and " at step " in lines[-1]
    assert not (out / "summary.json").exists()


def test_damaged_checkpoint_on_resume_is_one_line_naming_file_and_side(tmp_path, capsys):
    out = tmp_path / "run"
    train_experiment.main(SMALL + ["--max-steps", "4", "--checkpoint-every", "0", "--out", str(out)])
    capsys.readouterr()
    (out / "checkpoints" / "4" / "meta" / "metadata").write_text("{truncated")
    code, lines = run_cli(train_experiment.main, ["--resume", str(out)], capsys)
    assert code == 1 and len(lines) == 1, lines
    assert f"checkpoint {out.absolute() / 'checkpoints' / '4' / 'meta'} (meta) is damaged" in lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_stops_the_cli_cleanly_with_exit_130_and_a_checkpoint(tmp_path, sig):
    """The real process: before, Ctrl-C aborted it (exit 134, 'terminate called ...') and saved nothing."""
    out = tmp_path / "run"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "experiments.train",
            *SMALL,
            "--epochs",
            "1000",
            "--max-steps",
            "40000",
            "--checkpoint-every",
            "20",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "20").is_dir():
            assert process.poll() is None and time.monotonic() < deadline, "no first checkpoint"
            time.sleep(0.2)
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("experiments.train: interrupted after step ") and "--resume" in last, stderr
    step = int(last.split("interrupted after step ")[1].split(";")[0])
    assert (out / "checkpoints" / str(step)).is_dir()
    assert "terminate called" not in stderr and "Traceback" not in stderr


def test_a_run_stopped_before_its_first_checkpoint_does_not_block_its_out(tmp_path):
    from hier_jax.outputs import prepare_run_dir, run_outputs

    (tmp_path / "checkpoints").mkdir()  # created by a run that diverged or stopped before saving anything
    assert run_outputs(tmp_path, command.OUTPUTS) == []
    prepare_run_dir(tmp_path, outputs=command.OUTPUTS)
