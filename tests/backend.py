"""The backend the tests run on, its precision policy, and how closely two computations must agree there.

Every numeric tolerance of the suite comes from `tolerance(kind)`, so that running the suite on
another backend (`python3 tasks.py test --backend gpu|tpu`) changes the numbers in one place, each
with its reason. Exact equalities (pipelined == sequential, resume == uninterrupted, a cloud setting
leaving the edge untouched) are not tolerances: they hold bit for bit on every backend, because both
sides of each run the same compiled program on the same inputs (on the GPU with
--xla_gpu_deterministic_ops, which tasks.py sets, so that no reduction depends on atomics' order).

Precision policy: `PRECISION` ("highest") is jax's default matmul and convolution precision for the
whole test session (conftest), so float32 means float32 everywhere. Without it the GPU computes fp32
matmuls and convolutions in TF32 (10-bit mantissa) and the TPU in bfloat16 (8-bit), round-off the
tolerances below would have to absorb. The library sets the same where it builds its steps (the
runner and the baselines trace them under the model's policy, hier_jax.precision: "fp32" is
"highest" too); steps a test builds without `precision=` take this session default.
"""

from __future__ import annotations

import dataclasses

import jax

PRECISION = "highest"


@dataclasses.dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float
    why: str

    def kwargs(self) -> dict[str, float]:
        return {"rtol": self.rtol, "atol": self.atol}


# kind -> backend -> Tolerance. Figures quoted are measured by the commands named; "unmeasured" says
# where no run on that backend has been made yet (tasks.py test --backend writes the golden deviation
# into its summary, which is how the next run should set them).
_TOLERANCES: dict[str, dict[str, Tolerance]] = {
    # One forward or one step computed two ways with the same math but another summation order: split
    # vs unsplit forward, a CPU convolution formulation vs lax.conv, the pure step vs nnx autodiff.
    "reordered": {
        "cpu": Tolerance(1e-5, 1e-6, "float32 round-off (~6e-8 per add) over sums of a few thousand terms"),
        "gpu": Tolerance(
            1e-5,
            1e-6,
            "as on CPU: fp32 at precision 'highest'; cuDNN may pick another algorithm (summation order) for each graph",
        ),
        "tpu": Tolerance(
            1e-4,
            1e-6,
            "'highest' on TPU is a multi-pass bf16 emulation of fp32, a few ulps "
            "less exact than native fp32; unmeasured",
        ),
    },
    # Parameters after an optimizer step computed two ways: round-off of the gradient, divided by its
    # small magnitude in the update, lands in parameters that start near zero (hence atol).
    "step": {
        "cpu": Tolerance(1e-4, 1e-6, "gradient round-off relative to tiny updates"),
        "gpu": Tolerance(1e-4, 1e-6, "as on CPU"),
        "tpu": Tolerance(1e-3, 1e-5, "multi-pass bf16 fp32 emulation; unmeasured"),
    },
    # Losses and parameters after a few training steps computed two ways (vanilla split learning
    # against end-to-end training): round-off of each step compounds through the updates and
    # BatchNorm, most in parameters that move little (hence atol).
    "trajectory": {
        "cpu": Tolerance(1e-4, 1e-6, "the two agree to 1e-5 after three steps at width 4 (docs/speed.md)"),
        # On an H100 the first conv kernel after three steps differed by 1.5e-4 absolute, fp32 at
        # 'highest' (docs/speed.md, "Known problems"): the split-learning edge backward is a jitted
        # vjp of its own, so cuDNN autotunes its convolutions apart from end-to-end's fused backward
        # and may pick other algorithms (another summation order); XLA:GPU reductions with atomics
        # (run-to-run order) may add to it, which tasks.py's --xla_gpu_deterministic_ops removes.
        "gpu": Tolerance(
            1e-3,
            3e-4,
            "cuDNN algorithm choice differs between the split and the fused "
            "backward: 1.5e-4 absolute measured on an H100, 2x margin",
        ),
        "tpu": Tolerance(2e-3, 3e-4, "multi-pass bf16 fp32 emulation compounded over steps; unmeasured"),
    },
    # A fresh golden trajectory (tests/golden/) against the stored one, on a build that differs from
    # the one that wrote it (another CPU model, jaxlib or backend). On the build that wrote it the run
    # is compared bit for bit instead. Measured on the writing machine by swapping the convolution
    # programs (YNNPACK for Eigen, lax for the CPU formulations: another summation order in every
    # convolution): per-step losses moved by at most 9.3e-7 relative over the 20 steps, no accuracy
    # changed. 3e-5 is 30x that, for a CPU with other vector widths.
    "golden": {
        "cpu": Tolerance(3e-5, 0.0, "30x the deviation of a different convolution program on the same CPU (9.3e-7)"),
        "gpu": Tolerance(1e-4, 0.0, "fp32 at 'highest', cuDNN's own convolution algorithms; unmeasured"),
        "tpu": Tolerance(2e-3, 0.0, "multi-pass bf16 fp32 emulation; unmeasured"),
    },
}
KINDS = tuple(_TOLERANCES)


def backend() -> str:
    """The backend jax computes on by default: "cpu", "gpu" or "tpu"."""
    return jax.default_backend()


def tolerance(kind: str, on: str | None = None) -> Tolerance:
    """The tolerance of `kind` (one of KINDS) on backend `on` (default: this session's)."""
    on = on or backend()
    if kind not in _TOLERANCES:
        raise KeyError(f"unknown tolerance kind {kind!r}; kinds: {', '.join(KINDS)}")
    if on not in _TOLERANCES[kind]:
        raise KeyError(f"no {kind} tolerance for backend {on!r}; backends: {', '.join(_TOLERANCES[kind])}")
    return _TOLERANCES[kind][on]
