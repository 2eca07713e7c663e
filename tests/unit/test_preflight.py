"""Pre-flight checks on the simulated kernel: processes holding a device refuse its bind (named,
with the host action that would stop them), D3cold / unreadable config / no reset method and a
NUMA mismatch warn, and `hostdevctl plan` and `check` show it all (human and --json)."""
from __future__ import annotations

import json

import pytest

from hostdevd.core.address import PciAddress
from hostdevd.core.domxml import GuestNuma, parse_domain
from hostdevd.core.errors import REFUSAL_CODES, WARNING_CODES, Reason, Refused
from hostdevd.core.ledger import Owner
from hostdevd.core.sysfs import Sysfs
from hostdevd.doors.cli import main
from hostdevd.sim.simkernel import SimKernel

from .conftest import load_sim, make_engine

GPU, AUDIO, NIC = (PciAddress.parse(a) for a in ("0000:01:00.0", "0000:01:00.1", "0000:02:00.0"))
VM = Owner(name="vm1")


def spec(**gpu) -> dict:
    """A GPU (nvidia, DRM nodes, minor 0, NUMA node 1) with its HDMI audio behind a root port, and a
    NIC on node 0; ``gpu`` overrides the GPU's spec keys."""
    return {
        "iommu": True,
        "drivers": {"nvidia": {"ids": ["10de:*:0300"]}, "snd_hda_intel": {"ids": ["*:*:0403"]},
                    "e1000e": {"ids": ["8086:10d3"]}},
        "numa_nodes": {"0": "0-3", "1": "4-7"},
        "devices": [
            {"address": "0000:00:01.0", "vendor": "8086", "device": "1901", "class": "060400", "group": 1,
             "driver": "pcieport", "secondary_bus": 1},
            {"address": "0000:01:00.0", "vendor": "10de", "device": "1b80", "class": "030000", "group": 1,
             "driver": "nvidia", "drm": ["card1", "renderD129"], "nvidia_minor": 0, "numa_node": 1} | gpu,
            {"address": "0000:01:00.1", "vendor": "10de", "device": "10f0", "class": "040300", "group": 1,
             "driver": "snd_hda_intel", "numa_node": 1},
            {"address": "0000:02:00.0", "vendor": "8086", "device": "10d3", "class": "020000", "group": 2,
             "driver": "e1000e", "numa_node": 0},
        ],
    }


@pytest.fixture
def sim() -> SimKernel:
    return SimKernel(spec())


def plan(sim, tmp_path, addrs=(GPU,), config="", guest=None):
    return make_engine(sim, tmp_path / "state", config).plan_prepare(list(addrs), VM, guest=guest)


def codes(items) -> list[str]:
    return [x.code for x in items]


# ------------------------------------------------------------------ holders


def test_holder_refuses_naming_the_processes_and_the_host_action(sim, tmp_path):
    sim.add_process(812, "nvidia-persistenc", fds=["/dev/nvidia0", "/dev/nvidiactl"],
                    unit="nvidia-persistenced.service")
    sim.add_process(1020, "Xorg", fds=["/dev/dri/card1"], maps=["sysfs:0000:01:00.0/resource0"])
    p = plan(sim, tmp_path)
    assert not p.ok and codes(p.refusals) == [Reason.DEVICE_IN_USE]
    r = p.refusals[0]
    assert r.device == str(GPU)
    assert "nvidia-persistenc[812] (/dev/nvidia0)" in r.reason       # nvidiactl alone is no GPU's
    assert "Xorg[1020] (/dev/dri/card1, /sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0/resource0 mmapped)" \
        in r.reason
    assert "host_actions.stop_units" in r.hint and 'match = "10de:1b80"' in r.hint
    assert 'stop_units = ["nvidia-persistenced.service"]' in r.hint and "Xorg[1020]" in r.hint
    assert r.to_json()["code"] == "DEVICE_IN_USE"


def test_open_config_or_resource_of_a_companion_refuses_it(sim, tmp_path):
    sim.add_process(4711, "python3", fds=[sim.sysfs_file(AUDIO, "config")])
    p = plan(sim, tmp_path)
    assert [(r.device, r.code) for r in p.refusals] == [(str(AUDIO), Reason.DEVICE_IN_USE)]
    assert p.refusals[0].reason.startswith("is a companion in group 1 and held by python3[4711]")


@pytest.mark.parametrize("vanish", ["listed", "fds", "named"])
def test_holder_vanishing_mid_scan_is_harmless(sim, tmp_path, vanish):
    sim.add_process(900, "short-lived", fds=["/dev/dri/renderD129"], maps=["sysfs:0000:01:00.0/resource0"],
                    vanish=vanish)
    p = plan(sim, tmp_path)
    assert p.ok and Reason.PROC_SCAN_INCOMPLETE not in codes(p.cautions)


def test_no_holder_no_refusal(sim, tmp_path):
    sim.add_process(1, "systemd", fds=["/dev/null", "/dev/dri/card0", "/dev/nvidiactl"])   # not this GPU's
    p = plan(sim, tmp_path)
    assert p.ok and p.refusals == [] and p.cautions == []
    assert [s.action for s in p.steps] == ["claim", "skip", "bind", "bind", "activate"]


def test_unknown_nvidia_minor_makes_every_nvidia_node_holder_a_suspect(tmp_path):
    sim = SimKernel(spec(nvidia_minor=None))
    sim.add_process(812, "nvidia-smi", fds=["/dev/nvidiactl"])
    p = plan(sim, tmp_path)
    assert codes(p.refusals) == [Reason.DEVICE_MAYBE_IN_USE]
    assert "nvidia-smi[812] (/dev/nvidiactl)" in p.refusals[0].reason
    assert "/proc/driver/nvidia/gpus/0000:01:00.0/information" in p.refusals[0].reason


def test_holder_whose_unit_host_actions_stop_only_warns(sim, tmp_path):
    sim.add_process(812, "nvidia-persistenc", fds=["/dev/nvidia0"], unit="nvidia-persistenced.service")
    config = '[[host_actions]]\nmatch = "10de:*"\nstop_units = ["nvidia-persistenced.service"]\n'
    p = plan(sim, tmp_path, config=config)
    assert p.ok and codes(p.cautions) == [Reason.IN_USE_STOPPED_BY_HOST_ACTIONS]
    assert [s.name for s in p.steps if s.action == "stop_unit"] == ["nvidia-persistenced.service"]


def test_prepare_refused_by_a_holder_touches_nothing(sim, tmp_path):
    sim.add_process(1020, "Xorg", fds=["/dev/dri/card1"])
    engine = make_engine(sim, tmp_path / "state")
    before = sim.state()
    with pytest.raises(Refused) as e:
        engine.prepare([GPU], VM)
    assert e.value.refusals[0]["code"] == "DEVICE_IN_USE" and "Xorg[1020]" in e.value.message
    assert sim.state() == before and sim.write_log == [] and engine.ledger().claims == {}
    sim.kill_process(1020)
    engine.prepare([GPU], VM)
    assert sim.driver(GPU) == "vfio-pci"


def test_unreadable_processes_make_the_scan_incomplete(sim, tmp_path):
    sim.add_process(5000, "secret", fds=["/dev/dri/card1"], denied=True)
    p = plan(sim, tmp_path)
    assert p.ok and codes(p.cautions) == [Reason.PROC_SCAN_INCOMPLETE]
    assert "1 of 1 processes could not be read" in p.cautions[0].message


def test_unclaimed_open_vfio_group_refuses_naming_its_user(tmp_path):
    s = spec()
    s["devices"][3]["driver"] = "vfio-pci"
    sim = SimKernel(s)
    sim.open_group(2)
    sim.add_process(4242, "qemu-system-x86", fds=["/dev/vfio/2"])
    p = plan(sim, tmp_path, addrs=[NIC])
    assert [(r.code, r.device) for r in p.refusals] == [(Reason.VFIO_IN_USE, str(NIC))]
    assert "qemu-system-x86[4242] (/dev/vfio/2)" in p.refusals[0].reason


def test_the_owners_own_open_group_is_not_refused(tmp_path):
    sim = SimKernel(spec())
    engine = make_engine(sim, tmp_path / "state")
    engine.prepare([NIC], VM)
    sim.open_group(2)
    sim.add_process(4242, "qemu-system-x86", fds=["/dev/vfio/2"])
    assert engine.plan_prepare([NIC], VM).ok


# ------------------------------------------------------------------ power, reset


def test_d3cold_and_unreadable_config_warn(tmp_path):
    p = plan(SimKernel(spec(power_state="D3cold", config_readable=False)), tmp_path)
    assert p.ok and codes(p.cautions) == [Reason.POWER_D3COLD, Reason.CONFIG_UNREADABLE]
    assert all(c.device == str(GPU) for c in p.cautions)
    assert any("D3cold" in w and "may fail" in w for w in p.warnings)


def test_no_reset_method_warns(tmp_path):
    p = plan(SimKernel(spec(reset_method=[])), tmp_path)
    assert p.ok and codes(p.cautions) == [Reason.NO_RESET_METHOD]
    assert "leak from one guest to the next" in p.cautions[0].message


# ------------------------------------------------------------------ NUMA


def test_numa_mismatch_warns_and_matching_pinning_does_not(sim, tmp_path):
    off = plan(sim, tmp_path, guest=GuestNuma(cpus=frozenset({0, 1}), memory_nodes=frozenset({0})))
    assert off.ok and codes(off.cautions) == [Reason.NUMA_MISMATCH]
    msg = off.cautions[0].message
    assert "NUMA node 1" in msg and "node 0 (host CPUs 0-1)" in msg and "memory is bound to node 0" in msg
    assert "4-7" in off.cautions[0].hint
    assert off.numa == {GPU: 1, AUDIO: 1}
    on = plan(sim, tmp_path, guest=GuestNuma(cpus=frozenset({4, 5}), memory_nodes=frozenset({1})))
    assert on.ok and on.cautions == [] and on.numa == {GPU: 1, AUDIO: 1}
    spanning = plan(sim, tmp_path, guest=GuestNuma(cpus=frozenset({3, 4}), memory_nodes=None))
    assert spanning.cautions == []
    assert plan(sim, tmp_path, guest=GuestNuma(memory_nodes=frozenset({0}))).cautions[0].code == Reason.NUMA_MISMATCH


def test_guest_numa_from_domain_xml():
    def numa(body: str) -> GuestNuma | None:
        return parse_domain(f"<domain type='kvm'><name>d</name>{body}<devices/></domain>").numa
    assert numa("<vcpu>2</vcpu>") == GuestNuma(None, None)
    assert numa("<vcpu cpuset='4-7,^6'>2</vcpu>") == GuestNuma(frozenset({4, 5, 7}), None)
    assert numa("<vcpu placement='auto' cpuset='4-7'>2</vcpu>") == GuestNuma(None, None)
    pinned = ("<vcpu>2</vcpu><cputune><vcpupin vcpu='0' cpuset='4'/><vcpupin vcpu='1' cpuset='5-6'/></cputune>"
              "<numatune><memory mode='strict' nodeset='1'/></numatune>")
    assert numa(pinned) == GuestNuma(frozenset({4, 5, 6}), frozenset({1}))
    # one vCPU of two pinned and no <vcpu cpuset>: the other may run anywhere
    assert numa("<vcpu>2</vcpu><cputune><vcpupin vcpu='0' cpuset='4'/></cputune>").cpus is None
    assert numa("<vcpu cpuset='bogus'>1</vcpu><numatune><memory nodeset='9-1'/></numatune>") == GuestNuma(None, None)
    assert parse_domain("<hostdev mode='subsystem' type='pci'><source><address domain='0' bus='1' slot='0' "
                        "function='0'/></source></hostdev>").numa is None


# ------------------------------------------------------------------ hostdevctl


def run(argv, sim):
    lines: list[str] = []
    rc = main(argv, sysfs=Sysfs(sim, 2.0), out=lines.append)
    return rc, "\n".join(lines)


def test_hostdevctl_plan_shows_refusal_numa_and_warnings(sim, state, tmp_path):
    sim.add_process(1020, "Xorg", fds=["/dev/dri/card1"])
    xml = tmp_path / "vm1.xml"
    xml.write_text("<domain type='kvm'><name>vm1</name><vcpu cpuset='0-1'>2</vcpu><devices>"
                   "<hostdev mode='subsystem' type='pci'><source><address domain='0' bus='1' slot='0' function='0'/>"
                   "</source></hostdev></devices></domain>")
    rc, out = run(state + ["plan", str(xml)], sim)
    assert rc == 1
    assert "refused: 0000:01:00.0 is held by Xorg[1020] (/dev/dri/card1)" in out
    assert "fix: stop Xorg[1020] first" in out
    assert "numa: 0000:01:00.0 node 1, 0000:01:00.1 node 1" in out
    assert "warning: 0000:01:00.0 is on NUMA node 1" in out
    rc, out = run(state + ["plan", str(xml), "--json"], sim)
    d = json.loads(out)
    assert d["refusals"][0]["code"] == "DEVICE_IN_USE" and d["numa"] == {"0000:01:00.0": 1, "0000:01:00.1": 1}
    assert [c["code"] for c in d["cautions"]] == ["NUMA_MISMATCH"]


def test_hostdevctl_check_shows_holders_power_and_reset(state):
    s = spec(power_state="D3cold")
    s["devices"][3]["reset_method"] = []
    sim = SimKernel(s)
    sim.add_process(812, "nvidia-persistenc", fds=["/dev/nvidia0"], unit="nvidia-persistenced.service")
    rc, out = run(state + ["check"], sim)
    assert rc == 0          # warnings: the host itself is fine
    assert "WARN  device-holders         0000:01:00.0 held by nvidia-persistenc[812] (/dev/nvidia0)" in out
    assert 'stop_units = ["nvidia-persistenced.service"]' in out
    assert "WARN  power-state            0000:01:00.0 is in D3cold: binding them may fail" in out
    assert "WARN  reset                  no reset method: 0000:02:00.0" in out
    rc, out = run(state + ["check", "--json"], sim)
    checks = {c["name"]: c for c in json.loads(out)["checks"]}
    assert {n: checks[n]["status"] for n in ("device-holders", "power-state", "reset")} == \
        {"device-holders": "warn", "power-state": "warn", "reset": "warn"}
    assert "nvidia-persistenc[812]" in checks["device-holders"]["message"]


def test_hostdevctl_check_without_holders(state):
    rc, out = run(state + ["check", "--json"], load_sim("lab"))
    checks = {c["name"]: c for c in json.loads(out)["checks"]}
    assert rc == 0 and {n: checks[n]["status"] for n in ("device-holders", "power-state")} == \
        {"device-holders": "ok", "power-state": "ok"}
    assert "no process holds any of the 11 passthrough candidates" in checks["device-holders"]["message"]
    # the lab's Q35 chipset: AHCI and SMBus have no reset method (the LPC bridge is no candidate)
    assert checks["reset"]["status"] == "warn" and "0000:00:1f.2; 0000:00:1f.3:" in checks["reset"]["message"]


# ------------------------------------------------------------------ codes


def test_reason_codes_are_listed_once_and_stable():
    reasons = {v for k, v in vars(Reason).items() if k.isupper()}
    assert set(REFUSAL_CODES) | set(WARNING_CODES) == reasons | {"REFUSED"}
    assert len(REFUSAL_CODES) == len(set(REFUSAL_CODES)) and not set(REFUSAL_CODES) & set(WARNING_CODES)
    assert all(v == k for k, v in vars(Reason).items() if k.isupper())    # the name is the code


def test_planner_refusals_carry_their_codes(tmp_path):
    engine = make_engine(load_sim("lab"), tmp_path / "state")
    engine.prepare([PciAddress.parse("0000:04:00.0")], Owner(name="web1"))
    asked = {"0000:00:02.0": Reason.BRIDGE, "0000:0f:00.0": Reason.UNKNOWN_DEVICE,
             "0000:00:10.0": Reason.HOST_CRITICAL, "0000:04:00.1": Reason.GROUP_HELD}
    p = engine.plan_prepare([PciAddress.parse(a) for a in asked], VM)
    assert {r.device: r.code for r in p.refusals} == asked
    assert all(r.code in REFUSAL_CODES for r in p.refusals)
