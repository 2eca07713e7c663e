"""The daemon: Engine + socket API + libvirt events + reconciliation, wired once.

Threads and who may call what:

* socket requests (one thread each, :mod:`hostdevd.doors.api`) run the ``op_*``
  methods: each parses, makes one engine call and replies. ``prepare``/``release`` coming from libvirt's hook never call
  libvirt: libvirt holds that domain's job until the hook returns, so asking
  it about the domain would deadlock (R9). They use the XML they carry.
* the libvirt event loop thread (:mod:`hostdevd.adapters.libvirt_events`) only queues
  work; a single worker thread (:mod:`hostdevd.doors.events`) runs it, calling libvirt *without* holding any
  hostdevd lock, then acting under the domain's gate.
* :class:`~hostdevd.doors.gate.DomainGate` orders the two: every request marks its domain busy and
  bumps a generation; an event handler snapshots the generation while the
  domain is idle, asks libvirt, and acts only if nothing happened to the
  domain meanwhile (otherwise it looks again). A stale STOPPED event can so
  never release the claims of a domain that was started again. An event for
  a busy domain does not wait in the worker: the gate queues it again when
  the domain's last request ends.

* the udev monitor thread (:mod:`hostdevd.adapters.udev`) only queues PCI
  uevents for the same worker (bind/unbind ``DRIFT_GRACE`` seconds late);
  the handler judges a device under its group lock.
* ``attach``/``detach`` (hostdevctl, :mod:`hostdevd.doors.hotplug`) hold the domain's gate for the whole
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
import threading
from datetime import UTC, datetime
from typing import Any

from .. import __version__
from ..core.address import PciAddress
from ..core.config import Config
from ..core.domxml import guest_placements, parse_domain
from ..core.engine import DomainPrepare, Engine, request_extras
from ..core.errors import BadRequest, HostdevError, LibvirtFailure, LibvirtUnavailable
from ..core.ledger import Owner
from ..core.logfields import log_action
from ..core.opstate import DaemonFacts, OpState, op_state
from ..core.pci_events import PciEvent
from ..core.reservations import ReservationReport
from ..core.sriov import SriovReport
from . import api
from .api import ApiServer, Dispatcher, Peer
from .events import DRIFT_GRACE, EventWorker
from .gate import DomainGate
from .hotplug import Hotplug, hostdev_xml
from .metrics import Metrics, MetricsServer, parse_listen
from .ports import LibvirtAdapter
from .translate import norm_uuid, request_devices, request_owner
from .wire import socket_path

__all__ = ["DRIFT_GRACE", "Daemon", "DomainGate", "LibvirtAdapter", "hostdev_xml", "norm_uuid"]

log = logging.getLogger("hostdevd.service")


def utcnow() -> datetime:
    return datetime.now(UTC)


class Daemon:
    def __init__(self, config: Config | None = None, engine: Engine | None = None,
                 adapter: LibvirtAdapter | None = None, *, sock_path: str | None = None,
                 read_timeout: float = 30.0, allowed_uids: set[int] | None = None, udev: Any = None):
        self.config = config or (engine.config if engine else Config())
        self.engine = engine or Engine(self.config)
        self.adapter = adapter
        self.gate = DomainGate()
        # Prometheus metrics (doors/metrics.py): counted from the start, served over HTTP only when
        # [metrics] listen is set (start()), and always over the socket (op metrics).
        self.metrics = Metrics(self.metrics_state, process=True)
        if self.metrics.recorder is not None:
            self.engine.telemetry.install(self.metrics.recorder)
        self.metrics_server: MetricsServer | None = None
        self.metrics_error: str | None = None
        self.dispatcher = Dispatcher(self, telemetry=self.engine.telemetry)
        self.server = ApiServer(sock_path or socket_path(self.config.runtime_dir), self.dispatcher,
                                read_timeout=read_timeout, allowed_uids=allowed_uids)
        self.worker = EventWorker(self.engine, self.gate, adapter)
        self.hotplug = Hotplug(self.engine, self.gate, adapter, self.config.detach_timeout) \
            if adapter is not None else None
        self.udev = udev                 # the udev door (R10); the worker's handler decides
        self.udev_watching = False
        self.sriov: SriovReport | None = None
        self.reservations: ReservationReport | None = None
        self.started_at = utcnow().isoformat(timespec="seconds")
        self._lv_lock = threading.Lock()
        self._lv_connected = False
        self._lv_since: str | None = None
        self._lv_reason: str | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Check the ledger, finish interrupted work, then serve the socket and watch libvirt.

        A damaged ledger falls back to its previous generation (ledger.json.bak); with no
        readable generation the daemon serves read-only (status works, every change is
        refused) rather than start from an empty ledger: running without knowing what
        hostdevd bound earlier is how original drivers get lost.
        """
        self.engine.store.recover()
        if self.engine.store.read_only is None:
            self.worker.recorded(self.engine.reconcile(None))   # crash recovery needs no libvirt
            # Reservations are bound before the socket serves and before READY=1, so before
            # libvirtd (ordered after hostdevd) autostarts any domain.
            # SR-IOV first: a reserved device may be a VF that only exists once its PF has VFs.
            self.sriov = self.engine.apply_sriov_config()
            self.reservations = self.engine.apply_reservations()
        self.worker.start()
        if self.udev is not None:
            self.udev_watching = self.udev.start(self.worker.on_pci_event)
        self.worker.pci.scan()                  # drift that happened while hostdevd was not running
        try:
            self.server.start()
        except Exception:
            self.worker.stop()
            raise
        if self.adapter is not None:
            self.adapter.start(self)
        self._serve_metrics()
        log_action(log, logging.INFO, "daemon", "hostdevd %s started (socket %s, libvirt %s)", __version__,
                   self.server.path, self.adapter.uri if self.adapter else "not used", action="start",
                   result="ok")

    def _serve_metrics(self) -> None:
        """HTTP /metrics when configured. A listener that cannot bind is logged and said in
        ``status``, and the daemon runs on: metrics are no reason to refuse domain starts."""
        listen = self.config.metrics.listen
        if not listen:
            return
        try:
            self.metrics_server = MetricsServer(self.metrics.registry, *parse_listen(listen))
        except OSError as e:
            self.metrics_error = f"cannot listen on {listen}: {e.strerror or e}"
            log_action(log, logging.ERROR, "daemon", "metrics: %s (the unit allows only AF_UNIX and AF_NETLINK "
                       "unless a drop-in adds AF_INET/AF_INET6; README \"Metrics\")", self.metrics_error,
                       action="metrics", result="failed")
            return
        log.info("serving metrics on http://%s/metrics", listen)

    def metrics_state(self) -> OpState:
        """What the state families count, read now: the topology and ledger ``status`` reads."""
        facts = DaemonFacts(libvirt=self._libvirt_state(), drift=len(self.worker.pci.drift()),
                            udev_watching=bool(self.udev is not None and getattr(self.udev, "watching", False)),
                            read_only=self.engine.store.read_only is not None)
        return op_state(self.engine.topology(with_critical=False), self.engine.ledger(), facts)

    def _libvirt_state(self) -> str:
        if self.adapter is None:
            return "not used"
        return "connected" if self.libvirt_connected else "disconnected"

    def stop(self, drain_timeout: float = 20.0) -> None:
        """Stop serving; never rebinds anything (host shutdown keeps devices where they are)."""
        if self.metrics_server is not None:
            with contextlib.suppress(Exception):
                self.metrics_server.stop()
        drained = self.server.stop(drain_timeout)
        if self.adapter is not None:
            with contextlib.suppress(Exception):
                self.adapter.stop()
        if self.udev is not None:
            with contextlib.suppress(Exception):
                self.udev.stop()
        self.worker.stop()
        with self.engine.store.locked():
            claims = len(self.engine.ledger().claims)   # no transaction is half written
        log_action(log, logging.INFO, "daemon", "hostdevd stopped%s; %s claims kept in the ledger",
                   "" if drained else " (requests still running were abandoned)", claims, action="stop",
                   result="ok" if drained else "abandoned")

    def healthy(self) -> bool:
        """For the watchdog: the socket server and the event worker are both alive."""
        adapter_ok = getattr(self.adapter, "healthy", True) if self.adapter is not None else True
        udev_ok = getattr(self.udev, "healthy", True) if self.udev is not None else True
        return self.server.alive and self.worker.alive and bool(adapter_ok) and bool(udev_ok)

    def status_line(self) -> str:
        """systemd's STATUS=; it starts with "read-only" while no ledger generation is readable."""
        try:
            claims: int | str = len(self.engine.ledger().claims)
        except HostdevError:
            claims = "?"
        lv = ("libvirt connected" if self.libvirt_connected else
              "libvirt not used" if self.adapter is None else "libvirt disconnected")
        line = f"{claims} claims, {lv}, {self.server.served} requests served"
        if self.engine.store.read_only is not None:
            line = f"read-only (the ledger is damaged, no generation readable; new claims refused, see " \
                   f"`hostdevctl check`): {lv}, {self.server.served} requests served"
        return line

    @property
    def libvirt_connected(self) -> bool:
        with self._lv_lock:
            return self._lv_connected

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Tests: wait until every queued event has been handled."""
        return self.worker.wait_idle(timeout)

    # ------------------------------------------------------------------ libvirt callbacks (event loop thread)
    def on_libvirt_connected(self) -> None:
        with self._lv_lock:
            self._lv_connected, self._lv_since, self._lv_reason = True, utcnow().isoformat(timespec="seconds"), None
        log_action(log, logging.INFO, "daemon", "connected to libvirt at %s", self.adapter.uri if self.adapter
                   else "-", action="connect", result="ok")
        self.worker.submit("reconcile after connect", self.worker.reconcile_now)

    def on_libvirt_disconnected(self, reason: str) -> None:
        with self._lv_lock:
            self._lv_connected, self._lv_since, self._lv_reason = False, utcnow().isoformat(timespec="seconds"), reason
        log_action(log, logging.WARNING, "daemon", "lost the libvirt connection (%s); serving from the ledger "
                   "and reconnecting", reason, action="disconnect", result=reason)

    def on_domain_event(self, name: str, uuid: str | None, kind: str, detail: str | None = None) -> None:
        log.debug("domain %s %s (%s)", name, kind, detail)
        self.worker.on_domain_event(name, norm_uuid(uuid), kind)

    def on_device_event(self, name: str, uuid: str | None, kind: str, alias: str | None = None) -> None:
        uuid = norm_uuid(uuid)
        if self.hotplug is not None:
            self.hotplug.events.record(name, kind, alias)
        if kind == "removal_failed":
            log_action(log, logging.WARNING, "hotplug", "the guest did not release device %s of %s "
                       "(DEVICE_REMOVAL_FAILED); its group stays claimed", alias, name,
                       owner=Owner(name=name, uuid=uuid), action="detach", result="removal-failed")
        elif kind in ("added", "removed"):
            self.worker.on_device_change(name, uuid, kind, alias)

    def on_pci_event(self, ev: PciEvent) -> None:
        self.worker.on_pci_event(ev)

    # ------------------------------------------------------------------ helpers
    def _resolve(self, ref: api.DomainRef) -> tuple[Owner, bool | None]:
        """Name + uuid (+ running?) of a domain named by a CLI request; never used for hook requests."""
        if self.adapter is None or not self.libvirt_connected:
            return Owner(name=ref.name, uuid=norm_uuid(ref.uuid)), None
        found = self.adapter.lookup(ref.name, ref.uuid)
        if found is None:
            raise LibvirtFailure(f"libvirt has no domain {ref.name!r}", "check the name with `virsh list --all`")
        name, uuid, active = found
        return Owner(name=name, uuid=norm_uuid(uuid)), active

    def _need_hotplug(self, op: str) -> Hotplug:
        if self.hotplug is None or not self.libvirt_connected:
            uri = self.adapter.uri if self.adapter is not None else self.config.libvirt_uri
            raise LibvirtUnavailable(f"{op} needs libvirt, and hostdevd is not connected to {uri}",
                                     "is libvirtd (virtqemud) running? hostdevd reconnects by itself")
        return self.hotplug

    def _network_lookup(self):
        """libvirt's network XML for hostdev-network pools, through the network driver (not the
        domain's: a hook request must not ask libvirt about its own domain, R9)."""
        if self.adapter is None or not self.libvirt_connected or not hasattr(self.adapter, "network_xml"):
            return None
        return self.adapter.network_xml

    # ------------------------------------------------------------------ ops: parse, one engine call, reply
    def op_ping(self, req: api.PingRequest, peer: Peer) -> dict:
        return {"version": __version__, "pid": os.getpid()}

    def op_status(self, req: api.StatusRequest, peer: Peer) -> dict:
        ledger = self.engine.ledger()
        with self._lv_lock:
            lv: dict[str, Any] = {"connected": self._lv_connected, "since": self._lv_since,
                                  "reason": self._lv_reason}
        if self.adapter is None:
            lv.update(state="not used", uri=None)
        else:
            lv.update(state="connected" if lv["connected"] else "disconnected", uri=self.adapter.uri)
        return {
            "daemon": {"version": __version__, "pid": os.getpid(), "started": self.started_at,
                       "libvirt": lv, "requests_served": self.server.served, **self.worker.state()},
            "ledger": self.engine.store.state(),
            "claims": [c.model_dump() for _, c in sorted(ledger.claims.items(), key=lambda kv: int(kv[0]))],
            "reservations": list(ledger.reservations),
            "drift": self.worker.pci.drift(),
            "udev": {"watching": bool(self.udev is not None and getattr(self.udev, "watching", False)),
                     "error": getattr(self.udev, "error", None) if self.udev is not None else "not used",
                     **self.worker.pci.state()},
            "metrics": {"listen": self.config.metrics.listen or None,
                        "port": self.metrics_server.port if self.metrics_server is not None else None,
                        "error": self.metrics_error},
            "topology": self.engine.topology_mode(udev=bool(self.udev is not None
                                                            and getattr(self.udev, "watching", False))),
        }

    def op_metrics(self, req: api.MetricsRequest, peer: Peer) -> dict:
        """The exposition text, for ``hostdevctl metrics`` (what HTTP /metrics serves)."""
        return {"text": self.metrics.text()}

    def op_prepare(self, req: api.PrepareRequest, peer: Peer) -> dict:
        # Hook requests (origin "hook") must not call libvirt about their domain: nothing below does.
        parsed, addrs = request_devices(req.xml, req.addresses, fragment=False)
        owner = request_owner(req.domain, parsed)
        with self.gate.request(owner.name):
            done = self.engine.prepare_domain(DomainPrepare(
                owner, addrs, parsed, phase=req.phase, origin=req.origin, networks=self._network_lookup(),
                serialize=lambda: self.gate.lock(owner.name)))
        return done.to_json()

    def op_release(self, req: api.ReleaseRequest, peer: Peer) -> dict:
        parsed = parse_domain(req.xml) if req.xml is not None else None
        owner = request_owner(req.domain, parsed)
        addrs = [PciAddress.parse(a) for a in req.addresses] if req.addresses is not None else None
        with self.gate.request(owner.name), self.gate.lock(owner.name):
            return self.engine.release_domain(owner, addrs).to_json()

    def op_plan(self, req: api.PlanRequest, peer: Peer) -> dict:
        owner = Owner(**req.owner.model_dump())
        parsed, addrs = request_devices(req.xml, req.addresses, fragment=False)
        plan = self.engine.plan_for(req.action, owner, addrs, everything=not (req.xml or req.addresses),
                                    driver_models=parsed.driver_models() if parsed is not None else None,
                                    guest=parsed.numa if parsed is not None else None)
        return {"plan": plan.to_json(), **request_extras(parsed)}

    def op_vfs_set(self, req: api.VfsSetRequest, peer: Peer) -> dict:
        """``hostdevctl vfs set`` through the daemon: its group locks cover the VFs' groups."""
        return {"vfs": self.engine.vfs_set(req.pf, req.numvfs, req.autoprobe, req.wait_timeout).to_json()}

    def op_attach(self, req: api.AttachRequest, peer: Peer) -> dict:
        parsed, addrs = request_devices(req.xml, req.addresses, fragment=True)
        if not addrs:
            raise BadRequest("attach: the XML names no PCI host device")
        with self.engine.telemetry.timed("attach"):
            hotplug = self._need_hotplug("attach")
            owner, active = self._resolve(req.domain)
            return hotplug.attach(owner, active, parsed, addrs, req.xml, bool(req.live), bool(req.config))

    def op_detach(self, req: api.DetachRequest, peer: Peer) -> dict:
        _, addrs = request_devices(req.xml, req.addresses, fragment=True)
        if not addrs:
            raise BadRequest("detach: the XML names no PCI host device")
        with self.engine.telemetry.timed("detach"):
            hotplug = self._need_hotplug("detach")
            owner, active = self._resolve(req.domain)
            return hotplug.detach(owner, active, addrs, req.xml, bool(req.live), bool(req.config), req.timeout)

    def op_migrate_check(self, req: api.MigrateCheckRequest, peer: Peer) -> dict:
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
        ledger_only = req.xml is None and source == "ledger" and req.origin != "hook"
        return {"migration": self.engine.migration_report(owner, placement, source, running=running,
                                                          ledger_only=ledger_only).to_json()}
