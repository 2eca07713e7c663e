"""Reboots and power cuts on a real kernel (issue 12): the ledger is never trusted over it.

* Reboot: an autostarted domain holds one function of the multifunction pair (its sibling
  follows as a companion) and a reservation holds nic4b's group; L1 reboots on the same disk;
  hostdevd starts before libvirtd and releases the claims of the earlier boot; the reservation
  binds its group again and libvirt's autostart prepares the pair afresh: one claim each, of the
  new boot, nothing stale.
* Power cut: L1's QEMU is killed while hostdevd is half-way through a prepare (pair) and a
  release (nic3's group), at two pairs of points between sysfs writes (the fault knob's
  "pause"). On the same disk again, the ledger parses, names every original driver, hostdevd
  releases what the dead boot held, `hostdevctl check` finds the host consistent, and the
  domains start and stop cleanly.

Marked lab_l2 (the autostarted domain runs: autostart cannot start it paused) and lab_reboot
(L1 is in a new boot afterwards), so these run last, in the second lab session.
"""
from __future__ import annotations

import json
import time

import pytest
from labops import (
    HCTL,
    claims,
    disable_fault_knob,
    drivers,
    enable_fault_knob,
    journal,
    set_fault,
    wait_active,
    wait_drivers,
    wait_paused,
)
from test_lab_faults import record

pytestmark = [pytest.mark.lab, pytest.mark.lab_l2, pytest.mark.lab_reboot]

TOML = "/etc/hostdevd/hostdevd.toml"
LEDGER_RECOVERED = "32419ca978d040cfadcb3129768f9155"   # logfields: ledger_recovered


def boot_id(lab) -> str:
    return lab.run("cat /proc/sys/kernel/random/boot_id", timeout=30).stdout.strip()


def wait_for(lab, cmd: str, timeout: int, what: str) -> None:
    r = lab.run(f"for i in $(seq {timeout}); do {cmd} && exit 0; sleep 1; done; exit 1",
                timeout=timeout + 60, check=False)
    assert r.rc == 0, f"{what} within {timeout} s"


@pytest.fixture(scope="module")
def enabled(lab):
    """hostdevd installed as a boot service (enabled: it must start before libvirtd at boot)."""
    topo = lab.topology()
    lab.run(f"mkdir -p /etc/hostdevd && [ -e {TOML}.orig ] || cp {TOML} {TOML}.orig 2>/dev/null; true",
            timeout=60)
    lab.put(f'reserve = ["{topo["nic4b"]}"]\n'.encode(), TOML, mode="644")
    lab.run("/opt/hostdevd/bin/hostdevd install && systemctl enable hostdevd && systemctl restart libvirtd",
            timeout=240)
    enable_fault_knob(lab)
    yield topo
    if not lab.running:
        return
    lab.run("for d in rb1 pp pr; do virsh -q destroy $d; virsh -q autostart --disable $d; virsh -q undefine $d; "
            f"{HCTL} release --owner $d; done", timeout=300, check=False)
    disable_fault_knob(lab)
    lab.run(f"systemctl disable --now hostdevd; rm -f {TOML}; [ -e {TOML}.orig ] && mv {TOML}.orig {TOML}; "
            "rm -f /etc/libvirt/hooks/qemu.d/hostdevd; systemctl restart libvirtd", timeout=240, check=False)
    lab.run(f"{HCTL} --no-daemon release --owner reserved", timeout=120, check=False)


def test_reboot_autostarted_domain_and_reservation_come_back_whole(lab, enabled):
    topo = enabled
    a, b, r = topo["nic2a"], topo["nic2b"], topo["nic4b"]
    # type qemu: after a reboot libvirtd may start before kvm is loaded (see README, L1 stalls)
    lab.labsh(f"mkdom rb1 {b} && sed -i \"s/<domain type='kvm'>/<domain type='qemu'>/\" /root/rb1.xml && "
              "virsh -q define /root/rb1.xml && virsh -q autostart rb1 && virsh -q start rb1", timeout=180)
    before = boot_id(lab)
    held = claims(lab)
    assert {c["owner"]["name"] for c in held.values()} == {"rb1", "reserved"}, held
    assert {c["boot_id"] for c in held.values()} == {before}
    assert drivers(lab, a, b, r) == {a: "vfio-pci", b: "vfio-pci", r: "vfio-pci"}

    seconds = lab.restart()                                  # a reboot on the same disk
    after = boot_id(lab)
    assert after != before
    wait_for(lab, "[ \"$(virsh domstate rb1 2>/dev/null)\" = running ]", 240, "rb1 autostarted")
    wait_active(lab)
    assert wait_drivers(lab, {a: "vfio-pci", b: "vfio-pci", r: "vfio-pci"}) == \
        {a: "vfio-pci", b: "vfio-pci", r: "vfio-pci"}
    held = claims(lab)
    by_owner = {c["owner"]["name"]: c for c in held.values()}
    assert sorted(c["owner"]["name"] for c in held.values()) == ["rb1", "reserved"], held
    assert {c["boot_id"] for c in held.values()} == {after}, "a claim of the earlier boot is left"
    assert {d["address"]: d["role"] for d in by_owner["rb1"]["devices"]} == {a: "companion", b: "requested"}
    assert by_owner["reserved"]["reserved"]
    said = journal(lab, "-b -u hostdevd")
    assert f"claimed before the host rebooted (boot {before})" in said, said[-3000:]
    record("reboot", {"l1_back_s": round(seconds, 1), "domain": "running, both functions on vfio-pci",
                      "claims_after": 2, "stale_after": 0})
    lab.run("virsh -q destroy rb1; virsh -q autostart --disable rb1", timeout=120)
    assert wait_drivers(lab, {a: "e1000e", b: "e1000e"}) == {a: "e1000e", b: "e1000e"}
    assert [c["owner"]["name"] for c in claims(lab).values()] == ["reserved"]


# the points of each cut: (prepare of the pair for pp, release of nic3's group by pr)
def cut_points(topo: dict, pair_group: str, nic3_group: str) -> list[tuple[str, str]]:
    b = topo["nic2b"]
    return [(f"bind:{b}", f"restore:{topo['nic3a']}"),     # after the first function's writes
            (f"activate:{pair_group}", f"drop:{nic3_group}")]  # after every write, before the record


def test_power_cut_during_prepare_and_release(lab, enabled):
    topo = enabled
    a, b, c3a, c3b = topo["nic2a"], topo["nic2b"], topo["nic3a"], topo["nic3b"]
    lab.run(f"{HCTL} release --owner reserved; printf '' > {TOML}", timeout=120, check=False)
    lab.labsh(f"mkdom pp {a} && virsh -q define /root/pp.xml && mkdom pr {c3a} && virsh -q define /root/pr.xml",
              timeout=120)
    # hostdevd does not start at boot here, so the ledger the cut left can be read before it acts
    lab.run("systemctl disable hostdevd && systemctl restart hostdevd", timeout=120)
    wait_active(lab)
    g2 = lab.labsh(f"group {a}", timeout=60).stdout.strip()
    g3 = lab.labsh(f"group {c3a}", timeout=60).stdout.strip()
    host = {a: "e1000e", b: "e1000e", c3a: "e1000", c3b: "e1000"}
    results = {}
    for prep_at, rel_at in cut_points(topo, g2, g3):
        lab.run("virsh start --paused pr", timeout=300)
        set_fault(lab, "pause", rel_at)
        lab.run(f"echo 'pause {prep_at}' >> /run/hostdevd/fault", timeout=30)
        lab.run("(virsh destroy pr > /dev/null 2>&1 &)", timeout=30)
        wait_paused(lab, rel_at)
        lab.run("(virsh start --paused pp > /dev/null 2>&1 &)", timeout=30)
        wait_paused(lab, prep_at)
        old_boot = boot_id(lab)
        seconds = lab.restart(power_cut=True)
        # the ledger of the dead boot parses and names every original driver
        r = lab.run([HCTL, "--no-daemon", "status", "--json"], timeout=90)
        left = json.loads(r.stdout)["claims"]
        recs = {d["address"]: d for c in left.values() for d in c["devices"]}
        assert {c["boot_id"] for c in left.values()} <= {old_boot}
        assert {c["owner"]["name"] for c in left.values()} == {"pp", "pr"}, left
        for addr, rec in recs.items():
            assert rec["original_driver"] == host[addr], rec
        lab.run("systemctl start hostdevd", timeout=120)
        wait_active(lab)
        assert wait_drivers(lab, host, timeout=120) == host
        deadline = time.monotonic() + 120
        while claims(lab) and time.monotonic() < deadline:
            time.sleep(2)
        assert claims(lab) == {}, "a claim of the dead boot is left"
        fell_back = journal(lab, f"-b MESSAGE_ID={LEDGER_RECOVERED}").strip()
        assert not fell_back, f"the ledger did not survive the cut: {fell_back}"
        check = lab.run([HCTL, "check", "--json"], timeout=120, check=False)
        report = {c["name"]: c for c in json.loads(check.stdout)["checks"]}
        assert report["ledger"]["status"] == "ok", report["ledger"]
        assert report.get("unclaimed-vfio", {}).get("status", "ok") == "ok", report["unclaimed-vfio"]
        # and both domains start and stop cleanly afterwards
        lab.run("virsh start --paused pp && virsh start --paused pr", timeout=300)
        assert drivers(lab, *host) == dict.fromkeys(host, "vfio-pci")
        lab.run("virsh destroy pp && virsh destroy pr", timeout=300)
        assert wait_drivers(lab, host) == host
        results[f"{prep_at} + {rel_at}"] = {"l1_back_s": round(seconds, 1), "ledger": "parsed",
                                            "originals_known": len(recs), "after": "started and stopped"}
    record("power_cut", results)
    lab.run("systemctl enable hostdevd", timeout=60)
