"""The compiled steps of one split (edge and cloud jitted separately, their states donated) and the devices
they run on."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import optax

from hier_jax import steps
from hier_jax.devices import AUTO, Device, place, resolve_device
from hier_jax.models import Split


@dataclasses.dataclass(frozen=True)
class Hierarchy:
    """The compiled steps of one split, and the device each side runs on."""

    edge_device: Device
    cloud_device: Device
    edge_step: Callable
    cloud_step: Callable
    edge_eval: Callable
    cloud_eval: Callable
    bits: int
    num_classes: int


def build_hierarchy(
    split: Split,
    *,
    bits: int,
    edge_tx: optax.GradientTransformation,
    cloud_tx: optax.GradientTransformation,
    edge_device: str | Device = AUTO,
    cloud_device: str | Device = AUTO,
) -> tuple[Hierarchy, steps.State, steps.State]:
    """Jit the steps of `split` and return them with initial edge and cloud states on their devices;
    each side's steps are traced under the precision policy its part was built with."""
    edge_device, cloud_device = resolve_device(edge_device, "edge"), resolve_device(cloud_device, "cloud")
    edge_graphdef, edge_state = steps.init_state(split.edge, edge_tx)
    cloud_graphdef, cloud_state = steps.init_state(split.cloud, cloud_tx)
    edge_policy, cloud_policy = split.edge.precision, split.cloud.precision
    hierarchy = Hierarchy(
        edge_device=edge_device,
        cloud_device=cloud_device,
        edge_step=jax.jit(
            steps.make_edge_step(
                edge_graphdef, edge_tx, bits=bits, num_classes=split.num_classes, precision=edge_policy
            ),
            donate_argnums=0,
        ),
        cloud_step=jax.jit(steps.make_cloud_step(cloud_graphdef, cloud_tx, precision=cloud_policy), donate_argnums=0),
        edge_eval=jax.jit(
            steps.make_edge_eval(edge_graphdef, bits=bits, num_classes=split.num_classes, precision=edge_policy)
        ),
        cloud_eval=jax.jit(steps.make_cloud_eval(cloud_graphdef, precision=cloud_policy)),
        bits=bits,
        num_classes=split.num_classes,
    )
    return hierarchy, place(edge_state, edge_device), place(cloud_state, cloud_device)
