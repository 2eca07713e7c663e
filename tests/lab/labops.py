"""Small helpers the lab's reliability tests share: drivers, claims, the unit's state, the fault
knob (daemon/hostdevd/doors/faultknob.py). Each runs commands in L1 through labvm.LabVM.run."""
from __future__ import annotations

import json
import time

import labvm

# bookworm's L1 has hostdevd in a venv; trixie's has it from the .deb, where an operator has it
PACKAGED = labvm.SUITE != "bookworm"
HCTL = "/usr/bin/hostdevctl" if PACKAGED else "/opt/hostdevd/bin/hostdevctl"
HOSTDEVD = "/usr/bin/hostdevd" if PACKAGED else "/opt/hostdevd/bin/hostdevd"
PYTHON = "/usr/bin/python3" if PACKAGED else "/opt/hostdevd/bin/python"
SYS = "/sys/bus/pci/devices"
CONF = "/etc/hostdevd/hostdevd.toml"
HOOK = "/etc/libvirt/hooks/qemu.d/hostdevd"
PKG_CONF = "/root/hostdevd.toml.pkg"   # the package's own config, kept to give it back
FAULT = "/run/hostdevd/fault"
FAULT_DROPIN = "/etc/systemd/system/hostdevd.service.d/fault.conf"


def drivers(vm, *bdfs: str) -> dict[str, str]:
    script = ("for b in {}; do d={}/$b; printf '%s %s\\n' $b "
              "\"$([ -e $d/driver ] && basename $(readlink $d/driver) || echo none)\"; done"
              ).format(" ".join(bdfs), SYS)
    return dict(line.split() for line in vm.run(script, timeout=60).stdout.splitlines() if line.strip())


def wait_drivers(vm, want: dict[str, str], timeout: float = 60) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        got = drivers(vm, *want)
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(1)


def claims(vm) -> dict:
    """The ledger's claims by group, as `hostdevctl status --json` shows them."""
    return json.loads(vm.run([HCTL, "status", "--json"], timeout=90).stdout)["claims"]


def owners(vm) -> dict[str, str]:
    return {g: c["owner"]["name"] for g, c in claims(vm).items()}


def wait_no_claims(vm, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while (left := claims(vm)) and time.monotonic() < deadline:
        time.sleep(2)
    return left


def wait_active(vm, unit: str = "hostdevd", timeout: int = 120) -> None:
    r = vm.run(f"for i in $(seq {timeout}); do systemctl is-active -q {unit} && exit 0; sleep 1; done; "
               f"systemctl status --no-pager {unit}; journalctl -u {unit} --no-pager | tail -30; exit 1",
               timeout=timeout + 30, check=False)
    assert r.rc == 0, r


def main_pid(vm, unit: str = "hostdevd") -> int:
    return int(vm.run(f"systemctl show -p MainPID --value {unit}", timeout=30).stdout.strip() or 0)


def wait_restarted(vm, old_pid: int, timeout: float = 90) -> int:
    """The unit's new main PID once systemd has restarted it (it must be active again)."""
    deadline = time.monotonic() + timeout
    while True:
        pid = main_pid(vm)
        if pid and pid != old_pid and vm.run("systemctl is-active -q hostdevd", timeout=30, check=False).ok:
            return pid
        assert time.monotonic() < deadline, f"hostdevd not restarted within {timeout} s (pid {old_pid})"
        time.sleep(1)


def enable_fault_knob(vm) -> None:
    """hostdevd reads /run/hostdevd/fault at every step boundary (restarts the unit)."""
    vm.run(f"mkdir -p /etc/systemd/system/hostdevd.service.d && printf '[Service]\\n"
           f"Environment=HOSTDEVD_FAULT_FILE={FAULT}\\n' > {FAULT_DROPIN} && systemctl daemon-reload && "
           "systemctl restart hostdevd", timeout=120)
    wait_active(vm)


def disable_fault_knob(vm) -> None:
    vm.run(f"rm -f {FAULT_DROPIN} {FAULT} {FAULT}.paused; systemctl daemon-reload", timeout=60, check=False)


def set_fault(vm, action: str, boundary: str) -> None:
    vm.run(f"rm -f {FAULT}.paused; echo '{action} {boundary}' > {FAULT}", timeout=30)


def wait_paused(vm, boundary: str, timeout: float = 120) -> None:
    r = vm.run(f"for i in $(seq {int(timeout)}); do grep -qx '{boundary}' {FAULT}.paused 2>/dev/null && exit 0; "
               "sleep 1; done; exit 1", timeout=timeout + 30, check=False)
    assert r.rc == 0, f"hostdevd did not reach {boundary} within {timeout} s"


def journal(vm, *args: str, timeout: float = 60) -> str:
    return vm.run("journalctl --no-pager -o cat " + " ".join(args), timeout=timeout).stdout


def restart_libvirt(vm, timeout: int = 240) -> None:
    """Restart libvirtd so that it re-reads the hooks directory. Both lab stacks run the monolithic
    libvirtd: Debian 12 and 13 do not ship virtqemud and the other per-driver daemons."""
    vm.run("systemctl restart libvirtd.service", timeout=timeout)


def use_daemon(vm, config: str | None = None) -> None:
    """hostdevd running with `config` (None: the installed default) and libvirt aware of its hook.
    bookworm installs unit and hook from the venv; trixie has both from the package already."""
    vm.run("systemctl stop hostdevd 2>/dev/null; mkdir -p /etc/hostdevd", timeout=120, check=False)
    if PACKAGED:
        vm.run(f"test -e {PKG_CONF} || cp -p {CONF} {PKG_CONF}", timeout=30)
    if config is not None:
        # 0644: a file the guest agent creates may be writable by others, which hostdevd refuses
        # at start (StrictModes, as sshd does).
        vm.put(config.encode(), CONF, mode="644")
    elif PACKAGED:
        vm.run(f"cp -p {PKG_CONF} {CONF}", timeout=30)
    had_hook = vm.run(f"test -x {HOOK}", timeout=10, check=False).ok
    if not PACKAGED:
        vm.run(f"{HOSTDEVD} install", timeout=120)
    vm.run("systemctl restart hostdevd", timeout=120)
    if not had_hook:
        restart_libvirt(vm)
    wait_active(vm)


def leave_daemon(vm, extra: str = "") -> None:
    """Undo use_daemon: bookworm stops hostdevd and removes its hook (the venv stays); trixie's
    package stays installed and running, with its own config back. `extra`: more files to remove."""
    if PACKAGED:
        vm.run(f"rm -f {extra}; cp -p {PKG_CONF} {CONF} && systemctl restart hostdevd", timeout=180, check=False)
        return
    vm.run(f"systemctl stop hostdevd; rm -f {CONF} {HOOK} {extra}", timeout=120, check=False)
    restart_libvirt(vm)
