"""What the paper reports of its runtime, and the cuts it most likely made (../shared/PAPER.md)."""

from __future__ import annotations

PAPER_REDUCTION = {
    ("vgg16", "cifar10"): 0.29,
    ("resnet18", "cifar10"): 0.61,
    ("vgg16", "tiny_imagenet"): 0.25,
    ("resnet18", "tiny_imagenet"): 0.81,
}
"""The paper's runtime reductions against its cloud-only baseline (end-to-end training in the cloud) over
its 3G link; our resnet18 and resnet18_tv are both compared with its ResNet-18."""

PAPER_SPLITS = {
    ("vgg16", "cifar10"): "pool3",
    ("vgg16", "tiny_imagenet"): "pool3",
    ("resnet18", "cifar10"): "layer2_1",
    ("resnet18", "tiny_imagenet"): "layer3_1",
}
"""Where the paper most likely cut: the reported reductions sit just under the communication-only
ceilings of these points. Our inference, used only to put our model next to the paper at the same cut."""


def data_family(dataset: str) -> str:
    """cifar10 or tiny_imagenet for any spelling of them (an image folder of CIFAR-10 JPEGs included)."""
    return "cifar10" if "cifar" in dataset else "tiny_imagenet" if "tiny" in dataset else dataset


def paper_reduction(model: str, dataset: str) -> float | None:
    """The paper's reduction over 3G for a model and data set (None where it reports none)."""
    return PAPER_REDUCTION.get((model.removesuffix("_tv"), data_family(dataset)))


def paper_split(model: str, dataset: str) -> str:
    return PAPER_SPLITS[(model.removesuffix("_tv"), data_family(dataset))]
