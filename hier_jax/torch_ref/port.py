"""Weight porting between hier-jax (Flax NNX) modules and their PyTorch twins in `models.py`.

Both trees are walked by path: every nnx.Conv / nnx.BatchNorm / nnx.Linear at path
("stages", 3, "conv1") has its PyTorch counterpart at model.stages[3].conv1. Conversions:

- conv kernel: HWIO (Flax) <-> OIHW (PyTorch), kernel.transpose(3, 2, 0, 1); bias as is;
- BatchNorm: scale <-> weight, bias <-> bias, mean <-> running_mean, var <-> running_var;
- Linear: kernel [in, out] <-> weight [out, in]; bias as is. Inputs of the classifier and of the exit
  head's linear layer are flattened in the same order on both sides (see models.py), so no
  permutation of the rows is needed.

Images and feature maps: NHWC in hier-jax, NCHW in PyTorch (`to_torch_images` / `to_jax_images`).
"""

# pyright: reportArgumentType=false, reportIndexIssue=false, reportOptionalSubscript=false
# (the layers are found by walking the two module trees by path: torch types each attribute as
# `Tensor | Module` and nnx each optional bias as `Param | None`, neither known until run time)

from __future__ import annotations

from typing import Any, TypeVar, cast

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from torch import nn

from hier_jax.models import split as jax_split_module
from hier_jax.models.layers import ConvBNReLU
from hier_jax.models.staged import StagedNet as JaxStagedNet
from hier_jax.torch_ref import models as tm

_PORTED = (nnx.Conv, nnx.BatchNorm, nnx.Linear)
TorchModule = TypeVar("TorchModule", bound=nn.Module)


def _torch_at(module: nn.Module, path: tuple[Any, ...]) -> nn.Module:
    for key in path:
        module = module[key] if isinstance(key, int) else getattr(module, key)
        if module is None:
            raise KeyError(f"no PyTorch module at {path}")
    return module


def _np(x: Any) -> np.ndarray:
    return np.asarray(jax.device_get(x), dtype=np.float32)


def _set(t: torch.Tensor, value: np.ndarray) -> None:
    if tuple(t.shape) != value.shape:
        raise ValueError(f"shape mismatch while porting: PyTorch {tuple(t.shape)} vs converted {value.shape}")
    with torch.no_grad():
        t.copy_(torch.from_numpy(np.array(value, dtype=np.float32, copy=True)))


def _pairs(jax_module: nnx.Module, torch_module: nn.Module):
    count = 0
    for path, node in nnx.iter_graph(jax_module):
        if isinstance(node, _PORTED):
            target = _torch_at(torch_module, tuple(path))
            yield path, node, target
            count += 1
    if count != sum(isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)) for m in torch_module.modules()):
        raise ValueError("the two modules do not have the same layers")


def jax_to_torch(jax_module: nnx.Module, torch_module: TorchModule) -> TorchModule:
    """Copy parameters and BatchNorm statistics of a hier-jax module into its PyTorch twin (in place)."""
    for path, node, target in _pairs(jax_module, torch_module):
        if isinstance(node, nnx.Conv):
            _set(target.weight, _np(node.kernel[...]).transpose(3, 2, 0, 1))
            if node.bias is not None:
                _set(target.bias, _np(node.bias[...]))
            elif target.bias is not None:
                raise ValueError(f"bias mismatch at {path}")
        elif isinstance(node, nnx.BatchNorm):
            _set(target.weight, _np(node.scale[...]))
            _set(target.bias, _np(node.bias[...]))
            _set(target.running_mean, _np(node.mean[...]))
            _set(target.running_var, _np(node.var[...]))
        else:
            _set(target.weight, _np(node.kernel[...]).T)
            _set(target.bias, _np(node.bias[...]))
    return torch_module


def torch_to_jax(torch_module: nn.Module, jax_module: nnx.Module) -> nnx.Module:
    """Copy parameters and BatchNorm statistics of a PyTorch twin into the hier-jax module (in place)."""

    def get(t: torch.Tensor) -> np.ndarray:
        return t.detach().cpu().float().numpy()

    def put(variable: nnx.Variable, value: np.ndarray) -> None:
        if tuple(variable[...].shape) != value.shape:
            raise ValueError(f"shape mismatch while porting: Flax {variable[...].shape} vs {value.shape}")
        variable[...] = jnp.asarray(value)

    for _, node, target in _pairs(jax_module, torch_module):
        if isinstance(node, nnx.Conv):
            put(node.kernel, get(target.weight).transpose(2, 3, 1, 0))
            if node.bias is not None:
                put(node.bias, get(target.bias))
        elif isinstance(node, nnx.BatchNorm):
            put(node.scale, get(target.weight))
            put(node.bias, get(target.bias))
            put(node.mean, get(target.running_mean))
            put(node.var, get(target.running_var))
        else:
            put(node.kernel, get(target.weight).T)
            put(node.bias, get(target.bias))
    return jax_module


def width_of(jax_model: JaxStagedNet) -> int:
    """The `width` a hier-jax backbone was built with (channels of its first conv)."""
    first = cast(ConvBNReLU, jax_model.stages[0])  # both backbones start with a conv-BN-ReLU
    return int(first.conv.kernel[...].shape[-1])


def torch_model_like(jax_model: JaxStagedNet) -> tm.StagedNet:
    """A PyTorch backbone of the same architecture, with the hier-jax model's weights."""
    model = tm.build_model(
        jax_model.arch, num_classes=jax_model.num_classes, input_shape=jax_model.input_shape, width=width_of(jax_model)
    )
    if model.stage_names != jax_model.stage_names:
        raise ValueError(f"stage names differ: {model.stage_names} vs {jax_model.stage_names}")
    return jax_to_torch(jax_model, model)


def torch_split_like(jax_split: jax_split_module.Split, jax_model: JaxStagedNet) -> tuple[tm.StagedNet, tm.Split]:
    """The PyTorch model and its split at the same point, with the same exit head and weights.

    `jax_model` must be the model `jax_split` was cut from (the parts share its stages).
    """
    model = torch_model_like(jax_model)
    head = jax_split.edge.head
    if head is None:
        config = None
    else:
        convs = list(head.convs)
        channels = int(convs[0].conv.kernel[...].shape[-1]) if convs else tm.ExitHeadConfig().channels
        config = tm.ExitHeadConfig(channels=channels, convs=len(convs), grid=max(head.grid))
    t_split = tm.split(model, jax_split.index, config)
    if head is not None:
        t_head = t_split.edge.head
        assert t_head is not None  # split with a config (built from `head`) makes one
        if t_head.grid != tuple(head.grid):
            raise ValueError(f"exit-head grid differs: {t_head.grid} vs {head.grid}")
        jax_to_torch(head, t_head)
    return model, t_split


def to_torch_images(x: Any) -> torch.Tensor:
    """NHWC array -> NCHW float32 tensor (a copy)."""
    return torch.from_numpy(np.ascontiguousarray(_np(x).transpose(0, 3, 1, 2)))


def to_jax_images(t: torch.Tensor) -> jax.Array:
    """NCHW tensor -> NHWC float32 array."""
    return jnp.asarray(t.detach().cpu().float().numpy().transpose(0, 2, 3, 1))
