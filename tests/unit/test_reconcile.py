"""Reconciliation (R8): adopt, release the gone, report orphans, finish what a crash left half done.

Crashes are simulated by raising a BaseException at executor step boundaries:
the executor's rollback catches Exception only, so the ledger is left exactly
as a killed daemon leaves it. Then a fresh Engine (a restarted daemon) on the
same simulated kernel and state directory reconciles.
"""
from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from hostdevd.core.address import PciAddress as A
from hostdevd.core.ledger import Owner
from hostdevd.core.reconcile import RunningDomain, adopt_domain, reconcile, release_missing, release_owner

from .conftest import load_sim, make_engine
from .daemon_support import domain_xml, vfio_bind_by_hand

VM1 = Owner(name="vm1", uuid="00000000-0000-0000-0000-000000000001")
VM2 = Owner(name="vm2", uuid="00000000-0000-0000-0000-000000000002")
PAIR, PAIR_B = "0000:04:00.0", "0000:04:00.1"      # lab group 15
NIC1 = "0000:01:00.0"                               # lab group 12
NVME = "0000:02:00.0"                               # lab group 13
LAB_DRIVERS = {PAIR: "e1000e", PAIR_B: "e1000e", NIC1: "e1000e", NVME: "nvme", "0000:0a:00.0": "e1000e"}


class Crash(BaseException):
    """The daemon died here."""


def running(owner: Owner, *addrs: str) -> RunningDomain:
    return RunningDomain(owner.name, owner.uuid, [A.parse(a) for a in addrs])


def assert_no_driver_forgotten(eng, sim) -> None:
    """Every device not on its lab driver is covered by a ledger record naming that driver."""
    ledger = eng.ledger()
    for addr, original in LAB_DRIVERS.items():
        if sim.driver(addr) != original:
            claim = ledger.claim_for_device(addr)
            assert claim is not None, f"{addr} is on {sim.driver(addr)} and the ledger forgot it"
            assert claim.device(addr).original_driver == original


@pytest.fixture
def sim():
    return load_sim("lab")


@pytest.fixture
def eng(sim, tmp_path):
    return make_engine(sim, tmp_path / "state")


def restart(sim, eng):
    return make_engine(sim, eng.config.state_dir)


# --------------------------------------------------------------------------- adopt


def test_adopt_device_already_on_vfio_records_unknown_original(eng, sim):
    vfio_bind_by_hand(eng, NIC1)
    report = reconcile(eng, [running(VM1, NIC1)])
    assert [a["group"] for a in report.adopted] == [12] and report.orphans == []
    claim = eng.ledger().claim_for_group(12)
    rec = claim.device(NIC1)
    assert claim.state == "active" and claim.owner.same(VM1)
    assert (rec.role, rec.state, rec.original_driver, rec.bound_by_us) == ("requested", "vfio", None, False)
    assert any("original driver is unknown" in n for n in claim.notes)
    # at release the device stays on vfio-pci (hostdevd did not bind it, does not know where it came from)
    eng.release(VM1)
    assert sim.driver(NIC1) == "vfio-pci" and eng.ledger().claims == {}


def test_adopt_records_companion_on_host_driver(eng, sim):
    vfio_bind_by_hand(eng, PAIR)
    report = reconcile(eng, [running(VM1, PAIR)])
    claim = eng.ledger().claim_for_group(15)
    assert [a["group"] for a in report.adopted] == [15]
    comp = claim.device(PAIR_B)
    assert (comp.role, comp.state, comp.original_driver) == ("companion", "host", "e1000e")


def test_adopt_is_idempotent_and_respects_existing_claims(eng, sim):
    eng.prepare([A.parse(PAIR)], VM1)
    report = reconcile(eng, [running(VM1, PAIR)])
    assert report.adopted == [] and report.conflicts == [] and report.released == []
    # another domain running with a member of vm1's group is a conflict, never a takeover
    report = reconcile(eng, [running(VM1, PAIR), running(VM2, PAIR_B)])
    assert report.adopted == [] and len(report.conflicts) == 1 and "vm2" in report.conflicts[0]
    assert eng.ledger().claim_for_group(15).owner.same(VM1)


def test_adopt_skips_device_not_on_vfio(eng, sim):
    report = reconcile(eng, [running(VM1, NIC1)])
    assert report.adopted == [] and "not on vfio-pci" in report.skipped[0]
    assert eng.ledger().claims == {}


def test_adopt_promotes_companion_to_requested(eng, sim):
    eng.prepare([A.parse(PAIR)], VM1)
    adopt_domain(eng, running(VM1, PAIR, PAIR_B))
    assert eng.ledger().claim_for_group(15).device(PAIR_B).role == "requested"


def test_running_domain_from_xml():
    dom = RunningDomain.from_xml("vm1", VM1.uuid, domain_xml("vm1", VM1.uuid, PAIR, NIC1))
    assert dom.addresses == [A.parse(PAIR), A.parse(NIC1)] and dom.error is None
    bad = RunningDomain.from_xml("vm1", None, "<domain><devices><hostdev type='pci'/></devices></domain>")
    assert bad.error and bad.addresses == []


def test_unparseable_xml_adopts_nothing(eng):
    report = reconcile(eng, [RunningDomain("vm1", VM1.uuid, [], error="broken")])
    assert report.adopted == [] and "could not be read" in report.errors[0]


# --------------------------------------------------------------------------- gone domains


def test_claims_of_gone_domains_are_released(eng, sim):
    eng.prepare([A.parse(PAIR)], VM1)
    eng.prepare([A.parse(NIC1)], VM2)
    report = reconcile(restart(sim, eng), [running(VM2, NIC1)])
    assert [(r["group"], r["owner"]) for r in report.released] == [(15, "vm1")]
    assert sim.driver(PAIR) == sim.driver(PAIR_B) == "e1000e" and sim.driver(NIC1) == "vfio-pci"
    assert list(eng.ledger().claims) == ["12"]


def test_libvirt_unreachable_releases_nothing(eng, sim):
    eng.prepare([A.parse(PAIR)], VM1)
    report = reconcile(restart(sim, eng), None)
    assert report.released == [] and not report.libvirt and "libvirt unreachable" in report.summary()
    assert sim.driver(PAIR) == "vfio-pci"


def test_claims_newer_than_the_listing_are_left(eng, sim):
    listed_at = datetime.now(UTC) - timedelta(seconds=5)
    eng.prepare([A.parse(PAIR)], VM1)          # prepared after libvirt was asked
    report = reconcile(eng, [], listed_at=listed_at)
    assert report.released == [] and sim.driver(PAIR) == "vfio-pci"


def test_open_group_of_gone_domain_is_left_claimed(eng, sim):
    eng.prepare([A.parse(PAIR)], VM1)
    sim.open_group(15)                          # a QEMU still holds /dev/vfio/15
    report = reconcile(eng, [])
    assert report.released == [] and "is open" in report.skipped[0]
    assert eng.ledger().claim_for_group(15).state == "active"
    sim.close_group(15)
    report = reconcile(eng, [])
    assert [r["group"] for r in report.released] == [15] and sim.driver(PAIR) == "e1000e"


def test_guard_vetoes_busy_domains(eng, sim):
    import contextlib

    eng.prepare([A.parse(PAIR)], VM1)

    @contextlib.contextmanager
    def busy(name):
        yield name != "vm1"

    report = reconcile(eng, [], guard=busy)
    assert report.released == [] and "being served" in report.skipped[0]


def test_manual_claims_are_not_domains(eng, sim):
    manual = Owner(name="lab-bench", kind="manual")
    eng.prepare([A.parse(NIC1)], manual)
    assert reconcile(eng, []).released == []
    assert sim.driver(NIC1) == "vfio-pci"


def test_release_missing_is_refcounted(eng, sim):
    eng.prepare([A.parse(PAIR), A.parse(PAIR_B), A.parse(NIC1)], VM1)
    gone = release_missing(eng, running(VM1, PAIR, NIC1))      # PAIR_B hot-unplugged
    assert gone == [PAIR_B]
    assert sim.driver(PAIR_B) == "vfio-pci", "group 15 is still used through PAIR"
    assert eng.ledger().claim_for_group(15).device(PAIR_B).role == "companion"
    assert release_missing(eng, running(VM1, NIC1)) == [PAIR]
    assert sim.driver(PAIR) == sim.driver(PAIR_B) == "e1000e" and sim.driver(NIC1) == "vfio-pci"


def test_release_owner_respects_before(eng, sim):
    eng.prepare([A.parse(PAIR)], VM1)
    assert release_owner(eng, VM1, before=datetime.now(UTC) - timedelta(seconds=5)) == []
    assert release_owner(eng, VM1, before=datetime.now(UTC) + timedelta(seconds=1)) == [15]
    assert sim.driver(PAIR) == "e1000e"


# --------------------------------------------------------------------------- orphans


def test_orphans_are_reported_and_left_alone(eng, sim):
    vfio_bind_by_hand(eng, NIC1)
    report = reconcile(eng, None)
    assert report.orphans == [{"address": NIC1, "group": 12, "driver": "vfio-pci"}]
    assert sim.driver(NIC1) == "vfio-pci" and eng.ledger().claims == {}
    report = reconcile(eng, [])                 # libvirt up, no domain uses it: still only reported
    assert len(report.orphans) == 1 and sim.driver(NIC1) == "vfio-pci"


# --------------------------------------------------------------------------- crashes


def prepare_boundaries(sim, tmp_path) -> list[str]:
    eng = make_engine(load_sim("lab"), tmp_path / "probe")
    names: list[str] = []
    eng.executor.on_step = names.append
    eng.prepare([A.parse(PAIR)], VM1)
    return names


def release_boundaries(tmp_path) -> list[str]:
    eng = make_engine(load_sim("lab"), tmp_path / "probe-r")
    eng.prepare([A.parse(PAIR)], VM1)
    names: list[str] = []
    eng.executor.on_step = names.append
    eng.release(VM1)
    return names


def crash_at(eng, boundary: str) -> None:
    def on_step(name):
        if name == boundary:
            raise Crash(name)
    eng.executor.on_step = on_step


def test_boundaries_cover_the_pair(tmp_path, sim):
    assert prepare_boundaries(sim, tmp_path) == ["claim:15", f"bind:{PAIR}", f"bind:{PAIR_B}", "activate:15"]
    assert release_boundaries(tmp_path) == ["release:15", f"restore:{PAIR_B}", f"restore:{PAIR}", "drop:15"]


@pytest.mark.parametrize("boundary", ["claim:15", f"bind:{PAIR}", f"bind:{PAIR_B}", "activate:15"])
def test_crash_during_prepare_is_rolled_back(eng, sim, boundary):
    crash_at(eng, boundary)
    with pytest.raises(Crash):
        eng.prepare([A.parse(PAIR)], VM1)
    assert_no_driver_forgotten(eng, sim)
    fresh = restart(sim, eng)
    report = reconcile(fresh, None)            # libvirt not even needed
    assert report.errors == []
    assert fresh.ledger().claims == {}
    assert sim.driver(PAIR) == sim.driver(PAIR_B) == "e1000e"
    assert sim.driver_override(PAIR) is None and sim.driver_override(PAIR_B) is None
    if boundary != "claim:15":
        assert [f["action"] for f in report.finished] == ["rolled back half prepare"]


@pytest.mark.parametrize("boundary", [f"bind:{PAIR_B}", "activate:15"])
def test_crash_during_prepare_rolled_back_when_domain_not_running(eng, sim, boundary):
    crash_at(eng, boundary)
    with pytest.raises(Crash):
        eng.prepare([A.parse(PAIR)], VM1)
    report = reconcile(restart(sim, eng), [running(VM2, NIC1)])
    assert [f["action"] for f in report.finished] == ["rolled back half prepare"]
    assert sim.driver(PAIR) == sim.driver(PAIR_B) == "e1000e"


def test_crash_after_binding_completed_when_domain_runs_with_it(eng, sim):
    crash_at(eng, "activate:15")
    with pytest.raises(Crash):
        eng.prepare([A.parse(PAIR)], VM1)
    fresh = restart(sim, eng)
    report = reconcile(fresh, [running(VM1, PAIR)])
    assert [f["action"] for f in report.finished] == ["completed half prepare"]
    claim = fresh.ledger().claim_for_group(15)
    assert claim.state == "active" and {d.state for d in claim.devices} == {"vfio"}
    assert claim.device(PAIR).original_driver == "e1000e" and claim.device(PAIR).bound_by_us
    fresh.release(VM1)
    assert sim.driver(PAIR) == sim.driver(PAIR_B) == "e1000e"


def test_crash_before_release_started_is_a_gone_domain(eng, sim):
    eng.prepare([A.parse(PAIR)], VM1)
    crash_at(eng, "release:15")              # before the claim was marked releasing
    with pytest.raises(Crash):
        eng.release(VM1)
    fresh = restart(sim, eng)
    assert reconcile(fresh, None).finished == [] and fresh.ledger().claim_for_group(15).state == "active"
    report = reconcile(fresh, [])            # libvirt back: vm1 is not running
    assert [r["group"] for r in report.released] == [15]
    assert sim.driver(PAIR) == sim.driver(PAIR_B) == "e1000e"


@pytest.mark.parametrize("boundary", [f"restore:{PAIR_B}", f"restore:{PAIR}", "drop:15"])
def test_crash_during_release_is_finished(eng, sim, boundary):
    eng.prepare([A.parse(PAIR)], VM1)
    crash_at(eng, boundary)
    with pytest.raises(Crash):
        eng.release(VM1)
    assert_no_driver_forgotten(eng, sim)
    fresh = restart(sim, eng)
    report = reconcile(fresh, None)
    assert report.errors == [] and [f["action"] for f in report.finished] == ["finished half release"]
    assert fresh.ledger().claims == {}
    assert sim.driver(PAIR) == sim.driver(PAIR_B) == "e1000e"


def test_half_release_with_open_group_waits(eng, sim):
    eng.prepare([A.parse(PAIR)], VM1)
    crash_at(eng, f"restore:{PAIR_B}")
    with pytest.raises(Crash):
        eng.release(VM1)
    sim.open_group(15)
    report = reconcile(restart(sim, eng), None)
    assert report.finished == [] and "is open" in report.skipped[0]
    assert_no_driver_forgotten(eng, sim)
    sim.close_group(15)
    report = reconcile(restart(sim, eng), None)
    assert [f["action"] for f in report.finished] == ["finished half release"]


def test_failed_claims_are_reported_not_touched(eng, sim):
    eng.prepare([A.parse(PAIR)], VM1)
    with eng.store.transaction() as ledger:
        c = ledger.claim_for_group(15)
        c.state = "failed"
        ledger.put(c)
    report = reconcile(eng, [])
    assert report.failed_claims == [15] and report.released == []
    assert sim.driver(PAIR) == "vfio-pci" and "failed claims" in report.summary()
