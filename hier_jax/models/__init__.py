"""Backbones as named stages, the registry that builds them, and the edge/cloud split."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
from flax import nnx

from hier_jax import precision as _precision
from hier_jax.models import xla_cpu
from hier_jax.models.resnet import resnet18
from hier_jax.models.split import (
    CloudNet,
    EdgeNet,
    ExitHead,
    ExitHeadConfig,
    Split,
    resolve_point,
    split,
    stage_output_shape,
)
from hier_jax.models.staged import StagedNet, check_images
from hier_jax.models.vgg import vgg16

MODELS: dict[str, Callable[..., StagedNet]] = {
    "vgg16": vgg16,
    "resnet18": functools.partial(resnet18, stem="cifar"),
    "resnet18_tv": functools.partial(resnet18, stem="imagenet"),
}


def build_model(
    name: str,
    *,
    num_classes: int,
    input_shape: tuple[int, ...],
    width: int = 64,
    seed: int = 0,
    conv_impl: str | None = None,
    precision: str | None = None,
) -> StagedNet:
    """Build a registered backbone; `width` 64 is the paper's size, smaller values narrow every layer.

    `conv_impl` (xla_cpu.CONV_IMPLS; default xla_cpu.default_impl(), normally "auto") fixes how its
    convolutions and pools compute; the model keeps the resolved choice as `model.conv_impl`.
    `precision` (hier_jax.precision.POLICIES; default "fp32") fixes the dtype its activations are
    computed in (parameters are float32 in every policy); the model keeps the resolved policy's name
    as `model.precision`, which split() and the steps' builders follow."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    if width < 1:
        raise ValueError(f"width must be a positive channel count, got {width}")
    with xla_cpu.conv_impl(xla_cpu.resolve_impl(conv_impl)), _precision.building(precision or _precision.DEFAULT):
        return MODELS[name](num_classes, tuple(input_shape), width=width, rngs=nnx.Rngs(seed))


def check_input_size(model: StagedNet) -> None:
    """ValueError if an input of the model's shape shrinks to an empty feature map at some stage
    (VGG-16 below 32x32: its classifier would average nothing and train on NaN)."""
    for index, stage in enumerate(model.stage_names):
        if 0 in stage_output_shape(model, index)[:2]:
            height, width = model.input_shape[:2]
            raise ValueError(
                f"{height}x{width} images are too small for {model.arch}: stage {stage} would "
                f"output an empty feature map"
            )


@functools.cache
def stage_names(name: str) -> tuple[str, ...]:
    """The separation points of a registered backbone, from an abstract build (no arrays allocated)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    with xla_cpu.conv_impl("xla"):  # no probe: the names do not depend on it
        return nnx.eval_shape(lambda: MODELS[name](2, (32, 32, 3), width=1, rngs=nnx.Rngs(0))).stage_names


def param_count(module: nnx.Module) -> int:
    """Trainable parameters (nnx.Param leaves; BatchNorm running statistics are not parameters)."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


__all__ = [
    "MODELS",
    "CloudNet",
    "EdgeNet",
    "ExitHead",
    "ExitHeadConfig",
    "Split",
    "StagedNet",
    "build_model",
    "check_images",
    "check_input_size",
    "param_count",
    "resolve_point",
    "resnet18",
    "split",
    "stage_names",
    "stage_output_shape",
    "vgg16",
]
