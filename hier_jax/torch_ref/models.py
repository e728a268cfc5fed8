"""The hier-jax backbones, split parts and early-exit head, hand-written in PyTorch.

Module for module and name for name the same as hier_jax.models (stages[i].conv / .bn, BasicBlock
conv1/bn1/conv2/bn2/shortcut_conv/shortcut_bn, classifier.linear, head.convs[i] / head.linear), so
that `port.py` can walk both trees by path. Tensors are NCHW here (PyTorch's convention; use
`channels_last` memory format for speed on CPU), NHWC in hier-jax; the math is the same:

- conv: bias kept on VGG, none on ResNet; padding k // 2 on both sides (hier-jax pads explicitly);
- BatchNorm2d(momentum=0.1, eps=1e-5), i.e. Flax's momentum 0.9. One known difference: PyTorch
  updates running_var with the unbiased batch variance (n / (n - 1) times the biased one, n = B*H*W),
  Flax with the biased one. Normalisation in train mode uses the biased variance on both sides, so
  outputs, losses and gradients agree; only the running variance drifts by that factor per update.
- max-pool pads with -inf on both sides (PyTorch implicitly, Flax explicitly);
- classifier: global average pooling, then Linear; the exit head pools to a grid of cells and
  flattens them in (row, column, channel) order, as hier-jax does on NHWC maps.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Framework-free pieces of the architecture come from hier-jax itself, so the twins cannot drift apart.
from hier_jax.models.split import ExitHeadConfig, pool_grid, resolve_point
from hier_jax.models.vgg import VGG16_BLOCKS

BN_MOMENTUM = 0.1  # PyTorch's sense: new = (1 - m) * old + m * batch; Flax momentum 0.9
BN_EPSILON = 1e-5


class ConvBNReLU(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, *, bias: bool):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=bias)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPSILON, momentum=BN_MOMENTUM)
        self.out_channels = cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class MaxPool(nn.Module):
    def __init__(self, window: int = 2, stride: int = 2, padding: int = 0):
        super().__init__()
        self.window, self.stride, self.padding = window, stride, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, self.window, self.stride, self.padding)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout, eps=BN_EPSILON, momentum=BN_MOMENTUM)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=BN_EPSILON, momentum=BN_MOMENTUM)
        if stride != 1 or cin != cout:
            self.shortcut_conv = nn.Conv2d(cin, cout, 1, stride, bias=False)
            self.shortcut_bn = nn.BatchNorm2d(cout, eps=BN_EPSILON, momentum=BN_MOMENTUM)
        else:
            self.shortcut_conv = None
            self.shortcut_bn = None
        self.out_channels = cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        if self.shortcut_conv is None:
            shortcut = x
        else:
            assert self.shortcut_bn is not None  # set together with shortcut_conv
            shortcut = self.shortcut_bn(self.shortcut_conv(x))
        return F.relu(y + shortcut)


class Classifier(nn.Module):
    def __init__(self, cin: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.mean(dim=(2, 3)))


class StagedNet(nn.Module):
    """stages[0] -> ... -> stages[-1] -> classifier; `input_shape` is (H, W, C) as in hier-jax."""

    def __init__(
        self,
        arch: str,
        stages: Sequence[tuple[str, nn.Module]],
        classifier: nn.Module,
        input_shape: tuple[int, ...],
        num_classes: int,
    ):
        super().__init__()
        self.arch = arch
        self.stage_names = tuple(name for name, _ in stages)
        self.stages = nn.ModuleList([module for _, module in stages])
        self.classifier = classifier
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes

    def features(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        for stage in list(self.stages)[start:stop]:
            x = stage(x)
        return x

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images_BCHW))


def vgg16(num_classes: int, input_shape: tuple[int, ...], *, width: int = 64) -> StagedNet:
    stages: list[tuple[str, nn.Module]] = []
    cin = input_shape[-1]
    for block, (channels, layers) in enumerate(VGG16_BLOCKS, start=1):
        cout = channels * width // 64
        for layer in range(1, layers + 1):
            stages.append((f"conv{block}_{layer}", ConvBNReLU(cin, cout, 3, bias=True)))
            cin = cout
        stages.append((f"pool{block}", MaxPool(2, 2)))
    return StagedNet("vgg16", stages, Classifier(cin, num_classes), input_shape, num_classes)


def resnet18(num_classes: int, input_shape: tuple[int, ...], *, width: int = 64, stem: str = "cifar") -> StagedNet:
    if stem not in ("cifar", "imagenet"):
        raise ValueError(f"unknown ResNet stem {stem!r}; valid stems: cifar, imagenet")
    cin = input_shape[-1]
    if stem == "cifar":
        stages: list[tuple[str, nn.Module]] = [("stem", ConvBNReLU(cin, width, 3, 1, bias=False))]
    else:
        stages = [("stem", ConvBNReLU(cin, width, 7, 2, bias=False)), ("maxpool", MaxPool(3, 2, padding=1))]
    cin = width
    for layer, multiple in enumerate((1, 2, 4, 8), start=1):
        cout = width * multiple
        for block in range(2):
            stride = 2 if (layer > 1 and block == 0) else 1
            stages.append((f"layer{layer}_{block}", BasicBlock(cin, cout, stride)))
            cin = cout
    arch = "resnet18" if stem == "cifar" else "resnet18_tv"
    return StagedNet(arch, stages, Classifier(cin, num_classes), input_shape, num_classes)


MODELS: dict[str, Callable[..., StagedNet]] = {
    "vgg16": vgg16,
    "resnet18": functools.partial(resnet18, stem="cifar"),
    "resnet18_tv": functools.partial(resnet18, stem="imagenet"),
}


def build_model(
    name: str, *, num_classes: int, input_shape: tuple[int, ...], width: int = 64, seed: int = 0
) -> StagedNet:
    """Same registry and arguments as hier_jax.models.build_model (PyTorch's own initialisation)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    torch.manual_seed(seed)
    return MODELS[name](num_classes, tuple(input_shape), width=width)


def param_count(module: nn.Module) -> int:
    """Trainable parameters (BatchNorm running statistics are buffers, not parameters)."""
    return sum(p.numel() for p in module.parameters())


# --- split -------------------------------------------------------------------------------------------


class ExitHead(nn.Module):
    """`convs` x (3x3 conv-BN-ReLU), average pooling to a grid, linear on (row, col, channel) cells."""

    def __init__(self, feature_shape: tuple[int, ...], num_classes: int, config: ExitHeadConfig):
        super().__init__()
        height, width, cin = feature_shape
        layers = []
        for _ in range(config.convs):
            layers.append(ConvBNReLU(cin, config.channels, 3, bias=False))
            cin = config.channels
        self.convs = nn.ModuleList(layers)
        self.grid = pool_grid(height, width, config.grid)
        self.linear = nn.Linear(cin * self.grid[0] * self.grid[1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.convs:
            x = layer(x)
        b, c, h, w = x.shape
        gh, gw = self.grid
        cells = x.reshape(b, c, gh, h // gh, gw, w // gw).mean(dim=(3, 5))  # [B, C, gh, gw]
        return self.linear(cells.permute(0, 2, 3, 1).reshape(b, -1))


class EdgeNet(nn.Module):
    def __init__(self, stages: Sequence[nn.Module], head: ExitHead | None):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.head = head

    def features(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        x = images_BCHW
        for stage in self.stages:
            x = stage(x)
        return x

    def forward(self, images_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(early-exit logits, feature map sent to the cloud)."""
        features = self.features(images_BCHW)
        assert self.head is not None  # an edge without an early exit (vanilla) is run through features()
        return self.head(features), features


class CloudNet(nn.Module):
    def __init__(self, stages: Sequence[nn.Module], classifier: nn.Module):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.classifier = classifier

    def forward(self, features_BCHW: torch.Tensor) -> torch.Tensor:
        x = features_BCHW
        for stage in self.stages:
            x = stage(x)
        return self.classifier(x)


@dataclasses.dataclass(frozen=True)
class Split:
    edge: EdgeNet
    cloud: CloudNet
    point: str
    index: int
    feature_shape: tuple[int, ...]  # per example, (H, W, C) as in hier-jax
    num_classes: int


def stage_output_shape(model: StagedNet, index: int) -> tuple[int, ...]:
    h, w, c = model.input_shape
    with torch.no_grad():
        out = model.features(torch.zeros(1, c, h, w), stop=index + 1)
    return (out.shape[2], out.shape[3], out.shape[1])


def split(
    model: StagedNet, point: str | int, head: ExitHeadConfig | None = ExitHeadConfig(), *, seed: int = 0
) -> Split:
    """Cut after stage `point` (name or index); the parts share the model's stage modules."""
    index = resolve_point(model, point)
    was_training = model.training
    model.eval()  # the shape probe must not touch BatchNorm statistics
    feature_shape = stage_output_shape(model, index)
    model.train(was_training)
    torch.manual_seed(seed)
    exit_head = None if head is None else ExitHead(feature_shape, model.num_classes, head)
    stages = list(model.stages)
    edge = EdgeNet(stages[: index + 1], exit_head)
    cloud = CloudNet(stages[index + 1 :], model.classifier)
    return Split(edge, cloud, model.stage_names[index], index, feature_shape, model.num_classes)
