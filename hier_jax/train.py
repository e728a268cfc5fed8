"""Training as a library: from an ExperimentConfig and a data set to trained edge and cloud states.

Experiments stay thin: they build a config, call `build` once, then `train` in the scheme and
schedule they want (several runs of one build share its compiled steps and start from the same
initial states; the baselines start from the very weights of the hierarchy's stages).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax

from hier_jax import quantization, steps
from hier_jax.config import SCHEDULES, SCHEMES, ExperimentConfig, validate
from hier_jax.data import ImageDataset, eval_batches, num_train_steps, train_batches
from hier_jax.devices import place
from hier_jax.errors import ConfigError, DivergenceError, RunInterrupted, check
from hier_jax.link import Channel, QueueChannel, SimulatedLink
from hier_jax.models import Split, StagedNet, build_model, check_input_size, split
from hier_jax.optim import make_optimizer
from hier_jax.run import baselines, record, supervisor, threads
from hier_jax.run.checkpoint import RunCheckpoints
from hier_jax.run.evaluate import evaluate as evaluate_exits
from hier_jax.run.hierarchy import Hierarchy, build_hierarchy

BASELINES = ("end_to_end", "split_learning")
"""The paper's comparisons, trained from the same Setup (same initial weights of every stage, same
batches, same checkpoints and resume) with `train(setup, scheme="end_to_end")` or "split_learning"."""


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
    parts = split(model, config.split, config.head, seed=config.seed)
    n_steps = total_steps(config, dataset)
    hierarchy, edge_state, cloud_state = build_hierarchy(
        parts,
        bits=config.bits,
        edge_tx=make_optimizer(config.edge_optimizer, n_steps),
        cloud_tx=make_optimizer(config.cloud_optimizer, n_steps),
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
    cloud_tx = make_optimizer(config.cloud_optimizer, n_steps)
    if scheme == "end_to_end":
        return baselines.build_end_to_end(setup.model, cloud_tx, device=config.cloud_device)
    if scheme == "split_learning":
        return baselines.build_split_learning(
            split(setup.model, setup.split.point, head=None),
            edge_tx=make_optimizer(config.edge_optimizer, n_steps),
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


def train(
    setup: Setup,
    *,
    scheme: str | None = None,
    schedule: str | None = None,
    channel: Channel | None = None,
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    timeout_s: float | None = None,
) -> threads.RunResult:
    """Train from the initial states, or with `resume=True` from the latest checkpoint in
    `checkpoint_dir`; returns the whole run's record and final states.

    `scheme` (hierarchical, end_to_end, split_learning) and `schedule` (sequential, pipelined: the
    hierarchy's edge runs ahead of the cloud; the baselines are sequential) default to the config's.
    With a `checkpoint_dir`, both states are saved every `config.checkpoint_every` steps (the latest
    `config.keep_checkpoints` kept) and at the end. A resumed run continues bit-identically to one that
    never stopped, in either schedule; resuming with a config that differs in a field that shapes
    training is refused (`ResumeMismatchError`). Ctrl-C stops both sides after the steps in flight,
    saves them and raises `RunInterrupted`; a NaN/inf loss raises `DivergenceError`, the last finite
    checkpoint kept. `channel` (pipelined hierarchical training; default: the config's link, else an
    instant queue of `queue_size` payloads) carries the payloads.
    """
    config = setup.config
    scheme = config.scheme if scheme is None else scheme
    schedule = config.schedule if schedule is None else schedule
    check(scheme in SCHEMES, "--scheme", scheme, ", ".join(SCHEMES))
    check(schedule in SCHEDULES, "--schedule", schedule, ", ".join(SCHEDULES))
    if scheme in BASELINES:
        schedule = "sequential"  # a baseline's sides never overlap: split learning waits for the gradient
    if channel is None and scheme == "hierarchical" and schedule == "pipelined":
        channel = link_channel(config)
    if channel is not None and not (scheme == "hierarchical" and schedule == "pipelined"):
        raise ConfigError("a channel (a simulated link) needs the hierarchical scheme and the pipelined schedule")
    if resume and checkpoint_dir is None:
        raise ConfigError("resume=True needs the checkpoint_dir to resume from")
    run_config = dataclasses.replace(config, scheme=scheme, schedule=schedule)
    if scheme in BASELINES:
        baseline, edge_state, cloud_state = build_baseline(setup, scheme)
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
            assert checkpoints is not None
            meta = record.read_meta(checkpoints.read_meta())
            record.check_resumable(
                meta,
                config=run_config,
                scheme=scheme,
                precision=setup.precision,
                total_steps=setup.total_steps,
                where=checkpoints.path(meta["step"]),
            )
            edge_state, cloud_state, _ = checkpoints.restore(edge_state, cloud_state, meta["step"])
        elif checkpoints is not None and checkpoints.steps():
            raise ConfigError(
                f"{checkpoints.directory} already holds checkpoints {checkpoints.steps()}: pass "
                f"resume=True to continue that run, or another checkpoint_dir"
            )
        start = 0 if meta is None else int(meta["step"])
        before = record.record_of(meta)
        wall_before = 0.0 if meta is None else float(meta.get("wall_s", 0.0))
        saved: dict[str, Any] = {"step": start, "path": None}
        if meta is not None:
            assert checkpoints is not None  # meta is read from them
            saved["path"] = checkpoints.path(start)
        per_epoch = num_train_steps(setup.dataset, config.batch_size)

        def save(step: int, edge, cloud, new: record.RunRecord, wall_s: float) -> None:
            """Checkpoint `step`, unless a loss or parameter on either side is already non-finite."""
            assert checkpoints is not None
            for entry in new.edges:
                for t, loss in zip(entry["step"], entry["loss"], strict=True):
                    record.check_finite("edge", t, loss, last_checkpoint=saved["path"])
            for t, loss in zip(new.cloud["step"], new.cloud["loss"], strict=True):
                record.check_finite("cloud", t, loss, last_checkpoint=saved["path"])
            for side, state in (("edge", edge), ("cloud", cloud)):
                if not record.tree_is_finite(state):
                    raise DivergenceError(side, step - 1, float("nan"), saved["path"])
            if step in checkpoints.steps():  # this run saved it already, then was interrupted before noting it
                saved.update(step=step, path=checkpoints.path(step))
                return
            written = record.run_meta(
                step=step,
                total_steps=setup.total_steps,
                scheme=scheme,
                schedule=schedule,
                precision=setup.precision,
                config=run_config,
                record=before.joined(new),
                wall_s=wall_s,
                steps_per_epoch=per_epoch,
            )
            saved.update(step=step, path=checkpoints.save(step, edge, cloud, written))

        def on_snapshot(snap: supervisor.Snapshot) -> None:
            save(snap.step, snap.edge_state, snap.cloud_state, snap.record, wall_before + time.perf_counter() - started)

        every = config.checkpoint_every if checkpoints is not None else 0
        batches = TrainBatches(setup, start)
        started = time.perf_counter()
        kwargs: dict[str, Any] = dict(
            start_step=start,
            snapshot_every=every,
            on_snapshot=on_snapshot if every else None,
            timeout_s=timeout_s,
            progress=progress,
        )
        try:
            if scheme in BASELINES:
                result = baselines.run_baseline(baseline, edge_state, cloud_state, batches, **kwargs)
            elif schedule == "sequential":
                result = threads.run_sequential(setup.hierarchy, edge_state, cloud_state, batches, **kwargs)
            else:
                result = threads.run_pipelined(
                    setup.hierarchy,
                    edge_state,
                    cloud_state,
                    batches,
                    channel=QueueChannel(config.queue_size) if channel is None else channel,
                    **kwargs,
                )
        except DivergenceError as error:
            raise error.with_checkpoint(saved["path"]) from None
        wall_s = wall_before + result.wall_s
        if checkpoints is not None and result.end_step > saved["step"]:
            save(result.end_step, result.edge_state, result.cloud_state, result.record, wall_s)
    finally:
        if checkpoints is not None:
            checkpoints.close()
    if result.interrupted and result.end_step < setup.total_steps:
        raise RunInterrupted(result.end_step, saved["path"])
    return dataclasses.replace(
        result,
        record=before.joined(result.record),
        wall_s=wall_s,
        start_step=start,
        # A resumed run that was already complete ran no step: its payload size comes from the shapes
        # (always, for the baselines: what their link carries includes the labels).
        payload_bytes=payload_nbytes(setup, scheme)
        if scheme in BASELINES or not result.payload_bytes
        else result.payload_bytes,
        scheme=scheme,
        schedule=schedule,
    )


def link_channel(config: ExperimentConfig) -> SimulatedLink | None:
    """The simulated link the config asks for (one edge: the first preset), or None."""
    link = config.link.preset(0)
    if link is None:
        return None
    return SimulatedLink(
        link, capacity=config.link.buffer, outages=config.link.outages, time_scale=config.link.time_scale
    )


def payload_nbytes(setup: Setup, scheme: str) -> int:
    """Bytes one training batch sends over the link in `scheme`, as the cost model counts them (split
    learning: float32 features and the labels up, the float32 gradient down; end-to-end: no split, 0)."""
    if scheme == "end_to_end":
        return 0
    c, s = setup.config, setup.split
    payload, activation, gradient = quantization.split_bytes(s.feature_shape, c.batch_size, (c.bits,), s.num_classes)
    return activation + gradient if scheme == "split_learning" else payload[c.bits]


def evaluate(setup: Setup, result: threads.RunResult) -> dict[str, float | None]:
    """Edge-exit and cloud-exit accuracy of a run's final states on the test split (a baseline, by the
    scheme `train` recorded in the result, has no edge exit: its edge_accuracy is None)."""
    batches = eval_batches(setup.dataset, setup.config.batch_size, device=setup.hierarchy.edge_device)
    if result.scheme in BASELINES:
        baseline, _, _ = build_baseline(setup, result.scheme)
        return {
            "edge_accuracy": None,
            **baselines.evaluate_baseline(baseline, result.edge_state, result.cloud_state, batches),
        }
    return dict(evaluate_exits(setup.hierarchy, result.edge_state, result.cloud_state, batches))
