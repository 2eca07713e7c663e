"""Reboots on a real kernel (issue 12): the ledger must never be trusted over it.

An autostarted domain holds one function of the multifunction pair (its sibling follows as a
companion); L1 reboots on the same disk; hostdevd starts before libvirtd, releases the claim
of the earlier boot, and libvirt's autostart prepares the group afresh: the domain runs with
both functions on vfio-pci and the ledger has one claim, of the new boot. The same for a
reservation: bound again after the reboot, under the new boot ID.

Marked lab_l2: the domain runs (autostart cannot start it paused), and a reboot leaves L1 in a
new boot, so these run last, in the session of their own.
"""
from __future__ import annotations

import json
import time

import pytest

pytestmark = [pytest.mark.lab, pytest.mark.lab_l2]

HCTL = "/opt/hostdevd/bin/hostdevctl"
TOML = "/etc/hostdevd/hostdevd.toml"


def boot_id(lab) -> str:
    return lab.run("cat /proc/sys/kernel/random/boot_id", timeout=30).stdout.strip()


def claims(lab) -> list[dict]:
    return list(json.loads(lab.run([HCTL, "status", "--json"], timeout=60).stdout)["claims"].values())


def drv(lab, bdf: str) -> str:
    return lab.labsh(f"drv {bdf}", timeout=60).stdout.strip()


def wait_for(lab, cmd: str, timeout: int, what: str) -> None:
    r = lab.run(f"for i in $(seq {timeout}); do {cmd} && exit 0; sleep 1; done; exit 1",
                timeout=timeout + 60, check=False)
    assert r.rc == 0, f"{what} within {timeout} s"


@pytest.fixture(scope="module")
def enabled(lab):
    """hostdevd installed as a boot service (enabled: it must start before libvirtd at boot)."""
    lab.run(f"/opt/hostdevd/bin/hostdevd install && systemctl enable hostdevd && "
            f"cp -n {TOML} {TOML}.orig 2>/dev/null; systemctl restart hostdevd && systemctl restart libvirtd",
            timeout=240)
    wait_for(lab, "systemctl is-active -q hostdevd", 90, "hostdevd active")
    yield lab.topology()
    lab.run("virsh -q destroy rb1; virsh -q autostart --disable rb1; virsh -q undefine rb1; "
            f"{HCTL} release --owner rb1; systemctl disable --now hostdevd; "
            f"[ -e {TOML}.orig ] && mv {TOML}.orig {TOML}; "
            "rm -f /etc/libvirt/hooks/qemu.d/hostdevd; systemctl restart libvirtd", timeout=240, check=False)
    lab.run(f"{HCTL} --no-daemon release --owner reserved", timeout=120, check=False)


def test_autostarted_domain_runs_after_a_reboot_with_its_whole_group(lab, enabled):
    topo = enabled
    a, b = topo["nic2a"], topo["nic2b"]
    # type qemu: after a reboot libvirtd may start before kvm_amd is loaded (see README, L1 stalls).
    lab.labsh(f"mkdom rb1 {b} && sed -i \"s/<domain type='kvm'>/<domain type='qemu'>/\" /root/rb1.xml && "
              "virsh -q define /root/rb1.xml && virsh -q autostart rb1 && virsh -q start rb1", timeout=180)
    before = boot_id(lab)
    (claim,) = [c for c in claims(lab) if c["owner"]["name"] == "rb1"]
    assert claim["boot_id"] == before and drv(lab, a) == drv(lab, b) == "vfio-pci"

    seconds = lab.restart()                                  # a clean reboot on the same disk
    after = boot_id(lab)
    assert after != before
    wait_for(lab, "[ \"$(virsh domstate rb1 2>/dev/null)\" = running ]", 240, "rb1 autostarted")
    assert drv(lab, a) == drv(lab, b) == "vfio-pci"
    held = [c for c in claims(lab) if c["owner"]["name"] == "rb1"]
    assert len(held) == 1 and held[0]["boot_id"] == after, held
    assert {d["address"]: d["role"] for d in held[0]["devices"]} == {a: "companion", b: "requested"}
    journal = lab.run("journalctl -b -u hostdevd -o cat --no-pager", timeout=60).stdout
    assert f"claimed before the host rebooted (boot {before})" in journal
    print(f"\nreboot: L1 back after {seconds:.1f} s; rb1 running with {a} and {b} on vfio-pci")
    lab.run("virsh -q destroy rb1; virsh -q autostart --disable rb1", timeout=120)
    time.sleep(2)
    assert drv(lab, a) == drv(lab, b) == "e1000e"
    assert not [c for c in claims(lab) if c["owner"]["name"] == "rb1"]


def test_a_reservation_is_bound_again_after_a_reboot(lab, enabled):
    topo = enabled
    a, b = topo["nic2a"], topo["nic2b"]
    lab.run(f"printf 'reserve = [\"{b}\"]\\n' > {TOML} && systemctl restart hostdevd", timeout=120)
    wait_for(lab, "systemctl is-active -q hostdevd", 90, "hostdevd active")
    before = boot_id(lab)
    (claim,) = [c for c in claims(lab) if c["owner"]["kind"] == "reservation"]
    assert claim["boot_id"] == before and claim["reserved"]

    lab.restart()
    after = boot_id(lab)
    wait_for(lab, "systemctl is-active -q hostdevd", 120, "hostdevd active after the reboot")
    assert drv(lab, a) == drv(lab, b) == "vfio-pci"
    held = [c for c in claims(lab) if c["owner"]["kind"] == "reservation"]
    assert len(held) == 1 and held[0]["boot_id"] == after and held[0]["reserved"], held
    lab.run(f"printf '' > {TOML} && systemctl restart hostdevd", timeout=120)
    wait_for(lab, f"[ \"$(basename $(readlink /sys/bus/pci/devices/{b}/driver))\" = e1000e ]", 60,
             "the unreserved pair back on e1000e")
