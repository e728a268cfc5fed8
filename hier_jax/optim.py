"""Optimizers for the edge and the cloud: SGD with momentum, coupled weight decay, and a schedule.

Weight decay is added to the gradient before momentum, as PyTorch's SGD does, so runs and weights are
comparable across the two frameworks. Edge and cloud each get their own instance (own state, own
device); they may differ in learning rate.
"""

from __future__ import annotations

import dataclasses

import optax

SCHEDULES = ("cosine", "constant")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_steps: int = 0
    nesterov: bool = False


def make_optimizer(config: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """SGD(momentum, optionally Nesterov) on grad + weight_decay * param; cosine decays to 0 over
    `total_steps` (after `warmup_steps` of linear warm-up from 0)."""
    if config.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {config.schedule!r}; valid: {', '.join(SCHEDULES)}")
    if config.learning_rate <= 0 or total_steps < 1:
        raise ValueError(f"need learning_rate > 0 and total_steps >= 1, got {config.learning_rate}, {total_steps}")
    if config.schedule == "cosine" and config.warmup_steps > 0:
        learning_rate = optax.warmup_cosine_decay_schedule(
            0.0, config.learning_rate, config.warmup_steps, max(total_steps, config.warmup_steps + 1)
        )
    elif config.schedule == "cosine":
        learning_rate = optax.cosine_decay_schedule(config.learning_rate, total_steps)
    else:
        learning_rate = config.learning_rate
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(learning_rate, momentum=config.momentum, nesterov=config.nesterov),
    )
