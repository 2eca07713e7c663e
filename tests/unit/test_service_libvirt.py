"""The daemon against a real libvirt library: the in-process test driver (test:///default).

No libvirtd is involved: the test driver runs inside this process and emits
real lifecycle events through libvirt's default event loop, so the adapter's
registration, the callbacks, the worker and the daemon's reactions are the
production code paths. The kernel is the simulated lab.
"""
from __future__ import annotations

import threading
import time
import uuid as uuidlib

import pytest

from hostdevd.core.errors import LibvirtFailure

libvirt = pytest.importorskip("libvirt")

from hostdevd.adapters.libvirt_events import LibvirtEvents, ensure_event_loop  # noqa: E402
from hostdevd.core.address import PciAddress as A  # noqa: E402
from hostdevd.core.ledger import Owner  # noqa: E402
from hostdevd.doors.api import call  # noqa: E402

from .daemon_support import domain_xml, running_daemon, vfio_bind_by_hand  # noqa: E402

URI = "test:///default"
NIC1 = "0000:01:00.0"       # lab group 12
NVME = "0000:02:00.0"       # lab group 13
PAIR, PAIR_B = "0000:04:00.0", "0000:04:00.1"


def wait_for(pred, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def conn():
    ensure_event_loop()
    c = libvirt.open(URI)
    yield c
    c.close()


class Vm:
    """A domain in the test driver with a unique name."""

    def __init__(self, conn, *addrs: str):
        self.name = f"hd-{uuidlib.uuid4().hex[:8]}"
        self.uuid = str(uuidlib.uuid4())
        self.xml = domain_xml(self.name, self.uuid, *addrs, dtype="test")
        self.dom = conn.defineXML(self.xml)

    @property
    def owner(self) -> Owner:
        return Owner(name=self.name, uuid=self.uuid)

    def hook(self, path: str, op: str) -> dict:
        """What the qemu hook sends for prepare begin / release end."""
        return call(path, {"op": op, "origin": "hook", "domain": {"name": self.name}, "xml": self.xml})

    def cleanup(self) -> None:
        try:
            if self.dom.isActive():
                self.dom.destroy()
            self.dom.undefine()
        except libvirt.libvirtError:
            pass


@pytest.fixture
def vms(conn):
    made: list[Vm] = []

    def make(*addrs: str) -> Vm:
        vm = Vm(conn, *addrs)
        made.append(vm)
        return vm

    yield make
    for vm in made:
        vm.cleanup()


def spy_events(daemon) -> list[tuple]:
    seen: list[tuple] = []
    orig_dom, orig_dev = daemon.on_domain_event, daemon.on_device_event

    def on_domain_event(name, uuid, kind, detail=None):
        seen.append((name, kind, detail))
        orig_dom(name, uuid, kind, detail)

    def on_device_event(name, uuid, kind, alias=None):
        seen.append((name, kind, alias))
        orig_dev(name, uuid, kind, alias)

    daemon.on_domain_event, daemon.on_device_event = on_domain_event, on_device_event
    return seen


@pytest.fixture
def daemon(conn):
    with running_daemon("lab", adapter=LibvirtEvents(URI), start=False) as (d, sim, path):
        events = spy_events(d)
        d.start()
        wait_for(lambda: d.libvirt_connected and d.worker.reconcile_count >= 2 and d.wait_idle(0), what="connect")
        yield d, sim, path, events


# --------------------------------------------------------------------------- events


def test_connected_and_status_says_so(daemon):
    d, sim, path, events = daemon
    st = call(path, {"op": "status"})["daemon"]
    assert st["libvirt"]["connected"] is True and st["libvirt"]["uri"] == URI
    assert st["last_reconcile"]["libvirt"] is True


def test_destroy_without_release_hook_releases_claims(daemon, vms):
    d, sim, path, events = daemon
    vm = vms(PAIR)
    assert vm.hook(path, "prepare")["ok"]
    assert sim.driver(PAIR) == sim.driver(PAIR_B) == "vfio-pci"
    vm.dom.create()
    wait_for(lambda: (vm.name, "started", "0") in events, what="started event")
    d.wait_idle()
    assert d.engine.ledger().claim_for_group(15).owner.same(vm.owner), "started does not disturb a prepared domain"
    vm.dom.destroy()                              # the hook's "release end" never comes
    wait_for(lambda: (vm.name, "stopped", "destroyed") in events, what="stopped event")
    wait_for(lambda: d.engine.ledger().claims == {}, what="claims released")
    assert sim.driver(PAIR) == sim.driver(PAIR_B) == "e1000e"


def test_stop_after_release_hook_is_idempotent(daemon, vms):
    d, sim, path, events = daemon
    vm = vms(NIC1)
    assert vm.hook(path, "prepare")["ok"]
    vm.dom.create()
    vm.dom.destroy()
    assert vm.hook(path, "release")["ok"]
    wait_for(lambda: (vm.name, "stopped", "destroyed") in events, what="stopped event")
    assert d.wait_idle()
    assert d.engine.ledger().claims == {} and sim.driver(NIC1) == "e1000e"


def test_stale_stopped_event_does_not_release_a_restarted_domain(daemon, vms):
    d, sim, path, events = daemon
    vm = vms(NIC1)
    gate = threading.Event()
    # hold the worker so the STOPPED event is handled only after the restart
    d.worker.submit("test: hold the worker", lambda: gate.wait(10))
    assert vm.hook(path, "prepare")["ok"]
    vm.dom.create()
    vm.dom.destroy()
    assert vm.hook(path, "release")["ok"]
    assert vm.hook(path, "prepare")["ok"]         # started again at once
    vm.dom.create()
    wait_for(lambda: [e[1] for e in events if e[0] == vm.name and e[1] in ("started", "stopped")]
             == ["started", "stopped", "started"],
             what="three events")
    gate.set()
    assert d.wait_idle()
    claim = d.engine.ledger().claim_for_group(12)
    assert claim is not None and claim.owner.same(vm.owner) and sim.driver(NIC1) == "vfio-pci"
    # a STOPPED delivered even later than the new claims: libvirt says the domain runs, so keep them
    d.on_domain_event(vm.name, vm.uuid, "stopped", "destroyed")
    assert d.wait_idle()
    assert d.engine.ledger().claim_for_group(12) is not None and sim.driver(NIC1) == "vfio-pci"
    vm.dom.destroy()
    wait_for(lambda: d.engine.ledger().claims == {}, what="release after the real stop")


def test_started_domain_with_unprepared_hostdev_is_adopted(daemon, vms):
    d, sim, path, events = daemon
    vfio_bind_by_hand(d.engine, NIC1)             # libvirt's managed detach, no hook installed
    vm = vms(NIC1)
    vm.dom.create()
    wait_for(lambda: d.engine.ledger().claim_for_group(12) is not None, what="adoption")
    claim = d.engine.ledger().claim_for_group(12)
    assert claim.owner.same(vm.owner) and claim.device(NIC1).original_driver is None
    vm.dom.destroy()
    wait_for(lambda: d.engine.ledger().claims == {}, what="release")
    assert sim.driver(NIC1) == "vfio-pci", "original driver unknown: left on vfio-pci"


def test_device_removed_releases_only_what_the_domain_dropped(daemon, vms):
    d, sim, path, events = daemon
    vm = vms(NIC1)                                 # libvirt's live XML has NIC1 only ...
    assert call(path, {"op": "prepare", "domain": {"name": vm.name, "uuid": vm.uuid},
                       "addresses": [NIC1, NVME]})["ok"]      # ... hostdevd holds NIC1 and NVME
    vm.dom.create()
    wait_for(lambda: (vm.name, "started", "0") in events)
    d.on_device_event(vm.name, vm.uuid, "removed", "hostdev1")   # the test driver cannot hot-unplug
    assert d.wait_idle()
    assert sorted(d.engine.ledger().claims) == ["12"]
    assert sim.driver(NIC1) == "vfio-pci" and sim.driver(NVME) == "nvme"


# --------------------------------------------------------------------------- reconciliation and reconnect


def test_reconcile_at_connect_releases_claims_of_gone_domains(conn):
    with running_daemon("lab", adapter=LibvirtEvents(URI), start=False) as (d, sim, path):
        d.engine.prepare([A.parse(PAIR)], Owner(name="ghost", uuid=str(uuidlib.uuid4())))
        assert sim.driver(PAIR) == "vfio-pci"
        d.start()
        wait_for(lambda: d.worker.reconcile_count >= 2 and d.wait_idle(0), what="reconcile after connect")
        assert d.engine.ledger().claims == {} and sim.driver(PAIR) == "e1000e"
        assert [r["owner"] for r in d.worker.last_reconcile.released] == ["ghost"]


def test_reconcile_at_connect_adopts_running_domain(conn, vms):
    vm = vms(NIC1)
    vm.dom.create()
    with running_daemon("lab", adapter=LibvirtEvents(URI), start=False) as (d, sim, path):
        vfio_bind_by_hand(d.engine, NIC1)
        d.start()
        wait_for(lambda: d.worker.reconcile_count >= 2 and d.wait_idle(0), what="reconcile after connect")
        assert d.engine.ledger().claim_for_group(12).owner.same(vm.owner)
        assert d.worker.last_reconcile.orphans == []


def test_disconnected_daemon_serves_from_ledger_then_reconnects(conn):
    adapter = LibvirtEvents("test:///no/such/file.xml", backoff_initial=0.05, backoff_cap=0.2)
    with running_daemon("lab", adapter=adapter) as (d, sim, path):
        wait_for(lambda: adapter.next_delay >= 0.2, what="backoff to grow to its cap")
        st = call(path, {"op": "status"})["daemon"]["libvirt"]
        assert st["connected"] is False and st["state"] == "disconnected"
        assert call(path, {"op": "prepare", "domain": {"name": "vm1"}, "addresses": [NIC1]})["ok"]
        adapter.uri = URI                           # "libvirtd is back"
        wait_for(lambda: d.libvirt_connected and d.worker.reconcile_count >= 2 and d.wait_idle(0), what="reconnect")
        assert call(path, {"op": "status"})["daemon"]["libvirt"]["connected"] is True
        # libvirt knows no vm1 running: the reconcile after connect released it
        assert d.engine.ledger().claims == {} and sim.driver(NIC1) == "e1000e"


def test_connection_loss_reconnects_and_reconciles(daemon):
    d, sim, path, events = daemon
    adapter = d.adapter
    before = (adapter.connects, d.worker.reconcile_count)
    adapter._on_close(None, libvirt.VIR_CONNECT_CLOSE_REASON_EOF, None)   # what libvirtd's restart triggers
    wait_for(lambda: adapter.connects == before[0] + 1 and d.worker.reconcile_count > before[1] and d.wait_idle(0),
             what="reconnect")
    assert d.libvirt_connected


# --------------------------------------------------------------------------- requests and libvirt


def test_hook_requests_never_call_libvirt(daemon, vms):
    d, sim, path, events = daemon
    calls: list[tuple[str, str]] = []
    for name in ("running_domains", "lookup", "is_active", "domain_xml", "attach_device", "detach_device"):
        orig = getattr(d.adapter, name)

        def spy(*a, _orig=orig, _name=name, **kw):
            calls.append((_name, threading.current_thread().name))
            return _orig(*a, **kw)
        setattr(d.adapter, name, spy)
    vm = vms(PAIR)
    assert vm.hook(path, "prepare")["ok"]
    assert vm.hook(path, "release")["ok"]
    assert [c for c in calls if c[1] == "api-conn"] == []


def test_attach_rolls_back_when_libvirt_refuses(daemon, vms):
    """libvirt 9.0's test driver refuses every attach; 11.3's accepts a live one. Both are asked for
    real, and a refusal is made certain after the group is bound: hostdevd gives it back."""
    d, sim, path, events = daemon
    vm = vms()
    vm.dom.create()
    real = d.adapter.attach_device

    def refuse_after_asking(*a, **kw):
        try:
            real(*a, **kw)
        except LibvirtFailure:
            raise
        assert sim.driver(NIC1) == "vfio-pci"        # bound before libvirt was asked
        raise LibvirtFailure("libvirt could not attach the device: internal error: refused for the test")
    d.adapter.attach_device = refuse_after_asking
    r = call(path, {"op": "attach", "domain": {"name": vm.name}, "addresses": [NIC1]})
    assert r["ok"] is False and r["error"]["code"] == "LIBVIRT", r
    assert _test_driver_cannot_attach(r["error"]["message"]) or "refused for the test" in r["error"]["message"]
    assert d.engine.ledger().claims == {} and sim.driver(NIC1) == "e1000e"


def test_attach_to_unknown_domain_is_refused_before_binding(daemon):
    d, sim, path, events = daemon
    r = call(path, {"op": "attach", "domain": {"name": "no-such-vm"}, "addresses": [NIC1]})
    assert r["error"]["code"] == "LIBVIRT" and "no domain" in r["error"]["message"]
    assert sim.driver(NIC1) == "e1000e"


def _test_driver_cannot_attach(message: str) -> bool:
    """libvirt 9.0's test driver has no device attach ("not supported"); 11.3's has one, without the
    live+config flags hostdevd passes ("unsupported flags")."""
    return "not supported" in message or "unsupported flags" in message


def test_attach_to_stopped_domain_changes_only_its_definition(daemon, vms):
    """virsh's --current: a stopped domain gets the device in its persistent definition and nothing is
    bound (the hook prepares the group at start). The test driver cannot attach at all."""
    d, sim, path, events = daemon
    vm = vms()
    r = call(path, {"op": "attach", "domain": {"name": vm.name}, "addresses": [NIC1]})
    assert r["error"]["code"] == "LIBVIRT" and _test_driver_cannot_attach(r["error"]["message"])
    assert d.engine.ledger().claims == {} and sim.driver(NIC1) == "e1000e"
    r = call(path, {"op": "attach", "domain": {"name": vm.name}, "addresses": [NIC1], "live": True})
    assert r["error"]["code"] == "REFUSED" and "not running" in r["error"]["message"]
