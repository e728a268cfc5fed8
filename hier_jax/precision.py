"""The precision policy (`--precision auto|fp32|tf32|bf16`): what a model computes in, on both sides.

Parameters, optimizer state and BatchNorm statistics are float32 in every policy; a policy sets
- the compute dtype of activations, matmuls and convolutions: float32, or bfloat16 for "bf16"
  (products accumulated in float32, the loss computed in float32 from float32-cast logits);
- jax's matmul and convolution precision for float32 operands: "highest" for "fp32" (true fp32 on
  GPU and TPU too), "tensorfloat32" for "tf32" (TF32 on GPUs that have it; XLA:CPU computes float32
  either way, so on CPU "tf32" gives the same numbers as "fp32").
"auto" resolves per backend: "fp32" on CPU and GPU, "bf16" on TPU.

Like the convolution formulation (models.xla_cpu), the compute dtype is fixed when a model is built
(`models.build_model(..., precision=...)`; layers read `build_policy()`) and kept in the model as
`model.precision`, so it is part of the GraphDef every jitted step closes over. The matmul precision
is applied where the steps are traced (`steps.make_*(..., precision=...)`, which the runner and the
baselines take from the model): `jax.default_matmul_precision` at trace time is recorded in every
dot and convolution, backward passes included, and never touches the process-wide setting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

POLICIES = ("auto", "fp32", "tf32", "bf16")
DEFAULT = "fp32"  # what models.build_model computes in unless told otherwise (the library's references)


@dataclasses.dataclass(frozen=True)
class Policy:
    """A resolved policy: its name, the dtype activations are computed in, jax's matmul precision."""

    name: str  # fp32 | tf32 | bf16
    compute_dtype: np.dtype
    matmul_precision: str  # a jax.default_matmul_precision value

    def describe(self, backend: str | None = None) -> str:
        """One line for run outputs, e.g. "bf16 (bfloat16 activations, float32 parameters)"."""
        backend = backend or jax.default_backend()
        text = {
            "fp32": "fp32 (float32, matmul precision 'highest')",
            "tf32": "tf32 (float32 storage, TF32 matmuls and convolutions)",
            "bf16": "bf16 (bfloat16 activations and matmuls, float32 accumulation, parameters and loss)",
        }[self.name]
        if self.name == "tf32" and backend != "gpu":
            text += f"; on {backend} the same numbers as fp32"
        return text


RESOLVED = {
    "fp32": Policy("fp32", np.dtype(jnp.float32), "highest"),
    "tf32": Policy("tf32", np.dtype(jnp.float32), "tensorfloat32"),
    "bf16": Policy("bf16", np.dtype(jnp.bfloat16), "default"),
}
AUTO = {"cpu": "fp32", "gpu": "fp32", "tpu": "bf16"}


def resolve(policy: str | Policy = "auto", backend: str | None = None) -> Policy:
    """The Policy `policy` ("auto", "fp32", "tf32", "bf16") means on `backend` (default: jax's default
    backend); ValueError listing the valid names for anything else."""
    if isinstance(policy, Policy):
        return policy
    if policy not in POLICIES:
        raise ValueError(f"unknown precision {policy!r}; valid: {', '.join(POLICIES)}")
    if policy == "auto":
        policy = AUTO.get(backend or jax.default_backend(), "fp32")
    return RESOLVED[policy]


_building = [DEFAULT]


def build_policy() -> Policy:
    """The policy layers built now compute in (DEFAULT unless inside `building`)."""
    return RESOLVED[_building[0]]


@contextlib.contextmanager
def building(policy: str | Policy) -> Iterator[Policy]:
    """Build layers under `policy` (resolved here), e.g. `with building("bf16"): head = ExitHead(...)`."""
    resolved = resolve(policy)
    previous = _building[0]
    _building[0] = resolved.name
    try:
        yield resolved
    finally:
        _building[0] = previous


def traced_under(fn: Callable, policy: str | Policy | None) -> Callable:
    """`fn` traced under the policy's matmul precision (None: the process default, unchanged)."""
    if policy is None:
        return fn
    matmul_precision = resolve(policy).matmul_precision

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.default_matmul_precision(matmul_precision):
            return fn(*args, **kwargs)

    return wrapped
