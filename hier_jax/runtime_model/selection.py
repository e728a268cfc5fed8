"""Choose the separation point (and bit width) from profiles, a link and the edge's memory budget.

Every separation point of the model, at every candidate bit width, gets a modeled epoch time under
one scheme (`costmodel`) and an edge memory estimate (`SplitProfile.edge_memory_bytes`: parameters,
momentum, gradients, BatchNorm statistics and the activations kept for the backward pass, of the
edge stages plus the early exit). Points over the budget are excluded; the fastest of the rest wins,
and the whole ranked table comes back so the choice can be inspected.

Accuracy (optional): a table of measured accuracies, keyed by separation point name or by
(name, bits). Among the points that fit in memory, those more than `max_accuracy_drop` below the best
accuracy in the table are excluded, as are points the table does not list; then the fastest wins. A
tolerance rather than a weighted sum of time and accuracy, because the two have no common unit: the
user states how much accuracy they will give up, and within it time decides.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from hier_jax.link import Link
from hier_jax.runtime_model.costmodel import Workload, epoch_time
from hier_jax.runtime_model.profile import Profile


@dataclasses.dataclass(frozen=True)
class Candidate:
    split: str
    index: int
    bits: int
    epoch_s: float
    edge_memory_bytes: int
    fits: bool  # within the memory budget
    accuracy: float | None
    eligible: bool  # fits, and within the accuracy tolerance when a table is given


@dataclasses.dataclass(frozen=True)
class Selection:
    best: Candidate
    candidates: tuple[Candidate, ...]  # every (split, bits), fastest first


def check_profiles(edge: Profile, cloud: Profile) -> None:
    """Both profiles must describe the same model and the same modeled batch of bytes."""
    if (edge.model, edge.input_shape, edge.num_classes, edge.stage_names, edge.payload_batch) != (
        cloud.model,
        cloud.input_shape,
        cloud.num_classes,
        cloud.stage_names,
        cloud.payload_batch,
    ):
        raise ValueError(
            f"edge and cloud profiles differ: {edge.model} {edge.input_shape} batch "
            f"{edge.payload_batch} vs {cloud.model} {cloud.input_shape} batch {cloud.payload_batch}"
        )


def workload(edge: Profile, cloud: Profile, point: str, bits: int, *, batch: int, num_examples: int) -> Workload:
    """Per-batch cost-model inputs at `batch`; times scale linearly from each profile's measured batch."""
    check_profiles(edge, cloud)
    if batch != edge.payload_batch:
        raise ValueError(
            f"the profile's bytes are for batch {edge.payload_batch}, not {batch}; "
            f"recompute them with profile.with_payload_batch(profile, {batch})"
        )
    if num_examples < batch:
        raise ValueError(f"need at least one batch: num_examples {num_examples} < batch {batch}")
    s = edge.split(point)
    cloud.split(point)  # the cloud's profile must know the point too (ValueError naming it)
    if bits not in s.payload_bytes:
        raise ValueError(f"the profile has payload bytes for bits {sorted(s.payload_bytes)}, not {bits}")
    k = s.index
    e_scale, c_scale = batch / edge.batch, batch / cloud.batch
    return Workload(
        edge_fwd_s=e_scale * sum(t.fwd_s for t in edge.stages[: k + 1]),
        edge_bwd_s=e_scale * sum(t.bwd_s for t in edge.stages[: k + 1]),
        head_fwd_s=e_scale * s.head.fwd_s,
        head_bwd_s=e_scale * s.head.bwd_s,
        cloud_train_s=c_scale * (sum(t.train_s for t in cloud.stages[k + 1 :]) + cloud.classifier.train_s),
        full_train_s=c_scale * cloud.stages_train_s,
        payload_bytes=s.payload_bytes[bits],
        activation_bytes=s.activation_bytes,
        gradient_bytes=s.gradient_bytes,
        raw_bytes=edge.raw_bytes,
        batches_per_epoch=num_examples // batch,
    )


def _accuracy(table: Mapping, point: str, bits: int) -> float | None:
    return table.get((point, bits), table.get(point))


def select_split(
    edge: Profile,
    cloud: Profile,
    link: Link,
    *,
    batch: int,
    num_examples: int,
    memory_budget_bytes: int,
    bits: Sequence[int] = (4,),
    scheme: str = "hierarchical_pipelined",
    epochs: int = 1,
    accuracy: Mapping[str | tuple[str, int], float] | None = None,
    max_accuracy_drop: float = 0.01,
    reference_accuracy: float | None = None,
) -> Selection:
    """Rank every (separation point, bits) by modeled epoch time; the best one that fits the budget wins.

    The accuracy tolerance is measured from `reference_accuracy` when given (end-to-end training's,
    say), else from the best accuracy in the table.
    """
    table = []
    for s in edge.splits:
        memory = s.edge_memory_bytes(batch)
        for b in bits:
            t = epoch_time(
                scheme, workload(edge, cloud, s.name, b, batch=batch, num_examples=num_examples), link, epochs
            )
            acc = None if accuracy is None else _accuracy(accuracy, s.name, b)
            table.append(Candidate(s.name, s.index, b, t, memory, memory <= memory_budget_bytes, acc, False))
    fitting = [c for c in table if c.fits]
    if not fitting:
        smallest = min(table, key=lambda c: c.edge_memory_bytes)
        raise ValueError(
            f"edge memory budget {memory_budget_bytes:,} B is below every separation point's need; "
            f"the smallest is {smallest.edge_memory_bytes:,} B at {smallest.split!r} (batch {batch})"
        )
    if accuracy is not None:
        known = [c.accuracy for c in fitting if c.accuracy is not None]
        if not known:
            raise ValueError("the accuracy table lists no separation point that fits the memory budget")
        floor = (max(known) if reference_accuracy is None else reference_accuracy) - max_accuracy_drop
        eligible = {(c.split, c.bits) for c in fitting if c.accuracy is not None and c.accuracy >= floor}
        if not eligible:
            raise ValueError(
                f"no separation point that fits the memory budget is within {max_accuracy_drop} of "
                f"the reference accuracy {floor + max_accuracy_drop:.4f} (best measured: {max(known):.4f})"
            )
    else:
        eligible = {(c.split, c.bits) for c in fitting}
    table = sorted(
        (dataclasses.replace(c, eligible=(c.split, c.bits) in eligible) for c in table),
        key=lambda c: (c.epoch_s, c.index, c.bits),
    )
    return Selection(next(c for c in table if c.eligible), tuple(table))
