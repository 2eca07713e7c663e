"""Reservations (the driverctl use case): devices bound to vfio-pci when the daemon starts and
never handed back to a host driver while configured.

A reserved group is held by the owner ``reserved`` (kind ``reservation``). A domain that asks
for it *borrows* it (the claim changes owner, the devices stay on vfio-pci with their original
drivers still recorded) and gives it back on release. Removing a device from ``reserve`` returns
its group to the host at the next daemon start.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .config import DeviceMatcher
from .errors import HostdevError
from .ledger import RESERVATION, Owner
from .logfields import log_action

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("hostdevd.reservations")


@dataclass
class ReservationReport:
    reserved: list[int] = field(default_factory=list)
    released: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def apply_reservations(engine: Engine, patterns: list[str]) -> ReservationReport:
    """Bind every configured device's group for the reservation; release stale reservations."""
    report = ReservationReport()
    owner = Owner(**RESERVATION)
    matcher = DeviceMatcher(patterns)
    # No reservation configured: nothing to look for on the host (a whole-host scan at every start).
    wanted = sorted(d.address for d in engine.topology().devices.values()
                    if not d.bridge and matcher.matches(d.address, d.vendor, d.device)) if patterns else []
    engine.executor.record_reservations([str(a) for a in wanted])
    for addr in wanted:
        claim = engine.ledger().claim_for_device(addr)
        if claim is not None and claim.reserved:
            continue  # held by the reservation, or borrowed by a domain
        try:
            _, result = engine.prepare([addr], owner)   # the claim is written reserved (one transaction)
        except HostdevError as e:
            report.errors.append(f"{addr}: {e}")
            log_action(log, logging.ERROR, "refused", "cannot reserve %s: %s", addr, e, address=addr,
                       owner=owner, action="reserve", result="refused")
            continue
        group = result.groups[0]
        report.reserved.append(group)
        log_action(log, logging.INFO, "claim", "reserved %s (group %s) on vfio-pci", addr, group,
                   address=addr, group=group, owner=owner, action="reserve", result="ok")
    keep = set(wanted)
    for claim in engine.ledger().claims_of(owner):
        if claim.reserved and not any(d.pci in keep for d in claim.devices):
            engine.executor.unreserve(claim.group)   # no longer configured: back to the host
            try:
                engine.release(owner, claim.requested_pci)
                report.released.append(claim.group)
            except HostdevError as e:
                report.errors.append(f"group {claim.group}: {e}")
    return report
