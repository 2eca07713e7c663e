"""A simulated Linux kernel for tests: /sys, the few /proc files and /dev nodes hostdevd reads.

:class:`SimKernel` implements :class:`hostdevd.sysfs.HostBackend` in memory, so
``Sysfs(SimKernel.from_spec(spec))`` behaves like ``Sysfs(RealHost())`` on a real
machine (libvirt's ``tests/virpcimock.c`` does the same job in C).

Layout (relative to /sys, as the kernel builds it):

* ``devices/pci0000:00/<bridge>/.../<bdf>/`` the real device directories, nested under
  their parent bridge (a bridge's ``secondary_bus``, or a device's ``parent``);
  ``bus/pci/devices/<bdf>`` links there. Attributes: vendor, device, class,
  subsystem_*, revision, config (256 bytes), driver (link), driver_override
  ("(null)" when unset), iommu_group (link), physfn / virtfnN, sriov_* (PFs),
  boot_vga (VGA class only), reset_method and reset (when the device has reset
  methods), remove, net/<if>/ and the block tree (while bound to a host driver),
  virtioN/ (while bound to virtio-pci: its net and block devices live under it, so
  ``class/net/<if>/device`` points at ``virtioN`` as on a real VM), vfio-dev/vfioN
  (while bound to vfio-pci or a vfio variant driver, kernel 6.1+).
* virtio: ``bus/virtio/devices/virtioN`` (with ``device``, the virtio type from the PCI id, and
  a ``driver`` link: virtio_net, virtio_blk, virtio_console, 9pnet_virtio, virtiofs, ...),
  9p's ``mount_tag`` (the tag and a NUL, as Linux 6.1 shows it), virtiofs's
  ``fs/virtiofs/N/{tag,device}`` (6.9+), virtio-serial ports under
  ``virtioN/virtio-ports/vportNpM/{name,dev}`` with ``class/virtio-ports`` links, and a
  parentless ``devices/virtual/tty/hvcK`` per console port.
* ``class/tty``: ttyS0-3 on ``platform/serial8250`` (no PCI), a PCI serial card's ports under
  it. Software iSCSI: ``platform/hostH/sessionS/{connectionS:0,targetH:0:0/...}`` with the
  disks, ``class/iscsi_session``, ``class/iscsi_connection`` (address, persistent_address).
* ``bus/pci/drivers/<name>/{bind,unbind,new_id,remove_id,module,<bdf>}``,
  ``bus/pci/drivers_probe``; ``kernel/iommu_groups/N/{devices/<bdf>,type}``;
  ``class/iommu/<unit>``; ``module/<name>`` (vfio_iommu_type1 has
  ``parameters/allow_unsafe_interrupts``); ``class/net/<if>``, ``class/block/<name>``,
  ``dev/block/MAJ:MIN`` links into ``devices/``.
* /proc (``proc_read``): interrupts (IR-PCI-MSI iff interrupt remapping),
  self/mountinfo (super options; btrfs with an anonymous MAJ:MIN), mounts, swaps,
  net/route and net/ipv6_route (the default routes and the spec's ``routes``, IPv4 numbers in
  host byte order as the kernel prints them), cmdline, modules.
* /dev (``dev_exists``): ``vfio/N`` while a member of group N is on a vfio driver,
  ``vfio/vfio`` while vfio is loaded, block device nodes, ``kvm``; ``iommu`` and
  ``vfio/devices/vfioN`` (iommufd and device cdevs), and /lib/modules/<release>/modules.alias:
  :mod:`hostdevd.sim.simvfio`. numa_node, power_state and the PCIe link attributes of each
  device, and /usr/share/misc/pci.ids (``share_read``): :mod:`hostdevd.sim.siminventory`.
  Processes with open fds and mappings in /proc, DRM nodes, the nvidia driver's minor, an
  unreadable config space, ``resource0``/``rom`` and the NUMA nodes' cpulists:
  :mod:`hostdevd.sim.simproc`.

Kernel semantics (drivers/base/bus.c, dd.c, driver.c; drivers/pci/pci-driver.c,
pci-sysfs.c, iov.c; drivers/vfio):

* ``driver_override``: the value is cut at the first newline (the kernel strips
  nothing else); an empty value or "\\n" clears it.
* ``drivers/X/unbind``: ENODEV unless the device is bound to X.
  ``drivers/X/bind``: ENODEV unless X matches (override, or id table when no
  override), EBUSY if already bound, else the probe's own error.
  ``drivers_probe``: no-op for a bound device; otherwise every matching loaded
  driver is tried in registration order and probe failures are skipped (the write
  still succeeds, the device stays unbound). With an override only that driver
  matches. Bridges (header type != 0) match only ``pcieport`` by id; pcieport's
  probe refuses endpoints, vfio-pci's probe refuses bridges and devices without
  an IOMMU group (EINVAL).
* ``pci_device_can_probe``: a VF whose PF has ``sriov_drivers_autoprobe=0`` is not
  probed unless it has a driver_override (ENODEV from bind).
* A driver that is not ``driver_managed_dma`` (everything but vfio-pci, vfio
  variants, pci-stub and pcieport) fails to probe with EBUSY into a group whose
  /dev/vfio/N is open (kernel 5.19+).
* Unbinding a vfio device whose group is open blocks in the kernel until the user
  lets go. The simulation raises EBUSY by default (``open_group_unbind="ebusy"``);
  with ``"block"`` the write really blocks until :meth:`SimKernel.close_group`, then
  completes, so a :class:`~hostdevd.sysfs.Sysfs` write timeout fires.
* ``sriov_numvfs``: EINVAL for a non-number, ERANGE above totalvfs, same value is a
  no-op, ENOENT when the PF has no driver (or its driver cannot configure SR-IOV),
  EBUSY for N>0 while VFs exist. VF K is at routing id PF + offset + K*stride, gets
  physfn/virtfnK links and its own new group (lowest free number, as the kernel's
  ida does) unless ``vfs_share_group``. Unbinding a PF's driver removes its VFs.
* ``reset``: "1" counts a reset (:meth:`SimKernel.reset_count`), anything else EINVAL.
* Net and block devices of a device exist only while it is bound to a host driver
  (not vfio/pci-stub); mounts in mountinfo stay, as they do on a real host.

Test controls (all thread-safe; one lock, never held while a write hangs):

* the outside world: ``open_group(n)`` / ``close_group(n)`` (QEMU and /dev/vfio/N),
  ``open_device(bdf)`` / ``close_device(bdf)`` (QEMU with iommufd and /dev/vfio/devices/vfioN),
  ``load_module(name)`` / ``unload_module(name)`` (modprobe, rmmod), ``hot_unplug(bdf)``,
  ``set_refuse(driver, errno)``;
* faults: ``fail_writes(pattern, errno, count=1, value=None)``, ``hang_writes(pattern)``
  (blocks until ``release_hangs()``, then the write completes), ``delay_writes``,
  ``clear_faults()``, ``hanging_writes()``; a pattern is a glob if it has ``*?[``,
  else a substring of the path;
* inspection: ``state()`` {bdf: (driver, driver_override)}, ``write_log`` [(path, value)],
  ``writes_to(pattern)``, ``reset_count(bdf)``, ``groups()``, ``vfs(pf)``, ``driver(bdf)``,
  ``driver_override(bdf)``, ``group_of(bdf)``, ``has_device(bdf)``, ``loaded_modules()``.

The spec format is described in :mod:`hostdevd.simspec`.
"""
from __future__ import annotations

import errno
import fnmatch
import json
import os
import posixpath
import re
import sys
import threading
import tomllib
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..core.address import PciAddress
from ..core.errors import ConfigError
from .siminventory import SimShare
from .simproc import SimProc
from .simspec import (
    LEGACY_TTYS,
    PCI_STUB,
    PCIEPORT,
    VFIO_DEPS,
    VFIO_PCI,
    VIRTIO_PCI,
    SimBlock,
    SimDevice,
    SimDriver,
    SimIscsi,
    SimRoute,
    SimVirtio,
    SpecLoader,
    errno_value,
    lowest_free,
    vf_address,
)
from .simvfio import SimVfio

__all__ = ["SimKernel", "VFIO_PCI", "PCI_STUB", "PCIEPORT", "VIRTIO_PCI"]


class _Dir(dict):
    pass


@dataclass
class _Link:
    target: str


@dataclass
class _Attr:
    read: Callable[[], str | bytes] | None = None
    write: Callable[[str], None] | None = None


@dataclass
class _Rule:
    pattern: str
    value: str | None
    count: int | None
    errno: int = 0
    delay: float = 0.0
    event: threading.Event | None = None

    def matches(self, rel: str, data: str) -> bool:
        if any(c in self.pattern for c in "*?["):
            hit = fnmatch.fnmatchcase(rel, self.pattern)
        else:
            hit = self.pattern in rel
        return hit and (self.value is None or self.value in data)


class _WaitForClose(Exception):
    """Raised inside a write handler: the kernel would block until group N is closed."""

    def __init__(self, group: int):
        super().__init__(group)
        self.group = group


def _oserror(code: int, path: str | None = None) -> OSError:
    if path is None:
        return OSError(code, os.strerror(code))
    return OSError(code, os.strerror(code), path)


def _sysfs_streq(data: str, name: str) -> bool:
    """The kernel's sysfs_streq: equal, ignoring one trailing newline."""
    return (data[:-1] if data.endswith("\n") else data) == name


def _kstrtoul(data: str) -> int:
    """kstrtoul(buf, 0): base from prefix, one trailing newline, nothing else."""
    s = data[:-1] if data.endswith("\n") else data
    try:
        if re.fullmatch(r"0[xX][0-9a-fA-F]+", s):
            return int(s, 16)
        if re.fullmatch(r"0[0-7]*", s):
            return int(s, 8) if len(s) > 1 else 0
        if re.fullmatch(r"[1-9][0-9]*", s):
            return int(s, 10)
    except ValueError:
        pass
    raise _oserror(errno.EINVAL)


def _kstrtobool(data: str) -> bool:
    s = data[:-1] if data.endswith("\n") else data
    if s[:1] in ("1", "y", "Y") or s.lower() == "on":
        return True
    if s[:1] in ("0", "n", "N") or s.lower() == "off":
        return False
    raise _oserror(errno.EINVAL)


# ----------------------------------------------------------------------------------------
# the kernel

class SimKernel(SimVfio, SimShare, SimProc):
    """An in-memory kernel behind the :class:`~hostdevd.sysfs.HostBackend` protocol.

    Thread-safe: one re-entrant lock guards all state; a write that hangs (fault
    injection, or ``open_group_unbind="block"``) waits without holding it.
    """

    sys_root = "/sys"

    def __init__(self, spec: dict | None = None):
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._tree: _Dir | None = None
        self._builder: _TreeBuilder | None = None
        self._io: list[SimDevice] | None = None           # devices with netdevs or disks (_io_devices)
        self.devices: dict[PciAddress, SimDevice] = {}
        self.drivers: dict[str, SimDriver] = {}
        self.modules: set[str] = set()
        self.blacklisted: set[str] = set()
        self.iommu = True
        self.iommu_units: list[str] = []
        self.interrupt_remapping = True
        self.unsafe_interrupts = False
        self.iommu_group_type = "DMA"
        self.cmdline = ""
        # /proc/sys/kernel/random/boot_id: new for every SimKernel, so a kernel built again from
        # the same spec is the same host after a reboot (devices on their spec drivers).
        self.boot_id = str(uuid.uuid4())
        self.kvm = True
        self.open_group_unbind = "ebusy"
        self.dm: list[tuple[SimBlock, list[str]]] = []
        self.dm_names: dict[str, str] = {}                   # dm-N -> its /dev/mapper name
        self.iscsi: list[SimIscsi] = []
        self.routes: list[SimRoute] = []
        self.virtual_net: dict[str, dict[str, list[str]]] = {}
        self.mounts: list[dict[str, str]] = []
        self.swaps: list[str] = []
        self.default_route: str | None = None
        self.default_route6: str | None = None
        self.group_users: dict[int, int] = {}
        self.cdev_users: dict[PciAddress, int] = {}        # open /dev/vfio/devices/vfioN, per device
        self.write_log: list[tuple[str, str]] = []
        self.processes = {}                                  # pid -> SimProcess (simproc)
        self.numa_nodes = {}                                 # node -> cpulist text (simproc)
        self._rules: list[_Rule] = []
        self._hanging = 0
        SpecLoader(self, {} if spec is None else spec).load()

    # ----- construction ----------------------------------------------------------
    @classmethod
    def from_spec(cls, spec: dict) -> SimKernel:
        """Build from a declarative spec (see the module docstring); ConfigError if invalid."""
        return cls(spec)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> SimKernel:
        """Load a ``.json`` or ``.toml`` spec file."""
        path = os.fspath(path)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise ConfigError(f"cannot read topology spec {path}: {e.strerror or e}") from e
        try:
            if path.endswith(".toml"):
                spec = tomllib.loads(raw.decode("utf-8"))
            else:
                spec = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            kind = "TOML" if path.endswith(".toml") else "JSON"
            raise ConfigError(f"topology spec {path} is not valid {kind}: {e}") from e
        try:
            return cls(spec)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e.message}", e.hint) from e

    # ----- HostBackend --------------------------------------------------------------
    def read(self, rel: str) -> str:
        data = self._read_attr(rel)
        return data.decode("ascii", "replace") if isinstance(data, bytes) else data

    def read_bytes(self, rel: str, size: int) -> bytes:
        data = self._read_attr(rel)
        return (data if isinstance(data, bytes) else data.encode("ascii"))[:size]

    def write(self, rel: str, data: str) -> None:
        if isinstance(data, bytes):
            data = data.decode("ascii")
        with self._lock:
            self.write_log.append((rel, data))
            hang: threading.Event | None = None
            delay = 0.0
            for rule in list(self._rules):
                if not rule.matches(rel, data):
                    continue
                if rule.count is not None:
                    rule.count -= 1
                    if rule.count <= 0:
                        self._rules.remove(rule)
                if rule.errno:
                    raise _oserror(rule.errno)
                if rule.event is not None and hang is None:
                    hang = rule.event
                delay = max(delay, rule.delay)
        if delay:
            threading.Event().wait(delay)
        if hang is not None:
            with self._lock:
                self._hanging += 1
            try:
                hang.wait()
            finally:
                with self._lock:
                    self._hanging -= 1
        with self._lock:
            while True:
                writer = self._lookup(rel, write=True).write
                assert writer is not None  # _lookup(write=True) refuses read-only attributes
                try:
                    writer(data)
                    return
                except _WaitForClose as w:
                    # The kernel's vfio remove() waits here for the group's user.
                    while self._group_busy(w.group):
                        self._cond.wait()

    def readlink(self, rel: str) -> str:
        with self._lock:
            _, node = self._walk(rel, follow_last=False)
            if not isinstance(node, _Link):
                raise _oserror(errno.EINVAL, self._abs(rel))
            return node.target

    def listdir(self, rel: str) -> list[str]:
        with self._lock:
            _, node = self._walk(rel)
            if not isinstance(node, _Dir):
                raise _oserror(errno.ENOTDIR, self._abs(rel))
            return list(node)

    def exists(self, rel: str) -> bool:
        with self._lock:
            try:
                self._walk(rel, follow_last=False)
                return True
            except OSError:
                return False

    def realpath(self, rel: str) -> str:
        with self._lock:
            parts = [p for p in rel.split("/") if p]
            for cut in range(len(parts), -1, -1):
                try:
                    canon, _ = self._walk("/".join(parts[:cut]))
                except OSError:
                    continue
                return posixpath.normpath(posixpath.join(self.sys_root, canon, *parts[cut:]))
            return posixpath.join(self.sys_root, rel)

    def proc_read(self, rel: str) -> str:
        with self._lock:
            gen = {
                "interrupts": self._proc_interrupts,
                "self/mountinfo": self._proc_mountinfo,
                "mounts": self._proc_mounts,
                "self/mounts": self._proc_mounts,
                "swaps": self._proc_swaps,
                "net/route": self._proc_route,
                "net/ipv6_route": self._proc_ipv6_route,
                "cmdline": lambda: self.cmdline + "\n",
                "sys/kernel/random/boot_id": lambda: self.boot_id + "\n",
                "sys/kernel/osrelease": lambda: self.kernel_release + "\n",
                "modules": self._proc_modules,
            }.get(rel.strip("/"))
            if gen is None:
                text = self._proc_process_read(rel)       # processes, nvidia's gpus/ (simproc)
                if text is None:
                    raise _oserror(errno.ENOENT, posixpath.join("/proc", rel))
                return text
            return gen()

    def dev_exists(self, rel: str) -> bool:
        with self._lock:
            rel = rel.strip("/")
            if rel == "vfio/vfio":
                return "vfio" in self._loaded_modules()
            if rel.startswith("vfio/") and rel[5:].isdigit():
                return self._vfio_node(int(rel[5:]))
            if rel == "kvm":
                return self.kvm
            if (node := self._vfio_dev_node(rel)) is not None:
                return node
            return any(b.name == rel for b in self._present_blocks())

    def vfio_group_users(self, group: int) -> int:
        with self._lock:
            return self.group_users.get(int(group), 0)

    # ----- the outside world: QEMU, modprobe, hotplug -------------------------------------
    def open_group(self, group: int) -> None:
        """QEMU opens /dev/vfio/<group> and attaches it to a container.

        Raises FileNotFoundError when /dev/vfio/N does not exist, EPERM "group N is
        not viable" unless every member is viable (R2), EPERM when interrupts are not
        remapped and unsafe interrupts are not allowed.
        """
        group = int(group)
        with self._lock:
            if not self._vfio_node(group):
                raise _oserror(errno.ENOENT, f"/dev/vfio/{group}")
            if held := [str(d.addr) for d in self._members(group) if self.cdev_users.get(d.addr)]:
                raise OSError(errno.EBUSY, f"group {group} is in use through the device cdev of "
                              f"{', '.join(held)}", f"/dev/vfio/{group}")
            bad = [str(d.addr) for d in self._members(group) if not self._viable(d)]
            if bad:
                raise OSError(errno.EPERM, f"group {group} is not viable "
                              f"(not bound to vfio-pci: {', '.join(bad)})", f"/dev/vfio/{group}")
            if not self.interrupt_remapping and not self.unsafe_interrupts:
                raise OSError(errno.EPERM, "No interrupt remapping support. Use the module param "
                              "\"allow_unsafe_interrupts\" to enable VFIO IOMMU support on this platform",
                              f"/dev/vfio/{group}")
            self.group_users[group] = self.group_users.get(group, 0) + 1
            self._changed()

    def close_group(self, group: int) -> None:
        """QEMU closes /dev/vfio/<group>; a blocked vfio unbind proceeds."""
        group = int(group)
        with self._lock:
            if self.group_users.get(group, 0) <= 0:
                raise ValueError(f"group {group} is not open")
            self.group_users[group] -= 1
            if not self.group_users[group]:
                del self.group_users[group]
            self._changed()
            self._cond.notify_all()

    def load_module(self, name: str) -> None:
        """modprobe: register the module's drivers and let them probe unbound devices."""
        mod = name.replace("-", "_")
        with self._lock:
            if mod in self.blacklisted:
                raise OSError(errno.EPERM, f"modprobe: ERROR: could not insert '{mod}': "
                              "Operation not permitted (administratively prohibited)")
            self.modules.add(mod)
            if mod == "vfio_pci":
                self.modules.update(VFIO_DEPS)
            for drv in self.drivers.values():
                if drv.module == mod and not drv.loaded:
                    drv.loaded = True
                    self._driver_attach(drv)
            self._changed()

    def unload_module(self, name: str) -> None:
        """rmmod: unbind every device of the module's drivers (EBUSY while a vfio group is open)."""
        mod = name.replace("-", "_")
        with self._lock:
            if mod not in self._loaded_modules():
                raise OSError(errno.ENOENT, f"rmmod: ERROR: Module {mod} is not currently loaded")
            if mod in VFIO_DEPS and "vfio_pci" in self._loaded_modules() - {mod}:
                raise OSError(errno.EBUSY, f"rmmod: ERROR: Module {mod} is in use by: vfio_pci")
            drvs = [d for d in self.drivers.values() if d.module == mod and d.loaded]
            for drv in drvs:
                for dev in self._bound_to(drv.name):
                    if drv.vfio and (self.group_users.get(dev.group or -1, 0) or self.cdev_users.get(dev.addr)):
                        raise OSError(errno.EBUSY, f"rmmod: ERROR: Module {mod} is in use")
            for drv in drvs:
                for dev in self._bound_to(drv.name):
                    self._release(dev)
                drv.loaded = False
            self.modules.discard(mod)
            self._changed()

    def hot_unplug(self, address: str | PciAddress) -> None:
        """The device disappears (surprise removal, or ``echo 1 > remove``); a PF takes its VFs."""
        with self._lock:
            self._remove_device(self._dev(address))
            self._changed()

    def set_refuse(self, driver: str, err: int | str | bool | None = errno.ENODEV) -> None:
        """Make every probe by ``driver`` fail with ``err`` (None/False: probes succeed again)."""
        with self._lock:
            self.drivers[driver].refuse = errno_value(err) if err not in (None, False) else 0

    # ----- fault injection ---------------------------------------------------------------
    def fail_writes(self, pattern: str, err: int | str = errno.EIO, count: int | None = 1,
                    value: str | None = None) -> None:
        """The next ``count`` writes (None: all) to paths matching ``pattern`` (a glob if it
        has ``*?[``, else a substring; optionally also containing ``value``) fail with ``err``."""
        with self._lock:
            self._rules.append(_Rule(pattern, value, count, errno=errno_value(err)))

    def hang_writes(self, pattern: str, count: int | None = None, value: str | None = None) -> None:
        """Matching writes block until :meth:`release_hangs`, then complete normally."""
        with self._lock:
            self._rules.append(_Rule(pattern, value, count, event=threading.Event()))

    def delay_writes(self, pattern: str, seconds: float, count: int | None = None,
                     value: str | None = None) -> None:
        """Matching writes take ``seconds`` before they happen."""
        with self._lock:
            self._rules.append(_Rule(pattern, value, count, delay=float(seconds)))

    def release_hangs(self) -> None:
        """Let every hanging write go on, and stop hanging new ones."""
        with self._lock:
            for rule in list(self._rules):
                if rule.event is not None:
                    rule.event.set()
                    self._rules.remove(rule)

    def clear_faults(self) -> None:
        self.release_hangs()
        with self._lock:
            self._rules.clear()

    def hanging_writes(self) -> int:
        """How many writes are blocked in :meth:`hang_writes` right now."""
        with self._lock:
            return self._hanging

    # ----- inspection ----------------------------------------------------------------------
    def state(self) -> dict[str, tuple[str | None, str | None]]:
        """{bdf: (driver, driver_override)} for every device."""
        with self._lock:
            return {str(a): (d.driver, d.override) for a, d in sorted(self.devices.items())}

    def driver(self, address: str | PciAddress) -> str | None:
        with self._lock:
            return self._dev(address).driver

    def driver_override(self, address: str | PciAddress) -> str | None:
        with self._lock:
            return self._dev(address).override

    def group_of(self, address: str | PciAddress) -> int | None:
        with self._lock:
            return self._dev(address).group

    def groups(self) -> dict[int, list[str]]:
        with self._lock:
            out: dict[int, list[str]] = {}
            for a, d in sorted(self.devices.items()):
                if d.group is not None:
                    out.setdefault(d.group, []).append(str(a))
            return dict(sorted(out.items()))

    def vfs(self, pf: str | PciAddress) -> list[str]:
        with self._lock:
            sr = self._dev(pf).sriov
            return [str(a) for a in sr.vfs] if sr else []

    def reset_count(self, address: str | PciAddress) -> int:
        with self._lock:
            return self._dev(address).resets

    def has_device(self, address: str | PciAddress) -> bool:
        with self._lock:
            return _addr(address) in self.devices

    def loaded_modules(self) -> list[str]:
        with self._lock:
            return sorted(self._loaded_modules())

    def writes_to(self, pattern: str) -> list[tuple[str, str]]:
        """The logged writes whose path matches ``pattern`` (glob or substring)."""
        rule = _Rule(pattern, None, None)
        with self._lock:
            return [(p, v) for p, v in self.write_log if rule.matches(p, v)]

    # ----- internals: lookups --------------------------------------------------------------
    def _dev(self, address: str | PciAddress) -> SimDevice:
        a = _addr(address)
        try:
            return self.devices[a]
        except KeyError:
            raise KeyError(f"no simulated device {a}") from None

    def _changed(self, dev: SimDevice | None = None) -> None:
        """State changed: the tree is built again on the next access. ``dev``: only that device's
        driver changed; a device with nothing hanging off its driver (no netdev, disk, tty, virtio
        or SR-IOV) is patched in place, so a bind costs O(1) instead of O(host) (bench/scale)."""
        builder = self._builder
        if dev is not None and self._tree is not None and builder is not None and builder.patchable(dev):
            builder.patch_driver(dev)
            return
        self._tree = None
        self._builder = None
        self._io = None

    def _abs(self, rel: str) -> str:
        return posixpath.join(self.sys_root, rel)

    def _loaded_modules(self) -> set[str]:
        mods = set(self.modules)
        for d in self.drivers.values():
            if d.loaded and d.module:
                mods.add(d.module)
                if d.module == "vfio_pci":
                    mods.update(VFIO_DEPS)
        return mods

    def _loaded_driver(self, name: str) -> SimDriver | None:
        drv = self.drivers.get(name)
        return drv if drv is not None and drv.loaded else None

    def _bound_to(self, name: str) -> list[SimDevice]:
        return [d for _, d in sorted(self.devices.items()) if d.driver == name]

    def _members(self, group: int) -> list[SimDevice]:
        return [d for _, d in sorted(self.devices.items()) if d.group == group]

    def _on_vfio(self, dev: SimDevice) -> bool:
        drv = self.drivers.get(dev.driver or "")
        return bool(drv and drv.vfio)

    def _host_bound(self, dev: SimDevice) -> bool:
        drv = self.drivers.get(dev.driver or "")
        return bool(drv and drv.host)

    def _viable(self, dev: SimDevice) -> bool:
        return dev.bridge or dev.driver is None or self._on_vfio(dev) or dev.driver == PCI_STUB

    def _vfio_node(self, group: int) -> bool:
        return any(self._on_vfio(d) for d in self._members(group))

    def _io_devices(self) -> list[SimDevice]:
        """Devices with netdevs or disks, listed once per device set (not per /proc read)."""
        if self._io is None:
            self._io = [d for d in self.devices.values() if d.net or d.block]
        return self._io

    def _present_blocks(self) -> list[SimBlock]:
        out = [b for d in self._io_devices() if self._host_bound(d) for b in d.block]
        return out + [b for s in self.iscsi for b in s.block] + [b for b, _ in self.dm]

    def _present_netdevs(self) -> set[str]:
        names = {n for d in self._io_devices() if self._host_bound(d) for n in d.net}
        return names | set(self.virtual_net) | {"lo"}

    # ----- internals: the driver core ------------------------------------------------------
    def _match(self, drv: SimDriver, dev: SimDevice) -> bool:
        """pci_bus_match(): the override names the only driver; else the id tables."""
        if dev.override is not None:
            return dev.override == drv.name
        if dev.bridge or drv.name == PCIEPORT:
            return dev.bridge and drv.name == PCIEPORT
        for v, d, c in drv.ids:
            if ((v is None or v == dev.vendor) and (d is None or d == dev.device)
                    and (c is None or f"{dev.pci_class:06x}".startswith(c))):
                return True
        return (dev.vendor, dev.device) in drv.dynids

    def _probe(self, drv: SimDriver, dev: SimDevice) -> int:
        """really_probe() through pci_device_probe(); returns 0 or the probe's errno."""
        if dev.physfn is not None and dev.override is None:
            pf = self.devices.get(dev.physfn)
            if pf is not None and pf.sriov is not None and not pf.sriov.autoprobe:
                return errno.ENODEV                       # pci_device_can_probe()
        if not drv.driver_managed_dma and self._group_busy(dev.group):
            return errno.EBUSY                            # iommu_device_use_default_domain()
        if drv.refuse:
            return drv.refuse
        if drv.name in dev.refuse_drivers:
            return errno.ENODEV
        if drv.vfio and (dev.bridge or dev.group is None):
            return errno.EINVAL                           # vfio_pci_probe()
        if drv.name == PCIEPORT and not dev.bridge:
            return errno.ENODEV
        self._attach(drv, dev)
        return 0

    def _attach(self, drv: SimDriver, dev: SimDevice) -> None:
        dev.driver = drv.name
        if drv.vfio:
            used = {d.vfio_index for d in self.devices.values() if d.vfio_index is not None}
            dev.vfio_index = lowest_free(used)
        if drv.name == VIRTIO_PCI:
            used = {d.virtio_index for d in self.devices.values() if d.virtio_index is not None}
            dev.virtio_index = lowest_free(used)
        self._changed(dev)

    def _device_attach(self, dev: SimDevice) -> None:
        """device_attach(): try every matching loaded driver; probe errors are skipped."""
        if dev.driver is not None:
            return
        for drv in self.drivers.values():
            if drv.loaded and self._match(drv, dev) and self._probe(drv, dev) == 0:
                return

    def _driver_attach(self, drv: SimDriver) -> None:
        """driver_attach(): a new driver (or id) probes every unbound matching device."""
        for _, dev in sorted(self.devices.items()):
            if dev.driver is None and self._match(drv, dev):
                self._probe(drv, dev)

    def _check_release(self, dev: SimDevice) -> None:
        """Would releasing ``dev`` block on an open vfio group? Then EBUSY or wait."""
        devs = [dev] + [self.devices[v] for v in (dev.sriov.vfs if dev.sriov else []) if v in self.devices]
        for d in devs:
            if d.driver and self._on_vfio(d) and d.group is not None and (self.group_users.get(d.group, 0)
                                                                         or self.cdev_users.get(d.addr)):
                if self.open_group_unbind == "block":
                    raise _WaitForClose(d.group)
                raise _oserror(errno.EBUSY)

    def _release(self, dev: SimDevice) -> None:
        """device_release_driver(); a PF driver's remove() disables SR-IOV first."""
        if dev.sriov and dev.sriov.vfs:
            self._remove_vfs(dev)
        dev.driver = None
        dev.vfio_index = None
        dev.virtio_index = None
        self._changed(dev)

    # ----- internals: SR-IOV ---------------------------------------------------------------
    def _vf_address(self, pf: SimDevice, k: int) -> PciAddress:
        try:
            return vf_address(pf, k)
        except ValueError:
            raise _oserror(errno.ENOMEM) from None

    def _create_vfs(self, pf: SimDevice, n: int) -> None:
        sr = pf.sriov
        assert sr is not None
        new: list[SimDevice] = []
        for k in range(n):
            addr = self._vf_address(pf, k)
            if addr in self.devices:
                raise _oserror(errno.EEXIST)
            if not self.iommu:
                group = None
            elif sr.share_group:
                group = pf.group
            else:
                used = {d.group for d in self.devices.values() if d.group is not None}
                group = lowest_free(used)
            net = [sr.vf_ifname.format(n=k, vf=k)] if sr.vf_ifname else []
            vf = SimDevice(addr=addr, vendor=sr.vf_vendor, device=sr.vf_device, pci_class=pf.pci_class,
                      header_type=0, group=group, subsystem_vendor=pf.subsystem_vendor,
                      subsystem_device=pf.subsystem_device, revision=pf.revision,
                      reset_methods=list(sr.vf_reset_method), supported_resets=list(sr.vf_reset_method),
                      net=net, physfn=pf.addr, refuse_drivers=set(sr.vf_refuse_drivers), facts=pf.facts.for_vf())
            self.devices[addr] = vf
            sr.vfs.append(addr)
            new.append(vf)
        self._changed()
        for vf in new:                                    # pci_bus_add_device() -> device_attach()
            self._device_attach(vf)

    def _remove_vfs(self, pf: SimDevice) -> None:
        sr = pf.sriov
        assert sr is not None
        for addr in reversed(list(sr.vfs)):
            vf = self.devices.get(addr)
            if vf is not None:
                self._remove_device(vf)
        sr.vfs.clear()
        self._changed()

    def _remove_device(self, dev: SimDevice) -> None:
        if dev.sriov and dev.sriov.vfs:
            self._remove_vfs(dev)
        if dev.physfn is not None:
            pf = self.devices.get(dev.physfn)
            if pf is not None and pf.sriov is not None and dev.addr in pf.sriov.vfs:
                pf.sriov.vfs.remove(dev.addr)
        self.devices.pop(dev.addr, None)
        self.cdev_users.pop(dev.addr, None)
        self._changed()

    # ----- internals: write handlers -----------------------------------------------------
    def _find(self, data: str) -> SimDevice | None:
        for a, d in self.devices.items():
            if _sysfs_streq(data, str(a)):
                return d
        return None

    def _w_override(self, dev: SimDevice, data: str) -> None:
        if len(data) >= 4095:
            raise _oserror(errno.EINVAL)
        s = data.split("\0", 1)[0]
        if not s or s.startswith("\n"):
            dev.override = None
        else:
            dev.override = s.split("\n", 1)[0]

    def _w_bind(self, drv: SimDriver, data: str) -> None:
        dev = self._find(data)
        if dev is None or not self._match(drv, dev):
            raise _oserror(errno.ENODEV)
        if dev.driver is not None:
            raise _oserror(errno.EBUSY)
        err = self._probe(drv, dev)
        if err:
            raise _oserror(err)

    def _w_unbind(self, drv: SimDriver, data: str) -> None:
        dev = self._find(data)
        if dev is None or dev.driver != drv.name:
            raise _oserror(errno.ENODEV)
        self._check_release(dev)
        self._release(dev)

    def _w_drivers_probe(self, data: str) -> None:
        dev = self._find(data)
        if dev is None:
            raise _oserror(errno.ENODEV)
        self._device_attach(dev)

    def _w_new_id(self, drv: SimDriver, data: str) -> None:
        f = data.split()
        try:
            if len(f) < 2:
                raise ValueError
            vendor, device = int(f[0], 16), int(f[1], 16)
        except ValueError:
            raise _oserror(errno.EINVAL) from None
        if any((v is None or v == vendor) and (d is None or d == device) and c is None for v, d, c in drv.ids):
            raise _oserror(errno.EEXIST)
        drv.dynids.append((vendor, device))
        self._driver_attach(drv)

    def _w_remove_id(self, drv: SimDriver, data: str) -> None:
        f = data.split()
        try:
            key = (int(f[0], 16), int(f[1], 16))
        except (ValueError, IndexError):
            raise _oserror(errno.EINVAL) from None
        if key not in drv.dynids:
            raise _oserror(errno.ENODEV)
        drv.dynids.remove(key)

    def _w_numvfs(self, pf: SimDevice, data: str) -> None:
        sr = pf.sriov
        assert sr is not None
        n = _kstrtoul(data)
        if n > 0xFFFF:
            raise _oserror(errno.EINVAL)
        if n > sr.totalvfs:
            raise _oserror(errno.ERANGE)
        if n == len(sr.vfs):
            return
        drv = self._loaded_driver(pf.driver or "")
        if drv is None or not drv.sriov_configure:
            raise _oserror(errno.ENOENT)
        if n == 0:
            self._check_release(pf)
            self._remove_vfs(pf)
            return
        if sr.vfs:
            raise _oserror(errno.EBUSY)
        self._create_vfs(pf, n)

    def _w_autoprobe(self, pf: SimDevice, data: str) -> None:
        assert pf.sriov is not None
        pf.sriov.autoprobe = _kstrtobool(data)

    def _w_reset(self, dev: SimDevice, data: str) -> None:
        if _kstrtoul(data) != 1:
            raise _oserror(errno.EINVAL)
        dev.resets += 1

    def _w_reset_method(self, dev: SimDevice, data: str) -> None:
        s = data.strip()
        if s == "default":
            dev.reset_methods = list(dev.supported_resets)
        elif not s:
            dev.reset_methods = []
        else:
            names = s.split()
            if any(n not in dev.supported_resets for n in names):
                raise _oserror(errno.EINVAL)
            dev.reset_methods = names
        self._changed()

    def _w_remove(self, dev: SimDevice, data: str) -> None:
        if _kstrtoul(data):
            self._check_release(dev)
            self._remove_device(dev)

    # ----- internals: the tree ------------------------------------------------------------
    def _read_attr(self, rel: str) -> str | bytes:
        with self._lock:
            _, node = self._walk(rel)
            if isinstance(node, _Dir):
                raise _oserror(errno.EISDIR, self._abs(rel))
            assert isinstance(node, _Attr)
            if node.read is None:
                raise _oserror(errno.EACCES, self._abs(rel))
            return node.read()

    def _lookup(self, rel: str, write: bool) -> _Attr:
        _, node = self._walk(rel)
        if isinstance(node, _Dir):
            raise _oserror(errno.EISDIR, self._abs(rel))
        assert isinstance(node, _Attr)
        if write and node.write is None:
            raise _oserror(errno.EACCES, self._abs(rel))
        return node

    def _walk(self, rel: str, follow_last: bool = True) -> tuple[str, Any]:
        """Resolve ``rel`` like the VFS: symlinks in every component, ``..`` after them."""
        if self._tree is None:
            self._builder = _TreeBuilder(self)
            self._tree = self._builder.build()
        root = self._tree
        pending = deque(p for p in rel.split("/") if p not in ("", "."))
        stack: list[str] = []
        nodes: list[Any] = [root]
        hops = 0
        while pending:
            name = pending.popleft()
            if name == "..":
                if stack:
                    stack.pop()
                    nodes.pop()
                continue
            cur = nodes[-1]
            if not isinstance(cur, _Dir):
                raise _oserror(errno.ENOTDIR, self._abs(rel))
            node = cur.get(name)
            if node is None:
                raise _oserror(errno.ENOENT, self._abs(rel))
            if isinstance(node, _Link) and (pending or follow_last):
                hops += 1
                if hops > 40:
                    raise _oserror(errno.ELOOP, self._abs(rel))
                if node.target.startswith("/"):
                    stack, nodes = [], [root]
                pending.extendleft(reversed([p for p in node.target.split("/") if p not in ("", ".")]))
                continue
            stack.append(name)
            nodes.append(node)
        return "/".join(stack), nodes[-1]

    # ----- internals: /proc ----------------------------------------------------------------
    def _block_by_name(self) -> dict[str, SimBlock]:
        out = {b.name: b for d in self._io_devices() for b in d.block}
        out.update({b.name: b for s in self.iscsi for b in s.block})
        out.update({b.name: b for b, _ in self.dm})
        return out

    def _proc_interrupts(self) -> str:
        ir = "IR-" if self.interrupt_remapping else ""
        lines = ["           CPU0       CPU1",
                 f"  0:         33          0   {ir}IO-APIC    2-edge      timer",
                 f"  9:          0          0   {ir}IO-APIC    9-fasteoi   acpi"]
        irq = 24
        for a, d in sorted(self.devices.items()):
            if d.driver and not d.bridge:
                name = (d.net or [d.driver])[0]
                hwirq = (a.bus << 16 | a.slot << 11 | a.function << 8)
                lines.append(f" {irq}:       1024          0   {ir}PCI-MSI {hwirq}-edge      {name}")
                irq += 1
        return "\n".join(lines) + "\n"

    def _mount_rows(self) -> list[tuple[str, str, str, str, str]]:
        """(maj:min, mountpoint, fstype, source, super options) including the usual virtual
        filesystems. btrfs and bcachefs report an anonymous MAJ:MIN (as the kernel does) with
        the /dev node as the source; device-mapper sources are /dev/mapper/NAME."""
        blocks = self._block_by_name()
        rows = [("0:22", "/sys", "sysfs", "sysfs", "rw"), ("0:23", "/proc", "proc", "proc", "rw"),
                ("0:5", "/dev", "devtmpfs", "udev", "rw"), ("0:25", "/run", "tmpfs", "tmpfs", "rw")]
        extra = 40
        for m in self.mounts:
            opts = m.get("options", "rw")
            if m.get("block"):
                b = blocks[m["block"]]
                fs = m.get("fstype", "ext4")
                src = f"/dev/mapper/{self.dm_names[b.name]}" if b.name in self.dm_names else f"/dev/{b.name}"
                if fs in ("btrfs", "bcachefs"):
                    rows.append((f"0:{extra}", m["mountpoint"], fs, src, opts))
                    extra += 1
                else:
                    rows.append((b.dev, m["mountpoint"], fs, src, opts))
            else:
                rows.append((f"0:{extra}", m["mountpoint"], m.get("fstype", "tmpfs"), m.get("source", "none"), opts))
                extra += 1
        root = [r for r in rows if r[1] == "/"]
        return root + [r for r in rows if r[1] != "/"]

    def _proc_mountinfo(self) -> str:
        out = []
        for i, (dev, mp, fs, src, opts) in enumerate(self._mount_rows()):
            mid = 21 + i
            parent = 1 if mp == "/" else 21
            mount_point = mp.replace("\\", "\\134").replace(" ", "\\040")
            out.append(f"{mid} {parent} {dev} / {mount_point} rw,relatime shared:{i + 1} - {fs} {src} {opts}")
        return "\n".join(out) + "\n"

    def _proc_mounts(self) -> str:
        return "".join(f"{src} {mp} {fs} rw,relatime 0 0\n" for _, mp, fs, src, _ in self._mount_rows())

    def _proc_swaps(self) -> str:
        lines = ["Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority"]
        for i, s in enumerate(self.swaps):
            path, kind = (s, "file") if s.startswith("/") else (f"/dev/{s}", "partition")
            lines.append(f"{path:<40}{kind}\t8388604\t\t0\t\t{-2 - i}")
        return "\n".join(lines) + "\n"

    def _proc_route(self) -> str:
        lines = ["Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT"]
        if self.default_route and self.default_route in self._present_netdevs():
            i = self.default_route
            lines.append(f"{i}\t00000000\t0102A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0")
            lines.append(f"{i}\t0002A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0")
        present = self._present_netdevs()
        for r in self.routes:
            if r.dest.version == 4 and r.dev in present:
                flags = 0x0001 | (0x0002 if r.via is not None else 0)        # RTF_UP | RTF_GATEWAY
                lines.append(f"{r.dev}\t{_native(r.dest.network_address)}\t{_native(r.via)}\t{flags:04X}\t0\t0\t"
                             f"{r.metric}\t{_native(r.dest.netmask)}\t0\t0\t0")
        return "\n".join(lines) + "\n"

    def _proc_ipv6_route(self) -> str:
        z = "0" * 32
        lines = []
        if self.default_route6 and self.default_route6 in self._present_netdevs():
            lines.append(f"{z} 00 {z} 00 fe800000000000000000000000000001 00000400 00000001 00000000 00450003 "
                         f"{self.default_route6:>8}")
        present = self._present_netdevs()
        for r in self.routes:
            if r.dest.version == 6 and r.dev in present:
                flags = 0x0001 | (0x0002 if r.via is not None else 0)
                via = f"{int(r.via):032x}" if r.via is not None else z
                lines.append(f"{int(r.dest.network_address):032x} {r.dest.prefixlen:02x} {z} 00 {via} "
                             f"{r.metric:08x} 00000001 00000000 {flags:08x} {r.dev:>8}")
        lines.append(f"{z[:-1]}1 80 {z} 00 {z} 00000000 00000002 00000000 80200001       lo")
        lines.append(f"{z} 00 {z} 00 {z} ffffffff 00000001 00000000 00200200       lo")
        return "\n".join(lines) + "\n"

    def _proc_modules(self) -> str:
        return "".join(f"{m} 16384 0 - Live 0x0000000000000000\n" for m in sorted(self._loaded_modules()))


def _native(ip: Any) -> str:
    """An IPv4 address as /proc/net/route prints it: the __be32 as a host-order number."""
    return f"{int.from_bytes(ip.packed, sys.byteorder) if ip is not None else 0:08X}"


def _addr(address: str | PciAddress) -> PciAddress:
    return address if isinstance(address, PciAddress) else PciAddress.parse(address)


# ----------------------------------------------------------------------------------------
# building the sysfs tree from the state

class _TreeBuilder:
    def __init__(self, k: SimKernel):
        self.k = k
        self.root = _Dir()
        self.dirs: dict[PciAddress, str] = {}
        self.hvc = 0                                   # next hvcN for a virtio console port
        # (domain, secondary bus) -> the bridges below which that bus hangs, in device order
        self.bridges: dict[tuple[int, int], list[SimDevice]] = {}
        for d in k.devices.values():
            if d.secondary_bus is not None:
                self.bridges.setdefault((d.addr.domain, d.secondary_bus), []).append(d)
        self.driver_links: dict[PciAddress, str] = {}   # device -> its driver's name in the tree
        self.slots: Counter | None = None

    def patchable(self, dev: SimDevice) -> bool:
        """Is a driver change of ``dev`` local to its own directory and its driver's?"""
        if dev.net and any(n in v.get("brif", []) or n in v.get("lower", []) or n == name
                           for name, v in self.k.virtual_net.items() for n in dev.net):
            return False                  # a bridge port or bond slave: links elsewhere change too
        return (dev.addr in self.dirs and not dev.tty and not dev.block and dev.virtio is None
                and dev.sriov is None and VIRTIO_PCI not in (dev.driver, self.driver_links.get(dev.addr)))

    def patch_driver(self, dev: SimDevice) -> None:
        """What :meth:`device` writes about the driver, written again for ``dev``'s new driver."""
        d, a = self.dirs[dev.addr], dev.addr
        node = self.mkdir(d)
        node.pop("driver", None)
        node.pop("vfio-dev", None)
        node.pop("net", None)
        for name in dev.net:                       # a host driver's netdevs come and go with it
            self.root["class"]["net"].pop(name, None)
        old = self.driver_links.pop(a, None)
        if old is not None:
            drv_dir = self.root["bus"]["pci"]["drivers"].get(old)
            if drv_dir is not None:
                drv_dir.pop(str(a), None)
        self.driver_part(dev, d)
        if self.k._host_bound(dev):
            for name in dev.net:
                self.netdev(name, f"{d}/net/{name}", d)

    def mkdir(self, path: str) -> _Dir:
        cur = self.root
        for p in path.split("/"):
            nxt = cur.get(p)
            if nxt is None:
                nxt = cur[p] = _Dir()
            cur = nxt
        return cur

    def put(self, path: str, node: Any) -> None:
        d, name = posixpath.split(path)
        self.mkdir(d)[name] = node

    def link(self, path: str, target: str) -> None:
        # kernfs_get_target_path(): up to an ancestor of the target's parent, then down,
        # so a link to an ancestor still names it ("../../../0000:01:00.0", never "../..").
        up = posixpath.relpath(posixpath.dirname(target), posixpath.dirname(path))
        rel = posixpath.basename(target) if up == "." else f"{up}/{posixpath.basename(target)}"
        self.put(path, _Link(rel))

    def ro(self, path: str, value: Callable[[], str | bytes] | str) -> None:
        self.put(path, _Attr(read=value if callable(value) else lambda: value))

    def rw(self, path: str, read: Callable[[], str] | None, write: Callable[[str], None]) -> None:
        self.put(path, _Attr(read=read, write=write))

    def devdir(self, dev: SimDevice, seen: frozenset = frozenset()) -> str:
        if dev.addr in self.dirs:
            return self.dirs[dev.addr]
        k = self.k
        parent: SimDevice | None = None
        if dev.physfn is not None and dev.physfn in k.devices:
            path = posixpath.join(posixpath.dirname(self.devdir(k.devices[dev.physfn], seen)), str(dev.addr))
            self.dirs[dev.addr] = path
            return path
        if dev.parent is not None:
            parent = k.devices.get(dev.parent)
        else:
            parent = next((d for d in self.bridges.get((dev.addr.domain, dev.addr.bus), []) if d is not dev), None)
        if parent is not None and parent.addr not in seen:
            path = posixpath.join(self.devdir(parent, seen | {dev.addr}), str(dev.addr))
        else:
            path = f"devices/pci{dev.addr.domain:04x}:{dev.addr.bus:02x}/{dev.addr}"
        self.dirs[dev.addr] = path
        return path

    def build(self) -> _Dir:
        k = self.k
        for p in ("bus/pci/devices", "bus/pci/drivers", "bus/pci/slots", "kernel/iommu_groups",
                  "class/iommu", "class/net", "class/block", "dev/block", "dev/char", "module",
                  "devices/virtual/net", "devices/system", "class/tty", "bus/virtio/devices",
                  "bus/virtio/drivers"):
            self.mkdir(p)
        for node, cpus in sorted(k.numa_nodes.items()):
            self.ro(f"devices/system/node/node{node}/cpulist", cpus + "\n")
        for tty in LEGACY_TTYS:                       # 8250's legacy ports: no PCI device above them
            self.tty(tty, "devices/platform/serial8250")
        self.rw("bus/pci/drivers_probe", None, k._w_drivers_probe)
        self.rw("bus/pci/drivers_autoprobe", lambda: "1\n", lambda data: None)
        self.rw("bus/pci/rescan", None, lambda data: None)
        for mod in sorted(k._loaded_modules()):
            self.ro(f"module/{mod}/initstate", "live\n")
            self.ro(f"module/{mod}/refcnt", "0\n")
        if "vfio_iommu_type1" in k._loaded_modules():
            self.ro("module/vfio_iommu_type1/parameters/allow_unsafe_interrupts",
                    lambda: "Y\n" if k.unsafe_interrupts else "N\n")
            self.ro("module/vfio_iommu_type1/parameters/disable_hugepages", "N\n")
        if k.iommu:
            for unit in k.iommu_units:
                self.mkdir(f"devices/virtual/iommu/{unit}/devices")
                self.link(f"class/iommu/{unit}", f"devices/virtual/iommu/{unit}")
        for drv in k.drivers.values():
            if not drv.loaded:
                continue
            self.driver(drv)
        for _, dev in sorted(k.devices.items()):
            self.device(dev)
        for session in k.iscsi:
            self.iscsi(session)
        for blk, _ in k.dm:
            path = f"devices/virtual/block/{blk.name}"
            self.ro(f"{path}/dev", blk.dev + "\n")
            self.ro(f"{path}/dm/name", k.dm_names.get(blk.name, blk.name) + "\n")
            self.mkdir(f"{path}/holders")
            self.mkdir(f"{path}/slaves")
            self.link(f"class/block/{blk.name}", path)
            self.link(f"dev/block/{blk.dev}", path)
        for blk, slaves in k.dm:
            for s in slaves:
                src = self.resolve_class("block", s)
                if src is not None:
                    self.link(f"devices/virtual/block/{blk.name}/slaves/{s}", src)
                    self.link(f"{src}/holders/{blk.name}", f"devices/virtual/block/{blk.name}")
        self.netdev("lo", "devices/virtual/net/lo", None)
        for name, v in k.virtual_net.items():
            path = f"devices/virtual/net/{name}"
            self.netdev(name, path, None)
            for port in v.get("brif", []):
                src = self.resolve_class("net", port)
                if src is not None:
                    self.mkdir(f"{src}/brport")
                    self.link(f"{path}/brif/{port}", f"{src}/brport")
                    self.link(f"{src}/master", path)
            if v.get("brif") is not None:
                self.mkdir(f"{path}/brif")
                self.mkdir(f"{path}/bridge")
            for low in v.get("lower", []):
                src = self.resolve_class("net", low)
                if src is not None:
                    self.link(f"{path}/lower_{low}", src)
                    self.link(f"{src}/upper_{name}", path)
        return self.root

    def resolve_class(self, cls: str, name: str) -> str | None:
        node = self.root["class"][cls].get(name)
        if not isinstance(node, _Link):
            return None
        return posixpath.normpath(posixpath.join("class", cls, node.target))

    def netdev(self, name: str, path: str, device_dir: str | None) -> None:
        self.ro(f"{path}/ifindex", "1\n")
        self.ro(f"{path}/operstate", "up\n")
        self.ro(f"{path}/address", "52:54:00:00:00:00\n")
        if device_dir is not None:
            self.link(f"{path}/device", device_dir)
        self.link(f"class/net/{name}", path)

    def driver(self, drv: SimDriver) -> None:
        k = self.k
        base = f"bus/pci/drivers/{drv.name}"
        self.mkdir(base)
        self.rw(f"{base}/bind", None, lambda data: k._w_bind(drv, data))
        self.rw(f"{base}/unbind", None, lambda data: k._w_unbind(drv, data))
        self.rw(f"{base}/new_id", None, lambda data: k._w_new_id(drv, data))
        self.rw(f"{base}/remove_id", None, lambda data: k._w_remove_id(drv, data))
        self.rw(f"{base}/uevent", None, lambda data: None)
        if drv.module:
            self.link(f"{base}/module", f"module/{drv.module}")
            self.link(f"module/{drv.module}/drivers/pci:{drv.name}", base)

    def device(self, dev: SimDevice) -> None:
        k = self.k
        a = dev.addr
        d = self.devdir(dev)
        self.link(f"bus/pci/devices/{a}", d)
        self.ro(f"{d}/vendor", f"0x{dev.vendor:04x}\n")
        self.ro(f"{d}/device", f"0x{dev.device:04x}\n")
        self.ro(f"{d}/subsystem_vendor", f"0x{dev.subsystem_vendor:04x}\n")
        self.ro(f"{d}/subsystem_device", f"0x{dev.subsystem_device:04x}\n")
        self.ro(f"{d}/class", f"0x{dev.pci_class:06x}\n")
        self.ro(f"{d}/revision", f"0x{dev.revision:02x}\n")
        self.ro(f"{d}/config", lambda: self.config(dev))
        if dev.header_type == 0:
            self.ro(f"{d}/resource0", lambda: b"")
            self.ro(f"{d}/rom", lambda: b"")
        self.ro(f"{d}/enable", "1\n")
        for name, text in dev.facts.files().items():      # numa_node, power_state, *_link_* (siminventory)
            self.ro(f"{d}/{name}", text)
        self.ro(f"{d}/modalias", f"pci:v0000{dev.vendor:04X}d0000{dev.device:04X}sv0000{dev.subsystem_vendor:04X}"
                f"sd0000{dev.subsystem_device:04X}bc{dev.pci_class >> 16:02X}sc{dev.pci_class >> 8 & 0xFF:02X}"
                f"i{dev.pci_class & 0xFF:02X}\n")
        self.link(f"{d}/subsystem", "bus/pci")
        self.rw(f"{d}/driver_override", lambda: f"{dev.override if dev.override is not None else '(null)'}\n",
                lambda data: k._w_override(dev, data))
        self.rw(f"{d}/remove", None, lambda data: k._w_remove(dev, data))
        self.rw(f"{d}/rescan", None, lambda data: None)
        self.driver_part(dev, d)
        if dev.group is not None and k.iommu:
            g = f"kernel/iommu_groups/{dev.group}"
            self.ro(f"{g}/type", f"{k.iommu_group_type}\n")
            self.ro(f"{g}/reserved_regions", "0x00000000fee00000 0x00000000feefffff msi\n")
            self.link(f"{g}/devices/{a}", d)
            self.link(f"{d}/iommu_group", g)
        if dev.physfn is not None and dev.physfn in k.devices:
            self.link(f"{d}/physfn", self.devdir(k.devices[dev.physfn]))
        sr = dev.sriov
        if sr is not None:
            for i, vf in enumerate(sr.vfs):
                if vf in k.devices:
                    self.link(f"{d}/virtfn{i}", self.devdir(k.devices[vf]))
            self.ro(f"{d}/sriov_totalvfs", f"{sr.totalvfs}\n")
            self.rw(f"{d}/sriov_numvfs", lambda: f"{len(sr.vfs)}\n", lambda data: k._w_numvfs(dev, data))
            self.ro(f"{d}/sriov_offset", f"{sr.offset}\n")
            self.ro(f"{d}/sriov_stride", f"{sr.stride}\n")
            self.ro(f"{d}/sriov_vf_device", f"{sr.vf_device:x}\n")
            self.rw(f"{d}/sriov_drivers_autoprobe", lambda: f"{int(sr.autoprobe)}\n",
                    lambda data: k._w_autoprobe(dev, data))
        if dev.pci_class >> 8 == 0x0300:
            self.ro(f"{d}/boot_vga", lambda: "1\n" if dev.boot_vga else "0\n")
        if dev.supported_resets:
            self.rw(f"{d}/reset_method", lambda: " ".join(dev.reset_methods) + "\n",
                    lambda data: k._w_reset_method(dev, data))
        if dev.reset_methods:
            self.rw(f"{d}/reset", None, lambda data: k._w_reset(dev, data))
        if not k._host_bound(dev):
            return
        sub = d
        if dev.driver == VIRTIO_PCI and dev.virtio_index is not None:
            sub = f"{d}/virtio{dev.virtio_index}"
            self.ro(f"{sub}/vendor", f"0x{dev.vendor:04x}\n")
            self.ro(f"{sub}/status", "0x0000000f\n")
            if dev.virtio is not None:
                self.virtio(dev.virtio, sub, dev.virtio_index)
        for name in dev.pre.drm:
            self.ro(f"{d}/drm/{name}/dev", "226:0\n")
        for name in dev.net:
            self.netdev(name, f"{sub}/net/{name}", sub)
        for name in dev.tty:
            self.tty(name, d)
        self.blocks(dev.block, lambda disk: f"{sub}/{self.disk_subpath(disk)}")

    def driver_part(self, dev: SimDevice, d: str) -> None:
        """The driver link (both ways) and the vfio-dev directory: what a bind or unbind changes."""
        k, a = self.k, dev.addr
        if dev.driver is not None and k._loaded_driver(dev.driver):
            self.link(f"{d}/driver", f"bus/pci/drivers/{dev.driver}")
            self.link(f"bus/pci/drivers/{dev.driver}/{a}", d)
            self.driver_links[a] = dev.driver
        if dev.vfio_index is not None and k._on_vfio(dev):
            if k.vfio_device_cdev:          # the cdev's dev_t; the vfio-dev/vfioN directory is there from 6.1
                self.ro(f"{d}/vfio-dev/vfio{dev.vfio_index}/dev", f"511:{dev.vfio_index}\n")
            else:
                self.mkdir(f"{d}/vfio-dev/vfio{dev.vfio_index}")

    def tty(self, name: str, device_dir: str) -> None:
        path = f"{device_dir}/tty/{name}"
        self.ro(f"{path}/dev", "4:64\n")
        self.link(f"{path}/device", device_dir)
        self.link(f"class/tty/{name}", path)

    def virtio(self, v: SimVirtio, sub: str, index: int) -> None:
        """virtioN on the virtio bus: its driver, and what 9p, virtiofs and virtio-serial show."""
        name = f"virtio{index}"
        self.ro(f"{sub}/device", f"0x{v.id:04x}\n")
        self.link(f"{sub}/subsystem", "bus/virtio")
        self.link(f"bus/virtio/devices/{name}", sub)
        if v.driver is not None:
            self.link(f"{sub}/driver", f"bus/virtio/drivers/{v.driver}")
            self.link(f"bus/virtio/drivers/{v.driver}/{name}", sub)
        if v.mount_tag is not None:
            # p9_mount_tag_show() (Linux 6.1): the tag and its NUL, no newline
            self.ro(f"{sub}/mount_tag", v.mount_tag + "\0")
        if v.fs_tag is not None:
            # Linux 6.9+: /sys/fs/virtiofs/<vdev index>/{tag,device}
            self.ro(f"fs/virtiofs/{index}/tag", v.fs_tag + "\n")
            self.link(f"fs/virtiofs/{index}/device", sub)
        for port in v.ports:
            path = f"{sub}/virtio-ports/vport{index}p{port.id}"
            self.ro(f"{path}/dev", f"251:{port.id}\n")
            if port.name is not None:
                self.ro(f"{path}/name", port.name + "\n")
            self.link(f"class/virtio-ports/vport{index}p{port.id}", path)
            if port.console:
                # hvc devices have no parent: nothing in sysfs leads from hvcN to its port
                hvc = f"hvc{self.hvc}"
                self.hvc += 1
                self.ro(f"devices/virtual/tty/{hvc}/dev", f"229:{self.hvc - 1}\n")
                self.link(f"class/tty/{hvc}", f"devices/virtual/tty/{hvc}")

    def iscsi(self, s: SimIscsi) -> None:
        """A software iSCSI session: platform/hostH/sessionS with its connection and disks."""
        base = f"devices/platform/host{s.host}/session{s.session}"
        conn = f"connection{s.session}:0"
        cpath = f"{base}/{conn}/iscsi_connection/{conn}"
        self.ro(f"{cpath}/address", s.address + "\n")
        self.ro(f"{cpath}/port", f"{s.port}\n")
        self.ro(f"{cpath}/persistent_address", s.persistent_address + "\n")
        self.ro(f"{cpath}/persistent_port", f"{s.port}\n")
        self.link(f"class/iscsi_connection/{conn}", cpath)
        spath = f"{base}/iscsi_session/session{s.session}"
        self.ro(f"{spath}/targetname", f"iqn.2003-01.org.linux-iscsi.sim:{s.session}\n")
        self.link(f"class/iscsi_session/session{s.session}", spath)
        h = s.host
        self.blocks(s.block, lambda disk: f"{base}/target{h}:0:0/{h}:0:0:0/block/{disk}")

    def blocks(self, blocks: list[SimBlock], disk_path: Callable[[str], str]) -> None:
        """Disks (at ``disk_path(name)``) with their partitions inside, class/block and dev/block links."""
        disks = {b.name: b for b in blocks if b.disk is None}
        for b in blocks:
            disk = disks[b.disk] if b.disk else b
            path = disk_path(disk.name)
            if b.disk:
                path = f"{path}/{b.name}"
                self.ro(f"{path}/partition", f"{b.minor - disk.minor}\n")
            self.ro(f"{path}/dev", f"{b.dev}\n")
            self.ro(f"{path}/size", "2097152\n")
            self.mkdir(f"{path}/holders")
            if b.disk is None:
                self.mkdir(f"{path}/slaves")
            self.link(f"class/block/{b.name}", path)
            self.link(f"dev/block/{b.dev}", path)

    @staticmethod
    def disk_subpath(name: str) -> str:
        m = re.fullmatch(r"nvme(\d+)n\d+", name)
        if m:
            return f"nvme/nvme{m[1]}/{name}"
        if re.fullmatch(r"vd[a-z]+", name):
            return f"block/{name}"
        if re.fullmatch(r"sd[a-z]+", name):
            idx = ord(name[2]) - ord("a")
            return f"ata{idx + 1}/host{idx}/target{idx}:0:0/{idx}:0:0:0/block/{name}"
        return f"block/{name}"

    def config(self, dev: SimDevice) -> bytes:
        if not dev.pre.config_readable:
            raise _oserror(errno.EIO)
        cfg = bytearray(256)
        cfg[0:2] = dev.vendor.to_bytes(2, "little")
        cfg[2:4] = dev.device.to_bytes(2, "little")
        cfg[4:6] = (0x0406).to_bytes(2, "little")
        cfg[6:8] = (0x0010).to_bytes(2, "little")
        cfg[8] = dev.revision
        cfg[9:12] = dev.pci_class.to_bytes(3, "little")
        if self.slots is None:       # functions per slot, VFs aside: counted once per tree, not per read
            self.slots = Counter(o.addr.slot_id for o in self.k.devices.values() if o.physfn is None)
        multifunction = dev.physfn is None and self.slots[dev.addr.slot_id] > 1
        cfg[0x0E] = dev.header_type | (0x80 if multifunction else 0)
        if dev.header_type == 0:
            cfg[0x2C:0x2E] = dev.subsystem_vendor.to_bytes(2, "little")
            cfg[0x2E:0x30] = dev.subsystem_device.to_bytes(2, "little")
        elif dev.header_type == 1:
            cfg[0x18] = dev.addr.bus
            cfg[0x19] = dev.secondary_bus or 0
            cfg[0x1A] = dev.secondary_bus or 0
        return bytes(cfg)
