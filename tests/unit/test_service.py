"""The daemon's coordination logic with a fake libvirt adapter: gate, event races, health, stop."""
from __future__ import annotations

import threading
import time

import pytest

from hostdevd.core.address import PciAddress as A
from hostdevd.core.errors import LedgerError, LibvirtFailure, LibvirtUnavailable
from hostdevd.core.ledger import Owner
from hostdevd.doors.api import PrepareRequest, call
from hostdevd.doors.gate import DomainGate
from hostdevd.doors.hotplug import hostdev_xml
from hostdevd.doors.wire import DaemonNotRunning

from .daemon_support import domain_xml, running_daemon, uuid_for

NIC1 = "0000:01:00.0"
VM1 = Owner(name="vm1", uuid=uuid_for(1))


class FakeAdapter:
    """Just enough of LibvirtEvents; ``active``/``xml`` say what "libvirt" reports."""

    uri = "fake:///"

    def __init__(self):
        self.connected = False
        self.active: dict[str, bool] = {}
        self.xml: dict[str, str] = {}
        self.calls: list[str] = []
        self.on_is_active = None
        self.fail_attach: str | None = None
        self.sink = None

    def start(self, sink):
        self.sink = sink
        self.connected = True
        sink.on_libvirt_connected()

    def stop(self):
        self.connected = False

    def running_domains(self):
        self.calls.append("running_domains")
        if not self.connected:
            raise LibvirtUnavailable("down")
        return [(n, uuid_for(1), self.xml[n]) for n, a in self.active.items() if a]

    def lookup(self, name, uuid=None):
        self.calls.append(f"lookup {name}")
        return (name, uuid_for(1), self.active.get(name, False)) if name in self.active else None

    def is_active(self, name, uuid=None):
        self.calls.append(f"is_active {name}")
        if self.on_is_active:
            hook, self.on_is_active = self.on_is_active, None
            hook()
        return self.active.get(name, False)

    def domain_xml(self, name, uuid=None):
        self.calls.append(f"domain_xml {name}")
        return self.xml.get(name) if self.active.get(name) else None

    def attach_device(self, name, uuid, xml, config=False, live=True):
        self.calls.append(f"attach {name}")
        if self.fail_attach:
            raise LibvirtFailure(self.fail_attach)

    def detach_device(self, name, uuid, xml, config=False, live=True):
        self.calls.append(f"detach {name}")


# --------------------------------------------------------------------------- DomainGate


def test_gate_generation_changes_with_every_request():
    gate = DomainGate()
    g0 = gate.wait_idle("a", 1)
    with gate.guard("a", g0) as ok:
        assert ok
    with gate.request("a"):
        assert gate.busy("a") and gate.wait_idle("a", 0.05) is None
    with gate.guard("a", g0) as ok:
        assert not ok, "a request happened since the snapshot"
    with gate.guard("b", 0) as ok:
        assert ok, "other domains are independent"


def test_gate_wait_idle_waits_for_the_request():
    gate = DomainGate()
    entered, release = threading.Event(), threading.Event()

    def req():
        with gate.request("a"):
            entered.set()
            release.wait(5)

    t = threading.Thread(target=req)
    t.start()
    entered.wait(5)
    threading.Timer(0.1, release.set).start()
    t0 = time.monotonic()
    assert gate.wait_idle("a", 5) == 2 and time.monotonic() - t0 >= 0.05
    t.join()


# --------------------------------------------------------------------------- events with a fake libvirt


@pytest.fixture
def fake():
    adapter = FakeAdapter()
    with running_daemon("lab", adapter=adapter) as (d, sim, path):
        assert d.wait_idle()
        yield d, sim, path, adapter


def test_stop_event_retries_when_a_hook_request_slips_in(fake):
    """The domain is restarted (hook prepare) while the handler asks libvirt: look again, keep claims."""
    d, sim, path, adapter = fake
    xml = domain_xml("vm1", VM1.uuid, NIC1)
    assert call(path, {"op": "prepare", "domain": {"name": "vm1"}, "xml": xml})["ok"]
    d.on_domain_event("vm1", VM1.uuid, "stopped", "destroyed")

    def restarted():
        d.op_prepare(PrepareRequest(v=1, op="prepare", xml=xml, origin="hook", domain={"name": "vm1"}), None)
        adapter.active["vm1"] = True

    adapter.on_is_active = restarted
    assert d.wait_idle()
    assert adapter.calls.count("is_active vm1") == 2, adapter.calls
    assert d.engine.ledger().claim_for_group(12) is not None and sim.driver(NIC1) == "vfio-pci"


def test_shutdown_event_keeps_claims_while_qemu_runs(fake):
    d, sim, path, adapter = fake
    d.engine.prepare([A.parse(NIC1)], VM1)
    adapter.active["vm1"] = True
    d.on_domain_event("vm1", VM1.uuid, "shutdown", "finished")
    assert d.wait_idle() and d.engine.ledger().claims
    adapter.active["vm1"] = False
    d.on_domain_event("vm1", VM1.uuid, "stopped", "shutdown")
    assert d.wait_idle() and not d.engine.ledger().claims and sim.driver(NIC1) == "e1000e"


def test_gate_idle_or_later_runs_the_callback_when_the_last_request_ends():
    gate = DomainGate()
    ran: list[str] = []
    assert gate.idle_or_later("a", lambda: ran.append("now?")) == 0 and ran == []   # idle: nothing kept
    with gate.request("a"):
        with gate.request("a"):
            assert gate.idle_or_later("a", lambda: ran.append("later")) is None
        assert ran == [], "one request still serves a"
    assert ran == ["later"] and gate.idle_or_later("a", lambda: None) == 4


def test_a_busy_domain_does_not_hold_up_other_domains_events(fake):
    """vm1's detach waits for its guest (a long request); vm2 stops meanwhile: vm2's devices go
    back at once, and vm1's event runs when its request ends (it used to block the worker)."""
    d, sim, path, adapter = fake
    NIC2 = "0000:04:00.0"                             # the lab's nic2a (group with nic2b)
    vm2 = Owner(name="vm2", uuid=uuid_for(2))
    d.engine.prepare([A.parse(NIC1)], VM1)
    d.engine.prepare([A.parse(NIC2)], vm2)
    entered, release = threading.Event(), threading.Event()

    def long_request():
        with d.gate.request("vm1"):
            entered.set()
            release.wait(10)

    t = threading.Thread(target=long_request)
    t.start()
    assert entered.wait(5)
    d.on_domain_event("vm1", VM1.uuid, "stopped", "destroyed")
    d.on_domain_event("vm2", vm2.uuid, "stopped", "destroyed")
    deadline = time.monotonic() + 5
    while sim.driver(NIC2) != "e1000e" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sim.driver(NIC2) == "e1000e", "vm2's event waited behind vm1's request"
    assert not d.wait_idle(0.2), "vm1's event is still to do"
    assert sim.driver(NIC1) == "vfio-pci" and d.engine.ledger().claims_of(VM1)
    release.set()
    t.join(5)
    assert d.wait_idle() and not d.engine.ledger().claims and sim.driver(NIC1) == "e1000e"


def test_event_without_claims_asks_libvirt_nothing(fake):
    d, sim, path, adapter = fake
    adapter.calls.clear()
    d.on_domain_event("vm9", uuid_for(9), "stopped", "destroyed")
    assert d.wait_idle() and adapter.calls == []


def test_libvirt_lost_while_handling_leaves_it_to_reconcile(fake):
    d, sim, path, adapter = fake
    d.engine.prepare([A.parse(NIC1)], VM1)

    def down(name, uuid=None):
        raise LibvirtUnavailable("gone")

    adapter.is_active = down
    d.on_domain_event("vm1", VM1.uuid, "stopped", "destroyed")
    assert d.wait_idle() and d.engine.ledger().claims, "nothing released on a guess"


def test_worker_survives_a_failing_handler(fake):
    d, sim, path, adapter = fake
    d.worker.submit("boom", lambda: 1 / 0)
    assert d.wait_idle() and d.healthy()
    d.engine.prepare([A.parse(NIC1)], VM1)
    d.on_domain_event("vm1", VM1.uuid, "stopped", "destroyed")
    assert d.wait_idle() and not d.engine.ledger().claims


def test_attach_detach_with_libvirt(fake):
    d, sim, path, adapter = fake
    adapter.active["vm1"] = True
    adapter.xml["vm1"] = domain_xml("vm1", VM1.uuid)
    r = call(path, {"op": "attach", "domain": {"name": "vm1"}, "addresses": [NIC1]})
    assert r["ok"] and r["libvirt_attached"] and adapter.calls[-1] == "attach vm1"
    assert sim.driver(NIC1) == "vfio-pci"
    adapter.xml["vm1"] = domain_xml("vm1", VM1.uuid, NIC1)   # the guest has not let go yet
    r = call(path, {"op": "detach", "domain": {"name": "vm1"}, "addresses": [NIC1], "timeout": 0.2})
    assert r["ok"] and r["pending"] == [NIC1] and sim.driver(NIC1) == "vfio-pci"
    adapter.xml["vm1"] = domain_xml("vm1", VM1.uuid)          # DEVICE_REMOVED
    d.on_device_event("vm1", uuid_for(1), "removed", "hostdev0")
    assert d.wait_idle() and sim.driver(NIC1) == "e1000e" and not d.engine.ledger().claims


def test_attach_failure_keeps_devices_held_before(fake):
    d, sim, path, adapter = fake
    adapter.active["vm1"] = True
    d.engine.prepare([A.parse(NIC1)], Owner(name="vm1", uuid=uuid_for(1)))
    adapter.fail_attach = "guest said no"
    r = call(path, {"op": "attach", "domain": {"name": "vm1"}, "addresses": [NIC1, "0000:02:00.0"]})
    assert r["error"]["code"] == "LIBVIRT" and "guest said no" in r["error"]["message"]
    assert sim.driver(NIC1) == "vfio-pci", "held before the attach: the rollback leaves it"
    assert sim.driver("0000:02:00.0") == "nvme" and list(d.engine.ledger().claims) == ["12"]


def test_hostdev_xml_round_trips():
    from hostdevd.core.domxml import parse_device
    assert parse_device(hostdev_xml(A.parse("0000:0a:1f.7"))).addresses() == [A.parse("0000:0a:1f.7")]


# --------------------------------------------------------------------------- lifecycle


def test_stop_keeps_devices_bound_and_claims_recorded():
    with running_daemon("lab", start=False) as (d, sim, path):
        d.start()
        assert call(path, {"op": "prepare", "domain": {"name": "vm1"}, "addresses": [NIC1]})["ok"]
        d.stop(1)
        assert sim.driver(NIC1) == "vfio-pci" and list(d.engine.ledger().claims) == ["12"]
        with pytest.raises(DaemonNotRunning):
            call(path, {"op": "ping"}, timeout=1)


def test_unreadable_ledger_without_a_good_generation_starts_read_only():
    """Never from an empty ledger: read-only, every change refused (tests/unit/test_storage_faults.py)."""
    with running_daemon("lab", start=False) as (d, sim, path):
        state = d.engine.store.path
        state.parent.mkdir(parents=True, exist_ok=True)
        state.write_text("{broken")
        d.start()
        try:
            assert d.server.alive and d.status_line().startswith("read-only")
            with pytest.raises(LedgerError, match="read-only"):
                d.engine.prepare([A.parse(NIC1)], Owner(name="vm1"))
            assert state.read_text() == "{broken"
        finally:
            d.stop(1)


def test_status_line_and_health(fake):
    d, sim, path, adapter = fake
    assert d.healthy()
    assert d.status_line() == "0 claims, libvirt connected, 0 requests served"
