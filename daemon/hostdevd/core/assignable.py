"""Can an IOMMU group be handed over whole? hostdevd's own answer, asked of the planner; pure.

A group is judged by planning a prepare of all its endpoints for a probe owner on an empty
ledger: the refusals are exactly what a domain asking for the group would meet (host-critical
members, policy, no IOMMU, a vfio driver override that cannot apply), while who holds the group
today is left out (ownership passes; the inventory shows it as ``owner``).
"""
from __future__ import annotations

from dataclasses import dataclass

from .address import PciAddress
from .errors import Reason
from .ledger import Ledger, Owner
from .plan import Refusal
from .planner import Policy, plan_prepare
from .topology import Topology

PROBE = Owner(name="hostdevd-assignable", kind="manual")
BRIDGES_ONLY = Refusal("-", "the group holds only PCI bridges, which stay with the host: nothing to hand over",
                       "pass an endpoint device; bridges are never bound to vfio-pci", code=Reason.BRIDGES_ONLY)


@dataclass(frozen=True)
class GroupVerdict:
    group: int
    endpoints: tuple[PciAddress, ...]       # members that would go to a vfio driver (bridges stay)
    refusals: tuple[Refusal, ...]

    @property
    def assignable(self) -> bool:
        return bool(self.endpoints) and not self.refusals

    def refusals_json(self) -> list[dict]:
        return [r.to_json() for r in self.refusals]


def group_verdicts(topo: Topology, policy: Policy | None = None) -> dict[int, GroupVerdict]:
    out = {}
    for group, members in topo.groups.items():
        endpoints = tuple(d.address for d in members if not d.bridge)
        if not endpoints:
            refusals: tuple[Refusal, ...] = (BRIDGES_ONLY,)
        else:
            refusals = tuple(plan_prepare(topo, endpoints, PROBE, Ledger(), policy).refusals)
        out[group] = GroupVerdict(group, endpoints, refusals)
    return out


def host_critical_reason(topo: Topology, addr: PciAddress) -> str | None:
    """Why the host needs the device, as the planner judges it (R3: the scan's reasons, and the
    boot VGA, which listings and snapshots know too)."""
    dev = topo.get(addr)
    return topo.critical.get(addr) or ("boot VGA (the host console)" if dev is not None and dev.boot_vga else None)
