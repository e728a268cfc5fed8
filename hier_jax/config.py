"""One experiment configuration (a frozen dataclass) and its checks.

Model, data and run fields are flat; the sub-configs that exist on their own are nested: each side's
optimizer (`optim.OptimConfig`), the early-exit head (`models.ExitHeadConfig`) and the simulated link
(`link.LinkConfig`). Every field is a flag (hier_jax.flags: `--learning-rate` sets both optimizers,
`--edge-learning-rate` the edge's; `--head-channels`; `--link 3g --outage 100:150`); an experiment
passes its own defaults. `validate` checks every field that can be checked without the data (a
ConfigError naming the flag and its valid values), so a bad flag fails before anything is loaded.

What a run trains is its scheme (hierarchical, end_to_end, split_learning); how the edge and the
cloud take turns is its schedule (sequential: the edge waits for the cloud; pipelined: it runs ahead,
its next step overlapping the cloud's). `from_dict` reads a config recorded by any version, the flat
format-1 layout included.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path
from typing import Any

from hier_jax import flags
from hier_jax.errors import ConfigError, check, invalid
from hier_jax.flags import int_pair, option
from hier_jax.link.spec import LinkConfig, validate_link
from hier_jax.models.split import ExitHeadConfig
from hier_jax.optim import LR_SCHEDULES, OptimConfig

SIDES = ("edge", "cloud")
SCHEMES = ("hierarchical", "end_to_end", "split_learning")
SCHEDULES = ("sequential", "pipelined")
BACKENDS = ("threads", "ray", "remote")
ORDERS = ("round_robin", "async")
_LEGACY_SCHEDULES = {
    "overlapped": ("schedule", "pipelined"),
    **{name: (f"{flags.SHARED}optimizer.lr_schedule", name) for name in LR_SCHEDULES},
}


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    model: str = option("resnet18", "vgg16 | resnet18 | resnet18_tv")
    dataset: str = option("digits", "digits | cifar10 | tiny_imagenet | folder:PATH")
    split: str = option("layer1_1", "separation point: the last edge stage")
    scheme: str = option("hierarchical", " | ".join(SCHEMES))
    schedule: str = option(
        "pipelined",
        "sequential (the edge waits for the cloud) | pipelined (it runs ahead); --mode and --flow are old spellings",
        aliases=("--mode", "--flow"),
        values=_LEGACY_SCHEDULES,
        run_only=True,
    )
    bits: int = option(4, "1..8 quantized, 16 bfloat16, 32 float32")
    width: int = option(64, "first-stage channels; 64 is the paper's size")
    precision: str = option("auto", "auto | fp32 | tf32 | bf16, both sides (auto: bf16 on TPU, else fp32)")
    batch_size: int = option(128, "examples per step", aliases=("--batch",))
    epochs: int = option(1, "passes over the training split")
    max_steps: int = option(0, "> 0: stop after this many steps in all")
    edge_optimizer: OptimConfig = option(OptimConfig(), prefix="edge", shared="optimizer")
    cloud_optimizer: OptimConfig = option(OptimConfig(), prefix="cloud", shared="optimizer")
    head: ExitHeadConfig = option(ExitHeadConfig(), prefix="head")
    link: LinkConfig = option(LinkConfig(), prefix="")
    edge_device: str = option("auto", "auto: the first accelerator, else host device 0", run_only=True)
    cloud_device: str = option("auto", "auto: the last accelerator, else host device 1", run_only=True)
    queue_size: int = option(2, "payloads the edge may run ahead of the cloud", run_only=True)
    backend: str = option(
        "threads",
        "where the workers run: threads (this process) | ray (a process each) | remote (edges dial in)",
        run_only=True,
    )
    edges: int = option(1, "edges, each on a shard of the training split, against one cloud")
    order: str = option("round_robin", "the cloud's order: round_robin (reproducible) | async (arrival order)")
    dirichlet: float = option(0.0, "> 0: non-IID shards, label proportions ~ Dirichlet(ALPHA); 0: IID")
    edge_sync: int = option(0, "> 0: average the edge models every this many steps")
    max_restarts: int = option(
        0, "bring a lost edge back up to R times, from the last checkpoint", metavar="R", run_only=True
    )
    timeout_s: float = option(600.0, "the longest any single wait may take (s)", flag="--timeout", run_only=True)
    kill_edges: tuple[tuple[int, int], ...] = option(
        (),
        "fault injection: that edge's worker dies at that step (repeatable)",
        flag="--kill-edge",
        repeat=True,
        metavar="EDGE:STEP",
        parse=int_pair("EDGE:STEP", "two integers >= 0"),
        run_only=True,
    )
    kill_cloud: int = option(
        -1, "fault injection: the cloud's worker dies at its step STEP (-1: never)", metavar="STEP", run_only=True
    )
    seed: int = option(0, "initialisation, shuffling and augmentation")
    data_dir: str = option("", "tfds data_dir / cache dir; empty: the library default", run_only=True)
    out: str = option("", "output directory; empty: write nothing", run_only=True)
    checkpoint_every: int = option(250, "save every state this many steps (0: only at the end)", run_only=True)
    keep_checkpoints: int = option(3, "how many of the latest checkpoints to keep", run_only=True)


TOPOLOGY = ("backend", "edges", "order", "dirichlet", "edge_sync", "max_restarts", "kill_edges", "kill_cloud")
"""The fields that shape a run's workers: how many edges, where, in what order, with what faults."""
ONE_PAIR_FLAGS = tuple(f.name for f in dataclasses.fields(ExperimentConfig) if f.name not in TOPOLOGY)
"""The flags of a command that trains one edge against one cloud in this process (quickstart, bench_overlap)."""


def optimizers(**settings: Any) -> dict[str, Any]:
    """Both sides' optimizers with the same settings: `ExperimentConfig(..., **optimizers(learning_rate=0.1))`."""
    return {f"{side}_optimizer": OptimConfig(**settings) for side in SIDES}


def optimizer(config: ExperimentConfig, side: str) -> OptimConfig:
    """The optimizer of `side` (the end-to-end baseline trains with the cloud's)."""
    check(side in SIDES, "side", side, ", ".join(SIDES))
    return config.edge_optimizer if side == "edge" else config.cloud_optimizer


def run_only_fields() -> set[str]:
    """Dotted paths of the fields that do not change the training trajectory: a resumed run may give
    them new values."""
    return flags.run_only_paths(ExperimentConfig)


def differences(current: ExperimentConfig, recorded: ExperimentConfig, there: str) -> list[str]:
    """ "FLAG (VALUE here, VALUE `there`)" for every field that shapes training (run-only fields and the
    scheme left out: the scheme is checked on its own) in which two configs differ."""
    skip = run_only_fields() | {"scheme"}
    theirs = {path: value for path, value, _ in flags.paths(recorded)}
    return [
        f"{flags.flag_name(ExperimentConfig, path)} ({value!r} here, {theirs[path]!r} {there})"
        for path, value, _ in flags.paths(current)
        if path not in skip and value != theirs[path]
    ]


def check_dataset_spec(spec: str) -> None:
    """ConfigError unless `spec` names a known data set or an existing image folder (nothing is loaded)."""
    folder = spec.removeprefix("folder:") if spec.startswith("folder:") else None
    check(
        spec in ("digits", "cifar10", "tiny_imagenet") or bool(folder),
        "--dataset",
        spec,
        "digits, cifar10, tiny_imagenet, folder:PATH",
    )
    if folder is not None and not Path(folder).is_dir():
        raise ConfigError(
            f"--dataset {spec!r}: {folder} is not a directory (an image folder holds "
            f"train/CLASS/*.jpg and test/CLASS/*.jpg)"
        )


def _check_optimizers(config: ExperimentConfig) -> None:
    """Each side's optimizer; a bad value both sides share is named by its shared flag."""
    checks = (
        ("learning_rate", lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
        ("momentum", lambda v: 0 <= v < 1, "a number in [0, 1)"),
        ("weight_decay", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
        ("lr_schedule", lambda v: v in LR_SCHEDULES, ", ".join(LR_SCHEDULES)),
        ("warmup_steps", lambda v: v >= 0, "an integer >= 0"),
    )
    for name, ok, valid in checks:
        values = {side: getattr(optimizer(config, side), name) for side in SIDES}
        bad = [side for side in SIDES if not ok(values[side])]
        if len(bad) == 2 and repr(values["edge"]) == repr(values["cloud"]):  # repr: nan is nan
            raise invalid(f"--{name.replace('_', '-')}", values["edge"], valid)
        for side in bad:
            raise invalid(f"--{side}-{name.replace('_', '-')}", values[side], valid)


def _check_topology(config: ExperimentConfig) -> None:
    check(config.backend in BACKENDS, "--backend", config.backend, ", ".join(BACKENDS))
    check(config.edges >= 1, "--edges", config.edges, "an integer >= 1")
    check(config.order in ORDERS, "--order", config.order, ", ".join(ORDERS))
    check(
        config.dirichlet >= 0 and math.isfinite(config.dirichlet),
        "--dirichlet",
        config.dirichlet,
        "a number > 0 (non-IID), or 0 (IID)",
    )
    check(config.edge_sync >= 0, "--edge-sync", config.edge_sync, "an integer >= 0")
    check(config.kill_cloud >= -1, "--kill-cloud", config.kill_cloud, "a cloud step >= 0, or -1 (never)")
    check(config.max_restarts >= 0, "--max-restarts", config.max_restarts, "an integer >= 0")
    check(
        math.isfinite(config.timeout_s) and config.timeout_s > 0,
        "--timeout",
        config.timeout_s,
        "a number of seconds > 0",
    )
    for edge, step in config.kill_edges:
        check(
            0 <= edge < config.edges and step >= 0,
            "--kill-edge",
            f"{edge}:{step}",
            f"EDGE:STEP with EDGE in 0..{config.edges - 1}",
        )
    if config.scheme != "hierarchical":  # a baseline is one edge and one cloud taking turns
        for flag, value, alone in (
            ("--edges", config.edges, 1),
            ("--edge-sync", config.edge_sync, 0),
            ("--max-restarts", config.max_restarts, 0),
        ):
            check(
                value == alone,
                flag,
                value,
                f"{alone} with --scheme {config.scheme} (hierarchical training "
                f"has several edges, their averaging and restarts)",
            )


def validate(config: ExperimentConfig) -> None:
    """Check every field that needs no data; ConfigError naming the flag, the value and the valid choices."""
    from hier_jax.devices import resolve_device
    from hier_jax.models import MODELS, stage_names
    from hier_jax.precision import POLICIES
    from hier_jax.quantization import VALID_BITS

    check(config.model in MODELS, "--model", config.model, ", ".join(MODELS))
    points = stage_names(config.model)
    check(config.split in points, "--split", config.split, f"a stage of {config.model}: {', '.join(points)}")
    check(config.scheme in SCHEMES, "--scheme", config.scheme, ", ".join(SCHEMES))
    check(config.schedule in SCHEDULES, "--schedule", config.schedule, ", ".join(SCHEDULES))
    check(config.bits in VALID_BITS, "--bits", config.bits, ", ".join(map(str, VALID_BITS)))
    check(config.precision in POLICIES, "--precision", config.precision, ", ".join(POLICIES))
    check_dataset_spec(config.dataset)
    for path, least in (
        ("width", 1),
        ("batch_size", 1),
        ("epochs", 1),
        ("head.channels", 1),
        ("head.grid", 1),
        ("queue_size", 1),
        ("keep_checkpoints", 1),
        ("max_steps", 0),
        ("head.convs", 0),
        ("seed", 0),
        ("checkpoint_every", 0),
    ):
        value = _get(config, path)
        check(value >= least, flags.flag_name(ExperimentConfig, path), value, f"an integer >= {least}")
    _check_optimizers(config)
    _check_topology(config)
    validate_link(config.link, config.edges)
    for field in ("edge_device", "cloud_device"):
        try:
            resolve_device(getattr(config, field), field.removesuffix("_device"))
        except ValueError as error:
            raise ConfigError(f"--{field.replace('_', '-')}: {error}") from None


def as_run(config: ExperimentConfig) -> ExperimentConfig:
    """The config a run trains with: split learning's edge waits for its gradient, so its schedule is
    sequential whatever was asked. End-to-end keeps its schedule: pipelined, its edge (the data source)
    sends the next batches while the cloud trains, as the cost model's `end_to_end` streams them."""
    return dataclasses.replace(config, schedule="sequential") if config.scheme == "split_learning" else config


def _get(config: Any, path: str) -> Any:
    for name in path.split("."):
        config = getattr(config, name)
    return config


# ------------------------------------------------------------------------- recorded configs

_FORMAT1_OPTIMIZER = ("learning_rate", "momentum", "weight_decay", "schedule", "warmup_steps", "nesterov")
_FORMAT1_HEAD = ("channels", "convs", "grid")


def upgrade_format1(recorded: dict[str, Any]) -> dict[str, Any]:
    """A flat config as format-1 checkpoints recorded it (`learning_rate`, `edge_learning_rate`, ...,
    `head_channels`, ...), in today's nested layout; a nested one is returned as it is."""
    if "edge_optimizer" in recorded or "learning_rate" not in recorded:
        return recorded
    flat = dict(recorded)
    nested: dict[str, Any] = {}
    for side in SIDES:
        settings = {}
        for name in _FORMAT1_OPTIMIZER:
            own = flat.pop(f"{side}_{name}", None)
            settings["lr_schedule" if name == "schedule" else name] = flat[name] if own is None else own
        nested[f"{side}_optimizer"] = settings
    for name in _FORMAT1_OPTIMIZER:
        flat.pop(name, None)
    nested["head"] = {name: flat.pop(f"head_{name}") for name in _FORMAT1_HEAD if f"head_{name}" in flat}
    return {**flat, **nested}


def from_dict(cls: type, recorded: dict[str, Any]) -> Any:
    """A config dataclass from its recorded dict (JSON: lists for tuples), format 1 upgraded; fields
    added since it was recorded take their defaults, unknown ones are left out."""
    if cls is ExperimentConfig:
        recorded = upgrade_format1(recorded)
    hints = typing.get_type_hints(cls)
    values = {}
    for field in dataclasses.fields(cls):
        if field.name not in recorded:
            continue
        value, hint = recorded[field.name], hints[field.name]
        if flags.is_config(hint):
            value = from_dict(hint, value)
        elif typing.get_origin(hint) is tuple:
            value = _tuple(value)
        values[field.name] = value
    return cls(**values)


def _tuple(value: Any) -> Any:
    return tuple(_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
