"""The host as metrics see it at one moment: counts from the topology and the ledger; pure.

The daemon's ``/metrics`` (and ``hostdevctl metrics``) compute this at every scrape from the same
topology and ledger the socket's ``status`` reads, so a gauge is never older than the scrape.
What only a running daemon knows (drift seen through udev, the libvirt and udev connections,
the last reconciliation) comes in as :class:`DaemonFacts`; without a daemon it is ``None``
and drift is judged here from sysfs, as the daemon's start does.

Every label value is bounded: a driver kind, a claim state, an IOMMU group number, a PF's PCI
address, an owner's name (the host's domains; clipped to :data:`MAX_LABEL`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .address import PciAddress
from .device import Device
from .ledger import Ledger
from .pci_events import expected_driver
from .states import ClaimState
from .topology import Topology

DRIVER_KINDS = ("host", "vfio", "none")
CLAIM_STATES = tuple(str(s) for s in ClaimState)
MAX_LABEL = 64


def clip(value: str, limit: int = MAX_LABEL) -> str:
    """A label value no longer than ``limit`` characters (an owner's name can be 256)."""
    return value if len(value) <= limit else value[: limit - 1] + "\u2026"


def driver_kind(dev: Device) -> str:
    """vfio: vfio-pci or a variant; none: no driver; host: any other driver (pci-stub included)."""
    if dev.on_vfio:
        return "vfio"
    return "none" if dev.driver is None else "host"


def group_kind(members: list[Device]) -> str:
    """host: an endpoint is on a host driver (or the group holds only bridges, which stay with
    the host); vfio: every endpoint is on vfio or driverless, at least one on vfio; none: no
    endpoint has a driver."""
    kinds = {driver_kind(d) for d in members if not d.bridge}
    if not kinds or "host" in kinds:
        return "host"
    return "vfio" if "vfio" in kinds else "none"


@dataclass(frozen=True)
class GroupOwner:
    group: int
    owner: str
    kind: str          # domain | manual | reservation
    state: str         # the claim's state


@dataclass(frozen=True)
class PfVfs:
    pf: str            # the PF's PCI address
    totalvfs: int      # sriov_totalvfs
    numvfs: int        # sriov_numvfs
    assigned: int      # VFs of the PF a claim holds


@dataclass(frozen=True)
class DaemonFacts:
    """What only the running daemon knows."""
    libvirt: str                    # connected | disconnected | not used
    udev_watching: bool
    drift: int                      # devices drifting, as the daemon's status lists them
    read_only: bool                 # no readable ledger generation at start


@dataclass
class OpState:
    devices: dict[str, int] = field(default_factory=dict)       # driver kind -> devices
    groups: dict[str, int] = field(default_factory=dict)        # group kind -> IOMMU groups
    claims: dict[str, int] = field(default_factory=dict)        # claim state -> claims
    claimed_devices: int = 0
    owners: list[GroupOwner] = field(default_factory=list)
    vfs: list[PfVfs] = field(default_factory=list)
    drift: int = 0
    reservations: int = 0
    daemon: DaemonFacts | None = None


def local_drift(topo: Topology, ledger: Ledger) -> int:
    """Drift judged from sysfs alone (no daemon): devices of active claims not where they should be."""
    n = 0
    for claim in ledger.claims.values():
        if claim.state != ClaimState.ACTIVE:
            continue
        for rec in claim.devices:
            dev = topo.get(rec.pci)
            if dev is not None and expected_driver(rec, dev) is not None:
                n += 1
    return n


def op_state(topo: Topology, ledger: Ledger, daemon: DaemonFacts | None = None,
             drift: Callable[[Topology, Ledger], int] = local_drift) -> OpState:
    """Count what the topology and the ledger say; ``daemon``'s drift wins over ``drift``'s."""
    st = OpState(devices=dict.fromkeys(DRIVER_KINDS, 0), groups=dict.fromkeys(DRIVER_KINDS, 0),
                 claims=dict.fromkeys(CLAIM_STATES, 0), daemon=daemon)
    for dev in topo.devices.values():
        st.devices[driver_kind(dev)] += 1
    for members in topo.groups.values():
        st.groups[group_kind(members)] += 1
    held: dict[PciAddress, int] = {}
    for claim in ledger.claims.values():
        st.claims[str(claim.state)] = st.claims.get(str(claim.state), 0) + 1
        st.claimed_devices += len(claim.devices)
        st.owners.append(GroupOwner(claim.group, clip(claim.owner.name), str(claim.owner.kind), str(claim.state)))
        for rec in claim.devices:
            held[rec.pci] = claim.group
    st.owners.sort(key=lambda o: o.group)
    for dev in sorted(topo.devices.values(), key=lambda d: d.address):
        if dev.sriov_totalvfs:
            st.vfs.append(PfVfs(str(dev.address), dev.sriov_totalvfs, dev.sriov_numvfs or 0,
                                sum(1 for v in dev.virtfns if v in held)))
    st.reservations = len(ledger.reservations)
    st.drift = daemon.drift if daemon is not None else drift(topo, ledger)
    return st
