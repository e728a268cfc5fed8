"""Set-up and entry points for a fresh clone: `python3 tasks.py quickstart | test [args...]`.

Creates .venv beside this file on first use and (re)installs the package with its test extras
whenever pyproject.toml changes, then runs the quickstart or the test suite inside it. Needs only
Python 3.11+ on the PATH.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")
# torch==2.13.0 is the reference framework of the equivalence tests; pinned so that pip never
# reaches for a newer (multi-GB CUDA) build.
EXTRAS = ".[test,torch]"
COMMANDS = {
    "quickstart": [str(PYTHON), "-m", "experiments.quickstart"],
    "test": [str(PYTHON), "-m", "pytest", "-q", "-ra"],
}


def ensure_venv() -> None:
    if sys.version_info < (3, 11):
        sys.exit(f"hier-jax needs Python 3.11 or newer, this is {sys.version.split()[0]}")
    if not PYTHON.exists():
        print(f"creating {VENV} ...", flush=True)
        venv.create(VENV, with_pip=True)
    stamp = VENV / ".installed"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + EXTRAS.encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        return
    print(f"installing hier-jax{EXTRAS[1:]} into {VENV} ...", flush=True)
    subprocess.run([str(PYTHON), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    subprocess.run([str(PYTHON), "-m", "pip", "install", "-q", "-e", EXTRAS], check=True, cwd=ROOT)
    stamp.write_text(digest)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    ensure_venv()
    return subprocess.run(COMMANDS[argv[0]] + argv[1:], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
