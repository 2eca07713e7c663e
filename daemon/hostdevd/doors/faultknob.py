"""A test knob for the lab's fault scenarios: crash (as kill -9 would) or hang at a named
executor step boundary ("claim:12", "bind:0000:04:00.1", "restore:0000:04:00.0", "drop:12").

It is off unless the environment names a file, ``HOSTDEVD_FAULT_FILE`` (the lab's systemd
drop-in sets it to /run/hostdevd/fault). At every boundary the file is read; each line is
``crash NAME`` or ``pause NAME``:

* crash: the line's file is removed (a restarted daemon must not crash again while it
  recovers) and the process exits at once with status 137, flushing nothing.
* pause: NAME is appended to FILE.paused and the calling thread sleeps for good, so a test can
  cut the power (kill L1's QEMU) between two known sysfs writes.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def parse(text: str) -> dict[str, str]:
    """{boundary: action} from the file's lines; unknown actions are ignored with a warning."""
    wanted: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 2:
            continue
        action, name = parts
        if action in ("crash", "pause"):
            wanted[name] = action
        else:
            log.warning("fault file: unknown action %r (crash or pause)", action)
    return wanted


def from_environment(env: dict[str, str] | os._Environ = os.environ,
                     exit_now: Callable[[int], None] = os._exit,
                     sleep: Callable[[float], None] = time.sleep) -> Callable[[str], None] | None:
    """The executor's on_step hook for this environment, or None when no knob is set."""
    if not env.get("HOSTDEVD_FAULT_FILE"):
        return None
    path = Path(env["HOSTDEVD_FAULT_FILE"])
    log.warning("HOSTDEVD_FAULT_FILE=%s is set: this daemon will crash or hang where it says", path)

    def on_step(step: str) -> None:
        try:
            action = parse(path.read_text()).get(step)
        except OSError:
            return
        if action == "crash":
            path.unlink(missing_ok=True)
            exit_now(137)
        elif action == "pause":
            with open(f"{path}.paused", "a") as f:
                f.write(step + "\n")
                f.flush()
            while True:
                sleep(3600)
    return on_step
