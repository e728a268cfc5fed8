"""The paper's runtime, measured: one edge and one cloud, processes of the remote backend over TLS, each
in its own network namespace and pinned to a core of its own, over a link the kernel shapes to a
preset's rates (`netns.ShapedLink`); beside the cost model's prediction of the same step from this
host's profile (`runtime_model.profiler`, pinned to one core like each side).

What one run measures (`measure`): the step time, the interval between consecutive cloud steps
(`RunRecord` `done_at`) after `warmup` steps, median and range; the bytes each way on the edge's
interface (every frame's headers, TLS, gRPC) against the bytes the scheme's arrays carry and the
messages the codec sent. `modeled` adds the model: each scheme's own formula
(`costmodel.step_time`) over the preset's rates, without the propagation delay (the kernel here has
no `netem`, so none is emulated) and with it, and `reductions` each scheme's time against cloud-only
(end_to_end), measured and modeled, beside the paper's figure.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from hier_jax.config import ExperimentConfig
from hier_jax.errors import WorkerError
from hier_jax.link import Link, get_link
from hier_jax.remote import transport
from hier_jax.remote.config import edge_command
from hier_jax.runtime_model import costmodel, selection
from hier_jax.runtime_model.profile import Profile
from hier_jax.runtime_model.reported import paper_reduction

SCHEMES = ("end_to_end", "split_learning", "hierarchical_sequential", "hierarchical_pipelined")
"""The cost model's names of what a row runs: cloud-only (streamed), split learning, hierarchical
training in either schedule."""
PRESETS = ("3g", "4g", "5g", "wifi")
DEFAULT_CUTS = (("resnet18_tv", "layer2_1"), ("vgg16", "pool3"))
"""The paper's inferred cuts on CIFAR-10 (`runtime_model.reported.PAPER_SPLITS`)."""
EDGE_CORE, CLOUD_CORE = 0, 1
LATENCY_NOTE = (
    "propagation delay is not emulated (this kernel has no netem): the measured step has none, the "
    "modeled_step_s column leaves it out, modeled_step_with_latency_s adds the preset's"
)
ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = Link("loopback", 1e12, 1e12, 0.0, "unshaped loopback: no rate limit")


def scheme_and_schedule(name: str) -> tuple[str, str]:
    """A row's (scheme, schedule) from its cost-model name (`costmodel.modeled`'s inverse)."""
    if name.startswith("hierarchical_"):
        return "hierarchical", name.removeprefix("hierarchical_")
    return name, "sequential" if name == "split_learning" else "pipelined"


def run_config(base: ExperimentConfig, model: str, split: str, name: str, steps: int) -> ExperimentConfig:
    """The config of one row: `base` (data, bits, width, batch, seed) at this cut and scheme, `steps`
    steps on the remote backend, float32, no checkpoints."""
    scheme, schedule = scheme_and_schedule(name)
    return dataclasses.replace(
        base,
        model=model,
        split=split,
        scheme=scheme,
        schedule=schedule,
        max_steps=steps,
        backend="remote",
        precision="fp32",
        checkpoint_every=0,
        out="",
    )


def step_times(done_at: list[float], warmup: int) -> list[float]:
    """The intervals between consecutive cloud steps from step `warmup` on."""
    ends = done_at[warmup:]
    return [b - a for a, b in zip(ends, ends[1:], strict=False)]


def _env(cache: Path | None) -> dict[str, str]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    if cache is not None:  # the second run of a model and cut compiles nothing
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    return env


def _wait_for_line(log: Path, text: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if log.exists() and text in log.read_text(errors="replace"):
            return
        if process.poll() is not None:
            raise WorkerError(f"the cloud exited ({process.returncode}) before it listened: {_last_line(log)}")
        time.sleep(0.2)
    raise WorkerError(f"the cloud did not listen within {timeout_s:.0f} s: {_last_line(log)}")


def _wait_for_both(cloud: subprocess.Popen, edge: subprocess.Popen, work: Path, timeout_s: float) -> None:
    """Until both have exited 0; WorkerError naming the side and its last line as soon as one fails
    (the other would otherwise wait its whole timeout for it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for side, process in (("cloud", cloud), ("edge", edge)):
            if process.poll() not in (None, 0):
                raise WorkerError(
                    f"the {side} process failed ({process.returncode}): {_last_line(work / f'{side}.log')}"
                )
        if cloud.poll() == 0 and edge.poll() == 0:
            return
        time.sleep(0.2)
    raise WorkerError(f"the run did not end within {timeout_s:.0f} s (logs in {work})")


def _last_line(log: Path) -> str:
    lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    return lines[-1] if lines else "(no output)"


def measure(
    config: ExperimentConfig,
    *,
    warmup: int,
    pki: Path,
    work: Path,
    link=None,
    cache: Path | None = None,
) -> dict:
    """One run of `config` between an edge process (core EDGE_CORE) and a cloud process (core
    CLOUD_CORE): over `link` (a live `netns.ShapedLink`), or over loopback without one. Logs and the
    cloud's result go to `work`. What it measured (see the module docstring)."""
    work.mkdir(parents=True, exist_ok=True)
    host = link.cloud_ip if link is not None else "127.0.0.1"
    port = transport.free_port() if link is None else 50051
    address = f"{host}:{port}"
    spec, result_path = work / "spec.json", work / "result.json"
    result_path.unlink(missing_ok=True)
    spec.write_text(json.dumps({"config": dataclasses.asdict(config), "listen": address,
                                "tls_cert": str(pki / "cloud.pem"), "tls_key": str(pki / "cloud.key")}))  # fmt: skip
    edge_argv = edge_command(config, address, "--tls-ca", str(pki / "ca.pem"))
    cloud_argv = [sys.executable, "-m", "hier_jax.bench.network_cloud", str(spec), str(result_path)]

    def start(side: str, argv: list[str], core: int) -> subprocess.Popen:
        log = open(work / f"{side}.log", "w")  # noqa: SIM115 (closed with the process, below)
        argv = ["taskset", "-c", str(core), *argv]
        options = {"cwd": ROOT, "env": _env(cache), "stdout": log, "stderr": subprocess.STDOUT}
        started = link.run(side, argv, **options) if link is not None else subprocess.Popen(argv, **options)
        log.close()
        return started

    before = link.counters() if link is not None else {}
    processes: list[subprocess.Popen] = []
    try:
        cloud = start("cloud", cloud_argv, CLOUD_CORE)
        processes.append(cloud)
        _wait_for_line(work / "cloud.log", "listening on", cloud, 300)
        edge = start("edge", edge_argv, EDGE_CORE)
        processes.append(edge)
        _wait_for_both(cloud, edge, work, config.timeout_s + 120)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    after = link.counters() if link is not None else {}
    result = json.loads(result_path.read_text())
    cloud_record = result["record"]["cloud"]
    intervals = step_times(cloud_record["done_at"], warmup)
    if not intervals:
        raise WorkerError(f"no step was timed: {len(cloud_record['done_at'])} cloud steps, warm-up {warmup}")
    steps = len(cloud_record["done_at"])
    traffic = result["network"]["0"]
    edge_step_s = result["record"]["edges"][0]["step_s"][warmup:]
    return {
        "steps": steps,
        "timed_steps": len(intervals),
        "measured_step_s": statistics.median(intervals),
        "measured_step_min_s": min(intervals),
        "measured_step_max_s": max(intervals),
        "measured_edge_compute_s": statistics.median(edge_step_s) if edge_step_s else None,
        "measured_cloud_compute_s": statistics.median(cloud_record["step_s"][warmup:]),
        "message_bytes_up": traffic["bytes_up"] / steps,
        "message_bytes_down": traffic["bytes_down"] / steps,
        "wire_bytes_up": (after["up"] - before["up"]) / steps if link is not None else None,
        "wire_bytes_down": (after["down"] - before["down"]) / steps if link is not None else None,
        "placement": result["placement"],
    }


def modeled(profile: Profile, split: str, bits: int, batch: int, num_train: int, name: str, link: Link) -> dict:
    """The cost model's figures for one row: the bytes it counts each way per step, its step (the
    formula's period or cycle) and epoch with and without the link's latency, and their compute terms."""
    w = selection.workload(profile, profile, split, bits, batch=batch, num_examples=num_train)
    bare = dataclasses.replace(link, latency_s=0.0)
    edge = (
        w.edge_fwd_s + w.edge_bwd_s + (0.0 if name in ("end_to_end", "split_learning") else w.head_fwd_s + w.head_bwd_s)
    )
    up, down = {
        "end_to_end": (w.raw_bytes, 0),
        "split_learning": (w.activation_bytes, w.gradient_bytes),
    }.get(name, (w.payload_bytes, 0))
    return {
        "payload_bytes_up": up,  # the arrays the scheme sends, from their shapes (the model's D, A, G, P)
        "payload_bytes_down": down,
        "modeled_step_s": costmodel.step_time(name, w, bare),
        "modeled_step_with_latency_s": costmodel.step_time(name, w, link),
        "modeled_epoch_s": costmodel.epoch_time(name, w, bare),
        "modeled_epoch_with_latency_s": costmodel.epoch_time(name, w, link),
        "modeled_edge_compute_s": 0.0 if name == "end_to_end" else edge,
        "modeled_cloud_compute_s": w.full_train_s if name == "end_to_end" else w.cloud_train_s,
        "batches_per_epoch": w.batches_per_epoch,
    }


def link_of(preset: str, shaped: bool) -> Link:
    return get_link(preset) if shaped else LOOPBACK


def reductions(rows: list[dict]) -> None:
    """Each row's time against cloud-only (end_to_end) at its cut and link, measured and modeled; the
    paper's figure beside the hierarchical rows over 3g (the link it reports)."""
    baseline = {(r["model"], r["split"], r["preset"]): r for r in rows if r["scheme"] == "end_to_end"}
    for r in rows:
        base = baseline.get((r["model"], r["split"], r["preset"]))
        for kind in ("measured", "modeled"):
            r[f"reduction_{kind}"] = (
                None if base is None else costmodel.reduction(r[f"{kind}_step_s"], base[f"{kind}_step_s"])
            )
        r["reduction_modeled_with_latency"] = (
            None
            if base is None
            else costmodel.reduction(r["modeled_step_with_latency_s"], base["modeled_step_with_latency_s"])
        )
        hierarchical = r["scheme"].startswith("hierarchical")
        r["reduction_paper"] = paper_reduction(r["model"], "cifar10") if hierarchical and r["preset"] == "3g" else None


def row_key(row: dict) -> tuple:
    return row["model"], row["split"], row["scheme"], row["preset"]


def table(rows: list[dict], cpu: str, shaped: bool) -> str:
    """The Markdown report: one line per row, then what was and was not emulated."""

    def pct(value: float | None) -> str:
        return "" if value is None else f"{100 * value:.0f} %"

    def kb(value: float | None) -> str:
        return "" if value is None else f"{value / 1e3:,.1f}"

    lines = [
        "| model | cut | link | scheme | measured step s (min-max) | modeled s | measured / modeled | "
        "modeled with latency s | epoch measured / modeled min | up kB: payload / wire (overhead) | "
        "down kB: payload / wire | reduction measured / modeled | paper |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        over = r["measured_step_s"] / r["modeled_step_s"]
        overhead = (
            "" if r["wire_bytes_up"] is None else f" ({100 * (r['wire_bytes_up'] / r['payload_bytes_up'] - 1):+.1f} %)"
        )
        lines.append(
            f"| {r['model']} | {r['split']} | {r['preset']} | {r['scheme']} | {r['measured_step_s']:.3f} "
            f"({r['measured_step_min_s']:.3f}-{r['measured_step_max_s']:.3f}) | {r['modeled_step_s']:.3f} | "
            f"{over:.2f} | {r['modeled_step_with_latency_s']:.3f} | "
            f"{r['measured_epoch_s'] / 60:.1f} / {r['modeled_epoch_s'] / 60:.1f} | "
            f"{kb(r['payload_bytes_up'])} / {kb(r['wire_bytes_up'])}{overhead} | "
            f"{kb(r['payload_bytes_down'])} / {kb(r['wire_bytes_down'])} | "
            f"{pct(r['reduction_measured'])} / {pct(r['reduction_modeled'])} | {pct(r['reduction_paper'])} |"
        )
    where = (
        "each side in its own network namespace, the veth between them shaped by `htb` to the preset's "
        "up and down rates (no segmentation offload: every frame's headers are shaped and counted)"
        if shaped
        else "over loopback, unshaped (--unshaped): the link's rates are not emulated, the model's link is free"
    )
    return (
        f"Edge and cloud as two processes of the remote backend (gRPC over TLS), on {cpu}: edge on core "
        f"{EDGE_CORE}, cloud on core {CLOUD_CORE}, {where}. Step: the median interval between consecutive "
        "cloud steps after the warm-up (the range in brackets); epoch: the step times the batches of an "
        "epoch (measured) and the model's epoch with its fill (modeled). Bytes per step: the arrays the "
        "scheme sends (payload) and the edge interface's counters (wire: headers, TLS, gRPC, ACKs of the "
        "other direction). Modeled: the cost model (docs/runtime_model.md) over this host's profile, "
        f"measured pinned to one core. Reduction: against end_to_end (cloud-only) at the same cut and link. "
        f"Note: {LATENCY_NOTE}.\n\n" + "\n".join(lines) + "\n"
    )


def plot(rows: list[dict], path: Path, save: Callable) -> None:
    """Measured against modeled step time, one panel per cut: a point per scheme and link."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullFormatter, StrMethodFormatter

    cuts = sorted({(r["model"], r["split"]) for r in rows})
    fig, axes = plt.subplots(1, len(cuts), figsize=(5.5 * len(cuts), 5), squeeze=False)
    markers = dict(zip(PRESETS, "os^D", strict=True))
    for ax, (model, split) in zip(axes[0], cuts, strict=True):
        mine = [r for r in rows if (r["model"], r["split"]) == (model, split)]
        for i, scheme in enumerate(SCHEMES):
            for r in (r for r in mine if r["scheme"] == scheme):
                ax.scatter(r["modeled_step_s"], r["measured_step_s"], color=f"C{i}",
                           marker=markers.get(r["preset"], "x"), s=50)  # fmt: skip
        low = min(min(r["modeled_step_s"], r["measured_step_s"]) for r in mine) * 0.7
        high = max(max(r["modeled_step_s"], r["measured_step_s"]) for r in mine) * 1.4
        ax.plot([low, high], [low, high], color="grey", lw=1)
        ax.fill_between([low, high], [0.85 * low, 0.85 * high], [1.15 * low, 1.15 * high], color="grey", alpha=0.15)
        ax.set(xscale="log", yscale="log", xlim=(low, high), ylim=(low, high), title=f"{model} after {split}",
               xlabel="modeled step (s)", ylabel="measured step (s)")  # fmt: skip
        for axis in (ax.xaxis, ax.yaxis):  # plain numbers at the decades; unlabeled minor ticks (they overlapped)
            axis.set_major_formatter(StrMethodFormatter("{x:g}"))
            axis.set_minor_formatter(NullFormatter())
    handles = [Line2D([], [], color=f"C{i}", marker="o", ls="", label=s) for i, s in enumerate(SCHEMES)]
    handles += [Line2D([], [], color="k", marker=m, ls="", label=p) for p, m in markers.items()]
    axes[0][-1].legend(handles=handles, fontsize=8, loc="upper left")
    fig.suptitle("Step time over kernel-shaped links: measured against the cost model (band: ±15 %)")
    fig.tight_layout()
    save(fig, path)
    plt.close(fig)
