"""N edges and one cloud as separate processes on Ray: `experiments.train` with `--backend ray` and
small defaults, each worker in its own JAX runtime, pinned to its own cores, the cloud on a GPU where
Ray has one.

    python -m experiments.cluster --dataset digits --model resnet18_tv --width 8 --edges 2 --out runs/c
    python -m experiments.cluster ... --edges 4 --dirichlet 0.3 --edge-sync 50 --order async
    python -m experiments.cluster ... --link 3g,wifi --time-scale 0.01 --outage 20:30  # a simulated link per edge
    python -m experiments.cluster ... --kill-edge 1:20     # edge 1's process dies at its step 20
    python -m experiments.cluster ... --kill-edge 1:20 --max-restarts 1   # ... and comes back
    python -m experiments.cluster ... --address HEAD:6379  # join a running Ray cluster (README)
    python -m experiments.cluster --resume runs/c          # continue a stopped run

Writes what experiments.train writes (summary.json, metrics.csv, curves.png, checkpoints/) in the
same layout; an --out that holds any part of a run is refused before any worker starts, unless
--resume or --overwrite. Needs the `ray` extra: pip install -e .[ray].
"""

from __future__ import annotations

from hier_jax import cli
from hier_jax.config import ExperimentConfig
from hier_jax.run import command

DEFAULTS = ExperimentConfig(
    model="resnet18_tv", dataset="digits", split="layer1_1", bits=4, width=8, batch_size=32, epochs=1, backend="ray"
)


@cli.entry_point
def main(argv: list[str]) -> dict:
    return command.main(argv, prog="experiments.cluster", doc=__doc__, defaults=DEFAULTS)


if __name__ == "__main__":
    main()
