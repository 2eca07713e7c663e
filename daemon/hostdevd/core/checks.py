"""Host validation for `hostdevctl check` (R1 IOMMU and interrupt remapping, vfio modules,
iommufd and device cdevs (R14), groups shared with host-critical devices, ledger vs sysfs drift,
and the pre-flight facts of the devices that could be passed through: processes holding them,
D3cold or unreadable config space, no reset method)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from .ledger import Ledger
from .ledger_store import LedgerHealth
from .preflight import D3COLD, Preflight, gather, holder_hint, holders_text
from .states import ClaimState
from .sysfs import Sysfs
from .topology import VFIO, Device, Topology, from_sysfs

Status = Literal["ok", "warn", "fail"]


@dataclass
class Check:
    name: str
    status: Status
    message: str
    hint: str = ""

    def to_json(self) -> dict:
        return {"name": self.name, "status": self.status, "message": self.message, "hint": self.hint}


def ledger_file_check(health: LedgerHealth) -> Check | None:
    """The ledger's files (README "Storage faults"): a damaged ledger, the generation in use, the
    damaged files kept. None when there is nothing to say."""
    name = health.path.name
    if health.damaged is not None and health.generation is None:
        return Check("ledger", "fail", f"{health.damaged}, and no earlier generation is readable "
                                       f"({health.unusable_bak or 'none tried'}): hostdevd runs read-only and "
                                       "refuses new claims",
                     f"check `hostdevctl groups` for devices on vfio-pci, repair {health.path} or move it aside, "
                     "then `systemctl restart hostdevd`")
    if health.damaged is not None:
        return Check("ledger", "fail", f"{health.damaged}; the previous generation {health.generation} is "
                                       f"readable ({len(health.ledger.claims)} claims)",
                     f"`systemctl restart hostdevd`: it goes on from {health.generation} and keeps the damaged "
                     f"file as {name}.damaged-TIME")
    if health.kept:
        return Check("ledger", "warn", f"{name} was damaged and is kept as {', '.join(health.kept)}; hostdevd "
                                       f"went on from the previous generation ({name}.bak): claims recorded "
                                       "only in the damaged file are missing",
                     "compare the damaged file with `hostdevctl status`, release or prepare what differs, "
                     "then delete the damaged file")
    return None


_CDEV_NOTE = "release waits for /dev/vfio/N and the device cdevs either way"


def _libvirt_note(libvirt_iommufd: bool | None) -> str:
    if libvirt_iommufd is None:
        return "libvirt was not asked (not running, or not readable here)"
    if libvirt_iommufd:
        return "libvirt's domain capabilities advertise iommufd, so a domain may open its devices that way"
    return "the installed libvirt does not advertise iommufd (domain capabilities): it opens /dev/vfio/N"


def iommufd_check(sysfs: Sysfs, topo: Topology, libvirt_iommufd: bool | None = None) -> Check:
    """R14: could QEMU use iommufd (/dev/iommu, and /dev/vfio/devices/vfioN for devices on vfio drivers),
    and does the installed libvirt say it can (``libvirt_iommufd``: from its domain capabilities)."""
    tail = f"{_libvirt_note(libvirt_iommufd)}; {_CDEV_NOTE}"
    support = sysfs.iommufd_support()
    if support == "absent":
        return Check("iommufd", "ok", f"this kernel ({sysfs.kernel_release()}) has no iommufd (CONFIG_IOMMUFD is "
                     "not set: no iommufd.ko in modules.dep or modules.builtin), so QEMU uses the /dev/vfio/N "
                     f"container; {tail}", "a kernel built with CONFIG_IOMMUFD and CONFIG_VFIO_DEVICE_CDEV, "
                     "if guests should use iommufd")
    if support == "module":
        return Check("iommufd", "warn", f"iommufd is a module of this kernel but not loaded (no /dev/iommu): QEMU "
                     f"can only use the /dev/vfio/N container; {tail}",
                     "`modprobe iommufd` (and list it in /etc/modules-load.d/) if guests should use iommufd")
    if support == "unknown":
        return Check("iommufd", "warn", "no /dev/iommu, and this kernel's modules.dep does not say whether it has "
                     f"iommufd: QEMU can only use the /dev/vfio/N container; {tail}",
                     "`modprobe iommufd` (CONFIG_IOMMUFD) if guests should use iommufd")
    on_vfio = [d.address for d in topo.devices.values() if d.on_vfio]
    if not on_vfio:
        return Check("iommufd", "ok", "/dev/iommu present; no device is on a vfio driver now, so device cdevs "
                     f"(/dev/vfio/devices/vfioN) cannot be checked yet; {tail}")
    missing = [str(a) for a in on_vfio
               if not ((c := sysfs.vfio_cdev(a)) is not None and sysfs.vfio_cdev_node_exists(c))]
    if missing:
        return Check("iommufd", "warn", f"/dev/iommu present, but {', '.join(missing)} on a vfio driver "
                     f"has no /dev/vfio/devices/vfioN: iommufd cannot open it; {tail}",
                     "a kernel with CONFIG_VFIO_DEVICE_CDEV=y (6.6+; Debian 13's stock 6.12 is built without it)")
    return Check("iommufd", "ok", f"/dev/iommu present and all {len(on_vfio)} devices on vfio drivers have "
                 f"/dev/vfio/devices/vfioN; {tail}")


def run_checks(sysfs: Sysfs, ledger: Ledger, listed_critical: Sequence[str] = (),
               health: LedgerHealth | None = None, libvirt_iommufd: bool | None = None) -> list[Check]:
    """``health``: what the ledger's files say (LedgerStore.inspect); ``ledger`` is the generation in use;
    ``libvirt_iommufd``: whether libvirt's domain capabilities advertise iommufd (None: not asked)."""
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
    out.append(iommufd_check(sysfs, topo, libvirt_iommufd))

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

    files = ledger_file_check(health) if health is not None else None
    if files is not None:
        out.append(files)
    drift = []
    for claim in ledger.claims.values():
        for rec in claim.devices:
            dev = topo.get(rec.pci)
            drv = dev.driver if dev is not None else "gone"
            on_vfio = dev is not None and dev.on_vfio          # vfio-pci or a variant (R13)
            if claim.state == ClaimState.ACTIVE and not on_vfio and not (drv is None and rec.original_driver is None
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
    out += preflight_checks(sysfs, topo)
    return out


def passthrough_candidates(topo: Topology) -> list[Device]:
    """Endpoints a domain could be given: in an IOMMU group, not host-critical, not the boot VGA,
    not chipset (class 06xx: host, ISA and other bridges)."""
    return [d for d in sorted(topo.devices.values(), key=lambda d: d.address)
            if d.group is not None and not d.bridge and not d.boot_vga and d.address not in topo.critical
            and not d.class_code.startswith("06")]


def _few(items: list[str], limit: int = 6) -> str:
    return "; ".join(items[:limit]) + (f"; and {len(items) - limit} more" if len(items) > limit else "")


def preflight_checks(sysfs: Sysfs, topo: Topology, pf: Preflight | None = None) -> list[Check]:
    """The pre-flight facts of every passthrough candidate: what `plan` would refuse or warn about."""
    devices = passthrough_candidates(topo)
    if pf is None:
        pf = gather(sysfs, [d.address for d in devices])
    out = []
    held = [(d, h) for d in devices if (h := pf.devices.get(d.address)) and (h.holders or h.suspects)]
    note = f"; the scan was incomplete: {pf.scan_note}" if pf.scan_note else ""
    if held:
        out.append(Check("device-holders", "warn", _few([
            f"{d.address} held by {holders_text(h.holders or h.suspects)}"
            + (" (nvidia nodes; which GPU is unknown)" if not h.holders else "") for d, h in held]) + note,
            "a bind of these is refused while they hold them: " + holder_hint(
                [x for _, h in held for x in (h.holders or h.suspects)], held[0][0].vendor_device)))
    else:
        out.append(Check("device-holders", "warn" if pf.scan_note else "ok",
                         f"no process holds any of the {len(devices)} passthrough candidates "
                         f"({pf.processes} processes scanned){note}",
                         "run as root to see every process" if pf.scan_note else ""))
    power = []
    for d in devices:
        h = pf.devices.get(d.address)
        if h is not None and h.power_state == D3COLD:
            power.append(f"{d.address} is in D3cold")
        elif h is not None and not h.config_readable:
            power.append(f"{d.address} has an unreadable config space")
    if power:
        out.append(Check("power-state", "warn", _few(power) + ": binding them may fail",
                         "check the slot's power and runtime PM (power/control = on), `lspci -vvv` and dmesg"))
    else:
        out.append(Check("power-state", "ok", f"all {len(devices)} passthrough candidates are powered and their "
                                             "config space reads back"))
    no_reset = [str(d.address) for d in devices if not d.reset_method and not d.has_reset]
    if no_reset:
        out.append(Check("reset", "warn", f"no reset method: {_few(no_reset)}: their state can leak from one guest "
                                          "to the next", "pass them only to guests that trust each other"))
    else:
        out.append(Check("reset", "ok", f"all {len(devices)} passthrough candidates have a reset method"))
    return out
