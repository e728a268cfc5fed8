"""Finding the processes of a test's Ray cluster, to check that none outlives what started it."""

import os
import time


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
