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
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import labvm  # noqa: E402

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


def _fail(msg: str) -> None:
    pytest.fail("\n\n*** hostdevd LAB UNAVAILABLE ***\n%s\n" % msg, pytrace=False)


@pytest.fixture(scope="session")
def lab():
    """The booted L1 guest (labvm.LabVM) with hostdevd installed in /opt/hostdevd."""
    if os.geteuid() != 0:
        _fail("the lab needs root (mmdebstrap --mode=root, mke2fs -d, 9p share as root)")
    missing = [t for t in ("qemu-system-x86_64", "qemu-img") if shutil.which(t) is None]
    if missing:
        _fail("missing %s: apt-get install qemu-system-x86 qemu-utils "
              "(plus mmdebstrap e2fsprogs busybox-static cpio for the image build)" % missing)
    err = None
    try:
        t = labvm.ensure_image()
    except labvm.LabError as e:
        err = "building the lab image in %s failed:\n%s" % (labvm.lab_dir(), e)
    if err:
        _fail(err)
    sys.stderr.write("\n[lab] image ready in %s (%.1fs)\n" % (labvm.lab_dir(), t))

    vm = labvm.LabVM()
    # SIGTERM (CI cancel, timeout) -> KeyboardInterrupt, so pytest runs the teardown.
    prev_term = signal.getsignal(signal.SIGTERM)

    def _on_term(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, _on_term)
    try:
        try:
            step = "booting L1"
            vm.boot(share_dir=labvm.REPO_ROOT,
                    timeout=float(os.environ.get("HOSTDEVD_LAB_BOOT_TIMEOUT", 300)))
            step = "installing hostdevd into L1"
            vm.install_hostdevd()
        except labvm.LabError as e:
            err = "%s failed:\n%s" % (step, e)
        if err:
            _fail(err)
        yield vm
    finally:
        vm.stop()
        signal.signal(signal.SIGTERM, prev_term)
