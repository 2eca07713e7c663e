"""The only module that touches /sys (and the few /proc and /dev facts the rules need).

Two layers:

* a *host backend* does raw file operations on paths relative to its roots.
  :class:`RealHost` uses the real filesystem; ``hostdevd.sim.simkernel.SimKernel``
  implements the same methods in memory with the kernel's semantics.
* :class:`Sysfs` turns validated :class:`PciAddress` objects into paths, reads
  the attributes the rules need, and performs every write with a timeout. Its
  host-critical reads (mounts, routes, consoles) are in :mod:`.sysfs_critical`,
  the other half of this module; its vfio reads (variant drivers, modules.alias, who holds a
  group or a device cdev open) are in :mod:`.sysfs_vfio`; what only the inventory reports (NUMA
  node, PCIe link, power state, names from the host's pci.ids) in :mod:`.sysfs_inventory`; what
  the pre-flight checks read (the files a process can hold a device through, config space, NUMA
  nodes' CPUs; the /proc scan itself is :mod:`.procfs`'s) in :mod:`.sysfs_preflight`.

No other module builds a sysfs path. Paths are only ever built from a
``PciAddress`` (validated), an ``int`` group number, or a name read back from
sysfs itself and checked against :data:`_NAME_RE`.
"""
from __future__ import annotations

import errno
import logging
import os
import re
from typing import Protocol

from .address import PciAddress
from .device import BRIDGE_CLASSES, Device
from .errors import InvalidAddress, SysfsError, SysfsTimeout
from .procfs import ProcScanner, RealProc
from .sysfs_critical import HostCriticalReads
from .sysfs_inventory import InventoryReads
from .sysfs_preflight import PreflightReads
from .sysfs_vfio import VfioReads
from .timedcall import TimedCaller

log = logging.getLogger(__name__)

DEFAULT_WRITE_TIMEOUT = 10.0
_NAME_RE = re.compile(r"^[A-Za-z0-9_.:+-]{1,64}$")
_MODALIAS_RE = re.compile(r"^pci:v[0-9A-F]{8}d[0-9A-F]{8}sv[0-9A-F]{8}sd[0-9A-F]{8}"
                          r"bc[0-9A-F]{2}sc[0-9A-F]{2}i[0-9A-F]{2}$")
_SHARE_MAX = 16 << 20          # pci.ids is ~1.4 MB
_BOOT_ID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class HostBackend(Protocol):
    """Raw file operations. Paths are relative to the backend's sysfs root
    (``bus/pci/devices/...``) except the ``proc_*``, ``dev_*``, ``modules_*`` and ``share_*`` methods."""

    def read(self, rel: str) -> str: ...
    def read_bytes(self, rel: str, size: int) -> bytes: ...
    def write(self, rel: str, data: str) -> None: ...
    def readlink(self, rel: str) -> str: ...
    def listdir(self, rel: str) -> list[str]: ...
    def exists(self, rel: str) -> bool: ...
    def realpath(self, rel: str) -> str: ...
    def proc_read(self, rel: str) -> str: ...
    def proc_listdir(self, rel: str) -> list[str]: ...
    def proc_readlink(self, rel: str) -> str: ...
    def dev_exists(self, rel: str) -> bool: ...
    def vfio_group_users(self, group: int) -> int: ...
    def dev_users(self, rels: list[str]) -> dict[str, int]: ...
    def modules_read(self, rel: str) -> str: ...
    def share_read(self, rel: str) -> str: ...


class RealHost:
    """The real filesystem under configurable roots (tests and the lab may point elsewhere)."""

    def __init__(self, sys_root: str = "/sys", proc_root: str = "/proc", dev_root: str = "/dev",
                 modules_root: str = "/lib/modules", share_root: str = "/usr/share"):
        self.sys_root = sys_root
        self.proc_root = proc_root
        self.dev_root = dev_root
        self.modules_root = modules_root
        self.share_root = share_root
        self.proc = RealProc(proc_root)      # /proc access is procfs's

    def _p(self, rel: str) -> str:
        return os.path.join(self.sys_root, rel)

    def read(self, rel: str) -> str:
        with open(self._p(rel), encoding="ascii", errors="replace") as f:
            return f.read()

    def read_bytes(self, rel: str, size: int) -> bytes:
        with open(self._p(rel), "rb") as f:
            return f.read(size)

    def write(self, rel: str, data: str) -> None:
        # sysfs attributes want one write() call with the whole value.
        fd = os.open(self._p(rel), os.O_WRONLY)
        try:
            os.write(fd, data.encode("ascii"))
        finally:
            os.close(fd)

    def readlink(self, rel: str) -> str:
        return os.readlink(self._p(rel))

    def listdir(self, rel: str) -> list[str]:
        return os.listdir(self._p(rel))

    def exists(self, rel: str) -> bool:
        return os.path.lexists(self._p(rel))

    def realpath(self, rel: str) -> str:
        return os.path.realpath(self._p(rel))

    def proc_read(self, rel: str) -> str:
        return self.proc.proc_read(rel)

    def proc_listdir(self, rel: str) -> list[str]:
        return self.proc.proc_listdir(rel)

    def proc_readlink(self, rel: str) -> str:
        return self.proc.proc_readlink(rel)

    def dev_exists(self, rel: str) -> bool:
        return os.path.exists(os.path.join(self.dev_root, rel))

    def modules_read(self, rel: str) -> str:
        with open(os.path.join(self.modules_root, rel), encoding="utf-8", errors="replace") as f:
            return f.read()

    def share_read(self, rel: str) -> str:
        """A data file under /usr/share (pci.ids); capped, since nothing there needs more."""
        with open(os.path.join(self.share_root, rel), encoding="utf-8", errors="replace") as f:
            return f.read(_SHARE_MAX)

    def vfio_group_users(self, group: int) -> int:
        """Count open file descriptors on /dev/vfio/<group> across all processes."""
        rel = f"vfio/{int(group)}"
        return self.dev_users([rel])[rel]

    def dev_users(self, rels: list[str]) -> dict[str, int]:
        """Open file descriptors on each /dev/<rel> across all processes, in one pass over /proc."""
        targets = {os.path.join(self.dev_root, r): r for r in rels}
        counts = ProcScanner(self.proc).fd_counts(targets)
        return {r: counts.get(p, 0) for p, r in targets.items()}


def _safe_name(name: str) -> bool:
    """A name read from /proc (or sysfs) that may become one path component."""
    return bool(_NAME_RE.match(name)) and name not in (".", "..")


def _hex4(text: str) -> str:
    return f"{int(text.strip(), 16):04x}"


class Sysfs(HostCriticalReads, VfioReads, InventoryReads, PreflightReads):
    """Validated reads and timed writes of PCI sysfs attributes."""

    def __init__(self, backend: HostBackend | None = None, write_timeout: float = DEFAULT_WRITE_TIMEOUT):
        self.backend = backend if backend is not None else RealHost()
        self.write_timeout = write_timeout
        self._writers = TimedCaller(name="sysfs-write")
        self._variant_cache = {}     # kernel release -> its modules.alias (sysfs_vfio)
        self._pci_ids = None         # the host's pci.ids, read on first use (sysfs_inventory)

    # ----- paths ---------------------------------------------------------
    @staticmethod
    def _dev(addr: PciAddress, attr: str = "") -> str:
        if not isinstance(addr, PciAddress):
            raise InvalidAddress(f"internal: sysfs path requested for unvalidated {addr!r}")
        return f"bus/pci/devices/{addr}" + (f"/{attr}" if attr else "")

    @staticmethod
    def _name(name: str, what: str) -> str:
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise SysfsError(f"refusing unsafe {what} name {str(name)[:40]!r}")
        return name

    # ----- raw reads -----------------------------------------------------
    def _read(self, rel: str) -> str | None:
        try:
            return self.backend.read(rel).strip()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise SysfsError(f"cannot read /sys/{rel}: {e.strerror or e}", path=rel) from e

    def _link_name(self, rel: str) -> str | None:
        try:
            return os.path.basename(self.backend.readlink(rel).rstrip("/"))
        except (FileNotFoundError, OSError):
            return None

    def _int(self, rel: str) -> int | None:
        v = self._read(rel)
        try:
            return int(v, 0) if v is not None else None
        except ValueError:
            return None

    # ----- enumeration ---------------------------------------------------
    def device_addresses(self) -> list[PciAddress]:
        try:
            names = self.backend.listdir("bus/pci/devices")
        except OSError:
            return []
        out = []
        for name in names:
            try:
                out.append(PciAddress.parse(name))
            except InvalidAddress:
                log.warning("ignoring unexpected entry %r in /sys/bus/pci/devices", name)
        return sorted(out)

    def exists(self, addr: PciAddress) -> bool:
        return self.backend.exists(self._dev(addr))

    def iommu_groups(self) -> dict[int, list[PciAddress]]:
        """Every group the kernel reports, from /sys/kernel/iommu_groups."""
        groups: dict[int, list[PciAddress]] = {}
        try:
            names = self.backend.listdir("kernel/iommu_groups")
        except OSError:
            return groups
        for name in names:
            if name.isdigit():
                groups[int(name)] = self.group_member_addresses(int(name))
        return groups

    def iommu_active(self) -> bool:
        try:
            return bool(self.backend.listdir("class/iommu"))
        except OSError:
            return False

    def iommu_units(self) -> list[str]:
        try:
            return sorted(self.backend.listdir("class/iommu"))
        except OSError:
            return []

    def module_loaded(self, module: str) -> bool:
        module = self._name(module.replace("-", "_"), "module")
        return self.backend.exists(f"module/{module}")

    def unsafe_interrupts_allowed(self) -> bool:
        v = self._read("module/vfio_iommu_type1/parameters/allow_unsafe_interrupts")
        return v in ("Y", "1")

    def interrupt_remapping(self) -> bool | None:
        """True when MSI interrupts go through the IOMMU's remapping table.

        /proc/interrupts names remapped chips "IR-PCI-MSI"/"IR-IO-APIC"; the
        kernel log line ("DMAR-IR: Enabled IRQ remapping") may have rotated away.
        """
        try:
            text = self.backend.proc_read("interrupts")
        except OSError:
            return None
        return "IR-" in text

    # ----- one device ----------------------------------------------------
    def driver(self, addr: PciAddress) -> str | None:
        return self._link_name(self._dev(addr, "driver"))

    def driver_override(self, addr: PciAddress) -> str | None:
        v = self._read(self._dev(addr, "driver_override"))
        return None if v in (None, "", "(null)") else v

    def iommu_group(self, addr: PciAddress) -> int | None:
        name = self._link_name(self._dev(addr, "iommu_group"))
        return int(name) if name and name.isdigit() else None

    def header_type(self, addr: PciAddress) -> int | None:
        try:
            cfg = self.backend.read_bytes(self._dev(addr, "config"), 64)
        except OSError:
            return None
        return cfg[0x0E] & 0x7F if len(cfg) > 0x0E else None

    def read_device(self, addr: PciAddress) -> Device:
        """Everything the rules need about one PCI function, as sysfs reports it."""
        if not self.exists(addr):
            raise SysfsError(f"PCI device {addr} does not exist", "check the address with `hostdevctl groups`")
        d = self._dev(addr)
        vendor = self._read(f"{d}/vendor") or "0xffff"
        device = self._read(f"{d}/device") or "0xffff"
        cls = self._read(f"{d}/class") or "0x000000"
        physfn = self._link_name(f"{d}/physfn")
        virtfns = []
        try:
            for e in self.backend.listdir(d):
                if e.startswith("virtfn") and e[6:].isdigit():
                    name = self._link_name(f"{d}/{e}")
                    if name:
                        virtfns.append((int(e[6:]), PciAddress.parse(name)))
        except OSError:
            pass
        autoprobe = self._int(f"{d}/sriov_drivers_autoprobe")
        rm = self._read(f"{d}/reset_method")
        try:
            net = sorted(self.backend.listdir(f"{d}/net"))
        except OSError:
            net = []
        pci_class = f"{int(cls, 16):06x}"
        header_type = self.header_type(addr)
        return Device(
            address=addr,
            vendor=_hex4(vendor),
            device=_hex4(device),
            pci_class=pci_class,
            header_type=header_type,
            # Header type is the kernel's own test; fall back to the class when
            # config space cannot be read.
            bridge=header_type != 0 if header_type is not None else pci_class[:4] in BRIDGE_CLASSES,
            driver=self.driver(addr),
            driver_override=self.driver_override(addr),
            group=self.iommu_group(addr),
            physfn=PciAddress.parse(physfn) if physfn else None,
            virtfns=[a for _, a in sorted(virtfns)],
            sriov_totalvfs=self._int(f"{d}/sriov_totalvfs"),
            sriov_numvfs=self._int(f"{d}/sriov_numvfs"),
            sriov_drivers_autoprobe=None if autoprobe is None else bool(autoprobe),
            boot_vga=self._read(f"{d}/boot_vga") == "1",
            reset_method=rm.split() if rm else None,
            has_reset=self.backend.exists(f"{d}/reset"),
            has_vfio_dev=self.backend.exists(f"{d}/vfio-dev"),
            net=[n for n in net if _NAME_RE.match(n)],
            subsystem=self._subsystem(d),
            modalias=m if (m := self._read(f"{d}/modalias")) and _MODALIAS_RE.match(m) else None,
        )

    def _subsystem(self, d: str) -> str | None:
        sv, sd = self._read(f"{d}/subsystem_vendor"), self._read(f"{d}/subsystem_device")
        try:
            return f"{_hex4(sv)}:{_hex4(sd)}" if sv and sd else None
        except ValueError:
            return None

    def boot_id(self) -> str | None:
        """The kernel's boot ID: a claim made under another one is from before a reboot."""
        try:
            text = self.backend.proc_read("sys/kernel/random/boot_id").strip()
        except OSError:
            return None
        return text if _BOOT_ID_RE.match(text) else None

    def vfio_group_users(self, group: int) -> int:
        return self.backend.vfio_group_users(int(group))

    # ----- SR-IOV and network links ---------------------------------------
    def netdev_pci(self, name: str) -> PciAddress | None:
        """The PCI function behind a network interface (``class/net/<name>/device``), if any."""
        name = self._name(name, "network interface")
        chain = self._pci_in_link(f"class/net/{name}/device") or self._pci_in_link(f"class/net/{name}")
        return chain[-1] if chain else None

    def vf_index(self, vf: PciAddress) -> tuple[PciAddress, int] | None:
        """(PF, N) when ``vf`` is its PF's ``virtfnN``; None for anything that is not a VF."""
        physfn = self._link_name(self._dev(vf, "physfn"))
        if not physfn:
            return None
        pf = PciAddress.parse(physfn)
        try:
            entries = self.backend.listdir(self._dev(pf))
        except OSError:
            return None
        for e in entries:
            if e.startswith("virtfn") and e[6:].isdigit() and self._link_name(self._dev(pf, e)) == str(vf):
                return pf, int(e[6:])
        return None

    def vfio_group_node_exists(self, group: int) -> bool:
        return self.backend.dev_exists(f"vfio/{int(group)}")

    # ----- writes (every one timed) -----------------------------------------
    def _write(self, rel: str, value: str, device: PciAddress | None = None,
               timeout: float | None = None) -> None:
        """Write with a timeout; a write the kernel never returns from is abandoned.

        A blocked sysfs write cannot be cancelled from user space (a driver's
        remove() may wait for its users); the write runs on a helper thread
        (timedcall: reused, daemonic, so it cannot hold up exit) and the caller
        is told which device hung.
        """
        result: dict[str, BaseException | None] = {"error": None}

        def run() -> None:
            try:
                self.backend.write(rel, value)
            except BaseException as e:
                result["error"] = e

        limit = self.write_timeout if timeout is None else timeout
        finished = self._writers.call(run, limit)
        what = f"device {device}" if device else f"/sys/{rel}"
        if not finished:
            raise SysfsTimeout(
                f"writing {value!r} to /sys/{rel} did not return within {limit:g}s ({what} hung)",
                "the driver may be waiting for its users to let go; check `dmesg` and processes using the device",
                path=rel,
            )
        err = result["error"]
        if err is not None:
            if isinstance(err, OSError):
                raise SysfsError(
                    f"writing {value!r} to /sys/{rel} failed for {what}: "
                    f"{errno.errorcode.get(err.errno or 0, '')} {err.strerror or err}".replace("  ", " "),
                    path=rel,
                ) from err
            raise SysfsError(f"writing {value!r} to /sys/{rel} failed for {what}: {err}", path=rel) from err

    def set_driver_override(self, addr: PciAddress, driver: str | None) -> None:
        # An empty write ("\n") clears the override (kernel: driver_override_store).
        value = self._name(driver, "driver") if driver else "\n"
        self._write(self._dev(addr, "driver_override"), value, addr)

    def unbind(self, addr: PciAddress) -> None:
        drv = self.driver(addr)
        if drv is None:
            return
        self._write(f"bus/pci/drivers/{self._name(drv, 'driver')}/unbind", str(addr), addr)

    def drivers_probe(self, addr: PciAddress) -> None:
        self._write("bus/pci/drivers_probe", str(addr), addr)

    def bind(self, addr: PciAddress, driver: str) -> None:
        self._write(f"bus/pci/drivers/{self._name(driver, 'driver')}/bind", str(addr), addr)

    def driver_loaded(self, driver: str) -> bool:
        return self.backend.exists(f"bus/pci/drivers/{self._name(driver, 'driver')}")

    def reset(self, addr: PciAddress) -> None:
        self._write(self._dev(addr, "reset"), "1", addr)

    def set_sriov_numvfs(self, addr: PciAddress, count: int, timeout: float | None = None) -> None:
        """Real NICs take seconds per VF here (i40e: 22 s for 64), hence a timeout of its own."""
        self._write(self._dev(addr, "sriov_numvfs"), str(int(count)), addr, timeout=timeout)

    def set_sriov_drivers_autoprobe(self, addr: PciAddress, enabled: bool) -> None:
        self._write(self._dev(addr, "sriov_drivers_autoprobe"), "1" if enabled else "0", addr)
