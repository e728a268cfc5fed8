"""Finding the processes a test started (its Ray cluster's, its children), to check that none
outlives it."""

import os
import time
from pathlib import Path


def processes_with_token(token: str) -> set[int]:
    """Every other process of this user whose environment holds this Ray cluster's token: the head's
    processes and every worker inherit it from the driver (start_ray makes a fresh one per run)."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                environ = open(f"/proc/{entry}/environ", "rb").read()
            except OSError:  # gone meanwhile, or another user's
                continue
            if f"RAY_AUTH_TOKEN={token}".encode() in environ.split(b"\0"):
                found.add(int(entry))
    return found


def wait_until_gone(pids: set[int], timeout_s: float = 30.0) -> set[int]:
    """The pids still alive after `timeout_s` (zombies count as gone)."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = set()
        for pid in pids:
            try:
                if open(f"/proc/{pid}/stat").read().split(") ")[-1][0] != "Z":
                    alive.add(pid)
            except OSError:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def children() -> set[int]:
    """This process's live child processes (zombies count as gone)."""
    found = set()
    for entry in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if stat[0] != "Z" and int(stat[1]) == os.getpid():
            found.add(int(entry))
    return found
