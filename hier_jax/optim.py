"""Optimizers for the edge and the cloud: SGD with momentum, coupled weight decay, and a schedule.

Weight decay is added to the gradient before momentum, as PyTorch's SGD does, so runs and weights are
comparable across the two frameworks. Edge and cloud each get their own instance (own state, own
device); they may differ in learning rate.
"""

from __future__ import annotations

import dataclasses

import optax

LR_SCHEDULES = ("cosine", "constant")


def _doc(default, text: str, **more):
    return dataclasses.field(default=default, metadata={"help": text, **more})


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = _doc(0.05, "SGD learning rate")
    momentum: float = _doc(0.9, "SGD momentum")
    weight_decay: float = _doc(5e-4, "weight decay, added to the gradient before momentum")
    lr_schedule: str = _doc("cosine", "cosine (decay to 0 over the run) | constant", alias_suffixes=("schedule",))
    warmup_steps: int = _doc(0, "linear warm-up steps before the cosine decay")
    nesterov: bool = _doc(False, "Nesterov momentum")


def make_optimizer(config: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """SGD(momentum, optionally Nesterov) on grad + weight_decay * param; cosine decays to 0 over
    `total_steps` (after `warmup_steps` of linear warm-up from 0)."""
    if config.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {config.lr_schedule!r}; valid: {', '.join(LR_SCHEDULES)}")
    if config.learning_rate <= 0 or total_steps < 1:
        raise ValueError(f"need learning_rate > 0 and total_steps >= 1, got {config.learning_rate}, {total_steps}")
    if config.lr_schedule == "cosine" and config.warmup_steps > 0:
        learning_rate = optax.warmup_cosine_decay_schedule(
            0.0, config.learning_rate, config.warmup_steps, max(total_steps, config.warmup_steps + 1)
        )
    elif config.lr_schedule == "cosine":
        learning_rate = optax.cosine_decay_schedule(config.learning_rate, total_steps)
    else:
        learning_rate = config.learning_rate
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(learning_rate, momentum=config.momentum, nesterov=config.nesterov),
    )
