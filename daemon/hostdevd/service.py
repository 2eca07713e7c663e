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
  never release the claims of a domain that was started again.

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
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, Protocol

from . import __version__
from .address import PciAddress
from .api import ApiServer, BadRequest, Dispatcher, Peer
from .config import Config
from .domxml import DomainRequest, parse_device, parse_domain
from .engine import Engine
from .errors import HostdevError, Refused
from .ledger import Owner
from .logfields import log_action
from .planner import groups_of
from .reservations import apply_reservations
from .reconcile import (ReconcileReport, RunningDomain, adopt_domain, reconcile, release_missing,
                        release_owner)
from .wire import socket_path

log = logging.getLogger("hostdevd.service")

EVENT_IDLE_WAIT = 120.0     # how long an event waits for a domain's requests to finish
EVENT_RETRIES = 5


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
    def attach_device(self, name: str, uuid: str | None, xml: str, config: bool) -> None: ...
    def detach_device(self, name: str, uuid: str | None, xml: str, config: bool) -> None: ...


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


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
            with self._cond:
                self._active[name] -= 1
                if not self._active[name]:
                    del self._active[name]
                self._gen[name] += 1
                self._cond.notify_all()

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
                 read_timeout: float = 30.0, allowed_uids: set[int] | None = None):
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
        self.reservations = apply_reservations(self.engine, self.config.reserve)
        self._worker = threading.Thread(target=self._work, name="events-worker", daemon=True)
        self._worker.start()
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
        return self.server.alive and worker_ok and bool(adapter_ok)

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
        """Fetch from libvirt with no lock held, then act only if the domain stayed untouched."""
        for _ in range(EVENT_RETRIES):
            gen = self.gate.wait_idle(name, EVENT_IDLE_WAIT)
            if gen is None:
                log.warning("%s: %s stayed busy for %s s; handled at the next reconciliation", label, name,
                            EVENT_IDLE_WAIT)
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
        if kind == "removal_failed":
            log.warning("libvirt could not remove device %s from %s; its devices stay claimed", alias, name)
            return
        if kind in ("added", "removed"):
            self._submit(f"device {kind} {alias} {name}",
                         lambda: self._domain_changed(name, uuid, f"device {kind}", received))

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

    def _prepare(self, addrs: list[PciAddress], owner: Owner):
        with self.gate.lock(owner.name):
            try:
                return self.engine.prepare(addrs, owner)
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
            out["warnings"] = [f"interface on network {n.network!r} has no <actual> device in this XML; if it "
                               "is a hostdev network its VF is not checked" for n in parsed.networks]
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
        }

    def op_prepare(self, req, peer: Peer) -> dict:
        # Hook requests (origin "hook") must not call libvirt: nothing below does.
        parsed, addrs = self._devices(req.xml, req.addresses, fragment=False)
        owner = self._owner(req.domain, parsed)
        extras = self._extras(parsed)
        if not addrs:
            return {"owner": owner.model_dump(), "groups": [], "note": "no PCI host device to prepare", **extras}
        t0 = time.monotonic()
        with self.gate.request(owner.name):
            plan, result = self._prepare(addrs, owner)
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

    def op_plan(self, req, peer: Peer) -> dict:
        owner = Owner(**req.owner.model_dump())
        parsed, addrs = self._devices(req.xml, req.addresses, fragment=False)
        if req.action == "prepare":
            plan = self.engine.plan_prepare(addrs, owner)
        else:
            plan = self.engine.plan_release(owner, addrs if (req.xml or req.addresses) else None)
        return {"plan": plan.to_json(), **self._extras(parsed)}

    def op_attach(self, req, peer: Peer) -> dict:
        parsed, addrs = self._devices(req.xml, req.addresses, fragment=True)
        if not addrs:
            raise BadRequest("attach: the XML names no PCI host device")
        owner, active = self._resolve(req.domain)
        xmls = [req.xml] if req.xml is not None else [hostdev_xml(a) for a in addrs]
        with self.gate.request(owner.name):
            held = {a for c in self.engine.ledger().claims_of(owner) for a in c.requested}
            new = [a for a in addrs if str(a) not in held]
            plan, result = self._prepare(addrs, owner)
            reply = {"owner": owner.model_dump(), "groups": result.groups, "plan": plan.to_json(),
                     "result": result.to_json(), "libvirt_attached": False}
            if self.adapter is None or not self.libvirt_connected:
                reply["note"] = "libvirt is not connected: devices prepared, not attached"
                return reply
            if not active:
                reply["note"] = f"{owner.name} is not running: devices prepared, not attached"
                return reply
            done: list[str] = []
            try:
                for xml in xmls:
                    self.adapter.attach_device(owner.name, owner.uuid, xml, req.config)
                    done.append(xml)
            except LibvirtFailure as e:
                problems = []
                for xml in reversed(done):
                    try:
                        self.adapter.detach_device(owner.name, owner.uuid, xml, req.config)
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
                raise
            reply["libvirt_attached"] = True
            return reply

    def op_detach(self, req, peer: Peer) -> dict:
        parsed, addrs = self._devices(req.xml, req.addresses, fragment=True)
        if not addrs:
            raise BadRequest("detach: the XML names no PCI host device")
        owner, active = self._resolve(req.domain)
        xmls = [req.xml] if req.xml is not None else [hostdev_xml(a) for a in addrs]
        pending: list[PciAddress] = []
        with self.gate.request(owner.name):
            detached = False
            if self.adapter is not None and self.libvirt_connected and active:
                for xml in xmls:
                    self.adapter.detach_device(owner.name, owner.uuid, xml, req.config)
                detached = True
                live = self.adapter.domain_xml(owner.name, owner.uuid)
                if live is not None:
                    still = RunningDomain.from_xml(owner.name, owner.uuid, live).addresses
                    pending = [a for a in addrs if a in still]
            now_release = [a for a in addrs if a not in pending]
            result_groups: list[int] = []
            warnings: list[str] = []
            if now_release:
                with self.gate.lock(owner.name):
                    plan, result = self.engine.release(owner, now_release)
                result_groups, warnings = result.groups, plan.warnings
        reply = {"owner": owner.model_dump(), "groups": result_groups, "libvirt_detached": detached,
                 "pending": [str(a) for a in pending], "warnings": warnings}
        if pending:
            reply["note"] = ("the guest has not let go yet; hostdevd releases "
                             f"{', '.join(map(str, pending))} when libvirt reports the device removed")
        return reply
