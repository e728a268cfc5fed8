"""The cloud of a run over a real network: it listens, each edge process dials it, and it runs the
scheduler, its own worker and the run's files (the layout of experiments.train).

    export HIER_JAX_TOKEN=...      # the same on the cloud and every edge; never a flag
    python -m experiments.cloud --listen 0.0.0.0:50051 --tls-cert cloud.pem --tls-key cloud.key \
        --edges 2 --model resnet18 --dataset cifar10 --split layer2_1 --bits 4 --out runs/net
    python -m experiments.cloud --listen 127.0.0.1:50051 --insecure ...     # plaintext: loopback only

Then start each edge with the same training flags (python -m experiments.edge). An edge whose flags
differ is refused, naming the flag, on both sides. Everything else is experiments.train's: --resume,
--overwrite, the checkpoints, Ctrl-C with the command that resumes.
"""

from __future__ import annotations

from hier_jax import cli
from hier_jax.config import ExperimentConfig
from hier_jax.run import command

DEFAULTS = ExperimentConfig(
    model="resnet18", dataset="cifar10", split="layer2_1", bits=4, epochs=1, backend="remote", timeout_s=600.0
)


@cli.entry_point
def main(argv: list[str]) -> dict:
    return command.main(argv, prog="experiments.cloud", doc=__doc__, defaults=DEFAULTS)


if __name__ == "__main__":
    main()
