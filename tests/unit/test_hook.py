"""The libvirt hook, run as libvirt runs it: the installed launcher script in a subprocess."""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

import pytest

from hostdevd.doors.daemon_main import hook_script
from hostdevd.doors.hook import NOT_RUNNING, needs_daemon

from .daemon_support import domain_xml, running_daemon, short_dir, uuid_for

PAIR = "0000:04:00.0"
TIMINGS: dict[str, list[float]] = {}


def install_hook(sock: str) -> str:
    path = short_dir() / "hostdevd"
    path.write_text(hook_script(sock))
    path.chmod(0o755)
    return str(path)


def run_hook(hook: str, *argv: str, xml: str = "", label: str | None = None, timeout: float = 30):
    env = {k: v for k, v in os.environ.items() if k != "HOSTDEVD_SOCKET"}
    t0 = time.monotonic()
    proc = subprocess.run([hook, *argv], input=xml.encode(), capture_output=True, timeout=timeout, env=env)
    elapsed = time.monotonic() - t0
    if label:
        TIMINGS.setdefault(label, []).append(elapsed)
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode(), elapsed


@pytest.fixture
def daemon():
    with running_daemon("lab") as ctx:
        yield ctx


@pytest.fixture(scope="module", autouse=True)
def report_timings():
    yield
    if TIMINGS:
        lines = [f"  {k:<34} n={len(v):<3} median {statistics.median(v) * 1000:6.1f} ms  "
                 f"max {max(v) * 1000:6.1f} ms" for k, v in sorted(TIMINGS.items())]
        print("\nhook round trips (fork+exec of the installed launcher, python -I):\n" + "\n".join(lines))


def test_filter():
    assert not needs_daemon(domain_xml("a", None, extra="<interface type='bridge'/>"))
    assert needs_daemon(domain_xml("a", None, PAIR))
    assert needs_daemon("<interface type=\"hostdev\" managed='yes'>")
    assert needs_daemon("<interface type='network'><actual type='hostdev'/></interface>")
    assert needs_daemon("<interface type='network'><source network='default'/></interface>")


def test_hook_imports_only_the_standard_library():
    code = ("import sys; import hostdevd.doors.hook; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('hostdevd', 'pydantic', 'lxml', 'libvirt')))")
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['hostdevd', 'hostdevd.doors', 'hostdevd.doors.hook', 'hostdevd.doors.wire']"


def test_no_hostdev_exits_0_without_a_daemon():
    hook = install_hook(str(short_dir() / "absent.sock"))
    xml = domain_xml("plain", uuid_for(9), extra="<interface type='bridge'><source bridge='br0'/></interface>")
    for _ in range(5):
        rc, out, err, _ = run_hook(hook, "plain", "prepare", "begin", "-", xml=xml, label="prepare, no hostdev")
        assert (rc, out, err) == (0, "", "")


def test_daemon_missing_is_one_clear_line():
    hook = install_hook(str(short_dir() / "absent.sock"))
    rc, out, err, _ = run_hook(hook, "vm1", "prepare", "begin", "-", xml=domain_xml("vm1", uuid_for(1), PAIR))
    assert rc == 1 and out == "" and err == NOT_RUNNING + "\n"
    assert NOT_RUNNING == "hostdevd is not running: systemctl start hostdevd"


def test_daemon_missing_with_only_a_network_interface_fails_open():
    hook = install_hook(str(short_dir() / "absent.sock"))
    xml = domain_xml("nat", None, extra="<interface type='network'><source network='default'/></interface>")
    rc, out, err, _ = run_hook(hook, "nat", "prepare", "begin", "-", xml=xml)
    assert rc == 0 and "warning" in err and NOT_RUNNING in err and err.count("\n") == 1


def test_prepare_refusal_and_release(daemon):
    d, sim, path = daemon
    hook = install_hook(path)
    xml1 = domain_xml("vm1", uuid_for(1), PAIR)
    for _i in range(5):
        rc, out, err, _ = run_hook(hook, "vm1", "prepare", "begin", "-", xml=xml1, label="prepare begin (bind)")
        assert (rc, err) == (0, ""), err
        assert sim.driver(PAIR) == sim.driver("0000:04:00.1") == "vfio-pci"

        xml2 = domain_xml("vm2", uuid_for(2), "0000:04:00.1")
        rc, out, err, _ = run_hook(hook, "vm2", "prepare", "begin", "-", xml=xml2, label="prepare begin (refused)")
        assert rc == 1 and err.count("\n") == 1, err
        assert err.startswith("hostdevd: refused to prepare vm2: ")
        assert f"held by domain vm1 ({uuid_for(1)})" in err and "stop vm1" in err
        assert err.startswith("hostdevd: refused to prepare vm2: 0000:04:00.1 is in IOMMU group 15, held by domain "
                              f"vm1 ({uuid_for(1)}) (stop vm1 "), err
        assert err.count("0000:04:00.1") == 1, "the line names the device once"

        rc, out, err, _ = run_hook(hook, "vm1", "release", "end", "-", xml=xml1, label="release end (restore)")
        assert (rc, err) == (0, "")
        assert sim.driver(PAIR) == sim.driver("0000:04:00.1") == "e1000e"
        assert d.engine.ledger().claims == {}


def test_bad_xml_is_refused_in_one_line(daemon):
    d, sim, path = daemon
    hook = install_hook(path)
    rc, out, err, _ = run_hook(hook, "vm1", "prepare", "begin", "-", xml="<domain><name>vm1</name><devices>"
                               "<hostdev mode='subsystem' type='pci'><source/></hostdev></devices></domain>")
    assert rc == 1 and err.startswith("hostdevd: refused to prepare vm1: ") and err.count("\n") == 1


def test_release_never_fails_loudly():
    hook = install_hook(str(short_dir() / "absent.sock"))
    rc, out, err, _ = run_hook(hook, "vm1", "release", "end", "-", xml=domain_xml("vm1", uuid_for(1), PAIR))
    assert rc == 0 and "release of vm1 not done" in err


@pytest.mark.parametrize("op", ["migrate", "restore"])
def test_xml_filters_echo_unchanged(op):
    hook = install_hook(str(short_dir() / "absent.sock"))
    xml = domain_xml("vm1", uuid_for(1), PAIR) + "\n<!-- é ü -->\n"
    rc, out, err, _ = run_hook(hook, "vm1", op, "begin", "-", xml=xml)
    assert (rc, out, err) == (0, xml, "")


@pytest.mark.parametrize("argv", [["vm1", "reconnect", "begin", "-"], ["vm1", "started", "begin", "-"],
                                  ["vm1", "stopped", "end", "-"], ["vm1", "attach", "begin", "-"], ["vm1"], []])
def test_other_ops_exit_0_at_once(argv):
    hook = install_hook(str(short_dir() / "absent.sock"))
    rc, out, err, _ = run_hook(hook, *argv, xml=domain_xml("vm1", uuid_for(1), PAIR))
    assert (rc, out, err) == (0, "", "")


def test_reconnect_does_not_wait_for_stdin():
    """libvirt's reconnect hook must never block: stdin left open must not hold it."""
    hook = install_hook(str(short_dir() / "absent.sock"))
    for _ in range(5):
        t0 = time.monotonic()
        proc = subprocess.Popen([hook, "vm1", "reconnect", "begin", "-"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.stdin.write(b"<domain><name>vm1</name>")     # partial XML, pipe never closed
        proc.stdin.flush()
        rc = proc.wait(timeout=10)
        elapsed = time.monotonic() - t0
        TIMINGS.setdefault("reconnect begin (stdin open)", []).append(elapsed)
        proc.stdin.close()
        assert rc == 0 and elapsed < 2.0


def test_hook_left_behind_by_a_removed_package_lets_libvirt_be(tmp_path):
    """After `apt remove` the hook (a conffile) stays while hostdevd is gone: it must neither
    refuse starts nor fail libvirt's reconnect (which would stop running domains)."""
    script = hook_script("/nonexistent.sock").splitlines()
    # hostdevd gone: nothing by its name imports, wherever the hook or site.main() looks (a checkout's
    # daemon/, or Debian's dist-packages where the unit suite runs from the installed package)
    assert sum("from hostdevd.doors.hook import main" in line for line in script) == 2, script
    script = [line.replace("from hostdevd.doors.hook", "from hostdevd_removed.doors.hook") for line in script]
    path = tmp_path / "hostdevd"
    path.write_text("\n".join(script) + "\n")
    path.chmod(0o755)
    for argv in (("vm1", "prepare", "begin", "-"), ("vm1", "reconnect", "begin", "-")):
        rc, _out, err, _ = run_hook(str(path), *argv, xml=domain_xml("vm1", uuid_for(1), PAIR))
        assert rc == 0, err
        assert err.strip() == ("hostdevd: hook left behind (hostdevd is not installed): not checked; "
                               "remove this file or reinstall hostdevd"), err
