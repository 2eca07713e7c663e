"""``hostdevd run`` as systemd runs it (sd_notify, watchdog, SIGTERM) and ``hostdevd install``."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostdevd.core.config import parse_config
from hostdevd.doors import daemon_main
from hostdevd.doors.api import call

from .daemon_support import short_dir

LAB = Path(__file__).resolve().parents[1] / "topologies" / "lab.json"
CHECKOUT = Path(__file__).resolve().parents[2]
# hostdevd imported from this checkout (a venv), or from its Debian package, which ships no copies
# of the unit & co. for `hostdevd install` (debian/rules): Debian 13's unit suite runs that way
FROM_CHECKOUT = Path(daemon_main.__file__).resolve().parents[3] == CHECKOUT


class Notify:
    """A NOTIFY_SOCKET like systemd's: collects datagrams."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages: list[str] = []

    def wait_for(self, needle: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in self.messages:
                if needle in m:
                    return m
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                pass
        raise AssertionError(f"no {needle!r} in {self.messages}")


@pytest.fixture
def base():
    return short_dir()


def start_daemon(base: Path, notify: Notify, extra_env: dict | None = None) -> subprocess.Popen:
    env = dict(os.environ, NOTIFY_SOCKET=notify.path, **(extra_env or {}))
    cmd = [sys.executable, "-m", "hostdevd.doors.daemon_main", "--config", str(base / "none.toml"), "run",
           "--sim", str(LAB), "--no-libvirt", "--state-dir", str(base / "state"),
           "--runtime-dir", str(base / "run")]
    (base / "none.toml").write_text("")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@contextlib.contextmanager
def daemon_process(base: Path, notify: Notify, extra_env: dict | None = None) -> Iterator[subprocess.Popen]:
    """The daemon as systemd runs it; killed if the test leaves it running."""
    proc = start_daemon(base, notify, extra_env)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def stop_with_sigterm(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0


def test_run_notifies_ready_pings_watchdog_and_stops_cleanly_on_sigterm(base):
    notify = Notify(base / "notify")
    with daemon_process(base, notify, {"WATCHDOG_USEC": "400000"}) as proc:
        ready = notify.wait_for("READY=1")
        assert "STATUS=0 claims, libvirt not used" in ready
        sock = str(base / "run" / "hostdevd.sock")
        reply = call(sock, {"op": "prepare", "domain": {"name": "vm1"}, "addresses": ["0000:01:00.0"]})
        assert reply["ok"] and reply["groups"] == [12]
        notify.wait_for("WATCHDOG=1")
        notify.wait_for("STATUS=1 claims")
        stop_with_sigterm(proc)
    err = proc.stderr.read()
    notify.wait_for("STOPPING=1")
    assert "received SIGTERM" in err and "1 claims kept in the ledger" in err
    assert "MESSAGE_ID=" in err, "stderr lines carry the journald fields"
    assert not (base / "run" / "hostdevd.sock").exists()
    ledger = json.loads((base / "state" / "ledger.json").read_text())
    assert list(ledger["claims"]) == ["12"], "a stop never releases or rebinds"


def test_bad_config_is_exit_2_with_one_line(base):
    (base / "bad.toml").write_text("write_timeout = -1\n")
    proc = subprocess.run([sys.executable, "-m", "hostdevd.doors.daemon_main", "--config", str(base / "bad.toml")],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "write_timeout" in proc.stderr


def test_second_daemon_on_the_same_socket_exits_1(base):
    notify = Notify(base / "notify")
    proc = start_daemon(base, notify)
    try:
        notify.wait_for("READY=1")
        second = start_daemon(base, Notify(base / "notify2"))
        assert second.wait(20) == 1
        assert "already listening" in second.stderr.read()
        assert call(str(base / "run" / "hostdevd.sock"), {"op": "ping"})["ok"]
    finally:
        proc.terminate()
        proc.wait(15)


def test_notify_is_a_no_op_without_notify_socket(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert daemon_main.notify("READY=1") is False


def test_status_follows_claims_within_a_second_with_a_long_watchdog(base):
    """`systemctl status` used to lag up to the watchdog interval (15 s with WatchdogSec=30s)."""
    notify = Notify(base / "notify")
    with daemon_process(base, notify, {"WATCHDOG_USEC": "30000000"}) as proc:
        notify.wait_for("READY=1")
        sock = str(base / "run" / "hostdevd.sock")
        assert call(sock, {"op": "prepare", "domain": {"name": "vm1"}, "addresses": ["0000:01:00.0"]})["ok"]
        t0 = time.monotonic()
        notify.wait_for("STATUS=1 claims", timeout=5)
        assert time.monotonic() - t0 < 3
        assert not any("WATCHDOG=1" in m for m in notify.messages), "the ping keeps its 15 s interval"
        stop_with_sigterm(proc)


def test_watchdog_interval(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert daemon_main.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert daemon_main.watchdog_interval() is None, "armed for another process"
    monkeypatch.delenv("WATCHDOG_USEC")
    assert daemon_main.watchdog_interval() is None


def test_install_places_every_file(base, monkeypatch):
    root = base / "root"
    out = []

    class Out:
        def write(self, s):
            out.append(s)

        def flush(self):
            pass

    if not FROM_CHECKOUT:
        monkeypatch.setattr(daemon_main, "data_dir", lambda: CHECKOUT / "systemd")
    config = parse_config('runtime_dir = "/run/hd-test"\n')
    assert daemon_main.install(str(root), config, None, reload=False, out=Out()) == 0
    unit = (root / "etc/systemd/system/hostdevd.service").read_text()
    exec_line = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert exec_line.endswith(" run") and ("hostdevd run" in exec_line or "-m hostdevd.doors.daemon_main" in exec_line)
    assert "Type=notify" in unit and "WatchdogSec=30s" in unit
    assert (root / "etc/tmpfiles.d/hostdevd.conf").read_text().count("\nd /") == 2
    assert "-- 4c5bc6d98714421c885f01f5214c904d" in (root / "usr/lib/systemd/catalog/hostdevd.catalog").read_text()
    hook = root / "etc/libvirt/hooks/qemu.d/hostdevd"
    assert os.stat(hook).st_mode & 0o777 == 0o755
    assert "'/run/hd-test/hostdevd.sock'" in hook.read_text()
    cfg = root / "etc/hostdevd/hostdevd.toml"
    parse_config(cfg.read_text())
    # the installed hook runs as libvirt runs it
    proc = subprocess.run([str(hook), "vm1", "reconnect", "begin", "-"], input=b"<domain/>", capture_output=True,
                          timeout=10)
    assert proc.returncode == 0 and proc.stderr == b""
    # a second install keeps an edited config
    cfg.write_text('libvirt_uri = "qemu:///session"\n')
    daemon_main.install(str(root), config, None, reload=False, out=Out())
    assert "session" in cfg.read_text() and any("kept existing" in s for s in out)


def test_install_cli_entry_point(base):
    proc = subprocess.run([sys.executable, "-m", "hostdevd.doors.daemon_main", "install", "--prefix", str(base / "r"),
                           "--no-reload"], capture_output=True, text=True, timeout=30)
    if not FROM_CHECKOUT:     # the package installs its files itself: one clear line, nothing written
        assert proc.returncode != 0 and "cannot find hostdevd's systemd files" in proc.stderr, proc.stderr
        assert not (base / "r").exists()
        return
    assert proc.returncode == 0, proc.stderr
    assert "restart libvirtd" in proc.stdout and (base / "r/etc/libvirt/hooks/qemu.d/hostdevd").exists()
