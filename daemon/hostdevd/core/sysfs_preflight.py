"""The pre-flight half of :mod:`.sysfs`: what could make a bind fail or a guest misbehave.

* the files through which a process can hold a device: its DRM nodes (``<BDF>/drm/card0``,
  ``renderD128`` -> ``/dev/dri/card0``, ``/dev/dri/renderD128``), the nvidia driver's
  ``/dev/nvidiaN`` (N is the "Device Minor" of ``/proc/driver/nvidia/gpus/<BDF>/information``;
  when that file cannot be read, every ``/dev/nvidia[0-9]*`` and ``/dev/nvidiactl``, as
  suspects), and its own ``resourceN``, ``resourceN_wc``, ``rom`` and ``config`` files in sysfs
  (open, or mmapped: a user-space driver, a metrics exporter);
* who holds them: one scan of /proc through :class:`~hostdevd.core.procfs.ProcScanner` over the
  backend's ``proc_listdir``/``proc_readlink``/``proc_read``;
* power state (``power_state``), whether config space reads back (not all ones), and the host's
  NUMA nodes with their CPUs (``/sys/devices/system/node/nodeN/cpulist``).

:class:`~hostdevd.core.sysfs.Sysfs` inherits it; paths are built from a validated
:class:`PciAddress` and names checked against fixed patterns only.
"""
from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .address import PciAddress
from .cpuset import parse_cpuset
from .errors import SysfsError
from .procfs import ProcScanner, ScanResult

if TYPE_CHECKING:
    from .sysfs import HostBackend

_DRM_RE = re.compile(r"^(card|renderD|controlD)[0-9]{1,4}$")
_SYSFS_FILE_RE = re.compile(r"^(resource[0-9]{1,2}(_wc)?|rom|config)$")
_NODE_RE = re.compile(r"^node([0-9]{1,4})$")
_MINOR_RE = re.compile(r"^Device Minor:\s*([0-9]{1,3})\s*$", re.M)
NVIDIA_ANY_RE = re.compile(r"^/dev/(nvidia[0-9]{1,3}|nvidiactl)$")
NVIDIA_DRIVERS = ("nvidia",)


@dataclass
class DeviceNodes:
    """The absolute paths through which a process holds one device; ``suspect``: paths that
    may or may not be this device's (the nvidia nodes when the GPU's minor is unknown)."""
    address: PciAddress
    paths: set[str] = field(default_factory=set)
    nvidia_any: bool = False          # match any /dev/nvidia[0-9]* and /dev/nvidiactl, as suspects


class PreflightReads:
    backend: HostBackend

    if TYPE_CHECKING:   # provided by Sysfs
        @staticmethod
        def _dev(addr: PciAddress, attr: str = "") -> str: ...
        def _read(self, rel: str) -> str | None: ...
        def driver(self, addr: PciAddress) -> str | None: ...
        def _fact(self, addr: PciAddress, attr: str) -> str | None: ...
        def _fact_int(self, addr: PciAddress, attr: str) -> int | None: ...

    @property
    def _dev_root(self) -> str:
        return getattr(self.backend, "dev_root", "/dev")

    def proc_scanner(self) -> ProcScanner:
        proc = getattr(self.backend, "proc", None)          # RealHost's RealProc: leave hostdevd itself out
        return ProcScanner(self.backend, exclude=proc.self_pids if proc is not None else ())

    def numa_node(self, addr: PciAddress) -> int | None:
        """The device's NUMA node; None for the kernel's -1 (no affinity) or unreadable."""
        node = self._fact_int(addr, "numa_node")
        return node if node is not None and node >= 0 else None

    def nvidia_minor(self, addr: PciAddress) -> int | None:
        """The GPU's minor from the nvidia driver's /proc information file; None when absent."""
        try:
            text = self.backend.proc_read(f"driver/nvidia/gpus/{addr}/information")
        except OSError:
            return None
        m = _MINOR_RE.search(text)
        return int(m[1]) if m else None

    def device_nodes(self, addr: PciAddress) -> DeviceNodes:
        out = DeviceNodes(addr)
        d = self._dev(addr)
        try:
            entries = self.backend.listdir(d)
        except OSError:
            return out
        for e in entries:
            if _SYSFS_FILE_RE.match(e):
                out.paths.add(self.backend.realpath(f"{d}/{e}"))
        try:
            drm = self.backend.listdir(f"{d}/drm")
        except OSError:
            drm = []
        out.paths |= {posixpath.join(self._dev_root, "dri", n) for n in drm if _DRM_RE.match(n)}
        if (self.driver(addr) or "") in NVIDIA_DRIVERS:
            minor = self.nvidia_minor(addr)
            if minor is not None:
                out.paths.add(posixpath.join(self._dev_root, f"nvidia{minor}"))
            else:
                out.nvidia_any = True
        return out

    def vfio_node_paths(self, group: int, members: Iterable[PciAddress]) -> set[str]:
        """/dev/vfio/N and the members' /dev/vfio/devices/vfioM (R14), as absolute paths."""
        paths = {posixpath.join(self._dev_root, "vfio", str(int(group)))}
        for a in members:
            cdev = self.vfio_cdev(a)     # type: ignore[attr-defined]  # VfioReads
            if cdev:
                paths.add(posixpath.join(self._dev_root, "vfio", "devices", cdev))
        return paths

    def scan_holders(self, nodes: Iterable[DeviceNodes], vfio: dict[int, set[str]] | None = None,
                     scanner: ProcScanner | None = None) -> ScanResult:
        """One /proc pass: keys ("dev", addr, suspect) for device files, ("vfio", group) for vfio nodes."""
        exact: dict[str, tuple] = {}
        any_nvidia: list[PciAddress] = []
        for n in nodes:
            for p in n.paths:
                exact.setdefault(p, ("dev", n.address, False))
            if n.nvidia_any:
                any_nvidia.append(n.address)
        for group, paths in (vfio or {}).items():
            for p in paths:
                exact.setdefault(p, ("vfio", group))
        if not exact and not any_nvidia:
            return ScanResult()       # nothing to look for: no pass over /proc
        nvidia_prefix = posixpath.join(self._dev_root, "")

        def match(path: str) -> tuple | None:
            key = exact.get(path)
            if key is not None:
                return key
            rest = path[len(nvidia_prefix):] if path.startswith(nvidia_prefix) else None
            if any_nvidia and rest is not None and NVIDIA_ANY_RE.match("/dev/" + rest):
                return ("nvidia-any",)
            return None

        return (scanner or self.proc_scanner()).holders(match)

    def config_readable(self, addr: PciAddress) -> bool:
        """Config space reads back: a device in D3cold, or gone from the bus, reads all ones."""
        try:
            cfg = self.backend.read_bytes(self._dev(addr, "config"), 4)
        except OSError:
            return False
        return len(cfg) >= 4 and cfg[:4] != b"\xff\xff\xff\xff"

    def power_state(self, addr: PciAddress) -> str | None:
        text = self._fact(addr, "power_state")
        return text if text and re.fullmatch(r"[A-Za-z0-9]{1,16}", text) else None

    def numa_nodes(self) -> dict[int, frozenset[int]]:
        """{node: its CPUs} from /sys/devices/system/node; empty when the host shows none."""
        try:
            entries = self.backend.listdir("devices/system/node")
        except OSError:
            return {}
        out = {}
        for e in entries:
            m = _NODE_RE.match(e)
            if not m:
                continue
            try:
                text = self._read(f"devices/system/node/{e}/cpulist")
            except SysfsError:
                continue
            cpus = parse_cpuset(text or "")
            if cpus is not None:
                out[int(m[1])] = cpus
        return dict(sorted(out.items()))

