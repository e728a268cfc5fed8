"""The experiments' command-line conventions: every argument is checked before any data set is loaded
or any model is built, and a user error is one line on stderr, `experiments.NAME: error: ...`, naming
the value (and what is valid), with exit status 2; --debug raises the error itself instead.

Loading and building are replaced by functions that fail the test, so nothing here trains or compiles.
"""

from __future__ import annotations

import numpy as np
import pytest

import hier_jax.data
import hier_jax.models
from experiments import bench_input, bench_overlap, bench_torch, runtime_table
from hier_jax import train
from hier_jax.bench import steps as bench_steps
from hier_jax.data import ImageDataset
from hier_jax.errors import ConfigError, UserError
from hier_jax.runtime_model import table as runtime_table_lib

FILE = "{file}"
"""Stands for an existing file, in place of a directory, in the argument lists below."""


def refuse(*args, **kwargs):
    raise AssertionError("loaded data or built a model before checking the arguments")


@pytest.fixture
def nothing_loaded(monkeypatch):
    """Any data load, model build or profile fails the test."""
    for target, name in [
        (hier_jax.data, "load_dataset"),
        (bench_input, "load_dataset"),
        (bench_overlap, "load_dataset"),
        (train, "build"),
        (hier_jax.models, "build_model"),
        (bench_steps, "model_and_split"),
        (bench_torch, "jax_variant"),
        (bench_torch, "torch_variant"),
        (runtime_table_lib, "build_model"),
        (runtime_table_lib, "load_or_profile"),
    ]:
        monkeypatch.setattr(target, name, refuse)


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "not_a_dir"
    path.write_text("a file\n")
    return str(path)


def one_line_error(module, argv: list[str], capsys) -> str:
    """Run `module.main(argv)`; check exit status 2 and exactly one stderr line; return that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        module.main(argv)
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{module.__name__}: error: "), lines[0]
    return lines[0]


INPUT = ["--dataset", "digits"]
BAD_BENCH_INPUT = [
    (INPUT + ["--batch", "0"], ["--batch 0", ">= 1"]),
    (INPUT + ["--batch", "-3"], ["--batch -3"]),
    (INPUT + ["--batch", "two"], ["--batch", "'two'"]),
    (INPUT + ["--steps", "0"], ["--steps 0", ">= 1"]),
    (INPUT + ["--warmup", "-1"], ["--warmup -1", ">= 0"]),
    (INPUT + ["--augmentation", "zoom"], ["'zoom'", "pad_crop_flip"]),
    (["--dataset", "imagenet"], ["'imagenet'", "cifar10", "folder:PATH"]),
    (["--dataset", "folder:/nonexistent/images"], ["/nonexistent/images", "not a directory"]),
    (["--batch", "8"], ["--dataset"]),
    (INPUT + ["--out", FILE], ["--out", FILE, "is a file"]),
]

BAD_BENCH_OVERLAP = [
    (["--steps", "0"], ["--steps 0", ">= 1"]),
    (["--repeats", "0"], ["--repeats 0", ">= 1"]),
    (["--batch", "0"], ["--batch-size 0", ">= 1"]),
    (["--batch-size", "-2"], ["--batch-size -2"]),
    (["--model", "alexnet"], ["'alexnet'", "resnet18"]),
    (["--split", "pool9"], ["'pool9'", "layer2_1"]),
    (["--model", "vgg16", "--split", "layer2_1"], ["'layer2_1'", "pool3"]),
    (["--bits", "9"], ["--bits 9", "16, 32"]),
    (["--width", "0"], ["--width 0"]),
    (["--epochs", "0"], ["--epochs 0"]),
    (["--learning-rate", "-0.1"], ["--learning-rate -0.1"]),
    (["--dataset", "imagenet"], ["'imagenet'", "digits"]),
    (["--edge-device", "tpu:7"], ["--edge-device", "tpu:7"]),
    (["--out", FILE], ["--out", FILE, "is a file"]),
]

TORCH = ["--model", "resnet18"]
BAD_BENCH_TORCH = [
    (["--model", "alexnet"], ["'alexnet'", "resnet18"]),
    ([], ["--model"]),
    (["--model", "vgg16", "--split", "layer1_1"], ["'layer1_1'", "pool3"]),
    (TORCH + ["--split", "pool9"], ["'pool9'", "layer2_1"]),
    (TORCH + ["--bits", "9"], ["--bits 9", "16, 32"]),
    (TORCH + ["--bits", "0"], ["--bits 0"]),
    (TORCH + ["--width", "0"], ["--width 0", ">= 1"]),
    (TORCH + ["--batch", "0"], ["--batch 0", ">= 1"]),
    (TORCH + ["--steps", "0"], ["--steps 0", ">= 1"]),
    (TORCH + ["--warmup", "-1"], ["--warmup -1", ">= 0"]),
    (TORCH + ["--exit-channels", "0"], ["--exit-channels 0"]),
    (TORCH + ["--seed", "-1"], ["--seed -1"]),
    (TORCH + ["--dataset", "mnist"], ["'mnist'", "cifar10"]),
    (TORCH + ["--torch-modes", "fast"], ["--torch-modes", "'fast'", "eager_cl"]),
    (TORCH + ["--jax-variants", "jit,xla"], ["--jax-variants", "'xla'", "eigen_xla"]),
    (TORCH + ["--steps-to-time", "forward"], ["--steps-to-time", "'forward'", "end_to_end"]),
    (TORCH + ["--steps-to-time", ","], ["--steps-to-time", "empty"]),
    (TORCH + ["--torch-modes", "", "--jax-variants", ""], ["--torch-modes", "--jax-variants"]),
    (TORCH + ["--no-malloc-tuning", "--out", FILE], ["--out", FILE, "is a file"]),
]

TABLE = ["--out", "{dir}"]
BAD_RUNTIME_TABLE = [
    (["--out", FILE], ["--out", FILE, "is a file"]),
    ([], ["--out"]),
    (TABLE + ["--batch", "0"], ["--batch 0", ">= 1"]),
    (TABLE + ["--epochs", "0"], ["--epochs 0", ">= 1"]),
    (TABLE + ["--profile-batch", "0"], ["--profile-batch 0", ">= 1"]),
    (TABLE + ["--repeats", "0"], ["--repeats 0", ">= 1"]),
    (TABLE + ["--edge-slowdown", "0"], ["--edge-slowdown 0", "> 0"]),
    (TABLE + ["--cloud-tflops", "-1"], ["--cloud-tflops -1", "> 0"]),
    (TABLE + ["--memory-budget-gib", "nan"], ["--memory-budget-gib nan", "finite"]),
    (TABLE + ["--bits", "9"], ["--bits 9", "16, 32"]),
    (TABLE + ["--bits", "4", "0"], ["--bits 0"]),
    (TABLE + ["--model", "alexnet"], ["'alexnet'", "vgg16"]),
    (TABLE + ["--dataset", "mnist"], ["'mnist'", "tiny_imagenet"]),
    (TABLE + ["--links", "6g"], ["'6g'", "3g"]),
    (TABLE + ["--time-source", "guess"], ["'guess'", "flops"]),
]

CASES = (
    [(bench_input, argv, names) for argv, names in BAD_BENCH_INPUT]
    + [(bench_overlap, argv, names) for argv, names in BAD_BENCH_OVERLAP]
    + [(bench_torch, argv, names) for argv, names in BAD_BENCH_TORCH]
    + [(runtime_table, argv, names) for argv, names in BAD_RUNTIME_TABLE]
)


@pytest.mark.parametrize(
    "module, argv, names", CASES, ids=[f"{m.__name__.split('.')[-1]}:{' '.join(a) or 'none'}" for m, a, _ in CASES]
)
def test_bad_argument_is_one_line_and_exit_2(module, argv, names, nothing_loaded, a_file, tmp_path, capsys):
    out_dir = str(tmp_path / "out")
    argv = [a.replace(FILE, a_file).replace("{dir}", out_dir) for a in argv]
    line = one_line_error(module, argv, capsys)
    for name in names:
        assert name.replace(FILE, a_file) in line, line
    assert "Traceback" not in line
    if module is runtime_table and "--out" in argv and argv[argv.index("--out") + 1] == out_dir:
        assert not (tmp_path / "out").exists()  # checked before the output directory was made


@pytest.mark.parametrize(
    "module, argv",
    [
        (bench_input, INPUT + ["--batch", "0", "--debug"]),
        (bench_overlap, ["--split", "pool9", "--debug"]),
        (bench_torch, TORCH + ["--bits", "9", "--debug"]),
        (runtime_table, ["--out", FILE, "--debug"]),
    ],
)
def test_debug_raises_the_error_itself(module, argv, nothing_loaded, a_file, capsys):
    argv = [a.replace(FILE, a_file) for a in argv]
    with pytest.raises(UserError) as error:
        module.main(argv)
    assert capsys.readouterr().err == ""
    if module is bench_overlap:
        assert isinstance(error.value, ConfigError) and "pool9" in str(error.value)


def test_debug_shows_argparse_errors_too(nothing_loaded):
    with pytest.raises(UserError, match="alexnet"):
        bench_torch.main(["--model", "alexnet", "--debug"])


def test_bench_torch_parse_args_keeps_exiting(capsys):
    """parse_args (for callers that parse only) keeps argparse's behaviour: one line, SystemExit(2)."""
    with pytest.raises(SystemExit) as stopped:
        bench_torch.parse_args(TORCH + ["--width", "0"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "experiments.bench_torch: error: --width 0 is invalid; valid: an integer >= 1"
    ]
    args = bench_torch.parse_args(["--model", "vgg16", "--torch-modes", ""])
    assert args.split == "pool3" and args.torch_modes == []


def tiny_dataset(num_train: int = 4) -> ImageDataset:
    images = np.zeros((num_train, 8, 8, 3), np.uint8)
    return ImageDataset(
        "tiny",
        images,
        np.zeros(num_train, np.int32),
        images[:2],
        np.zeros(2, np.int32),
        ("a", "b"),
        (0.0,) * 3,
        (1.0,) * 3,
        "none",
    )


@pytest.mark.parametrize(
    "module, argv, flag",
    [
        (bench_input, ["--dataset", "digits", "--batch", "8"], "--batch 8"),
        (bench_overlap, ["--batch", "8"], "--batch-size 8"),
    ],
)
def test_batch_larger_than_the_training_split(module, argv, flag, nothing_loaded, monkeypatch, capsys):
    """Known only once the data is loaded: still one line and exit 2, and no model is built."""
    loaded = []
    monkeypatch.setattr(module, "load_dataset", lambda *a, **k: loaded.append(a) or tiny_dataset(4))
    line = one_line_error(module, argv, capsys)
    assert len(loaded) == 1
    assert flag in line and "training split" in line and "1..4" in line


@pytest.mark.parametrize(
    "module, argv",
    [
        (bench_input, ["--dataset", "digits", "--batch", "8", "--steps", "1", "--out", "{dir}"]),
        (bench_overlap, ["--batch", "8", "--steps", "1", "--repeats", "1", "--out", "{dir}"]),
        (bench_torch, ["--model", "vgg16", "--bits", "32", "--batch", "2", "--no-malloc-tuning", "--out", "{dir}"]),
        (runtime_table, ["--model", "vgg16", "--bits", "2", "16", "--out", "{dir}"]),
    ],
)
def test_valid_arguments_pass_the_checks(module, argv, nothing_loaded, tmp_path, capsys):
    """Valid arguments get as far as loading data or building a model, with the output directory made."""
    out = tmp_path / "deep" / "out"
    with pytest.raises(AssertionError, match="loaded data or built a model"):
        module.main([a.replace("{dir}", str(out)) for a in argv])
    assert out.is_dir() and not any(out.iterdir())
    assert "error" not in capsys.readouterr().err
