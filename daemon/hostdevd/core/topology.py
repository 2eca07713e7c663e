"""The host's PCI topology: devices, IOMMU groups, bridges vs endpoints, PF/VF links.

Built from live sysfs (:func:`from_sysfs`), a JSON snapshot (:func:`from_snapshot`),
or the IOMMU-group listings users post (``hostdevd.listing.parse_listing``).
A Topology is a value: the planner reads it and never changes it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from typing import Literal

from .address import PciAddress
from .errors import InvalidAddress, ListingError
from .sysfs import RawDevice, Sysfs

Source = Literal["sysfs", "snapshot", "listing"]

# PCI-to-PCI bridges (0604) and semi-transparent ones (0609): the only classes a
# listing can call bridges, since it carries no header type.
BRIDGE_CLASSES = ("0604", "0609")
VFIO_DRIVERS = ("vfio-pci",)
STUB_DRIVERS = ("pci-stub",)


@dataclass
class Device:
    address: PciAddress
    vendor: str                   # "10de"
    device: str                   # "1401"
    pci_class: str                # "030000" (6 digits); class_code gives "0300"
    bridge: bool                  # header type != 0 (live) or class 0604/0609 (listing)
    group: int | None
    driver: str | None = None
    driver_override: str | None = None
    name: str | None = None       # human description (listing, lspci)
    physfn: PciAddress | None = None
    virtfns: list[PciAddress] = field(default_factory=list)
    sriov_totalvfs: int | None = None
    sriov_numvfs: int | None = None
    sriov_drivers_autoprobe: bool | None = None
    boot_vga: bool = False
    reset_method: list[str] | None = None
    has_reset: bool = False
    has_vfio_dev: bool = False
    net: list[str] = field(default_factory=list)

    @property
    def class_code(self) -> str:
        return self.pci_class[:4]

    @property
    def vendor_device(self) -> str:
        return f"{self.vendor}:{self.device}"

    @property
    def on_vfio(self) -> bool:
        return self.driver in VFIO_DRIVERS or self.has_vfio_dev

    @property
    def viable_for_vfio(self) -> bool:
        """The kernel's vfio_dev_viable(): may this member sit in an open group?"""
        return self.bridge or self.driver is None or self.on_vfio or self.driver in STUB_DRIVERS

    def to_json(self) -> dict:
        d = {
            "address": str(self.address),
            "class": self.class_code,
            "vendor": self.vendor,
            "device": self.device,
            "bridge": self.bridge,
            "pci_class": self.pci_class,
            "driver": self.driver,
            "driver_override": self.driver_override,
            "name": self.name,
            "physfn": str(self.physfn) if self.physfn else None,
            "virtfns": [str(v) for v in self.virtfns],
            "sriov_totalvfs": self.sriov_totalvfs,
            "sriov_numvfs": self.sriov_numvfs,
            "sriov_drivers_autoprobe": self.sriov_drivers_autoprobe,
            "boot_vga": self.boot_vga,
            "reset_method": self.reset_method,
            "has_reset": self.has_reset,
            "has_vfio_dev": self.has_vfio_dev,
            "net": self.net,
        }
        return d


@dataclass
class Topology:
    devices: dict[PciAddress, Device]
    iommu_active: bool
    source: Source
    # Host-critical devices known for certain (live host): address -> reason.
    critical: dict[PciAddress, str] = field(default_factory=dict)
    # Open file descriptors on /dev/vfio/<group> (QEMU holding the group); live host only.
    group_users: dict[int, int] = field(default_factory=dict)

    @property
    def groups(self) -> dict[int, list[Device]]:
        out: dict[int, list[Device]] = {}
        for d in sorted(self.devices.values(), key=lambda d: d.address):
            if d.group is not None:
                out.setdefault(d.group, []).append(d)
        return dict(sorted(out.items()))

    def group_members(self, group: int) -> list[Device]:
        return [d for d in sorted(self.devices.values(), key=lambda d: d.address) if d.group == group]

    def get(self, addr: PciAddress) -> Device | None:
        return self.devices.get(addr)

    def to_json(self) -> dict:
        groups = [
            {"group": n, "devices": [d.to_json() for d in members]}
            for n, members in self.groups.items()
        ]
        ungrouped = [d.to_json() for d in sorted(self.devices.values(), key=lambda d: d.address)
                     if d.group is None]
        return {
            "format": "hostdevd-topology/1",
            "source": self.source,
            "iommu_active": self.iommu_active,
            "groups": groups,
            "ungrouped": ungrouped,
            "critical": {str(a): r for a, r in sorted(self.critical.items())},
        }


# RawDevice (what sysfs says) and Device share these names one to one.
_SHARED_FIELDS = tuple(sorted({f.name for f in fields(Device)} & {f.name for f in fields(RawDevice)}))


def from_sysfs(sysfs: Sysfs, with_critical: bool = True) -> Topology:
    devices: dict[PciAddress, Device] = {}
    for addr in sysfs.device_addresses():
        raw = sysfs.read_device(addr)
        devices[addr] = Device(
            **{k: getattr(raw, k) for k in _SHARED_FIELDS},
            group=raw.iommu_group,
            # Header type is the kernel's own test; fall back to the class when
            # config space cannot be read.
            bridge=(raw.header_type != 0) if raw.header_type is not None
            else raw.pci_class[:4] in BRIDGE_CLASSES,
        )
    active = sysfs.iommu_active() or any(d.group is not None for d in devices.values())
    critical = sysfs.host_critical() if with_critical else {}
    vfio_groups = {d.group for d in devices.values() if d.group is not None and d.on_vfio}
    users = {g: n for g in sorted(vfio_groups) if (n := sysfs.vfio_group_users(g))}
    return Topology(devices=devices, iommu_active=active, source="sysfs", critical=critical,
                    group_users=users)


def from_snapshot(text: str) -> Topology:
    """Read what ``hostdevctl groups --save`` wrote (or the --json output of groups)."""
    try:
        data = json.loads(text)
        devices: dict[PciAddress, Device] = {}
        entries = [(g["group"], d) for g in data["groups"] for d in g["devices"]]
        entries += [(None, d) for d in data.get("ungrouped", [])]
        for group, d in entries:
            addr = PciAddress.parse(d["address"])
            cls = d.get("pci_class") or (d["class"] + "00")
            devices[addr] = Device(
                address=addr,
                vendor=d["vendor"].lower(),
                device=d["device"].lower(),
                pci_class=cls.lower(),
                bridge=bool(d["bridge"]),
                group=int(group) if group is not None else None,
                driver=d.get("driver"),
                driver_override=d.get("driver_override"),
                name=d.get("name"),
                physfn=PciAddress.parse(d["physfn"]) if d.get("physfn") else None,
                virtfns=[PciAddress.parse(v) for v in d.get("virtfns", [])],
                sriov_totalvfs=d.get("sriov_totalvfs"),
                sriov_numvfs=d.get("sriov_numvfs"),
                sriov_drivers_autoprobe=d.get("sriov_drivers_autoprobe"),
                boot_vga=bool(d.get("boot_vga", False)),
                reset_method=d.get("reset_method"),
                has_reset=bool(d.get("has_reset", False)),
                has_vfio_dev=bool(d.get("has_vfio_dev", d.get("vfio_variant", False))),  # older snapshots: vfio_variant
                net=list(d.get("net", [])),
            )
        critical = {PciAddress.parse(a): r for a, r in data.get("critical", {}).items()}
        active = bool(data.get("iommu_active", any(d.group is not None for d in devices.values())))
    except (ValueError, KeyError, TypeError, AttributeError, InvalidAddress) as e:
        raise ListingError(f"not a hostdevd topology snapshot: {e}",
                           "write one with `hostdevctl groups --save FILE`") from e
    return Topology(devices=devices, iommu_active=active, source="snapshot", critical=critical)


def refresh_groups(topo: Topology, sysfs: Sysfs, groups: set[int]) -> Topology:
    """A copy of ``topo`` whose members of ``groups`` are re-read from sysfs.

    What a prepare decides on (drivers, overrides, open groups) is read fresh under the
    group locks; the rest of the host (classes, headers, other groups) comes from the scan
    taken just before, which saves a second full scan per request.
    """
    devices = dict(topo.devices)
    for addr, dev in topo.devices.items():
        if dev.group in groups and sysfs.exists(addr):
            raw = sysfs.read_device(addr)
            devices[addr] = replace(dev, **{k: getattr(raw, k) for k in _SHARED_FIELDS})
    users = dict(topo.group_users)
    for g in groups:
        users.pop(g, None)
        if any(d.group == g and d.on_vfio for d in devices.values()):
            if n := sysfs.vfio_group_users(g):
                users[g] = n
    return replace(topo, devices=devices, group_users=users)
