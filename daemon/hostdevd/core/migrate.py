"""Live migration and assigned devices: what blocks it, and what can be hot-unplugged first.

QEMU cannot live-migrate a guest that holds a VFIO-assigned PCI device
without device migration support, and libvirt refuses such a migration up
front ("domain has assigned non-USB host devices"). The way out is the
unplug → migrate → replug flow:

1. ``hostdevctl detach DOMAIN --device BDF`` for each device (the guest lets
   go, hostdevd gives the group back to the host);
2. ``virsh migrate --live DOMAIN qemu+ssh://DEST/system``;
3. on DEST: ``hostdevctl attach DOMAIN --device BDF`` with DEST's device.

Whether a device can be hot-unplugged depends on where the guest sees it
(read from the live XML by :func:`hostdevd.domxml.guest_placements`): on a
hotplug-capable slot (pcie-root-port, switch downstream port, pci-bridge,
i440fx's pci-root) yes; on q35's root complex (pcie-root, bus 0), an expander
bus, a controller with ``<target hotplug='off'/>`` or in a multifunction guest
slot no (libvirt refuses: "cannot hot unplug multifunction PCI device").

Pure: no libvirt, no sysfs. The daemon (``hostdevctl check-migrate``) and the
hook's ``migrate`` phase feed it the XML they have.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .address import PciAddress
from .ledger import Claim
from .topology import VFIO, Topology

# Guest buses whose devices cannot be hot-plugged or unplugged.
NO_HOTPLUG = {
    "pcie-root": "it sits on q35's root complex (bus 0) as an integrated endpoint, which PCIe cannot "
                 "hot-unplug; give it a pcie-root-port (<address bus='0x01' .../> behind one)",
    "pcie-expander-bus": "it sits directly on a pcie-expander-bus, which has no hotplug",
    "dmi-to-pci-bridge": "it sits on a dmi-to-pci-bridge bus, which has no hotplug",
}

if TYPE_CHECKING:
    from .domxml import DomainPlacement, GuestPlacement


@dataclass
class DeviceVerdict:
    address: str
    role: str                       # requested (in the guest) | companion (held for the group only)
    kind: str | None = None         # hostdev | interface
    guest: str | None = None        # where the guest sees it
    controller: str | None = None
    group: int | None = None
    blocks: bool = True
    unplug: bool | None = None      # None: unknown (no live XML)
    reason: str = ""
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"address": self.address, "role": self.role, "kind": self.kind, "guest": self.guest,
                "controller": self.controller, "group": self.group, "blocks": self.blocks,
                "unplug": self.unplug, "reason": self.reason, "notes": self.notes}


@dataclass
class MigrationReport:
    domain: str
    source: str                     # "live XML" | "hook XML" | "ledger"
    devices: list[DeviceVerdict] = field(default_factory=list)
    running: bool | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def blocking(self) -> list[DeviceVerdict]:
        return [d for d in self.devices if d.blocks]

    @property
    def blocked(self) -> bool:
        return bool(self.blocking)

    @property
    def unplug_first(self) -> list[str]:
        return [d.address for d in self.blocking if d.unplug is not False]

    @property
    def cannot_unplug(self) -> list[str]:
        return [d.address for d in self.blocking if d.unplug is False]

    def steps(self) -> list[str]:
        if not self.blocked:
            return []
        if self.cannot_unplug:
            return [f"stop {self.domain} (or migrate it offline: virsh migrate --offline --persistent): "
                    f"{', '.join(self.cannot_unplug)} cannot be hot-unplugged"]
        out = [f"hostdevctl detach {self.domain} --device {a}" for a in self.unplug_first]
        out.append(f"virsh migrate --live {self.domain} qemu+ssh://DEST/system")
        out += [f"hostdevctl attach {self.domain} --device BDF   # on DEST: its device replacing {a}"
                for a in self.unplug_first]
        return out

    def summary(self) -> str:
        if not self.devices:
            return f"{self.domain}: no assigned PCI device; nothing in hostdevd's way of a live migration"
        if not self.blocked:
            return f"{self.domain}: holds only companions; no assigned device blocks a live migration"
        n = len(self.blocking)
        verdict = (f"{len(self.unplug_first)} can be hot-unplugged first" if not self.cannot_unplug else
                   f"{len(self.cannot_unplug)} cannot be hot-unplugged")
        return (f"{self.domain}: live migration BLOCKED by {n} assigned PCI device{'s' if n > 1 else ''} "
                f"({verdict})")

    def to_json(self) -> dict:
        return {"domain": self.domain, "source": self.source, "running": self.running, "blocked": self.blocked,
                "devices": [d.to_json() for d in self.devices], "unplug_first": self.unplug_first,
                "cannot_unplug": self.cannot_unplug, "steps": self.steps(), "summary": self.summary(),
                "notes": self.notes}


def _unplug_verdict(p: GuestPlacement) -> tuple[bool | None, str]:
    if p.guest_bus is None:
        return None, "libvirt has not given it a guest address in this XML"
    where = f"guest {p.to_dict()['guest']}" + (f" on a {p.controller}" if p.controller else "")
    if p.hotplug_off:
        return False, f"{where}: that controller has hotplug='off'"
    if p.multifunction:
        return False, (f"{where} is part of a multifunction guest slot; libvirt cannot hot-unplug one "
                       "function of it")
    if p.controller in NO_HOTPLUG:
        return False, f"{where}: {NO_HOTPLUG[p.controller]}"
    return True, f"{where}: hot-pluggable slot"


def _ledger_verdict(address: str, group: int, topo: Topology | None) -> DeviceVerdict:
    """A requested device known from the ledger alone. Whether the guest can hold it is read
    from the driver sysfs shows: off every vfio driver (or gone), QEMU cannot have it open."""
    v = DeviceVerdict(address, "requested", None, None, None, group, True, None,
                      "claimed in the ledger; guest placement unknown without the domain's live XML")
    dev = topo.devices.get(PciAddress.parse(address)) if topo is not None else None
    if topo is not None and (dev is None or not dev.on_vfio):
        now_on = "gone from the host" if dev is None else f"on {dev.driver or 'no driver'}, not vfio-pci"
        v.blocks, v.reason = False, f"claimed in the ledger, but {now_on}: the guest cannot be holding it"
    return v


def assess(name: str, placement: DomainPlacement | None, claims: list[Claim], topo: Topology | None = None,
           source: str = "live XML") -> MigrationReport:
    """The migration verdict for one domain.

    ``placement``: the devices the domain's XML assigns (None when no XML is
    available: then the ledger's claims say what it holds, without guest
    placement, and ``topo``'s drivers say whether it can still hold it).
    ``claims``: the domain's claims (companions come from there). ``topo``: the
    host, for drivers, groups and class notes (optional; the engine always gives one).
    """
    report = MigrationReport(domain=name, source=source if placement is not None else "ledger")
    seen: set[str] = set()
    group_of = {d.address: c.group for c in claims for d in c.devices}
    if placement is not None:
        for p in placement.devices:
            a = str(p.host)
            seen.add(a)
            unplug, why = _unplug_verdict(p)
            v = DeviceVerdict(a, "requested", p.kind, p.to_dict()["guest"], p.controller, group_of.get(a),
                              True, unplug, why)
            if p.kind == "interface":
                v.notes.append("an <interface type='hostdev'>: the guest loses that NIC until it is attached "
                               "again (libvirt sets its MAC/VLAN again on attach)")
            report.devices.append(v)
    else:
        for c in claims:
            for d in c.devices:
                if d.role == "requested":
                    seen.add(d.address)
                    report.devices.append(_ledger_verdict(d.address, c.group, topo))
    for c in claims:
        for d in c.devices:
            if d.address not in seen:
                report.devices.append(DeviceVerdict(
                    d.address, "companion", None, None, None, c.group, False, None,
                    f"companion held so that group {c.group} stays viable; not in the guest, it goes back to "
                    "the host with the group"))
    if topo is not None:
        for v in report.devices:
            dev = topo.devices.get(PciAddress.parse(v.address))
            if dev is None:
                continue
            v.group = dev.group if dev.group is not None else v.group    # the kernel's group, not the record's
            if v.role == "requested" and dev.class_code.startswith("03"):
                v.notes.append("a display controller: the guest loses that display while it is unplugged")
            if v.role == "requested" and dev.has_vfio_dev and dev.driver not in (VFIO, None):
                v.notes.append(f"bound to the VFIO variant driver {dev.driver}, which may implement VFIO device "
                               "migration; libvirt and QEMU decide whether it migrates, hostdevd counts it as "
                               "blocking")
    if any(d.unplug is False for d in report.devices):
        report.notes.append("devices that cannot be hot-unplugged keep the guest on this host until it stops")
    return report

