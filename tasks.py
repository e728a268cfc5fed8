"""Set-up and entry points for a fresh clone: `python3 tasks.py quickstart | lint | test [options] [pytest args]`.

Creates .venv beside this file on first use and (re)installs the package with its test extras
whenever pyproject.toml changes, then runs the quickstart or the test suite inside it. Needs only
Python 3.11+ on the PATH.

`lint`: ruff (lint and format check) over the tree, pyright (basic) over hier_jax; what CI runs first.

`test` options (before any pytest arguments):
  --fast                 leave out the tests marked slow (Ray, CLI subprocesses, grids, benchmarks,
                         long equivalence runs), in two worker processes (pytest-xdist)
  --backend cpu|gpu|tpu  run the whole suite with JAX on that backend (the host CPU stays visible for
                         tests that pair an accelerator with it) and write DIR/junit.xml and
                         DIR/summary.md: passed, failed, skipped with reasons, and the golden
                         trajectory's largest deviation. Without it: the plain suite (what CI runs).
  --out DIR              where those go (default test-results/BACKEND)
  --system               use this Python and what it has installed instead of .venv (a machine that
                         came with jax for its accelerator and has no package index)
"""

from __future__ import annotations

import collections
import hashlib
import os
import subprocess
import sys
import venv
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")
# torch==2.13.0 is the reference framework of the equivalence tests; pinned so that pip never
# reaches for a newer (multi-GB CUDA) build.
EXTRAS = ".[test,torch,lint]"
COMMANDS = {
    "quickstart": ["-m", "experiments.quickstart"],
    "lint": [],
    "test": ["-m", "pytest", "-q", "-ra"],
}
LINT = (["-m", "ruff", "check", "."], ["-m", "ruff", "format", "--check", "."], ["-m", "pyright"])
# JAX_PLATFORMS per backend: the accelerator first (it is jax's default), the host CPU beside it.
BACKENDS = {"cpu": "cpu", "gpu": "cuda,cpu", "tpu": "tpu,cpu"}
# XLA flags per backend for the test run: GPU reductions and scatters without atomics, so that the
# bit-for-bit tests (overlapped == sequential, resume == uninterrupted) hold on the GPU too.
BACKEND_XLA_FLAGS = {"gpu": "--xla_gpu_deterministic_ops=true"}


def ensure_venv() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - tasks.py runs under whatever python3 a user has
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


def split_test_options(args: list[str]) -> tuple[dict, list[str]]:
    """(tasks.py's own test options, the pytest arguments after them)."""
    options = {"backend": None, "out": None, "system": False, "fast": False}
    while args and args[0] in ("--backend", "--out", "--system", "--fast"):
        flag = args.pop(0)
        if flag in ("--system", "--fast"):
            options[flag[2:]] = True
            continue
        if not args:
            sys.exit(f"tasks.py test: error: {flag} needs a value")
        options[flag[2:]] = args.pop(0)
    if options["backend"] is not None and options["backend"] not in BACKENDS:
        sys.exit(f"tasks.py test: error: --backend {options['backend']!r} is not one of {', '.join(BACKENDS)}")
    if options["out"] is not None and options["backend"] is None:
        sys.exit("tasks.py test: error: --out goes with --backend")
    return options, args


def summarize(junit: Path, backend: str, env: dict[str, str]) -> str:
    """A one-page Markdown summary of a pytest JUnit XML file."""
    cases = list(ET.parse(junit).getroot().iter("testcase"))
    failed, skipped, golden = [], collections.Counter(), {}
    for case in cases:
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        for prop in case.iter("property"):
            if prop.get("name", "").startswith("golden_"):
                golden[prop.get("name")[len("golden_") :]] = prop.get("value")
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        if problem is not None:
            message = (problem.get("message") or "").strip().splitlines() or [""]
            failed.append(f"- `{name}`: {message[0][:200]}")
        elif case.find("skipped") is not None:
            skipped[(case.find("skipped").get("message") or "").strip()[:200]] += 1
    passed = len(cases) - len(failed) - sum(skipped.values())
    lines = [
        f"# hier-jax tests on {backend}",
        "",
        f"JAX_PLATFORMS={env.get('JAX_PLATFORMS', '')}  XLA_FLAGS={env.get('XLA_FLAGS', '')}",
        "",
        f"**{passed} passed, {len(failed)} failed, {sum(skipped.values())} skipped** ({len(cases)} tests)",
        "",
    ]
    if failed:
        lines += ["## Failed", "", *failed, ""]
    if skipped:
        lines += ["## Skipped", "", *(f"- {n} x {reason}" for reason, n in skipped.most_common()), ""]
    lines += ["## Golden trajectory (tests/golden/cpu.json)", ""]
    if golden:
        lines += [f"- {key}: {value}" for key, value in sorted(golden.items())]
    else:
        lines.append("- no deviation recorded (the golden test did not run)")
    return "\n".join(lines) + "\n"


def run_tests(args: list[str]) -> int:
    options, pytest_args = split_test_options(list(args))
    python = sys.executable if options["system"] else str(PYTHON)
    if not options["system"]:
        ensure_venv()
    backend = options["backend"]
    if options["fast"]:  # two worker processes: the suite is bound by compiling, one core each
        pytest_args = ["-m", "not slow", "-n", "2", *pytest_args]
    if backend is None:
        return subprocess.run([python, *COMMANDS["test"], *pytest_args], cwd=ROOT).returncode
    out = Path(options["out"] or ROOT / "test-results" / backend).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, JAX_PLATFORMS=BACKENDS[backend])
    if backend in BACKEND_XLA_FLAGS:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {BACKEND_XLA_FLAGS[backend]}".strip()
    junit = out / "junit.xml"
    code = subprocess.run(
        [python, *COMMANDS["test"], f"--junitxml={junit}", "-o", "junit_family=xunit1", *pytest_args], cwd=ROOT, env=env
    ).returncode
    if junit.exists():
        summary = summarize(junit, backend, env)
        (out / "summary.md").write_text(summary)
        print(f"\n{summary}wrote {junit} and {out / 'summary.md'}")
    return code


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    if argv[0] == "test":
        return run_tests(argv[1:])
    if argv[0] == "lint":
        ensure_venv()
        codes = [subprocess.run([str(PYTHON), *command], cwd=ROOT).returncode for command in LINT]
        return max(codes)
    ensure_venv()
    return subprocess.run([str(PYTHON), *COMMANDS[argv[0]], *argv[1:]], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
