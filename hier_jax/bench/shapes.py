"""Every distinct convolution and BatchNorm of the backbones, read from a trace of each stage's
train-mode forward on CIFAR-10 shapes: the rows of bench_layers."""

from __future__ import annotations

import collections
import dataclasses
from typing import cast

INPUT_SHAPE, NUM_CLASSES = (32, 32, 3), 10  # CIFAR-10
CONV_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


@dataclasses.dataclass
class ConvShape:
    x_shape: tuple[int, ...]
    w_shape: tuple[int, ...]  # HWIO
    strides: tuple[int, int]
    padding: tuple[tuple[int, int], tuple[int, int]]
    y_shape: tuple[int, ...]
    layers: list[str] = dataclasses.field(default_factory=list)

    @property
    def key(self) -> tuple:
        return self.x_shape, self.w_shape, self.strides, self.padding

    @property
    def flops(self) -> int:
        """2*B*Ho*Wo*Cout*Cin*kh*kw: the nominal multiply-adds of the convolution, times two."""
        b, ho, wo, cout = self.y_shape
        kh, kw, cin, _ = self.w_shape
        return 2 * b * ho * wo * cout * cin * kh * kw

    def describe(self) -> str:
        kh, kw, cin, cout = self.w_shape
        pads = sorted({p for pad in self.padding for p in pad})
        return (
            f"{'x'.join(map(str, self.x_shape))} {kh}x{kw} {cin}->{cout} "
            f"s{'x'.join(map(str, sorted(set(self.strides))))} p{'/'.join(map(str, pads))}"
        )


@dataclasses.dataclass
class BNShape:
    x_shape: tuple[int, ...]
    layers: list[str] = dataclasses.field(default_factory=list)

    @property
    def key(self) -> tuple:
        return self.x_shape

    def describe(self) -> str:
        return "x".join(map(str, self.x_shape))


def conv_eqns(jaxpr) -> list:
    """The conv_general_dilated equations of a jaxpr, sub-jaxprs (calls, custom rules) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            found.append(eqn)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found.extend(conv_eqns(inner))
    return found


def conv_shape(eqn) -> ConvShape:
    from jax import lax

    p = eqn.params
    dn = p["dimension_numbers"]
    nhwc = lax.conv_dimension_numbers((1,) * 4, (1,) * 4, CONV_DIMENSIONS)
    if (
        (dn.lhs_spec, dn.rhs_spec, dn.out_spec) != (nhwc.lhs_spec, nhwc.rhs_spec, nhwc.out_spec)
        or p["feature_group_count"] != 1
        or p["batch_group_count"] != 1
        or any(d != 1 for d in (*p["lhs_dilation"], *p["rhs_dilation"]))
    ):
        raise NotImplementedError(
            f"bench_layers times NHWC/HWIO convolutions without dilation or groups; the model has {p}"
        )
    # NHWC (checked above): two spatial dimensions, so two strides and two (low, high) paddings.
    return ConvShape(
        tuple(eqn.invars[0].aval.shape),
        tuple(eqn.invars[1].aval.shape),
        cast(tuple[int, int], tuple(int(s) for s in p["window_strides"])),
        cast(tuple[tuple[int, int], tuple[int, int]], tuple(tuple(int(v) for v in pad) for pad in p["padding"])),
        tuple(eqn.outvars[0].aval.shape),
    )


def collect_shapes(models: list[str], batch: int, width: int) -> tuple[list[ConvShape], list[BNShape]]:
    """Distinct convolution and BatchNorm shapes of the models' train-mode forward, in order of first
    use, each with the layers (model:stage, once per use) that use it. Traced abstractly (no arrays)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from hier_jax.models import build_model

    convs: dict[tuple, ConvShape] = {}
    bns: dict[tuple, BNShape] = {}
    for name in models:
        model = nnx.eval_shape(
            lambda name=name: build_model(
                name, num_classes=NUM_CLASSES, input_shape=INPUT_SHAPE, width=width, conv_impl="xla"
            )
        )
        x = jax.ShapeDtypeStruct((batch, *INPUT_SHAPE), jnp.float32)
        for stage_name, stage in zip(model.stage_names, model.stages, strict=True):
            graphdef, state = nnx.split(stage)
            jaxpr, x = jax.make_jaxpr(
                lambda state, x, graphdef=graphdef: nnx.merge(graphdef, state)(x, True), return_shape=True
            )(state, x)
            shapes = [conv_shape(e) for e in conv_eqns(jaxpr.jaxpr)]
            norms = [m for _, m in nnx.iter_graph(stage) if isinstance(m, nnx.BatchNorm)]
            if len(norms) != len(shapes) or sorted(n.num_features for n in norms) != sorted(
                s.w_shape[-1] for s in shapes
            ):
                raise NotImplementedError(
                    f"{name}:{stage_name}: bench_layers takes each BatchNorm's input to be a "
                    f"convolution's output; this stage has {len(shapes)} convolutions and "
                    f"{len(norms)} BatchNorms"
                )
            label = f"{name}:{stage_name}"
            for shape in shapes:
                convs.setdefault(shape.key, shape).layers.append(label)
                bns.setdefault(shape.y_shape, BNShape(shape.y_shape)).layers.append(label)
    return list(convs.values()), list(bns.values())


def layers_text(layers: list[str]) -> str:
    counts = collections.Counter(layers)
    return ", ".join(f"{name} x{n}" if n > 1 else name for name, n in counts.items())
