"""The simulated kernel's vfio extras: modules.alias (R13) and device cdevs with iommufd (R14).

:class:`SimKernel` inherits :class:`SimVfio`. What it adds, with the kernel's semantics:

* ``/lib/modules/<kernel_release>/modules.alias`` (``modules_read``): an ``alias pci:... module``
  line per id of every driver with a module, and the ``vfio_pci:`` lines every vfio driver
  declares in ``aliases`` (vfio-pci's generic ``vfio_pci:v*d*sv*sd*bc*sc*i*`` is built in).
  Spec ``"modules_alias": false`` leaves the file out.
* ``/dev/vfio/devices/vfioN`` (spec ``vfio_device_cdev``, default true: CONFIG_VFIO_DEVICE_CDEV)
  for every device on a vfio driver, and ``/dev/iommu`` (spec ``iommufd``, default: the IOMMU).
* :meth:`open_device` / :meth:`close_device`: QEMU with iommufd opens the device's cdev. The
  kernel refuses it (EBUSY) while the group node is open, and refuses the group node while a
  member's cdev is open (vfio_device_block_group, vfio_group_fops_open). An open cdev holds the
  group's DMA ownership: host drivers cannot probe a member, and unbinding the device waits
  for it (EBUSY, or blocks with ``open_group_unbind="block"``), as an open group does.
"""
from __future__ import annotations

import errno
import os
import threading
from typing import TYPE_CHECKING

from ..core.address import PciAddress

if TYPE_CHECKING:
    from .simspec import SimDevice, SimDriver

GENERIC_ALIAS = "vfio_pci:v*d*sv*sd*bc*sc*i*"


def _addr(address: str | PciAddress) -> PciAddress:
    return address if isinstance(address, PciAddress) else PciAddress.parse(address)


class SimVfio:
    if TYPE_CHECKING:   # SimKernel's state
        _lock: threading.RLock
        _cond: threading.Condition
        devices: dict[PciAddress, SimDevice]
        drivers: dict[str, SimDriver]
        group_users: dict[int, int]
        iommu: bool

        def _dev(self, address: str | PciAddress) -> SimDevice: ...
        def _on_vfio(self, dev: SimDevice) -> bool: ...
        def _members(self, group: int) -> list[SimDevice]: ...
        def _changed(self) -> None: ...

    kernel_release = "6.12.38+deb13-amd64"
    modules_alias = True
    iommufd = True
    # how the kernel has iommufd: "module" (iommufd.ko in modules.dep), "builtin" or "none"
    # (CONFIG_IOMMUFD unset, as in Debian 13's kernel); /dev/iommu is ``iommufd``
    iommufd_build = "module"
    vfio_device_cdev = True
    cdev_users: dict[PciAddress, int]

    # ----- modules.alias --------------------------------------------------------------
    def modules_read(self, rel: str) -> str:
        with self._lock:
            if rel.strip("/") in (f"{self.kernel_release}/modules.dep", f"{self.kernel_release}/modules.builtin"):
                return self._modules_list(rel.rsplit("/", 1)[1])
            if not self.modules_alias or rel.strip("/") != f"{self.kernel_release}/modules.alias":
                raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), f"/lib/modules/{rel}")
            lines = ["# Aliases extracted from modules themselves."]
            for drv in self.drivers.values():
                if drv.module is None:
                    continue
                for v, d, _c in drv.ids:
                    vv = "*" if v is None else f"0000{v:04X}"
                    dd = "*" if d is None else f"0000{d:04X}"
                    lines.append(f"alias pci:v{vv}d{dd}sv*sd*bc*sc*i* {drv.module}")
                lines += [f"alias {a} {drv.module}" for a in drv.aliases]
            return "\n".join(lines) + "\n"

    # ----- device cdevs ----------------------------------------------------------------
    def open_device(self, address: str | PciAddress) -> None:
        """QEMU (iommufd) opens /dev/vfio/devices/vfioN of the device."""
        with self._lock:
            dev = self._dev(address)
            node = f"/dev/vfio/devices/vfio{dev.vfio_index}"
            if not self.vfio_device_cdev or dev.vfio_index is None or not self._on_vfio(dev):
                raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), node)
            if dev.group is not None and self.group_users.get(dev.group, 0):
                raise OSError(errno.EBUSY, f"group {dev.group} is open through /dev/vfio/{dev.group}", node)
            self.cdev_users[dev.addr] = self.cdev_users.get(dev.addr, 0) + 1
            self._changed()

    def close_device(self, address: str | PciAddress) -> None:
        """QEMU closes the device cdev; a blocked unbind proceeds."""
        with self._lock:
            a = _addr(address)
            if self.cdev_users.get(a, 0) <= 0:
                raise ValueError(f"{a} has no open cdev")
            self.cdev_users[a] -= 1
            if not self.cdev_users[a]:
                del self.cdev_users[a]
            self._changed()
            self._cond.notify_all()

    def device_users(self, address: str | PciAddress) -> int:
        with self._lock:
            return self.cdev_users.get(_addr(address), 0)

    def dev_users(self, rels: list[str]) -> dict[str, int]:
        with self._lock:
            out = {}
            for rel in rels:
                r = rel.strip("/")
                n = 0
                if r.startswith("vfio/devices/vfio") and r[17:].isdigit():
                    n = sum(users for a, users in self.cdev_users.items()    # the open cdevs, not the host
                            if (d := self.devices.get(a)) is not None and d.vfio_index == int(r[17:])
                            and self._on_vfio(d))
                elif r.startswith("vfio/") and r[5:].isdigit():
                    n = self.group_users.get(int(r[5:]), 0)
                out[rel] = n
            return out

    def _group_busy(self, group: int | None) -> bool:
        """The group node or a member's cdev is open: the group's DMA is owned by a user."""
        if group is None:
            return False
        return bool(self.group_users.get(group, 0)) or any(
            users and (d := self.devices.get(a)) is not None and d.group == group
            for a, users in self.cdev_users.items())

    def _vfio_dev_node(self, rel: str) -> bool | None:
        """dev_exists for iommu and vfio/devices/vfioN; None for other nodes."""
        if rel == "iommu":
            return self.iommufd and self.iommu
        if rel.startswith("vfio/devices/vfio") and rel[17:].isdigit():
            return self.vfio_device_cdev and any(d.vfio_index == int(rel[17:]) and self._on_vfio(d)
                                                 for d in self.devices.values())
        return None

    def _modules_list(self, name: str) -> str:
        """modules.dep or modules.builtin: only iommufd's line matters to hostdevd."""
        ko = "kernel/drivers/iommu/iommufd/iommufd.ko"
        if name == "modules.dep" and self.iommufd_build == "module":
            return f"{ko}.xz:\nkernel/drivers/vfio/vfio.ko.xz:\n"
        if name == "modules.builtin" and self.iommufd_build == "builtin":
            return f"{ko}\n"
        return "kernel/drivers/vfio/vfio.ko.xz:\n" if name == "modules.dep" else ""
