"""The paper's runtime, measured over real, kernel-shaped links: cloud-only (end_to_end, streamed), split
learning and hierarchical training (sequential, pipelined) at each cut, for each link preset, the edge
and the cloud as two processes of the remote backend (gRPC + TLS) in two network namespaces, each
pinned to a core of its own; beside the cost model's prediction from this host's profile.

    python -m experiments.bench_network --dataset folder:../shared/data/cifar10-jpeg --out DIR
    python -m experiments.bench_network --model vgg16 --split pool3 --presets 3g --steps 4 --out DIR
    python -m experiments.bench_network --unshaped --out DIR      # no root: loopback, rates not emulated

Writes DIR/bench_network.json (a row per cut x scheme x preset), DIR/bench_network.md (the table),
DIR/bench_network.png (measured against modeled), DIR/profiles/ (the profiles the model used) and
DIR/logs/ (each run's edge and cloud output). Each finished row is kept in DIR/rows.jsonl: an
interrupted benchmark continues with --resume. Needs root and iproute2 for the shaped links (network
namespaces, veth, tc htb), openssl (a throwaway CA) and taskset; nothing else may load the cores
meanwhile. Propagation delay is not emulated where the kernel has no netem (the model column shows
the step with and without it).
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

from hier_jax import cli, outputs, process
from hier_jax.bench import netns
from hier_jax.bench import network as bench
from hier_jax.bench.pki import make_pki
from hier_jax.config import ExperimentConfig, validate
from hier_jax.errors import UserError, check
from hier_jax.flags import comma_list
from hier_jax.link import LINKS

OUTPUTS = ("bench_network.json", "bench_network.md", "bench_network.png", "rows.jsonl", "settings.json")


def parse(argv: list[str]):
    parser = cli.Parser(prog="experiments.bench_network", description=__doc__)
    parser.add_argument("--model", default="", help="one model (default: resnet18_tv and vgg16 at the paper's cuts)")
    parser.add_argument("--split", default="", help="its cut (default: the paper's inferred one)")
    parser.add_argument("--bits", type=int, default=4, help="payload quantization")
    parser.add_argument("--width", type=int, default=64, help="channels of the first layer (64: the paper's)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6, help="timed steps (intervals) per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed cloud steps first")
    parser.add_argument("--presets", default=",".join(bench.PRESETS), help=f"subset of {','.join(LINKS)}")
    parser.add_argument("--schemes", default=",".join(bench.SCHEMES), help=f"subset of {','.join(bench.SCHEMES)}")
    parser.add_argument("--dataset", default="cifar10", help="digits | cifar10 | folder:PATH (the data's shape)")
    parser.add_argument("--data-dir", default="", help="tfds data directory")
    parser.add_argument("--timeout", type=float, default=900.0, help="the longest any wait of a run may take (s)")
    parser.add_argument("--unshaped", action="store_true", help="loopback, no namespaces (no root needed)")
    parser.add_argument("--out", required=True, help="write DIR/bench_network.{json,md,png}")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted benchmark in --out")
    parser.add_argument("--overwrite", action="store_true", help="replace a benchmark already in --out")
    return parser.parse_args(argv)


def settings_of(args) -> dict:
    """What makes two benchmarks the same one (a resumed one must match)."""
    return {k: v for k, v in vars(args).items() if k not in ("out", "resume", "overwrite", "debug", "timeout")}


def cuts_of(args) -> list[tuple[str, str]]:
    if not args.model:
        if args.split:
            raise UserError("--split needs --model (the default runs each model at its own cut)")
        return list(bench.DEFAULT_CUTS)
    from hier_jax.runtime_model.reported import paper_split

    return [(args.model, args.split or paper_split(args.model, "cifar10"))]


@cli.entry_point
def main(argv: list[str]) -> dict:
    args = parse(argv)
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {bench.EDGE_CORE})  # the profile runs where the edge will: one core (before JAX starts)
    try:
        return benchmark(args)
    except KeyboardInterrupt:
        out = Path(args.out)
        kept = len((out / "rows.jsonl").read_text().splitlines()) if (out / "rows.jsonl").exists() else 0
        again = [a for a in argv if a not in ("--overwrite", "--resume")] + ["--resume"]
        print(f"experiments.bench_network: interrupted; {kept} finished rows kept in {out / 'rows.jsonl'} (the run "
              f"in progress is dropped, its processes and namespaces removed); continue with: "
              f"python -m experiments.bench_network {shlex.join(again)}", file=sys.stderr)  # fmt: skip
        raise SystemExit(cli.EXIT_INTERRUPTED) from None
    finally:
        os.sched_setaffinity(0, cores)


def benchmark(args) -> dict:
    process.setup(host_devices=1)  # before `validate`, which starts JAX's backends
    presets, schemes = comma_list(args.presets), comma_list(args.schemes)
    for preset in presets:
        check(preset in LINKS, "--presets", preset, ", ".join(LINKS))
    for name in schemes:
        check(name in bench.SCHEMES, "--schemes", name, ", ".join(bench.SCHEMES))
    check(bool(presets) and bool(schemes), "--presets/--schemes", "", "at least one of each")
    check(args.steps >= 1, "--steps", args.steps, ">= 1")
    check(args.warmup >= 1, "--warmup", args.warmup, ">= 1 (the first cloud step compiles)")
    check(args.timeout > 0, "--timeout", args.timeout, "> 0")
    cuts = cuts_of(args)
    base = ExperimentConfig(dataset=args.dataset, data_dir=args.data_dir, bits=args.bits, width=args.width,
                            batch_size=args.batch, timeout_s=args.timeout)  # fmt: skip
    configs = {
        (model, split, name): bench.run_config(base, model, split, name, args.warmup + args.steps + 1)
        for model, split in cuts
        for name in schemes
    }
    for config in configs.values():
        validate(config)
    if not args.unshaped and (reason := netns.unavailable()) is not None:
        raise UserError(reason)
    missing = [tool for tool in ("openssl", "taskset") if shutil.which(tool) is None]
    if missing:
        raise UserError(f"bench_network needs {' and '.join(missing)} (a throwaway CA; pinning each side to a core)")
    if (os.cpu_count() or 1) < 2:
        raise UserError("bench_network pins the edge and the cloud to a core each: it needs 2 cores")
    out = outputs.prepare_run_dir(args.out, outputs=OUTPUTS, resume=args.resume, overwrite=args.overwrite,
                                  resume_hint="--resume")  # fmt: skip
    settings = settings_of(args)
    done: dict[tuple, dict] = {}
    if args.resume and (out / "settings.json").exists():
        recorded = json.loads((out / "settings.json").read_text())
        if recorded != settings:
            differ = ", ".join(f"--{k.replace('_', '-')}" for k in settings if recorded.get(k) != settings[k])
            raise UserError(f"--out {out} holds a benchmark of other settings ({differ}); --overwrite replaces it")
        rows_file = out / "rows.jsonl"
        lines = rows_file.read_text().splitlines() if rows_file.exists() else []
        done = {bench.row_key(r): r for r in map(json.loads, lines)}
    if args.overwrite:
        outputs.remove_run(out, OUTPUTS)
    outputs.write_json(out / "settings.json", settings)

    from hier_jax.data import load_dataset
    from hier_jax.models import build_model
    from hier_jax.runtime_model import profiler

    dataset = load_dataset(args.dataset, data_dir=args.data_dir or None)
    cpu = profiler.host_cpu()
    if not args.unshaped and (removed := netns.remove_leftovers()):
        print(f"removed {len(removed)} namespaces a killed benchmark left: {', '.join(removed)}", flush=True)
    os.environ.setdefault("HIER_JAX_TOKEN", secrets.token_urlsafe(24))
    total, rows, profiles = len(configs) * len(presets), [], {}
    with tempfile.TemporaryDirectory(prefix="bench_network-") as scratch:
        pki, cache = Path(scratch) / "pki", Path(scratch) / "compile_cache"
        pki.mkdir()
        make_pki(pki, ips=(netns.ShapedLink.cloud_ip,))
        for model, split in cuts:
            print(f"profiling {model} (width {args.width}, batch {args.batch}) on core {bench.EDGE_CORE}", flush=True)
            profile = profiler.cached_profile(
                out / "profiles" / f"{model}_w{args.width}_b{args.batch}.json",
                lambda model=model: build_model(
                    model, num_classes=dataset.num_classes, input_shape=dataset.image_shape, width=args.width
                ),  # fmt: skip
                batch=args.batch,
                repeats=3,
                warmup=1,
                head=base.head,
                bits=(args.bits,),
                payload_batch=args.batch,
                progress=False,
            )
            profiles[model] = profile
            for name in schemes:
                for preset in presets:
                    key = (model, split, name, preset)
                    if key in done:
                        rows.append(done[key])
                        continue
                    print(f"[{len(rows) + 1}/{total}] {model} after {split}, {name} over {preset}", flush=True)
                    link = bench.link_of(preset, shaped=not args.unshaped)
                    work = out / "logs" / "-".join(key)
                    if args.unshaped:
                        measured = bench.measure(configs[model, split, name], warmup=args.warmup, pki=pki,
                                                 work=work, cache=cache)  # fmt: skip
                    else:
                        with netns.ShapedLink(link.uplink_bps / 1e6, link.downlink_bps / 1e6) as shaped:
                            measured = bench.measure(configs[model, split, name], warmup=args.warmup, pki=pki,
                                                     work=work, link=shaped, cache=cache)  # fmt: skip
                    scheme, schedule = bench.scheme_and_schedule(name)
                    model_figures = bench.modeled(profile, split, args.bits, args.batch, dataset.num_train, name, link)
                    row = {
                        "model": model, "split": split, "bits": args.bits, "width": args.width, "batch": args.batch,
                        "scheme": name, "training_scheme": scheme, "schedule": schedule, "preset": preset,
                        "up_mbit": link.uplink_bps / 1e6, "down_mbit": link.downlink_bps / 1e6,
                        "latency_s": link.latency_s, "shaped": not args.unshaped, "cpu": cpu,
                        **measured, **model_figures,
                        "measured_epoch_s": measured["measured_step_s"] * model_figures["batches_per_epoch"],
                    }  # fmt: skip
                    row["measured_over_modeled"] = row["measured_step_s"] / row["modeled_step_s"]
                    with open(out / "rows.jsonl", "a") as log:
                        log.write(json.dumps(row) + "\n")
                    rows.append(row)
                    print(
                        f"    step {row['measured_step_s']:.3f} s measured ({row['measured_step_min_s']:.3f}-"
                        f"{row['measured_step_max_s']:.3f}), {row['modeled_step_s']:.3f} s modeled "
                        f"({row['measured_over_modeled']:.2f}x)"
                        + ("" if row["wire_bytes_up"] is None else
                           f"; up {row['wire_bytes_up']:,.0f} B on the wire per step for {row['payload_bytes_up']:,}"
                           " B of payload"),
                        flush=True,
                    )  # fmt: skip
    bench.reductions(rows)
    summary = {
        "cpu": cpu,
        "settings": settings,
        "note": bench.LATENCY_NOTE,
        # the model's whole step (its stages, each jitted alone) over the fused train step
        "stages_over_whole": {m: p.stages_train_s / p.whole_train_s for m, p in profiles.items() if p.whole_train_s},
        "rows": rows,
    }
    text = bench.table(rows, cpu, shaped=not args.unshaped)
    outputs.write_json(out / "bench_network.json", summary)
    outputs.write_atomic(out / "bench_network.md", text)
    bench.plot(rows, out / "bench_network.png", outputs.save_figure)
    print(text)
    return summary


if __name__ == "__main__":
    main()
