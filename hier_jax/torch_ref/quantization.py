"""hier_jax.quantization's wire format in PyTorch: same codes, same packed bytes, same payload.

k-bit affine quantizer with per-batch min/max (scale = (max - min) / (2^k - 1), codes
clip(round((x - min) / scale))), little-endian bit packing (code i in bits [i*k, (i+1)*k) of the
stream); 16 bits is a bfloat16 cast, 32 bits float32 as is. Features are detached first: no
gradient crosses the cut.
"""

from __future__ import annotations

import dataclasses
import math

import torch

VALID_BITS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 16, 32)


@dataclasses.dataclass
class Payload:
    """Mirror of hier_jax.quantization.Payload; `shape` is the NHWC shape of the features (as in
    hier-jax) and `data` packs them in NHWC order, so the bytes equal hier-jax's for the same map."""

    data: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    labels: torch.Tensor
    shape: tuple[int, ...]
    bits: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.offset, self.labels))


def check_bits(bits: int) -> int:
    if isinstance(bits, bool) or int(bits) != bits or int(bits) not in VALID_BITS:
        raise ValueError(f"bits must be one of {VALID_BITS}, got {bits!r}")
    return int(bits)


def label_dtype(num_classes: int) -> torch.dtype:
    return torch.uint8 if num_classes <= 256 else torch.int32


def quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = x.float()
    lo, hi = x.min(), x.max()
    levels = 2**bits - 1
    scale = torch.where(hi > lo, (hi - lo) / levels, torch.ones_like(hi))
    codes = torch.clamp(torch.round((x - lo) / scale), 0, levels).to(torch.uint8)
    return codes, scale, lo


def dequantize(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale + offset


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    flat = codes.reshape(-1).to(torch.uint8) & (2**bits - 1)
    if bits == 8:
        return flat
    if 8 % bits == 0:
        per = 8 // bits
        flat = torch.nn.functional.pad(flat, (0, -flat.numel() % per)).reshape(-1, per).to(torch.int32)
        shifts = torch.arange(per, dtype=torch.int32, device=flat.device) * bits
        return (flat << shifts).sum(dim=1).to(torch.uint8)
    planes = (flat[:, None].to(torch.int32) >> torch.arange(bits, device=flat.device, dtype=torch.int32)) & 1
    planes = planes.reshape(-1)
    planes = torch.nn.functional.pad(planes, (0, -planes.numel() % 8)).reshape(-1, 8)
    return (planes << torch.arange(8, device=flat.device, dtype=torch.int32)).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    packed = packed.reshape(-1).to(torch.int32)
    if bits == 8:
        return packed[:n].to(torch.uint8)
    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * bits
        return ((packed[:, None] >> shifts) & (2**bits - 1)).reshape(-1)[:n].to(torch.uint8)
    planes = ((packed[:, None] >> torch.arange(8, dtype=torch.int32, device=packed.device)) & 1).reshape(-1)
    planes = planes[: n * bits].reshape(n, bits)
    weights = 1 << torch.arange(bits, dtype=torch.int32, device=packed.device)
    return (planes * weights).sum(dim=1).to(torch.uint8)


def encode(features_BCHW: torch.Tensor, labels: torch.Tensor, bits: int, num_classes: int) -> Payload:
    """Detach, move to NHWC order, then quantize + pack (<= 8 bits), cast (16) or keep (32)."""
    bits = check_bits(bits)
    nhwc = features_BCHW.detach().permute(0, 2, 3, 1)
    shape = tuple(int(d) for d in nhwc.shape)
    labels = labels.to(label_dtype(num_classes))
    if bits <= 8:
        codes, scale, offset = quantize(nhwc, bits)
        data = pack_bits(codes.contiguous(), bits)
    else:
        data = nhwc.to(torch.bfloat16 if bits == 16 else torch.float32).contiguous()
        scale = offset = torch.zeros(0, device=nhwc.device)
    return Payload(data, scale, offset, labels, shape, bits)


def decode(payload: Payload, channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 NCHW features (a channels_last view of the NHWC data when asked) and int64 labels."""
    labels = payload.labels.long()
    if payload.bits <= 8:
        codes = unpack_bits(payload.data, payload.bits, math.prod(payload.shape)).reshape(payload.shape)
        nhwc = dequantize(codes, payload.scale, payload.offset)
    else:
        nhwc = payload.data.float().reshape(payload.shape)
    nchw = nhwc.permute(0, 3, 1, 2)
    return (nchw if channels_last else nchw.contiguous()), labels
