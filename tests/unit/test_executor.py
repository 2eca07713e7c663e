"""Executor: a failure at every step rolls back to the exact initial state (R5), release
restores recorded drivers (R6), hung writes time out naming the device, claims race safely."""
from __future__ import annotations

import errno
import threading

import pytest

from hostdevd.core.address import PciAddress as A
from hostdevd.core.errors import ExecutionFailed, HostdevError, Refused, SysfsTimeout
from hostdevd.core.ledger import Owner
from hostdevd.core.ledger_store import LedgerStore
from hostdevd.core.sysfs import Sysfs

from .conftest import load_sim, make_engine

VM1 = Owner(name="vm1", uuid="00000000-0000-0000-0000-000000000001")
VM2 = Owner(name="vm2", uuid="00000000-0000-0000-0000-000000000002")
PAIR = A.parse("0000:04:00.0")          # lab: multifunction e1000e pair, group 15
BEHIND_BRIDGE = A.parse("0000:06:01.0")  # lab: e1000 behind the pcie-pci bridge, group 16


class FailNth:
    """Backend proxy that fails the n-th write (0-based) with EIO."""

    def __init__(self, inner, n):
        self.inner, self.n, self.count = inner, n, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def write(self, rel, data):
        i, self.count = self.count, self.count + 1
        if i == self.n:
            raise OSError(errno.EIO, "injected failure")
        return self.inner.write(rel, data)


def _count_prepare_writes(tmp_path, addr):
    sim = load_sim("lab")
    proxy = FailNth(sim, -1)
    eng = make_engine(sim, tmp_path / "count")
    eng.sysfs = eng.executor.sysfs = Sysfs(proxy, 2.0)
    eng.prepare([addr], VM1)
    return proxy.count


@pytest.mark.parametrize("addr", [PAIR, BEHIND_BRIDGE])
def test_failure_at_every_sysfs_write_rolls_back(tmp_path, addr):
    n_writes = _count_prepare_writes(tmp_path, addr)
    assert n_writes >= 6  # override + unbind + probe for each of two devices
    for n in range(n_writes):
        sim = load_sim("lab")
        before = sim.state()
        eng = make_engine(sim, tmp_path / f"s{n}")
        eng.sysfs = eng.executor.sysfs = Sysfs(FailNth(sim, n), 2.0)
        with pytest.raises(HostdevError) as e:
            eng.prepare([addr], VM1)
        assert "injected failure" in str(e.value)
        assert sim.state() == before, f"write {n}: kernel state not restored"
        assert eng.ledger().claims == {}, f"write {n}: ledger not clean"


def test_failure_at_every_ledger_save_rolls_back(tmp_path):
    sim = load_sim("lab")
    store = LedgerStore(tmp_path / "count")
    eng = make_engine(sim, tmp_path / "count")
    eng.prepare([PAIR], VM1)
    saves = eng.store.saves
    assert saves == 2       # written ahead: the claim with every device's intent, then the outcome
    for n in range(saves):
        sim = load_sim("lab")
        before = sim.state()
        eng = make_engine(sim, tmp_path / f"l{n}")
        real_save, calls = eng.store.save, {"n": 0}

        def flaky(ledger, real_save=real_save, calls=calls, n=n):
            calls["n"] += 1
            if calls["n"] - 1 == n:
                raise OSError(errno.ENOSPC, "No space left on device")
            real_save(ledger)

        eng.store.save = flaky
        with pytest.raises(ExecutionFailed):
            eng.prepare([PAIR], VM1)
        assert sim.state() == before, f"save {n}"
        eng.store.save = real_save
        assert eng.ledger().claims == {}, f"save {n}"
    del store


def test_failure_at_every_step_boundary_rolls_back(tmp_path):
    names = []
    sim = load_sim("lab")
    eng = make_engine(sim, tmp_path / "names")
    eng.executor.on_step = names.append
    eng.prepare([PAIR], VM1)
    assert names[0] == "claim:15" and names[-1] == "activate:15"
    for step in names:
        sim = load_sim("lab")
        before = sim.state()
        eng = make_engine(sim, tmp_path / step.replace(":", "_"))

        def boom(name, step=step):
            if name == step:
                raise RuntimeError(f"injected at {name}")

        eng.executor.on_step = boom
        with pytest.raises(HostdevError):
            eng.prepare([PAIR], VM1)
        assert sim.state() == before and eng.ledger().claims == {}, step


def test_hung_write_times_out_naming_device_and_rolls_back(tmp_path):
    sim = load_sim("lab")
    before = sim.state()
    eng = make_engine(sim, tmp_path, write_timeout=0.3)
    sim.hang_writes("bus/pci/drivers_probe", count=1)
    try:
        with pytest.raises(HostdevError) as e:
            eng.prepare([A.parse("0000:01:00.0")], VM1)
        assert isinstance(e.value.__cause__, SysfsTimeout) or "did not return" in str(e.value)
        assert "0000:01:00.0" in str(e.value)
        assert eng.ledger().claims == {}
        # other groups keep working while the write hangs
        eng.prepare([PAIR], VM2)
        assert sim.driver("0000:04:00.1") == "vfio-pci"
        eng.release(VM2)
    finally:
        sim.release_hangs()
    assert sim.state()["0000:04:00.0"] == before["0000:04:00.0"]


def test_release_waits_for_qemu_to_close_group(lab_sim, lab_engine):
    before = lab_sim.state()
    lab_engine.prepare([PAIR], VM1)
    lab_sim.open_group(15)
    with pytest.raises(ExecutionFailed, match="still open"):
        lab_engine.release(VM1)
    claim = lab_engine.ledger().claim_for_group(15)
    assert claim.state == "failed" and lab_sim.driver("0000:04:00.0") == "vfio-pci"
    lab_sim.close_group(15)
    lab_engine.release(VM1)  # retry succeeds once QEMU let go
    assert lab_sim.state() == before and lab_engine.ledger().claims == {}


def test_device_already_on_vfio_stays_there(lab_sim, lab_engine):
    sysfs = lab_engine.sysfs
    b = A.parse("0000:04:00.1")
    sysfs.set_driver_override(b, "vfio-pci")
    sysfs.unbind(b)
    sysfs.drivers_probe(b)
    before = lab_sim.state()
    lab_engine.prepare([PAIR], VM1)
    rec = lab_engine.ledger().claim_for_group(15).device(b)
    assert rec.bound_by_us is False and rec.original_driver == "vfio-pci"
    lab_engine.release(VM1)
    assert lab_sim.state() == before
    assert lab_sim.driver(str(b)) == "vfio-pci"


def test_vf_with_autoprobe_off_returns_to_its_driver_explicitly(tmp_path):
    sim = load_sim("sriov_pf")
    eng = make_engine(sim, tmp_path)
    pf = A.parse("0000:03:00.0")
    eng.sysfs.set_sriov_numvfs(pf, 2)
    vf = sim.vfs(str(pf))[0]
    assert sim.driver(vf) == "igbvf"
    eng.prepare([A.parse(vf)], VM1)
    eng.sysfs.set_sriov_drivers_autoprobe(pf, False)  # drivers_probe alone now does nothing
    eng.release(VM1)
    assert sim.state()[vf] == ("igbvf", None)


def test_driverless_vf_stays_driverless(tmp_path):
    sim = load_sim("sriov_pf")
    eng = make_engine(sim, tmp_path)
    pf = A.parse("0000:03:00.0")
    eng.sysfs.set_sriov_drivers_autoprobe(pf, False)
    eng.sysfs.set_sriov_numvfs(pf, 2)
    vf = sim.vfs(str(pf))[1]
    assert sim.state()[vf] == (None, None)
    eng.prepare([A.parse(vf)], VM1)
    assert sim.driver(vf) == "vfio-pci"
    eng.release(VM1)
    assert sim.state()[vf] == (None, None)


def test_two_domains_race_for_one_group_exactly_one_wins(lab_sim, lab_engine):
    results = {}
    barrier = threading.Barrier(2)

    def go(owner, addr):
        barrier.wait()
        try:
            lab_engine.prepare([A.parse(addr)], owner)
            results[owner.name] = "won"
        except Refused as e:
            results[owner.name] = str(e)

    t = [threading.Thread(target=go, args=(VM1, "0000:04:00.0")),
         threading.Thread(target=go, args=(VM2, "0000:04:00.1"))]
    [x.start() for x in t]
    [x.join() for x in t]
    winners = [k for k, v in results.items() if v == "won"]
    assert len(winners) == 1
    loser = "vm2" if winners == ["vm1"] else "vm1"
    assert f"held by domain {winners[0]}" in results[loser]


def test_refcounted_release_of_one_function(lab_sim, lab_engine):
    before = lab_sim.state()
    lab_engine.prepare([A.parse("0000:04:00.0"), A.parse("0000:04:00.1")], VM1)
    lab_engine.release(VM1, [A.parse("0000:04:00.0")])
    assert lab_sim.driver("0000:04:00.0") == "vfio-pci"  # group still held for 04:00.1
    assert lab_engine.ledger().claim_for_group(15).requested == ["0000:04:00.1"]
    lab_engine.release(VM1, [A.parse("0000:04:00.1")])
    assert lab_sim.state() == before


def test_vanished_device_dropped_on_release(lab_sim, lab_engine):
    lab_engine.prepare([PAIR], VM1)
    lab_sim.hot_unplug("0000:04:00.1")
    lab_engine.release(VM1)
    assert lab_engine.ledger().claims == {}
    assert lab_sim.driver("0000:04:00.0") == "e1000e"


def test_blacklisted_vfio_module_fails_cleanly(tmp_path):
    sim = load_sim("lab")
    sim.unload_module("vfio_pci")
    before = sim.state()
    eng = make_engine(sim, tmp_path)

    def refuse(module):
        raise ExecutionFailed(f"modprobe {module} failed: administratively prohibited")

    eng.executor.modprobe = refuse
    with pytest.raises(ExecutionFailed, match="administratively prohibited"):
        eng.prepare([PAIR], VM1)
    assert sim.state() == before and eng.ledger().claims == {}
    eng.executor.modprobe = sim.load_module
    eng.prepare([PAIR], VM1)
    assert sim.driver("0000:04:00.0") == "vfio-pci"
