"""The host's PCI topology: devices, IOMMU groups, bridges vs endpoints, PF/VF links.

Built from live sysfs (:func:`from_sysfs`), a JSON snapshot (:func:`from_snapshot`),
or the IOMMU-group listings users post (``hostdevd.listing.parse_listing``).
A Topology is a value: the planner reads it and never changes it.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

from .address import PciAddress
from .device import BRIDGE_CLASSES, STUB_DRIVERS, VFIO, VFIO_DRIVERS, Device, is_vfio_driver
from .errors import InvalidAddress, ListingError, UnknownDevice
from .sysfs import Sysfs
from .variants import VariantTable

if TYPE_CHECKING:
    from .preflight import Preflight

# Device and its class/driver constants live in .device; re-exported for existing importers.
__all__ = ["BRIDGE_CLASSES", "STUB_DRIVERS", "VFIO", "VFIO_DRIVERS", "Device", "Source", "Topology",
           "from_group_reads", "from_snapshot", "from_sysfs", "is_vfio_driver", "refresh_groups"]

Source = Literal["sysfs", "snapshot", "listing"]


@dataclass
class Topology:
    devices: dict[PciAddress, Device]
    iommu_active: bool
    source: Source
    # Host-critical devices known for certain (live host): address -> reason.
    critical: dict[PciAddress, str] = field(default_factory=dict)
    # Open file descriptors on /dev/vfio/<group> and on its members' /dev/vfio/devices/vfioN
    # (QEMU holding the group, legacy or iommufd); live host only.
    group_users: dict[int, int] = field(default_factory=dict)
    # The kernel's vfio_pci: aliases and loaded drivers (core/variants.py); live host only.
    variants: VariantTable | None = None
    # Pre-flight facts (holders, power, NUMA) of the groups a prepare touches; live host only
    # (core/preflight.py with_preflight).
    preflight: Preflight | None = None

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

    def require(self, addr: PciAddress) -> Device:
        """A device the caller knows is there (a member of a group it just read): UnknownDevice
        naming it when it is not."""
        dev = self.devices.get(addr)
        if dev is None:
            raise UnknownDevice(f"no PCI device {addr} on this host", "the topology changed; run `hostdevctl check`")
        return dev

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


# What refresh_groups keeps from the scan rather than re-reading: the rest is fresh.
_KEPT_FROM_SCAN = ("bridge", "group", "name", "header_type")


def from_sysfs(sysfs: Sysfs, with_critical: bool = True, listed_critical: Sequence[str] = ()) -> Topology:
    """The live host; ``listed_critical`` is policy.critical (see :meth:`Sysfs.host_critical`)."""
    devices: dict[PciAddress, Device] = {addr: sysfs.read_device(addr) for addr in sysfs.device_addresses()}
    active = sysfs.iommu_active() or any(d.group is not None for d in devices.values())
    critical = sysfs.host_critical(listed_critical) if with_critical else {}
    vfio_groups = {d.group for d in devices.values() if d.group is not None and d.on_vfio}
    users = {g: n for g in sorted(vfio_groups) if (n := sysfs.vfio_users(g))}
    return Topology(devices=devices, iommu_active=active, source="sysfs", critical=critical,
                    group_users=users, variants=sysfs.vfio_variants())


def from_group_reads(sysfs: Sysfs, addresses: Iterable[PciAddress] = (), groups: Iterable[int] = (), *,
                     iommu_active: bool | None = None) -> Topology:
    """The part of the live host a request decides on, read in O(group), not O(host) (issue 13):
    the ``addresses`` that exist, every member of their IOMMU groups and of ``groups``
    (``iommu_group/devices``), and the PF of each VF among them (its netdev carries the VF's
    MAC/VLAN). Who holds those groups open and the vfio variants come along; host-critical
    devices are the caller's (:meth:`Engine.critical` caches them)."""
    devices: dict[PciAddress, Device] = {}
    todo = list(dict.fromkeys(groups))

    def read(addr: PciAddress) -> Device | None:
        if addr not in devices and sysfs.exists(addr):
            devices[addr] = sysfs.read_device(addr)
        return devices.get(addr)

    for addr in dict.fromkeys(addresses):
        dev = read(addr)
        if dev is not None and dev.group is not None and dev.group not in todo:
            todo.append(dev.group)
    for g in todo:
        for addr in sysfs.group_member_addresses(g):
            read(addr)
    for dev in list(devices.values()):
        if dev.physfn is not None:
            read(dev.physfn)
    if iommu_active is None:
        iommu_active = sysfs.iommu_active() or any(d.group is not None for d in devices.values())
    vfio_groups = {d.group for d in devices.values() if d.group is not None and d.on_vfio}
    users = {g: n for g in sorted(vfio_groups) if (n := sysfs.vfio_users(g))}
    return Topology(devices=devices, iommu_active=iommu_active, source="sysfs", group_users=users,
                    variants=sysfs.vfio_variants())


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
            devices[addr] = replace(sysfs.read_device(addr), **{k: getattr(dev, k) for k in _KEPT_FROM_SCAN})
    users = dict(topo.group_users)
    for g in groups:
        users.pop(g, None)
        if any(d.group == g and d.on_vfio for d in devices.values()):
            if n := sysfs.vfio_users(g):
                users[g] = n
    return replace(topo, devices=devices, group_users=users)
