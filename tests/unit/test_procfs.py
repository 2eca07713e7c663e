"""core/procfs.py on a fake /proc tree (real directories, real fd symlinks): who holds what, and a
scan that is bounded and tolerant (processes exit mid-scan, permission errors, limits)."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from hostdevd.core.cpuset import format_cpuset, parse_cpuset
from hostdevd.core.procfs import ProcScanner, RealProc, unit_of
from hostdevd.core.sysfs import RealHost

RES0 = "/sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0/resource0"


def proc(root: Path, pid: int, comm: str, fds: list[str], maps: list[str] = (), unit: str | None = None) -> None:
    d = root / str(pid)
    (d / "fd").mkdir(parents=True)
    for i, target in enumerate(fds):
        os.symlink(target, d / "fd" / str(i))      # dangling, as /proc's links look from here
    (d / "comm").write_text(comm + "\n")
    (d / "maps").write_text("".join(f"7f00{i:04x}0000-7f00{i:04x}1000 rw-s 00000000 00:15 9 {m}\n"
                                    for i, m in enumerate(maps)) + "7fff0000-7fff1000 rw-p 00000000 00:00 0 [stack]\n")
    (d / "cgroup").write_text(f"0::/system.slice/{unit}\n" if unit else "0::/user.slice/session-2.scope\n")


@pytest.fixture
def root(tmp_path) -> Path:
    r = tmp_path / "proc"
    r.mkdir()
    (r / "self").mkdir()
    (r / "interrupts").write_text("")
    proc(r, 812, "nvidia-persistenc", ["/dev/nvidia0", "/dev/null"], unit="nvidia-persistenced.service")
    proc(r, 1020, "Xorg", ["/dev/dri/card1", "socket:[1234]"], maps=[RES0, "/usr/lib/libc.so.6"])
    proc(r, 7, "bash", ["/dev/pts/0"])
    return r


def match(*paths: str):
    return lambda p: p if p in paths else None


def test_holders_through_fds_and_maps(root):
    res = ProcScanner(RealProc(str(root))).holders(match("/dev/nvidia0", "/dev/dri/card1", RES0))
    assert res.complete and res.processes == 3
    got = {k: [(h.label, h.via, h.unit) for h in v] for k, v in res.holders.items()}
    assert got == {"/dev/nvidia0": [("nvidia-persistenc[812]", "fd", "nvidia-persistenced.service")],
                   "/dev/dri/card1": [("Xorg[1020]", "fd", None)],
                   RES0: [("Xorg[1020]", "mmap", None)]}


def test_realhost_counts_vfio_opens_through_procfs(root, tmp_path):
    proc(root, 4242, "qemu", ["/dev/vfio/12", "/dev/vfio/12", "/dev/vfio/devices/vfio0"])
    host = RealHost(sys_root=str(tmp_path), proc_root=str(root), dev_root="/dev")
    assert host.dev_users(["vfio/12", "vfio/devices/vfio0", "vfio/13"]) == \
        {"vfio/12": 2, "vfio/devices/vfio0": 1, "vfio/13": 0}
    assert sorted(host.proc_listdir("4242/fd")) == ["0", "1", "2"]
    assert host.proc_readlink("4242/fd/0") == "/dev/vfio/12"


class Flaky(RealProc):
    """A /proc where processes exit at chosen moments, or cannot be read."""

    def __init__(self, root: str, exit_at: dict[str, str], denied: set[str] = frozenset()):
        super().__init__(root)
        self.exit_at, self.denied = exit_at, denied
        self.exited: set[str] = set()

    def _gone(self, rel: str, moment: str) -> None:
        pid = rel.split("/")[0]
        if self.exit_at.get(pid) == moment:
            self.exited.add(pid)                   # from this moment on, everything of it is gone
        if pid in self.exited:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", rel)
        if pid in self.denied and moment in ("fd", "maps"):
            raise PermissionError(errno.EACCES, "Permission denied", rel)

    def proc_listdir(self, rel: str) -> list[str]:
        if rel:
            self._gone(rel, "fd")
        return super().proc_listdir(rel)

    def proc_readlink(self, rel: str) -> str:
        self._gone(rel, "readlink")
        return super().proc_readlink(rel)

    def proc_read(self, rel: str, limit: int = -1) -> str:
        self._gone(rel, rel.split("/")[-1])
        return super().proc_read(rel, limit)


@pytest.mark.parametrize("moment", ["fd", "readlink", "maps", "comm"])
def test_a_process_exiting_mid_scan_is_skipped(root, moment):
    res = ProcScanner(Flaky(str(root), {"1020": moment})).holders(match("/dev/dri/card1", RES0))
    assert res.holders == {} and res.complete


def test_unreadable_processes_are_counted_not_fatal(root):
    res = ProcScanner(Flaky(str(root), {}, denied={"1020", "7"})).holders(match("/dev/nvidia0", "/dev/dri/card1"))
    assert [h.label for h in res.holders["/dev/nvidia0"]] == ["nvidia-persistenc[812]"]
    assert "/dev/dri/card1" not in res.holders
    assert not res.complete and res.unreadable == 2
    assert res.incomplete_text() == "2 of 3 processes could not be read (permission: run as root)"


def test_the_scan_is_bounded(root):
    ticks = iter(range(100))
    res = ProcScanner(RealProc(str(root)), deadline=1.5, clock=lambda: next(ticks)).holders(match("/dev/nvidia0"))
    assert res.truncated == "the scan stopped after 1.5 s (1 of 3 processes)" and not res.complete
    res = ProcScanner(RealProc(str(root)), max_pids=2).holders(match("/dev/dri/card1"))
    assert res.truncated == "the scan looked at the first 2 of 3 processes" and res.processes == 2
    res = ProcScanner(RealProc(str(root)), max_fds=1).holders(match("/dev/null"))
    assert res.holders == {}                       # /dev/null was 812's second fd


def test_missing_proc_root_is_an_empty_scan(tmp_path):
    res = ProcScanner(RealProc(str(tmp_path / "nope"))).holders(match("/dev/nvidia0"))
    assert res.holders == {} and res.processes == 0


def test_unit_of_cgroup_lines():
    assert unit_of("0::/system.slice/nvidia-persistenced.service\n") == "nvidia-persistenced.service"
    assert unit_of("12:pids:/x\n1:name=systemd:/system.slice/gdm.service\n") == "gdm.service"
    assert unit_of("0::/user.slice/user-1000.slice/user@1000.service/app.slice/x.scope\n") is None
    assert unit_of("0::/user.slice/user-1000.slice/session-2.scope\n") is None
    assert unit_of("0::/\n") is None


def test_cpusets():
    assert parse_cpuset("0-3,8,10-11\n") == frozenset({0, 1, 2, 3, 8, 10, 11})
    assert parse_cpuset("0-7,^2-3") is None and parse_cpuset("0-7,^2,^3") == frozenset({0, 1, 4, 5, 6, 7})
    assert parse_cpuset("") == frozenset() and parse_cpuset("3-1") is None and parse_cpuset("99999") is None
    assert parse_cpuset("a") is None and parse_cpuset("1,,2") is None
    assert format_cpuset({0, 1, 2, 3, 8, 10, 11}) == "0-3,8,10-11" and format_cpuset(set()) == ""


def test_hostdevd_itself_is_never_a_holder(root):
    res = ProcScanner(RealProc(str(root)), exclude=[1020]).holders(match("/dev/dri/card1", "/dev/nvidia0"))
    assert list(res.holders) == ["/dev/nvidia0"] and res.processes == 2
    assert RealProc("/proc").self_pids == (os.getpid(),) and RealProc(str(root)).self_pids == ()
