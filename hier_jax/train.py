"""Training as a library: from an ExperimentConfig and a data set to trained edge and cloud states.

Experiments stay thin: they build a config, call `build` once, then `train` in the scheme and
schedule they want (several runs of one build share its compiled steps and start from the same
initial states; the baselines start from the very weights of the hierarchy's stages).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from pathlib import Path

import jax

from hier_jax import quantization, steps
from hier_jax.config import SCHEDULES, SCHEMES, ExperimentConfig, as_run, validate
from hier_jax.data import ImageDataset, eval_batches, num_train_steps, raw_train_batches, train_batches
from hier_jax.devices import place
from hier_jax.errors import ConfigError, check
from hier_jax.models import Split, StagedNet, build_model, check_input_size, split
from hier_jax.optim import make_optimizer
from hier_jax.run import baselines, driver
from hier_jax.run.evaluate import evaluate as evaluate_exits
from hier_jax.run.hierarchy import Hierarchy, build_hierarchy
from hier_jax.run.result import RunResult

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
    compiled steps. `total_steps` is each edge's: the fewest steps any edge's shard gives."""
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
    # Each edge takes n_steps steps on its shard, the cloud one per edge step: each side's learning-rate
    # schedule spans its own steps (with one edge, both the run's).
    n_steps = driver.steps_per_edge(config, driver.shards_of(config, dataset))
    hierarchy, edge_state, cloud_state = build_hierarchy(
        parts,
        bits=config.bits,
        edge_tx=make_optimizer(config.edge_optimizer, n_steps),
        cloud_tx=make_optimizer(config.cloud_optimizer, n_steps * config.edges),
        edge_device=config.edge_device,
        cloud_device=config.cloud_device,
    )
    return Setup(config, dataset, model, parts, hierarchy, edge_state, cloud_state, n_steps)


class TrainBatches:
    """The run's batches from step `start` on, epoch after epoch, cut at the step count.

    Step k is batch k % steps_per_epoch of epoch k // steps_per_epoch, shuffled and augmented by
    (seed, epoch, step) alone, so the batches from `start` on are exactly those an uninterrupted run
    sees there: the position in the data and the RNG state are both the step number. `raw`: the
    batches as stored (uint8 images, labels, counters on the host), for whoever augments them.
    """

    def __init__(self, setup: Setup, start: int = 0, raw: bool = False):
        self.setup, self.start, self.raw = setup, start, raw

    def __len__(self) -> int:
        return max(self.setup.total_steps - self.start, 0)

    def __iter__(self) -> Iterator:
        c = self.setup.config
        per_epoch = num_train_steps(self.setup.dataset, c.batch_size)
        first_epoch, skip = divmod(self.start, per_epoch)
        ds, device = self.setup.dataset, self.setup.hierarchy.edge_device
        epochs = (
            raw_train_batches(ds, c.batch_size, seed=c.seed, epoch=e, start=skip if e == first_epoch else 0)
            if self.raw
            else train_batches(
                ds, c.batch_size, seed=c.seed, epoch=e, device=device, start=skip if e == first_epoch else 0
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
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    timeout_s: float | None = None,
    evaluate: bool = False,
) -> RunResult:
    """Train the run `setup.config` describes (its scheme, schedule, edges, link, ...; `scheme` and
    `schedule` override the config's) with every worker on a thread of this process, from the initial
    states, or with `resume=True` from the latest checkpoint in `checkpoint_dir`; the whole run's result.

    With a `checkpoint_dir`, every worker's state is saved every `config.checkpoint_every` steps (the
    latest `config.keep_checkpoints` kept) and at the end. A resumed run continues bit-identically to
    one that never stopped, in either schedule; resuming with a config that differs in a field that
    shapes training is refused (`ResumeMismatchError`). Ctrl-C stops every side after the steps in
    flight, saves them and raises `RunInterrupted`; a NaN/inf loss raises `DivergenceError`, the last
    finite checkpoint kept. `evaluate` tests both exits of every edge at the end (`train.evaluate`
    does it later from the result's states).
    """
    config = setup.config
    scheme = config.scheme if scheme is None else scheme
    schedule = config.schedule if schedule is None else schedule
    check(scheme in SCHEMES, "--scheme", scheme, ", ".join(SCHEMES))
    check(schedule in SCHEDULES, "--schedule", schedule, ", ".join(SCHEDULES))
    if resume and checkpoint_dir is None:
        raise ConfigError("resume=True needs the checkpoint_dir to resume from")
    run_setup = dataclasses.replace(setup, config=as_run(dataclasses.replace(config, scheme=scheme, schedule=schedule)))
    return driver.in_process(
        run_setup,
        progress=progress,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        timeout_s=timeout_s,
        evaluate=evaluate,
    )


def payload_nbytes(setup: Setup, scheme: str) -> int:
    """Bytes one training batch sends over the link in `scheme`, as the cost model counts them (split
    learning: float32 features and the labels up, the float32 gradient down; end-to-end: no split, 0)."""
    if scheme == "end_to_end":
        return 0
    c, s = setup.config, setup.split
    payload, activation, gradient = quantization.split_bytes(s.feature_shape, c.batch_size, (c.bits,), s.num_classes)
    return activation + gradient if scheme == "split_learning" else payload[c.bits]


def evaluate(setup: Setup, result: RunResult) -> dict[str, float | None]:
    """Edge-exit and cloud-exit accuracy of an in-process run's final states (edge 0's) on the test
    split (a baseline has no edge exit: its edge_accuracy is None)."""
    batches = eval_batches(setup.dataset, setup.config.batch_size, device=setup.hierarchy.edge_device)
    if result.scheme in BASELINES:
        baseline, _, _ = build_baseline(setup, result.scheme)
        return {
            "edge_accuracy": None,
            **baselines.evaluate_baseline(baseline, result.edge_state, result.cloud_state, batches),
        }
    return dict(evaluate_exits(setup.hierarchy, result.edge_state, result.cloud_state, batches))
