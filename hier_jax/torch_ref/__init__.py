"""PyTorch reference of hier-jax: the same backbones, split parts, exit heads, steps and payload.

Imports torch (the `torch` extra); `import hier_jax` itself never does. Modules:
- models: VGG-16, ResNet-18 (both stems), ExitHead, EdgeNet, CloudNet, split (NCHW tensors);
- port: weights hier-jax <-> PyTorch (HWIO <-> OIHW kernels, BatchNorm, Linear transposes);
- quantization: the payload wire format, byte for byte;
- steps: EdgeStep, CloudStep, TrainStep with SGD(momentum, weight decay) and the same schedules.
"""

from hier_jax.torch_ref import models, port, quantization, steps
from hier_jax.torch_ref.models import (
    CloudNet,
    EdgeNet,
    ExitHead,
    ExitHeadConfig,
    Split,
    StagedNet,
    build_model,
    param_count,
    resnet18,
    split,
    vgg16,
)
from hier_jax.torch_ref.port import (
    jax_to_torch,
    to_jax_images,
    to_torch_images,
    torch_model_like,
    torch_split_like,
    torch_to_jax,
)
from hier_jax.torch_ref.steps import CloudStep, EdgeStep, TrainStep, make_optimizer, schedule_fn

__all__ = [
    "CloudNet",
    "CloudStep",
    "EdgeNet",
    "EdgeStep",
    "ExitHead",
    "ExitHeadConfig",
    "Split",
    "StagedNet",
    "TrainStep",
    "build_model",
    "jax_to_torch",
    "make_optimizer",
    "models",
    "param_count",
    "port",
    "quantization",
    "resnet18",
    "schedule_fn",
    "split",
    "steps",
    "to_jax_images",
    "to_torch_images",
    "torch_model_like",
    "torch_split_like",
    "torch_to_jax",
    "vgg16",
]
