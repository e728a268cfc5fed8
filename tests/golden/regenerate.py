"""Rewrite tests/golden/cpu.json from a fresh run of the golden trajectory on this machine's CPU.

    python tests/golden/regenerate.py

Run it only when a change is meant to alter the numbers (a new model default, a new optimizer rule),
and say so in the commit; the file records the versions and CPU that produced it.
"""

import dataclasses
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path[:0] = [str(HERE.parents[1]), str(HERE.parent)]
    from hier_jax import process

    process.setup()  # the experiments' process set-up, as the tests have it
    from golden import trajectory

    golden = {
        "machine": trajectory.machine(),
        "config": dataclasses.asdict(trajectory.CONFIG),
        "runs": trajectory.record(),
    }
    path = HERE / "cpu.json"
    path.write_text(json.dumps(golden, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
