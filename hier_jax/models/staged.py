"""A backbone as an ordered sequence of named stages followed by a classifier.

Naming every stage makes a separation point a plain name ("pool3", "layer2_1"): the edge holds
the stages up to and including that name, the cloud the rest. The unsplit forward pass is the
same loop over the same stage objects, which is what makes split == unsplit hold exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from hier_jax import precision
from hier_jax.models import xla_cpu


def check_images(images: jax.Array, input_shape: tuple[int, ...]) -> None:
    """Raise a clear error for images that are not [B, H, W, C] of the model's input shape."""
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(input_shape):
        raise ValueError(
            f"images must have shape [batch, {', '.join(map(str, input_shape))}] (NHWC) for this model, "
            f"got {tuple(images.shape)}"
        )


class StagedNet(nnx.Module):
    """stages[0] -> ... -> stages[-1] -> classifier, with stage names kept beside the stages."""

    def __init__(
        self,
        arch: str,
        stages: Sequence[tuple[str, nnx.Module]],
        classifier: nnx.Module,
        input_shape: tuple[int, ...],
        num_classes: int,
    ):
        self.arch = arch
        self.stage_names = tuple(name for name, _ in stages)
        self.stages = nnx.List([module for _, module in stages])
        self.classifier = classifier
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.conv_impl = xla_cpu.resolve_impl()  # what the stages were built with (build_model sets it)
        self.precision = precision.build_policy().name  # the policy they compute in (likewise)

    def features(self, x: jax.Array, train: bool, start: int = 0, stop: int | None = None) -> jax.Array:
        """Run stages[start:stop] on x."""
        for stage in list(self.stages)[start:stop]:
            x = stage(x, train)
        return x

    def __call__(self, images_BHWC: jax.Array, train: bool) -> jax.Array:
        check_images(images_BHWC, self.input_shape)
        return self.classifier(self.features(images_BHWC, train), train)
