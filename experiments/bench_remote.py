"""The network's cost on one host: one edge process dialling the cloud over gRPC with TLS on loopback,
against the same run on Ray, each side pinned to a core of its own (the edge core 0, the cloud core 1).

For the remote run: the bytes the loopback interface carried (its kernel counter of bytes sent, both directions,
from the cloud's start to its end: the TLS handshake and hello, every call and reply, gRPC framing,
TCP/IP headers; no evaluation and no final states) per step, against
the payload's own bytes per step; and the cloud's steps per second on both backends (each the run's
stepping time, after the workers compiled). Nothing else should use loopback meanwhile.

    python -m experiments.bench_remote --model resnet18 --split layer2_1 --bits 4 --batch-size 128 --out DIR

Writes DIR/bench_remote.json and DIR/bench_remote.md. Needs openssl (for a throwaway test CA) and Ray.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from hier_jax import cli, flags, outputs, process
from hier_jax.bench.pki import make_pki
from hier_jax.config import ONE_PAIR_FLAGS, ExperimentConfig, validate
from hier_jax.data import load_dataset
from hier_jax.errors import UserError, check

DEFAULTS = ExperimentConfig(model="resnet18", dataset="digits", split="layer2_1", bits=4, batch_size=128, epochs=3)
ROOT = Path(__file__).resolve().parents[1]


def loopback_bytes() -> int:
    """Bytes sent over loopback so far, both directions (a byte sent on lo is also received on lo:
    rx_bytes counts the same bytes again)."""
    return int(Path("/sys/class/net/lo/statistics/tx_bytes").read_text())


def remote_run(config: ExperimentConfig, dataset, pki: Path) -> dict:
    from hier_jax.remote import launch, transport
    from hier_jax.remote.config import CloudConfig, edge_command

    port = transport.free_port()
    argv = ["taskset", "-c", "0", *edge_command(config, f"127.0.0.1:{port}", "--tls-ca", str(pki / "ca.pem"))]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    edge = subprocess.Popen(argv, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        cloud = CloudConfig(listen=f"127.0.0.1:{port}", tls_cert=str(pki / "cloud.pem"), tls_key=str(pki / "cloud.key"))
        before = loopback_bytes()
        result = launch.run(config, dataset, cloud, evaluate=False, final_states=False)
        wire = loopback_bytes() - before
        _, stderr = edge.communicate(timeout=300)
    finally:
        edge.kill()
    if edge.returncode != 0:
        raise RuntimeError(f"the edge process failed: {stderr.strip().splitlines()[-1:]}")
    steps = len(result.cloud_order)
    return {
        "steps": steps,
        "cloud_steps_per_s": result.cloud_steps_per_s,
        "payload_bytes_per_step": result.payload_bytes,
        "loopback_bytes_per_step": wire / steps,
        "overhead": wire / steps / result.payload_bytes - 1,
        "edge_log": stderr.strip().splitlines()[-1],
    }


def ray_run(config: ExperimentConfig) -> float:
    """The same run on Ray (experiments.cluster, its own process: a Ray driver in a process that served
    gRPC lost its actors here), one core per worker; the cloud's steps per second."""
    values = {p: v for p, v, _ in flags.paths(config) if p.split(".")[0] in ONE_PAIR_FLAGS and p != "out"}
    with tempfile.TemporaryDirectory() as out:
        argv = [sys.executable, "-m", "experiments.cluster", *flags.as_argv(ExperimentConfig, values),
                "--checkpoint-every", "0", "--out", out]  # fmt: skip
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"the Ray run failed: {done.stderr.strip().splitlines()[-1:]}")
        return float(json.loads((Path(out) / "summary.json").read_text())["cloud_steps_per_s"])


@cli.entry_point
def main(argv: list[str]) -> dict:
    process.setup(host_devices=1)
    parser = cli.Parser(description=__doc__)
    flags.add_flags(parser, ExperimentConfig, DEFAULTS, include=ONE_PAIR_FLAGS)
    parser.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    args = parser.parse_args(argv)
    config = dataclasses.replace(
        flags.parse(ExperimentConfig, args, DEFAULTS), backend="remote", checkpoint_every=0, precision="fp32"
    )
    validate(config)
    check(config.max_steps > 0, "--max-steps", config.max_steps, "the steps to time, >= 1")
    if shutil.which("openssl") is None or shutil.which("taskset") is None:
        raise UserError("bench_remote needs openssl (a test CA) and taskset (pinning)")
    out = outputs.prepare_run_dir(config.out, outputs=("bench_remote.json", "bench_remote.md"),
                                  overwrite=args.overwrite) if config.out else None  # fmt: skip
    os.environ["HIER_JAX_TOKEN"] = secrets.token_urlsafe(24)
    os.sched_setaffinity(0, {1})  # the cloud's core (before JAX starts its threads)
    dataset = load_dataset(config.dataset, data_dir=config.data_dir or None)
    with tempfile.TemporaryDirectory() as pki:
        make_pki(Path(pki))
        remote = remote_run(config, dataset, Path(pki))
    print(f"remote: {remote['cloud_steps_per_s']:.2f} cloud steps/s; {remote['loopback_bytes_per_step']:,.0f} B "
          f"on loopback per step against a payload of {remote['payload_bytes_per_step']:,} B "
          f"(+{remote['overhead']:.1%})", flush=True)  # fmt: skip
    ray_steps_per_s = ray_run(config)
    print(f"ray: {ray_steps_per_s:.2f} cloud steps/s", flush=True)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())  # fmt: skip
    summary = {"cpu": cpu, "config": dataclasses.asdict(config), "remote": remote,
               "ray_cloud_steps_per_s": ray_steps_per_s,
               "remote_over_ray_step_time": ray_steps_per_s / remote["cloud_steps_per_s"]}  # fmt: skip
    text = (
        f"One edge and the cloud, a core each, on {cpu}: {config.model} width {config.width} split after "
        f"{config.split}, {config.bits} bits, batch {config.batch_size}, {remote['steps']} steps, pipelined.\n\n"
        "| | remote (gRPC + TLS, loopback) | Ray |\n| --- | --- | --- |\n"
        f"| cloud steps/s | {remote['cloud_steps_per_s']:.3f} | {ray_steps_per_s:.3f} |\n"
        f"| step time, remote / Ray | {summary['remote_over_ray_step_time']:.3f} | 1 |\n\n"
        f"Bytes per step on loopback (both directions, all framing): {remote['loopback_bytes_per_step']:,.0f}; "
        f"the payload's own: {remote['payload_bytes_per_step']:,} (overhead {remote['overhead']:.1%}).\n"
    )
    print(text)
    if out is not None:
        outputs.write_json(out / "bench_remote.json", summary)
        outputs.write_atomic(out / "bench_remote.md", text)
    return summary


if __name__ == "__main__":
    main()
