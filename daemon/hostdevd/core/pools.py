"""Hostdev-network pools at prepare time: which VF a domain's ``<interface type='network'>``
will get, decided before libvirt picks it.

libvirt picks a hostdev network's VF only after 'prepare begin' (qemuProcessPrepareHost). The
pool is resolved through the network's XML (the network driver, not the domain: no deadlock,
R9) and the prepare is refused now when no VF of it could be assigned. For a managed='no' pool
libvirt insists the VF is on vfio-pci before 'start begin' ("Unmanaged PCI device … must be
manually detached"), so the VF libvirt will take (networkAllocatePort: the first VF of the pool
without a connection) is chosen here, to be prepared now; a managed='yes' pool's VF is bound by
libvirt and claimed at 'start begin'.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .address import PciAddress
from .errors import HostdevError, Reason, Refused
from .ledger import Ledger, Owner
from .netreq import NetRequest
from .netxml import parse_network
from .planner import Policy, refused
from .sriov import network_pool, pool_candidates
from .topology import Topology

# The network's XML by name (libvirt's network driver); None: no such network.
NetworkLookup = Callable[[str], "str | None"]

if TYPE_CHECKING:
    from .domxml import DomainRequest


@dataclass
class PoolPicks:
    """VFs to prepare now (managed='no' pools), and what the reply says about each network."""
    vfs: dict[PciAddress, NetRequest] = field(default_factory=dict)
    networks: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def pick_pool_vfs(parsed: DomainRequest, owner: Owner, lookup: NetworkLookup, topo: Callable[[], Topology],
                  ledger: Ledger, policy: Policy) -> PoolPicks:
    """Refuse when a hostdev network of the domain has no VF ``owner`` could get; pick the
    managed='no' pools' VFs. ``topo`` is called at most once, and only for hostdev networks."""
    picks = PoolPicks(networks=[n.to_dict() for n in parsed.networks])
    scanned: Topology | None = None
    for i, ref in enumerate(parsed.networks):
        try:
            xml = lookup(ref.network)
            net = parse_network(xml) if xml is not None else None
        except HostdevError as e:
            picks.warnings.append(f"network {ref.network!r}: {e}")
            continue
        if net is None or not net.is_hostdev:
            continue
        scanned = scanned or topo()
        pool = network_pool(scanned, net)
        ok, why = pool_candidates(scanned, ledger, owner, pool, policy)
        ok = [a for a in ok if a not in picks.vfs]
        picks.networks[i].update(hostdev_pool=[str(a) for a in pool], assignable=[str(a) for a in ok])
        if pool and not ok:
            # The planner's refusals, so the reply names who holds the VFs as for any refusal.
            # The pool's own refusal (NO_FREE_VF) comes first, then each VF's.
            err = refused(list(why.values()))
            hint = "free a VF of the pool (stop a domain using one) or create more VFs (`hostdevctl vfs set`)"
            empty = f"hostdev network {ref.network!r} has no VF {owner.name} could get"
            raise Refused(f"{empty}: " + "; ".join(r.text for r in list(why.values())[:4]), hint,
                          refusals=[{"device": "-", "reason": empty, "hint": hint, "code": Reason.NO_FREE_VF},
                                    *err.refusals], holders=err.holders)
        if pool and not net.managed:
            # libvirt sets its MAC after this hook and restores it itself: saved now, verified.
            picks.vfs[ok[0]] = NetRequest(mac=ref.mac, managed=True)
            picks.networks[i]["prepared"] = str(ok[0])
    return picks
