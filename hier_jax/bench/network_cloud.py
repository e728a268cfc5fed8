"""The cloud process of one `bench.network` run: the remote backend's cloud (`remote.launch.run`) without
the end's evaluation or final states (over a 3G link they would take longer than the run), its record
and traffic written as JSON for the benchmark to read.

    python -m hier_jax.bench.network_cloud SPEC.json RESULT.json

SPEC.json: {"config": the ExperimentConfig as a dict, "listen", "tls_cert", "tls_key"}.
"""

from __future__ import annotations

import json
from pathlib import Path

from hier_jax import cli, outputs, process
from hier_jax.errors import UserError


@cli.entry_point
def main(argv: list[str]) -> dict:
    process.setup(host_devices=1)
    if len(argv) != 2:
        raise UserError("usage: python -m hier_jax.bench.network_cloud SPEC.json RESULT.json")
    from hier_jax.config import ExperimentConfig, from_dict
    from hier_jax.data import load_dataset
    from hier_jax.remote import launch
    from hier_jax.remote.config import CloudConfig

    spec = json.loads(Path(argv[0]).read_text())
    config = from_dict(ExperimentConfig, spec["config"])
    cloud = CloudConfig(listen=spec["listen"], tls_cert=spec["tls_cert"], tls_key=spec["tls_key"])
    dataset = load_dataset(config.dataset, data_dir=config.data_dir or None)
    result = launch.run(config, dataset, cloud, evaluate=False, final_states=False)
    written = {
        "record": result.record.to_json(),
        "network": result.network,
        "payload_bytes": result.payload_bytes,
        "placement": result.placement,
        "wall_s": result.wall_s,
    }
    outputs.write_json(argv[1], written)
    return written


if __name__ == "__main__":
    main(None)
