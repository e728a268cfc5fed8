"""Training as a library: from an ExperimentConfig and a data set to trained edge and cloud states.

Experiments stay thin: they build a config, call `build` once, then `train` in the mode they want
(several runs of one build share its compiled steps and start from the same initial states).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator

import jax

from hier_jax import runner, steps
from hier_jax.config import ExperimentConfig
from hier_jax.data import ImageDataset, eval_batches, num_train_steps, train_batches
from hier_jax.models import ExitHeadConfig, Split, StagedNet, build_model, split
from hier_jax.optim import OptimConfig, make_optimizer
from hier_jax.quantization import check_bits

MODES = ("sequential", "overlapped")


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything a run needs: the split model, compiled steps, initial states and the step count."""
    config: ExperimentConfig
    dataset: ImageDataset
    model: StagedNet
    split: Split
    hierarchy: runner.Hierarchy
    initial_edge_state: steps.State
    initial_cloud_state: steps.State
    total_steps: int


def total_steps(config: ExperimentConfig, dataset: ImageDataset) -> int:
    steps_all = config.epochs * num_train_steps(dataset, config.batch_size)
    return min(steps_all, config.max_steps) if config.max_steps > 0 else steps_all


def build(config: ExperimentConfig, dataset: ImageDataset) -> Setup:
    """Build and split the model, the optimizers and the compiled steps; validate the config early."""
    check_bits(config.bits)
    model = build_model(config.model, num_classes=dataset.num_classes, input_shape=dataset.image_shape,
                        width=config.width, seed=config.seed)
    parts = split(model, config.split, ExitHeadConfig(config.head_channels, config.head_convs, config.head_grid), seed=config.seed)
    n_steps = total_steps(config, dataset)
    if n_steps < 1:
        raise ValueError(f"no training steps: {config.epochs} epoch(s) of {dataset.num_train} images at "
                         f"batch size {config.batch_size}")
    tx = make_optimizer(OptimConfig(config.learning_rate, config.momentum, config.weight_decay), n_steps)
    hierarchy, edge_state, cloud_state = runner.build_hierarchy(
        parts, bits=config.bits, edge_tx=tx, cloud_tx=tx, edge_device=config.edge_device,
        cloud_device=config.cloud_device)
    return Setup(config, dataset, model, parts, hierarchy, edge_state, cloud_state, n_steps)


class TrainBatches:
    """The run's batches, epoch after epoch, cut at the step count; has a length for progress bars."""

    def __init__(self, setup: Setup):
        self.setup = setup

    def __len__(self) -> int:
        return self.setup.total_steps

    def __iter__(self) -> Iterator:
        c = self.setup.config
        epochs = (train_batches(self.setup.dataset, c.batch_size, seed=c.seed, epoch=e,
                                device=self.setup.hierarchy.edge_device) for e in itertools.count())
        return itertools.islice(itertools.chain.from_iterable(epochs), self.setup.total_steps)


def fresh_states(setup: Setup) -> tuple[steps.State, steps.State]:
    """Copies of the initial states (the steps donate theirs), so every run starts from the same point."""
    h = setup.hierarchy
    return (jax.device_put(setup.initial_edge_state, h.edge_device, may_alias=False),
            jax.device_put(setup.initial_cloud_state, h.cloud_device, may_alias=False))


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


def train(setup: Setup, mode: str = "overlapped", *, channel: object = None, progress: bool = True
          ) -> runner.RunResult:
    """Train from the initial states in `mode` ("sequential" or "overlapped"); `channel` (overlapped
    only, e.g. a link.SimulatedLink) replaces the default instant queue of `queue_size` payloads."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
    if channel is not None and mode != "overlapped":
        raise ValueError("a channel (simulated link) needs mode='overlapped'")
    edge_state, cloud_state = fresh_states(setup)
    batches = TrainBatches(setup)
    if mode == "sequential":
        return runner.run_sequential(setup.hierarchy, edge_state, cloud_state, batches, progress=progress)
    channel = runner.QueueChannel(setup.config.queue_size) if channel is None else channel
    return runner.run_overlapped(setup.hierarchy, edge_state, cloud_state, batches, channel=channel,
                                 progress=progress)


def evaluate(setup: Setup, result: runner.RunResult) -> dict[str, float]:
    """Edge-exit and cloud-exit accuracy of a run's final states on the test split."""
    batches = eval_batches(setup.dataset, setup.config.batch_size, device=setup.hierarchy.edge_device)
    return runner.evaluate(setup.hierarchy, result.edge_state, result.cloud_state, batches)
