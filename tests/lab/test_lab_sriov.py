"""SR-IOV against the real kernel, libvirt 9.0 and the hostdevd daemon in L1.

Part 1, the normal L1 (the session ``lab``): the emulated NVMe PF gets its VFs from a
``[[sriov]]`` entry when the daemon starts (udev-timed), one VF goes to a nested L2 with a
``<hostdev>`` (started paused), the VF count cannot change while it is assigned, and after
``virsh destroy`` the VF is back where it was (driverless, autoprobe 0).

Part 2 (marked lab_igb), an L1 booted with a QEMU >= 8 from bookworm-backports that has the
emulated SR-IOV NIC ``igb`` (tests/lab/qemu-igb.sh). run-tests.sh runs these first in its
lab_l2 session, whose L1 it boots with that QEMU; run alone, the module boots its own igb L1: VF MAC, VLAN,
spoof-check and trust saved, set and restored through real netlink, next to libvirt setting
them itself, and a libvirt hostdev network (``<forward mode='hostdev'><pf dev=…/>``) whose VF
hostdevd prepares at libvirt's ``start begin`` hook, where that VF is first known.

Timings go to stdout (run with -s) and to $HOSTDEVD_LAB_DIR/sriov-timings.json.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import labvm
from labops import HCTL, drivers, leave_daemon, use_daemon

pytestmark = pytest.mark.lab

SYS = "/sys/bus/pci/devices"
HOOK_LOG_DIR = "/var/log/lab-hook-xml"
TIMINGS: dict = {}


def record(key: str, value) -> None:
    TIMINGS[key] = value
    print(f"TIMING {key} {value}", flush=True)
    try:
        path = labvm.lab_dir() / "sriov-timings.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        old.update(TIMINGS)
        path.write_text(json.dumps(old, indent=2, sort_keys=True) + "\n")
    except OSError:
        pass


def hctl(vm, *args, check=True, timeout=240):
    return vm.run([HCTL, *args], timeout=timeout, check=check)


def vfs_of(vm, pf: str) -> list[str]:
    out = vm.run(f"for v in {SYS}/{pf}/virtfn*; do [ -e $v ] && basename $(readlink -f $v); done | sort -V",
                 timeout=60).stdout
    return out.split()


def vfs_json(vm) -> dict:
    return {p["pf"]: p for p in json.loads(hctl(vm, "vfs", "--json").stdout)["pfs"]}


def start_daemon(vm, config: str) -> None:
    """hostdevd (re)started with `config`, its hook where libvirt finds it."""
    use_daemon(vm, config)


def stop_daemon(vm, pf: str | None) -> None:
    leave_daemon(vm, extra="/etc/libvirt/hooks/qemu.d/50-xml-log")
    if pf:
        vm.run(f"echo 0 > {SYS}/{pf}/sriov_numvfs; udevadm settle", timeout=120, check=False)


def l2_xml(name: str, devices: str) -> str:
    """A minimal L2 (labfn.sh's mkdom, with arbitrary devices); started paused in these tests."""
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type>
    <kernel>/var/lib/libvirt/images/l2-vmlinuz</kernel><initrd>/var/lib/libvirt/images/l2-initrd.img</initrd>
    <cmdline>console=ttyS0 panic=-1 no_timer_check quiet</cmdline></os>
  <on_reboot>destroy</on_reboot>
  <devices>
    <controller type='usb' model='none'/>
    {devices}
    <memballoon model='none'/>
  </devices>
</domain>
"""


def pci_source(bdf: str) -> str:
    d, b, rest = bdf.split(":")
    s, f = rest.split(".")
    return f"<source><address type='pci' domain='0x{d}' bus='0x{b}' slot='0x{s}' function='0x{f}'/></source>"


# =========================================================================== part 1: NVMe PF


@pytest.fixture(scope="module")
def nvme(lab):
    pf = lab.topology()["nvme_pf"]
    lab.run(f"echo 0 > {SYS}/{pf}/sriov_numvfs; echo 1 > {SYS}/{pf}/sriov_drivers_autoprobe; udevadm settle",
            timeout=120)
    start_daemon(lab, f'[[sriov]]\npf = "{pf}"\nnumvfs = 4\nautoprobe = false\nwait_timeout = 60\n')
    yield pf
    if not lab.running:        # the igb part stopped this L1 (a later boot starts from a fresh overlay)
        return
    lab.run("virsh -q destroy l2vf; virsh -q undefine l2vf", timeout=120, check=False)
    stop_daemon(lab, pf)
    lab.run(f"{HCTL} --no-daemon release --owner l2vf", timeout=120, check=False)


def test_daemon_start_creates_the_configured_vfs(lab, nvme):
    pf = nvme
    vfs = vfs_of(lab, pf)
    assert len(vfs) == 4, vfs
    assert set(drivers(lab, *vfs).values()) == {"none"}                  # autoprobe 0: driverless
    assert lab.run(f"cat {SYS}/{pf}/sriov_drivers_autoprobe", timeout=30).stdout.strip() == "0"
    groups = lab.run(f"for v in {' '.join(vfs)}; do basename $(readlink {SYS}/$v/iommu_group); done",
                     timeout=60).stdout.split()
    assert len(set(groups)) == 4                                         # a group each
    info = vfs_json(lab)[pf]
    rec = info["record"]
    assert rec["state"] == "ready" and rec["vfs"] == vfs and rec["numvfs"] == 4 and rec["autoprobe"] is False
    assert rec["seconds"] and rec["seconds"] > 0
    record("nvme_daemon_start_4vfs_s", rec["seconds"])
    # the daemon waited with udev, and said so in the journal (MESSAGE_ID sriov)
    j = lab.run("journalctl -u hostdevd -o cat MESSAGE_ID=369a8ff7b0fc4bfe95d375ece1dcce44 --no-pager | tail -5",
                timeout=60).stdout
    assert f"{pf} now has 4 VFs" in j and "seen by udev after" in j, j
    text = hctl(lab, "vfs").stdout
    print("$ hostdevctl vfs\n" + text)
    assert f"PF {pf} - (nvme): 4 of 16 VFs, autoprobe off, set by hostdevd: ready" in text, text


def test_vfs_set_through_the_daemon_and_timings(lab, nvme):
    pf = nvme
    creates, removes, walls = [], [], []
    for _ in range(3):
        r = hctl(lab, "vfs", "set", pf, "0", "--json")
        walls.append(round(r.seconds, 3))
        data = json.loads(r.stdout)
        assert data["vfs"] == [] and data["remove_seconds"] is not None
        removes.append(data["remove_seconds"])
        r = hctl(lab, "vfs", "set", pf, "8", "--json")
        data = json.loads(r.stdout)
        assert data["ok"] and len(data["vfs"]) == 8 and data["waiter"] == "udev"
        assert "done by the hostdevd daemon" in data["notes"]
        creates.append(data["seconds"])
    record("nvme_8vfs_create_udev_s", creates)
    record("nvme_vfs_remove_write_s", removes)
    record("nvme_hostdevctl_vfs_set_0_wall_s", walls)
    r = hctl(lab, "vfs", "set", pf, "4")
    print(f"$ hostdevctl vfs set {pf} 4\n" + r.stdout)
    assert r.stdout.startswith(f"PF {pf}: 4 VFs set in ") and "(udev)" in r.stdout, r.stdout
    r = hctl(lab, "vfs", "set", pf, "4")
    assert "(unchanged)" in r.stdout


@pytest.mark.lab_trixie
def test_vf_to_l2_refuses_numvfs_change_and_comes_back(lab, nvme):
    pf = nvme
    vfs = vfs_of(lab, pf)
    vf = vfs[1]
    assert drivers(lab, vf) == {vf: "none"}
    lab.labsh(f"mkdom l2vf {vf} && virsh -q define /root/l2vf.xml", timeout=120)
    t0 = time.monotonic()
    lab.run("virsh start --paused l2vf", timeout=300)
    record("nvme_vf_l2_start_paused_s", round(time.monotonic() - t0, 2))
    try:
        assert drivers(lab, vf) == {vf: "vfio-pci"}
        row = [v for v in vfs_json(lab)[pf]["vfs"] if v["address"] == vf][0]
        assert row["owner"] == "l2vf" and row["driver"] == "vfio-pci"
        print("$ hostdevctl vfs\n" + hctl(lab, "vfs").stdout)
        r = hctl(lab, "vfs", "set", pf, "2", check=False)
        print(f"$ hostdevctl vfs set {pf} 2   # exit {r.rc}\n" + r.stdout)
        assert r.rc == 1, r
        assert "REFUSED" in r.stdout and "while VFs are assigned" in r.stdout and "l2vf" in r.stdout, r.stdout
        assert vfs_of(lab, pf) == vfs                                    # nothing changed
        # writing the count by hand would destroy the running guest's device: hostdevd refused; the
        # kernel itself only refuses N -> M (EBUSY), never N -> 0
        status = json.loads(hctl(lab, "status", "--json").stdout)
        assert {c["owner"]["name"] for c in status["claims"].values()} == {"l2vf"}
    finally:
        lab.run("virsh destroy l2vf", timeout=120, check=False)
    deadline = time.monotonic() + 60
    while drivers(lab, vf)[vf] != "none" and time.monotonic() < deadline:
        time.sleep(1)
    assert drivers(lab, vf) == {vf: "none"}                              # back to its prior state
    assert lab.run(f"cat {SYS}/{vf}/driver_override", timeout=30).stdout.strip() == "(null)"
    assert json.loads(hctl(lab, "status", "--json").stdout)["claims"] == {}
    r = hctl(lab, "vfs", "set", pf, "2")                                 # allowed again
    assert len(vfs_of(lab, pf)) == 2, r


def test_contention_8_vfs_and_4_domains_on_the_pair(lab, nvme):
    """8 concurrent prepares of 8 VFs and 4 domains started at once that all want the pair:
    every group ends with exactly one owner, every loser is refused naming the holder, and
    every VF comes back (issue 12)."""
    pf = nvme
    hctl(lab, "vfs", "set", pf, "8")
    vfs = vfs_of(lab, pf)
    assert len(vfs) == 8
    pair = lab.topology()["nic2a"]
    doms = ["ct1", "ct2", "ct3", "ct4"]
    for d in doms:
        lab.labsh(f"mkdom {d} {pair} && virsh -q define /root/{d}.xml", timeout=120)
    jobs = [f"({HCTL} prepare --owner vfct{i} --device {vf} > /tmp/ct/vfct{i}.out 2>&1; echo $? > /tmp/ct/vfct{i}.rc) &"
            for i, vf in enumerate(vfs)]
    jobs += [f"(virsh start --paused {d} > /tmp/ct/{d}.out 2>&1; echo $? > /tmp/ct/{d}.rc) &" for d in doms]
    t0 = time.monotonic()
    # "A && B && (job) &" would put A and B in the background too: separate them with ";"
    lab.run("rm -rf /tmp/ct; mkdir /tmp/ct; " + " ".join(jobs) + " wait", timeout=600)
    wall = round(time.monotonic() - t0, 1)
    try:
        names = [f"vfct{i}" for i in range(8)] + doms
        got = {n: (int(lab.run(f"cat /tmp/ct/{n}.rc", timeout=30).stdout), lab.run(f"cat /tmp/ct/{n}.out",
                   timeout=30).stdout) for n in names}
        held = json.loads(hctl(lab, "status", "--json").stdout)["claims"]
        owner_of = {d["address"]: c["owner"]["name"] for c in held.values() for d in c["devices"]}
        # each group has one claim, so one owner: the ledger is keyed by group
        winners = [n for n in names if got[n][0] == 0]
        assert {c["owner"]["name"] for c in held.values()} == set(winners), (winners, held)
        dom_winners = [d for d in doms if got[d][0] == 0]
        assert len(dom_winners) == 1, {d: got[d] for d in doms}
        for i, vf in enumerate(vfs):
            n = f"vfct{i}"
            assert owner_of.get(vf) is not None, f"{vf} has no owner"
            if got[n][0] != 0:
                assert owner_of[vf] in got[n][1], f"{n} refused without naming {owner_of[vf]}: {got[n][1]}"
        for d in doms:
            if d not in dom_winners:
                assert dom_winners[0] in got[d][1], f"{d} refused without naming {dom_winners[0]}: {got[d][1]}"
        record("contention", {"vf_prepares": 8, "vf_won": sum(got[f"vfct{i}"][0] == 0 for i in range(8)),
                              "domains": 4, "domain_won": dom_winners[0], "wall_s": wall,
                              "groups_with_one_owner": len(held)})
        print("$ hostdevctl status\n" + hctl(lab, "status").stdout)
    finally:
        lab.run("for d in ct1 ct2 ct3 ct4; do virsh -q destroy $d; virsh -q undefine $d; done", timeout=300,
                check=False)
        for i in range(8):
            hctl(lab, "release", "--owner", f"vfct{i}", check=False)
    deadline = time.monotonic() + 120
    while set(drivers(lab, *vfs).values()) != {"none"} and time.monotonic() < deadline:
        time.sleep(2)
    assert set(drivers(lab, *vfs).values()) == {"none"}, drivers(lab, *vfs)
    assert json.loads(hctl(lab, "status", "--json").stdout)["claims"] == {}
    hctl(lab, "vfs", "set", pf, "2")


# =========================================================================== part 2: igb


@pytest.fixture(scope="module")
def igb_lab(request, lab):
    """The L1 with the igb PF. run-tests.sh boots its lab_l2 session's L1 with it
    (HOSTDEVD_LAB_IGB=1, conftest), so these tests reuse that L1. Run any other way, the session
    L1 is stopped, the igb variant booted for this module, and the session L1 booted again
    afterwards only if later tests of the session use it."""
    if lab.has_igb:
        yield lab
        return
    items = request.session.items
    mine = [i for i, it in enumerate(items) if it.module is request.module]
    later = any("lab" in it.fixturenames for it in items[max(mine) + 1:]) if mine else False
    def session_lab_back() -> None:
        if later:
            lab.boot(share_dir=labvm.REPO_ROOT)
            lab.install_hostdevd()

    lab.stop()
    try:
        wrapper = labvm.igb_qemu()
    except labvm.LabError as e:
        session_lab_back()
        pytest.fail(str(e), pytrace=False)
    old = os.environ.get("QEMU")
    os.environ["QEMU"] = wrapper
    vm = labvm.LabVM()
    try:
        t = vm.boot(share_dir=labvm.REPO_ROOT)
        record("igb_l1_boot_s", round(t, 1))
        vm.install_hostdevd()
    except labvm.LabError as e:
        vm.stop(force=True)
        session_lab_back()
        pytest.fail(f"booting the igb L1 variant failed:\n{e}", pytrace=False)
    finally:
        if old is None:
            os.environ.pop("QEMU", None)
        else:
            os.environ["QEMU"] = old
    try:
        yield vm
    finally:
        vm.stop()
        session_lab_back()


@pytest.fixture(scope="module")
def igb(igb_lab):
    vm = igb_lab
    pf = vm.run(f"ls -d {SYS}/0000:00:08.0/0000:??:??.? | head -1 | xargs basename", timeout=30).stdout.strip()
    assert pf, "no igb PF under 00:08.0"
    net = vm.run(f"ls {SYS}/{pf}/net", timeout=30).stdout.split()[0]
    assert vm.run(f"cat {SYS}/{pf}/sriov_totalvfs", timeout=30).stdout.strip() == "7"
    vm.run(f"ip link set {net} up", timeout=30)
    # a logging hook that keeps the XML libvirt hands to prepare/start (hostdev network check)
    vm.run(f"mkdir -p /etc/libvirt/hooks/qemu.d {HOOK_LOG_DIR}", timeout=30)
    vm.write_text("/etc/libvirt/hooks/qemu.d/50-xml-log",
                  f"#!/bin/sh\ncat > {HOOK_LOG_DIR}/$1-$2-$3.xml\nexit 0\n")
    vm.run("chmod 755 /etc/libvirt/hooks/qemu.d/50-xml-log", timeout=30)
    t0 = time.monotonic()
    start_daemon(vm, f'[[sriov]]\npf = "{net}"\nnumvfs = 4\nautoprobe = false\nwait_timeout = 60\n')
    record("igb_daemon_start_wall_s", round(time.monotonic() - t0, 1))
    yield {"pf": pf, "net": net, "vfs": vfs_of(vm, pf)}
    vm.run("for d in l2nic l2mgd l2net; do virsh -q destroy $d; virsh -q undefine $d; done; "
           "virsh -q net-destroy vfpool; virsh -q net-undefine vfpool", timeout=180, check=False)
    stop_daemon(vm, pf)


def vf_line(vm, net: str, index: int) -> str:
    out = vm.run(f"ip link show {net}", timeout=30).stdout
    return [line.strip() for line in out.splitlines() if line.strip().startswith(f"vf {index} ")][0]


@pytest.mark.lab_igb
def test_igb_vfs_created_by_netdev_name(igb_lab, igb):
    vm, pf = igb_lab, igb["pf"]
    assert len(igb["vfs"]) == 4 and set(drivers(vm, *igb["vfs"]).values()) == {"none"}
    info = vfs_json(vm)[pf]
    assert info["netdev"] == igb["net"] and info["record"]["state"] == "ready"
    record("igb_daemon_start_4vfs_s", info["record"]["seconds"])
    assert [v["mac"] for v in info["vfs"]] == ["00:00:00:00:00:00"] * 4          # netlink, through the PF
    assert [v["vlan"] for v in info["vfs"]] == [0] * 4
    print(hctl(vm, "vfs").stdout)


@pytest.mark.lab_igb
def test_igb_interface_hostdev_managed_no_saved_set_restored(igb_lab, igb):
    """hostdevd saves, sets after the bind, restores on release; libvirt sets the same values
    (its Loop 4) and restores its own snapshot first: the VF ends exactly as it was."""
    vm, net, vf = igb_lab, igb["net"], igb["vfs"][1]
    # a non-default starting point, so that "restored" means something
    vm.run(f"ip link set {net} vf 1 mac 02:00:00:00:01:01 spoofchk off trust on", timeout=30)
    before = vf_line(vm, net, 1)
    assert "02:00:00:00:01:01" in before and "trust on" in before
    mac = "52:54:00:6d:90:11"
    vm.write_text("/root/l2nic.xml", l2_xml("l2nic", f"<interface type='hostdev' managed='no'><mac address='{mac}'/>"
                                                     f"{pci_source(vf)}<vlan><tag id='42'/></vlan></interface>"))
    vm.run("virsh -q define /root/l2nic.xml", timeout=60)
    vm.run("virsh start --paused l2nic", timeout=300)
    try:
        line = vf_line(vm, net, 1)
        assert mac in line and "vlan 42" in line, line
        assert drivers(vm, vf) == {vf: "vfio-pci"}
        claim = list(json.loads(hctl(vm, "status", "--json").stdout)["claims"].values())[0]
        cfg = claim["devices"][0]["vf_netconfig"]
        assert (cfg["state"], cfg["mac"], cfg["vlan"], cfg["spoofchk"], cfg["trust"]) == (
            "set", "02:00:00:00:01:01", 0, False, True), cfg
        assert (cfg["requested_mac"], cfg["requested_vlan"]) == (mac, 42)
        print("$ hostdevctl vfs\n" + hctl(vm, "vfs").stdout)
        print(f"$ ip link show {net} | grep 'vf 1'\n    " + vf_line(vm, net, 1))
    finally:
        vm.run("virsh destroy l2nic", timeout=120, check=False)
    deadline = time.monotonic() + 60
    while json.loads(hctl(vm, "status", "--json").stdout)["claims"] and time.monotonic() < deadline:
        time.sleep(1)
    assert vf_line(vm, net, 1) == before                                  # MAC, VLAN, spoofchk, trust
    assert drivers(vm, vf) == {vf: "none"}
    j = vm.run("journalctl -u hostdevd -o cat MESSAGE_ID=369a8ff7b0fc4bfe95d375ece1dcce44 --no-pager | tail -8",
               timeout=60).stdout
    print("$ journalctl -u hostdevd MESSAGE_ID=369a8ff7b0fc4bfe95d375ece1dcce44 (sriov)\n" + j)
    assert f"saved VF {vf}" in j and f"set VF {vf}" in j and f"restored VF {vf}" in j, j


@pytest.mark.lab_igb
def test_igb_interface_hostdev_managed_yes_is_libvirts(igb_lab, igb):
    """managed='yes': libvirt sets MAC/VLAN itself; hostdevd records and verifies, never writes."""
    vm, net, vf = igb_lab, igb["net"], igb["vfs"][2]
    before = vf_line(vm, net, 2)
    mac = "52:54:00:6d:90:22"
    vm.write_text("/root/l2mgd.xml", l2_xml("l2mgd", f"<interface type='hostdev' managed='yes'><mac address='{mac}'/>"
                                                     f"{pci_source(vf)}<vlan><tag id='7'/></vlan></interface>"))
    vm.run("virsh -q define /root/l2mgd.xml", timeout=60)
    vm.run("virsh start --paused l2mgd", timeout=300)
    try:
        line = vf_line(vm, net, 2)
        assert mac in line and "vlan 7" in line, line                    # set by libvirt
        claim = list(json.loads(hctl(vm, "status", "--json").stdout)["claims"].values())[0]
        cfg = claim["devices"][0]["vf_netconfig"]
        assert cfg["state"] == "libvirt" and cfg["requested_mac"] == mac and cfg["requested_vlan"] == 7
        time.sleep(3)   # the STARTED event's verification ran: no "started but VF" warning
        j = vm.run("journalctl -u hostdevd -o cat --no-pager | tail -20", timeout=60).stdout
        assert "started but VF" not in j, j
    finally:
        vm.run("virsh destroy l2mgd", timeout=120, check=False)
    deadline = time.monotonic() + 60
    while json.loads(hctl(vm, "status", "--json").stdout)["claims"] and time.monotonic() < deadline:
        time.sleep(1)
    assert vf_line(vm, net, 2) == before                                  # libvirt restored it
    assert drivers(vm, vf) == {vf: "none"}


# managed='yes' first: after libvirt has used a VF unmanaged, libvirt 9.0 keeps it in its inactive
# list as unmanaged and does not reattach it after a later managed use (seen in this lab; see README).
@pytest.mark.lab_igb
@pytest.mark.parametrize("managed", ["yes", "no"])
def test_igb_hostdev_network(igb_lab, igb, managed):
    """libvirt 9.0 picks a hostdev network's VF after the prepare hook: 'prepare begin' sees only
    <interface type='network'>, 'start begin' shows the chosen VF. managed='no': libvirt wants the
    VF on vfio-pci before 'start begin', so hostdevd prepares the VF libvirt will pick at 'prepare
    begin' (pool resolved from the network XML); managed='yes': libvirt binds it, hostdevd claims it
    at 'start begin'. Either way libvirt sets and restores the VF's MAC; hostdevd records it."""
    vm, net = igb_lab, igb["net"]
    vm.write_text("/root/vfpool.xml", f"<network><name>vfpool</name><forward mode='hostdev' managed='{managed}'>"
                                      f"<pf dev='{net}'/></forward></network>")
    vm.run("virsh -q net-destroy vfpool; virsh -q net-undefine vfpool", timeout=120, check=False)
    vm.run("virsh -q net-define /root/vfpool.xml && virsh -q net-start vfpool", timeout=120)
    vm.write_text("/root/l2net.xml", l2_xml("l2net", "<interface type='network'><mac address='52:54:00:6d:90:33'/>"
                                                     "<source network='vfpool'/></interface>"))
    vm.run(f"virsh -q undefine l2net; virsh -q define /root/l2net.xml; rm -f {HOOK_LOG_DIR}/l2net-*", timeout=60)
    before = {i: vf_line(vm, net, i) for i in range(len(igb["vfs"]))}
    r = vm.run("virsh start --paused l2net", timeout=300, check=False)
    try:
        prep = vm.read_text(f"{HOOK_LOG_DIR}/l2net-prepare-begin.xml")
        assert "<source network='vfpool'" in prep and "<actual" not in prep and "type='hostdev'" not in prep, prep
        assert r.rc == 0, r
        start = vm.read_text(f"{HOOK_LOG_DIR}/l2net-start-begin.xml")
        iface = start[start.index("<interface"):start.index("</interface>") + 12]
        print(f"managed='{managed}': start begin interface XML:\n" + iface)
        assert "type='hostdev'" in iface, iface
        status = json.loads(hctl(vm, "status", "--json").stdout)
        (claim,) = status["claims"].values()
        (dev,) = claim["devices"]
        assert claim["owner"]["name"] == "l2net" and dev["address"] in igb["vfs"]
        m = re.search(r"<address type='pci' domain='0x([0-9a-f]+)' bus='0x([0-9a-f]+)' slot='0x([0-9a-f]+)' "
                      r"function='0x([0-9a-f])'", iface)
        assert m and "{:04x}:{:02x}:{:02x}.{:x}".format(*tuple(int(x, 16) for x in m.groups())) == dev["address"], iface
        assert drivers(vm, dev["address"]) == {dev["address"]: "vfio-pci"}
        assert dev["bound_by_us"] is (managed == "no")          # managed='yes': libvirt bound it
        cfg = dev["vf_netconfig"]
        assert cfg["state"] == "libvirt" and cfg["requested_mac"] == "52:54:00:6d:90:33"
        assert "52:54:00:6d:90:33" in vf_line(vm, net, cfg["vf_index"])   # set by libvirt
        record(f"hostdev_network_{managed}_start_begin_interface_xml", iface)
    finally:
        vm.run("virsh destroy l2net", timeout=120, check=False)
    deadline = time.monotonic() + 60
    while json.loads(hctl(vm, "status", "--json").stdout)["claims"] and time.monotonic() < deadline:
        time.sleep(1)
    assert json.loads(hctl(vm, "status", "--json").stdout)["claims"] == {}
    assert set(drivers(vm, *igb["vfs"]).values()) == {"none"}
    assert {i: vf_line(vm, net, i) for i in range(len(igb["vfs"]))} == before
    j = vm.run("journalctl -u hostdevd -o cat --no-pager | tail -30", timeout=60).stdout
    assert "does not fight libvirt" not in j and "started but VF" not in j, j
