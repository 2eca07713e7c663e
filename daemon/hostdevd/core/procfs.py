"""The only module that reads /proc: raw access under a configurable root, and the scan of every
process's open files and mappings (who holds a device open, R16; QEMU's vfio opens, R14).

* :class:`RealProc` does the raw reads (``listdir``, ``readlink``, capped ``read``) under its root,
  ``/proc`` by default; tests point it at a directory of their own, and
  ``hostdevd.sim.simkernel.SimKernel`` answers the same three calls in memory
  (``proc_listdir``, ``proc_readlink``, ``proc_read`` of the sysfs backend protocol).
* :class:`ProcScanner` walks ``<pid>/fd/*`` (readlink) and ``<pid>/maps`` (mmapped files) of every
  process once and says who holds which of the paths it is asked about. It is bounded (process,
  fd and byte limits and a deadline) and tolerant: a process that exits mid-scan is skipped, one
  that cannot be read (EACCES: not root, or no CAP_SYS_PTRACE) is counted, never an error. The
  caller decides what an incomplete scan means (the planner warns: holders may be missed).
"""
from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

K = TypeVar("K")

_COMM_RE = re.compile(r"[^\x20-\x7e]")
_UNIT_RE = re.compile(r"^[A-Za-z0-9:_.@\\-]{1,200}\.service$")
MAX_PIDS = 65536
MAX_FDS = 16384            # per process
MAX_MAPS_BYTES = 4 << 20   # per process: a browser's maps is ~1 MiB
DEADLINE = 3.0             # seconds for one whole scan


class ProcAccess(Protocol):
    """Raw /proc operations on paths relative to the proc root ("812/fd", "812/fd/3")."""

    def proc_listdir(self, rel: str) -> list[str]: ...
    def proc_readlink(self, rel: str) -> str: ...
    def proc_read(self, rel: str) -> str: ...


class RealProc:
    """The real /proc, or any directory laid out like it."""

    def __init__(self, root: str = "/proc"):
        self.root = root

    @property
    def self_pids(self) -> tuple[int, ...]:
        """This process, when the root is the real /proc (a test tree has no such pid)."""
        return (os.getpid(),) if os.path.realpath(self.root) == "/proc" else ()

    def _p(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def proc_listdir(self, rel: str) -> list[str]:
        return os.listdir(self._p(rel))

    def proc_readlink(self, rel: str) -> str:
        return os.readlink(self._p(rel))

    def proc_read(self, rel: str, limit: int = -1) -> str:
        with open(self._p(rel), encoding="utf-8", errors="replace") as f:
            return f.read(limit)


@dataclass(frozen=True)
class Holder:
    """One process holding one path: through an open fd or a mapping (``via`` "fd" or "mmap")."""
    pid: int
    comm: str
    path: str
    via: str = "fd"
    unit: str | None = None       # its systemd service, from /proc/<pid>/cgroup (None: not a service)

    @property
    def label(self) -> str:
        """``nvidia-persistenced[812]``."""
        return f"{self.comm}[{self.pid}]"

    def to_json(self) -> dict:
        return {"pid": self.pid, "comm": self.comm, "path": self.path, "via": self.via, "unit": self.unit}


@dataclass
class ScanResult:
    holders: dict = field(default_factory=dict)   # key (from the caller's match) -> [Holder]
    processes: int = 0                            # processes looked at
    unreadable: int = 0                           # processes whose fds/maps could not be read (EACCES)
    truncated: str | None = None                  # why the scan stopped early, None when it ran through

    @property
    def complete(self) -> bool:
        return self.truncated is None and not self.unreadable

    def incomplete_text(self) -> str:
        """"12 processes could not be read (permission)", "the scan stopped after 3.0 s"."""
        parts = []
        if self.unreadable:
            parts.append(f"{self.unreadable} of {self.processes} processes could not be read (permission: "
                         "run as root)")
        if self.truncated:
            parts.append(self.truncated)
        return "; ".join(parts)


def _comm(text: str) -> str:
    return _COMM_RE.sub("?", text.strip())[:32] or "?"


def unit_of(cgroup_text: str) -> str | None:
    """The systemd service a process runs in, from /proc/<pid>/cgroup (v2 "0::/system.slice/x.service",
    or v1's name=systemd line); None for session scopes, user processes and kernel threads."""
    for line in cgroup_text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3 or parts[1] not in ("", "name=systemd"):
            continue
        for comp in reversed(parts[2].split("/")):
            if _UNIT_RE.match(comp) and comp != "user@.service" and not comp.startswith("user@"):
                return comp
    return None


class ProcScanner:
    def __init__(self, access: ProcAccess, *, max_pids: int = MAX_PIDS, max_fds: int = MAX_FDS,
                 max_maps_bytes: int = MAX_MAPS_BYTES, deadline: float = DEADLINE,
                 clock: Callable[[], float] = time.monotonic, exclude: Iterable[int] = ()):
        """``exclude``: pids never reported (hostdevd itself: another of its threads may be reading
        a device's config at that moment)."""
        self.access = access
        self.exclude = {str(p) for p in exclude}
        self.max_pids, self.max_fds, self.max_maps_bytes = max_pids, max_fds, max_maps_bytes
        self.deadline = deadline
        self.clock = clock

    def pids(self) -> list[str]:
        try:
            return sorted((p for p in self.access.proc_listdir("") if p.isdigit() and p not in self.exclude), key=int)
        except OSError:
            return []

    def fd_targets(self, pid: str) -> Iterable[str]:
        """What each open fd of ``pid`` points to; OSError when its fd directory cannot be read."""
        fd_dir = f"{pid}/fd"
        for n, fd in enumerate(self.access.proc_listdir(fd_dir)):
            if n >= self.max_fds:
                return
            try:
                yield self.access.proc_readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue            # closed between listdir and readlink

    def mapped_paths(self, pid: str) -> set[str]:
        """The files ``pid`` has mapped (the 6th column of maps); OSError when unreadable."""
        text = self.access.proc_read(f"{pid}/maps")[: self.max_maps_bytes]
        out = set()
        for line in text.splitlines():
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].startswith("/"):
                out.add(parts[5].removesuffix(" (deleted)"))
        return out

    def _describe(self, pid: str) -> tuple[str, str | None] | None:
        """(comm, unit); None when the process is gone."""
        try:
            comm = _comm(self.access.proc_read(f"{pid}/comm"))
        except FileNotFoundError:
            return None
        except OSError:
            comm = "?"
        try:
            unit = unit_of(self.access.proc_read(f"{pid}/cgroup"))
        except OSError:
            unit = None
        return comm, unit

    def holders(self, match: Callable[[str], K | None], *, maps: bool = True) -> ScanResult:
        """Every process holding a path ``match`` maps to a key (not None): {key: [Holder]}.

        One pass over /proc. A process that exits between any two reads is skipped (it holds
        nothing any more); EACCES on its fd directory or maps counts it as unreadable.
        """
        res = ScanResult()
        start = self.clock()
        pids = self.pids()
        if len(pids) > self.max_pids:
            res.truncated = f"the scan looked at the first {self.max_pids} of {len(pids)} processes"
            pids = pids[: self.max_pids]
        for i, pid in enumerate(pids):
            if self.clock() - start > self.deadline:
                res.truncated = f"the scan stopped after {self.deadline:g} s ({i} of {len(pids)} processes)"
                break
            found: dict[K, set[tuple[str, str]]] = {}
            denied = False
            try:
                for target in self.fd_targets(pid):
                    key = match(target)
                    if key is not None:
                        found.setdefault(key, set()).add((target, "fd"))
            except FileNotFoundError:
                continue            # exited
            except OSError:
                denied = True
            if maps:
                try:
                    for path in self.mapped_paths(pid):
                        key = match(path)
                        if key is not None:
                            found.setdefault(key, set()).add((path, "mmap"))
                except FileNotFoundError:
                    continue
                except OSError:
                    denied = True
            res.processes += 1
            res.unreadable += denied
            if not found:
                continue
            who = self._describe(pid)
            if who is None:
                continue            # exited before we could name it: it holds nothing now
            for key, items in found.items():
                for path, via in sorted(items):
                    res.holders.setdefault(key, []).append(Holder(int(pid), who[0], path, via, who[1]))
        return res

    def fd_counts(self, paths: Iterable[str]) -> dict[str, int]:
        """Open fds on each absolute path across all processes (mappings not counted)."""
        wanted = set(paths)
        counts = dict.fromkeys(wanted, 0)
        for pid in self.pids():
            try:
                for target in self.fd_targets(pid):
                    if target in wanted:
                        counts[target] += 1
            except OSError:
                continue
        return counts
