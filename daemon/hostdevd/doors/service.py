"""The daemon: Engine + socket API + libvirt events + reconciliation, wired once.

Threads and who may call what:

* socket requests (one thread each, :mod:`hostdevd.api`) run the ``op_*``
  methods. ``prepare``/``release`` coming from libvirt's hook never call
  libvirt: libvirt holds that domain's job until the hook returns, so asking
  it about the domain would deadlock (R9). They use the XML they carry.
* the libvirt event loop thread (:mod:`hostdevd.libvirt_events`) only queues
  work; a single worker thread runs it, calling libvirt *without* holding any
  hostdevd lock, then acting under the domain's gate.
* :class:`DomainGate` orders the two: every request marks its domain busy and
  bumps a generation; an event handler snapshots the generation while the
  domain is idle, asks libvirt, and acts only if nothing happened to the
  domain meanwhile (otherwise it looks again). A stale STOPPED event can so
  never release the claims of a domain that was started again. An event for
  a busy domain does not wait in the worker: the gate queues it again when
  the domain's last request ends.

* the udev monitor thread (:mod:`hostdevd.udev_watch`) only queues PCI
  uevents for the same worker (bind/unbind ``DRIFT_GRACE`` seconds late);
  the handler judges a device under its group lock.
* ``attach``/``detach`` (hostdevctl) hold the domain's gate for the whole
  request, including the wait for the guest to let go of a device, which
  libvirt's device events (recorded per domain) wake.

Policy: prepare is all-or-nothing; release is best effort and idempotent (the
hook's ``release end`` and the STOPPED event both release; the second finds
nothing to do). While libvirt is unreachable the socket keeps serving from
the ledger and ``status`` says so; the connection comes back with backoff
and a full reconciliation follows.
"""
from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, Protocol

from .. import __version__
from ..core.address import PciAddress
from ..core.config import Config
from ..core.domxml import DomainRequest, guest_placements, parse_device, parse_domain
from ..core.engine import Engine
from ..core.errors import HostdevError, NotFound, Refused
from ..core.ledger import Ledger, Owner
from ..core.logfields import log_action
from ..core.migrate import assess
from ..core.pci_events import PciEvent, PciEventHandler
from ..core.planner import groups_of, plan_prepare
from ..core.reconcile import ReconcileReport, RunningDomain, adopt_domain, reconcile, release_missing, release_owner
from ..core.reservations import apply_reservations
from ..core.sriov import apply_config as apply_sriov
from ..core.vfnet import net_requests
from .api import ApiServer, BadRequest, Dispatcher, Peer
from .wire import socket_path

log = logging.getLogger("hostdevd.service")

EVENT_RETRIES = 5
# A bind/unbind uevent of a claimed device is judged this long after it arrived: libvirt's
# managed reattach rebinds a hot-unplugged device just before it sends DEVICE_REMOVED.
DRIFT_GRACE = 2.0


class LibvirtFailure(HostdevError):
    """libvirt refused or failed a call (attach, detach, lookup)."""
    code = "LIBVIRT"


class LibvirtUnavailable(LibvirtFailure):
    """No connection to libvirt right now."""
    code = "LIBVIRT_UNAVAILABLE"


class LibvirtAdapter(Protocol):
    """What the daemon needs from :class:`hostdevd.libvirt_events.LibvirtEvents` (tests fake it)."""
    uri: str
    connected: bool

    def start(self, sink: Any) -> None: ...
    def stop(self) -> None: ...
    def state(self) -> dict: ...
    def running_domains(self) -> list[tuple[str, str, str]]: ...
    def lookup(self, name: str, uuid: str | None = None) -> tuple[str, str, bool] | None: ...
    def domain_xml(self, name: str, uuid: str | None = None) -> str | None: ...
    def is_active(self, name: str, uuid: str | None = None) -> bool: ...
    def attach_device(self, name: str, uuid: str | None, xml: str, config: bool, live: bool = True) -> None: ...
    def detach_device(self, name: str, uuid: str | None, xml: str, config: bool, live: bool = True) -> None: ...


def utcnow() -> datetime:
    return datetime.now(UTC)


def norm_uuid(text: str | None) -> str | None:
    """libvirt's form (lower case, dashed): owners compare UUIDs as strings."""
    if not text:
        return None
    try:
        return str(uuidlib.UUID(text))
    except ValueError:
        return text.lower()


def hostdev_xml(addr: PciAddress) -> str:
    """A ``<hostdev>`` for an address hostdevd prepared (managed='no': libvirt must not rebind it)."""
    return ("<hostdev mode='subsystem' type='pci' managed='no'><source>"
            f"<address domain='0x{addr.domain:04x}' bus='0x{addr.bus:02x}' slot='0x{addr.slot:02x}' "
            f"function='0x{addr.function:x}'/></source></hostdev>")


class DomainGate:
    """Per-domain coordination of socket requests and libvirt event handlers.

    Lock order: a domain's gate lock, then the engine's group locks. Never
    call libvirt while holding a gate lock.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active: dict[str, int] = {}
        self._gen: dict[str, int] = {}
        self._locks: dict[str, threading.RLock] = {}
        self._on_idle: dict[str, list[Callable[[], None]]] = {}

    def lock(self, name: str) -> threading.RLock:
        with self._cond:
            return self._locks.setdefault(name, threading.RLock())

    @contextlib.contextmanager
    def request(self, name: str) -> Iterator[None]:
        """Mark ``name`` busy for the whole request (including libvirt calls)."""
        with self._cond:
            self._active[name] = self._active.get(name, 0) + 1
            self._gen[name] = self._gen.get(name, 0) + 1
        try:
            yield
        finally:
            waiters: list[Callable[[], None]] = []
            with self._cond:
                self._active[name] -= 1
                if not self._active[name]:
                    del self._active[name]
                    waiters = self._on_idle.pop(name, [])
                self._gen[name] += 1
                self._cond.notify_all()
            for cb in waiters:          # outside the lock: they only queue work
                cb()

    def busy(self, name: str) -> bool:
        with self._cond:
            return bool(self._active.get(name))

    def generations(self) -> dict[str, int]:
        with self._cond:
            return dict(self._gen)

    def wait_idle(self, name: str, timeout: float) -> int | None:
        """Wait until no request serves ``name``; return its generation (None on timeout)."""
        with self._cond:
            if not self._cond.wait_for(lambda: not self._active.get(name), timeout):
                return None
            return self._gen.get(name, 0)

    def idle_or_later(self, name: str, later: Callable[[], None]) -> int | None:
        """``name``'s generation if no request serves it now; otherwise None, and ``later``
        runs (in the thread that ends the last request) as soon as none does."""
        with self._cond:
            if not self._active.get(name):
                return self._gen.get(name, 0)
            self._on_idle.setdefault(name, []).append(later)
            return None

    @contextlib.contextmanager
    def guard(self, name: str, generation: int) -> Iterator[bool]:
        """Hold ``name``'s lock; yield True when nothing touched it since ``generation``."""
        with self.lock(name):
            with self._cond:
                ok = not self._active.get(name) and self._gen.get(name, 0) == generation
            yield ok


class Daemon:
    def __init__(self, config: Config | None = None, engine: Engine | None = None,
                 adapter: LibvirtAdapter | None = None, *, sock_path: str | None = None,
                 read_timeout: float = 30.0, allowed_uids: set[int] | None = None, udev: Any = None):
        self.config = config or (engine.config if engine else Config())
        self.engine = engine or Engine(self.config)
        self.adapter = adapter
        self.gate = DomainGate()
        self.dispatcher = Dispatcher(self)
        self.server = ApiServer(sock_path or socket_path(self.config.runtime_dir), self.dispatcher,
                                read_timeout=read_timeout, allowed_uids=allowed_uids)
        self._queue: queue.Queue[tuple[str, Callable[[], None]] | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lv_lock = threading.Lock()
        self._lv_connected = False
        self._lv_since: str | None = None
        self._lv_reason: str | None = None
        self.last_reconcile: ReconcileReport | None = None
        self.reconcile_count = 0
        self.events_handled = 0
        self.started_at = utcnow().isoformat(timespec="seconds")
        self._idle = threading.Condition()
        self._pending = 0
        # udev (R10): the watcher is the door, the handler decides (tests feed it synthetic events).
        self.udev = udev
        self.udev_watching = False
        self.pci = PciEventHandler(self.engine)
        self.pci.on_topology_change = self._topology_changed
        self.drift_grace = DRIFT_GRACE
        # libvirt device events per domain, for detach waiting on DEVICE_REMOVED.
        self._dev_cond = threading.Condition()
        self._dev_seq = 0
        self._dev_events: dict[str, list[tuple[int, str, str | None]]] = {}

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Check the ledger, finish interrupted work, then serve the socket and watch libvirt.

        Raises LedgerError for an unreadable ledger: running without knowing what
        hostdevd bound earlier is how original drivers get lost.
        """
        self.engine.ledger()
        self.last_reconcile = reconcile(self.engine, None)   # crash recovery needs no libvirt
        self.reconcile_count += 1
        # Reservations are bound before the socket serves and before READY=1, so before
        # libvirtd (ordered after hostdevd) autostarts any domain.
        # SR-IOV first: a reserved device may be a VF that only exists once its PF has VFs.
        self.sriov = apply_sriov(self.engine, self.config.sriov)
        self.reservations = apply_reservations(self.engine, self.config.reserve)
        self._worker = threading.Thread(target=self._work, name="events-worker", daemon=True)
        self._worker.start()
        if self.udev is not None:
            self.udev_watching = self.udev.start(self.on_pci_event)
        self.pci.scan()                  # drift that happened while hostdevd was not running
        try:
            self.server.start()
        except Exception:
            self._queue.put(None)
            raise
        if self.adapter is not None:
            self.adapter.start(self)
        log_action(log, logging.INFO, "daemon", "hostdevd %s started (socket %s, libvirt %s)", __version__,
                   self.server.path, self.adapter.uri if self.adapter else "not used", action="start",
                   result="ok")

    def stop(self, drain_timeout: float = 20.0) -> None:
        """Stop serving; never rebinds anything (host shutdown keeps devices where they are)."""
        self._stopping.set()
        drained = self.server.stop(drain_timeout)
        if self.adapter is not None:
            with contextlib.suppress(Exception):
                self.adapter.stop()
        if self.udev is not None:
            with contextlib.suppress(Exception):
                self.udev.stop()
        self._queue.put(None)
        if self._worker is not None:
            self._worker.join(5)
        with self.engine.store.locked():
            claims = len(self.engine.ledger().claims)   # no transaction is half written
        log_action(log, logging.INFO, "daemon", "hostdevd stopped%s; %s claims kept in the ledger",
                   "" if drained else " (requests still running were abandoned)", claims, action="stop",
                   result="ok" if drained else "abandoned")

    def healthy(self) -> bool:
        """For the watchdog: the socket server and the event worker are both alive."""
        worker_ok = self._worker is not None and self._worker.is_alive()
        adapter_ok = getattr(self.adapter, "healthy", True) if self.adapter is not None else True
        udev_ok = getattr(self.udev, "healthy", True) if self.udev is not None else True
        return self.server.alive and worker_ok and bool(adapter_ok) and bool(udev_ok)

    def status_line(self) -> str:
        try:
            claims = len(self.engine.ledger().claims)
        except HostdevError:
            claims = "?"
        lv = ("libvirt connected" if self.libvirt_connected else
              "libvirt not used" if self.adapter is None else "libvirt disconnected")
        return f"{claims} claims, {lv}, {self.server.served} requests served"

    @property
    def libvirt_connected(self) -> bool:
        with self._lv_lock:
            return self._lv_connected

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Tests: wait until every queued event has been handled."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    # ------------------------------------------------------------------ worker
    def _submit(self, label: str, fn: Callable[[], None]) -> None:
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

    def _for_domain(self, name: str, label: str, fetch: Callable[[], Any], act: Callable[[Any], None]) -> None:
        """Fetch from libvirt with no lock held, then act only if the domain stayed untouched.

        While a request serves the domain (a detach waiting for its guest, a hook's prepare) the
        event is put aside and queued again when that request ends, so the worker goes on with
        other domains' events instead of waiting. Order needs no keeping: every handler acts on
        libvirt's state when it runs, guarded by the time its event was received.
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

    # ------------------------------------------------------------------ libvirt callbacks (event loop thread)
    def on_libvirt_connected(self) -> None:
        with self._lv_lock:
            self._lv_connected, self._lv_since, self._lv_reason = True, utcnow().isoformat(timespec="seconds"), None
        log_action(log, logging.INFO, "daemon", "connected to libvirt at %s", self.adapter.uri, action="connect",
                   result="ok")
        self._submit("reconcile after connect", self.reconcile_now)

    def on_libvirt_disconnected(self, reason: str) -> None:
        with self._lv_lock:
            self._lv_connected, self._lv_since, self._lv_reason = False, utcnow().isoformat(timespec="seconds"), reason
        log_action(log, logging.WARNING, "daemon", "lost the libvirt connection (%s); serving from the ledger "
                   "and reconnecting", reason, action="disconnect", result=reason)

    def on_domain_event(self, name: str, uuid: str | None, kind: str, detail: str | None = None) -> None:
        received, uuid = utcnow(), norm_uuid(uuid)
        log.debug("domain %s %s (%s)", name, kind, detail)
        if kind in ("stopped", "shutdown", "crashed"):
            self._submit(f"{kind} {name}", lambda: self._domain_stopped(name, uuid, kind, received))
        elif kind == "started":
            self._submit(f"started {name}", lambda: self._domain_changed(name, uuid, "started", received))

    def on_device_event(self, name: str, uuid: str | None, kind: str, alias: str | None = None) -> None:
        received, uuid = utcnow(), norm_uuid(uuid)
        with self._dev_cond:
            self._dev_seq += 1
            seen = self._dev_events.setdefault(name, [])
            seen.append((self._dev_seq, kind, alias))
            del seen[:-100]
            self._dev_cond.notify_all()
        if kind == "removal_failed":
            log_action(log, logging.WARNING, "hotplug", "the guest did not release device %s of %s "
                       "(DEVICE_REMOVAL_FAILED); its group stays claimed", alias, name,
                       owner=Owner(name=name, uuid=uuid), action="detach", result="removal-failed")
            return
        if kind in ("added", "removed"):
            self._submit(f"device {kind} {alias} {name}",
                         lambda: self._domain_changed(name, uuid, f"device {kind}", received))

    # ------------------------------------------------------------------ udev (udev-monitor thread)
    def on_pci_event(self, ev: PciEvent) -> None:
        """A PCI uevent: queue it for the worker (bind/unbind after a grace period, see DRIFT_GRACE)."""
        if ev.action in ("bind", "unbind") and self.drift_grace > 0:
            timer = threading.Timer(self.drift_grace, self._submit, args=(f"udev {ev}", lambda: self.pci.handle(ev)))
            timer.daemon = True
            timer.start()
            return
        self._submit(f"udev {ev}", lambda: self.pci.handle(ev))

    def _topology_changed(self, ev: PciEvent) -> None:
        """New PCI functions (VFs above all): reservations may cover them (worker thread)."""
        if ev.action == "add" and self.config.reserve:
            report = apply_reservations(self.engine, self.config.reserve)
            if report.reserved:
                log.info("reserved groups %s after %s", ", ".join(map(str, report.reserved)), ev)

    # ------------------------------------------------------------------ event handlers (worker thread)
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
        report = reconcile(self.engine, running, listed_at=listed_at,
                           guard=lambda name: self.gate.guard(name, gens.get(name, 0)))
        self.last_reconcile = report
        self.reconcile_count += 1
        self.pci.scan()
        return report

    def _domain_stopped(self, name: str, uuid: str | None, kind: str, received: datetime) -> None:
        owner = Owner(name=name, uuid=uuid)
        if not self.engine.ledger().claims_of(owner):
            return                       # the hook released already: the usual case

        def fetch() -> bool:
            return self.adapter.is_active(name, uuid) if self.adapter is not None else False

        def act(active: bool) -> None:
            if active:
                log.debug("%s %s but is running (again); claims kept", name, kind)
                return
            groups = release_owner(self.engine, owner, before=received)
            if groups:
                log_action(log, logging.INFO, "release", "released groups %s of %s after %s event (the hook did "
                           "not)", ", ".join(map(str, groups)), owner.label(), owner=owner, action=kind,
                           result="ok")

        self._for_domain(name, f"{kind} {name}", fetch, act)

    def _domain_changed(self, name: str, uuid: str | None, why: str, received: datetime) -> None:
        """Started or a device added/removed: adopt what it uses, release what it dropped."""
        def fetch() -> RunningDomain | None:
            xml = self.adapter.domain_xml(name, uuid) if self.adapter is not None else None
            return RunningDomain.from_xml(name, uuid, xml) if xml is not None else None

        def act(dom: RunningDomain | None) -> None:
            if dom is None:
                return                   # not running: the stop path handles it
            report = ReconcileReport()
            adopt_domain(self.engine, dom, report)
            if why != "started":
                release_missing(self.engine, dom, before=received)
            else:                        # R12: libvirt (managed='yes') or hostdevd set them; check
                for msg in self.engine.verify_vf_net(Owner(name=name, uuid=uuid)):
                    log_action(log, logging.WARNING, "sriov", "%s started but VF %s", name, msg, action="verify_net",
                               result="differs")
            for msg in report.conflicts + report.errors:
                log.warning("%s %s: %s", name, why, msg)

        self._for_domain(name, f"{why} {name}", fetch, act)

    # ------------------------------------------------------------------ request helpers
    def _devices(self, xml: str | None, addresses: list[str] | None, fragment: bool
                 ) -> tuple[DomainRequest | None, list[PciAddress]]:
        if xml is not None:
            parsed = parse_device(xml) if fragment else parse_domain(xml)
            return parsed, parsed.addresses()
        return None, [PciAddress.parse(a) for a in addresses or []]

    @staticmethod
    def _owner(ref, parsed: DomainRequest | None) -> Owner:
        uuid = norm_uuid(ref.uuid)
        if parsed is not None:
            if parsed.name and parsed.name != ref.name:
                raise BadRequest(f"domain {ref.name!r} does not match the XML's <name>{parsed.name}</name>")
            if parsed.uuid:
                if uuid and norm_uuid(parsed.uuid) != uuid:
                    raise BadRequest(f"domain uuid {uuid} does not match the XML's <uuid>{parsed.uuid}</uuid>")
                uuid = norm_uuid(parsed.uuid)
        return Owner(name=ref.name, uuid=uuid, kind="domain")

    def _holders(self, addrs: list[PciAddress], owner: Owner) -> list[dict]:
        ledger = self.engine.ledger()
        out = []
        for g in sorted(groups_of(self.engine.topology(with_critical=False), addrs)):
            claim = ledger.claim_for_group(g)
            if claim is not None and not claim.owner.same(owner):
                out.append({"group": g, "owner": claim.owner.model_dump()})
        return out

    def _prepare(self, addrs: list[PciAddress], owner: Owner, net: dict | None = None):
        with self.gate.lock(owner.name):
            try:
                return self.engine.prepare(addrs, owner, net)
            except Refused as e:
                e.holders = self._holders(addrs, owner)
                log_action(log, logging.WARNING, "refused", "refused %s for %s: %s",
                           ", ".join(map(str, addrs)), owner.label(), e.message, owner=owner,
                           action="prepare", result="refused")
                raise

    @staticmethod
    def _extras(parsed: DomainRequest | None) -> dict:
        if parsed is None:
            return {}
        out: dict[str, Any] = {}
        if parsed.out_of_scope:
            out["out_of_scope"] = [o.to_dict() for o in parsed.out_of_scope]
        if parsed.networks:
            out["networks"] = [n.to_dict() for n in parsed.networks]
            out["warnings"] = [f"interface on network {n.network!r} has no <actual> device in this XML (libvirt "
                               "picks a hostdev network's VF after the prepare hook); if it is a hostdev network, "
                               "hostdevd prepares its VF at libvirt's 'start begin' hook" for n in parsed.networks]
        return out

    def _resolve(self, ref) -> tuple[Owner, bool | None]:
        """Name + uuid (+ running?) of a domain named by a CLI request; never used for hook requests."""
        if self.adapter is None or not self.libvirt_connected:
            return Owner(name=ref.name, uuid=norm_uuid(ref.uuid)), None
        found = self.adapter.lookup(ref.name, ref.uuid)
        if found is None:
            raise LibvirtFailure(f"libvirt has no domain {ref.name!r}", "check the name with `virsh list --all`")
        name, uuid, active = found
        return Owner(name=name, uuid=norm_uuid(uuid)), active

    # ------------------------------------------------------------------ ops
    def op_ping(self, req, peer: Peer) -> dict:
        return {"version": __version__, "pid": os.getpid()}

    def op_status(self, req, peer: Peer) -> dict:
        ledger = self.engine.ledger()
        with self._lv_lock:
            lv = {"connected": self._lv_connected, "since": self._lv_since, "reason": self._lv_reason}
        if self.adapter is None:
            lv.update(state="not used", uri=None)
        else:
            lv.update(state="connected" if lv["connected"] else "disconnected", uri=self.adapter.uri)
        return {
            "daemon": {"version": __version__, "pid": os.getpid(), "started": self.started_at,
                       "libvirt": lv, "requests_served": self.server.served,
                       "events_handled": self.events_handled, "reconciliations": self.reconcile_count,
                       "last_reconcile": self.last_reconcile.to_json() if self.last_reconcile else None},
            "claims": [c.model_dump() for _, c in sorted(ledger.claims.items(), key=lambda kv: int(kv[0]))],
            "reservations": list(ledger.reservations),
            "drift": self.pci.drift(),
            "udev": {"watching": bool(self.udev is not None and getattr(self.udev, "watching", False)),
                     "error": getattr(self.udev, "error", None) if self.udev is not None else "not used",
                     **self.pci.state()},
        }

    def op_prepare(self, req, peer: Peer) -> dict:
        # Hook requests (origin "hook") must not call libvirt: nothing below does.
        parsed, addrs = self._devices(req.xml, req.addresses, fragment=False)
        owner = self._owner(req.domain, parsed)
        extras = self._extras(parsed)
        # A managed='no' hostdev network: libvirt wants its VF on vfio-pci before 'start begin'.
        picks = self._check_pools(parsed, owner, extras)
        addrs += [a for a in picks if a not in addrs]
        if not addrs:
            return {"owner": owner.model_dump(), "groups": [], "note": "no PCI host device to prepare", **extras}
        t0 = time.monotonic()
        with self.gate.request(owner.name):
            # phase "start" (libvirt's 'start begin' hook): a VF from a hostdev network is known only
            # now, and libvirt already set its MAC/VLAN: recorded and verified, not written.
            net = net_requests(parsed, resolved_by_libvirt=getattr(req, "phase", "prepare") == "start")
            net.update(picks)
            plan, result = self._prepare(addrs, owner, net)
        log.info("prepared %s for %s (%s) in %.0f ms", ", ".join(map(str, addrs)), owner.label(), req.origin,
                 (time.monotonic() - t0) * 1000)
        return {"owner": owner.model_dump(), "groups": result.groups, "plan": plan.to_json(),
                "result": result.to_json(), **extras}

    def op_release(self, req, peer: Peer) -> dict:
        parsed = parse_domain(req.xml) if req.xml is not None else None
        owner = self._owner(req.domain, parsed)
        addrs = [PciAddress.parse(a) for a in req.addresses] if req.addresses is not None else None
        with self.gate.request(owner.name), self.gate.lock(owner.name):
            plan, result = self.engine.release(owner, addrs)
        return {"owner": owner.model_dump(), "groups": result.groups, "plan": plan.to_json(),
                "result": result.to_json(), "warnings": plan.warnings}

    def _check_pools(self, parsed: DomainRequest | None, owner: Owner, extras: dict) -> dict:
        """An interface on a libvirt hostdev network: libvirt picks its VF only after 'prepare
        begin' (qemuProcessPrepareHost). Resolve the pool through the network's XML (the network
        driver, not this domain: no deadlock, R9) and refuse now when no VF of it could be
        assigned. For a managed='no' pool libvirt insists the VF is on vfio-pci before 'start
        begin' ("Unmanaged PCI device … must be manually detached"), so the VF libvirt will take
        (networkAllocatePort: the first VF of the pool without a connection) is returned, to be
        prepared now; a managed='yes' pool's VF is bound by libvirt and claimed at 'start begin'.
        Returns {address: NetRequest} for the VFs to prepare now."""
        picks: dict = {}
        if parsed is None or not parsed.networks or self.adapter is None or not self.libvirt_connected \
                or not hasattr(self.adapter, "network_xml"):
            return picks
        from ..core.domxml import parse_network
        from ..core.sriov import network_pool, pool_candidates
        from ..core.vfnet import NetRequest
        topo = None
        for i, ref in enumerate(parsed.networks):
            try:
                xml = self.adapter.network_xml(ref.network)
                net = parse_network(xml) if xml is not None else None
            except HostdevError as e:
                extras.setdefault("warnings", []).append(f"network {ref.network!r}: {e}")
                continue
            if net is None or not net.is_hostdev:
                continue
            topo = topo or self.engine.topology()
            pool = network_pool(topo, net)
            ok, why = pool_candidates(topo, self.engine.ledger(), owner, pool, self.engine.policy)
            ok = [a for a in ok if PciAddress.parse(a) not in picks]
            extras["networks"][i].update(hostdev_pool=[str(a) for a in pool], assignable=ok)
            if pool and not ok:
                raise Refused(f"hostdev network {ref.network!r} has no VF {owner.name} could get: "
                              + "; ".join(f"{a}: {r}" for a, r in list(why.items())[:4]),
                              "free a VF of the pool (stop a domain using one) or create more VFs "
                              "(`hostdevctl vfs set`)")
            if pool and not net.managed:
                # libvirt sets its MAC after this hook and restores it itself: saved now, verified.
                picks[PciAddress.parse(ok[0])] = NetRequest(mac=ref.mac, managed=True)
                extras["networks"][i]["prepared"] = ok[0]
        return picks

    def op_vfs_set(self, req, peer: Peer) -> dict:
        """``hostdevctl vfs set`` through the daemon: its group locks cover the VFs' groups."""
        from ..core.sriov import set_vfs_by_hand
        result = set_vfs_by_hand(self.engine, req.pf, req.numvfs, req.autoprobe, req.wait_timeout)
        return {"vfs": result.to_json()}

    def op_plan(self, req, peer: Peer) -> dict:
        owner = Owner(**req.owner.model_dump())
        parsed, addrs = self._devices(req.xml, req.addresses, fragment=False)
        if req.action == "prepare":
            plan = self.engine.plan_prepare(addrs, owner)
        else:
            plan = self.engine.plan_release(owner, addrs if (req.xml or req.addresses) else None)
        return {"plan": plan.to_json(), **self._extras(parsed)}

    def _need_libvirt(self, op: str) -> None:
        if self.adapter is None or not self.libvirt_connected:
            uri = self.adapter.uri if self.adapter is not None else self.config.libvirt_uri
            raise LibvirtUnavailable(f"{op} needs libvirt, and hostdevd is not connected to {uri}",
                                     "is libvirtd (virtqemud) running? hostdevd reconnects by itself")

    @staticmethod
    def _affect(req, active: bool | None, op: str, name: str) -> tuple[bool, bool]:
        """virsh's --live/--config/--current: neither flag means the domain's current state."""
        live, config = bool(req.live), bool(req.config)
        if not live and not config:
            live, config = bool(active), not active
        if live and not active:
            raise Refused(f"{name} is not running: nothing to {op} live",
                          f"leave out --live to change {name}'s persistent definition (--config), or start it")
        return live, config

    def _device_seq(self, name: str) -> int:
        """The newest device event number of ``name`` (0: none yet)."""
        with self._dev_cond:
            events = self._dev_events.get(name)
            return events[-1][0] if events else 0

    def _device_events_since(self, name: str, seq: int) -> list[tuple[str, str | None]]:
        with self._dev_cond:
            return [(k, a) for n, k, a in self._dev_events.get(name, []) if n > seq]

    def op_attach(self, req, peer: Peer) -> dict:
        parsed, addrs = self._devices(req.xml, req.addresses, fragment=True)
        if not addrs:
            raise BadRequest("attach: the XML names no PCI host device")
        self._need_libvirt("attach")
        owner, active = self._resolve(req.domain)
        live, config = self._affect(req, active, "attach", owner.name)
        xmls = [req.xml] if req.xml is not None else [hostdev_xml(a) for a in addrs]
        t0 = time.monotonic()
        with self.gate.request(owner.name):
            reply: dict[str, Any] = {"owner": owner.model_dump(), "live": live, "config": config,
                                     "libvirt_attached": False}
            if not live:
                # Persistent definition only: nothing is bound now, the hook prepares the group at start.
                # Refuse now what the start would refuse anyway (no IOMMU, a bridge, policy, host-critical).
                plan = plan_prepare(self.engine.topology(), addrs, owner, Ledger(), self.engine.policy)
                if not plan.ok:
                    raise Refused(plan.refusal_message(), refusals=[r.to_json() for r in plan.refusals])
                for xml in xmls:
                    self.adapter.attach_device(owner.name, owner.uuid, xml, config=True, live=False)
                reply.update(libvirt_attached=True, plan=plan.to_json(), groups=[],
                             note=f"added to {owner.name}'s persistent definition; hostdevd prepares the group "
                                  "when the domain starts")
                return reply
            held = {a for c in self.engine.ledger().claims_of(owner) for a in c.requested}
            new = [a for a in addrs if str(a) not in held]
            # An <interface type='hostdev'> carries the VF's MAC/VLAN: recorded (and set) as at start.
            plan, result = self._prepare(addrs, owner, net_requests(parsed))
            reply.update(groups=result.groups, plan=plan.to_json(), result=result.to_json())
            done: list[str] = []
            try:
                for xml in xmls:
                    self.adapter.attach_device(owner.name, owner.uuid, xml, config=config, live=True)
                    done.append(xml)
            except LibvirtFailure as e:
                problems = []
                for xml in reversed(done):
                    try:
                        self.adapter.detach_device(owner.name, owner.uuid, xml, config=config, live=True)
                    except LibvirtFailure as e2:
                        problems.append(f"detach back failed: {e2.message}")
                if new and not problems:
                    with self.gate.lock(owner.name):
                        try:
                            self.engine.release(owner, new)
                        except HostdevError as e2:
                            problems.append(f"release failed: {e2}")
                if problems:
                    e.message += "; rollback incomplete: " + "; ".join(problems)
                log_action(log, logging.ERROR, "hotplug", "attach of %s to %s failed, %s: %s",
                           ", ".join(map(str, addrs)), owner.label(),
                           "rollback incomplete" if problems else "rolled back", e.message, owner=owner,
                           action="attach", result="failed")
                raise
            reply["libvirt_attached"] = True
            reply["seconds"] = round(time.monotonic() - t0, 3)
            log_action(log, logging.INFO, "hotplug", "attached %s to %s in %.0f ms (groups %s prepared)",
                       ", ".join(map(str, addrs)), owner.label(), reply["seconds"] * 1000,
                       ", ".join(map(str, result.groups)), owner=owner, action="attach", result="ok")
            return reply

    def op_detach(self, req, peer: Peer) -> dict:
        parsed, addrs = self._devices(req.xml, req.addresses, fragment=True)
        if not addrs:
            raise BadRequest("detach: the XML names no PCI host device")
        self._need_libvirt("detach")
        owner, active = self._resolve(req.domain)
        live, config = self._affect(req, active, "detach", owner.name)
        timeout = req.timeout if req.timeout is not None else self.config.detach_timeout
        t0 = time.monotonic()
        reply: dict[str, Any] = {"owner": owner.model_dump(), "live": live, "config": config,
                                 "libvirt_detached": False, "removed": [], "pending": [], "removal_failed": [],
                                 "groups": [], "warnings": []}
        with self.gate.request(owner.name):
            claimed = {a for c in self.engine.ledger().claims_of(owner) for a in c.requested}
            present: list[PciAddress] = []
            still: list[PciAddress] = []
            if live:
                xml_now = self.adapter.domain_xml(owner.name, owner.uuid)
                placement = guest_placements(xml_now) if xml_now is not None else None
                present = [a for a in addrs if placement is not None and placement.get(a) is not None]
                missing = [str(a) for a in addrs if a not in present and str(a) not in claimed]
                if missing and not config:
                    raise NotFound(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not attached to "
                                   f"{owner.name}", f"`virsh dumpxml {owner.name}` shows its devices")
                seq = self._device_seq(owner.name)
                aliases = {placement.get(a).alias: a for a in present if placement.get(a).alias}
                for a in present:
                    # The live element itself: libvirt matches it whether it is a <hostdev> or an
                    # <interface type='hostdev'>, managed or not.
                    self.adapter.detach_device(owner.name, owner.uuid, placement.get(a).xml, config=False, live=True)
                reply["libvirt_detached"] = bool(present)
                still, failed = self._wait_removed(owner, present, aliases, seq, timeout)
                reply["removal_failed"] = [str(a) for a in failed]
            if config:
                for xml in ([req.xml] if req.xml is not None else [hostdev_xml(a) for a in addrs]):
                    try:
                        self.adapter.detach_device(owner.name, owner.uuid, xml, config=True, live=False)
                    except LibvirtFailure as e:
                        reply["warnings"].append(f"persistent definition unchanged: {e.message}")
            # Released: what the guest let go of, and what hostdevd held for a device the domain
            # no longer has (live XML read) or for a domain that is not running. --config alone on
            # a running domain leaves the live guest, and so its claims, alone.
            if live or not active:
                release = [a for a in addrs if a not in still and (a in present or str(a) in claimed)]
            else:
                release = []
            if release:
                with self.gate.lock(owner.name):
                    plan, result = self.engine.release(owner, release)
                reply["groups"], reply["warnings"] = result.groups, reply["warnings"] + plan.warnings
            reply["removed"] = [str(a) for a in present if a not in still]
            reply["pending"] = [str(a) for a in still]
        reply["seconds"] = round(time.monotonic() - t0, 3)
        if still:
            why = ("the guest refused to release" if reply["removal_failed"] else
                   f"the guest has not released within {timeout:g} s")
            reply["note"] = (f"{why} {', '.join(reply['pending'])}; the device stays attached and its group "
                             "claimed; hostdevd releases it when libvirt reports the device removed")
            log_action(log, logging.WARNING, "hotplug", "detach from %s: %s %s; group kept claimed",
                       owner.label(), why, ", ".join(reply["pending"]), owner=owner, action="detach",
                       result="removal-failed" if reply["removal_failed"] else "pending")
        elif release:
            log_action(log, logging.INFO, "hotplug", "detached %s from %s in %.0f ms; released groups %s",
                       ", ".join(map(str, release)), owner.label(), reply["seconds"] * 1000,
                       ", ".join(map(str, reply["groups"])) or "-", owner=owner, action="detach", result="ok")
        return reply

    def _wait_removed(self, owner: Owner, present: list[PciAddress], aliases: dict[str, PciAddress], seq: int,
                      timeout: float) -> tuple[list[PciAddress], list[PciAddress]]:
        """Wait for the guest to let go (DEVICE_REMOVED, or the live XML without the device).

        Returns (still attached, refused by the guest). Looks at the live XML after
        every device event of the domain and at least once a second.
        """
        if not present:
            return [], []
        deadline = time.monotonic() + timeout
        still = list(present)
        while True:
            try:
                xml_now = self.adapter.domain_xml(owner.name, owner.uuid)
            except LibvirtUnavailable:
                xml_now = ""             # unknown: keep waiting, keep the claim
            if xml_now is None:
                return [], []            # the domain stopped: nothing is attached any more
            if xml_now:
                placement = guest_placements(xml_now)
                still = [a for a in present if placement.get(a) is not None]
                if not still:
                    return [], []
            seen = self._device_seq(owner.name)
            failed = [aliases[al] for k, al in self._device_events_since(owner.name, seq)
                      if k == "removal_failed" and al in aliases]
            if failed:
                return still, [a for a in failed if a in still]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return still, []
            with self._dev_cond:
                self._dev_cond.wait_for(lambda: (self._dev_events.get(owner.name) or [(0,)])[-1][0] > seen,
                                        min(1.0, remaining))

    def op_migrate_check(self, req, peer: Peer) -> dict:
        """Does the domain hold assigned devices that block live migration, which can be unplugged first?

        From the hook (``origin`` hook) only the XML it carries is used: libvirt holds
        the domain's job while its hook runs (R9).
        """
        name, uuid = req.domain.name, norm_uuid(req.domain.uuid)
        placement, running, source = None, None, "ledger"
        if req.xml is not None:
            placement = guest_placements(req.xml)
            uuid = uuid or norm_uuid(placement.uuid)
            source = "hook XML" if req.origin == "hook" else "given XML"
        elif req.origin != "hook" and self.adapter is not None and self.libvirt_connected:
            found = self.adapter.lookup(name, uuid)
            if found is None:
                raise LibvirtFailure(f"libvirt has no domain {name!r}", "check the name with `virsh list --all`")
            name, uuid, running = found[0], norm_uuid(found[1]), found[2]
            xml = self.adapter.domain_xml(name, uuid) if running else None
            if xml is not None:
                placement, source = guest_placements(xml), "live XML"
        owner = Owner(name=name, uuid=uuid)
        claims = [c for c in self.engine.ledger().claims_of(owner) if c.owner.kind == "domain"]
        report = assess(name, placement, claims, self.engine.topology(with_critical=False), source)
        report.running = running
        if running is False:
            report.notes.append(f"{name} is not running: there is nothing to migrate live")
        if req.xml is None and source == "ledger" and req.origin != "hook":
            report.notes.append("libvirt is not connected: the verdict comes from the ledger alone")
        level = logging.WARNING if report.blocked else logging.INFO
        log_action(log, level, "migrate", "%s%s", report.summary(),
                   (": unplug " + ", ".join(report.unplug_first) + " first") if report.unplug_first
                   and not report.cannot_unplug else "", owner=owner, action="migrate-check",
                   result="blocked" if report.blocked else "ok")
        return {"migration": report.to_json()}
