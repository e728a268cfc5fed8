"""Smoke test of experiments/bench_torch.py: two timed steps at a tiny batch and width, JSON checked.

torch.compile is left out here (its first call compiles for minutes on a small CPU); the full runs
in docs/speed.md exercise it. Width 8, not 4: PyTorch 2.13's oneDNN (3.12) hangs in the weight gradient
of a channels_last 1x1 stride-2 convolution from 4 to 8 channels on 32x32 maps (docs/speed.md).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import bench_torch

STEPS = {"edge", "cloud", "pair", "end_to_end"}


@pytest.mark.slow
def test_bench_torch_smoke(tmp_path):
    pytest.importorskip("torch")
    model, point = "resnet18", "layer1_1"
    argv = [
        "--model",
        model,
        "--dataset",
        "cifar10",
        "--split",
        point,
        "--batch",
        "2",
        "--width",
        "8",
        "--exit-channels",
        "8",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--torch-modes",
        "eager_cl",
        "--out",
        str(tmp_path),
    ]
    rows = bench_torch.main(argv)
    saved = json.loads((tmp_path / "bench_torch.json").read_text())
    assert saved == json.loads(json.dumps(rows))
    assert {r["step"] for r in saved} == STEPS
    assert {(r["framework"], r["mode"]) for r in saved} == {("jax", "jit"), ("torch", "eager_cl")}
    assert len(saved) == 8
    for r in saved:
        assert r["model"] == model and r["batch"] == 2 and r["width"] == 8 and r["steps"] == 2
        assert 0 < r["min_s"] <= r["median_s"] <= r["max_s"]
        assert r["split"] == point
        assert r["precision"] == "fp32" and "float32" in r["precision_detail"]
        if r["framework"] == "jax":
            assert r["compile_s"] > 0 and r["payload_bytes"] > 0


@pytest.mark.slow
def test_bench_torch_bf16_smoke(tmp_path):
    """--precision bf16: JAX's models computing in bfloat16 against torch.autocast(bfloat16)."""
    pytest.importorskip("torch")
    argv = [
        "--model",
        "resnet18",
        "--dataset",
        "cifar10",
        "--split",
        "layer1_1",
        "--batch",
        "2",
        "--width",
        "8",
        "--exit-channels",
        "8",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--torch-modes",
        "eager_cl",
        "--steps-to-time",
        "pair,end_to_end",
        "--precision",
        "bf16",
        "--out",
        str(tmp_path),
    ]
    rows = bench_torch.main(argv)
    assert {(r["framework"], r["step"]) for r in rows} == {
        (f, s) for f in ("jax", "torch") for s in ("pair", "end_to_end")
    }
    for r in rows:
        assert r["precision"] == "bf16" and "autocast" in r["precision_detail"] and r["median_s"] > 0
    # The payload does not depend on the precision: 2 x 32x32x8 features at 4 bits, scale, offset, labels.
    assert {r["payload_bytes"] for r in rows if r["framework"] == "jax"} == {2 * 32 * 32 * 8 // 2 + 4 + 4 + 2}


def test_bench_torch_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        bench_torch.parse_args(["--model", "resnet18", "--torch-modes", "fast"])
    with pytest.raises(SystemExit):
        bench_torch.parse_args(["--model", "alexnet"])
    with pytest.raises(SystemExit):
        bench_torch.parse_args(["--model", "resnet18", "--precision", "auto"])
    args = bench_torch.parse_args(["--model", "vgg16", "--torch-modes", "", "--jax-variants", "jit,plain"])
    assert args.torch_modes == [] and args.jax_variants == ["jit", "plain"]


FAULTS_ON_A_THREAD = """
import ctypes, resource, sys, threading
from hier_jax.bench import timing
if sys.argv[1] == "tuned":
    assert timing.tune_malloc()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
faults = []
def reuse_a_large_block():  # 128 MiB, on a thread of its own: the case of XLA's worker threads
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(128 << 20)
        ctypes.memset(block, 1, 128 << 20)
        libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=reuse_a_large_block)
thread.start(); thread.join()
print(faults[-1])
"""


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")
def test_tuned_malloc_keeps_a_threads_large_blocks_mapped():
    """A 128 MiB block freed and allocated again on a worker thread page-faults all of it in again
    (32,768 pages) unless tune_malloc limits glibc to one arena: a thread's own arena cannot hold
    it, so glibc mmaps it whatever M_MMAP_MAX says."""
    root = Path(__file__).resolve().parents[1]

    def faults(mode: str) -> int:
        done = subprocess.run(
            [sys.executable, "-c", FAULTS_ON_A_THREAD, mode], cwd=root, capture_output=True, text=True, check=True
        )
        return int(done.stdout.split()[-1])

    assert faults("default") >= 32_000
    assert faults("tuned") < 1_000
