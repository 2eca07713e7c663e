"""The planner's rules (R1-R3, R6) on hand-built topologies: pure, no sysfs."""
from __future__ import annotations

import time

import pytest

from hostdevd.core.address import PciAddress as A
from hostdevd.core.config import parse_config
from hostdevd.core.ledger import Claim, DeviceRecord, Ledger, Owner
from hostdevd.core.planner import Policy, plan_prepare, plan_release
from hostdevd.core.topology import Device, Topology

VM1 = Owner(name="vm1", uuid="11111111-1111-1111-1111-111111111111")
VM2 = Owner(name="vm2", uuid="22222222-2222-2222-2222-222222222222")


def dev(addr, group, cls="020000", driver="e1000e", bridge=False, vd="8086:10d3", **kw):
    v, d = vd.split(":")
    return Device(address=A.parse(addr), vendor=v, device=d, pci_class=cls, bridge=bridge,
                  group=group, driver=driver, **kw)


def topo(*devices, critical=None, iommu=True, users=None):
    return Topology({d.address: d for d in devices}, iommu_active=iommu, source="sysfs",
                    critical=critical or {}, group_users=users or {})


DESKTOP = topo(
    dev("0000:00:01.0", 1, "060400", "pcieport", True, "8086:1901"),
    dev("0000:01:00.0", 1, "030000", "nouveau", vd="10de:1b80"),
    dev("0000:01:00.1", 1, "040300", "snd_hda_intel", vd="10de:10f0"),
    dev("0000:02:00.0", 2, "010802", "nvme", vd="144d:a808"),
    critical={A.parse("0000:02:00.0"): "controller of a mounted filesystem (/)"},
)


def test_gpu_takes_audio_as_companion_and_skips_root_port():
    p = plan_prepare(DESKTOP, [A.parse("01:00.0")], VM1, Ledger())
    assert p.ok, p.refusals
    g = p.group(1)
    assert g.bind == [A.parse("0000:01:00.0"), A.parse("0000:01:00.1")]
    assert g.companions == [A.parse("0000:01:00.1")]
    assert g.skip == [A.parse("0000:00:01.0")]
    actions = [(s.action, s.address) for s in p.steps]
    assert actions[0] == ("claim", None)
    assert ("bind", A.parse("0000:01:00.1")) in actions and ("skip", A.parse("0000:00:01.0")) in actions
    assert actions[-1] == ("activate", None)
    assert not any(s.action == "bind" and s.address == A.parse("0000:00:01.0") for s in p.steps)


def test_bridge_request_is_refused():
    p = plan_prepare(DESKTOP, [A.parse("00:01.0")], VM1, Ledger())
    assert not p.ok and "bridge" in p.refusals[0].reason


def test_unknown_device_refused_with_hint():
    p = plan_prepare(DESKTOP, [A.parse("0000:09:00.0")], VM1, Ledger())
    assert not p.ok
    assert p.refusals[0].reason == "does not exist on this host" and p.refusals[0].device == "0000:09:00.0"
    assert str(p.refusals[0]).startswith("0000:09:00.0 does not exist on this host (")
    assert "hostdevctl groups" in p.refusals[0].hint


def test_thousands_of_unknown_devices_get_one_refusal_that_counts_them():
    addrs = [A(0, 0x10 + i // 256, (i // 8) % 32, i % 8) for i in range(2000)]
    t0 = time.perf_counter()
    p = plan_prepare(DESKTOP, addrs + addrs[:10] + [A.parse("01:00.0")], VM1, Ledger())
    assert time.perf_counter() - t0 < 1.0
    assert not p.ok and len(p.refusals) == 1
    r = p.refusals[0]
    assert r.device == "-" and str(r) == (
        "2,000 requested devices do not exist on this host: 0000:10:00.0, 0000:10:00.1, 0000:10:00.2, \u2026 "
        "(`hostdevctl groups` lists the devices and their addresses)")
    assert len(p.refusal_message()) < 300 and len(str(p.refused().refusals)) < 400
    assert [g.group for g in p.groups] == [1], "the known device is still planned, so the operator sees it"


def test_up_to_three_unknown_devices_get_one_refusal_each():
    addrs = [A.parse(f"0000:09:00.{i}") for i in range(3)]
    p = plan_prepare(DESKTOP, addrs, VM1, Ledger())
    assert [r.device for r in p.refusals] == [str(a) for a in addrs]
    assert all(r.reason == "does not exist on this host" for r in p.refusals)
    p = plan_prepare(DESKTOP, [*addrs, A.parse("0000:09:00.3")], VM1, Ledger())
    assert [r.reason for r in p.refusals] == [
        "4 requested devices do not exist on this host: 0000:09:00.0, 0000:09:00.1, 0000:09:00.2, \u2026"]


def test_many_devices_without_iommu_group_get_one_refusal():
    t = topo(*(dev(f"0000:03:{i // 8:02x}.{i % 8}", None) for i in range(200)), iommu=False)
    p = plan_prepare(t, sorted(t.devices), VM1, Ledger())
    assert len(p.refusals) == 1 and p.refusals[0].reason.startswith(
        "200 requested devices have no IOMMU group: the IOMMU is off or absent: 0000:03:00.0, ")
    assert "intel_iommu=on" in p.refusals[0].hint


@pytest.mark.parametrize("requests, device", [
    (["00:01.0"], "0000:00:01.0"),                  # bridge
    (["0000:09:00.0"], "0000:09:00.0"),             # unknown
    (["02:00.0"], "0000:02:00.0"),                  # host-critical
])
def test_refusal_text_names_the_device_once(requests, device):
    r = plan_prepare(DESKTOP, [A.parse(a) for a in requests], VM1, Ledger()).refusals[0]
    assert r.device == device and device not in r.reason and r.reason.split()[0] in ("is", "does")
    assert str(r).startswith(f"{device} {r.reason} (") and str(r).count(device) == 1 + r.hint.count(device)


def test_root_disk_controller_refused_unless_policy_allows():
    p = plan_prepare(DESKTOP, [A.parse("02:00.0")], VM1, Ledger())
    assert not p.ok and "host-critical" in p.refusals[0].reason
    pol = Policy.from_config(parse_config('[policy]\nallow_host_critical = ["0000:02:00.0"]\n'))
    assert plan_prepare(DESKTOP, [A.parse("02:00.0")], VM1, Ledger(), pol).ok


def test_critical_companion_refuses_the_whole_group():
    t = topo(dev("0000:00:1f.0", 11, "060100", "lpc_ich", vd="8086:2918"),
             dev("0000:00:1f.2", 11, "010601", "ahci", vd="8086:2922"),
             dev("0000:00:1f.6", 11, "020000", "e1000e", vd="8086:15b8"),
             critical={A.parse("0000:00:1f.2"): "controller of a mounted filesystem (/)"})
    p = plan_prepare(t, [A.parse("00:1f.6")], VM1, Ledger())
    assert not p.ok
    assert p.refusals[0].device == "0000:00:1f.2"
    assert "companion in group 11" in p.refusals[0].reason
    # groups are shown even when refused: the operator sees what would be touched
    assert p.group(11).companions == [A.parse("0000:00:1f.0"), A.parse("0000:00:1f.2")]


def test_boot_vga_refused():
    t = topo(dev("0000:01:00.0", 1, "030000", "amdgpu", vd="1002:67df", boot_vga=True))
    p = plan_prepare(t, [A.parse("01:00.0")], VM1, Ledger())
    assert not p.ok and "boot VGA" in p.refusals[0].reason


def test_policy_deny_and_allow():
    pol = Policy.from_config(parse_config('[policy]\ndeny = ["10de:10f0"]\n'))
    p = plan_prepare(DESKTOP, [A.parse("01:00.0")], VM1, Ledger(), pol)
    assert not p.ok and "policy.deny" in p.refusals[0].reason and p.refusals[0].device == "0000:01:00.1"
    pol = Policy.from_config(parse_config('[policy]\nallow = ["10de:*"]\n'))
    assert plan_prepare(DESKTOP, [A.parse("01:00.0")], VM1, Ledger(), pol).ok
    pol = Policy.from_config(parse_config('[policy]\nallow = ["0000:01:00.0"]\n'))
    p = plan_prepare(DESKTOP, [A.parse("01:00.0")], VM1, Ledger(), pol)
    assert not p.ok and "not in policy.allow" in p.refusals[0].reason


def _held(owner, group, *addrs):
    return Claim(group=group, owner=owner, state="active", devices=[
        DeviceRecord(address=a, role="requested", state="vfio", original_driver="e1000e",
                     original_override=None, bound_by_us=True) for a in addrs])


def test_second_domain_refused_naming_holder():
    ledger = Ledger()
    ledger.put(_held(VM1, 1, "0000:01:00.0", "0000:01:00.1"))
    p = plan_prepare(DESKTOP, [A.parse("01:00.1")], VM2, ledger)
    assert not p.ok
    assert "held by domain vm1" in p.refusals[0].reason
    assert "stop vm1" in p.refusals[0].hint


DESKTOP_BOUND = topo(
    dev("0000:00:01.0", 1, "060400", "pcieport", True, "8086:1901"),
    dev("0000:01:00.0", 1, "030000", "vfio-pci", vd="10de:1b80"),
    dev("0000:01:00.1", 1, "040300", "vfio-pci", vd="10de:10f0"),
)


def test_same_owner_again_is_idempotent():
    ledger = Ledger()
    ledger.put(_held(VM1, 1, "0000:01:00.0", "0000:01:00.1"))
    p = plan_prepare(DESKTOP_BOUND, [A.parse("01:00.0")], VM1, ledger)
    assert p.ok and p.group(1).already_held
    assert not [s for s in p.steps if s.action in ("claim", "bind")]


def test_same_owner_again_converges_on_the_kernel_not_the_ledger():
    """The ledger says vfio, the kernel shows host drivers (a reboot, someone's unbind):
    the held group is bound again instead of planning nothing."""
    ledger = Ledger()
    ledger.put(_held(VM1, 1, "0000:01:00.0", "0000:01:00.1"))
    p = plan_prepare(DESKTOP, [A.parse("01:00.0")], VM1, ledger)
    assert p.ok and p.group(1).already_held and p.group(1).keep == []
    binds = [(str(s.address), s.detail) for s in p.steps if s.action == "bind"]
    assert binds == [("0000:01:00.0", "held, but on nouveau -> vfio-pci"),
                     ("0000:01:00.1", "held, but on snd_hda_intel -> vfio-pci")]
    assert not [s for s in p.steps if s.action == "claim"]


def test_no_iommu_refuses():
    t = topo(dev("0000:01:00.0", None), iommu=False)
    p = plan_prepare(t, [A.parse("01:00.0")], VM1, Ledger())
    assert not p.ok and "IOMMU" in p.refusals[0].reason and "intel_iommu=on" in p.refusals[0].hint


def test_device_already_on_vfio_is_kept_not_rebound():
    t = topo(dev("0000:04:00.0", 15), dev("0000:04:00.1", 15, driver="vfio-pci"))
    p = plan_prepare(t, [A.parse("04:00.0")], VM1, Ledger())
    assert p.ok
    assert p.group(15).keep == [A.parse("0000:04:00.1")]
    assert ("keep", A.parse("0000:04:00.1")) in [(s.action, s.address) for s in p.steps]


def test_pf_with_vfs_as_companion_refused():
    t = topo(dev("0000:03:00.0", 20, sriov_numvfs=4, sriov_totalvfs=8),
             dev("0000:03:10.0", 20, driver=None, physfn=A.parse("0000:03:00.0")))
    p = plan_prepare(t, [A.parse("03:10.0")], VM1, Ledger())
    assert not p.ok and "SR-IOV PF" in p.refusals[0].reason and "ACS" in p.refusals[0].hint


def test_reset_step_only_with_policy():
    assert not [s for s in plan_prepare(DESKTOP, [A.parse("01:00.0")], VM1, Ledger()).steps if s.action == "reset"]
    pol = Policy.from_config(parse_config('[reset]\ndevices = { "10de:1b80" = "flr" }\n'))
    steps = plan_prepare(DESKTOP, [A.parse("01:00.0")], VM1, Ledger(), pol).steps
    resets = [s for s in steps if s.action == "reset"]
    assert [s.address for s in resets] == [A.parse("0000:01:00.0")]
    # resets come after every bind of the group (R4: only after all are detached)
    assert steps.index(resets[0]) > max(i for i, s in enumerate(steps) if s.action == "bind")


def test_release_refcount_keeps_group_while_other_function_held():
    ledger = Ledger()
    ledger.put(_held(VM1, 1, "0000:01:00.0", "0000:01:00.1"))
    p = plan_release(DESKTOP, VM1, ledger, [A.parse("01:00.0")])
    assert p.keep_claims == {1: [A.parse("0000:01:00.1")]}
    assert not [s for s in p.steps if s.action == "restore"]
    p = plan_release(DESKTOP, VM1, ledger)
    assert [s.address for s in p.steps if s.action == "restore"] == [A.parse("0000:01:00.1"), A.parse("0000:01:00.0")]


def test_release_of_other_owners_device_is_a_warning_not_an_action():
    ledger = Ledger()
    ledger.put(_held(VM1, 1, "0000:01:00.0"))
    p = plan_release(DESKTOP, VM2, ledger, [A.parse("01:00.0")])
    assert not p.groups and "held by vm1" in p.warnings[0]


def test_release_warns_when_group_still_open():
    ledger = Ledger()
    ledger.put(_held(VM1, 1, "0000:01:00.0"))
    p = plan_release(topo(*DESKTOP.devices.values(), users={1: 1}), VM1, ledger)
    assert any("still open" in w for w in p.warnings)


@pytest.mark.parametrize("addr", ["0000:01:00.0", "01:00.0"])
def test_plan_json_shape(addr):
    d = plan_prepare(DESKTOP, [A.parse(addr)], VM1, Ledger()).to_json()
    assert d["ok"] is True
    assert d["groups"][0]["group"] == 1
    assert set(d["groups"][0]) >= {"group", "bind", "companions", "skip"}
