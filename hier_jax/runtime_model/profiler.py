"""Measure what the cost model needs: per-stage times, payload bytes and edge memory of a StagedNet.

Times: every stage, every early-exit head (one per separation point) and the classifier is jitted as
a function of its own and timed on one device, forward (train mode) and forward + backward + update
(value_and_grad of the sum of its outputs with respect to its parameters and its input, then an SGD
momentum update); warm-up calls first, block_until_ready, median of `repeats`. The sum of the stages
approximates the fused whole: XLA cannot fuse across the cut functions, and each function pays its own
dispatch; `Profile.whole_train_s` times the unsplit train step for comparison. The first stage skips
the input gradient, which real training never computes.

Bytes come from the real payload: `quantization.encode` under `jax.eval_shape` on the feature shape at
the modeled batch, so packing, per-batch scale/offset and label dtype are all counted as sent.

Edge memory (per separation point, edge stages plus head): parameters, BatchNorm statistics, and the
residuals JAX's autodiff saves for the backward pass of the early-exit loss, from `jax.eval_shape` of
`jax.vjp` at batch 1 and 2; the difference is the per-example part (activations). The batch-independent
residuals are references to the weights, already counted. This is the autodiff's own list before XLA
optimizes it (XLA may fuse some away; framework workspace is not counted), so it is an estimate.

A Profile round-trips through JSON (`save_profile`/`load_profile`), so one measured on a real edge
board can stand in for the emulated one. `Profile.scaled` emulates a device uniformly slower or
faster; `Profile.from_flops` a device whose per-stage time follows the flop count (needed where the
measuring device's per-stage shape is unlike the target's: XLA:CPU runs 3x3 convolutions on 2x2 maps
some 100x below its speed on larger maps).
"""

from __future__ import annotations

import dataclasses
import math
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from hier_jax import optim, quantization, steps
from hier_jax.devices import Device, place, resolve_device
from hier_jax.models import ExitHeadConfig, Split, StagedNet, param_count, split, stage_output_shape
from hier_jax.runtime_model import flops
from hier_jax.runtime_model.profile import (
    DEFAULT_BITS,
    Profile,
    SplitProfile,
    Timing,
    edge_memory,
    load_profile,
    save_profile,
)


def _tree_bytes(tree: Any) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _median_time(fn: Callable, args: tuple, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _random_module(make: Callable[[], nnx.Module], rng: np.random.Generator) -> nnx.Module:
    """Build a module with random weights from numpy: eager initializers would compile once per shape."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    values = jax.tree.map(lambda x: jnp.asarray(0.01 * rng.standard_normal(x.shape), x.dtype), state)
    return nnx.merge(graphdef, values)


def _time_module(module: nnx.Module, x: jax.Array, *, input_grad: bool, warmup: int, repeats: int) -> Timing:
    """Forward and forward+backward+update of `module` on `x`, each jitted on its own."""
    graphdef, params, stats = nnx.split(module, nnx.Param, nnx.BatchStat)
    tx = optim.make_optimizer(optim.OptimConfig(), total_steps=1000)
    params, stats, opt_state = jax.device_put((params, stats, tx.init(params)), x.device)

    def forward(params, stats, x):
        return steps.apply(graphdef, params, stats, x, train=True)

    def train(params, stats, opt_state, x):
        def loss(params, x):
            out, new_stats = steps.apply(graphdef, params, stats, x, train=True)
            return jnp.sum(out), new_stats

        argnums = (0, 1) if input_grad else 0
        (_, new_stats), grads = jax.value_and_grad(loss, argnums=argnums, has_aux=True)(params, x)
        param_grads = grads[0] if input_grad else grads
        updates, opt_state = tx.update(param_grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, grads

    fwd = jax.jit(forward).lower(params, stats, x).compile()
    step = jax.jit(train).lower(params, stats, opt_state, x).compile()
    fwd_flops, train_flops = _flops(fwd), _flops(step)
    padding = flops.module_padding_flops(module, x)
    return Timing(
        fwd_s=_median_time(fwd, (params, stats, x), warmup, repeats),
        train_s=_median_time(step, (params, stats, opt_state, x), warmup, repeats),
        fwd_flops=fwd_flops,
        train_flops=train_flops,
        conventional_fwd_flops=flops.conventional(fwd_flops, padding, 1),
        # forward, weight gradient, and the input gradient where it is computed
        conventional_train_flops=flops.conventional(train_flops, padding, 3 if input_grad else 2),
    )


def _flops(compiled: jax.stages.Compiled) -> float:
    cost = compiled.cost_analysis()
    assert cost is not None  # None only where a backend has no cost model
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost).get("flops", 0.0))


def _memory(module: nnx.Module, in_shape: tuple[int, ...], *, input_grad: bool, labels: bool) -> tuple[int, int, int]:
    """(param bytes, BN statistic bytes, residual bytes per example) of `module`, from shapes only.

    Residuals: the leaves of jax.vjp's backward function at batch 2 minus batch 1, for the output
    (or, with `labels`, the cross-entropy loss) with respect to the parameters (and the input).
    """
    graphdef, params, stats = nnx.split(module, nnx.Param, nnx.BatchStat)

    def residual_bytes(batch: int) -> int:
        def backward(params, x, y):
            def fn(params, x):
                out, _ = steps.apply(graphdef, params, stats, x, train=True)
                return steps.cross_entropy(out, y) if labels else out

            return jax.vjp(fn, params, x)[1] if input_grad else jax.vjp(lambda p: fn(p, x), params)[1]

        x = jax.ShapeDtypeStruct((batch, *in_shape), jnp.float32)
        y = jax.ShapeDtypeStruct((batch,), jnp.int32)
        return _tree_bytes(jax.eval_shape(backward, params, x, y))

    return _tree_bytes(params), _tree_bytes(stats), residual_bytes(2) - residual_bytes(1)


def _summed(memory: Sequence[tuple[int, int, int]]) -> tuple[int, int, int]:
    """The edge's (parameter, BN statistic, per-example residual) bytes: the sum of its parts' `_memory`
    (the composed backward pass keeps each part's residuals)."""
    return sum(m[0] for m in memory), sum(m[1] for m in memory), sum(m[2] for m in memory)


@dataclasses.dataclass(frozen=True)
class EdgeFootprint:
    """What the edge of one split holds and sends, for one batch size and bit width."""

    params: int  # trainable parameters, edge stages + exit head
    memory_bytes: int  # parameters + momentum + gradients + BN statistics + saved activations
    activation_bytes: int  # the saved-activation part of memory_bytes
    payload_bytes: int  # one encoded batch, from the real packed payload


def edge_footprint(parts: Split, batch: int, bits: int) -> EdgeFootprint:
    """Parameter count, memory estimate (see the module docstring) and payload bytes of `parts.edge`."""
    if parts.edge.head is None:
        raise ValueError("edge_footprint needs an edge with an early-exit head")
    x = jax.ShapeDtypeStruct((1, *parts.edge.input_shape), jnp.float32)
    shapes = []
    for stage in parts.edge.stages:
        shapes.append(tuple(x.shape[1:]))
        x = jax.eval_shape(lambda x, stage=stage: stage(x, False), x)
    memory = [_memory(stage, shapes[i], input_grad=i > 0, labels=False) for i, stage in enumerate(parts.edge.stages)]
    memory.append(_memory(parts.edge.head, parts.feature_shape, input_grad=True, labels=True))
    param_bytes, stat_bytes, residual_per_example = _summed(memory)
    return EdgeFootprint(
        params=param_count(parts.edge),
        memory_bytes=edge_memory(param_bytes, stat_bytes, residual_per_example, batch),
        activation_bytes=residual_per_example * batch,
        payload_bytes=quantization.payload_nbytes(parts.feature_shape, batch, bits, parts.num_classes),
    )


def host_cpu() -> str:
    """This machine's CPU as lscpu names it, with family and model (Zen 4 and Zen 5 share a name, and
    JAX/PyTorch ratios differ between them): recorded beside every figure measured here."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in text.splitlines() if ":" in line)}
        return (
            f"{fields.get('Model name', platform.processor())} (family {fields.get('CPU family', '?')}, "
            f"model {fields.get('Model', '?')})"
        )
    except (OSError, subprocess.SubprocessError):
        return platform.processor() or "unknown CPU"


def profile_model(
    model: StagedNet,
    *,
    batch: int,
    device: str | Device = "cpu:0",
    repeats: int = 5,
    warmup: int = 1,
    head: ExitHeadConfig = ExitHeadConfig(),
    bits: Sequence[int] = DEFAULT_BITS,
    payload_batch: int | None = None,
    measure_whole: bool = True,
    progress: bool = True,
    seed: int = 0,
) -> Profile:
    """Time every stage, head and the classifier of `model` at `batch` on `device`; bytes at `payload_batch`.

    Heads are measured once per distinct feature shape (the head is a function of it alone). An edge's
    memory is the sum over its stages and its head: the composed backward pass keeps each part's
    residuals.
    """
    if batch < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"need batch >= 1, repeats >= 1, warmup >= 0; got {batch}, {repeats}, {warmup}")
    bits = tuple(quantization.check_bits(b) for b in bits)
    dev = resolve_device(device)
    payload_batch = batch if payload_batch is None else payload_batch
    names = model.stage_names
    shapes = [tuple(model.input_shape)] + [stage_output_shape(model, i) for i in range(len(names))]
    rng = np.random.default_rng(seed)

    def random_input(shape: tuple[int, ...]) -> jax.Array:  # numpy: no compile per shape
        return jax.device_put(rng.standard_normal((batch, *shape), np.float32), dev)

    bar = tqdm(
        total=2 * len(names) + 1 + int(measure_whole), desc=f"profile {model.arch}", disable=not progress, leave=False
    )
    stage_timings, stage_memory = [], []
    for i, stage in enumerate(model.stages):
        bar.set_postfix_str(names[i])
        stage_timings.append(
            _time_module(stage, random_input(shapes[i]), input_grad=i > 0, warmup=warmup, repeats=repeats)
        )
        stage_memory.append(_memory(stage, shapes[i], input_grad=i > 0, labels=False))
        bar.update()
    classifier = _time_module(
        model.classifier, random_input(shapes[-1]), input_grad=True, warmup=warmup, repeats=repeats
    )
    bar.update()

    heads: dict[tuple[int, ...], tuple[Timing, tuple[int, int, int]]] = {}
    splits = []
    for i, name in enumerate(names):
        bar.set_postfix_str(f"head@{name}")
        feature_shape = shapes[i + 1]
        if feature_shape not in heads:

            def make_head(i: int = i) -> nnx.Module:
                made = split(model, i, head).edge.head
                assert made is not None  # `head` is a config, never None
                return made

            exit_head = _random_module(make_head, rng)
            heads[feature_shape] = (
                _time_module(exit_head, random_input(feature_shape), input_grad=True, warmup=warmup, repeats=repeats),
                _memory(exit_head, feature_shape, input_grad=True, labels=True),
            )
        head_timing, head_memory = heads[feature_shape]
        param_bytes, stat_bytes, residual_bytes = _summed([*stage_memory[: i + 1], head_memory])
        payload, activation, gradient = quantization.split_bytes(feature_shape, payload_batch, bits, model.num_classes)
        splits.append(
            SplitProfile(
                name,
                i,
                feature_shape,
                head_timing,
                payload,
                activation,
                gradient,
                param_bytes,
                stat_bytes,
                residual_bytes,
            )
        )
        bar.update()

    whole = None
    if measure_whole:
        bar.set_postfix_str("whole model")
        whole = _time_whole(model, batch, dev, warmup, repeats)
        bar.update()
    bar.close()
    return Profile(
        model.arch,
        tuple(model.input_shape),
        model.num_classes,
        f"{dev.platform}:{dev.id}",
        batch,
        names,
        tuple(stage_timings),
        classifier,
        tuple(splits),
        payload_batch,
        quantization.raw_image_nbytes(payload_batch, *model.input_shape, num_classes=model.num_classes),
        whole,
    )


def _time_whole(model: StagedNet, batch: int, device: Device, warmup: int, repeats: int) -> float:
    """The fused train step of the unsplit model (steps.make_train_step), for comparison with the sum."""
    tx = optim.make_optimizer(optim.OptimConfig(), total_steps=1000)
    graphdef, state = steps.init_state(model, tx)
    state = place(state, device)
    images = jax.device_put(np.zeros((batch, *model.input_shape), np.float32), device)
    labels = jax.device_put(np.zeros((batch,), np.int32), device)
    step = jax.jit(steps.make_train_step(graphdef, tx)).lower(state, images, labels).compile()
    return _median_time(step, (state, images, labels), warmup, repeats)


def cached_profile(
    path: str | Path, model: Callable[[], StagedNet], *, refresh: bool = False, **options: Any
) -> Profile:
    """The profile saved at `path`, else (or with `refresh`, or where it predates the conventional flop
    counts) `profile_model(model(), **options)`, saved there for the next call; the model is built only
    when it is measured."""
    path = Path(path)
    if path.exists() and not refresh:
        saved = load_profile(path)
        if saved.classifier.conventional_train_flops is not None:
            return saved
    measured = profile_model(model(), **options)
    save_profile(measured, path)
    return measured
