"""hostdevd against the real kernel in L1: groups, checks, prepare/release of every lab shape,
exact driver restoration, and a nested L2 domain that only starts viable with hostdevd."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from labops import HCTL

pytestmark = pytest.mark.lab
# also run in the Debian 13 lab (hostdevd from its package, the daemon running)
both_stacks = pytest.mark.lab_trixie

SYS = "/sys/bus/pci/devices"


def hctl(lab, *args, check=True, timeout=180):
    return lab.run([HCTL, *args], timeout=timeout, check=check)


def drivers(lab, *bdfs):
    """driver and driver_override of each device, read from sysfs in one guest call."""
    script = ("for b in {}; do d={}/$b; printf '%s %s %s\\n' $b "
              "\"$([ -e $d/driver ] && basename $(readlink $d/driver) || echo none)\" "
              "\"$(cat $d/driver_override)\"; done").format(" ".join(bdfs), SYS)
    out = lab.run(script, timeout=60).stdout.split("\n")
    return {p[0]: (p[1], p[2]) for p in (line.split() for line in out) if len(p) == 3}


@pytest.fixture
def clean_ledger(lab):
    yield
    status = json.loads(hctl(lab, "status", "--json").stdout)
    assert status["claims"] == {}, f"test left claims behind: {status['claims']}"


def test_groups_match_the_kernel(lab):
    kernel = json.loads(lab.run(
        "python3 -c 'import os,json; b=\"/sys/kernel/iommu_groups\"; "
        "print(json.dumps({g: sorted(os.listdir(b+\"/\"+g+\"/devices\")) for g in os.listdir(b)}))'",
        timeout=60).stdout)
    ours = json.loads(hctl(lab, "groups", "--json").stdout)
    assert {str(g["group"]): [d["address"] for d in g["devices"]] for g in ours["groups"]} == kernel
    # every group the kernel reports, in order, with bridges flagged from the header type
    topo = lab.topology()
    by_addr = {d["address"]: d for g in ours["groups"] for d in g["devices"]}
    assert by_addr[topo["pcibr"]]["bridge"] is True and by_addr[topo["nic3a"]]["bridge"] is False
    assert by_addr[topo["nic1"]]["vendor"] == "8086" and by_addr[topo["nic1"]]["device"] == "10d3"


def test_check_in_guest_reports_iommu_and_remapping(lab):
    r = hctl(lab, "check", "--json", check=False)
    checks = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
    assert checks["iommu"]["status"] == "ok" and "dmar" in checks["iommu"]["message"]
    assert checks["interrupt-remapping"]["status"] == "ok"
    assert checks["vfio-modules"]["status"] == "ok"
    assert r.rc == 0


def test_check_on_this_host_without_iommu():
    has_iommu = any(Path("/sys/class/iommu").glob("*"))
    r = subprocess.run([sys.executable, "-m", "hostdevd.doors.cli", "check"], capture_output=True, text=True,
                       timeout=120)
    if has_iommu:  # pragma: no cover - CI machines have none
        assert r.returncode == 0, r.stdout
    else:
        assert r.returncode == 1 and "no IOMMU" in r.stdout, r.stdout + r.stderr


@both_stacks
@pytest.mark.parametrize("name,companions,bridges", [
    ("nic1", [], []),
    ("nic2a", ["nic2b"], []),
    ("nic3a", ["nic3b"], ["pcibr"]),
])
def test_prepare_release_restores_drivers(lab, clean_ledger, name, companions, bridges):
    topo = lab.topology()
    dev = topo[name]
    watched = [dev] + [topo[c] for c in companions] + [topo[b] for b in bridges]
    before = drivers(lab, *watched)
    group = lab.pci_info(dev)["iommu_group"]
    hctl(lab, "prepare", "--device", dev, "--owner", f"lab-{name}")
    during = drivers(lab, *watched)
    for bdf in [dev] + [topo[c] for c in companions]:
        assert during[bdf][0] == "vfio-pci", during
    for b in bridges:
        assert during[topo[b]] == before[topo[b]], "bridge touched"
    assert lab.run(f"test -c /dev/vfio/{group}", timeout=10, check=False).ok
    claim = json.loads(hctl(lab, "status", "--json").stdout)["claims"][str(group)]
    assert {d["address"] for d in claim["devices"]} == {dev} | {topo[c] for c in companions}
    hctl(lab, "release", "--owner", f"lab-{name}")
    assert drivers(lab, *watched) == before


def test_preset_driver_override_is_restored(lab, clean_ledger):
    nic = lab.topology()["nic4b"]
    lab.run(f"echo e1000e > {SYS}/{nic}/driver_override", timeout=10)
    try:
        assert drivers(lab, nic)[nic] == ("e1000e", "e1000e")
        hctl(lab, "prepare", "--device", nic, "--owner", "lab-override")
        assert drivers(lab, nic)[nic] == ("vfio-pci", "vfio-pci")
        hctl(lab, "release", "--owner", "lab-override")
        assert drivers(lab, nic)[nic] == ("e1000e", "e1000e")
    finally:
        lab.run(f"echo > {SYS}/{nic}/driver_override", timeout=10)


def test_nvme_vf_prepare_release(lab, clean_ledger):
    pf = lab.topology()["nvme_pf"]
    lab.run(f"echo 0 > {SYS}/{pf}/sriov_drivers_autoprobe; echo 0 > {SYS}/{pf}/sriov_numvfs; "
            f"echo 2 > {SYS}/{pf}/sriov_numvfs; udevadm settle", timeout=120)
    try:
        vf = Path(lab.run(f"readlink {SYS}/{pf}/virtfn1", timeout=10).stdout.strip()).name
        assert drivers(lab, vf)[vf] == ("none", "(null)")
        vf_group = lab.pci_info(vf)["iommu_group"]
        assert vf_group != lab.pci_info(pf)["iommu_group"]
        hctl(lab, "prepare", "--device", vf, "--owner", "lab-vf")
        assert drivers(lab, vf, pf) == {vf: ("vfio-pci", "vfio-pci"), pf: ("nvme", "(null)")}
        hctl(lab, "release", "--owner", "lab-vf")
        # autoprobe off: the VF goes back to having no driver, as before
        assert drivers(lab, vf)[vf] == ("none", "(null)")
    finally:
        lab.run(f"echo 0 > {SYS}/{pf}/sriov_numvfs; udevadm settle", timeout=120, check=False)


def test_l2_domain_not_viable_without_hostdevd_and_starts_with_it(lab, clean_ledger):
    topo = lab.topology()
    a, b = topo["nic2a"], topo["nic2b"]
    lab.labsh(f"mkdom l2mf {a} && virsh -q define /root/l2mf.xml", timeout=120)
    try:
        r = lab.run("virsh start l2mf", timeout=300, check=False)
        assert r.rc != 0 and "not viable" in (r.stdout + r.stderr), r
        assert drivers(lab, a, b) == {a: ("e1000e", "(null)"), b: ("e1000e", "(null)")}

        hctl(lab, "prepare", "/root/l2mf.xml")
        assert drivers(lab, a, b) == {a: ("vfio-pci", "vfio-pci"), b: ("vfio-pci", "vfio-pci")}
        r = lab.run("virsh start l2mf", timeout=300, check=False)
        assert r.rc == 0, r
        assert lab.run("virsh domstate l2mf", timeout=60).stdout.strip() == "running"
        lab.run("virsh destroy l2mf", timeout=120)
        hctl(lab, "release", "/root/l2mf.xml")
        assert drivers(lab, a, b) == {a: ("e1000e", "(null)"), b: ("e1000e", "(null)")}
    finally:
        lab.run("virsh -q destroy l2mf; virsh -q undefine l2mf", timeout=120, check=False)
        hctl(lab, "release", "/root/l2mf.xml", check=False)


# What L1 itself depends on, read straight from its sysfs and /proc (not through hostdevd):
# the 9p share's virtio device (by mount_tag), the guest agent's virtio-serial device (by port
# name), the kernel command line and where ttyS0 sits.
_L1_FACTS = r"""
import json, os
out = {"tags": {}, "ports": {}}
for v in os.listdir("/sys/bus/virtio/devices"):
    p = "/sys/bus/virtio/devices/" + v
    try:
        tag = open(p + "/mount_tag", "rb").read().rstrip(b"\0\n").decode()
    except OSError:
        continue
    out["tags"][tag] = os.path.basename(os.path.dirname(os.path.realpath(p)))
for v in os.listdir("/sys/class/virtio-ports"):
    p = "/sys/class/virtio-ports/" + v
    try:
        name = open(p + "/name").read().strip()
    except OSError:
        continue
    out["ports"][name] = os.path.realpath(p).split("/")[-4]   # .../<bdf>/virtioN/virtio-ports/vportNpM
out["ttyS0"] = os.path.realpath("/sys/class/tty/ttyS0")
out["cmdline"] = open("/proc/cmdline").read()
out["mounts"] = [[l.split(" - ")[1].split()[0], l.split(" - ")[1].split()[1], l.split()[4]]
                 for l in open("/proc/self/mountinfo")]
print(json.dumps(out))
"""


def test_host_critical_share_and_agent_channel(lab):
    """Issue 12 item 5 on L1: the virtio-9p device behind /mnt/src and the virtio-serial device
    of the guest agent (the harness's only way in) are host-critical with their reasons;
    console=ttyS0 is the ISA port on the LPC (no PCI function), so it marks nothing;
    policy.critical adds a device by interface name."""
    import re
    facts = json.loads(lab.run(["python3", "-c", _L1_FACTS], timeout=60).stdout)
    assert ["9p", "src", "/mnt/src"] in facts["mounts"], facts["mounts"]
    ninep = facts["tags"]["src"]
    agent = facts["ports"]["org.qemu.guest_agent.0"]
    bdf = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
    assert bdf.match(ninep) and bdf.match(agent) and ninep != agent, facts
    assert "console=ttyS0" in facts["cmdline"]
    assert not re.search(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]", facts["ttyS0"]), facts["ttyS0"]

    critical = json.loads(hctl(lab, "groups", "--json").stdout)["critical"]
    assert critical.get(ninep) == "virtio device of the mounted 9p share 'src' (/mnt/src)", critical
    assert critical.get(agent) == "virtio-serial channel org.qemu.guest_agent.0 (host agent)", critical
    assert not any("console=" in reason for reason in critical.values()), critical
    topo = lab.topology()
    assert not set(critical) & set(topo.values()), critical        # no test device is marked

    for dev, reason in ((ninep, "9p share 'src'"), (agent, "org.qemu.guest_agent.0 (host agent)")):
        r = hctl(lab, "plan", "--json", "--device", dev, "--owner", "lab-critical", check=False)
        plan = json.loads(r.stdout)
        assert r.rc != 0 and not plan["ok"], plan
        assert any("host-critical" in x["reason"] and reason in x["reason"] for x in plan["refusals"]), plan

    nic1 = topo["nic1"]
    ifname = lab.run(f"ls {SYS}/{nic1}/net", timeout=30).stdout.split()[0]
    lab.write_text("/root/critical.toml", f'[policy]\ncritical = ["net:{ifname}"]\n')
    try:
        r = hctl(lab, "--config", "/root/critical.toml", "plan", "--json", "--device", nic1,
                 "--owner", "lab-critical", check=False)
        plan = json.loads(r.stdout)
        assert not plan["ok"] and any(f"listed in policy.critical (net:{ifname})" in x["reason"]
                                      for x in plan["refusals"]), plan
        r = hctl(lab, "plan", "--json", "--device", nic1, "--owner", "lab-critical", check=False)
        assert json.loads(r.stdout)["ok"], r.stdout
    finally:
        lab.run("rm -f /root/critical.toml", timeout=30, check=False)
