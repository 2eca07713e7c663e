"""The simulated kernel's processes and the pre-flight facts: who holds a device, NUMA nodes.

:class:`SimKernel` inherits :class:`SimProc`. What it adds, as the kernel shows it:

* processes in /proc (``proc_listdir``, ``proc_readlink``, ``proc_read``): ``<pid>/fd/<n>``
  symlinks to what each has open, ``<pid>/maps`` lines for what it mmapped, ``<pid>/comm``,
  ``<pid>/cgroup`` (``0::/system.slice/<unit>`` for a service, a session scope otherwise);
* per device: ``drm/card0``, ``drm/renderD128`` (while bound to a host driver), the nvidia
  driver's ``/proc/driver/nvidia/gpus/<BDF>/information`` with its "Device Minor" (while bound
  to ``nvidia``), ``resource0`` and ``rom`` files, and a config space that cannot be read;
* ``devices/system/node/nodeN/cpulist``.

Spec keys::

    "numa_nodes": {"0": "0-3", "1": "4-7"},
    "processes": [{"pid": 812, "comm": "nvidia-persistenced", "unit": "nvidia-persistenced.service",
                   "fds": ["/dev/nvidia0", "/dev/nvidiactl", "sysfs:0000:01:00.0/config"],
                   "maps": ["sysfs:0000:01:00.0/resource0"]}],
                                  # "sysfs:BDF/FILE" is that device file's real path under /sys/devices
    devices[]: "drm": ["card0", "renderD128"], "nvidia_minor": 0, "config_readable": false

Test controls: :meth:`add_process` (``vanish="listed"``: gone right after /proc is listed;
``"fds"``: gone right after its fd directory was listed; ``"named"``: gone when its comm is read,
after its fds and maps were; ``denied``: EACCES on fd and maps, as for
a non-root reader), :meth:`kill_process`, :meth:`sysfs_file`.
"""
from __future__ import annotations

import errno
import os
import posixpath
import re
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..core.address import PciAddress
from ..core.cpuset import parse_cpuset

if TYPE_CHECKING:
    from .simspec import SimDevice, SpecLoader

_DRM_RE = re.compile(r"^(card|renderD|controlD)[0-9]{1,4}$")
_COMM_RE = re.compile(r"^[\x20-\x7e]{1,15}$")


@dataclass
class SimProcess:
    pid: int
    comm: str
    fds: list[str] = field(default_factory=list)       # targets, fd numbers from 3
    maps: list[str] = field(default_factory=list)
    unit: str | None = None
    vanish: str | None = None                          # "listed" | "fds" | "named"
    denied: bool = False


@dataclass
class SimDevicePre:
    drm: list[str] = field(default_factory=list)
    nvidia_minor: int | None = None
    config_readable: bool = True


def _enoent(path: str) -> OSError:
    return OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)


def load_device_pre(loader: SpecLoader, raw: dict, where: str) -> SimDevicePre:
    drm = loader.names(raw, "drm", where)
    for n in drm:
        if not _DRM_RE.match(n):
            loader.fail(where, f"drm names are card<N>, renderD<N> or controlD<N>, got {n!r}")
    minor = loader.typed(raw, "nvidia_minor", (int,), where)
    if minor is not None and not 0 <= minor < 256:
        loader.fail(where, f"nvidia_minor must be 0..255, got {minor!r}")
    return SimDevicePre(drm, minor, bool(loader.typed(raw, "config_readable", (bool,), where, True)))


def load_processes(loader: SpecLoader, k: SimProc, raw: Any) -> None:
    if not isinstance(raw, list):
        loader.fail("processes", "must be a list")
    for i, p in enumerate(raw):
        where = f"processes[{i}]"
        p = loader.keys(p, {"pid", "comm", "unit", "fds", "maps", "comment"}, where)
        pid = loader.typed(p, "pid", (int,), where)
        if pid is None or not 0 < pid < 4194304 or pid in k.processes:
            loader.fail(where, f"pid must be a new number 1..4194303, got {pid!r}")
        comm = loader.typed(p, "comm", (str,), where, "proc")
        if not _COMM_RE.match(comm):
            loader.fail(where, f"comm must be 1-15 printable characters, got {comm!r}")
        k.processes[pid] = SimProcess(pid, comm, loader.names(p, "fds", where), loader.names(p, "maps", where),
                                      loader.typed(p, "unit", (str,), where))


def load_numa_nodes(loader: SpecLoader, k: SimProc, raw: Any) -> None:
    if not isinstance(raw, dict):
        loader.fail("numa_nodes", "must be a table of node number -> cpulist")
    for node, cpus in raw.items():
        if not (isinstance(node, str) and node.isdigit() and isinstance(cpus, str)
                and parse_cpuset(cpus) is not None):
            loader.fail("numa_nodes", f"{node!r} = {cpus!r} is not node number = \"cpulist\"")
        k.numa_nodes[int(node)] = cpus


class SimProc:
    if TYPE_CHECKING:   # SimKernel's state
        _lock: threading.RLock
        devices: dict[PciAddress, SimDevice]

        def _dev(self, address: str | PciAddress) -> SimDevice: ...
        def realpath(self, rel: str) -> str: ...
        def _changed(self) -> None: ...

    dev_root = "/dev"
    processes: dict[int, SimProcess]
    numa_nodes: dict[int, str]

    # ----- test controls -----------------------------------------------------------------
    def add_process(self, pid: int, comm: str, fds: list[str] | None = None, maps: list[str] | None = None,
                    unit: str | None = None, vanish: str | None = None, denied: bool = False) -> int:
        """A process holding ``fds`` open and ``maps`` mmapped (absolute paths, or "sysfs:BDF/FILE")."""
        with self._lock:
            self.processes[pid] = SimProcess(pid, comm, list(fds or []), list(maps or []), unit, vanish, denied)
            return pid

    def kill_process(self, pid: int) -> None:
        with self._lock:
            self.processes.pop(pid, None)

    def sysfs_file(self, address: str | PciAddress, name: str) -> str:
        """The real path of a device's sysfs file, as /proc/<pid>/fd shows it once opened."""
        return self.realpath(f"bus/pci/devices/{self._dev(address).addr}/{name}")

    # ----- HostBackend: /proc -------------------------------------------------------------
    def _path(self, target: str) -> str:
        if target.startswith("sysfs:"):
            bdf, _, name = target[6:].rpartition("/")
            return self.sysfs_file(bdf, name)
        return target

    def _proc(self, pid_text: str, path: str) -> SimProcess:
        p = self.processes.get(int(pid_text)) if pid_text.isdigit() else None
        if p is None:
            raise _enoent(path)
        return p

    def proc_listdir(self, rel: str) -> list[str]:
        with self._lock:
            parts = [x for x in rel.split("/") if x]
            path = posixpath.join("/proc", rel)
            if not parts:
                names = [str(p) for p in sorted(self.processes)] + ["self", "interrupts", "sys", "driver"]
                for p in [p for p in self.processes.values() if p.vanish == "listed"]:
                    del self.processes[p.pid]          # exits right after /proc was listed
                return names
            if len(parts) == 2 and parts[1] == "fd":
                p = self._proc(parts[0], path)
                if p.denied:
                    raise OSError(errno.EACCES, os.strerror(errno.EACCES), path)
                names = [str(3 + i) for i in range(len(p.fds))]
                if p.vanish == "fds":
                    del self.processes[p.pid]          # exits right after its fds were listed
                return names
            raise _enoent(path)

    def proc_readlink(self, rel: str) -> str:
        with self._lock:
            parts = [x for x in rel.split("/") if x]
            path = posixpath.join("/proc", rel)
            if len(parts) == 3 and parts[1] == "fd" and parts[2].isdigit():
                p = self.processes.get(int(parts[0])) if parts[0].isdigit() else None
                # A process that exited after its fds were listed: its links are gone with it.
                if p is None or not 0 <= int(parts[2]) - 3 < len(p.fds):
                    raise _enoent(path)
                return self._path(p.fds[int(parts[2]) - 3])
            raise _enoent(path)

    def _proc_process_read(self, rel: str) -> str | None:
        """/proc/<pid>/{comm,maps,cgroup} and the nvidia driver's information file; None otherwise."""
        parts = [x for x in rel.split("/") if x]
        path = posixpath.join("/proc", rel)
        if len(parts) == 2 and parts[0].isdigit() and parts[1] in ("comm", "maps", "cgroup"):
            p = self._proc(parts[0], path)
            if parts[1] == "comm":
                if p.vanish == "named":
                    del self.processes[p.pid]          # exited after its fds were read
                    raise _enoent(path)
                return p.comm + "\n"
            if parts[1] == "cgroup":
                return f"0::/system.slice/{p.unit}\n" if p.unit else "0::/user.slice/user-1000.slice/session-2.scope\n"
            if p.denied:
                raise OSError(errno.EACCES, os.strerror(errno.EACCES), path)
            return "".join(f"7f{i:04x}000000-7f{i:04x}001000 rw-s 00000000 00:15 {100 + i}"
                           f"                     {self._path(m)}\n" for i, m in enumerate(p.maps))
        if len(parts) == 5 and parts[:3] == ["driver", "nvidia", "gpus"] and parts[4] == "information":
            dev = next((d for d in self.devices.values() if str(d.addr) == parts[3]), None)
            if dev is None or dev.pre.nvidia_minor is None or dev.driver != "nvidia":
                raise _enoent(path)
            return (f"Model: \t\t GeForce GTX 1080\nIRQ:   \t\t 130\nGPU UUID: \t GPU-0000\n"
                    f"Video BIOS: \t 86.04.17.00.01\nBus Type: \t PCIe\nDMA Size: \t 47 bits\n"
                    f"DMA Mask: \t 0x7fffffffffff\nBus Location: \t {dev.addr}\n"
                    f"Device Minor: \t {dev.pre.nvidia_minor}\nGPU Excluded:\t No\n")
        return None
