"""What to offer OpenStack Nova and KubeVirt for PCI passthrough, from the topology; pure.

The CLI (doors/cli_export.py) only formats what this returns. Formats, as documented:

* Nova ``[pci] device_spec`` and ``[pci] alias`` (multi-valued, one JSON dict each; ``device_type``
  type-PCI, type-PF or type-VF, and type-PF is required to pass a SR-IOV capable device whole):
  https://docs.openstack.org/nova/latest/admin/pci-passthrough.html ("Attaching physical PCI
  devices to guests") and https://docs.openstack.org/nova/latest/configuration/config.html#pci
  (the option help in nova/conf/pci.py).
* KubeVirt ``permittedHostDevices.pciHostDevices`` (``pciVendorSelector`` "vendor:product",
  ``resourceName`` "vendor.com/product_name", ``externalResourceProvider``):
  https://kubevirt.io/user-guide/virtual_machines/host-devices/ ("Host Devices Assignment").

Neither knows IOMMU groups: Nova hands out functions one at a time and KubeVirt's device plugin
every function a vendor:device selector matches, while hostdevd moves whole groups (the hook
binds a function's companions when libvirt starts the domain). So a function is offered only
when it is its group's one endpoint and hostdevd would hand the group over; host-critical
devices never are. Everything left out says why.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from .address import PciAddress
from .assignable import GroupVerdict, group_verdicts, host_critical_reason
from .device import Device
from .ledger import Ledger
from .plan import Refusal
from .planner import Policy
from .topology import Topology

DeviceType = Literal["type-PCI", "type-PF", "type-VF"]

# resourceName domains for vendors whose own domain is plain; others get FALLBACK_DOMAIN
# (or the CLI's --resource-domain). KubeVirt lower-cases the selector, not the name.
VENDOR_DOMAINS = {"8086": "intel.com", "10de": "nvidia.com", "15b3": "nvidia.com", "1002": "amd.com",
                  "1022": "amd.com", "14e4": "broadcom.com", "144d": "samsung.com", "10ec": "realtek.com",
                  "1af4": "redhat.com", "1b36": "redhat.com"}
FALLBACK_DOMAIN = "hostdevd.local"
DOMAIN_RE = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_BRIDGE_BASE = "06"          # base class 06: host, ISA, PCI, ... bridges; chipset parts, not guest devices


@dataclass(frozen=True)
class Offered:
    address: PciAddress
    vendor: str
    device: str
    device_type: DeviceType
    group: int
    name: str | None              # pci.ids device name, else a listing's description
    held_by: str | None = None    # a domain holding the group now (its instance start would be refused)


@dataclass(frozen=True)
class LeftOut:
    address: PciAddress
    vendor_device: str
    reason: str


@dataclass
class Offer:
    offered: list[Offered] = field(default_factory=list)
    left_out: list[LeftOut] = field(default_factory=list)
    bridge_groups: list[int] = field(default_factory=list)     # groups of PCI bridges only


def _said(r: Refusal) -> str:
    return r.reason if r.device == "-" or r.reason.startswith(r.device) else f"{r.device} {r.reason}"


def _device_type(dev: Device) -> DeviceType:
    if dev.physfn is not None:
        return "type-VF"
    return "type-PF" if dev.sriov_totalvfs else "type-PCI"


def _why_not(topo: Topology, dev: Device, verdict: GroupVerdict | None) -> str | None:
    """Why ``dev`` cannot be offered alone, or None."""
    if (critical := host_critical_reason(topo, dev.address)) is not None:
        return f"host-critical: {critical}"
    if verdict is None or not topo.iommu_active:
        return "has no IOMMU group: the IOMMU is off or absent"
    if dev.class_code.startswith(_BRIDGE_BASE):
        return f"is a bridge-class device (class {dev.class_code}): part of the chipset, not for a guest"
    own = [r for r in verdict.refusals if r.device == str(dev.address)]
    if own:
        return own[0].reason
    if verdict.refusals:
        return f"its group {verdict.group} cannot go whole: {_said(verdict.refusals[0])}"
    others = [topo.require(a) for a in verdict.endpoints if a != dev.address]
    chipset = [o for o in others if o.class_code.startswith(_BRIDGE_BASE)]
    if chipset:
        return (f"its group {verdict.group} also holds {chipset[0].address}, a bridge-class device "
                f"(class {chipset[0].class_code}) that cannot go to a guest")
    if others:
        kinds = sorted({dev.vendor_device} | {o.vendor_device for o in others})
        n = len(others) + 1
        if len(kinds) > 1:
            return (f"its group {verdict.group} holds {n} functions of {len(kinds)} kinds ({', '.join(kinds)}): "
                    "handed out one by one they would be split, but the group goes whole")
        return (f"its group {verdict.group} holds {n} functions ({', '.join(str(a) for a in verdict.endpoints)}): "
                "handed out one by one they would go to different guests, but the group goes whole")
    return None


def offer(topo: Topology, ledger: Ledger, policy: Policy | None = None,
          names: Mapping[PciAddress, str | None] | None = None) -> Offer:
    """Every endpoint, offered or left out with a reason; ``names``: pci.ids device names."""
    verdicts = group_verdicts(topo, policy)
    out = Offer(bridge_groups=[g for g, v in verdicts.items() if not v.endpoints])
    for dev in sorted(topo.devices.values(), key=lambda d: d.address):
        if dev.bridge:
            continue
        reason = _why_not(topo, dev, verdicts.get(dev.group) if dev.group is not None else None)
        if reason is not None:
            out.left_out.append(LeftOut(dev.address, dev.vendor_device, reason))
            continue
        assert dev.group is not None          # _why_not refuses devices without a group
        claim = ledger.claim_for_device(dev.address)
        held = claim.owner.label() if claim is not None and claim.owner.kind != "reservation" else None
        out.offered.append(Offered(dev.address, dev.vendor, dev.device, _device_type(dev), dev.group,
                                   (names or {}).get(dev.address) or dev.name, held))
    return out


# ----- Nova ---------------------------------------------------------------------------------
def alias_name(o: Offered) -> str:
    """Stable and free of ':' (flavors say pci_passthrough:alias=NAME:COUNT)."""
    return f"{o.vendor}-{o.device}" + {"type-PCI": "", "type-PF": "-pf", "type-VF": "-vf"}[o.device_type]


def nova(o: Offer) -> tuple[list[dict], list[dict]]:
    """([pci] device_spec entries, [pci] alias entries): one spec per offered address, one alias
    per vendor, product and device type."""
    specs = [{"vendor_id": d.vendor, "product_id": d.device, "address": str(d.address)} for d in o.offered]
    aliases: dict[str, dict] = {}
    for d in o.offered:
        aliases.setdefault(alias_name(d), {"name": alias_name(d), "vendor_id": d.vendor, "product_id": d.device,
                                           "device_type": d.device_type})
    return specs, list(aliases.values())


# ----- KubeVirt -----------------------------------------------------------------------------
def _resource_part(name: str) -> str:
    """A Kubernetes qualified-name part: [A-Za-z0-9._-], alphanumeric at both ends, 63 at most."""
    part = re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", part)


def resource_name(vendor: str, device: str, name: str | None, domain: str | None = None) -> str:
    """"<vendor-domain>/<NAME>": NAME from the device's name, else its ids; the fallback domain is
    shared by every vendor, so a name under it starts with the vendor id."""
    dom = domain or VENDOR_DOMAINS.get(vendor)
    part = _resource_part(name or "")
    if not part:
        part = f"{vendor}_{device}"
    elif dom is None:
        part = _resource_part(f"{vendor}_{part}")
    return f"{dom or FALLBACK_DOMAIN}/{part}"


@dataclass(frozen=True)
class PciHostDevice:
    selector: str                  # "8086:10D3"
    resource_name: str
    addresses: tuple[PciAddress, ...]


def kubevirt(o: Offer, topo: Topology, domain: str | None = None) -> tuple[list[PciHostDevice], list[str]]:
    """(pciHostDevices entries, why a vendor:device is not permitted). A selector permits every
    function with that id on the node, so one function left out keeps the id out."""
    left = {lo.address: lo.reason for lo in o.left_out}
    by_id: dict[str, list[Offered]] = {}
    for d in o.offered:
        by_id.setdefault(f"{d.vendor}:{d.device}", []).append(d)
    entries: list[PciHostDevice] = []
    notes: list[str] = []
    used: set[str] = set()
    for vd, offered in sorted(by_id.items()):
        blocked = [a for a, dev in sorted(topo.devices.items()) if dev.vendor_device == vd and a in left]
        if blocked:
            notes.append(f"{vd.upper()} not permitted: the selector would take every {vd} on this host, and "
                         f"{blocked[0]} is left out ({left[blocked[0]]})")
            continue
        first = offered[0]
        name = resource_name(first.vendor, first.device, first.name, domain)
        if name in used:                  # two ids with one pci.ids name
            name = resource_name(first.vendor, first.device, f"{first.name or first.vendor}_{first.device}", domain)
        used.add(name)
        entries.append(PciHostDevice(vd.upper(), name, tuple(d.address for d in offered)))
    return entries, notes
