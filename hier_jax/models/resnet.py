"""ResNet-18 (He et al., 2016): BasicBlocks in four layers of two, widths 64-128-256-512.

Two stems, because the paper's text does not say which one it used (see ../shared/PAPER.md):
- "cifar": one 3x3 stride-1 conv-BN-ReLU, no pooling (the usual CIFAR ResNet-18, 11,173,962
  parameters on CIFAR-10); feature maps stay 32x32 through layer1.
- "imagenet": the torchvision stem, 7x7 stride-2 conv-BN-ReLU then a 3x3 stride-2 max-pool as a
  stage of its own; maps shrink 4x before layer1, which makes every cut far cheaper to send.
Stages: stem, [maxpool,] layer1_0, layer1_1, layer2_0, ..., layer4_1; then global average pooling
and one linear layer.
"""

from __future__ import annotations

from flax import nnx

from hier_jax.models.layers import BasicBlock, Classifier, ConvBNReLU, MaxPool
from hier_jax.models.staged import StagedNet

STEMS = ("cifar", "imagenet")


def resnet18(
    num_classes: int, input_shape: tuple[int, ...], *, width: int = 64, stem: str = "cifar", rngs: nnx.Rngs
) -> StagedNet:
    """ResNet-18; `width` is layer1's channel count (64 in the paper), later layers scale with it."""
    if stem not in STEMS:
        raise ValueError(f"unknown ResNet stem {stem!r}; valid stems: {', '.join(STEMS)}")
    cin = input_shape[-1]
    if stem == "cifar":
        stages: list[tuple[str, nnx.Module]] = [("stem", ConvBNReLU(cin, width, 3, 1, bias=False, rngs=rngs))]
    else:
        stages = [("stem", ConvBNReLU(cin, width, 7, 2, bias=False, rngs=rngs)), ("maxpool", MaxPool(3, 2, padding=1))]
    cin = width
    for layer, multiple in enumerate((1, 2, 4, 8), start=1):
        cout = width * multiple
        for block in range(2):
            stride = 2 if (layer > 1 and block == 0) else 1
            stages.append((f"layer{layer}_{block}", BasicBlock(cin, cout, stride, rngs=rngs)))
            cin = cout
    arch = "resnet18" if stem == "cifar" else "resnet18_tv"
    return StagedNet(arch, stages, Classifier(cin, num_classes, rngs=rngs), input_shape, num_classes)
