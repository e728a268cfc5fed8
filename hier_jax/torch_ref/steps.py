"""The hier-jax train steps in PyTorch: edge (early-exit loss only), cloud, end-to-end.

Same semantics as hier_jax.steps + hier_jax.optim:
- SGD with momentum and weight decay added to the gradient before momentum on every parameter
  (torch.optim.SGD; optax.add_decayed_weights + optax.sgd(momentum)); the first momentum buffer is
  the gradient itself on both sides;
- the learning-rate schedule of hier_jax.optim.make_optimizer (cosine to 0, optional linear warm-up,
  or constant) as a LambdaLR stepped after every update, so step t uses schedule(t) as optax does;
- edge: forward, early-exit cross-entropy, backward, update; the payload encodes the forward pass's
  features (before the update), detached: no gradient ever reaches the edge from the cloud;
- cloud: decode the payload, forward, cross-entropy, backward, update.

`autocast=torch.bfloat16` runs the forward pass + loss under torch.autocast (bf16 matmuls and
convolutions, float32 parameters and optimizer): PyTorch's counterpart of hier-jax's precision
policy "bf16"; the loss is float32 either way (logits cast first, as hier_jax.steps.cross_entropy).

`compile=True` runs the forward pass + loss (+ payload encode/decode) through torch.compile
(AOTAutograd compiles the backward too) and the optimizer step through torch.compile with a tensor
learning rate (so the schedule does not recompile it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hier_jax.optim import LR_SCHEDULES, OptimConfig
from hier_jax.torch_ref import quantization as tq


def schedule_fn(config: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate at step t, as hier_jax.optim.make_optimizer's schedule."""
    if config.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {config.lr_schedule!r}; valid: {', '.join(LR_SCHEDULES)}")
    if config.lr_schedule == "constant":
        return lambda t: 1.0
    warmup = config.warmup_steps
    if warmup > 0:
        decay = max(total_steps, warmup + 1) - warmup

        def warm_cosine(t: int) -> float:
            if t < warmup:
                return t / warmup
            return 0.5 * (1 + math.cos(math.pi * min(t - warmup, decay) / decay))

        return warm_cosine
    return lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total_steps) / total_steps))


def make_optimizer(
    module: nn.Module, config: OptimConfig, total_steps: int, *, tensor_lr: bool = False
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR]:
    """SGD(momentum, weight_decay, Nesterov as configured) over all parameters and its schedule (step it
    after each update)."""
    lr = torch.tensor(config.learning_rate) if tensor_lr else config.learning_rate
    opt = torch.optim.SGD(
        module.parameters(), lr=lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=config.nesterov
    )
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule_fn(config, total_steps))


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(-1) == labels).float().mean()


class _Step:
    """zero_grad -> forward/loss (maybe compiled) -> backward -> optimizer step -> schedule step."""

    def __init__(
        self,
        forward: Callable,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None,
        compile: bool,
        autocast: torch.dtype | None = None,
    ):
        self.optimizer, self.scheduler = optimizer, scheduler
        if autocast is not None:
            forward = _autocast(forward, autocast)
        self.forward = torch.compile(forward) if compile else forward
        self.opt_step = torch.compile(optimizer.step) if compile else optimizer.step

    def run(self, *args: Any) -> tuple:
        self.optimizer.zero_grad(set_to_none=True)
        loss, logits, labels, *extra = self.forward(*args)
        loss.backward()
        self.opt_step()
        if self.scheduler is not None:
            self.scheduler.step()
        return {"loss": loss.detach(), "accuracy": accuracy(logits.detach(), labels)}, *extra


def _autocast(forward: Callable, dtype: torch.dtype) -> Callable:
    """`forward` under torch.autocast(dtype) on the device of its first argument."""

    def autocast_forward(*args):
        with torch.autocast(device_type=args[0].device.type, dtype=dtype):
            return forward(*args)

    return autocast_forward


class EdgeStep(_Step):
    """(images_BCHW, labels) -> (payload, metrics): the edge's early-exit step; `feature_shape` is
    the per-example (H, W, C) of the cut (Split.feature_shape)."""

    def __init__(
        self,
        edge: nn.Module,
        optimizer,
        scheduler=None,
        *,
        bits: int,
        num_classes: int,
        feature_shape: tuple[int, ...],
        compile: bool = False,
        autocast: torch.dtype | None = None,
    ):
        tq.check_bits(bits)
        self.bits, self.num_classes, self.feature_shape = bits, num_classes, tuple(feature_shape)

        def forward(images, labels):
            logits, features = edge(images)
            payload = tq.encode(features, labels, bits, num_classes)
            return (
                cross_entropy(logits, labels),
                logits,
                labels,
                payload.data,
                payload.scale,
                payload.offset,
                payload.labels,
            )

        super().__init__(forward, optimizer, scheduler, compile, autocast)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[tq.Payload, dict]:
        metrics, data, scale, offset, wire_labels = self.run(images, labels)
        shape = (images.shape[0], *self.feature_shape)  # NHWC, as hier-jax's payload
        return tq.Payload(data, scale, offset, wire_labels, shape, self.bits), metrics


class CloudStep(_Step):
    """payload -> metrics: decode, forward, loss, backward, update."""

    def __init__(
        self,
        cloud: nn.Module,
        optimizer,
        scheduler=None,
        *,
        compile: bool = False,
        channels_last: bool = False,
        autocast: torch.dtype | None = None,
    ):
        def forward(data, scale, offset, wire_labels, shape, bits):
            features, labels = tq.decode(tq.Payload(data, scale, offset, wire_labels, shape, bits), channels_last)
            logits = cloud(features)
            return cross_entropy(logits, labels), logits, labels

        super().__init__(forward, optimizer, scheduler, compile, autocast)

    def __call__(self, payload: tq.Payload) -> dict:
        (metrics,) = self.run(payload.data, payload.scale, payload.offset, payload.labels, payload.shape, payload.bits)
        return metrics


class TrainStep(_Step):
    """(images_BCHW, labels) -> metrics for the unsplit model (end-to-end, cloud-only training)."""

    def __init__(
        self, model: nn.Module, optimizer, scheduler=None, *, compile: bool = False, autocast: torch.dtype | None = None
    ):
        def forward(images, labels):
            logits = model(images)
            return cross_entropy(logits, labels), logits, labels

        super().__init__(forward, optimizer, scheduler, compile, autocast)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        (metrics,) = self.run(images, labels)
        return metrics
