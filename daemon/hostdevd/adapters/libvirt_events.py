"""The libvirt adapter: connection, event loop, lifecycle and device events.

The only module besides ``daemon_main`` that imports ``libvirt``. It

* registers libvirt's default event loop implementation once per process and
  runs it in a daemon thread;
* opens the URI, registers the close callback, lifecycle events (defined,
  undefined, started, stopped, shutdown, crashed) and device events (added,
  removed, removal failed), and a keepalive where the driver supports it;
* reconnects with exponential backoff (0.5 s doubling, capped at 30 s) when
  libvirtd goes away, telling the sink ``on_libvirt_disconnected`` and, once
  back, ``on_libvirt_connected`` (the daemon then reconciles);
* answers the daemon's few questions (running domains and their XML, is a
  domain active, attach/detach a device).

Callbacks run on the event loop thread and only hand the event to the sink,
which queues it: nothing slow or blocking happens on that thread. The
adapter is never used to serve a hook request (R9): the daemon's hook path
uses only the XML it receives.
"""
from __future__ import annotations

import logging
import threading
from typing import Any

import libvirt

from ..core.errors import LibvirtFailure, LibvirtUnavailable

log = logging.getLogger("hostdevd.libvirt")

BACKOFF_INITIAL = 0.5
BACKOFF_CAP = 30.0
KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 3

LIFECYCLE = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: "defined",
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "undefined",
    libvirt.VIR_DOMAIN_EVENT_STARTED: "started",
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "suspended",
    libvirt.VIR_DOMAIN_EVENT_RESUMED: "resumed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped",
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: "pmsuspended",
    libvirt.VIR_DOMAIN_EVENT_CRASHED: "crashed",
}
STOPPED_DETAIL = {
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED: "destroyed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_MIGRATED: "migrated",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SAVED: "saved",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED: "failed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_FROM_SNAPSHOT: "from snapshot",
}
CLOSE_REASON = {
    libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "error",
    libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "libvirtd closed the connection",
    libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "keepalive timeout",
    libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "closed by hostdevd",
}

_loop_lock = threading.Lock()
_loop_thread: threading.Thread | None = None


def _ignore_errors(_ctx: Any, _err: Any) -> None:
    """libvirt prints every error to stderr by default; hostdevd logs what matters itself."""


def ensure_event_loop() -> threading.Thread:
    """Register the default event implementation (once per process) and run it in a thread."""
    global _loop_thread
    with _loop_lock:
        if _loop_thread is None or not _loop_thread.is_alive():
            libvirt.registerErrorHandler(_ignore_errors, None)
            libvirt.virEventRegisterDefaultImpl()

            def run() -> None:
                while True:
                    try:
                        libvirt.virEventRunDefaultImpl()
                    except Exception:  # keep the loop alive whatever a callback does
                        log.exception("libvirt event loop iteration failed")

            _loop_thread = threading.Thread(target=run, name="libvirt-event-loop", daemon=True)
            _loop_thread.start()
        return _loop_thread


def _error(e: Exception) -> str:
    msg = e.get_error_message() if isinstance(e, libvirt.libvirtError) else str(e)
    return " ".join(str(msg or e).split())


class LibvirtEvents:
    """One libvirt connection that comes back by itself; see the module docstring."""

    def __init__(self, uri: str = "qemu:///system", *, backoff_initial: float = BACKOFF_INITIAL,
                 backoff_cap: float = BACKOFF_CAP):
        self.uri = uri
        self.backoff_initial = backoff_initial
        self.backoff_cap = backoff_cap
        self.sink: Any = None
        self._conn: libvirt.virConnect | None = None
        self._callbacks: list[int] = []
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: threading.Thread | None = None
        self.connects = 0
        self.last_error: str | None = None
        self.next_delay = backoff_initial

    # ------------------------------------------------------------------ lifecycle
    def start(self, sink: Any) -> None:
        self.sink = sink
        self._loop = ensure_event_loop()
        self._thread = threading.Thread(target=self._run, name="libvirt-connect", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)
        self._drop(close=True)

    @property
    def connected(self) -> bool:
        with self._lock:
            return self._conn is not None

    @property
    def healthy(self) -> bool:
        return self._loop is None or self._loop.is_alive()

    def state(self) -> dict:
        return {"uri": self.uri, "connected": self.connected, "connects": self.connects,
                "last_error": self.last_error}

    def _run(self) -> None:
        delay = self.backoff_initial
        while not self._stopping.is_set():
            if self.connected:
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                self._open()
            except libvirt.libvirtError as e:
                self.last_error = _error(e)
                level = logging.WARNING if delay == self.backoff_initial else logging.DEBUG
                log.log(level, "cannot connect to libvirt at %s: %s; retrying in %.1f s", self.uri,
                        self.last_error, delay)
                self.next_delay = delay
                self._wake.wait(delay)
                self._wake.clear()
                delay = min(self.backoff_cap, delay * 2)
                continue
            delay = self.backoff_initial
            self.next_delay = delay
            self.connects += 1
            try:
                self.sink.on_libvirt_connected()
            except Exception:
                log.exception("connected callback failed")

    def _open(self) -> None:
        conn = libvirt.open(self.uri)
        try:
            conn.setKeepAlive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
        except libvirt.libvirtError:
            pass                         # local drivers (test:///, qemu:///embed) have no keepalive
        ids = []
        try:
            conn.registerCloseCallback(self._on_close, None)
        except libvirt.libvirtError:
            pass                         # not supported by in-process drivers; they never close
        try:
            ids.append(conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                                   self._on_lifecycle, None))
            for event_id, kind in ((libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED, "added"),
                                   (libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, "removed"),
                                   (libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVAL_FAILED, "removal_failed")):
                ids.append(conn.domainEventRegisterAny(None, event_id, self._on_device, kind))
        except libvirt.libvirtError:
            for i in ids:
                try:
                    conn.domainEventDeregisterAny(i)
                except libvirt.libvirtError:
                    pass
            conn.close()
            raise
        with self._lock:
            self._conn = conn
            self._callbacks = ids
        self.last_error = None

    def _drop(self, close: bool) -> None:
        with self._lock:
            conn, ids = self._conn, self._callbacks
            self._conn, self._callbacks = None, []
        if conn is None:
            return
        for i in ids:
            try:
                conn.domainEventDeregisterAny(i)
            except libvirt.libvirtError:
                pass
        try:
            conn.unregisterCloseCallback()
        except libvirt.libvirtError:
            pass
        if close:
            try:
                conn.close()
            except libvirt.libvirtError:
                pass

    def lost(self, reason: str) -> None:
        """The connection is gone (close callback, or a call found it dead): reconnect."""
        if not self.connected:
            return
        self._drop(close=True)
        self.last_error = reason
        if not self._stopping.is_set():
            try:
                self.sink.on_libvirt_disconnected(reason)
            except Exception:
                log.exception("disconnected callback failed")
        self._wake.set()

    # ------------------------------------------------------------------ callbacks (event loop thread)
    def _on_close(self, conn: Any, reason: int, opaque: Any) -> None:
        # Never close the connection from inside its own close callback: hand it to the connect thread.
        why = CLOSE_REASON.get(reason, f"reason {reason}")
        threading.Thread(target=self.lost, args=(why,), name="libvirt-lost", daemon=True).start()

    def _on_lifecycle(self, conn: Any, dom: Any, event: int, detail: int, opaque: Any) -> None:
        kind = LIFECYCLE.get(event, f"event {event}")
        why = STOPPED_DETAIL.get(detail) if event == libvirt.VIR_DOMAIN_EVENT_STOPPED else str(detail)
        try:
            self.sink.on_domain_event(dom.name(), dom.UUIDString(), kind, why)
        except Exception:
            log.exception("lifecycle callback failed")

    def _on_device(self, conn: Any, dom: Any, alias: str, kind: str) -> None:
        try:
            self.sink.on_device_event(dom.name(), dom.UUIDString(), kind, alias)
        except Exception:
            log.exception("device callback failed")

    # ------------------------------------------------------------------ questions
    def _require(self) -> libvirt.virConnect:
        with self._lock:
            conn = self._conn
        if conn is None:
            raise LibvirtUnavailable(f"not connected to libvirt at {self.uri}", "is libvirtd (virtqemud) running?")
        return conn

    def _call(self, what: str, fn):
        """Run ``fn(conn)``; libvirt errors become LibvirtFailure, a dead connection LibvirtUnavailable."""
        conn = self._require()
        try:
            return fn(conn)
        except libvirt.libvirtError as e:
            if not self._alive(conn):
                self.lost(_error(e))
                raise LibvirtUnavailable(f"lost the libvirt connection: {_error(e)}",
                                         "hostdevd reconnects by itself") from None
            raise LibvirtFailure(f"libvirt could not {what}: {_error(e)}") from None

    @staticmethod
    def _alive(conn: Any) -> bool:
        try:
            return bool(conn.isAlive())
        except libvirt.libvirtError:
            return False

    def _domain(self, conn: Any, name: str, uuid: str | None) -> Any:
        try:
            return conn.lookupByUUIDString(uuid) if uuid else conn.lookupByName(name)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise

    def running_domains(self) -> list[tuple[str, str, str]]:
        """(name, uuid, live XML) of every running domain; domains that stop meanwhile are skipped."""
        def run(conn):
            out = []
            for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                try:
                    out.append((dom.name(), dom.UUIDString(), dom.XMLDesc(0)))
                except libvirt.libvirtError as e:
                    if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN and self._alive(conn):
                        log.warning("cannot read the XML of %s: %s", dom.name(), _error(e))
            return out
        return self._call("list the running domains", run)

    def lookup(self, name: str, uuid: str | None = None) -> tuple[str, str, bool] | None:
        def run(conn):
            dom = self._domain(conn, name, uuid)
            return None if dom is None else (dom.name(), dom.UUIDString(), bool(dom.isActive()))
        return self._call(f"look up {name}", run)

    def is_active(self, name: str, uuid: str | None = None) -> bool:
        def run(conn):
            dom = self._domain(conn, name, uuid)
            return bool(dom is not None and dom.isActive())
        return self._call(f"check whether {name} runs", run)

    def network_xml(self, name: str) -> str | None:
        """A libvirt network's XML (the network driver: never the domain a hook request is about);
        None when there is no such network."""
        def run(conn):
            try:
                return conn.networkLookupByName(name).XMLDesc(0)
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_NETWORK:
                    return None
                raise
        return self._call(f"read network {name}", run)

    def domain_xml(self, name: str, uuid: str | None = None) -> str | None:
        """Live XML of a running domain; None when it is not running (or not defined)."""
        def run(conn):
            dom = self._domain(conn, name, uuid)
            if dom is None or not dom.isActive():
                return None
            try:
                return dom.XMLDesc(0)
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return None
                raise
        return self._call(f"read the XML of {name}", run)

    def _device_call(self, what: str, name: str, uuid: str | None, xml: str, config: bool, live: bool) -> None:
        flags = (libvirt.VIR_DOMAIN_AFFECT_LIVE if live else 0) | (libvirt.VIR_DOMAIN_AFFECT_CONFIG if config else 0)

        def run(conn):
            dom = self._domain(conn, name, uuid)
            if dom is None:
                raise LibvirtFailure(f"libvirt has no domain {name!r}")
            (dom.attachDeviceFlags if what == "attach" else dom.detachDeviceFlags)(xml, flags)
        self._call(f"{what} the device {'to' if what == 'attach' else 'from'} {name}", run)

    def attach_device(self, name: str, uuid: str | None, xml: str, config: bool = False, live: bool = True) -> None:
        self._device_call("attach", name, uuid, xml, config, live)

    def detach_device(self, name: str, uuid: str | None, xml: str, config: bool = False, live: bool = True) -> None:
        """Ask libvirt to unplug; returns once QEMU is asked (libvirt waits a few seconds for the
        guest). The device may still be there: DEVICE_REMOVED says when the guest let go."""
        self._device_call("detach", name, uuid, xml, config, live)
