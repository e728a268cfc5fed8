"""An edge of a run over a real network: it dials the cloud (so it can sit behind NAT), trains its
shard of the training split and sends the cloud only what the scheme sends (hierarchical: the
quantized payload), until the cloud says the run is over.

    export HIER_JAX_TOKEN=...      # the cloud's
    python -m experiments.edge --connect cloud.example:50051 --tls-ca ca.pem --edge 0 \
        --edges 2 --model resnet18 --dataset cifar10 --split layer2_1 --bits 4

The training flags must be the cloud's (the cloud refuses the edge otherwise, naming the flag).
"""

from __future__ import annotations

import shlex

from hier_jax import cli, flags, process
from hier_jax.config import ExperimentConfig, validate
from hier_jax.data import load_dataset
from hier_jax.remote.config import EDGE_FLAGS, EdgeConfig

DEFAULTS = ExperimentConfig(model="resnet18", dataset="cifar10", split="layer2_1", bits=4, epochs=1)


@cli.entry_point
def main(argv: list[str]) -> dict:
    process.setup(host_devices=1)
    parser = cli.Parser(prog="experiments.edge", description=__doc__)
    flags.add_flags(parser, ExperimentConfig, DEFAULTS, include=EDGE_FLAGS)
    flags.add_flags(parser, EdgeConfig)
    args = parser.parse_args(argv)
    config = flags.parse(ExperimentConfig, args, DEFAULTS)
    edge_config = flags.parse(EdgeConfig, args)
    validate(config)
    from hier_jax.remote import launch

    launch.check_edge(config, edge_config)  # every set-up mistake before any data is loaded
    dataset = load_dataset(config.dataset, data_dir=config.data_dir or None)
    again = shlex.join(["python", "-m", "experiments.edge", *argv])
    return launch.serve_edge(config, dataset, edge_config, again=f"start it again with: {again}")


if __name__ == "__main__":
    main()
