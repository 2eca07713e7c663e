"""udev (R10): PCI add/remove/bind/unbind, without udev.

The handler is fed synthetic :class:`PciEvent` values. Where the events must look like the
kernel's, :class:`Uevents` derives them from the simulated kernel's state after every sysfs
write (a driver change is unbind + bind, a new function is add, a vanished one remove) and
delivers them from another thread, as the udev monitor thread does: hostdevd's own binds are then
judged only after the executor let go of the group lock, and must never count as drift.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time

import pytest

from hostdevd.adapters.udev import UdevWatch
from hostdevd.core.address import PciAddress as A
from hostdevd.core.ledger import Owner
from hostdevd.core.logfields import MSG
from hostdevd.core.pci_events import PciEvent, PciEventHandler
from hostdevd.core.sysfs import Sysfs
from hostdevd.doors.api import call

from .conftest import load_sim, make_engine
from .daemon_support import running_daemon

VM1 = Owner(name="vm1", uuid="00000000-0000-0000-0000-000000000001")
PAIR, PAIR_B = "0000:04:00.0", "0000:04:00.1"      # lab group 15 (e1000e pair)
NIC1 = "0000:01:00.0"                               # lab group 12
PF = "0000:03:00.0"                                 # sriov_pf: I350 PF (igb)


def ev(action: str, addr: str, driver: str | None = None) -> PciEvent:
    return PciEvent(action, A.parse(addr), driver)


def bind_by_hand(sim, addr: str, driver: str) -> None:
    """What `echo BDF > /sys/bus/pci/drivers/<drv>/bind` (or driverctl) does, behind hostdevd's back."""
    sim.write(f"bus/pci/devices/{addr}/driver_override", "\n")
    cur = sim.driver(addr)
    if cur:
        sim.write(f"bus/pci/drivers/{cur}/unbind", addr)
    sim.write(f"bus/pci/drivers/{driver}/bind", addr)


class Uevents:
    """Backend proxy: after each write, the uevents the kernel would send, delivered by a thread."""

    def __init__(self, sim, sink):
        self.inner, self.sink = sim, sink
        self.q: queue.Queue = queue.Queue()
        self.seen: list[PciEvent] = []
        self._state = sim.state()
        self._t = threading.Thread(target=self._deliver, daemon=True)
        self._t.start()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def write(self, rel, data):
        try:
            return self.inner.write(rel, data)
        finally:
            new = self.inner.state()
            for addr in sorted(set(self._state) | set(new)):
                old_drv = self._state[addr][0] if addr in self._state else None
                new_drv = new[addr][0] if addr in new else None
                if addr not in new:
                    self._emit(ev("remove", addr))
                elif addr not in self._state:
                    self._emit(ev("add", addr))
                    if new_drv:
                        self._emit(ev("bind", addr, new_drv))
                elif old_drv != new_drv:
                    if old_drv:
                        self._emit(ev("unbind", addr))
                    if new_drv:
                        self._emit(ev("bind", addr, new_drv))
            self._state = new

    def _emit(self, e: PciEvent) -> None:
        self.seen.append(e)
        self.q.put(e)

    def _deliver(self):
        while True:
            e = self.q.get()
            if e is None:
                return
            self.sink(e)
            self.q.task_done()

    def drain(self):
        self.q.join()


@pytest.fixture
def sim():
    return load_sim("lab")


@pytest.fixture
def eng(sim, tmp_path):
    return make_engine(sim, tmp_path / "state")


@pytest.fixture
def handler(eng):
    return PciEventHandler(eng)


def drift_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "journal", {}).get("MESSAGE_ID") == MSG["drift"]]


# --------------------------------------------------------------------------- events from pyudev


class FakeDevice:
    def __init__(self, action, sys_name, props, seq=7):
        self.action, self.sys_name, self.properties, self.sequence_number = action, sys_name, props, seq


@pytest.mark.parametrize("dev, want", [
    (FakeDevice("bind", "0000:04:00.0", {"DRIVER": "e1000e", "PCI_SLOT_NAME": "0000:04:00.0"}),
     PciEvent("bind", A.parse(PAIR), "e1000e", 7)),
    (FakeDevice("unbind", "0000:04:00.0", {"DRIVER": "e1000e"}), PciEvent("unbind", A.parse(PAIR), None, 7)),
    (FakeDevice("add", "0000:03:10.0", {"PCI_SLOT_NAME": "0000:03:10.0"}, None),
     PciEvent("add", A.parse("0000:03:10.0"))),
    (FakeDevice("remove", "0000:03:10.0", {}), PciEvent("remove", A.parse("0000:03:10.0"), None, 7)),
    (FakeDevice("change", "0000:04:00.0", {}), None),                  # not followed
    (FakeDevice("bind", "pci0000:00", {}), None),                      # the host bridge's bus, not a function
    (FakeDevice("add", "../../etc", {"PCI_SLOT_NAME": "x/../../y"}), None),
])
def test_event_from_udev_device(dev, want):
    assert PciEvent.from_udev(dev) == want


class FakeMonitor:
    def __init__(self, devices):
        self.devices = list(devices)
        self.started = False

    def start(self):
        self.started = True

    def poll(self, timeout=None):
        if self.devices:
            d = self.devices.pop(0)
            if isinstance(d, Exception):
                raise d
            return d
        time.sleep(min(timeout or 0.01, 0.01))
        return None


def test_watch_thread_delivers_events_and_survives_errors():
    got: list[PciEvent] = []
    mon = FakeMonitor([FakeDevice("bind", PAIR, {"DRIVER": "vfio-pci"}), OSError("netlink hiccup"),
                       FakeDevice("change", PAIR, {}), FakeDevice("remove", NIC1, {})])
    w = UdevWatch(lambda: mon, poll_timeout=0.01)
    assert w.start(got.append) and mon.started and w.watching
    deadline = time.monotonic() + 5
    while len(got) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    w.stop()
    assert got == [PciEvent("bind", A.parse(PAIR), "vfio-pci", 7), PciEvent("remove", A.parse(NIC1), None, 7)]
    assert "netlink hiccup" in w.error and w.healthy and not w.watching


def test_watch_without_udev_says_why():
    def broken():
        raise PermissionError("netlink: operation not permitted")
    w = UdevWatch(broken)
    assert w.start(lambda e: None) is False
    assert "operation not permitted" in w.error and w.healthy and not w.watching


def test_real_pyudev_monitor_opens_and_closes():
    pytest.importorskip("pyudev")
    w = UdevWatch(poll_timeout=0.05)
    if not w.start(lambda e: None):
        pytest.skip(f"no udev netlink here: {w.error}")
    assert w.watching
    w.stop()
    assert not w.watching


# --------------------------------------------------------------------------- drift


def test_host_driver_taking_a_claimed_device_is_drift_reported_not_fixed(eng, sim, handler, caplog):
    eng.prepare([A.parse(PAIR)], VM1)
    bind_by_hand(sim, PAIR_B, "e1000e")                 # the companion, behind hostdevd's back
    caplog.set_level(logging.WARNING, "hostdevd.udev")
    handler.handle(ev("unbind", PAIR_B))
    handler.handle(ev("bind", PAIR_B, "e1000e"))
    assert sim.driver(PAIR_B) == "e1000e", "reported, never silently rebound"
    [d] = handler.drift()
    assert (d["address"], d["group"], d["owner"], d["driver"], d["expected"]) == (PAIR_B, 15, "vm1", "e1000e",
                                                                                   "vfio-pci")
    [rec] = drift_records(caplog)                        # once: both events find it on e1000e
    assert rec.journal["HOSTDEV_ADDRESS"] == PAIR_B and rec.journal["IOMMU_GROUP"] == "15"
    assert rec.journal["ACTION"] == "udev-unbind" and rec.journal["RESULT"] == "drift"
    assert "behind hostdevd's back" in rec.getMessage() and "vm1" in rec.getMessage()
    assert eng.ledger().claim_for_group(15).state == "active", "the claim is kept"


def test_drift_is_logged_once_per_change_and_clears_when_fixed(eng, sim, handler, caplog):
    eng.prepare([A.parse(NIC1)], VM1)
    caplog.set_level(logging.WARNING, "hostdevd.udev")
    sim.write("bus/pci/drivers/vfio-pci/unbind", NIC1)
    handler.handle(ev("unbind", NIC1))
    assert handler.drift()[0]["driver"] is None
    handler.handle(ev("unbind", NIC1))                   # the same state again: no new line
    sim.write(f"bus/pci/devices/{NIC1}/driver_override", "\n")
    sim.write("bus/pci/drivers/e1000e/bind", NIC1)
    handler.handle(ev("bind", NIC1, "e1000e"))
    assert [r.journal["ACTION"] for r in drift_records(caplog)] == ["udev-unbind", "udev-bind"]
    sim.write(f"bus/pci/devices/{NIC1}/driver_override", "vfio-pci")   # an operator puts it back
    sim.write("bus/pci/drivers/e1000e/unbind", NIC1)
    sim.write("bus/pci/drivers_probe", NIC1)
    handler.handle(ev("bind", NIC1, "vfio-pci"))
    assert handler.drift() == []


def test_drift_entry_goes_with_the_claim(eng, sim, handler):
    eng.prepare([A.parse(NIC1)], VM1)
    bind_by_hand(sim, NIC1, "e1000e")
    handler.handle(ev("bind", NIC1, "e1000e"))
    assert len(handler.drift()) == 1
    eng.release(VM1)
    assert handler.drift() == []


def test_unclaimed_devices_and_kept_devices_are_not_drift(eng, sim, handler):
    bind_by_hand(sim, NIC1, "e1000e")                    # nobody claims it: none of hostdevd's business
    handler.handle(ev("bind", NIC1, "e1000e"))
    assert handler.drift() == []


def test_scan_finds_drift_that_happened_while_the_daemon_was_down(eng, sim, handler):
    eng.prepare([A.parse(PAIR)], VM1)
    bind_by_hand(sim, PAIR, "e1000e")
    assert [d["address"] for d in handler.scan()] == [PAIR]


@pytest.mark.parametrize("op", ["prepare", "release", "both"])
def test_hostdevds_own_binds_are_never_drift(sim, tmp_path, caplog, op):
    eng = make_engine(sim, tmp_path / "s")
    handler = PciEventHandler(eng)
    events = Uevents(sim, handler.handle)
    eng.sysfs = eng.executor.sysfs = Sysfs(events, 2.0)
    caplog.set_level(logging.WARNING, "hostdevd.udev")
    if op in ("prepare", "both"):
        eng.prepare([A.parse(PAIR)], VM1)
    if op in ("release", "both"):
        if op == "release":
            eng.prepare([A.parse(PAIR)], VM1)
        eng.release(VM1)
    events.drain()
    assert {e.action for e in events.seen} >= {"bind", "unbind"}
    assert handler.drift() == [] and drift_records(caplog) == []


# --------------------------------------------------------------------------- remove


def test_claimed_device_that_vanishes_is_dropped_with_a_log_line(eng, sim, handler, caplog):
    eng.prepare([A.parse(PAIR)], VM1)
    caplog.set_level(logging.INFO, "hostdevd")
    sim.hot_unplug(PAIR_B)
    handler.handle(ev("remove", PAIR_B))
    claim = eng.ledger().claim_for_group(15)
    assert [d.address for d in claim.devices] == [PAIR] and any("vanished" in n for n in claim.notes)
    assert any(r.getMessage().startswith(f"{PAIR_B} is gone from the host") for r in caplog.records)
    sim.hot_unplug(PAIR)
    handler.handle(ev("remove", PAIR))
    assert eng.ledger().claims == {}, "a claim without devices is dropped"
    assert handler.topology_generation == 2


def test_requested_device_vanishing_gives_the_companions_back(eng, sim, handler):
    eng.prepare([A.parse(PAIR)], VM1)
    sim.hot_unplug(PAIR)
    handler.handle(ev("remove", PAIR))
    assert eng.ledger().claims == {}, "a group with only companions left is not held for nothing"
    assert sim.driver(PAIR_B) == "e1000e" and sim.driver_override(PAIR_B) is None


def test_remove_event_for_a_device_still_present_changes_nothing(eng, sim, handler):
    eng.prepare([A.parse(NIC1)], VM1)
    handler.handle(ev("remove", NIC1))                   # a stale or replayed uevent
    assert eng.ledger().claim_for_group(12).device(NIC1) is not None


def test_vanished_device_goes_through_the_group_lock(eng, sim, handler):
    eng.prepare([A.parse(NIC1)], VM1)
    sim.hot_unplug(NIC1)
    done = threading.Event()
    with eng.locks.hold([12]):
        t = threading.Thread(target=lambda: (handler.handle(ev("remove", NIC1)), done.set()))
        t.start()
        assert not done.wait(0.2), "waits for whoever holds group 12"
        assert eng.ledger().claims
    t.join(5)
    assert done.is_set() and eng.ledger().claims == {}


# --------------------------------------------------------------------------- add (new VFs)


def test_new_vfs_refresh_the_topology_and_tell_subscribers(tmp_path, caplog):
    sim = load_sim("sriov_pf")
    eng = make_engine(sim, tmp_path / "s")
    handler = PciEventHandler(eng)
    seen: list[PciEvent] = []
    unsubscribe = handler.subscribe(seen.append)
    events = Uevents(sim, handler.handle)
    caplog.set_level(logging.INFO, "hostdevd.udev")
    events.write(f"bus/pci/devices/{PF}/sriov_numvfs", "2")
    events.drain()
    vfs = sim.vfs(PF)
    assert len(vfs) == 2 and [e.address for e in seen if e.action == "add"] == [A.parse(v) for v in vfs]
    assert handler.topology_generation == 2
    assert any(f"VF {vfs[0]} of {PF} added" in r.getMessage() for r in caplog.records)
    assert {str(a) for a in eng.topology().devices} >= set(vfs), "the topology is read afresh"
    unsubscribe()
    events.write(f"bus/pci/devices/{PF}/sriov_numvfs", "0")
    events.drain()
    assert not [e for e in seen if e.action == "remove"] and handler.topology_generation == 4


def test_a_failing_subscriber_does_not_stop_handling(eng, handler, caplog):
    handler.subscribe(lambda e: 1 / 0)
    handler.handle(ev("add", NIC1))
    assert handler.state()["events"] == {"add": 1}


# --------------------------------------------------------------------------- in the daemon


def test_daemon_reports_drift_in_status_and_journal_fields(caplog):
    with running_daemon("lab") as (d, sim, path):
        d.worker.drift_grace = 0
        assert call(path, {"op": "prepare", "domain": {"name": "vm1"}, "addresses": [NIC1]})["ok"]
        bind_by_hand(sim, NIC1, "e1000e")
        d.on_pci_event(ev("bind", NIC1, "e1000e"))
        assert d.wait_idle()
        st = call(path, {"op": "status"})
        assert [x["address"] for x in st["drift"]] == [NIC1] and st["drift"][0]["driver"] == "e1000e"
        assert st["udev"]["events"] == {"bind": 1} and st["udev"]["watching"] is False
        assert sim.driver(NIC1) == "e1000e"


def test_daemon_judges_bind_events_after_a_grace_period():
    """libvirt's managed reattach rebinds a device just before DEVICE_REMOVED releases its claim."""
    with running_daemon("lab") as (d, sim, path):
        d.worker.drift_grace = 0.3
        assert call(path, {"op": "prepare", "domain": {"name": "vm1"}, "addresses": [NIC1]})["ok"]
        bind_by_hand(sim, NIC1, "e1000e")
        d.on_pci_event(ev("bind", NIC1, "e1000e"))
        assert call(path, {"op": "release", "domain": {"name": "vm1"}})["ok"]     # the claim goes first
        time.sleep(0.5)
        assert d.wait_idle() and call(path, {"op": "status"})["drift"] == []


def test_daemon_finds_drift_at_start():
    with running_daemon("lab", start=False) as (d, sim, path):
        d.engine.prepare([A.parse(NIC1)], VM1)
        bind_by_hand(sim, NIC1, "e1000e")
        d.start()
        assert [x["address"] for x in call(path, {"op": "status"})["drift"]] == [NIC1]


def test_daemon_reserves_new_vfs_matching_the_config(tmp_path):
    sim = load_sim("sriov_pf")
    with running_daemon(sim, start=False) as (d, _, path):
        d.config.reserve = ["8086:1520"]                 # the I350's VFs
        d.start()
        assert d.engine.ledger().claims == {}
        sim.write(f"bus/pci/devices/{PF}/sriov_numvfs", "1")
        vf = sim.vfs(PF)[0]
        d.on_pci_event(ev("add", vf))
        assert d.wait_idle()
        claim = d.engine.ledger().claim_for_device(vf)
        assert claim is not None and claim.reserved and sim.driver(vf) == "vfio-pci"


def test_daemon_with_a_watcher_starts_and_stops_it():
    class Watch:
        watching, error, healthy = False, None, True

        def start(self, sink):
            self.sink, self.watching = sink, True
            return True

        def stop(self):
            self.watching = False

    w = Watch()
    with running_daemon("lab", start=False) as (d, sim, path):
        d.udev = w
        d.worker.drift_grace = 0
        d.start()
        assert d.udev_watching and call(path, {"op": "status"})["udev"]["watching"] is True
        w.sink(ev("add", NIC1))
        assert d.wait_idle() and d.worker.pci.state()["events"] == {"add": 1}
        w.healthy = False
        assert not d.healthy()
        w.healthy = True
        d.stop(1)
    assert not w.watching


def test_hostdevctl_status_shows_drift(tmp_path):
    from hostdevd.doors.cli import main as cli_main

    with running_daemon("lab") as (d, sim, path):
        d.worker.drift_grace = 0
        cfg = tmp_path / "c.toml"
        cfg.write_text(f'state_dir = "{d.engine.config.state_dir}"\nruntime_dir = "{d.engine.config.runtime_dir}"\n')
        assert call(path, {"op": "prepare", "domain": {"name": "vm1"}, "addresses": [NIC1]})["ok"]
        bind_by_hand(sim, NIC1, "e1000e")
        d.on_pci_event(ev("bind", NIC1, "e1000e"))
        assert d.wait_idle()
        lines: list[str] = []
        assert cli_main(["--config", str(cfg), "status"], sysfs=Sysfs(sim, 2.0), out=lines.append) == 0
        assert lines[-1].startswith(f"DRIFT: {NIC1} (group 12, vm1) is on e1000e, not vfio-pci, since ")
        lines.clear()
        assert cli_main(["--config", str(cfg), "status", "--json"], sysfs=Sysfs(sim, 2.0), out=lines.append) == 0
        data = json.loads("".join(lines))
        [drift] = data["drift"]
        assert (drift["address"], drift["driver"], drift["expected"]) == (NIC1, "e1000e", "vfio-pci")
        assert list(data["claims"]) == ["12"]
    # without a daemon the JSON still has the key, empty: drift is only known to a running daemon
    lines = []
    assert cli_main(["--config", str(cfg), "status", "--json"], sysfs=Sysfs(sim, 2.0), out=lines.append) == 0
    assert json.loads("".join(lines))["drift"] == []
