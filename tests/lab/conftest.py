"""pytest wiring for the nested-VM lab (tests/lab).

* Every test collected from tests/lab gets the ``lab`` marker, so
  ``pytest -m "not lab"`` deselects the lab and ``pytest -m lab`` selects it.
* The session fixture ``lab`` builds the image if needed (cached in
  $HOSTDEVD_LAB_DIR, default /var/tmp/hostdevd-lab), boots one L1 per session
  with the checkout at /mnt/src, installs hostdevd into /opt/hostdevd and stops
  L1 at session end, also after failures and Ctrl-C.
* Missing QEMU, a failed image build, boot or install is a test FAILURE
  (pytest.fail), never a skip: a lab run that silently skips proves nothing.

Only tests that request the ``lab`` fixture boot the VM; nothing outside
tests/lab can request it, because this conftest is not visible there.
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import labvm

LAB_DIR_PATH = Path(__file__).resolve().parent


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "lab: runs against the nested-VM lab (real kernel, real libvirtd); needs QEMU and the lab image")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    # tryfirst: mark before the -m filter deselects anything
    for item in items:
        if LAB_DIR_PATH in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.lab)
    # tests that keep a nested L2 running go last: if L1 stalls there, nothing else is lost;
    # reboots and power cuts after them (L1 is in a new boot afterwards); the Debian 13 session
    # starts with its own tests and ends with the package's removal (lab_last)
    # (lab_igb tests carry no lab_l2 mark, so they run first in the session that has them)
    items.sort(key=lambda it: (it.get_closest_marker("lab_last") is not None,
                               it.get_closest_marker("lab_l2") is not None,
                               it.get_closest_marker("lab_reboot") is not None,
                               it.get_closest_marker("trixie_only") is None))


# --------------------------------------------------------------------------- L1 kernel stalls
# Under TCG an L1 running a live nested L2 has, rarely, stopped getting timer interrupts (RCU
# stalls, soft lockups; see README "Tests"). labvm's watcher cuts the agent the moment L1's
# kernel says so; here every later test fails at once instead of waiting out its timeouts, the
# summary says it loudly, and $HOSTDEVD_LAB_STALL_FILE tells run-tests.sh it was the emulator.
_STALLS: dict[str, list[str]] = {}


def _stalled_vms() -> list:
    return [vm for vm in list(labvm.BOOTED) if vm.stalled]


@pytest.fixture(autouse=True)
def _l1_health(request):
    for vm in _stalled_vms():
        if vm.running:
            pytest.fail(f"L1 '{vm.name}' stalled earlier in this session ({vm.stalled[0]}); "
                        f"not running {request.node.name} on it", pytrace=False)
    yield
    for vm in _stalled_vms():
        _STALLS.setdefault(vm.name, vm.stalled)


# What the session's L1 cost before its first test (CI's log says where setup time goes).
_SETUP: dict[str, float] = {}


def pytest_terminal_summary(terminalreporter):
    if _SETUP:
        terminalreporter.write_line("[lab] session L1 setup: " + ", ".join(f"{k} {v:.1f} s" for k, v in _SETUP.items()))
    for vm in _stalled_vms():
        _STALLS.setdefault(vm.name, vm.stalled)
    if not _STALLS:
        return
    tr = terminalreporter
    tr.section("L1 KERNEL STALLED (emulator, not hostdevd)", sep="!", red=True, bold=True)
    for name, lines in _STALLS.items():
        tr.line(f"L1 '{name}': {len(lines):d} stall lines, first: {lines[0]}", red=True)
        tr.line(f"  serial log: {labvm.lab_dir() / 'run' / name / 'serial.log'}")
    marker = os.environ.get("HOSTDEVD_LAB_STALL_FILE")
    if marker:
        Path(marker).write_text("".join(f"{n}: {ls[0]}\n" for n, ls in _STALLS.items()))


def _fail(msg: str) -> None:
    pytest.fail(f"\n\n*** hostdevd LAB UNAVAILABLE ***\n{msg}\n", pytrace=False)


@pytest.fixture(scope="session")
def lab():
    """The booted L1 guest (labvm.LabVM) with hostdevd installed in /opt/hostdevd."""
    if os.geteuid() != 0:
        _fail("the lab needs root (mmdebstrap --mode=root, mke2fs -d, 9p share as root)")
    missing = [t for t in ("qemu-system-x86_64", "qemu-img") if shutil.which(t) is None]
    if missing:
        _fail(f"missing {missing}: apt-get install qemu-system-x86 qemu-utils "
              "(plus mmdebstrap e2fsprogs busybox-static cpio for the image build)")
    err = None
    try:
        t = labvm.ensure_image()
    except labvm.LabError as e:
        err = f"building the lab image in {labvm.lab_dir()} failed:\n{e}"
    if err:
        _fail(err)
    sys.stderr.write(f"\n[lab] image ready in {labvm.lab_dir()} ({t:.1f}s)\n")

    vm = labvm.LabVM()
    if os.environ.get("HOSTDEVD_LAB_IGB") == "1" and labvm.SUITE == "bookworm":
        # run-tests.sh's lab_l2 session: its L1 carries the igb PF, so test_lab_sriov's igb tests
        # (lab_igb) need no L1 of their own; restarts and power cuts boot the same QEMU
        try:
            os.environ["QEMU"] = labvm.igb_qemu()
        except labvm.LabError as e:
            _fail(str(e))
        vm.has_igb = True
    # SIGTERM (CI cancel, timeout) -> KeyboardInterrupt, so pytest runs the teardown.
    prev_term = signal.getsignal(signal.SIGTERM)

    def _on_term(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, _on_term)
    try:
        try:
            step = "booting L1"
            _SETUP["image check"] = t
            _SETUP["boot"] = vm.boot(share_dir=labvm.REPO_ROOT,
                                     timeout=float(os.environ.get("HOSTDEVD_LAB_BOOT_TIMEOUT", 300)))
            if labvm.SUITE == "bookworm":
                step = "installing hostdevd into L1"
                info = vm.install_hostdevd()
                _SETUP.update({"wheel build": info["build_s"], "upload": info["upload_s"],
                               "pip install": info["install_s"]})
            else:
                step = "building hostdevd's .deb"
                t0 = time.monotonic()
                debs = labvm.build_deb()
                _SETUP[".deb build"] = time.monotonic() - t0
                step = f"installing {debs[0].name} into the {labvm.SUITE} L1 with apt"
                info = vm.install_deb(debs)
                _SETUP["apt install"] = float(info.get("install_s", 0))
        except labvm.LabError as e:
            err = f"{step} failed:\n{e}"
        if err:
            _fail(err)
        yield vm
    finally:
        vm.stop()
        signal.signal(signal.SIGTERM, prev_term)
