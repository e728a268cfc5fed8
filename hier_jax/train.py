"""Training as a library: from an ExperimentConfig and a data set to trained edge and cloud states.

Experiments stay thin: they build a config, call `build` once, then `train` in the mode they want
(several runs of one build share its compiled steps and start from the same initial states).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hier_jax import quantization, steps
from hier_jax.config import RUN_ONLY_FIELDS, ExperimentConfig, validate
from hier_jax.data import ImageDataset, eval_batches, num_train_steps, train_batches
from hier_jax.devices import place
from hier_jax.errors import ConfigError, DivergenceError, ResumeMismatchError, RunInterrupted
from hier_jax.link.channel import Channel, QueueChannel
from hier_jax.models import ExitHeadConfig, Split, StagedNet, build_model, check_input_size, split
from hier_jax.optim import make_optimizer
from hier_jax.run import baselines, supervisor, threads
from hier_jax.run.checkpoint import RunCheckpoints
from hier_jax.run.evaluate import evaluate as evaluate_exits
from hier_jax.run.hierarchy import Hierarchy, build_hierarchy

MODES = ("sequential", "overlapped")
BASELINES = ("end_to_end", "split_learning")
"""The paper's comparisons, trained from the same Setup (same initial weights of every stage, same
batches, same checkpoints and resume) with `train(setup, "end_to_end")` or `train(setup, "split_learning")`."""


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything a run needs: the split model, compiled steps, initial states and the step count."""

    config: ExperimentConfig
    dataset: ImageDataset
    model: StagedNet
    split: Split
    hierarchy: Hierarchy
    initial_edge_state: steps.State
    initial_cloud_state: steps.State
    total_steps: int

    @property
    def precision(self) -> str:
        """The resolved precision policy both sides compute in ("fp32", "tf32" or "bf16"; config.precision
        may say "auto")."""
        return self.model.precision


def total_steps(config: ExperimentConfig, dataset: ImageDataset) -> int:
    steps_all = config.epochs * num_train_steps(dataset, config.batch_size)
    return min(steps_all, config.max_steps) if config.max_steps > 0 else steps_all


def check_data(config: ExperimentConfig, dataset: ImageDataset) -> None:
    """The checks that need the data (ConfigError): at least one full batch in the training split."""
    if total_steps(config, dataset) < 1:
        raise ConfigError(
            f"--batch-size {config.batch_size} is larger than the training split of {dataset.name} "
            f"({dataset.num_train} images): no training steps; valid: 1..{dataset.num_train}"
        )


def build(config: ExperimentConfig, dataset: ImageDataset) -> Setup:
    """Validate the config against the data, then build and split the model, the optimizers and the
    compiled steps."""
    validate(config)
    check_data(config, dataset)
    model = build_model(
        config.model,
        num_classes=dataset.num_classes,
        input_shape=dataset.image_shape,
        width=config.width,
        seed=config.seed,
        precision=config.precision,
    )
    try:
        check_input_size(model)
    except ValueError as error:
        raise ConfigError(f"--model {config.model} on --dataset {config.dataset}: {error}") from None
    parts = split(
        model, config.split, ExitHeadConfig(config.head_channels, config.head_convs, config.head_grid), seed=config.seed
    )
    n_steps = total_steps(config, dataset)
    hierarchy, edge_state, cloud_state = build_hierarchy(
        parts,
        bits=config.bits,
        edge_tx=make_optimizer(config.optimizer("edge"), n_steps),
        cloud_tx=make_optimizer(config.optimizer("cloud"), n_steps),
        edge_device=config.edge_device,
        cloud_device=config.cloud_device,
    )
    return Setup(config, dataset, model, parts, hierarchy, edge_state, cloud_state, n_steps)


class TrainBatches:
    """The run's batches from step `start` on, epoch after epoch, cut at the step count.

    Step k is batch k % steps_per_epoch of epoch k // steps_per_epoch, shuffled and augmented by
    (seed, epoch, step) alone, so the batches from `start` on are exactly those an uninterrupted run
    sees there: the position in the data and the RNG state are both the step number.
    """

    def __init__(self, setup: Setup, start: int = 0):
        self.setup, self.start = setup, start

    def __len__(self) -> int:
        return max(self.setup.total_steps - self.start, 0)

    def __iter__(self) -> Iterator:
        c = self.setup.config
        per_epoch = num_train_steps(self.setup.dataset, c.batch_size)
        first_epoch, skip = divmod(self.start, per_epoch)
        epochs = (
            train_batches(
                self.setup.dataset,
                c.batch_size,
                seed=c.seed,
                epoch=e,
                device=self.setup.hierarchy.edge_device,
                start=skip if e == first_epoch else 0,
            )
            for e in itertools.count(first_epoch)
        )
        return itertools.islice(itertools.chain.from_iterable(epochs), len(self))


def fresh_states(setup: Setup) -> tuple[steps.State, steps.State]:
    """Copies of the initial states (the steps donate theirs), so every run starts from the same point."""
    h = setup.hierarchy
    return place(setup.initial_edge_state, h.edge_device), place(setup.initial_cloud_state, h.cloud_device)


def build_baseline(setup: Setup, scheme: str) -> tuple[baselines.Baseline, steps.State, steps.State]:
    """The compiled steps and initial states of a baseline. The unsplit model starts from the very
    weights the hierarchy's stages start from; end-to-end trains with the cloud's optimizer on the
    cloud device, split learning gives each side its own optimizer and cuts at the setup's split."""
    config, n_steps = setup.config, setup.total_steps
    cloud_tx = make_optimizer(config.optimizer("cloud"), n_steps)
    if scheme == "end_to_end":
        return baselines.build_end_to_end(setup.model, cloud_tx, device=config.cloud_device)
    if scheme == "split_learning":
        return baselines.build_split_learning(
            split(setup.model, setup.split.point, head=None),
            edge_tx=make_optimizer(config.optimizer("edge"), n_steps),
            cloud_tx=cloud_tx,
            edge_device=config.edge_device,
            cloud_device=config.cloud_device,
        )
    raise ConfigError(f"unknown baseline {scheme!r}; valid: {', '.join(BASELINES)}")


def warm_up(setup: Setup) -> None:
    """Compile the edge and cloud train and eval steps with one step on throwaway states."""
    h = setup.hierarchy
    edge_state, cloud_state = fresh_states(setup)
    images, labels = next(iter(TrainBatches(setup)))
    edge_state, payload, _ = h.edge_step(edge_state, images, labels)
    cloud_state, _ = h.cloud_step(cloud_state, jax.device_put(payload, h.cloud_device))
    eval_images, _, _ = next(eval_batches(setup.dataset, setup.config.batch_size, device=h.edge_device))
    _, eval_payload = h.edge_eval(edge_state, eval_images)
    jax.block_until_ready(h.cloud_eval(cloud_state, jax.device_put(eval_payload, h.cloud_device)))


METRIC_KEYS = ("loss", "accuracy")


def _history(meta: dict | None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    """(edge metrics, cloud metrics, cloud steps) recorded in a checkpoint's metadata (empty without one)."""
    recorded = (meta or {}).get("metrics", {})
    edge = {k: np.asarray(recorded.get(f"edge_{k}", []), np.float32) for k in METRIC_KEYS}
    cloud = {k: np.asarray(recorded.get(f"cloud_{k}", []), np.float32) for k in METRIC_KEYS}
    return edge, cloud, np.asarray(recorded.get("cloud_steps", []), np.int64)


def _joined(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([before[k], np.asarray(after.get(k, np.zeros(0)), np.float32)]) for k in METRIC_KEYS}


def _meta(setup: Setup, mode: str, step: int, edge: dict, cloud: dict, cloud_steps: np.ndarray, wall_s: float) -> dict:
    per_epoch = num_train_steps(setup.dataset, setup.config.batch_size)
    return {
        "format": 1,
        "step": step,
        "total_steps": setup.total_steps,
        "mode": mode,
        "config": dataclasses.asdict(setup.config),
        "precision": setup.precision,
        "data": {
            "epoch": step // per_epoch,
            "batch_in_epoch": step % per_epoch,
            "steps_per_epoch": per_epoch,
            "order": "epoch_permutation(seed, epoch)",
        },
        "rng": {"seed": setup.config.seed, "augmentation_key": "fold_in(fold_in(key(seed), epoch), batch_in_epoch)"},
        "metrics": {
            **{f"edge_{k}": edge[k].tolist() for k in METRIC_KEYS},
            **{f"cloud_{k}": cloud[k].tolist() for k in METRIC_KEYS},
            "cloud_steps": cloud_steps.tolist(),
        },
        "wall_s": wall_s,
    }


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(
        jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)])
    )


def check_resumable(config: ExperimentConfig, recorded: dict, where: Path) -> None:
    """ResumeMismatchError naming every field (RUN_ONLY_FIELDS aside) in which `config` differs from `recorded`."""
    current = dataclasses.asdict(config)
    # A field added since the checkpoint was written had its default value then.
    recorded = {**dataclasses.asdict(ExperimentConfig()), **recorded}
    differ = [
        f"{name} ({current[name]!r} here, {recorded.get(name)!r} in the checkpoint)"
        for name in current
        if name not in RUN_ONLY_FIELDS and current[name] != recorded.get(name)
    ]
    if differ:
        raise ResumeMismatchError(f"cannot resume from {where}: the config differs in " + "; ".join(differ))


def train(
    setup: Setup,
    mode: str = "overlapped",
    *,
    channel: Channel | None = None,
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    timeout_s: float | None = None,
) -> threads.RunResult:
    """Train in `mode` ("sequential" or "overlapped", or a baseline: "end_to_end", "split_learning")
    from the initial states, or with `resume=True` from the latest checkpoint in `checkpoint_dir`;
    returns the whole run's metrics and final states.

    With a `checkpoint_dir`, both states are saved every `config.checkpoint_every` steps (the latest
    `config.keep_checkpoints` kept) and at the end. A resumed run continues bit-identically to one that
    never stopped, in either mode; resuming with a config that differs in a field that shapes training
    is refused (`ResumeMismatchError`). Ctrl-C stops both sides after the steps in flight, saves them
    and raises `RunInterrupted`; a NaN/inf loss raises `DivergenceError`, the last finite checkpoint kept.
    `channel` (overlapped only, e.g. a link.SimulatedLink) replaces the default instant queue of
    `queue_size` payloads.
    """
    if mode not in MODES + BASELINES:
        raise ConfigError(f"unknown mode {mode!r}; valid: {', '.join(MODES + BASELINES)}")
    if channel is not None and mode != "overlapped":
        raise ConfigError("a channel (simulated link) needs mode='overlapped'")
    if resume and checkpoint_dir is None:
        raise ConfigError("resume=True needs the checkpoint_dir to resume from")
    config = setup.config
    if mode in BASELINES:
        baseline, edge_state, cloud_state = build_baseline(setup, mode)
    else:
        edge_state, cloud_state = fresh_states(setup)
    checkpoints = (
        None
        if checkpoint_dir is None
        else RunCheckpoints(
            checkpoint_dir, keep=config.keep_checkpoints, read_only=resume and not Path(checkpoint_dir).is_dir()
        )
    )
    meta = None
    try:
        if resume:
            meta = checkpoints.read_meta()
            where = checkpoints.path(meta["step"])
            check_resumable(config, meta.get("config", {}), where)
            if mode != meta.get("mode") and (mode in BASELINES or meta.get("mode") in BASELINES):
                raise ResumeMismatchError(
                    f"cannot resume from {where}: it is a checkpoint of {meta.get('mode')} training, not {mode}"
                )
            if meta.get("precision", setup.precision) != setup.precision:  # "auto" on another backend
                raise ResumeMismatchError(
                    f"cannot resume from {where}: it was trained in precision "
                    f"{meta['precision']}, this run's resolves to {setup.precision}"
                )
            if meta.get("total_steps") != setup.total_steps:
                raise ResumeMismatchError(
                    f"cannot resume from {where}: it belongs to a run of {meta.get('total_steps')} "
                    f"steps, this one has {setup.total_steps} (has the data set changed?)"
                )
            edge_state, cloud_state, meta = checkpoints.restore(edge_state, cloud_state, meta["step"])
        elif checkpoints is not None and checkpoints.steps():
            raise ConfigError(
                f"{checkpoints.directory} already holds checkpoints {checkpoints.steps()}: pass "
                f"resume=True to continue that run, or another checkpoint_dir"
            )
        start = 0 if meta is None else int(meta["step"])
        edge_before, cloud_before, steps_before = _history(meta)
        wall_before = 0.0 if meta is None else float(meta.get("wall_s", 0.0))
        saved: dict[str, Any] = {"step": start, "path": None if meta is None else checkpoints.path(start)}

        def save(step, edge, cloud, edge_new, cloud_new, cloud_steps_new, wall_s):
            """Checkpoint `step`, unless a loss or parameter on either side is already non-finite."""
            edge_steps = np.arange(start, start + len(edge_new.get("loss", ())))
            for side, metrics, at in (("edge", edge_new, edge_steps), ("cloud", cloud_new, cloud_steps_new)):
                bad = np.flatnonzero(~np.isfinite(metrics.get("loss", np.zeros(0))))
                if bad.size:
                    raise DivergenceError(side, int(at[bad[0]]), float(metrics["loss"][bad[0]]), saved["path"])
            for side, state in (("edge", edge), ("cloud", cloud)):
                if not bool(_all_finite(state)):
                    raise DivergenceError(side, step - 1, float("nan"), saved["path"])
            if step in checkpoints.steps():  # this run saved it already, then was interrupted before noting it
                saved.update(step=step, path=checkpoints.path(step))
                return
            record = _meta(
                setup,
                mode,
                step,
                _joined(edge_before, edge_new),
                _joined(cloud_before, cloud_new),
                np.concatenate([steps_before, cloud_steps_new]),
                wall_s,
            )
            saved.update(step=step, path=checkpoints.save(step, edge, cloud, record))

        def on_snapshot(snap: supervisor.Snapshot) -> None:
            save(
                snap.step,
                snap.edge_state,
                snap.cloud_state,
                snap.edge_metrics,
                snap.cloud_metrics,
                snap.cloud_steps,
                wall_before + time.perf_counter() - started,
            )

        every = config.checkpoint_every if checkpoints is not None else 0
        batches = TrainBatches(setup, start)
        started = time.perf_counter()
        kwargs = dict(
            start_step=start,
            snapshot_every=every,
            on_snapshot=on_snapshot if every else None,
            timeout_s=timeout_s,
            progress=progress,
        )
        try:
            if mode in BASELINES:
                result = baselines.run_baseline(baseline, edge_state, cloud_state, batches, **kwargs)
            elif mode == "sequential":
                result = threads.run_sequential(setup.hierarchy, edge_state, cloud_state, batches, **kwargs)
            else:
                channel = QueueChannel(config.queue_size) if channel is None else channel
                result = threads.run_overlapped(
                    setup.hierarchy, edge_state, cloud_state, batches, channel=channel, **kwargs
                )
        except DivergenceError as error:
            raise DivergenceError(error.side, error.step, error.value, saved["path"]) from None
        wall_s = wall_before + result.wall_s
        if checkpoints is not None and result.end_step > saved["step"]:
            save(
                result.end_step,
                result.edge_state,
                result.cloud_state,
                result.edge_metrics,
                result.cloud_metrics,
                result.cloud_steps,
                wall_s,
            )
    finally:
        if checkpoints is not None:
            checkpoints.close()
    if result.interrupted and result.end_step < setup.total_steps:
        raise RunInterrupted(result.end_step, saved["path"])
    return dataclasses.replace(
        result,
        edge_metrics=_joined(edge_before, result.edge_metrics),
        cloud_metrics=_joined(cloud_before, result.cloud_metrics),
        cloud_steps=np.concatenate([steps_before, result.cloud_steps]),
        wall_s=wall_s,
        start_step=start,
        # A resumed run that was already complete ran no step: its payload size comes from the shapes
        # (always, for the baselines: what their link carries includes the labels).
        payload_bytes=payload_nbytes(setup, mode)
        if mode in BASELINES or not result.payload_bytes
        else result.payload_bytes,
        mode=mode,
    )


def payload_nbytes(setup: Setup, mode: str) -> int:
    """Bytes one training batch sends over the link in `mode`, as the cost model counts them (split
    learning: float32 features and the labels up, the float32 gradient down; end-to-end: no split, 0)."""
    if mode == "end_to_end":
        return 0
    c, s = setup.config, setup.split
    payload, activation, gradient = quantization.split_bytes(s.feature_shape, c.batch_size, (c.bits,), s.num_classes)
    return activation + gradient if mode == "split_learning" else payload[c.bits]


def evaluate(setup: Setup, result: threads.RunResult) -> dict[str, float | None]:
    """Edge-exit and cloud-exit accuracy of a run's final states on the test split (a baseline, by the
    mode `train` recorded in the result, has no edge exit: its edge_accuracy is None)."""
    batches = eval_batches(setup.dataset, setup.config.batch_size, device=setup.hierarchy.edge_device)
    if result.mode in BASELINES:
        baseline, _, _ = build_baseline(setup, result.mode)
        return {
            "edge_accuracy": None,
            **baselines.evaluate_baseline(baseline, result.edge_state, result.cloud_state, batches),
        }
    return evaluate_exits(setup.hierarchy, result.edge_state, result.cloud_state, batches)
