"""The event door: libvirt lifecycle/device events and udev PCI events, one worker thread.

The libvirt event loop thread and the udev monitor thread only queue work here; a single
worker runs it, asking libvirt *without* holding any hostdevd lock, then acting through one
engine call under the domain's gate (:class:`~hostdevd.doors.gate.DomainGate`). An event for
a busy domain does not wait in the worker: the gate queues it again when the domain's last
request ends. Order needs no keeping: every handler acts on libvirt's state when it runs,
guarded by the time its event was received.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from ..core.engine import Engine
from ..core.errors import LibvirtUnavailable
from ..core.ledger import Owner
from ..core.logfields import log_action
from ..core.pci_events import PciEvent, PciEventHandler
from ..core.reconcile import ReconcileReport, RunningDomain
from .gate import DomainGate
from .ports import DomainSource

log = logging.getLogger("hostdevd.service")

EVENT_RETRIES = 5
# A bind/unbind uevent of a claimed device is judged this long after it arrived: libvirt's
# managed reattach rebinds a hot-unplugged device just before it sends DEVICE_REMOVED.
DRIFT_GRACE = 2.0

T = TypeVar("T")


def utcnow() -> datetime:
    return datetime.now(UTC)


class EventWorker:
    def __init__(self, engine: Engine, gate: DomainGate, adapter: DomainSource | None) -> None:
        self.engine = engine
        self.gate = gate
        self.adapter = adapter
        self.pci = PciEventHandler(engine)
        self.pci.on_topology_change = self._topology_changed
        self.drift_grace = DRIFT_GRACE
        self.last_reconcile: ReconcileReport | None = None
        self.reconcile_count = 0
        self.events_handled = 0
        self._queue: queue.Queue[tuple[str, Callable[[], object]] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._idle = threading.Condition()
        self._pending = 0

    # ------------------------------------------------------------------ the thread
    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="events-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Tests: wait until every queued event has been handled."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def submit(self, label: str, fn: Callable[[], object]) -> None:
        with self._idle:
            self._pending += 1
        self._queue.put((label, fn))

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            label, fn = item
            try:
                if not self._stopping.is_set():
                    fn()
                    self.events_handled += 1
            except Exception:  # the worker must survive any one event
                log.exception("handling %s failed", label)
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    def _for_domain(self, name: str, label: str, fetch: Callable[[], T], act: Callable[[T], None]) -> None:
        """Fetch from libvirt with no lock held, then act only if the domain stayed untouched.

        While a request serves the domain (a detach waiting for its guest, a hook's prepare) the
        event is put aside and queued again when that request ends, so the worker goes on with
        other domains' events instead of waiting.
        """
        for _ in range(EVENT_RETRIES):
            gen = self.gate.idle_or_later(name, lambda: self._queue.put((label, lambda: self._for_domain(
                name, label, fetch, act))))
            if gen is None:
                with self._idle:
                    self._pending += 1      # still to do: wait_idle() must not report idle meanwhile
                log.debug("%s: %s is busy; queued again when its request ends", label, name)
                return
            try:
                data = fetch()
            except LibvirtUnavailable:
                log.info("%s: libvirt unreachable; handled at the next reconciliation", label)
                return
            with self.gate.guard(name, gen) as ok:
                if ok:
                    act(data)
                    return
        log.warning("%s: %s kept changing; handled at the next reconciliation", label, name)

    # ------------------------------------------------------------------ libvirt events (event loop thread)
    def on_domain_event(self, name: str, uuid: str | None, kind: str) -> None:
        received = utcnow()
        if kind in ("stopped", "shutdown", "crashed"):
            self.submit(f"{kind} {name}", lambda: self._domain_stopped(name, uuid, kind, received))
        elif kind == "started":
            self.submit(f"started {name}", lambda: self._domain_changed(name, uuid, "started", received))

    def on_device_change(self, name: str, uuid: str | None, kind: str, alias: str | None) -> None:
        received = utcnow()
        self.submit(f"device {kind} {alias} {name}",
                    lambda: self._domain_changed(name, uuid, f"device {kind}", received))

    # ------------------------------------------------------------------ udev (udev-monitor thread)
    def on_pci_event(self, ev: PciEvent) -> None:
        """A PCI uevent: queued (bind/unbind after a grace period, see DRIFT_GRACE). Any of them
        may change which devices are host-critical (a NIC or disk controller came, went or
        changed driver): the cached answer is dropped at once (Engine.critical)."""
        self.engine.forget_host_facts()
        if ev.action in ("bind", "unbind") and self.drift_grace > 0:
            timer = threading.Timer(self.drift_grace, self.submit, args=(f"udev {ev}", lambda: self.pci.handle(ev)))
            timer.daemon = True
            timer.start()
            return
        self.submit(f"udev {ev}", lambda: self.pci.handle(ev))

    def _topology_changed(self, ev: PciEvent) -> None:
        """New PCI functions (VFs above all): reservations may cover them (worker thread)."""
        if ev.action == "add" and self.engine.config.reserve:
            report = self.engine.apply_reservations()
            if report.reserved:
                log.info("reserved groups %s after %s", ", ".join(map(str, report.reserved)), ev)

    # ------------------------------------------------------------------ handlers (worker thread)
    def reconcile_now(self) -> ReconcileReport:
        """Full reconciliation against libvirt's running domains (or the ledger alone if unreachable)."""
        gens = self.gate.generations()
        listed_at = utcnow()
        running: list[RunningDomain] | None = None
        if self.adapter is not None:
            try:
                running = [RunningDomain.from_xml(n, u, x) for n, u, x in self.adapter.running_domains()]
            except LibvirtUnavailable as e:
                log.info("reconcile without libvirt: %s", e)
        report = self.engine.reconcile(running, listed_at=listed_at,
                                       guard=lambda name: self.gate.guard(name, gens.get(name, 0)))
        self.recorded(report)
        self.pci.scan()
        return report

    def recorded(self, report: ReconcileReport) -> None:
        self.last_reconcile = report
        self.reconcile_count += 1

    def _domain_stopped(self, name: str, uuid: str | None, kind: str, received: datetime) -> None:
        owner = Owner(name=name, uuid=uuid)
        if not self.engine.ledger().claims_of(owner):
            return                       # the hook released already: the usual case
        adapter = self.adapter

        def fetch() -> bool:
            return adapter.is_active(name, uuid) if adapter is not None else False

        def act(active: bool) -> None:
            if active:
                log.debug("%s %s but is running (again); claims kept", name, kind)
                return
            groups = self.engine.release_owner(owner, before=received)
            if groups:
                log_action(log, logging.INFO, "release", "released groups %s of %s after %s event (the hook did "
                           "not)", ", ".join(map(str, groups)), owner.label(), owner=owner, action=kind,
                           result="ok")

        self._for_domain(name, f"{kind} {name}", fetch, act)

    def _domain_changed(self, name: str, uuid: str | None, why: str, received: datetime) -> None:
        """Started or a device added/removed: adopt what it uses, release what it dropped."""
        adapter = self.adapter

        def fetch() -> RunningDomain | None:
            xml = adapter.domain_xml(name, uuid) if adapter is not None else None
            return RunningDomain.from_xml(name, uuid, xml) if xml is not None else None

        def act(dom: RunningDomain | None) -> None:
            if dom is None:
                return                   # not running: the stop path handles it
            report = ReconcileReport()
            self.engine.adopt_domain(dom, report)
            if why != "started":
                self.engine.release_missing(dom, before=received)
            else:                        # R12: libvirt (managed='yes') or hostdevd set them; check
                for msg in self.engine.verify_vf_net(Owner(name=name, uuid=uuid)):
                    log_action(log, logging.WARNING, "sriov", "%s started but VF %s", name, msg, action="verify_net",
                               result="differs")
            for msg in report.conflicts + report.errors:
                log.warning("%s %s: %s", name, why, msg)

        self._for_domain(name, f"{why} {name}", fetch, act)

    def state(self) -> dict[str, Any]:
        return {"events_handled": self.events_handled, "reconciliations": self.reconcile_count,
                "last_reconcile": self.last_reconcile.to_json() if self.last_reconcile else None}
