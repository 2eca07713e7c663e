"""Reconciliation (R8): make the ledger and the host agree again.

Runs at daemon start and whenever the libvirt connection comes back, and
piecewise on lifecycle and device events. Core module: no libvirt import; the
caller lists the running domains (or passes ``None`` when libvirt cannot be
reached) and this module decides:

1. Interrupted work (a crash mid-operation), whatever libvirt says:
   a claim still ``claimed`` is a prepare that never finished; its hook got no
   answer and libvirt aborted the start, so it is rolled back (unless the
   domain is demonstrably running with the devices: then it is completed).
   A claim ``releasing`` is a release that never finished; it is finished. An
   ``active`` claim's bind or restore that sysfs shows done gets its record finished.
2. With the running domains known: claims of domains that are gone are
   released (a stop event was missed); PCI devices a running domain uses
   that no claim covers are adopted (a claim recording the best known original drivers; a device
   already on a vfio driver whose original driver hostdevd never saw gets ``original_driver=None``,
   stays there at release, and a note says why).
3. Devices on vfio-pci that no claim covers are reported, never touched.

Every decision is taken under the group's lock against a fresh ledger, and
``guard(domain_name)`` lets the daemon veto touching a domain that a request
is serving right now. A record of an original driver is only ever removed by
the executor after the device went back to it (or vanished).
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from .address import PciAddress
from .errors import HostdevError
from .ledger import Claim, DeviceRecord, Owner, now
from .logfields import log_action
from .states import ClaimState, DeviceState
from .sysfs_vfio import open_nodes_text
from .topology import STUB_DRIVERS, Device, Topology, is_vfio_driver
from .variants import recorded

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("hostdevd.reconcile")

Guard = Callable[[str], AbstractContextManager[bool]]


@contextlib.contextmanager
def _no_guard(_name: str) -> Iterator[bool]:
    yield True


@contextlib.contextmanager
def _holding(engine: Engine, claim: Claim, report: ReconcileReport, guard: Guard) -> Iterator[Claim | None]:
    """The claim's domain gate (the daemon's veto while it serves that domain) and its group
    lock, then the claim read again under them; None when the domain is being served (noted
    in the report) or the claim is gone."""
    with guard(claim.owner.name) as ok:
        if not ok:
            report.skipped.append(f"group {claim.group}: {claim.owner.name} is being served right now")
            yield None
            return
        with engine.locks.hold([claim.group]):
            yield engine.ledger().claim_for_group(claim.group)


@dataclass
class RunningDomain:
    """A domain libvirt reports as running, with the host PCI devices its live XML uses."""
    name: str
    uuid: str | None
    addresses: list[PciAddress] = field(default_factory=list)
    error: str | None = None      # the XML could not be parsed: its devices are unknown

    @classmethod
    def from_xml(cls, name: str, uuid: str | None, xml: str) -> RunningDomain:
        from .domxml import parse_domain  # lxml only when a live XML is read (issue 13)
        try:
            req = parse_domain(xml)
        except HostdevError as e:
            return cls(name, uuid, [], error=e.message)
        return cls(name, uuid or req.uuid, req.addresses())

    @property
    def owner(self) -> Owner:
        return Owner(name=self.name, uuid=self.uuid, kind="domain")


@dataclass
class ReconcileReport:
    libvirt: bool = True
    adopted: list[dict] = field(default_factory=list)
    released: list[dict] = field(default_factory=list)
    finished: list[dict] = field(default_factory=list)
    orphans: list[dict] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed_claims: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    at: str = field(default_factory=now)

    def to_json(self) -> dict:
        return {"at": self.at, "libvirt": self.libvirt, "adopted": self.adopted, "released": self.released,
                "finished": self.finished, "orphans": self.orphans, "conflicts": self.conflicts,
                "skipped": self.skipped, "failed_claims": self.failed_claims, "errors": self.errors}

    def summary(self) -> str:
        parts = [f"{len(self.adopted)} adopted", f"{len(self.released)} released",
                 f"{len(self.finished)} interrupted operations finished", f"{len(self.orphans)} unclaimed on vfio-pci"]
        if self.conflicts:
            parts.append(f"{len(self.conflicts)} conflicts")
        if self.failed_claims:
            parts.append(f"{len(self.failed_claims)} failed claims need an operator")
        if self.errors:
            parts.append(f"{len(self.errors)} errors")
        if not self.libvirt:
            parts.append("libvirt unreachable: running domains unknown")
        return ", ".join(parts)


def _parse_time(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)


def _find_running(running: Iterable[RunningDomain], owner: Owner) -> RunningDomain | None:
    for dom in running:
        if owner.same(dom.owner) or (not owner.uuid and owner.name == dom.name):
            return dom
    return None


class _RunningIndex:
    """:func:`_find_running` for many claims against many domains: the same answer (the first
    domain in ``running`` that matches), looked up by UUID and name instead of a scan each."""

    def __init__(self, running: list[RunningDomain]):
        self.running = running
        self.by_uuid: dict[str, list[int]] = {}
        self.by_name: dict[str, list[int]] = {}
        for i, dom in enumerate(running):
            if dom.uuid:
                self.by_uuid.setdefault(dom.uuid, []).append(i)
            self.by_name.setdefault(dom.name, []).append(i)

    def find(self, owner: Owner) -> RunningDomain | None:
        cand = self.by_uuid.get(owner.uuid, []) + self.by_name.get(owner.name, []) if owner.uuid else \
            self.by_name.get(owner.name, [])
        for i in sorted(cand):      # the candidates, in the list's order; each checked as the scan would
            if _find_running([self.running[i]], owner) is not None:
                return self.running[i]
        return None


# --------------------------------------------------------------------------- 0. an earlier boot


def identity_changes(engine: Engine, claim: Claim) -> list[str]:
    """Devices of ``claim`` whose address now holds another device (vendor:device, subsystem)."""
    out = []
    for rec in claim.devices:
        if rec.vendor_device is None or not engine.sysfs.exists(rec.pci):
            continue
        dev = engine.sysfs.read_device(rec.pci)
        if dev.vendor_device != rec.vendor_device or (rec.subsystem and dev.subsystem
                                                      and dev.subsystem != rec.subsystem):
            was = rec.vendor_device + (f" (subsystem {rec.subsystem})" if rec.subsystem else "")
            now_ = dev.vendor_device + (f" (subsystem {dev.subsystem})" if dev.subsystem else "")
            out.append(f"{rec.address} was {was}, is now {now_}")
    return out


def release_stale_boot(engine: Engine, report: ReconcileReport, guard: Guard = _no_guard) -> None:
    """Claims made under another kernel boot: the reboot gave their devices back to the host.

    Each is released by address (group numbers may differ after a reboot), reading before
    writing, so a record of an original driver goes only once the device is on it; a reserved
    group is released as well and bound again by the reservation at start; a domain that starts
    again gets a fresh claim. A device whose identity changed is reported and not touched.
    """
    boot = engine.sysfs.boot_id()
    if boot is None:
        return
    for claim in sorted(engine.ledger().claims.values(), key=lambda c: c.group):
        if claim.boot_id is None or claim.boot_id == boot:
            continue
        with _holding(engine, claim, report, guard) as fresh:
            if fresh is None or fresh.boot_id in (None, boot) or fresh.state == ClaimState.FAILED:
                continue
            changed = identity_changes(engine, fresh)
            if changed:
                msg = (f"group {fresh.group} of {fresh.owner.label()} is from an earlier boot and "
                       + "; ".join(changed) + ": not touched")
                engine.executor.fail_claim(fresh.group, msg)
                report.conflicts.append(msg)
                log_action(log, logging.ERROR, "drift", "%s", msg, group=fresh.group, owner=fresh.owner,
                           action="reconcile", result="identity-changed")
                continue
            if fresh.reserved:
                engine.executor.unreserve(fresh.group)   # the reservation binds it again at start
                fresh = engine.ledger().held(fresh.group)
            try:
                engine.release_group(fresh)
            except HostdevError as e:
                report.errors.append(f"group {fresh.group}: releasing the claim of an earlier boot failed: {e}")
                continue
        report.released.append({"group": claim.group, "owner": claim.owner.name,
                                "reason": f"claim from an earlier boot ({claim.boot_id})"})
        log_action(log, logging.WARNING, "reconcile", "released group %s of %s: claimed before the host "
                   "rebooted (boot %s)", claim.group, claim.owner.label(), claim.boot_id, group=claim.group,
                   owner=claim.owner, action="reconcile", result="stale-boot")


# --------------------------------------------------------------------------- 1. interrupted work


def recover_interrupted(engine: Engine, running: list[RunningDomain] | None, report: ReconcileReport,
                        guard: Guard = _no_guard, topo: Topology | None = None) -> None:
    # Active claims to look at are picked from sysfs, then judged again under the group lock.
    claims = engine.store.peek().claims
    # What the claims name and their groups, not the whole host (issue 13).
    topo = topo or engine.scoped([d.pci for c in claims.values() for d in c.devices],
                                 [c.group for c in claims.values()], with_critical=False)
    for _key, claim in sorted(claims.items(), key=lambda kv: int(kv[0])):
        if claim.state == ClaimState.FAILED:
            report.failed_claims.append(claim.group)
            continue
        if claim.state == ClaimState.ACTIVE and not _lagging(claim, topo):
            continue
        with _holding(engine, claim, report, guard) as fresh:
            if fresh is not None:
                _recover_one(engine, claim.group, running, report)


_UNFINISHED = (DeviceState.BINDING, DeviceState.RESTORING)


def _agrees(rec: DeviceRecord, dev: Device | None) -> bool:
    """Does an active claim's record say what sysfs shows? A vanished device is the remove
    event's; binding/restoring is an intent whose end was never recorded."""
    if dev is None:
        return rec.state not in _UNFINISHED
    if rec.state == DeviceState.VFIO:
        return dev.on_vfio or dev.driver in STUB_DRIVERS        # pci-stub: kept as found
    return rec.state == DeviceState.HOST and (not dev.on_vfio or dev.driver == rec.original_driver)


def _lagging(claim: Claim, topo: Topology) -> list[DeviceRecord]:
    return [r for r in claim.devices if not _agrees(r, topo.get(r.pci))]


def _recover_active(engine: Engine, claim: Claim, topo: Topology, report: ReconcileReport) -> None:
    """An active claim whose records lag behind sysfs (read under the group lock): a bind that
    reached vfio-pci, or a restore back on its recorded driver and override (the executor's own
    "already back" test), gets its record finished; the rest is reported, never rebound here."""
    group, ex, recs = claim.group, engine.executor, [(r, topo.get(r.pci)) for r in claim.devices]
    bound = {r.address for r, d in recs if r.state == DeviceState.BINDING and d is not None and d.on_vfio}
    restored = {r.address for r, d in recs if r.state == DeviceState.RESTORING and d is not None
                and (d.driver, d.driver_override) == (r.original_driver, r.original_override)}
    for done, action, write in ((bound, "completed interrupted bind", ex.complete_prepare),
                                (restored, "finished interrupted restore", ex.finish_restore)):
        if done:
            write(group, done, f"{action} of {', '.join(sorted(done))}: sysfs shows it done, the record did not")
            report.finished.append({"group": group, "owner": claim.owner.name, "action": action})
            log_action(log, logging.WARNING, "reconcile", "%s of group %s (%s)", action, group,
                       ", ".join(sorted(done)), group=group, owner=claim.owner, action="reconcile", result="ok")
    fresh = engine.ledger().held(group)
    if not (left := _lagging(fresh, topo)):
        return
    seen = "; ".join(f"{r.address} recorded {r.state}, on "
                     + ((d.driver or "no driver") if (d := topo.get(r.pci)) else "nothing (gone)") for r in left)
    note = f"group {group}: claim is active but devices are in states {sorted({d.state for d in fresh.devices})}"
    report.errors.append(f"{note} ({seen})")
    log_action(log, logging.WARNING, "drift", "%s (%s); left as it is", note, seen, group=group, owner=claim.owner,
               action="reconcile", result="inconsistent")


def _recover_one(engine: Engine, group: int, running: list[RunningDomain] | None, report: ReconcileReport) -> None:
    claim = engine.ledger().claim_for_group(group)   # fresh, under the group lock
    if claim is None or claim.state == ClaimState.FAILED:
        return
    topo = engine.scoped([d.pci for d in claim.devices], [group], with_critical=False)   # likewise: now
    if claim.state == ClaimState.ACTIVE:
        _recover_active(engine, claim, topo, report)
        return
    users = sum((nodes := engine.sysfs.vfio_open_nodes(group)).values())   # group node and member cdevs (R14)
    what = "half prepare" if claim.state == ClaimState.CLAIMED else "half release"
    dom = _find_running(running, claim.owner) if running is not None else None
    if claim.state == ClaimState.CLAIMED and dom is not None and all(a in dom.addresses
                                                                     for a in claim.requested_pci):
        # Every endpoint of the group on vfio-pci (or gone): the bind finished, only
        # the "active" mark is missing, and the domain runs with it. Complete it.
        if all((dev := topo.get(r.pci)) is None or dev.on_vfio for r in claim.devices):
            on_vfio = {r.address for r in claim.devices if (dev := topo.get(r.pci)) is not None and dev.on_vfio}
            engine.executor.complete_prepare(group, on_vfio, f"prepare was interrupted after binding; "
                                             f"{claim.owner.name} is running with the devices, so the claim was "
                                             "completed")
            report.finished.append({"group": group, "owner": claim.owner.name, "action": "completed " + what})
            log_action(log, logging.WARNING, "reconcile", "completed interrupted prepare of group %s for %s",
                       group, claim.owner.label(), group=group, owner=claim.owner, action="reconcile",
                       result="completed")
            return
    if users:
        note = (f"group {group}: {what} for {claim.owner.label()} left as it is: {open_nodes_text(nodes)} open "
                f"({users} users)")
        report.skipped.append(note)
        log_action(log, logging.WARNING, "reconcile", "%s", note, group=group, owner=claim.owner,
                   action="reconcile", result="busy")
        return
    try:
        engine.release_group(claim)
    except HostdevError as e:
        report.errors.append(f"group {group}: finishing the {what} failed: {e}")
        return
    action = "rolled back half prepare" if claim.state == ClaimState.CLAIMED else "finished half release"
    report.finished.append({"group": group, "owner": claim.owner.name, "action": action})
    log_action(log, logging.WARNING, "reconcile", "%s of group %s for %s", action, group, claim.owner.label(),
               group=group, owner=claim.owner, action="reconcile", result="ok")


# --------------------------------------------------------------------------- 2. gone and new domains


def release_gone(engine: Engine, running: list[RunningDomain], report: ReconcileReport, *,
                 listed_at: datetime | None = None, guard: Guard = _no_guard) -> None:
    """Release active claims whose domain is not running (a stop event was missed).

    Claims created after ``listed_at`` (when the running list was taken) are
    newer than the list and are left alone.
    """
    index = _RunningIndex(running)
    for claim in sorted(engine.store.peek().claims.values(), key=lambda c: c.group):
        if claim.owner.kind != "domain" or claim.state != ClaimState.ACTIVE:
            continue
        if listed_at is not None and _parse_time(claim.created) >= listed_at:
            continue
        if index.find(claim.owner) is not None:
            continue
        with _holding(engine, claim, report, guard) as fresh:
            if fresh is None or fresh.state != ClaimState.ACTIVE or not fresh.owner.same(claim.owner):
                continue
            nodes = engine.sysfs.vfio_open_nodes(claim.group)
            if users := sum(nodes.values()):
                report.skipped.append(f"group {claim.group}: {claim.owner.label()} is not running but "
                                      f"{open_nodes_text(nodes)} open ({users} users); left claimed")
                continue
            try:
                engine.release_group(fresh)
            except HostdevError as e:
                report.errors.append(f"group {claim.group}: release for gone domain {claim.owner.label()} "
                                     f"failed: {e}")
                continue
            report.released.append({"group": claim.group, "owner": claim.owner.name,
                                    "reason": "domain is not running"})
            log_action(log, logging.INFO, "reconcile", "released group %s: %s is not running", claim.group,
                       claim.owner.label(), group=claim.group, owner=claim.owner, action="reconcile",
                       result="released")


def adopt_domain(engine: Engine, dom: RunningDomain, report: ReconcileReport | None = None) -> list[int]:
    """Record claims for the devices a running domain uses that no claim covers.

    Returns the groups adopted. A group already held by another owner is a
    conflict (reported, not touched); a requested device that is not on vfio-pci
    is not adopted (the domain cannot be using it through VFIO).
    """
    report = report if report is not None else ReconcileReport()
    adopted: list[int] = []
    if dom.error:
        report.errors.append(f"{dom.name}: its XML could not be read ({dom.error}); devices not reconciled")
        return adopted
    topo = engine.scoped(dom.addresses, with_critical=False)     # its devices and their groups: O(group)
    by_group: dict[int, list[PciAddress]] = {}
    for addr in dom.addresses:
        dev = topo.get(addr)
        if dev is None or dev.group is None:
            report.errors.append(f"{dom.name} uses {addr}, which this host does not have in an IOMMU group")
            continue
        by_group.setdefault(dev.group, []).append(addr)
    owner = dom.owner
    for group, addrs in sorted(by_group.items()):
        with engine.locks.hold([group]):
            claim = engine.store.peek().claim_for_group(group)     # only looked at; promote re-reads
            if claim is not None:
                _check_held(engine, claim, owner, addrs, report)
                continue
            topo = engine.scoped(addrs, [group], with_critical=False)
            not_vfio = [a for a in addrs if not topo.require(a).on_vfio]
            if not_vfio:
                report.skipped.append(f"{dom.name} lists {', '.join(map(str, not_vfio))} but "
                                      f"{'it is' if len(not_vfio) == 1 else 'they are'} not on vfio-pci; not adopted")
                continue
            records, notes = [], []
            for dev in topo.group_members(group):
                if dev.bridge:
                    continue
                a = str(dev.address)
                if dev.on_vfio:
                    original, override = None, (None if is_vfio_driver(dev.driver_override) else dev.driver_override)
                    notes.append(f"{a} was already on {dev.driver} when adopted; its original driver is unknown, "
                                 "so it stays on vfio-pci at release")
                else:
                    original, override = dev.driver, dev.driver_override
                records.append(DeviceRecord(address=a, role="requested" if dev.address in addrs else "companion",
                                            state=DeviceState.VFIO if dev.on_vfio else DeviceState.HOST,
                                            original_driver=original, original_override=override,
                                            bound_by_us=False,
                                            vfio_driver=recorded(dev.driver) if dev.on_vfio else None))
            if not engine.executor.adopt(Claim(group=group, owner=owner, state=ClaimState.ACTIVE, devices=records,
                                               notes=[f"{now()}: adopted from running domain {dom.name}"] + notes)):
                continue
        adopted.append(group)
        report.adopted.append({"group": group, "owner": dom.name, "devices": [r.address for r in records]})
        log_action(log, logging.WARNING, "adopt", "adopted group %s: %s is running with %s", group,
                   owner.label(), ", ".join(map(str, addrs)), group=group, owner=owner, action="adopt",
                   result="ok")
    return adopted


def _check_held(engine: Engine, claim: Claim, owner: Owner, addrs: list[PciAddress], report: ReconcileReport) -> None:
    if not claim.owner.same(owner):
        msg = (f"{owner.label()} is running with {', '.join(map(str, addrs))} in IOMMU group {claim.group}, "
               f"which the ledger gives to {claim.owner.kind} {claim.owner.label()}")
        report.conflicts.append(msg)
        log_action(log, logging.ERROR, "drift", "%s; not touched", msg, group=claim.group, owner=owner,
                   action="reconcile", result="conflict")
        return
    promote = [a for a in addrs if (rec := claim.device(a)) is not None and rec.role == "companion"]
    missing = [str(a) for a in addrs if claim.device(a) is None]
    if promote:
        engine.executor.promote(claim.group, promote)
    if missing:
        report.errors.append(f"group {claim.group}: {owner.name} uses {', '.join(missing)}, which the claim "
                             "does not list (the topology changed?)")


def release_missing(engine: Engine, dom: RunningDomain, *, before: datetime | None = None) -> list[str]:
    """Release requested devices of ``dom``'s claims that its live XML no longer has (hot-unplug).

    Refcounted per group by the planner: a group goes back to the host only
    when none of its requested devices is in use. Claims created at or after
    ``before`` are newer than the XML and left alone. Returns the addresses let go.
    """
    if dom.error:
        return []
    owner = dom.owner
    gone: list[PciAddress] = []
    for claim in engine.ledger().claims_of(owner):
        if claim.state != ClaimState.ACTIVE or (before is not None and _parse_time(claim.created) >= before):
            continue
        gone += [a for a in claim.requested_pci if a not in dom.addresses]
    if gone:
        engine.release(owner, gone)
        log_action(log, logging.INFO, "release", "released %s: no longer in %s", ", ".join(map(str, gone)),
                   owner.label(), owner=owner, action="hot-unplug", result="ok")
    return [str(a) for a in gone]


def release_owner(engine: Engine, owner: Owner, *, before: datetime | None = None) -> list[int]:
    """Release every active claim of ``owner`` created before ``before`` (stop safety net)."""
    claims = [c for c in engine.ledger().claims_of(owner)
              if c.state in (ClaimState.ACTIVE, ClaimState.RELEASING)
              and (before is None or _parse_time(c.created) < before)]
    if not claims:
        return []
    addrs = [a for c in claims for a in c.requested_pci]
    _, result = engine.release(owner, addrs)
    return result.groups


# --------------------------------------------------------------------------- 3. orphans


def find_orphans(engine: Engine, report: ReconcileReport, topo: Topology | None = None) -> None:
    if topo is not None:
        devices = list(topo.devices.values())
    else:   # each function's driver link, then the whole record of those on vfio only (issue 13)
        devices = [engine.sysfs.read_device(a) for a in engine.sysfs.vfio_bound_addresses() if engine.sysfs.exists(a)]
    claimed = {d.address for c in engine.store.peek().claims.values() for d in c.devices}
    for dev in sorted(devices, key=lambda d: d.address):
        if dev.on_vfio and str(dev.address) not in claimed:
            report.orphans.append({"address": str(dev.address), "group": dev.group, "driver": dev.driver})
            log_action(log, logging.WARNING, "orphan", "%s (group %s) is on %s but no claim covers it; left as it is",
                       dev.address, dev.group, dev.driver, address=dev.address, group=dev.group,
                       action="reconcile", result="orphan")


# --------------------------------------------------------------------------- all of it


def reconcile(engine: Engine, running: list[RunningDomain] | None, *, listed_at: datetime | None = None,
              guard: Guard | None = None) -> ReconcileReport:
    """One full pass; ``running=None`` means libvirt is unreachable (steps 2 are skipped)."""
    report = ReconcileReport(libvirt=running is not None)
    guard = guard or _no_guard
    steps: list[tuple[str, Callable[[], None]]] = [
        ("claims from an earlier boot", lambda: release_stale_boot(engine, report, guard)),
        ("interrupted operations", lambda: recover_interrupted(engine, running, report, guard))]
    if running is not None:
        steps.append(("gone domains", lambda: release_gone(engine, running, report, listed_at=listed_at,
                                                           guard=guard)))
        steps.append(("running domains", lambda: _adopt_all(engine, running, report, listed_at, guard)))
    steps.append(("unclaimed devices", lambda: find_orphans(engine, report)))
    for name, step in steps:
        try:
            step()
        except Exception as e:  # one step's failure must not stop the others
            log.exception("reconcile step %s failed", name)
            report.errors.append(f"{name}: {e}")
    level = logging.WARNING if (report.errors or report.conflicts) else logging.INFO
    log_action(log, level, "reconcile", "reconciled: %s", report.summary(), action="reconcile",
               result="errors" if report.errors else "ok")
    return report


def _adopt_all(engine: Engine, running: list[RunningDomain], report: ReconcileReport, listed_at, guard: Guard) -> None:
    for dom in running:
        with guard(dom.name) as ok:
            if not ok:
                report.skipped.append(f"{dom.name} is being served right now; not adopted")
                continue
            adopt_domain(engine, dom, report)
