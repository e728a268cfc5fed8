"""Smoke tests of experiments/bench_layers.py: the first shapes of a tiny ResNet-18, JSON and table checked;
bad arguments and an existing result refused before any work.

--shapes-limit 2 keeps to the stem and layer1 convolutions: PyTorch 2.13's oneDNN hangs in the weight
gradient of a channels_last 1x1 stride-2 convolution from 4 to 8 channels (width 4's layer2_0 shortcut;
docs/speed.md, "Known problems").
"""

import importlib.util
import json

import pytest

from experiments import bench_layers

TINY = ["--models", "resnet18", "--width", "4", "--batch", "2", "--repeats", "2", "--warmup", "1"]
FORMULATIONS = {"eigen", "ynnpack", "cpu", "cpu-ynn"}


def _check_rows(saved: dict, variants: set[tuple[str, str]], bn_variants: set[tuple[str, str]]) -> None:
    rows = saved["rows"]
    for op, passes, expected in [
        ("conv", ("forward", "dx", "dw"), variants),
        ("bn", ("forward", "backward"), bn_variants),
    ]:
        shapes = {(tuple(r["x_shape"]), tuple(r["w_shape"] or ())) for r in rows if r["op"] == op}
        assert len(shapes) == 2
        for shape in shapes:
            got = {
                (r["pass"], r["framework"], r["variant"])
                for r in rows
                if r["op"] == op and (tuple(r["x_shape"]), tuple(r["w_shape"] or ())) == shape
            }
            assert got == {(p, f, v) for p in passes for f, v in expected}
    assert len(rows) == 2 * 3 * len(variants) + 2 * 2 * len(bn_variants)
    for r in rows:
        assert 0 < r["min_s"] <= r["median_s"] <= r["max_s"]
        assert r["matches_lax"] is True, r
        assert r["layers"] and all(name.startswith("resnet18:") for name in r["layers"])
        assert (r["gflops"] is None) == (r["op"] == "bn")


@pytest.mark.slow
def test_bench_layers_smoke_jax(tmp_path):
    result = bench_layers.main([*TINY, "--shapes-limit", "2", "--torch-modes", "", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "bench_layers.json").read_text())
    assert saved == json.loads(json.dumps(result))
    for key in ("cpu_model", "jax", "jaxlib", "torch", "threads", "batch", "width", "rows"):
        assert key in saved
    assert saved["batch"] == 2 and saved["width"] == 4 and saved["torch"] is None and saved["threads"] >= 1
    _check_rows(saved, {("jax", f) for f in FORMULATIONS}, {("jax", "nnx")})

    # The stem: x 2x32x32x3, w 3x3x3->4, stride 1, padding 1: output 2x32x32x4.
    stem = [r for r in saved["rows"] if r["op"] == "conv" and r["layers"] == ["resnet18:stem"]]
    assert {tuple(r["x_shape"]) for r in stem} == {(2, 32, 32, 3)}
    row = next(r for r in stem if r["pass"] == "dw" and r["variant"] == "cpu")
    assert row["w_shape"] == [3, 3, 3, 4] and row["y_shape"] == [2, 32, 32, 4]
    assert row["strides"] == [1, 1] and row["padding"] == [[1, 1], [1, 1]]
    flops = 2 * 2 * 32 * 32 * 4 * 3 * 3 * 3  # 2 * B * Ho * Wo * Cout * Cin * kh * kw
    assert row["gflops"] == pytest.approx(flops / row["median_s"] / 1e9)

    table = (tmp_path / "bench_layers.md").read_text()
    for section in ("## conv forward", "## conv dx", "## conv dw", "## bn forward", "## bn backward"):
        assert section in table
    assert "2x32x32x3 3x3 3->4 s1 p1" in table


@pytest.mark.slow
def test_bench_layers_smoke_torch(tmp_path):
    pytest.importorskip("torch")
    result = bench_layers.main(
        [
            *TINY,
            "--shapes-limit",
            "2",
            "--formulations",
            "eigen,cpu",
            "--torch-modes",
            "channels_last",
            "--out",
            str(tmp_path),
        ]
    )
    saved = json.loads((tmp_path / "bench_layers.json").read_text())
    assert saved["torch"] and saved["torch_threads"] == saved["threads"]
    _check_rows(
        saved,
        {("jax", "eigen"), ("jax", "cpu"), ("torch", "channels_last")},
        {("jax", "nnx"), ("torch", "channels_last")},
    )
    assert result["rows"][0]["framework"] == "jax"
    assert "torch channels_last" in (tmp_path / "bench_layers.md").read_text()


@pytest.mark.parametrize(
    "bad",
    [
        ["--models", "alexnet"],
        ["--formulations", "eigen,fast"],
        ["--torch-modes", "cl"],
        ["--ops", "pool"],
        ["--batch", "0"],
        ["--repeats", "0"],
        ["--formulations", "", "--torch-modes", ""],
    ],
)
def test_bench_layers_rejects_bad_arguments(tmp_path, capsys, bad):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        bench_layers.main([*TINY, *bad, "--out", str(out)])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("experiments.bench_layers: error:")
    assert not out.exists()


def test_bench_layers_needs_torch_for_torch_modes(tmp_path, capsys, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else find_spec(name, *a))
    with pytest.raises(SystemExit) as stop:
        bench_layers.main([*TINY, "--torch-modes", "nchw", "--out", str(tmp_path / "out")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs PyTorch" in err
    assert not (tmp_path / "out").exists()


def test_bench_layers_refuses_to_overwrite(tmp_path, capsys):
    old = tmp_path / "bench_layers.json"
    old.write_text("{}\n")
    argv = [*TINY, "--ops", "bn", "--shapes-limit", "1", "--torch-modes", "", "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as stop:
        bench_layers.main(argv)
    assert stop.value.code == 2
    assert "--overwrite" in capsys.readouterr().err
    assert old.read_text() == "{}\n"
    bench_layers.main([*argv, "--overwrite"])
    saved = json.loads(old.read_text())
    assert [(r["op"], r["pass"]) for r in saved["rows"]] == [("bn", "forward"), ("bn", "backward")]
