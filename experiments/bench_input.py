"""Input-pipeline throughput: train images per second, augmentation included.

    python -m experiments.bench_input --dataset SPEC --batch 128 [--steps N] [--data-dir D] [--out DIR]

Times `--steps` batches after a warm-up epoch start (compilation, first gathers),
blocking on every batch, so the number is what a training loop can be fed at most.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import jax

from hier_jax import cli, outputs, process
from hier_jax.config import check_dataset_spec
from hier_jax.data import AUGMENTATIONS, ImageDataset, load_dataset, num_train_steps, train_batches
from hier_jax.errors import UserError


def endless(ds: ImageDataset, batch_size: int, seed: int) -> Iterator[tuple[jax.Array, jax.Array]]:
    """Consecutive epochs, so --steps may exceed one epoch."""
    epoch = 0
    while True:
        yield from train_batches(ds, batch_size, seed=seed, epoch=epoch)
        epoch += 1


def check_args(args) -> None:
    """Every check that needs no data, so a bad flag fails before anything is loaded."""
    check_dataset_spec(args.dataset)
    for flag, value, least in (("--batch", args.batch, 1), ("--steps", args.steps, 1), ("--warmup", args.warmup, 0)):
        if value < least:
            raise UserError(f"{flag} {value} is invalid; valid: an integer >= {least}")


@cli.entry_point
def main(argv: list[str]) -> dict:
    process.setup()
    parser = cli.Parser(description=__doc__)
    parser.add_argument("--dataset", required=True, help="digits | cifar10 | tiny_imagenet | folder:PATH")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=300, help="timed batches")
    parser.add_argument("--warmup", type=int, default=10, help="untimed batches first")
    parser.add_argument("--data-dir", default=None, help="tfds data directory")
    parser.add_argument("--cache-dir", default=None, help="image-folder cache (default ~/.cache/hier_jax)")
    parser.add_argument(
        "--augmentation", default=None, choices=list(AUGMENTATIONS), help="override the data set's augmentation"
    )
    parser.add_argument("--out", default=None, help="write OUT/bench_input.json")
    args = parser.parse_args(argv)
    check_args(args)
    out = outputs.prepare_run_dir(args.out, outputs=()) if args.out else None

    start = time.perf_counter()
    ds = load_dataset(args.dataset, args.data_dir, cache_dir=args.cache_dir, augmentation=args.augmentation)
    load_s = time.perf_counter() - start
    if args.batch > ds.num_train:
        raise UserError(
            f"--batch {args.batch} is larger than the training split of {ds.name} "
            f"({ds.num_train} images); valid: 1..{ds.num_train}"
        )
    print(
        f"{ds.name}: {ds.num_train} train / {ds.num_test} test {ds.image_shape}, "
        f"{num_train_steps(ds, args.batch)} steps/epoch, loaded in {load_s:.1f} s"
    )

    batches = endless(ds, args.batch, seed=0)
    for _ in range(args.warmup):
        next(batches)[0].block_until_ready()
    start = time.perf_counter()
    for _ in range(args.steps):
        images, labels = next(batches)
        images.block_until_ready()
        labels.block_until_ready()
    elapsed = time.perf_counter() - start
    result = {
        "dataset": args.dataset,
        "batch": args.batch,
        "steps": args.steps,
        "augmentation": ds.augmentation,
        "images_per_s": args.steps * args.batch / elapsed,
        "load_s": load_s,
        "device": str(jax.devices()[0]),
    }
    print(f"{result['images_per_s']:,.0f} train images/s ({ds.augmentation}, batch {args.batch}, {args.steps} steps)")
    if out is not None:
        outputs.write_json(out / "bench_input.json", result)
    return result


if __name__ == "__main__":
    main()
