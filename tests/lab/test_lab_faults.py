"""Faults against a real kernel and a real libvirtd (issue 12): hostdevd killed with -9 at every
step boundary of a prepare and of a release of the multifunction pair, libvirtd killed with
SIGKILL during a start, and a state dir on a full tmpfs. Domains are started paused: a running
L2 is not the point here, and a paused one holds /dev/vfio/N all the same.

The faults are placed with hostdevd's fault knob (daemon/hostdevd/doors/faultknob.py): a
systemd drop-in sets HOSTDEVD_FAULT_FILE, and "crash BOUNDARY" in that file makes the daemon
exit as kill -9 would when its executor reaches BOUNDARY. Figures are printed (run with -s)
and kept in $HOSTDEVD_LAB_DIR/reliability.json for the README.
"""
from __future__ import annotations

import json
import time

import labvm
import pytest
from labops import (
    HCTL,
    PACKAGED,
    claims,
    disable_fault_knob,
    drivers,
    enable_fault_knob,
    leave_daemon,
    main_pid,
    owners,
    set_fault,
    use_daemon,
    wait_active,
    wait_drivers,
    wait_no_claims,
    wait_restarted,
)

pytestmark = pytest.mark.lab

START = "virsh start --paused %s"


def record(key: str, value) -> None:
    print(f"RELIABILITY {key} {json.dumps(value)}", flush=True)
    path = labvm.lab_dir() / "reliability.json"
    try:
        old = json.loads(path.read_text()) if path.exists() else {}
        old[key] = value
        path.write_text(json.dumps(old, indent=2, sort_keys=True) + "\n")
    except OSError:
        pass


@pytest.fixture(scope="module")
def pair(lab):
    """hostdevd with its hook and the fault knob; domains fk1..fk4 each ask for nic2a."""
    topo = lab.topology()
    a, b = topo["nic2a"], topo["nic2b"]
    use_daemon(lab)
    enable_fault_knob(lab)
    for name in ("fk1", "fk2", "fk3", "fk4"):
        lab.labsh(f"mkdom {name} {a} && virsh -q define /root/{name}.xml", timeout=120)
    group = lab.labsh(f"group {a}", timeout=60).stdout.strip()
    yield a, b, group
    lab.run("for d in fk1 fk2 fk3 fk4; do virsh -q destroy $d; virsh -q undefine $d; done",
            timeout=240, check=False)
    disable_fault_knob(lab)
    leave_daemon(lab)
    lab.run(f"for d in fk1 fk2 fk3 fk4; do {HCTL} --no-daemon release --owner $d; done", timeout=240,
            check=False)


def host_drivers(a: str, b: str) -> dict[str, str]:
    return {a: "e1000e", b: "e1000e"}


def vfio(a: str, b: str) -> dict[str, str]:
    return {a: "vfio-pci", b: "vfio-pci"}


@pytest.mark.lab_trixie
def test_kill9_at_every_boundary_of_prepare(lab, pair):
    """The start in flight fails with hostdevd's line; the restarted daemon returns the group."""
    a, b, g = pair
    outcomes = {}
    boundaries = (f"claim:{g}", f"bind:{a}", f"bind:{b}", f"activate:{g}")
    if PACKAGED:      # Debian 13: the crash between the pair's two binds (Debian 12 runs every boundary)
        boundaries = (f"bind:{b}",)
    for boundary in boundaries:
        pid = main_pid(lab)
        set_fault(lab, "crash", boundary)
        r = lab.run(START % "fk1", timeout=300, check=False)
        new = wait_restarted(lab, pid)
        assert r.rc != 0, f"crash at {boundary}: the start went through ({r.stdout})"
        assert "hostdevd" in r.stderr, f"crash at {boundary}: no clear line from the hook: {r.stderr}"
        assert wait_drivers(lab, host_drivers(a, b), timeout=120) == host_drivers(a, b), boundary
        assert wait_no_claims(lab) == {}, f"crash at {boundary}: a claim was left"
        assert lab.run("virsh domstate fk1", timeout=60).stdout.strip() == "shut off"
        said = r.stderr[r.stderr.find("hostdevd: "):].strip()
        assert said.startswith("hostdevd: "), f"crash at {boundary}: no line from hostdevd's hook: {r.stderr}"
        outcomes[boundary] = {"start": "refused", "group": "returned", "pid": [pid, new], "said": said[:200]}
    # and after all that, the same start succeeds
    lab.run(START % "fk1", timeout=300)
    assert drivers(lab, a, b) == vfio(a, b)
    lab.run("virsh destroy fk1", timeout=120)
    assert wait_drivers(lab, host_drivers(a, b)) == host_drivers(a, b)
    record("kill9_prepare" if not PACKAGED else "kill9_prepare_trixie", outcomes)


def test_kill9_at_every_boundary_of_release(lab, pair):
    """The destroy completes; the restarted daemon finishes returning the group."""
    a, b, g = pair
    outcomes = {}
    for boundary in (f"release:{g}", f"restore:{b}", f"restore:{a}", f"drop:{g}"):
        lab.run(START % "fk1", timeout=300)
        assert drivers(lab, a, b) == vfio(a, b)
        pid = main_pid(lab)
        set_fault(lab, "crash", boundary)
        r = lab.run("virsh destroy fk1", timeout=300, check=False)
        new = wait_restarted(lab, pid)
        assert r.rc == 0, f"crash at {boundary}: destroy failed: {r}"
        assert wait_drivers(lab, host_drivers(a, b), timeout=120) == host_drivers(a, b), boundary
        assert wait_no_claims(lab) == {}, f"crash at {boundary}: a claim was left"
        outcomes[boundary] = {"destroy": "completed", "group": "returned", "pid": [pid, new]}
    record("kill9_release", outcomes)


def test_libvirtd_sigkill_during_a_start(lab, pair):
    """hostdevd stays up; once libvirtd is back, no claim is held for a domain that is not running."""
    a, b, g = pair
    pid = main_pid(lab)
    # kill libvirtd the moment hostdevd has bound the pair, while QEMU is being started
    r = lab.run(f"(virsh start --paused fk2 > /tmp/fk2.out 2>&1 &) ; "
                f"for i in $(seq 600); do [ -e /sys/bus/pci/drivers/vfio-pci/{b} ] && break; sleep 0.1; done; "
                "kill -9 $(systemctl show -p MainPID --value libvirtd); date +%s.%N", timeout=180)
    assert r.ok
    time.sleep(3)
    lab.run("systemctl is-active -q libvirtd || systemctl start libvirtd; "
            "for i in $(seq 120); do virsh -q list >/dev/null 2>&1 && exit 0; sleep 1; done; exit 1", timeout=240)
    assert main_pid(lab) == pid, "hostdevd restarted when libvirtd died"
    deadline = time.monotonic() + 120
    while True:
        state = lab.run("virsh domstate fk2", timeout=60, check=False).stdout.strip()
        held = owners(lab)
        consistent = (state in ("running", "paused") and set(held.values()) == {"fk2"}) or \
                     (state == "shut off" and held == {})
        if consistent or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert consistent, f"fk2 is {state!r} but the ledger holds {held}"
    assert drivers(lab, a, b) == (vfio(a, b) if held else host_drivers(a, b))
    record("libvirtd_sigkill_mid_start", {"domain_after": state, "claims_after": sorted(held.values()),
                                         "hostdevd_restarted": False})
    lab.run("virsh -q destroy fk2", timeout=120, check=False)
    assert wait_drivers(lab, host_drivers(a, b)) == host_drivers(a, b)
    assert wait_no_claims(lab) == {}


def test_full_state_dir_refuses_the_start_then_recovers(lab, pair):
    a, b, g = pair
    lab.run("systemctl stop hostdevd && rm -rf /root/state.keep && cp -a /var/lib/hostdevd /root/state.keep && "
            "mount -t tmpfs -o size=64k,mode=0700 hostdevd-full /var/lib/hostdevd && "
            "cp -a /root/state.keep/. /var/lib/hostdevd/ && systemctl start hostdevd", timeout=180)
    try:
        wait_active(lab)
        pid = main_pid(lab)
        lab.run("dd if=/dev/zero of=/var/lib/hostdevd/filler bs=4k 2>/dev/null; sync; df -k /var/lib/hostdevd",
                timeout=60, check=False)
        r = lab.run(START % "fk1", timeout=300, check=False)
        assert r.rc != 0, r
        assert "No space left on device" in r.stderr or "ENOSPC" in r.stderr, r.stderr
        assert "/var/lib/hostdevd" in r.stderr, r.stderr
        assert drivers(lab, a, b) == host_drivers(a, b), "bound with nowhere to record it"
        assert main_pid(lab) == pid and claims(lab) == {}
        refused = r.stderr[r.stderr.find("hostdevd: "):].strip()
        lab.run("rm -f /var/lib/hostdevd/filler", timeout=30)
        lab.run(START % "fk1", timeout=300)
        assert drivers(lab, a, b) == vfio(a, b) and set(owners(lab).values()) == {"fk1"}
        lab.run("virsh destroy fk1", timeout=120)
        assert wait_drivers(lab, host_drivers(a, b)) == host_drivers(a, b)
        assert wait_no_claims(lab) == {}
        record("disk_full", {"refused": refused[:240], "after_freeing": "started and released"})
    finally:
        lab.run("systemctl stop hostdevd; cp -a /var/lib/hostdevd/. /root/state.keep/ 2>/dev/null; "
                "rm -f /root/state.keep/filler; umount /var/lib/hostdevd; "
                "cp -a /root/state.keep/. /var/lib/hostdevd/; systemctl start hostdevd", timeout=180, check=False)
        wait_active(lab)
