"""The paper's two devices, modeled from a CPU profile: the cloud (RTX 2080 Ti) and the edge (Quadro K620).

Every time in a `profiler.Profile` measured here is mapped onto them, either from the flop count of
each stage at the cloud's sustained throughput ("flops") or by rescaling the measured CPU times so
the whole model runs at that throughput ("measured"); the edge is the cloud `EDGE_SLOWDOWN` times
slower. The flops are counted conventionally by default (the padding taps included, `flops`): the
throughput below is calibrated in that convention, and the hardware computes those taps.
docs/runtime_model.md states the assumptions and their sources.
"""

from __future__ import annotations

from hier_jax.runtime_model import profiler

# Public specifications (TechPowerUp GPU database): FP32 peak, Quadro K620 863.2 GFLOPS (384 CUDA cores at
# 1124 MHz boost, 28.8 GB/s DDR3, 2 GB), GeForce RTX 2080 Ti 13.45 TFLOPS (4352 cores at 1545 MHz, 616 GB/s).
K620_FP32_FLOPS = 863.2e9
RTX2080TI_FP32_FLOPS = 13.45e12
EDGE_SLOWDOWN = RTX2080TI_FP32_FLOPS / K620_FP32_FLOPS  # 15.6
K620_MEMORY_BYTES = 2 * 2**30
# Lambda Labs, "RTX 2080 Ti Deep Learning Benchmarks with TensorFlow" (2019): 294 images/s training ResNet-50
# in FP32; ResNet-50 is 3.8e9 multiply-adds per image forward (He et al., 2016), training ~3x forward.
CLOUD_EFFECTIVE_FLOPS = 294 * 3 * 2 * 3.8e9  # 6.7e12, about half the FP32 peak
TIME_SOURCES = ("flops", "measured")


def paper_devices(
    profile: profiler.Profile,
    *,
    time_source: str = "flops",
    count: str = "conventional",
    cloud_flops: float = CLOUD_EFFECTIVE_FLOPS,
    edge_slowdown: float = EDGE_SLOWDOWN,
) -> tuple[profiler.Profile, profiler.Profile]:
    """(edge, cloud) profiles of the paper's hardware from a profile measured on this machine; `count`
    is the flop convention (`profile.FLOP_COUNTS`) of the profile's counts and of `cloud_flops`."""
    if time_source == "flops":
        cloud = profile.from_flops(cloud_flops, "RTX 2080 Ti (modeled)", count)
    elif time_source == "measured":
        cpu_flops = profile.train_flops(count) / profile.stages_train_s
        cloud = profile.scaled(cpu_flops / cloud_flops, "RTX 2080 Ti (modeled)")
    else:
        raise ValueError(f"unknown time source {time_source!r}; valid: {', '.join(TIME_SOURCES)}")
    return cloud.scaled(edge_slowdown, "Quadro K620 (modeled)"), cloud
