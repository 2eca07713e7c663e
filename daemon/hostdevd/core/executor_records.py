"""The executor's ledger records that are not a prepare or a release step: what
reconciliation and reservations decided (adopt, complete, fail, unreserve), refcount changes
(promote), a reserved group given back, and devices that vanished from the host. The only
writer stays the executor: these are its methods."""
from __future__ import annotations

import logging

from .address import PciAddress
from .executor_host import HostActionSteps
from .ledger import RESERVATION, Claim, Owner, now
from .logfields import log_action
from .states import ClaimState, DeviceState

log = logging.getLogger("hostdevd.executor")


class RecordSteps(HostActionSteps):
    def promote(self, group: int, requested: list[PciAddress]) -> None:
        """Companions of a held group the owner now uses itself become requested (refcount, R6)."""
        with self.store.transaction() as ledger:
            claim = ledger.claim_for_group(group)
            if claim is None:
                return
            for rec in claim.devices:
                if rec.pci in requested:
                    rec.role = "requested"
            ledger.put(claim)

    # ------------------------------------------------------------------ records others decide
    # Reconciliation and reservations decide; these write what they decided (one writer).
    def record_reservations(self, addresses: list[str]) -> None:
        with self.store.transaction() as ledger:
            ledger.reservations = list(addresses)

    def unreserve(self, group: int) -> None:
        """A reservation no longer configured: its claim becomes an ordinary one (released next)."""
        with self.store.transaction() as ledger:
            claim = ledger.claim_for_group(group)
            if claim is not None:
                claim.reserved = False
                ledger.put(claim)

    def adopt(self, claim: Claim) -> bool:
        """Record a claim for a group a running domain already uses; False when one exists."""
        with self.store.transaction() as ledger:
            if ledger.claim_for_group(claim.group) is not None:
                return False
            ledger.put(claim)
            return True

    def fail_claim(self, group: int, note: str) -> None:
        """Keep a claim for an operator, touching no device (e.g. a device's identity changed)."""
        with self.store.transaction() as ledger:
            claim = ledger.claim_for_group(group)
            if claim is not None:
                claim.move_to(ClaimState.FAILED)
                claim.notes.append(f"{now()}: {note}")
                ledger.put(claim)

    def complete_prepare(self, group: int, on_vfio: set[str], note: str) -> None:
        """Reconciliation found an interrupted prepare whose binds all finished and whose domain
        runs with the devices: mark what is on vfio-pci and activate the claim. Also for an
        active claim whose bind (a converging prepare) finished on the host but not in the record."""
        with self.store.transaction() as ledger:
            claim = ledger.claim_for_group(group)
            if claim is None:
                return
            for rec in claim.devices:
                if rec.address in on_vfio:
                    rec.move_to(DeviceState.VFIO)
            claim.move_to(ClaimState.ACTIVE)
            claim.notes.append(f"{now()}: {note}")
            ledger.put(claim)

    def finish_restore(self, group: int, restored: set[str], note: str) -> None:
        """Reconciliation found restores that finished on the host but not in the record (a crash
        between the last sysfs write and the save): those devices are back on their recorded
        drivers, so their records say so, as :meth:`_restored` would have."""
        with self.store.transaction() as ledger:
            claim = ledger.claim_for_group(group)
            if claim is None:
                return
            for rec in claim.devices:
                if rec.address in restored and rec.state == DeviceState.RESTORING:
                    rec.move_to(DeviceState.HOST)
                    rec.bound_by_us = False
            claim.notes.append(f"{now()}: {note}")
            ledger.put(claim)

    def _to_reservation(self, group: int, reservation: Owner | None = None) -> None:
        with self.store.transaction() as ledger:
            claim = ledger.claim_for_group(group)
            if claim is None:
                return
            claim.owner = reservation or Owner(**RESERVATION)
            claim.move_to(ClaimState.ACTIVE)
            for rec in claim.devices:
                rec.role = "requested"
            ledger.put(claim)

    def _drop_claim(self, group: int) -> None:
        with self.store.transaction() as ledger:
            ledger.drop(group)

    def _forget_device(self, group: int, addr: PciAddress) -> None:
        with self.store.transaction() as ledger:
            claim = ledger.claim_for_group(group)
            if claim is not None:
                claim.devices = [d for d in claim.devices if d.address != str(addr)]
                claim.notes.append(f"{addr} vanished; dropped")
                ledger.put(claim)

    def forget_vanished(self, group: int, addr: PciAddress) -> str:
        """A claimed device disappeared from the host (hot-unplug, VFs removed): drop its record.

        The caller holds the group lock. A claim left without devices is dropped
        with it, its host actions undone. Returns what was done ("device", "claim",
        or "" when nothing was recorded or the device is back).
        """
        if self.sysfs.exists(addr):
            return ""
        claim = self.store.read().claim_for_group(group)
        if claim is None or claim.device(addr) is None:
            return ""
        owner = claim.owner
        self._forget_device(group, addr)
        log_action(log, logging.WARNING, "release", "%s is gone from the host; dropped from the claim of %s",
                   addr, owner.label(), address=addr, group=group, owner=owner, action="vanished",
                   result="dropped")
        claim = self.store.read().claim_for_group(group)
        if claim is None or claim.devices:
            return "device"
        failures = self._undo_host_actions(owner, group, "module", claim.host_actions)
        failures += self._undo_host_actions(owner, group, "unit", claim.host_actions)
        with self.store.transaction() as ledger:
            c = ledger.claim_for_group(group)
            if c is not None and not c.devices:
                if failures:
                    c.move_to(ClaimState.FAILED)
                    c.notes.append("every device vanished; host actions not undone: " + "; ".join(failures))
                    ledger.put(c)
                else:
                    ledger.drop(group)
        log_action(log, logging.WARNING, "release", "group %s of %s has no device left; claim dropped", group,
                   owner.label(), group=group, owner=owner, action="vanished", result="dropped")
        return "claim"
