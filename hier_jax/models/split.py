"""Cutting a StagedNet at a separation point into an edge part and a cloud part.

The edge part holds the stages up to and including the point plus an early-exit head; the cloud part
holds the remaining stages plus the model's final classifier. Both parts reference the very stage
objects of the unsplit model (no copies), so edge.features followed by cloud reproduces the model.

Default early-exit head: one 3x3 conv-BN-ReLU (128 channels), average pooling to a 4x4 grid, one
linear layer. One conv gives the exit some processing of its own on top of a linear probe (a probe on
early VGG/ResNet features is weak); pooling to a small grid rather than to 1x1 keeps where things
are, which early features (edges, strokes) need to be told apart, much as the internal classifiers
of shallow-deep networks (Kaya et al., ICML 2019) pool to a few cells. The head stays small next to
the edge's stages: the edge is the constrained side, and the head's parameters, optimizer state and
activations all count against its memory. `ExitHeadConfig(convs=0, grid=1)` gives a plain linear
probe on globally pooled features; more convs a deeper exit.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from hier_jax import precision as _precision
from hier_jax.models import xla_cpu
from hier_jax.models.layers import ConvBNReLU, linear
from hier_jax.models.staged import StagedNet, check_images


@dataclasses.dataclass(frozen=True)
class ExitHeadConfig:
    channels: int = dataclasses.field(default=128, metadata={"help": "early-exit head: conv channels"})
    convs: int = dataclasses.field(default=1, metadata={"help": "early-exit head: 3x3 conv-BN-ReLU layers"})
    grid: int = dataclasses.field(default=4, metadata={"help": "early-exit head: average-pool to grid x grid cells"})


def pool_grid(height: int, width: int, grid: int) -> tuple[int, int]:
    """Cells per side after pooling: the largest divisors of the map size that are <= grid."""
    return (
        max(g for g in range(1, min(grid, height) + 1) if height % g == 0),
        max(g for g in range(1, min(grid, width) + 1) if width % g == 0),
    )


class ExitHead(nnx.Module):
    """Early-exit classifier: `convs` x (3x3 conv-BN-ReLU), average pooling to a grid, linear."""

    def __init__(self, feature_shape: tuple[int, ...], num_classes: int, config: ExitHeadConfig, *, rngs: nnx.Rngs):
        if config.convs < 0 or config.channels < 1 or config.grid < 1:
            raise ValueError(f"invalid exit head {config}: need convs >= 0, channels >= 1, grid >= 1")
        height, width, cin = feature_shape
        layers = []
        for _ in range(config.convs):
            layers.append(ConvBNReLU(cin, config.channels, 3, bias=False, rngs=rngs))
            cin = config.channels
        self.convs = nnx.List(layers)
        self.grid = pool_grid(height, width, config.grid)
        self.linear = linear(cin * self.grid[0] * self.grid[1], num_classes, rngs=rngs)

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for layer in self.convs:
            x = layer(x, train)
        b, h, w, c = x.shape
        gh, gw = self.grid
        cells = x.reshape(b, gh, h // gh, gw, w // gw, c).mean(axis=(2, 4))
        return self.linear(cells.reshape(b, -1))


class EdgeNet(nnx.Module):
    """Stages before the separation point, plus the early exit (None for vanilla split learning).

    `precision`: the policy its layers compute in (split() passes the backbone's; the steps' builders
    read it)."""

    def __init__(
        self,
        stages: list[nnx.Module],
        head: ExitHead | None,
        input_shape: tuple[int, ...],
        precision: str | None = None,
    ):
        self.stages = nnx.List(stages)
        self.head = head
        self.input_shape = tuple(input_shape)
        self.precision = _precision.resolve(precision).name if precision else _precision.build_policy().name

    def features(self, images_BHWC: jax.Array, train: bool) -> jax.Array:
        check_images(images_BHWC, self.input_shape)
        x = images_BHWC
        for stage in self.stages:
            x = stage(x, train)
        return x

    def __call__(self, images_BHWC: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
        """(early-exit logits, feature map sent to the cloud)."""
        features = self.features(images_BHWC, train)
        assert self.head is not None  # an edge without an early exit (vanilla) is run through features()
        return self.head(features, train), features


class CloudNet(nnx.Module):
    """Stages after the separation point plus the final classifier."""

    def __init__(
        self,
        stages: list[nnx.Module],
        classifier: nnx.Module,
        feature_shape: tuple[int, ...],
        precision: str | None = None,
    ):
        self.stages = nnx.List(stages)
        self.classifier = classifier
        self.feature_shape = tuple(feature_shape)
        self.precision = _precision.resolve(precision).name if precision else _precision.build_policy().name

    def __call__(self, features_BHWC: jax.Array, train: bool) -> jax.Array:
        check_images(features_BHWC, self.feature_shape)
        x = features_BHWC
        for stage in self.stages:
            x = stage(x, train)
        return self.classifier(x, train)


@dataclasses.dataclass(frozen=True)
class Split:
    """The two parts of a model cut after stage `point` (index `index` in model.stage_names)."""

    edge: EdgeNet
    cloud: CloudNet
    point: str
    index: int
    feature_shape: tuple[int, ...]  # per example, (H, W, C)
    num_classes: int


class NamedStages(Protocol):
    """What `resolve_point` reads of a model: hier-jax's StagedNet and torch_ref's twin both have it."""

    @property
    def arch(self) -> str: ...

    @property
    def stage_names(self) -> tuple[str, ...]: ...


def resolve_point(model: NamedStages, point: str | int) -> int:
    """Index of the last edge stage; ValueError listing the valid names for anything else."""
    names = model.stage_names
    if isinstance(point, str) and point in names:
        return names.index(point)
    if isinstance(point, int) and not isinstance(point, bool) and 0 <= point < len(names):
        return point
    raise ValueError(
        f"invalid separation point {point!r} for {model.arch}; valid points (the last edge "
        f"stage, by name or index 0..{len(names) - 1}): {', '.join(names)}"
    )


def stage_output_shape(model: StagedNet, index: int) -> tuple[int, ...]:
    """Per-example shape (H, W, C) of the output of stage `index`, without running the model."""
    probe = jax.ShapeDtypeStruct((1, *model.input_shape), jnp.float32)
    out = jax.eval_shape(lambda x: model.features(x, False, stop=index + 1), probe)
    return tuple(out.shape[1:])


def split(
    model: StagedNet, point: str | int, head: ExitHeadConfig | None = ExitHeadConfig(), *, seed: int = 0
) -> Split:
    """Cut `model` after stage `point`; `head=None` leaves the edge without an early exit."""
    index = resolve_point(model, point)
    feature_shape = stage_output_shape(model, index)
    stages = list(model.stages)
    # The head computes as the backbone does: same convolution formulation, same precision policy.
    with xla_cpu.conv_impl(model.conv_impl), _precision.building(model.precision):
        exit_head = None if head is None else ExitHead(feature_shape, model.num_classes, head, rngs=nnx.Rngs(seed))
    edge = EdgeNet(stages[: index + 1], exit_head, model.input_shape, model.precision)
    cloud = CloudNet(stages[index + 1 :], model.classifier, feature_shape, model.precision)
    return Split(edge, cloud, model.stage_names[index], index, feature_shape, model.num_classes)
