"""Train one split model and report both exits: the general-purpose experiment.

    python -m experiments.train --model vgg16 --dataset cifar10 --split pool3 --bits 4 --epochs 30 --out DIR
    python -m experiments.train --dataset folder:../shared/data/cifar10-jpeg --model resnet18_tv --width 32 ...
    python -m experiments.train ... --link 3g --time-scale 0.001 --outage 100:150   # over a simulated link
    python -m experiments.train ... --scheme end_to_end      # a baseline: end_to_end | split_learning
    python -m experiments.train ... --edges 2 --dirichlet 0.3 --edge-sync 50      # two edges, one cloud
    python -m experiments.train ... --backend ray            # every worker in a Ray process (experiments.cluster)
    python -m experiments.train --resume DIR      # continue a stopped run where its last checkpoint left it

Writes DIR/summary.json (config, scheme, schedule, backend, the resolved --precision policy, each
edge's and the mean accuracies, bytes, wall time), DIR/metrics.csv (per-step losses and accuracies of
every edge and of the cloud), DIR/curves.png, and DIR/checkpoints/STEP (every worker's state, every
--checkpoint-every steps and at the end; the latest --keep-checkpoints kept). An --out that already
holds any part of a run is refused before any work unless --resume (continue it) or --overwrite
(replace it) is given. Ctrl-C or SIGTERM stops every side after the steps in flight, saves them,
prints the command that resumes and exits 130.
"""

from __future__ import annotations

from hier_jax import cli
from hier_jax.config import ExperimentConfig
from hier_jax.run import command

DEFAULTS = ExperimentConfig(model="resnet18", dataset="cifar10", split="layer2_1", bits=4, epochs=1)


@cli.entry_point
def main(argv: list[str]) -> dict:
    return command.main(argv, prog="experiments.train", doc=__doc__, defaults=DEFAULTS)


if __name__ == "__main__":
    main()
