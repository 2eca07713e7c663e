"""The inventory half of :mod:`.sysfs`: facts ``hostdevctl groups --json`` reports that no rule needs.

* per device: ``numa_node``, the PCIe link (``current_link_speed``, ``current_link_width``,
  ``max_link_speed``, ``max_link_width``; PCIe functions only) and ``power_state``;
* the host's pci.ids (``<share root>/misc/pci.ids``, else ``hwdata/pci.ids``: Debian's and
  Fedora's places), read once through the backend and searched lazily (:mod:`.pciids`).

Kept out of :meth:`Sysfs.read_device` on purpose: the daemon re-reads devices under group
locks, and none of this decides anything. :class:`~hostdevd.core.sysfs.Sysfs` inherits it;
paths are built from a validated :class:`PciAddress` and fixed names only.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .address import PciAddress
from .errors import SysfsError
from .pciids import PciIds

if TYPE_CHECKING:
    from .sysfs import HostBackend

PCI_IDS_PLACES = ("misc/pci.ids", "hwdata/pci.ids")
_SPEED_RE = re.compile(r"^([0-9]{1,3}(?:\.[0-9]{1,2})?) ?GT/s")     # "8.0 GT/s PCIe", older "8 GT/s"
_POWER_RE = re.compile(r"^[A-Za-z0-9]{1,16}$")                       # D0, D3hot, D3cold, unknown


def link_speed_gts(text: str | None) -> float | None:
    """GT/s from the kernel's speed text; None for "Unknown" or anything else."""
    m = _SPEED_RE.match(text or "")
    return float(m[1]) if m else None


@dataclass(frozen=True)
class PcieLink:
    current_speed_gts: float | None
    current_width: int | None
    max_speed_gts: float | None
    max_width: int | None

    def to_json(self) -> dict:
        return {"current_speed_gts": self.current_speed_gts, "current_width": self.current_width,
                "max_speed_gts": self.max_speed_gts, "max_width": self.max_width}


@dataclass(frozen=True)
class DeviceFacts:
    """What sysfs and pci.ids say about one function beyond :class:`~hostdevd.core.device.Device`."""
    vendor_name: str | None = None
    device_name: str | None = None
    numa_node: int | None = None          # None: no NUMA affinity (the kernel's -1) or unreadable
    pcie_link: PcieLink | None = None     # None: not a PCIe function (no link attributes)
    power_state: str | None = None


class InventoryReads:
    backend: HostBackend
    _pci_ids: PciIds | None

    if TYPE_CHECKING:   # provided by Sysfs
        @staticmethod
        def _dev(addr: PciAddress, attr: str = "") -> str: ...
        def _read(self, rel: str) -> str | None: ...

    def _fact(self, addr: PciAddress, attr: str) -> str | None:
        """An attribute's text, None when absent or unreadable (a link a driver cannot read gives
        EINVAL): one odd file never stops the inventory."""
        try:
            return self._read(self._dev(addr, attr))
        except SysfsError:
            return None

    def _fact_int(self, addr: PciAddress, attr: str) -> int | None:
        text = self._fact(addr, attr)
        return int(text) if text is not None and re.fullmatch(r"-?[0-9]{1,6}", text) else None

    def pci_ids(self) -> PciIds:
        """The host's pci.ids, read on first use; an empty one when the host has none."""
        if self._pci_ids is None:
            text = ""
            for rel in PCI_IDS_PLACES:
                try:
                    text = self.backend.share_read(rel)
                    break
                except (OSError, UnicodeDecodeError):
                    continue
            self._pci_ids = PciIds(text)
        return self._pci_ids

    def device_facts(self, addr: PciAddress, vendor: str, device: str) -> DeviceFacts:
        numa = self._fact_int(addr, "numa_node")
        width, max_width = self._fact_int(addr, "current_link_width"), self._fact_int(addr, "max_link_width")
        speed, max_speed = self._fact(addr, "current_link_speed"), self._fact(addr, "max_link_speed")
        link = None
        if (speed, max_speed, width, max_width) != (None, None, None, None):
            link = PcieLink(link_speed_gts(speed), width, link_speed_gts(max_speed), max_width)
        power = self._fact(addr, "power_state")
        vname, dname = self.pci_ids().names(vendor, device)
        return DeviceFacts(vendor_name=vname, device_name=dname,
                           numa_node=numa if numa is not None and numa >= 0 else None,
                           pcie_link=link, power_state=power if power and _POWER_RE.match(power) else None)
