"""Where the edge and the cloud run: device names ('auto', 'cpu:1', 'gpu:0') and state placement."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

import jax

if TYPE_CHECKING:
    Device = Any  # Device aliases an extension type without stubs, which a type checker cannot use
else:
    Device = jax.Device

AUTO = "auto"
ROLES = ("edge", "cloud")

Tree = TypeVar("Tree")


def auto_devices() -> tuple[Device, Device]:
    """What `auto` places (edge, cloud) on. On an accelerator host the edge takes the first accelerator
    and the cloud the last; with a single accelerator both share it (give --edge-device cpu:0 to make
    the edge a weak device instead). On a CPU host, the first two host devices (XLA_FLAGS
    --xla_force_host_platform_device_count=2, which the experiments and tests set; one if only one)."""
    devices = jax.devices()
    return devices[0], devices[min(1, len(devices) - 1)] if devices[0].platform == "cpu" else devices[-1]


def device_name(device: Device) -> str:
    return f"{device.platform}:{device.id}"


def all_devices() -> list[Device]:
    """The devices of every platform this process has, the default one first (jax.devices() lists only
    the default platform's: on a GPU host the CPU devices are there too, as cpu:N)."""
    found = list(jax.devices())
    for platform in ("gpu", "tpu", "cpu"):
        try:
            found += [d for d in jax.devices(platform) if d not in found]
        except RuntimeError:
            pass
    return found


def resolve_device(spec: str | Device, role: str = "edge") -> Device:
    """'auto' (see `auto_devices`; `role` is "edge" or "cloud"), 'cpu:1', 'gpu:0', 'tpu' (index 0) or a
    jax.Device; ValueError naming the available devices."""
    if isinstance(spec, jax.Device):
        return spec
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; valid: {', '.join(ROLES)}")
    if spec == AUTO:
        return auto_devices()[ROLES.index(role)]
    available = ", ".join(device_name(d) for d in all_devices()) + f", {AUTO}"
    platform, _, index = str(spec).partition(":")
    try:
        if not platform or (index and not index.isdigit()):
            raise ValueError(spec)
        idx = int(index) if index else 0
        devices = jax.devices(platform)
    except (RuntimeError, ValueError):
        raise ValueError(f"device {spec!r} does not exist; available devices: {available}") from None
    if not 0 <= idx < len(devices):
        raise ValueError(
            f"device {spec!r} does not exist; available devices: {available}"
            + (
                ""
                if platform != "cpu"
                else " (more CPU devices: XLA_FLAGS=--xla_force_host_platform_device_count=N before importing jax)"
            )
        )
    return devices[idx]


def place(tree: Tree, device: Device) -> Tree:
    """A copy of `tree` on `device`, never an alias of its arrays (dispatched asynchronously).

    It copies because the compiled steps donate their state: a step deletes the buffers of the state
    it is given. An aliasing device_put would hand a step the very arrays of the modules, of the
    caller's initial state or of a snapshot, and the first step would delete them under their owner.
    """
    return jax.device_put(tree, device, may_alias=False)
