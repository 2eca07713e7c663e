"""Never wrong about the kernel: claims from an earlier boot, identity checks, prepares that
converge on what sysfs says, releases that read before they write (issue 12, items 1 and 2).

A reboot is a SimKernel built again from the same topology (tests/topologies/lab.json): a new
boot ID, every device on its spec driver, the ledger directory kept.
"""
from __future__ import annotations

import json

from hostdevd.core.address import PciAddress
from hostdevd.core.engine import DomainPrepare
from hostdevd.core.ledger import Owner
from hostdevd.core.states import ClaimState, DeviceState
from hostdevd.sim.simkernel import SimKernel

from .conftest import TOPOLOGIES, load_sim, make_engine

PAIR, PAIR_B = PciAddress.parse("0000:04:00.0"), PciAddress.parse("0000:04:00.1")
VM1 = Owner(name="vm1", uuid="11111111-1111-1111-1111-111111111111")
RESERVE = 'reserve = ["0000:04:00.1"]\n'


def writes(sim: SimKernel, since: int) -> list[str]:
    return [path for path, _ in sim.write_log[since:]]


def prepare(eng, owner, *addrs):
    return eng.prepare_domain(DomainPrepare(owner, list(addrs)))


def test_a_claim_records_the_boot_and_who_each_device_is(tmp_path):
    sim = load_sim("lab")
    eng = make_engine(sim, tmp_path)
    prepare(eng, VM1, PAIR_B)
    claim = eng.ledger().claim_for_device(PAIR)
    assert claim.boot_id == sim.boot_id and claim.boot_id == eng.sysfs.boot_id()
    assert {r.address: (r.vendor_device, r.subsystem) for r in claim.devices} == {
        str(PAIR): ("8086:10d3", eng.sysfs.read_device(PAIR).subsystem),
        str(PAIR_B): ("8086:10d3", eng.sysfs.read_device(PAIR_B).subsystem)}
    assert eng.sysfs.read_device(PAIR).subsystem is not None


def test_after_a_reboot_start_releases_the_stale_claim_without_writing(tmp_path):
    eng = make_engine(load_sim("lab"), tmp_path)
    prepare(eng, VM1, PAIR_B)
    old_boot = eng.ledger().claim_for_device(PAIR).boot_id
    sim2 = load_sim("lab")                                   # the reboot: devices back on e1000e
    eng2 = make_engine(sim2, tmp_path)
    assert sim2.boot_id != old_boot and sim2.driver(PAIR) == sim2.driver(PAIR_B) == "e1000e"
    mark = len(sim2.write_log)
    report = eng2.reconcile(None)                            # the daemon's start, before libvirtd
    assert eng2.ledger().claims == {}
    assert report.released == [{"group": 15, "owner": "vm1", "reason": f"claim from an earlier boot ({old_boot})"}]
    assert writes(sim2, mark) == [], "the devices were on their drivers already: nothing to write"
    # ...and the domain's start (autostart after libvirtd) prepares the whole group afresh.
    prepare(eng2, VM1, PAIR_B)
    assert sim2.driver(PAIR) == sim2.driver(PAIR_B) == "vfio-pci"
    (claim,) = eng2.ledger().claims.values()
    assert claim.boot_id == sim2.boot_id and claim.state == ClaimState.ACTIVE


def test_a_prepare_that_wins_the_race_with_reconciliation_converges(tmp_path):
    """libvirt's hook asks before reconciliation ran: the ledger says active/vfio, the kernel says
    e1000e. Today's bug planned no steps; now every member off vfio-pci is bound again."""
    eng = make_engine(load_sim("lab"), tmp_path)
    prepare(eng, VM1, PAIR_B)
    sim2 = load_sim("lab")
    eng2 = make_engine(sim2, tmp_path)
    done = prepare(eng2, VM1, PAIR_B)
    assert [(s.action, str(s.address)) for s in done.plan.steps if s.action == "bind"] == [
        ("bind", str(PAIR)), ("bind", str(PAIR_B))]
    assert sim2.driver(PAIR) == sim2.driver(PAIR_B) == "vfio-pci"
    claim = eng2.ledger().claim_for_device(PAIR)
    assert claim.boot_id == sim2.boot_id
    assert all(r.state == DeviceState.VFIO and r.bound_by_us and r.original_driver == "e1000e" for r in claim.devices)
    eng2.release_domain(VM1)
    assert sim2.driver(PAIR) == sim2.driver(PAIR_B) == "e1000e" and eng2.ledger().claims == {}


def test_a_reserved_group_is_bound_again_after_a_reboot(tmp_path):
    eng = make_engine(load_sim("lab"), tmp_path, RESERVE)
    eng.apply_reservations()
    sim2 = load_sim("lab")
    eng2 = make_engine(sim2, tmp_path, RESERVE)
    eng2.reconcile(None)                                     # Daemon.start: reconcile, then reservations
    eng2.apply_reservations()
    assert sim2.driver(PAIR) == sim2.driver(PAIR_B) == "vfio-pci"
    (claim,) = eng2.ledger().claims.values()
    assert claim.reserved and claim.owner.kind == "reservation" and claim.boot_id == sim2.boot_id


def test_a_borrowed_reservation_from_an_earlier_boot_is_reserved_afresh(tmp_path):
    eng = make_engine(load_sim("lab"), tmp_path, RESERVE)
    eng.apply_reservations()
    prepare(eng, VM1, PAIR_B)                                # vm1 borrows the reserved group
    assert eng.ledger().claim_for_device(PAIR).owner.name == "vm1"
    sim2 = load_sim("lab")
    eng2 = make_engine(sim2, tmp_path, RESERVE)
    eng2.reconcile(None)
    eng2.apply_reservations()
    (claim,) = eng2.ledger().claims.values()
    assert claim.owner.kind == "reservation" and claim.reserved and claim.boot_id == sim2.boot_id
    assert sim2.driver(PAIR) == sim2.driver(PAIR_B) == "vfio-pci"


def test_a_device_whose_identity_changed_is_reported_and_not_touched(tmp_path):
    eng = make_engine(load_sim("lab"), tmp_path)
    prepare(eng, VM1, PAIR_B)
    spec = json.loads((TOPOLOGIES / "lab.json").read_text())
    for d in spec["devices"]:
        if d["address"] == str(PAIR_B):
            d["device"] = "1533"                             # another card in the slot after the reboot
    sim2 = SimKernel.from_spec(spec)
    eng2 = make_engine(sim2, tmp_path)
    mark = len(sim2.write_log)
    report = eng2.reconcile(None)
    assert writes(sim2, mark) == []
    claim = eng2.ledger().claim_for_device(PAIR)
    assert claim is not None and claim.state == ClaimState.FAILED
    assert any("0000:04:00.1 was 8086:10d3" in c and "is now 8086:1533" in c for c in report.conflicts)
    assert "not touched" in claim.notes[-1]


def test_a_ledger_without_boot_ids_is_not_released_at_start(tmp_path):
    """Claims written before boot IDs existed: no verdict on the boot; the next prepare converges."""
    eng = make_engine(load_sim("lab"), tmp_path)
    prepare(eng, VM1, PAIR_B)
    with eng.store.transaction() as ledger:                  # as the previous version wrote it
        claim = ledger.held(15)
        claim.boot_id = None
        ledger.put(claim)
    eng.reconcile(None)
    assert eng.ledger().claim_for_group(15) is not None


def test_prepare_rebinds_a_held_companion_a_host_driver_took_back(tmp_path):
    """Same boot: someone rebinds the companion by hand; the domain's next prepare moves it back."""
    sim = load_sim("lab")
    eng = make_engine(sim, tmp_path)
    prepare(eng, VM1, PAIR_B)
    sim.write(f"bus/pci/devices/{PAIR}/driver_override", "\n")
    sim.write(f"bus/pci/devices/{PAIR}/driver/unbind", str(PAIR))
    sim.write("bus/pci/drivers_probe", str(PAIR))
    assert sim.driver(PAIR) == "e1000e"
    prepare(eng, VM1, PAIR_B)
    assert sim.driver(PAIR) == "vfio-pci"
    rec = eng.ledger().claim_for_device(PAIR).device(PAIR)
    assert rec.state == DeviceState.VFIO and rec.original_driver == "e1000e"


def test_release_reads_before_it_writes(tmp_path):
    sim = load_sim("lab")
    eng = make_engine(sim, tmp_path)
    prepare(eng, VM1, PAIR_B)
    for a in (PAIR, PAIR_B):                                 # both back on e1000e behind hostdevd's back
        sim.write(f"bus/pci/devices/{a}/driver_override", "\n")
        sim.write(f"bus/pci/devices/{a}/driver/unbind", str(a))
        sim.write("bus/pci/drivers_probe", str(a))
    mark = len(sim.write_log)
    eng.release_domain(VM1)
    assert writes(sim, mark) == [] and eng.ledger().claims == {}
