"""udev: PCI devices added, removed, bound and unbound, also behind hostdevd's back (R10).

libvirt's node-device driver ignores bind/unbind uevents, so hostdevd listens
to udev itself. Two halves:

* :class:`hostdevd.adapters.udev.UdevWatch` is the door: a pyudev netlink
  monitor (subsystem ``pci``) read in its own thread, each uevent turned into
  a :class:`PciEvent` and handed to a sink.
* :class:`PciEventHandler` decides, from :class:`PciEvent` values alone, so
  tests feed it synthetic events without udev:

  - ``bind``/``unbind`` of a claimed device that should sit on vfio-pci and
    now does not (a host driver took it, someone unbound it) is **drift**:
    logged once (journald, ``MESSAGE_ID`` drift) and listed in the daemon's
    ``status`` until it goes away. It is never "fixed": rebinding a device a
    person just moved on purpose would be worse than reporting it. Every device of
    an active claim is judged by the driver sysfs shows, whatever its record's
    state; one recorded as given back but found on vfio-pci is reported too.
  - ``remove`` of a claimed device drops it from the ledger with a log line,
    through the engine under the group lock (a claim left without devices is
    dropped, its host actions undone).
  - ``add`` (new VFs after ``sriov_numvfs``, a hot-added card) refreshes the
    topology: the generation counter moves, subscribers are told (the SR-IOV
    code waits for its VFs this way) and the daemon re-applies reservations.

The handler judges a device only under its group's lock, so a bind or unbind
hostdevd itself is doing is never mistaken for drift: by the time the lock is
free the executor has finished and the ledger says what to expect.
"""
from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from .address import PciAddress
from .device import Device
from .errors import HostdevError, InvalidAddress
from .ledger import Claim, DeviceRecord
from .logfields import log_action
from .states import ClaimState, DeviceState
from .topology import VFIO, is_vfio_driver

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("hostdevd.udev")

ACTIONS = ("add", "remove", "bind", "unbind")
# Drivers a claimed device may sit on without drift: vfio-pci and its variants (on_vfio), pci-stub
# (kept as found).
_VIABLE = (VFIO, "pci-stub")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _expected(rec: DeviceRecord, dev: Device) -> str | None:
    """Where an active claim's device should be when sysfs contradicts the claim, else None.
    Judged from the driver it is on now, never from the record's state."""
    if not (dev.on_vfio or dev.driver in _VIABLE):
        return rec.vfio_driver or VFIO   # the group is not usable by the guest, whatever the record says
    if rec.state in (DeviceState.HOST, DeviceState.RESTORING) and dev.on_vfio and dev.driver != rec.original_driver:
        return rec.original_driver or "no driver"    # recorded as given back, yet on vfio-pci
    return None


expected_driver = _expected
"""For :mod:`.opstate`: drift judged without the daemon."""


def _log_drift(entry: dict, claim: Claim, ev: PciEvent | None) -> None:
    addr, driver = entry["address"], entry["driver"]
    if is_vfio_driver(entry["expected"]):
        now_on = f"bound to {driver}" if driver else "without a driver"
        what = (f"is now {now_on} instead of {entry['expected']}, changed behind hostdevd's back; left as it is "
                "(the group is no longer viable for the guest: move it back or release the claim)")
    else:
        what = (f"is on {driver}, but the ledger records it as {entry['record']} on {entry['expected']} "
                "(changed behind hostdevd's back); left as it is")
    log_action(log, logging.WARNING, "drift", "%s (IOMMU group %s, claimed by %s) %s", addr, claim.group,
               claim.owner.label(), what, address=addr, group=claim.group, owner=claim.owner,
               action=f"udev-{ev.action}" if ev else "check", result="drift")


@dataclass(frozen=True)
class PciEvent:
    """One PCI uevent: what happened to which function (and, for bind, which driver took it)."""
    action: str
    address: PciAddress
    driver: str | None = None
    seqnum: int | None = None

    def __str__(self) -> str:
        return f"{self.action} {self.address}" + (f" ({self.driver})" if self.driver else "")

    @classmethod
    def from_udev(cls, device: Any) -> PciEvent | None:
        """From a pyudev Device received on a monitor; None for what hostdevd does not follow."""
        action = getattr(device, "action", None)
        if action not in ACTIONS:
            return None
        props = device.properties
        name = props.get("PCI_SLOT_NAME") or getattr(device, "sys_name", None)
        try:
            address = PciAddress.parse(name or "")
        except InvalidAddress:
            return None
        driver = props.get("DRIVER") if action == "bind" else None
        seq = getattr(device, "sequence_number", None)
        return cls(action, address, driver, int(seq) if seq else None)


class PciEventHandler:
    """What a PCI uevent means for the ledger; see the module docstring."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._lock = threading.Lock()
        self._drift: dict[str, dict] = {}
        self._subscribers: list[Callable[[PciEvent], None]] = []
        self.counts: Counter[str] = Counter()
        self.topology_generation = 0
        self.last_event: str | None = None
        self.on_topology_change: Callable[[PciEvent], None] | None = None

    # ---- subscribers (e.g. SR-IOV provisioning waiting for its VFs)
    def subscribe(self, fn: Callable[[PciEvent], None]) -> Callable[[], None]:
        """Call ``fn(event)`` after every handled event; returns the unsubscribe function."""
        with self._lock:
            self._subscribers.append(fn)

        def unsubscribe() -> None:
            with self._lock:
                if fn in self._subscribers:
                    self._subscribers.remove(fn)
        return unsubscribe

    # ---- events
    def handle(self, ev: PciEvent) -> None:
        with self._lock:
            self.counts[ev.action] += 1
            self.last_event = f"{_now()} {ev}"
        if ev.action == "remove":
            self._removed(ev)
        elif ev.action == "add":
            self._added(ev)
        else:
            self.check_device(ev.address, ev)
        with self._lock:
            subscribers = list(self._subscribers)
        for fn in subscribers:
            try:
                fn(ev)
            except Exception:  # a subscriber's bug must not stop event handling
                log.exception("PCI event subscriber failed on %s", ev)

    def _removed(self, ev: PciEvent) -> None:
        self._clear(ev.address)
        try:
            what = self.engine.forget_vanished(ev.address)
        except HostdevError as e:
            log.error("%s vanished but its claim could not be updated: %s", ev.address, e)
            return
        if not what:
            log.debug("%s removed (not claimed)", ev.address)
        self._topology_changed(ev, "removed")

    def _added(self, ev: PciEvent) -> None:
        self._topology_changed(ev, "added")

    def _topology_changed(self, ev: PciEvent, what: str) -> None:
        with self._lock:
            self.topology_generation += 1
        physfn = None
        try:
            if ev.action == "add" and self.engine.sysfs.exists(ev.address):
                physfn = self.engine.sysfs.read_device(ev.address).physfn
        except HostdevError:
            pass
        if physfn is not None:
            log.info("topology refreshed: VF %s of %s %s", ev.address, physfn, what)
        else:
            log.info("topology refreshed: PCI device %s %s", ev.address, what)
        if self.on_topology_change is not None:
            try:
                self.on_topology_change(ev)
            except Exception:
                log.exception("topology refresh after %s failed", ev)

    # ---- drift
    def check_device(self, addr: PciAddress, ev: PciEvent | None = None) -> dict | None:
        """Judge one device against its claim under the group lock; record and log new drift."""
        claim = self.engine.ledger().claim_for_device(addr)
        if claim is None:
            self._clear(addr)
            return None
        with self.engine.locks.hold([claim.group]):
            claim = self.engine.ledger().claim_for_device(addr)
            rec = claim.device(addr) if claim is not None else None
            if claim is None or rec is None or claim.state != ClaimState.ACTIVE:
                self._clear(addr)            # not claimed, or mid-operation/failed: not ours to judge
                return None
            sysfs = self.engine.sysfs
            if not sysfs.exists(addr):
                return None                  # gone: the remove event deals with it
            dev = sysfs.read_device(addr)
            expected = _expected(rec, dev)
            if expected is None:
                self._clear(addr)
                return None
            entry = {"address": str(addr), "group": claim.group, "owner": claim.owner.name,
                     "driver": dev.driver, "expected": expected, "record": str(rec.state), "since": _now(),
                     "event": ev.action if ev else "check"}
        with self._lock:
            old = self._drift.get(str(addr))
            if old is not None and (old["driver"], old["expected"]) == (dev.driver, expected):
                return old
            self._drift[str(addr)] = entry
        _log_drift(entry, claim, ev)
        return entry

    def scan(self) -> list[dict]:
        """Check every claimed device (daemon start, reconnects); returns the current drift."""
        for claim in list(self.engine.ledger().claims.values()):
            for rec in claim.devices:
                try:
                    self.check_device(rec.pci)
                except HostdevError as e:
                    log.warning("drift check of %s failed: %s", rec.address, e)
        return self.drift()

    def _clear(self, addr: PciAddress) -> None:
        with self._lock:
            old = self._drift.pop(str(addr), None)
        if old is not None:
            log.info("%s is no longer drifting (claim gone, or the device agrees with it again)", addr)

    def drift(self) -> list[dict]:
        """Current drift, re-judged cheaply from sysfs without the group lock (entries whose claim
        is gone or no longer active, or whose device agrees with it again, go)."""
        with self._lock:
            entries = list(self._drift.values())
        if not entries:
            return []
        ledger = self.engine.ledger()
        out = []
        for e in entries:
            addr = PciAddress.parse(e["address"])
            if self._still_drifting(ledger.claim_for_device(addr), addr):
                out.append(dict(e))
            else:
                self._clear(addr)
        return sorted(out, key=lambda e: e["address"])

    def _still_drifting(self, claim: Claim | None, addr: PciAddress) -> bool:
        rec = claim.device(addr) if claim is not None else None
        if claim is None or rec is None or claim.state != ClaimState.ACTIVE:
            return False
        try:
            dev = self.engine.sysfs.read_device(addr) if self.engine.sysfs.exists(addr) else None
        except HostdevError:
            return True
        return dev is None or _expected(rec, dev) is not None    # gone: the remove event clears it

    def state(self) -> dict:
        with self._lock:
            return {"events": dict(self.counts), "topology_generation": self.topology_generation,
                    "last_event": self.last_event}
