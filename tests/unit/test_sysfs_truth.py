"""Sysfs is the truth about a device now; the ledger only records what to give back.

Three deciders used to let a device record's state override what sysfs shows: crash recovery
(reconcile), drift (PCI events) and the ledger-only migration verdict. Each test below builds
a claim on the simulated kernel, moves the kernel or crashes the executor where a record lags
behind it, and checks that the decision follows the kernel.
"""
from __future__ import annotations

import contextlib
import logging

import pytest

from hostdevd.core.address import PciAddress as A
from hostdevd.core.domxml import guest_placements
from hostdevd.core.ledger import Owner
from hostdevd.core.migrate import assess
from hostdevd.core.pci_events import PciEventHandler
from hostdevd.core.reconcile import RunningDomain, reconcile
from hostdevd.core.states import DeviceState

from .conftest import load_sim, make_engine
from .daemon_support import vfio_bind_by_hand
from .test_migrate import dom, hd

VM1 = Owner(name="vm1", uuid="00000000-0000-0000-0000-000000000001")
PAIR, PAIR_B = "0000:04:00.0", "0000:04:00.1"      # lab group 15 (e1000e pair)
NIC1 = "0000:01:00.0"                               # lab group 12 (e1000e)


class Crash(BaseException):
    """The daemon died here (the executor's rollback catches Exception only)."""


@pytest.fixture
def sim():
    return load_sim("lab")


@pytest.fixture
def eng(sim, tmp_path):
    return make_engine(sim, tmp_path / "state")


def restart(sim, eng):
    return make_engine(sim, eng.config.state_dir)


def bind_by_hand(sim, addr: str, driver: str) -> None:
    """A host driver takes the device behind hostdevd's back (override cleared, as driverctl does)."""
    sim.write(f"bus/pci/devices/{addr}/driver_override", "\n")
    cur = sim.driver(addr)
    if cur:
        sim.write(f"bus/pci/drivers/{cur}/unbind", addr)
    sim.write(f"bus/pci/drivers/{driver}/bind", addr)


def crash_when_recorded(eng, state: DeviceState) -> None:
    """Kill the executor right after the host changed, before the record saying so is saved."""
    real = eng.executor._set_state

    def set_state(group, addr, **changes):
        if changes.get("state") == state:
            raise Crash(f"{addr} -> {state}")
        return real(group, addr, **changes)
    eng.executor._set_state = set_state


def record(eng, addr: str):
    return eng.ledger().claim_for_device(addr).device(addr)


def adopt_pair(eng) -> None:
    """vm1 runs with PAIR (bound by libvirt); the adopted claim records PAIR_B on e1000e as host."""
    vfio_bind_by_hand(eng, PAIR)
    reconcile(eng, [RunningDomain(VM1.name, VM1.uuid, [A.parse(PAIR)])])
    assert record(eng, PAIR_B).state == DeviceState.HOST


# --------------------------------------------------------------------------- 1. crash recovery


def test_active_claim_whose_bind_finished_but_not_its_record_is_completed(eng, sim):
    eng.prepare([A.parse(PAIR)], VM1)
    bind_by_hand(sim, PAIR_B, "e1000e")              # drift; the next prepare converges on the kernel
    crash_when_recorded(eng, DeviceState.VFIO)
    with pytest.raises(Crash):
        eng.prepare([A.parse(PAIR)], VM1)
    assert (record(eng, PAIR_B).state, sim.driver(PAIR_B)) == ("binding", "vfio-pci")
    fresh = restart(sim, eng)
    report = reconcile(fresh, None)
    assert report.errors == [] and [f["action"] for f in report.finished] == ["completed interrupted bind"]
    rec = record(fresh, PAIR_B)
    assert (rec.state, rec.original_driver, rec.bound_by_us) == ("vfio", "e1000e", True)
    assert fresh.ledger().claim_for_group(15).state == "active"
    fresh.release(VM1)
    assert sim.driver(PAIR) == sim.driver(PAIR_B) == "e1000e"


def test_active_claim_whose_restore_finished_but_not_its_record_is_finished(eng, sim):
    eng.prepare([A.parse(PAIR)], VM1)
    bind_by_hand(sim, PAIR_B, "e1000e")
    sim.set_refuse("vfio-pci")                       # the converging bind fails: rolled back to e1000e
    eng.executor.verify_timeout = 0.2
    crash_when_recorded(eng, DeviceState.HOST)
    with pytest.raises(Crash):
        eng.prepare([A.parse(PAIR)], VM1)
    sim.set_refuse("vfio-pci", None)
    assert (record(eng, PAIR_B).state, sim.driver(PAIR_B)) == ("restoring", "e1000e")
    fresh = restart(sim, eng)
    report = reconcile(fresh, None)
    assert report.errors == [] and [f["action"] for f in report.finished] == ["finished interrupted restore"]
    rec = record(fresh, PAIR_B)
    assert (rec.state, rec.bound_by_us) == ("host", False)
    assert any("finished interrupted restore" in n for n in fresh.ledger().claim_for_group(15).notes)


def test_active_claim_that_sysfs_does_not_show_finished_is_reported_and_left(eng, sim, monkeypatch):
    eng.prepare([A.parse(PAIR)], VM1)
    bind_by_hand(sim, PAIR_B, "e1000e")

    def crash(*_a, **_k):
        raise Crash("before the first sysfs write")
    monkeypatch.setattr(eng.sysfs, "set_driver_override", crash)
    with pytest.raises(Crash):
        eng.prepare([A.parse(PAIR)], VM1)
    monkeypatch.undo()
    report = reconcile(restart(sim, eng), None)
    assert report.finished == []
    [err] = report.errors
    assert "claim is active but devices are in states ['binding', 'vfio']" in err
    assert f"{PAIR_B} recorded binding, on e1000e" in err
    assert record(eng, PAIR_B).state == "binding" and sim.driver(PAIR_B) == "e1000e", "reported, not touched"


def test_active_claim_recorded_on_vfio_is_judged_by_sysfs(eng, sim):
    eng.prepare([A.parse(NIC1)], VM1)
    bind_by_hand(sim, NIC1, "e1000e")                # every record still says vfio
    [err] = reconcile(eng, None).errors
    assert f"{NIC1} recorded vfio, on e1000e" in err
    assert sim.driver(NIC1) == "e1000e" and eng.ledger().claim_for_group(12).state == "active"


def test_active_claims_that_agree_with_sysfs_are_not_locked_or_vetoed(eng, sim):
    eng.prepare([A.parse(PAIR)], VM1)

    @contextlib.contextmanager
    def busy(_name):
        yield False

    report = reconcile(eng, None, guard=busy)
    assert report.skipped == [] and report.errors == [] and report.finished == []


# --------------------------------------------------------------------------- 2. drift


def test_device_of_an_active_claim_off_vfio_is_drift_whatever_its_record(eng, sim, caplog):
    adopt_pair(eng)                                  # PAIR_B recorded host, on e1000e: not viable
    caplog.set_level(logging.WARNING, "hostdevd.udev")
    handler = PciEventHandler(eng)
    entry = handler.check_device(A.parse(PAIR_B))
    assert entry is not None
    assert (entry["driver"], entry["expected"], entry["record"], entry["owner"]) == ("e1000e", "vfio-pci",
                                                                                      "host", "vm1")
    assert [d["address"] for d in handler.drift()] == [PAIR_B]
    assert any("instead of vfio-pci" in r.getMessage() for r in caplog.records)


def test_device_recorded_mid_bind_but_off_vfio_is_drift(eng, sim):
    eng.prepare([A.parse(NIC1)], VM1)
    with eng.store.transaction() as ledger:          # a converging bind's intent, never finished
        claim = ledger.claim_for_group(12)
        claim.device(NIC1).move_to(DeviceState.BINDING)
        ledger.put(claim)
    bind_by_hand(sim, NIC1, "e1000e")
    assert [d["address"] for d in PciEventHandler(eng).scan()] == [NIC1]


def test_device_recorded_as_host_but_on_vfio_is_reported(eng, sim, caplog):
    adopt_pair(eng)
    vfio_bind_by_hand(eng, PAIR_B)                   # the record still says host, on e1000e
    caplog.set_level(logging.WARNING, "hostdevd.udev")
    handler = PciEventHandler(eng)
    entry = handler.check_device(A.parse(PAIR_B))
    assert entry is not None
    assert (entry["driver"], entry["expected"], entry["record"]) == ("vfio-pci", "e1000e", "host")
    assert [d["address"] for d in handler.drift()] == [PAIR_B], "kept although it is on vfio-pci"
    assert any("records it as host on e1000e" in r.getMessage() for r in caplog.records)
    eng.release(VM1)
    assert handler.drift() == []


# --------------------------------------------------------------------------- 3. migration


def test_ledger_only_verdict_reads_the_driver_from_sysfs(eng, sim):
    eng.prepare([A.parse(NIC1)], VM1)
    assert eng.migration_report(VM1, None, "ledger").blocked
    bind_by_hand(sim, NIC1, "e1000e")                # the guest cannot hold it through VFIO any more
    report = eng.migration_report(VM1, None, "ledger")
    [v] = report.devices
    assert not report.blocked and not v.blocks and "on e1000e, not vfio-pci" in v.reason


def test_group_comes_from_the_topology_not_the_record(eng, sim):
    eng.prepare([A.parse(NIC1)], VM1)
    topo = eng.topology()
    topo.get(A.parse(NIC1)).group = 99               # the host now reports another group
    r = assess("vm1", guest_placements(dom(hd(NIC1, "0000:01:00.0"))), eng.ledger().claims_of(VM1), topo)
    assert [v.group for v in r.devices] == [99]
