"""The daemon in L1: systemd unit, libvirt hook, events, journald, crash and restart recovery,
against a real libvirtd and a real kernel. Runs first (alphabetical) and leaves L1 as it found it:
hook removed, libvirtd restarted, hostdevd stopped."""
from __future__ import annotations

import json
import time

import pytest
from labops import drivers, wait_active, wait_drivers

pytestmark = pytest.mark.lab

HCTL = "/opt/hostdevd/bin/hostdevctl"
SYS = "/sys/bus/pci/devices"
MSG_BIND = "3ed3dbad284a4a169e375538b43659fd"
# A paused domain has its QEMU process, its hooks run and /dev/vfio/N open, but its vCPUs do
# not run: a nested L2 under TCG costs a lot of CPU and, on a loaded 2-core host, has stalled
# L1's timers. One test (start/destroy) runs L2 for real; the others start it paused.
START_PAUSED = "virsh start --paused %s"


def status(lab):
    return json.loads(lab.run([HCTL, "status", "--json"], timeout=60).stdout)


def daemon_status(lab):
    r = lab.run(["/opt/hostdevd/bin/python", "-c",
                 "import json,hostdevd.doors.wire as w; print(json.dumps(w.call(w.DEFAULT_SOCKET, {'op':'status'})))"],
                timeout=60)
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def daemon(lab):
    topo = lab.topology()
    lab.run("/opt/hostdevd/bin/hostdevd install", timeout=120)
    lab.run("systemctl start hostdevd && systemctl restart libvirtd", timeout=180)
    wait_active(lab)
    for name, dev in (("l2a", topo["nic2a"]), ("l2b", topo["nic2b"])):
        lab.labsh(f"mkdom {name} {dev} && virsh -q define /root/{name}.xml", timeout=120)
    yield topo
    lab.run("virsh -q destroy l2a; virsh -q destroy l2b; virsh -q undefine l2a; virsh -q undefine l2b",
            timeout=120, check=False)
    lab.run("systemctl stop hostdevd; rm -f /etc/libvirt/hooks/qemu.d/hostdevd; "
            "systemctl restart libvirtd", timeout=180, check=False)
    lab.run(f"{HCTL} --no-daemon release --owner l2a; {HCTL} --no-daemon release --owner l2b", timeout=120,
            check=False)


def test_unit_is_ready_and_hook_installed(lab, daemon):
    r = lab.run("systemctl show hostdevd -p Type -p ActiveState -p StatusText -p WatchdogUSec", timeout=30)
    assert "Type=notify" in r.stdout and "ActiveState=active" in r.stdout
    assert "WatchdogUSec=30s" in r.stdout and "StatusText=" in r.stdout
    assert lab.run("test -x /etc/libvirt/hooks/qemu.d/hostdevd", timeout=10, check=False).ok
    st = daemon_status(lab)
    assert st["ok"] and st["daemon"]["libvirt"]["state"] == "connected", st


def test_start_binds_whole_group_and_destroy_returns_it(lab, daemon):
    a, b = daemon["nic2a"], daemon["nic2b"]
    since = lab.run("date +%s", timeout=10).stdout.strip()
    lab.run("virsh start l2a", timeout=300)
    assert drivers(lab, a, b) == {a: "vfio-pci", b: "vfio-pci"}
    claims = status(lab)["claims"]
    owner = {c["owner"]["name"] for c in claims.values()}
    assert owner == {"l2a"} and {d["address"] for c in claims.values() for d in c["devices"]} == {a, b}
    lab.run("virsh destroy l2a", timeout=120)
    assert wait_drivers(lab, {a: "e1000e", b: "e1000e"}) == {a: "e1000e", b: "e1000e"}
    assert status(lab)["claims"] == {}
    # journald has the steps, with the structured fields
    r = lab.run(f"journalctl -o json --since @{since} MESSAGE_ID={MSG_BIND} DOMAIN_NAME=l2a", timeout=60)
    entries = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    assert {e["HOSTDEV_ADDRESS"] for e in entries} >= {a, b}, r.stdout[:2000]
    e = entries[0]
    assert e["ACTION"] == "bind" and e["RESULT"] == "ok" and e["IOMMU_GROUP"] and e["DOMAIN_UUID"]


def test_second_domain_refused_naming_the_first(lab, daemon):
    a, b = daemon["nic2a"], daemon["nic2b"]
    lab.run(START_PAUSED % "l2a", timeout=300)
    try:
        r = lab.run(START_PAUSED % "l2b", timeout=300, check=False)
        assert r.rc != 0
        assert "l2a" in r.stderr and "hostdevd" in r.stderr, r
        assert lab.run("virsh domstate l2a", timeout=60).stdout.strip() == "paused"
        assert drivers(lab, a, b) == {a: "vfio-pci", b: "vfio-pci"}
    finally:
        lab.run("virsh destroy l2a", timeout=120, check=False)
    assert wait_drivers(lab, {a: "e1000e", b: "e1000e"}) == {a: "e1000e", b: "e1000e"}


def test_libvirtd_restart_keeps_claims(lab, daemon):
    a, b = daemon["nic2a"], daemon["nic2b"]
    lab.run(START_PAUSED % "l2a", timeout=300)
    try:
        lab.run("systemctl restart libvirtd", timeout=180)
        lab.run("virsh domstate l2a", timeout=120)  # libvirtd is back
        deadline = time.monotonic() + 90
        while daemon_status(lab)["daemon"]["libvirt"]["state"] != "connected":
            assert time.monotonic() < deadline, "hostdevd did not reconnect to libvirt"
            time.sleep(2)
        assert lab.run("virsh domstate l2a", timeout=60).stdout.strip() == "paused"
        assert drivers(lab, a, b) == {a: "vfio-pci", b: "vfio-pci"}
        assert {c["owner"]["name"] for c in status(lab)["claims"].values()} == {"l2a"}
    finally:
        lab.run("virsh destroy l2a", timeout=120, check=False)
    assert wait_drivers(lab, {a: "e1000e", b: "e1000e"}) == {a: "e1000e", b: "e1000e"}


def test_daemon_killed_while_domain_runs_then_destroy_returns_devices(lab, daemon):
    a, b = daemon["nic2a"], daemon["nic2b"]
    lab.run(START_PAUSED % "l2a", timeout=300)
    try:
        pid = lab.run("systemctl show -p MainPID --value hostdevd", timeout=30).stdout.strip()
        lab.run(f"kill -9 {pid}", timeout=30)
        time.sleep(3)
        wait_active(lab)  # Restart=on-failure
        new = lab.run("systemctl show -p MainPID --value hostdevd", timeout=30).stdout.strip()
        assert new != pid
        assert drivers(lab, a, b) == {a: "vfio-pci", b: "vfio-pci"}
        assert {c["owner"]["name"] for c in status(lab)["claims"].values()} == {"l2a"}
    finally:
        lab.run("virsh destroy l2a", timeout=120, check=False)
    assert wait_drivers(lab, {a: "e1000e", b: "e1000e"}) == {a: "e1000e", b: "e1000e"}
    assert status(lab)["claims"] == {}
