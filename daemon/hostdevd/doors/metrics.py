"""Prometheus metrics: the door between the core's telemetry and prometheus_client.

Two kinds of families (README "Metrics" lists them all):

* live ones, counted as work happens: :class:`PrometheusRecorder` is the
  :class:`~hostdevd.core.telemetry.Recorder` the daemon installs in its engine (operations and
  their durations, refusals by reason, ledger saves, socket and hook requests, the last
  reconciliation);
* state ones, computed at every scrape by :class:`StateCollector` from a fresh
  :class:`~hostdevd.core.opstate.OpState` (the topology and ledger the socket's ``status``
  reads), so they are never stale.

The daemon serves them over HTTP when ``[metrics] listen`` is set (:class:`MetricsServer`) and
over its socket (op ``metrics``, for ``hostdevctl metrics``); ``hostdevctl metrics --textfile``
writes them for node_exporter's textfile collector (:func:`write_textfile`). Only API that
python3-prometheus-client 0.16 (Debian 12) has is used.
"""
from __future__ import annotations

import logging
import os
import platform
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, make_wsgi_app
from prometheus_client import write_to_textfile as _write_to_textfile
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from .. import __version__
from ..core.errors import REFUSAL_CODES, Reason, UsageError
from ..core.opstate import DRIVER_KINDS, OpState
from ..core.telemetry import OPERATIONS, RESULTS

log = logging.getLogger("hostdevd.metrics")

DEFAULT_PORT = 9477
TEXTFILE = "hostdevd.prom"
OPERATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
HOOK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SAVE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class PrometheusRecorder:
    """The live families, in ``registry``; every label combination that can occur at all is
    created at zero up front (so ``rate()`` and ``increase()`` see the first event)."""

    def __init__(self, registry: CollectorRegistry):
        self.operations = Counter(
            "hostdevd_operations_total", "Operations hostdevd ran, by operation and result (ok, refused, error).",
            ["operation", "result"], registry=registry)
        self.durations = Histogram(
            "hostdevd_operation_duration_seconds", "How long operations took, by operation and result.",
            ["operation", "result"], buckets=OPERATION_BUCKETS, registry=registry)
        self.errors = Counter(
            "hostdevd_operation_errors_total", "Operations that failed, by operation and hostdevd's stable error code.",
            ["operation", "code"], registry=registry)
        self.refusals = Counter(
            "hostdevd_refusals_total", "Requests refused, by reason code (README \"Refusal codes\"; a request "
            "refused for two reasons counts under each).", ["reason"], registry=registry)
        self.ledger_saves = Histogram(
            "hostdevd_ledger_save_duration_seconds", "How long an atomic ledger save took (write, fsync, rename, "
            "directory fsync).", buckets=SAVE_BUCKETS, registry=registry)
        self.ledger_save_errors = Counter(
            "hostdevd_ledger_save_errors_total", "Ledger saves that failed (ENOSPC, EIO, EROFS, EACCES).",
            registry=registry)
        self.requests = Counter(
            "hostdevd_api_requests_total", "Socket requests answered, by op, origin (hook, cli, api) and result.",
            ["op", "origin", "result"], registry=registry)
        self.hook = Histogram(
            "hostdevd_hook_request_duration_seconds", "Time the daemon spent answering libvirt's hook (the "
            "domain's start or stop waits on it), by op and result.", ["op", "result"], buckets=HOOK_BUCKETS,
            registry=registry)
        self.last_reconcile = Gauge(
            "hostdevd_last_reconcile_timestamp_seconds", "When the last reconciliation (start, libvirt "
            "reconnect) finished, in seconds since the epoch; 0 before the first.", registry=registry)
        for op in OPERATIONS:
            for result in RESULTS:
                self.operations.labels(op, result)
        for code in REFUSAL_CODES:
            self.refusals.labels(code)

    # ---- core.telemetry.Recorder
    def operation(self, op: str, result: str, seconds: float, code: str | None) -> None:
        self.operations.labels(op, result).inc()
        self.durations.labels(op, result).observe(seconds)
        if code is not None:
            self.errors.labels(op, code).inc()

    def refused(self, op: str, reasons: Iterable[str]) -> None:
        for reason in reasons:
            self.refusals.labels(reason if reason in REFUSAL_CODES else Reason.REFUSED).inc()

    def ledger_saved(self, seconds: float, ok: bool) -> None:
        if ok:
            self.ledger_saves.observe(seconds)
        else:
            self.ledger_save_errors.inc()

    def request(self, op: str, origin: str, result: str, seconds: float) -> None:
        self.requests.labels(op, origin, result).inc()
        if origin == "hook":
            self.hook.labels(op, result).observe(seconds)

    def reconciled(self, timestamp: float) -> None:
        self.last_reconcile.set(timestamp)


class StateCollector:
    """The state families, computed from ``snapshot()`` at every collect (scrape)."""

    def __init__(self, snapshot: Callable[[], OpState]):
        self.snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        info = InfoMetricFamily("hostdevd_build", "hostdevd's version and the Python it runs on.")
        info.add_metric([], {"version": __version__, "python": platform.python_version()})
        yield info
        up = GaugeMetricFamily("hostdevd_state_ok", "1 when this scrape could read the topology and the ledger; "
                               "0 when it failed (the daemon's journal says why) and the state families are absent.")
        try:
            st = self.snapshot()
        except Exception as e:                  # a scrape must never take the daemon down
            log.warning("metrics: cannot read the host's state: %s", e)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from state_families(st)


def _gauge(name: str, doc: str, labels: list[str], values: Iterable[tuple[list[str], float]]) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=labels)
    for label_values, value in values:
        g.add_metric(label_values, value)
    return g


def state_families(st: OpState) -> Iterator[GaugeMetricFamily]:
    kinds = "driver_kind: vfio (vfio-pci or a variant), host (any other driver, pci-stub included), none"
    yield _gauge("hostdevd_devices", f"PCI devices by the driver they are on now; {kinds}.", ["driver_kind"],
                 (([k], st.devices.get(k, 0)) for k in DRIVER_KINDS))
    yield _gauge("hostdevd_iommu_groups", "IOMMU groups: vfio when every endpoint is on vfio or driverless "
                 "(at least one on vfio), host when an endpoint is on a host driver (or the group holds only "
                 "bridges), none when no endpoint has a driver.", ["driver_kind"],
                 (([k], st.groups.get(k, 0)) for k in DRIVER_KINDS))
    yield _gauge("hostdevd_claims", "Claims on IOMMU groups in the ledger, by state.", ["state"],
                 (([s], n) for s, n in st.claims.items()))
    yield _gauge("hostdevd_claimed_devices", "Devices the ledger's claims hold (companions included).", [],
                 [([], st.claimed_devices)])
    yield _gauge("hostdevd_group_owner", "1 for each claimed IOMMU group: who holds it (owner: the domain's "
                 "name, at most 64 characters; owner_kind: domain, manual or reservation).",
                 ["group", "owner", "owner_kind"], (([str(o.group), o.owner, o.kind], 1) for o in st.owners))
    yield _gauge("hostdevd_sriov_totalvfs", "VFs each SR-IOV PF supports (sriov_totalvfs).", ["pf"],
                 (([v.pf], v.totalvfs) for v in st.vfs))
    yield _gauge("hostdevd_sriov_numvfs", "VFs each SR-IOV PF has enabled (sriov_numvfs).", ["pf"],
                 (([v.pf], v.numvfs) for v in st.vfs))
    yield _gauge("hostdevd_sriov_vfs_assigned", "VFs of each SR-IOV PF that a claim holds.", ["pf"],
                 (([v.pf], v.assigned) for v in st.vfs))
    yield _gauge("hostdevd_drift_devices", "Claimed devices on another driver than the claim says, changed "
                 "behind hostdevd's back (README \"The daemon\", udev).", [], [([], st.drift)])
    yield _gauge("hostdevd_reservations", "Devices reserved by the config's reserve.", [], [([], st.reservations)])
    yield _gauge("hostdevd_daemon_running", "1 when these figures come from the running daemon; 0 when "
                 "hostdevctl computed them without it (no live counters then).", [],
                 [([], 1 if st.daemon is not None else 0)])
    if st.daemon is not None:
        d = st.daemon
        if d.libvirt != "not used":         # --no-libvirt: absent, not an alert
            yield _gauge("hostdevd_libvirt_connected", "1 while the daemon is connected to libvirt, 0 while it "
                         "is not (it reconnects by itself).", [], [([], 1 if d.libvirt == "connected" else 0)])
        yield _gauge("hostdevd_udev_watching", "1 while the daemon watches udev for PCI uevents.", [],
                     [([], 1 if d.udev_watching else 0)])
        yield _gauge("hostdevd_ledger_read_only", "1 when the daemon found no readable ledger generation at "
                     "start and refuses every change.", [], [([], 1 if d.read_only else 0)])


class Metrics:
    """One registry with both kinds of families; the daemon owns one, hostdevctl makes one per run."""

    def __init__(self, snapshot: Callable[[], OpState], *, live: bool = True, process: bool = False):
        self.registry = CollectorRegistry()
        self.recorder = PrometheusRecorder(self.registry) if live else None
        self.registry.register(StateCollector(snapshot))
        if process:
            from prometheus_client import ProcessCollector
            ProcessCollector(registry=self.registry)

    def text(self) -> str:
        return generate_latest(self.registry).decode()


# --------------------------------------------------------------------------- the text, elsewhere


class _ParsedCollector:
    """Families parsed from another process's exposition text (the daemon's, over the socket)."""

    def __init__(self, text: str):
        self.families = list(text_string_to_metric_families(text))

    def collect(self) -> list[Any]:
        return self.families


def registry_from_text(text: str) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(_ParsedCollector(text))
    return registry


def write_textfile(directory: str, registry: CollectorRegistry) -> str:
    """``DIRECTORY/hostdevd.prom``, replaced atomically (a temp file in the same directory, renamed:
    node_exporter reads only ``*.prom`` and never sees half a file)."""
    if not os.path.isdir(directory):
        raise UsageError(f"--textfile {directory}: no such directory",
                         "give node_exporter's --collector.textfile.directory")
    path = os.path.join(directory, TEXTFILE)
    _write_to_textfile(path, registry)
    os.chmod(path, 0o644)        # node_exporter runs as its own user
    return path


# --------------------------------------------------------------------------- HTTP


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9477`` for IPv6) -> (host, port); config.py validated it."""
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics: " + format, *args)


class MetricsServer:
    """``GET /metrics`` (any path answers the same) on ``host:port``, one thread per scrape."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET

        class _Server(ThreadingMixIn, WSGIServer):
            daemon_threads = True
            address_family = family
            allow_reuse_address = True

        self.httpd = make_server(host, port, make_wsgi_app(registry), server_class=_Server, handler_class=_Quiet)
        self.host, self.port = host, self.httpd.server_port
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)
