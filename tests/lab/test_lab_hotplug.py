"""Hot-plug, udev, migration checks and host actions in L1, against a real libvirtd, a real kernel
and a running L2 guest that acknowledges PCIe hot-unplug.

The hot-plug target ``l2hot`` is a q35 L2 domain without any hostdev and with three spare
pcie-root-ports. It runs for real (not paused): a guest only lets go of a device when its kernel
answers the unplug request (pciehp/ACPI in the busybox L2; a paused guest never does, which the
pending-detach test uses on purpose). L2 is idle once it printed L2-READY.

Leaves L1 as it found it: L2 destroyed and undefined, claims released, the config restored, the
dummy unit removed, hostdevd stopped, its hook removed, libvirtd restarted.
"""
from __future__ import annotations

import json
import re
import time

import pytest
from labops import HCTL, PYTHON, leave_daemon, use_daemon

pytestmark = [pytest.mark.lab, pytest.mark.lab_l2]

HOOK = "/etc/libvirt/hooks/qemu.d/hostdevd"
CONFIG = "/etc/hostdevd/hostdevd.toml"
SYS = "/sys/bus/pci/devices"
SERIAL = "/var/log/libvirt/qemu/l2hot-serial.log"
DUMMY = "hostdevd-lab-dummy.service"
MSG = {"hotplug": "0f9e724854284ed390b7acd0e6385044", "drift": "645de6142fec48be9b983b04889f9db1",
       "adopt": "a38f0c5185fc4e10abcd236611e022c4", "migrate": "bd3b467551724047901815096b5cf1b3",
       "host_action": "5e93657a6ccd45efa4816d8053a45e6f"}
TIMINGS: dict[str, float] = {}

L2_XML = """<domain type='{vt}'>
  <name>l2hot</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>/var/lib/libvirt/images/l2-vmlinuz</kernel>
    <initrd>/var/lib/libvirt/images/l2-initrd.img</initrd>
    <cmdline>console=ttyS0 panic=-1 no_timer_check quiet</cmdline>
  </os>
  <features><acpi/></features>
  <on_reboot>destroy</on_reboot>
  <devices>
    <controller type='usb' model='none'/>
    <controller type='pci' index='0' model='pcie-root'/>
    <controller type='pci' index='1' model='pcie-root-port'/>
    <controller type='pci' index='2' model='pcie-root-port'/>
    <controller type='pci' index='3' model='pcie-root-port'/>
    <serial type='file'><source path='{serial}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def hostdev_xml(bdf: str, managed: str = "yes") -> str:
    d, b, rest = bdf.split(":")
    s, f = rest.split(".")
    return (f"<hostdev mode='subsystem' type='pci' managed='{managed}'><source><address domain='0x{d}' "
            f"bus='0x{b}' slot='0x{s}' function='0x{f}'/></source></hostdev>\n")


def drivers(lab, *bdfs):
    script = ("for b in {}; do d={}/$b; printf '%s %s\\n' $b "
              "\"$([ -e $d/driver ] && basename $(readlink $d/driver) || echo none)\"; done"
              ).format(" ".join(bdfs), SYS)
    return dict(line.split() for line in lab.run(script, timeout=60).stdout.splitlines() if line.strip())


def wait_for(what, pred, timeout=60.0, interval=1.0):
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        time.sleep(interval)


def daemon_status(lab):
    r = lab.run([PYTHON, "-c",
                 "import json,hostdevd.doors.wire as w; print(json.dumps(w.call(w.DEFAULT_SOCKET, {'op':'status'})))"],
                timeout=60)
    return json.loads(r.stdout)


def claims(lab):
    return json.loads(lab.run([HCTL, "status", "--json"], timeout=60).stdout)["claims"]


def journal(lab, since: str, kind: str, *filters: str) -> list[dict]:
    r = lab.run(["journalctl", "-u", "hostdevd", "-o", "json", "--since", f"@{since}",
                 f"MESSAGE_ID={MSG[kind]}", *filters], timeout=60)
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


def now(lab) -> str:
    return lab.run("date +%s.%N", timeout=10).stdout.strip()


def hctl(lab, *args, timeout=300, check=True):
    return lab.run([HCTL, *args], timeout=timeout, check=check)


def live_hostdevs(lab) -> list[str]:
    xml = lab.run("virsh dumpxml l2hot", timeout=60).stdout
    return sorted(re.findall(r"<source>\s*<address domain='0x0000' bus='0x([0-9a-f]{2})' slot='0x([0-9a-f]{2})' "
                             r"function='0x([0-7])'/>", xml))


def wait_active(lab, unit="hostdevd", timeout=90):
    r = lab.run(f"for i in $(seq {timeout}); do systemctl is-active -q {unit} && exit 0; sleep 1; done; "
                f"systemctl status --no-pager {unit}; exit 1", timeout=timeout + 30, check=False)
    assert r.rc == 0, r


@pytest.fixture(scope="module")
def hot(lab):
    topo = lab.topology()
    use_daemon(lab)
    lab.run(f"cp {CONFIG} /root/hostdevd.toml.orig", timeout=60)
    vt = lab.labsh("virt_type", timeout=60).stdout.strip()
    lab.write_text("/root/l2hot.xml", L2_XML.format(vt=vt, serial=SERIAL))
    lab.run(f"rm -f {SERIAL}; virsh -q define /root/l2hot.xml", timeout=60)
    t0 = time.monotonic()
    lab.run("virsh -q start l2hot", timeout=300)
    lab.run(f"for i in $(seq 300); do grep -q L2-READY {SERIAL} 2>/dev/null && exit 0; sleep 1; done; "
            f"tail -20 {SERIAL}; exit 1", timeout=330)
    TIMINGS["L2 boot to L2-READY (s)"] = round(time.monotonic() - t0, 1)
    try:
        yield topo
    finally:
        lab.run("virsh -q destroy l2hot; virsh -q undefine l2hot", timeout=120, check=False)
        lab.run(f"for o in l2hot drifty hostact; do {HCTL} release --owner $o; done", timeout=300, check=False)
        lab.run(f"echo 0 > {SYS}/{topo['nvme_pf']}/sriov_numvfs", timeout=60, check=False)
        lab.run(f"cp /root/hostdevd.toml.orig {CONFIG}; systemctl stop {DUMMY}; "
                f"rm -f /etc/systemd/system/{DUMMY}; modprobe e1000; systemctl daemon-reload",
                timeout=180, check=False)
        leave_daemon(lab)
        lab.run(f"for o in l2hot drifty hostact; do {HCTL} --no-daemon release --owner $o; done", timeout=300,
                check=False)
        if TIMINGS:
            print("\nhot-plug lab timings:\n" + "\n".join(f"  {k:<52} {v}" for k, v in TIMINGS.items()))


# --------------------------------------------------------------------------- hostdevctl attach / detach


@pytest.mark.lab_trixie
def test_attach_prepares_the_group_and_plugs_into_the_running_guest(lab, hot):
    a, b = hot["nic2a"], hot["nic2b"]
    since = now(lab)
    r = hctl(lab, "attach", "l2hot", "--device", a)
    TIMINGS["hostdevctl attach nic2a (wall, s)"] = round(r.seconds, 1)
    assert r.stdout.startswith(f"attached {a} to l2hot (live): OK in "), r
    assert f"group {lab.pci_info(a)['iommu_group']}: bound {a}, {b}; companions {b}" in r.stdout
    assert drivers(lab, a, b) == {a: "vfio-pci", b: "vfio-pci"}
    assert live_hostdevs(lab) == [tuple(re.split("[:.]", a)[1:])]
    [c] = claims(lab).values()
    assert c["owner"]["name"] == "l2hot" and c["owner"]["uuid"] and c["state"] == "active"
    assert {(d["address"], d["role"]) for d in c["devices"]} == {(a, "requested"), (b, "companion")}
    [e] = journal(lab, since, "hotplug", "DOMAIN_NAME=l2hot")
    assert e["ACTION"] == "attach" and e["RESULT"] == "ok"


def test_check_migrate_and_the_migrate_hook_while_attached(lab, hot):
    a, b = hot["nic2a"], hot["nic2b"]
    since = now(lab)
    r = hctl(lab, "check-migrate", "l2hot", "--json", check=False)
    m = json.loads(r.stdout)
    assert r.rc == 1 and m["blocked"] and m["source"] == "live XML" and m["running"] is True
    assert m["unplug_first"] == [a] and m["cannot_unplug"] == []
    assert {d["address"]: (d["role"], d["blocks"]) for d in m["devices"]} == {a: ("requested", True),
                                                                              b: ("companion", False)}
    assert m["steps"][0] == f"hostdevctl detach l2hot --device {a}"
    # libvirt itself refuses, which is what the check predicts
    r = lab.run("virsh migrate --live l2hot qemu:///system", timeout=120, check=False)
    assert r.rc != 0 and "VFIO" in r.stderr, r
    # the hook's migrate phase (run as libvirt runs it on an incoming migration): XML unchanged on
    # stdout, the report on stderr, exit 0, quick
    r = lab.run(f"virsh dumpxml --migratable l2hot > /root/mig.xml; t0=$(date +%s%N); "
                f"{HOOK} l2hot migrate begin - < /root/mig.xml > /root/mig.out; rc=$?; t1=$(date +%s%N); "
                f"cmp /root/mig.xml /root/mig.out && echo identical rc=$rc ms=$(( (t1 - t0) / 1000000 ))",
                timeout=60)
    assert "identical rc=0" in r.stdout, r
    TIMINGS["migrate hook round trip (ms)"] = int(r.stdout.split("ms=")[1])
    assert "live migration BLOCKED by 1 assigned PCI device" in r.stderr
    assert f"{a}: can be hot-unplugged" in r.stderr
    assert journal(lab, since, "migrate", "DOMAIN_NAME=l2hot", "RESULT=blocked")


@pytest.mark.lab_trixie
def test_detach_waits_for_the_guest_then_gives_the_group_back(lab, hot):
    a, b = hot["nic2a"], hot["nic2b"]
    since = now(lab)
    r = hctl(lab, "detach", "l2hot", "--device", a)
    assert r.stdout.startswith(f"detach {a} from l2hot (live): OK in "), r
    took = float(r.stdout.split(" OK in ")[1].split(" s")[0])
    TIMINGS["hostdevctl detach nic2a, guest acknowledges (daemon, s)"] = took
    TIMINGS["hostdevctl detach nic2a (wall, s)"] = round(r.seconds, 1)
    assert f"the guest let go of {a}" in r.stdout and "released group" in r.stdout
    assert drivers(lab, a, b) == {a: "e1000e", b: "e1000e"}
    assert live_hostdevs(lab) == [] and claims(lab) == {}
    assert [e["RESULT"] for e in journal(lab, since, "hotplug", "DOMAIN_NAME=l2hot")] == ["ok"]
    # the guest kernel saw the device go (its console log)
    assert "L2-READY" in lab.run(f"cat {SERIAL}", timeout=30).stdout


def test_virsh_attach_device_behind_hostdevds_back_is_adopted_and_released(lab, hot):
    n1 = hot["nic1"]
    lab.write_text("/root/nic1.xml", hostdev_xml(n1, managed="yes"))
    since = now(lab)
    t0 = time.monotonic()
    lab.run("virsh -q attach-device l2hot /root/nic1.xml --live", timeout=300)
    c = wait_for("the adoption", lambda: [c for c in claims(lab).values()
                                         if any(d["address"] == n1 for d in c["devices"])], 60)[0]
    TIMINGS["virsh attach-device -> claim adopted (s)"] = round(time.monotonic() - t0, 1)
    assert c["owner"]["name"] == "l2hot" and c["owner"]["uuid"] and c["state"] == "active"
    assert any("adopted from running domain l2hot" in n for n in c["notes"])
    assert journal(lab, since, "adopt", "DOMAIN_NAME=l2hot")
    t0 = time.monotonic()
    lab.run("virsh -q detach-device l2hot /root/nic1.xml --live", timeout=300)
    wait_for("the release", lambda: claims(lab) == {}, 60)
    TIMINGS["virsh detach-device -> claim released (s)"] = round(time.monotonic() - t0, 1)
    assert drivers(lab, n1) == {n1: "e1000e"}, "libvirt's managed reattach; hostdevd did not fight it"
    assert daemon_status(lab)["drift"] == [], "libvirt's own rebind is not drift"


def test_detach_from_a_paused_guest_stays_pending_until_it_lets_go(lab, hot):
    a, b = hot["nic2a"], hot["nic2b"]
    hctl(lab, "attach", "l2hot", "--device", a)
    lab.run("virsh -q suspend l2hot", timeout=60)
    try:
        since = now(lab)
        r = hctl(lab, "detach", "l2hot", "--device", a, "--timeout", "5", check=False)
        TIMINGS["detach from a paused guest, --timeout 5 (wall, s)"] = round(r.seconds, 1)
        assert r.rc == 1 and "PENDING" in r.stdout and "stays attached" in r.stdout, r
        assert drivers(lab, a, b) == {a: "vfio-pci", b: "vfio-pci"}
        assert [c["state"] for c in claims(lab).values()] == ["active"]
        assert [e["RESULT"] for e in journal(lab, since, "hotplug", "DOMAIN_NAME=l2hot")] == ["pending"]
    finally:
        lab.run("virsh -q resume l2hot", timeout=60)
    t0 = time.monotonic()
    wait_for("DEVICE_REMOVED after resume", lambda: claims(lab) == {}, 90)
    TIMINGS["resume -> guest lets go -> group released (s)"] = round(time.monotonic() - t0, 1)
    assert drivers(lab, a, b) == {a: "e1000e", b: "e1000e"} and live_hostdevs(lab) == []


def test_attach_refusals_touch_nothing(lab, hot):
    r = hctl(lab, "attach", "l2hot", "--device", hot["pcibr"], check=False)
    assert r.rc == 1 and "FAILED" in r.stdout and "bridge" in r.stdout, r
    r = hctl(lab, "attach", "no-such-domain", "--device", hot["nic1"], check=False)
    assert r.rc == 1 and "no domain" in r.stdout, r
    assert drivers(lab, hot["nic1"]) == {hot["nic1"]: "e1000e"} and claims(lab) == {}


# --------------------------------------------------------------------------- udev


def test_drift_behind_hostdevds_back_is_reported_not_fixed(lab, hot):
    n1 = hot["nic1"]
    hctl(lab, "prepare", "--device", n1, "--owner", "drifty")
    since = now(lab)
    lab.run(f"echo > {SYS}/{n1}/driver_override; echo {n1} > /sys/bus/pci/drivers/vfio-pci/unbind; "
            f"echo {n1} > /sys/bus/pci/drivers/e1000e/bind", timeout=60)
    drift = wait_for("drift in status", lambda: daemon_status(lab)["drift"], 30)
    assert [(d["address"], d["owner"], d["driver"]) for d in drift] == [(n1, "drifty", "e1000e")]
    [e] = journal(lab, since, "drift", f"HOSTDEV_ADDRESS={n1}")
    assert e["RESULT"] == "drift" and e["DOMAIN_NAME"] == "drifty" and "behind hostdevd's back" in e["MESSAGE"]
    st = json.loads(hctl(lab, "status", "--json").stdout)       # the operator's view, from the daemon
    assert [(d["address"], d["driver"], d["expected"]) for d in st["drift"]] == [(n1, "e1000e", "vfio-pci")]
    assert f"DRIFT: {n1} (group " in hctl(lab, "status").stdout
    time.sleep(3)
    assert drivers(lab, n1) == {n1: "e1000e"}, "reported, never rebound"
    hctl(lab, "release", "--owner", "drifty")
    assert daemon_status(lab)["drift"] == [] and claims(lab) == {}


def test_new_vfs_refresh_the_topology(lab, hot):
    pf = hot["nvme_pf"]
    before = daemon_status(lab)["udev"]
    assert before["watching"] is True, before
    lab.run(f"echo 0 > {SYS}/{pf}/sriov_drivers_autoprobe; echo 2 > {SYS}/{pf}/sriov_numvfs; udevadm settle",
            timeout=120)
    try:
        after = wait_for("two add events", lambda: (u := daemon_status(lab)["udev"])["events"].get("add", 0)
                         >= before["events"].get("add", 0) + 2 and u, 30)
        assert after["topology_generation"] >= before["topology_generation"] + 2
        vfs = lab.run(f"ls -d {SYS}/{pf}/virtfn* | xargs -n1 readlink -f | xargs -n1 basename", timeout=30)
        groups = json.loads(hctl(lab, "groups", "--json").stdout)["groups"]
        listed = {d["address"] for g in groups for d in g["devices"]}
        assert set(vfs.stdout.split()) <= listed
    finally:
        lab.run(f"echo 0 > {SYS}/{pf}/sriov_numvfs; udevadm settle", timeout=120)


# --------------------------------------------------------------------------- host actions


def test_host_actions_stop_a_unit_and_unload_a_module_around_binding(lab, hot):
    """nic3a/nic3b (e1000, behind the PCIe-to-PCI bridge) are e1000's only devices in L1."""
    a, b = hot["nic3a"], hot["nic3b"]
    lab.write_text(f"/etc/systemd/system/{DUMMY}", "[Service]\nExecStart=/bin/sleep infinity\n")
    lab.run(f"systemctl daemon-reload && systemctl start {DUMMY}", timeout=60)
    lab.run(f"cp /root/hostdevd.toml.orig {CONFIG} && printf '\\n[[host_actions]]\\nmatch = \"{a}\"\\n"
            f"stop_units = [\"{DUMMY}\"]\\nunload_modules = [\"e1000\"]\\ntimeout = 60\\n' >> {CONFIG} "
            f"&& systemctl restart hostdevd", timeout=120)
    wait_active(lab)
    try:
        plan = hctl(lab, "plan", "--device", a).stdout
        assert re.search(rf"stop_unit +{DUMMY}", plan) and re.search(r"unload_module +e1000", plan), plan
        since = now(lab)
        r = hctl(lab, "prepare", "--device", a, "--owner", "hostact")
        TIMINGS["prepare with host actions (wall, s)"] = round(r.seconds, 1)
        assert drivers(lab, a, b) == {a: "vfio-pci", b: "vfio-pci"}
        assert lab.run(f"systemctl is-active {DUMMY}", timeout=30, check=False).stdout.strip() == "inactive"
        assert lab.run("test -d /sys/module/e1000", timeout=30, check=False).rc != 0, "e1000 unloaded"
        [c] = claims(lab).values()
        assert [(x["kind"], x["name"], x["state"]) for x in c["host_actions"]] == [
            ("unit", DUMMY, "done"), ("module", "e1000", "done")]
        r = hctl(lab, "release", "--owner", "hostact")
        TIMINGS["release with host actions (wall, s)"] = round(r.seconds, 1)
        assert drivers(lab, a, b) == {a: "e1000", b: "e1000"}
        assert lab.run(f"systemctl is-active {DUMMY}", timeout=30, check=False).stdout.strip() == "active"
        entries = journal(lab, since, "host_action")
        assert [(e["ACTION"], e["RESULT"]) for e in entries] == [
            ("stop_unit", "ok"), ("unload_module", "ok"), ("load_module", "ok"), ("start_unit", "ok")], entries
        assert claims(lab) == {}
    finally:
        lab.run(f"cp /root/hostdevd.toml.orig {CONFIG} && systemctl restart hostdevd; modprobe e1000", timeout=120,
                check=False)
        wait_active(lab)
