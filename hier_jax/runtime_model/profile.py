"""What a profile holds (per-stage, per-head and classifier timings and flops, payload bytes and the
edge's memory per separation point), at another modeled batch, and its JSON: a profile measured on a
real edge board can stand in for the emulated one."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hier_jax import quantization

FORMAT_VERSION = 1
DEFAULT_BITS = (2, 4, 8, 16, 32)
FLOP_COUNTS = ("conventional", "xla")


@dataclasses.dataclass(frozen=True)
class Timing:
    """Median seconds for one batch of `Profile.batch`, and the flop counts of the same programs: XLA's,
    and the conventional ones that also count the convolutions' padding taps (`flops`; None in a
    profile that did not count them)."""

    fwd_s: float
    train_s: float
    fwd_flops: float
    train_flops: float
    conventional_fwd_flops: float | None = None
    conventional_train_flops: float | None = None

    def counted(self, count: str) -> tuple[float, float]:
        """(forward, train) flops under `count`: "xla" or "conventional" (FLOP_COUNTS)."""
        if count == "xla":
            return self.fwd_flops, self.train_flops
        if count != "conventional":
            raise ValueError(f"unknown flop count {count!r}; valid: {', '.join(FLOP_COUNTS)}")
        if self.conventional_fwd_flops is None or self.conventional_train_flops is None:
            raise ValueError("this profile has no conventional flop counts (measured before they were counted); "
                             "profile the model again")  # fmt: skip
        return self.conventional_fwd_flops, self.conventional_train_flops

    @property
    def bwd_s(self) -> float:
        """Backward + update: train minus forward (never below zero under timing noise)."""
        return max(self.train_s - self.fwd_s, 0.0)


def edge_memory(param_bytes: int, stat_bytes: int, residual_bytes_per_example: int, batch: int) -> int:
    """The edge's training memory estimate (see the module docstring): parameters + momentum (one copy)
    + gradients, BatchNorm statistics, and the activations saved for the backward pass of `batch` examples."""
    return 3 * param_bytes + stat_bytes + residual_bytes_per_example * batch


@dataclasses.dataclass(frozen=True)
class SplitProfile:
    """One separation point: the head's timing, bytes at `Profile.payload_batch`, and edge memory."""

    name: str
    index: int
    feature_shape: tuple[int, ...]
    head: Timing
    payload_bytes: dict[int, int]  # bits -> bytes of one encoded batch
    activation_bytes: int  # float32 features + labels (encode at 32 bits)
    gradient_bytes: int  # float32 boundary gradient
    edge_param_bytes: int  # nnx.Param of the edge stages and the head
    edge_stat_bytes: int  # BatchNorm running statistics
    edge_residual_bytes_per_example: int  # activations saved for the backward pass

    def edge_memory_bytes(self, batch: int) -> int:
        """The edge's training memory at `batch` (`edge_memory`)."""
        return edge_memory(self.edge_param_bytes, self.edge_stat_bytes, self.edge_residual_bytes_per_example, batch)


@dataclasses.dataclass(frozen=True)
class Profile:
    """Everything measured about one model on one device."""

    model: str
    input_shape: tuple[int, ...]
    num_classes: int
    device: str
    batch: int  # batch size the times were measured at
    stage_names: tuple[str, ...]
    stages: tuple[Timing, ...]
    classifier: Timing
    splits: tuple[SplitProfile, ...]
    payload_batch: int  # batch size the bytes were computed at
    raw_bytes: int  # uint8 images + labels, one batch of payload_batch
    whole_train_s: float | None  # the unsplit train step, fused (None if not measured)

    def split(self, point: str) -> SplitProfile:
        for s in self.splits:
            if s.name == point:
                return s
        raise ValueError(
            f"no separation point {point!r} in the profile of {self.model}; "
            f"valid: {', '.join(s.name for s in self.splits)}"
        )

    def scaled(self, factor: float, device: str) -> Profile:
        """The same profile with every time multiplied by `factor`: a device `factor` times slower."""
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"scale factor must be positive, got {factor}")

        return self._map_timings(
            lambda t: dataclasses.replace(t, fwd_s=t.fwd_s * factor, train_s=t.train_s * factor),
            device,
            None if self.whole_train_s is None else self.whole_train_s * factor,
        )

    def from_flops(self, flops_per_s: float, device: str, count: str = "conventional") -> Profile:
        """Times of a device that sustains `flops_per_s` on every stage: the flop count / throughput.

        For emulating a device whose per-layer speed tracks flops (a GPU on convolutions) from a
        profile measured where it does not: memory-bound layers (pooling, BatchNorm) come out nearly
        free, and per-layer efficiency differences of the real device are ignored. `count` is the
        convention of both the counts and `flops_per_s` (`flops`): "conventional" counts the padding
        taps, as im2col and cuDNN compute them; "xla" leaves them out.
        """
        if not (math.isfinite(flops_per_s) and flops_per_s > 0):
            raise ValueError(f"throughput must be positive, got {flops_per_s}")

        def timed(t: Timing) -> Timing:
            fwd, train = t.counted(count)
            return dataclasses.replace(t, fwd_s=fwd / flops_per_s, train_s=train / flops_per_s)

        return self._map_timings(timed, device, None)

    def _map_timings(self, fn: Callable[[Timing], Timing], device: str, whole_train_s: float | None) -> Profile:
        return dataclasses.replace(
            self,
            device=device,
            stages=tuple(fn(t) for t in self.stages),
            classifier=fn(self.classifier),
            splits=tuple(dataclasses.replace(s, head=fn(s.head)) for s in self.splits),
            whole_train_s=whole_train_s,
        )

    def train_flops(self, count: str = "conventional") -> float:
        """The flop count (`Timing.counted`) of one train step of every stage and the classifier."""
        return sum(t.counted(count)[1] for t in (*self.stages, self.classifier))

    @property
    def stages_train_s(self) -> float:
        """Sum of the per-stage train times and the classifier's: the cost model's whole model."""
        return sum(t.train_s for t in self.stages) + self.classifier.train_s


def with_payload_batch(profile: Profile, batch: int, bits: Sequence[int] = DEFAULT_BITS) -> Profile:
    """Recompute every byte count for another modeled batch size (shapes only, no timing)."""
    splits = []
    for s in profile.splits:
        payload, activation, gradient = quantization.split_bytes(s.feature_shape, batch, bits, profile.num_classes)
        splits.append(
            dataclasses.replace(s, payload_bytes=payload, activation_bytes=activation, gradient_bytes=gradient)
        )
    return dataclasses.replace(
        profile,
        splits=tuple(splits),
        payload_batch=batch,
        raw_bytes=quantization.raw_image_nbytes(batch, *profile.input_shape, num_classes=profile.num_classes),
    )


def _to_json(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): _to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_json(v) for v in obj]
    return obj


def save_profile(profile: Profile, path: str | Path) -> None:
    from hier_jax.outputs import write_atomic  # a half-written profile would break every later load

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({"format_version": FORMAT_VERSION, **_to_json(profile)}, indent=1) + "\n")


def load_profile(path: str | Path) -> Profile:
    """Read a profile written by `save_profile` (or by hand, on a real board, in the same layout)."""
    data = json.loads(Path(path).read_text())
    if data.pop("format_version", None) != FORMAT_VERSION:
        raise ValueError(f"{path}: not a profile of format version {FORMAT_VERSION}")

    def timing(d: dict) -> Timing:
        optional = {k: None if d.get(k) is None else float(d[k]) for k in ("conventional_fwd_flops",
                                                                             "conventional_train_flops")}  # fmt: skip
        return Timing(
            float(d["fwd_s"]), float(d["train_s"]), float(d["fwd_flops"]), float(d["train_flops"]), **optional
        )

    splits = tuple(
        SplitProfile(
            name=s["name"],
            index=int(s["index"]),
            feature_shape=tuple(s["feature_shape"]),
            head=timing(s["head"]),
            payload_bytes={int(k): int(v) for k, v in s["payload_bytes"].items()},
            activation_bytes=int(s["activation_bytes"]),
            gradient_bytes=int(s["gradient_bytes"]),
            edge_param_bytes=int(s["edge_param_bytes"]),
            edge_stat_bytes=int(s["edge_stat_bytes"]),
            edge_residual_bytes_per_example=int(s["edge_residual_bytes_per_example"]),
        )
        for s in data["splits"]
    )
    return Profile(
        model=data["model"],
        input_shape=tuple(data["input_shape"]),
        num_classes=int(data["num_classes"]),
        device=data["device"],
        batch=int(data["batch"]),
        stage_names=tuple(data["stage_names"]),
        stages=tuple(timing(t) for t in data["stages"]),
        classifier=timing(data["classifier"]),
        splits=splits,
        payload_batch=int(data["payload_batch"]),
        raw_bytes=int(data["raw_bytes"]),
        whole_train_s=None if data["whole_train_s"] is None else float(data["whole_train_s"]),
    )
