"""Host validation for `hostdevctl check` (R1 IOMMU and interrupt remapping, vfio modules,
groups shared with host-critical devices, ledger vs sysfs drift)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from .ledger import Ledger
from .states import ClaimState
from .sysfs import Sysfs
from .topology import VFIO, from_sysfs

Status = Literal["ok", "warn", "fail"]


@dataclass
class Check:
    name: str
    status: Status
    message: str
    hint: str = ""

    def to_json(self) -> dict:
        return {"name": self.name, "status": self.status, "message": self.message, "hint": self.hint}


def run_checks(sysfs: Sysfs, ledger: Ledger, listed_critical: Sequence[str] = ()) -> list[Check]:
    topo = from_sysfs(sysfs, listed_critical=listed_critical)
    out: list[Check] = []
    units = sysfs.iommu_units()
    groups = sysfs.iommu_groups()
    if units or groups:
        out.append(Check("iommu", "ok", f"IOMMU active ({', '.join(units) or 'units not listed'}), "
                                        f"{len(groups)} groups"))
    else:
        out.append(Check("iommu", "fail", "no IOMMU: /sys/class/iommu is empty and there are no IOMMU groups",
                         "enable VT-d / AMD-Vi in the firmware and boot with intel_iommu=on (Intel) "
                         "or amd_iommu=on (AMD)"))

    ir = sysfs.interrupt_remapping()
    unsafe = sysfs.unsafe_interrupts_allowed()
    if ir:
        out.append(Check("interrupt-remapping", "ok", "interrupt remapping enabled (IR- interrupt chips)"))
    elif unsafe:
        out.append(Check("interrupt-remapping", "warn",
                         "no interrupt remapping; vfio_iommu_type1.allow_unsafe_interrupts=1 is set: a guest can "
                         "inject interrupts into the host (security downgrade)",
                         "use a platform with interrupt remapping and drop allow_unsafe_interrupts"))
    elif units or groups:
        out.append(Check("interrupt-remapping", "fail",
                         "interrupt remapping is not enabled: vfio refuses to assign devices",
                         "enable x2APIC/interrupt remapping in the firmware (intremap=on)"))
    else:
        out.append(Check("interrupt-remapping", "fail", "no interrupt remapping (no IOMMU)",
                         "enable the IOMMU first"))
    if unsafe and ir:
        out.append(Check("unsafe-interrupts", "warn", "allow_unsafe_interrupts=1 is set although remapping works",
                         "remove vfio_iommu_type1.allow_unsafe_interrupts=1"))

    missing = [m for m in ("vfio", "vfio_iommu_type1", "vfio_pci")
               if not sysfs.module_loaded(m) and not (m == "vfio_pci" and sysfs.driver_loaded(VFIO))]
    if missing:
        out.append(Check("vfio-modules", "warn", f"not loaded: {', '.join(missing)} (hostdevd loads vfio-pci "
                                                 "on demand)", "modprobe vfio-pci, or list it in "
                                                               "/etc/modules-load.d/vfio.conf"))
    else:
        out.append(Check("vfio-modules", "ok", "vfio, vfio_iommu_type1 and vfio-pci loaded"))

    shared = []
    for addr, reason in sorted(topo.critical.items()):
        dev = topo.get(addr)
        if dev is None or dev.group is None:
            continue
        others = [str(m.address) for m in topo.group_members(dev.group) if not m.bridge and m.address != addr]
        if others:
            shared.append(f"group {dev.group}: {', '.join(others)} share it with {addr} ({reason})")
    if shared:
        out.append(Check("critical-groups", "warn", "; ".join(shared),
                         "these devices cannot be passed through without taking the host's device; "
                         "move the card to another slot or use policy.allow_host_critical"))
    else:
        out.append(Check("critical-groups", "ok", f"{len(topo.critical)} host-critical devices, none shares "
                                                  "a group with another endpoint"))

    drift = []
    for claim in ledger.claims.values():
        for rec in claim.devices:
            drv = sysfs.driver(rec.pci) if sysfs.exists(rec.pci) else "gone"
            if claim.state == ClaimState.ACTIVE and drv != VFIO and not (drv is None and rec.original_driver is None
                                                                        and not rec.bound_by_us):
                drift.append(f"{rec.address} claimed by {claim.owner.name} but on {drv or 'no driver'}")
    unclaimed = [str(d.address) for d in topo.devices.values()
                 if d.on_vfio and ledger.claim_for_device(d.address) is None]
    if drift:
        out.append(Check("ledger", "warn", "; ".join(drift), "hostdevctl release the owner, then prepare again"))
    else:
        out.append(Check("ledger", "ok", f"{len(ledger.claims)} claims consistent with sysfs"))
    if unclaimed:
        out.append(Check("unclaimed-vfio", "warn", f"on vfio-pci but claimed by nobody: {', '.join(unclaimed)}",
                         "bound by hand or by libvirt; hostdevd leaves them as they are"))
    return out
