"""How the format-1 checkpoints beside this file were made: run with the code of commit 8681ec6
(before the run record's format 2), from the repository root:

    python tests/data/format1/make.py

Each runner saves one checkpoint at step 3 of a 6-step run on digits, as its format-1 metadata
recorded it: `train/` (the in-process runner, sequential) and `cluster/` (two Ray edges, round
robin). tests/test_record.py resumes both with today's code and checks that they end as an
uninterrupted run of today's code.
"""

import shutil
from pathlib import Path

from hier_jax import process

process.setup()

from hier_jax import cluster, train  # noqa: E402
from hier_jax.config import ExperimentConfig  # noqa: E402
from hier_jax.data import load_dataset  # noqa: E402

HERE = Path(__file__).resolve().parent
CONFIG = ExperimentConfig(
    model="resnet18_tv",
    dataset="digits",
    split="layer1_1",
    bits=4,
    width=4,
    batch_size=32,
    max_steps=6,
    head_channels=8,
    queue_size=1,
    checkpoint_every=3,
    keep_checkpoints=3,
)


def keep_only_step_3(directory: Path) -> None:
    for child in directory.iterdir():
        if child.name != "3":
            shutil.rmtree(child)


def main() -> None:
    digits = load_dataset("digits")
    for name in ("train", "cluster"):
        shutil.rmtree(HERE / name, ignore_errors=True)
    setup = train.build(CONFIG, digits)
    train.train(setup, "sequential", progress=False, checkpoint_dir=HERE / "train")
    keep_only_step_3(HERE / "train")
    cluster.run(CONFIG, digits, cluster.ClusterConfig(edges=2), checkpoint_dir=HERE / "cluster")
    keep_only_step_3(HERE / "cluster")
    cluster.start_ray(cluster.ClusterConfig(), 1).shutdown()


if __name__ == "__main__":
    main()
