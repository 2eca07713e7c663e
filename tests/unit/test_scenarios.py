"""Whole scenarios on the simulated kernel: plan, prepare, release, and the final driver
state equals the initial one (topologies in tests/topologies/)."""
from __future__ import annotations

import pytest

from hostdevd.core.address import PciAddress as A
from hostdevd.core.errors import Refused
from hostdevd.core.ledger import Owner

from .conftest import load_sim, make_engine

VM = Owner(name="vm1", uuid="aaaaaaaa-0000-0000-0000-000000000001")

# name, requested devices, expected vfio-pci set while held, expected skipped bridges
SCENARIOS = [
    ("desktop_gpu", ["0000:01:00.0"], {"0000:01:00.0", "0000:01:00.1"}, ["0000:00:01.0"]),
    ("gpu_4fn", ["0000:01:00.0"], {"0000:01:00.0", "0000:01:00.1", "0000:01:00.2", "0000:01:00.3"},
     ["0000:00:01.1"]),
    ("dual_port_nic", ["0000:01:00.1"], {"0000:01:00.0", "0000:01:00.1"}, ["0000:00:1c.0"]),
    ("lab", ["0000:04:00.0"], {"0000:04:00.0", "0000:04:00.1"}, []),
    ("lab", ["0000:06:01.0"], {"0000:06:01.0", "0000:06:02.0"}, ["0000:05:00.0"]),
    ("lab", ["0000:0a:00.0"], {"0000:0a:00.0"}, ["0000:08:01.0"]),
]


@pytest.mark.parametrize("name,req,bound,skip", SCENARIOS, ids=[f"{s[0]}-{s[1][0]}" for s in SCENARIOS])
def test_roundtrip(tmp_path, name, req, bound, skip):
    sim = load_sim(name)
    before = sim.state()
    eng = make_engine(sim, tmp_path)
    addrs = [A.parse(a) for a in req]
    plan = eng.plan_prepare(addrs, VM)
    assert plan.ok, plan.refusal_message()
    assert {str(a) for a in plan.groups[0].bind} == bound and [str(a) for a in plan.groups[0].skip] == skip

    eng.prepare(addrs, VM)
    after = sim.state()
    assert {a for a, (drv, _) in after.items() if drv == "vfio-pci"} == bound
    for b in skip:  # bridges untouched
        assert after[b] == before[b]
    group = sim.group_of(req[0])
    sim.open_group(group)  # the group is viable: QEMU could open it
    sim.close_group(group)
    claim = eng.ledger().claim_for_group(group)
    assert claim.state == "active" and {d.address for d in claim.devices} == bound

    eng.release(VM)
    assert sim.state() == before
    assert eng.ledger().claims == {}


def test_sriov_pf_vfs_each_own_group(tmp_path):
    sim = load_sim("sriov_pf")
    eng = make_engine(sim, tmp_path)
    pf = A.parse("0000:03:00.0")
    eng.sysfs.set_sriov_numvfs(pf, 4)
    vfs = sim.vfs(str(pf))
    assert len(vfs) == 4 and len({sim.group_of(v) for v in vfs}) == 4
    before = sim.state()
    eng.prepare([A.parse(vfs[1])], VM)
    assert sim.driver(vfs[1]) == "vfio-pci"
    assert all(sim.driver(v) == before[v][0] == "igbvf" for v in (vfs[0], vfs[2], vfs[3]))
    assert sim.driver(str(pf)) == "igb"  # PF keeps serving the host
    eng.release(VM)
    assert sim.state() == before


def test_chipset_group_refused_because_sata_holds_root(tmp_path):
    sim = load_sim("chipset_group")
    before = sim.state()
    eng = make_engine(sim, tmp_path)
    plan = eng.plan_prepare([A.parse("0000:02:00.0")], VM)
    assert not plan.ok
    reasons = " ".join(str(r) for r in plan.refusals)
    assert "0000:00:17.0" in reasons and "host-critical" in reasons
    assert {str(a) for a in plan.groups[0].companions} >= {"0000:00:14.0", "0000:00:17.0", "0000:00:1f.6"}
    with pytest.raises(Refused):
        eng.prepare([A.parse("0000:02:00.0")], VM)
    assert sim.state() == before and eng.ledger().claims == {}


def test_chipset_group_with_explicit_override_roundtrips(tmp_path):
    sim = load_sim("chipset_group")
    before = sim.state()
    crit = [str(a) for a in make_engine(sim, tmp_path / "probe").topology().critical]
    cfg = "[policy]\nallow_host_critical = [" + ", ".join(f'"{a}"' for a in crit) + "]\n"
    eng = make_engine(sim, tmp_path, cfg)
    eng.prepare([A.parse("0000:02:00.0")], VM)
    members = [a for a, g in ((a, sim.group_of(a)) for a in before) if g == sim.group_of("0000:02:00.0")]
    for a in members:
        assert sim.driver(a) in ("vfio-pci", "pcieport")
    eng.release(VM)
    assert sim.state() == before


def test_no_iommu_refused_everywhere(tmp_path):
    sim = load_sim("no_iommu")
    eng = make_engine(sim, tmp_path)
    plan = eng.plan_prepare([A.parse("0000:01:00.0")], VM)
    assert not plan.ok and "IOMMU" in plan.refusals[0].reason
    before = sim.state()
    with pytest.raises(Refused):
        eng.prepare([A.parse("0000:01:00.0")], VM)
    assert sim.state() == before


def test_preset_driver_override_restored_exactly(lab_sim, lab_engine):
    assert lab_sim.driver_override("0000:0a:00.0") == "e1000e"
    lab_engine.prepare([A.parse("0000:0a:00.0")], VM)
    assert lab_sim.state()["0000:0a:00.0"] == ("vfio-pci", "vfio-pci")
    rec = lab_engine.ledger().claim_for_device("0000:0a:00.0").device("0000:0a:00.0")
    assert (rec.original_driver, rec.original_override) == ("e1000e", "e1000e")
    lab_engine.release(VM)
    assert lab_sim.state()["0000:0a:00.0"] == ("e1000e", "e1000e")
