"""VGG-16 with BatchNorm (Simonyan & Zisserman, 2015), in the form used on CIFAR.

Thirteen 3x3 conv-BN-ReLU layers (conv biases kept, as in the common CIFAR ports) in five blocks,
each closed by a 2x2 max-pool. The three 4096-wide fully connected layers of the ImageNet model are
replaced by one linear layer on the pooled 512-channel map, the usual CIFAR choice: on 32x32 input
the map after pool5 is 1x1, so global average pooling is a plain flatten; on Tiny ImageNet (64x64)
it is 2x2 and is averaged. Stages: conv1_1, conv1_2, pool1, conv2_1, ..., conv5_3, pool5.
"""

from __future__ import annotations

from flax import nnx

from hier_jax.models.layers import Classifier, ConvBNReLU, MaxPool
from hier_jax.models.staged import StagedNet

VGG16_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))


def vgg16(num_classes: int, input_shape: tuple[int, ...], *, width: int = 64, rngs: nnx.Rngs) -> StagedNet:
    """VGG-16; `width` is the first block's channel count (64 in the paper), later blocks scale with it."""
    stages = []
    cin = input_shape[-1]
    for block, (channels, layers) in enumerate(VGG16_BLOCKS, start=1):
        cout = channels * width // 64
        for layer in range(1, layers + 1):
            stages.append((f"conv{block}_{layer}", ConvBNReLU(cin, cout, 3, bias=True, rngs=rngs)))
            cin = cout
        stages.append((f"pool{block}", MaxPool(2, 2)))
    return StagedNet("vgg16", stages, Classifier(cin, num_classes, rngs=rngs), input_shape, num_classes)
