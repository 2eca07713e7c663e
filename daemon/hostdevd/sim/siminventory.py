"""The simulated kernel's inventory facts: NUMA node, PCIe link, power state, and the host's pci.ids.

:class:`SimKernel` inherits :class:`SimShare`; the spec loader calls :func:`load_facts` per device
and :func:`load_pci_ids` once. Spec keys::

    devices[]: "numa_node": 0,                 # default -1 (no NUMA affinity), as the kernel prints it
               "power_state": "D3hot",         # default "D0"
               "pcie_link": {"speed": 8.0, "width": 4, "max_speed": 16.0, "max_width": 16}
                                               # GT/s or "Unknown"; lanes. Absent: no link attributes
                                               # (a conventional PCI function)
    "pci_ids": {"8086": {"name": "Intel Corporation", "devices": {"10d3": "82574L Gigabit ..."}}}
                                               # served as /usr/share/misc/pci.ids, in its own format

A VF has its PF's NUMA node, as on real hardware, and no link attributes of its own here.
"""
from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .simspec import SpecLoader

_ID = re.compile(r"^[0-9a-fA-F]{4}$")
_POWER = ("D0", "D1", "D2", "D3hot", "D3cold", "unknown", "error")
_SPEEDS = (2.5, 5.0, 8.0, 16.0, 32.0, 64.0)
PCI_IDS_AT = "misc/pci.ids"


@dataclass
class SimLink:
    speed: float | None            # None: "Unknown"
    width: int
    max_speed: float | None
    max_width: int


@dataclass
class SimFacts:
    numa_node: int = -1
    power_state: str = "D0"
    link: SimLink | None = None

    def for_vf(self) -> SimFacts:
        return SimFacts(numa_node=self.numa_node)

    def files(self) -> dict[str, str]:
        """Attribute name -> its text, as drivers/pci/pci-sysfs.c prints it."""
        out = {"numa_node": f"{self.numa_node}\n", "power_state": f"{self.power_state}\n"}
        if self.link is not None:
            out |= {"current_link_speed": _speed(self.link.speed), "current_link_width": f"{self.link.width}\n",
                    "max_link_speed": _speed(self.link.max_speed), "max_link_width": f"{self.link.max_width}\n"}
        return out


def _speed(gts: float | None) -> str:
    return "Unknown\n" if gts is None else f"{gts:.1f} GT/s PCIe\n"


def _gts(loader: SpecLoader, v: Any, where: str) -> float | None:
    if v == "Unknown":
        return None
    if isinstance(v, int | float) and not isinstance(v, bool) and float(v) in _SPEEDS:
        return float(v)
    loader.fail(where, f"pcie_link speeds are GT/s ({', '.join(map(str, _SPEEDS))}) or \"Unknown\", got {v!r}")


def load_facts(loader: SpecLoader, raw: dict, where: str) -> SimFacts:
    numa = loader.typed(raw, "numa_node", (int,), where, -1)
    if not -1 <= numa < 1024:
        loader.fail(where, f"numa_node must be -1..1023, got {numa!r}")
    power = loader.typed(raw, "power_state", (str,), where, "D0")
    if power not in _POWER:
        loader.fail(where, f"power_state must be one of {', '.join(_POWER)}, got {power!r}")
    facts = SimFacts(numa_node=numa, power_state=power)
    if "pcie_link" in raw:
        w = f"{where}.pcie_link"
        link = loader.keys(raw["pcie_link"], {"speed", "width", "max_speed", "max_width"}, w)
        widths = [loader.typed(link, k, (int,), w, 0) for k in ("width", "max_width")]
        if not all(n in (0, 1, 2, 4, 8, 12, 16, 32) for n in widths):
            loader.fail(w, f"widths must be 0 (link down) or 1, 2, 4, 8, 12, 16, 32 lanes, got {widths}")
        facts.link = SimLink(_gts(loader, link.get("speed", "Unknown"), w), widths[0],
                             _gts(loader, link.get("max_speed", "Unknown"), w), widths[1])
    return facts


def load_pci_ids(loader: SpecLoader, raw: Any) -> str | None:
    """The spec's pci_ids rendered as pci.ids text (with a subsystem line and the class section,
    which a lookup must step over)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        loader.fail("pci_ids", "must be an object {vendor: {name, devices}}")
    lines = ["#\tList of PCI ID's (simulated)", "#", "# Vendors, devices and subsystems."]
    for vendor, entry in sorted(raw.items()):
        entry = loader.keys(entry, {"name", "devices"}, f"pci_ids.{vendor}")
        devices = entry.get("devices", {})
        if not _ID.match(str(vendor)) or not isinstance(entry.get("name"), str) or not isinstance(devices, dict):
            loader.fail(f"pci_ids.{vendor}", "needs a 4-hex-digit vendor id, a name and devices {id: name}")
        lines.append(f"{vendor.lower()}  {entry['name']}")
        for device, name in sorted(devices.items()):
            if not _ID.match(str(device)) or not isinstance(name, str):
                loader.fail(f"pci_ids.{vendor}", f"bad device entry {device!r}: {name!r}")
            lines += [f"\t{device.lower()}  {name}", f"\t\t{vendor.lower()} 0000  {name} (subsystem)"]
    lines += ["", "# List of known device classes, subclasses and programming interfaces", "C 02  Network controller",
              "\t00  Ethernet controller"]
    return "\n".join(lines) + "\n"


class SimShare:
    """/usr/share as the inventory reads it: only pci.ids, when the spec gives one."""
    pci_ids_text: str | None = None

    def share_read(self, rel: str) -> str:
        if self.pci_ids_text is None or rel.strip("/") != PCI_IDS_AT:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), f"/usr/share/{rel}")
        return self.pci_ids_text
