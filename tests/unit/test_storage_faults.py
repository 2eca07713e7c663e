"""Storage faults (issue 12, item 3): a ledger save that fails refuses before any unrecorded sysfs
write and names the path and errno; a damaged ledger falls back to its previous generation (or
the daemon goes read-only); config and state files others could change are refused at start."""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hostdevd.core.address import PciAddress as A
from hostdevd.core.checks import ledger_file_check
from hostdevd.core.errors import ExecutionFailed, InsecureFile, LedgerReadOnly, LedgerSaveFailed
from hostdevd.core.ledger import Claim, DeviceRecord, Owner
from hostdevd.core.ledger_store import LedgerStore
from hostdevd.core.logfields import MSG
from hostdevd.core.strictmodes import check_files, problem
from hostdevd.doors.api import call

from .conftest import load_sim, make_engine
from .daemon_support import running_daemon, short_dir
from .test_cli import run as run_cli
from .test_daemon_main import Notify, daemon_process

VM1 = Owner(name="vm1", uuid="00000000-0000-0000-0000-000000000001")
PAIR = A.parse("0000:04:00.0")          # lab: multifunction e1000e pair, group 15
NIC1 = "0000:01:00.0"                    # lab: group 12


class DiskFault:
    """The ledger's file operations under ``state`` fail with ``err`` while armed.

    ``ops``: which of os.open/write/fsync/replace fail (os is patched process-wide, but only
    calls on files under ``state`` fail). ``times``: how many failures before it heals (None:
    until disarmed). os.open fails only for writing: with EROFS any write open, with EACCES
    (a directory one may not write) only the creation of a new file.
    """

    def __init__(self, monkeypatch, state: Path, err: int, ops=("write",), times: int | None = None,
                 armed: bool = True):
        self.state, self.err, self.left, self.armed, self.hits = str(state), err, times, armed, 0
        self._readlink = os.readlink
        for op in ops:
            monkeypatch.setattr(os, op, self._wrap(op, getattr(os, op)))

    def _ours(self, op: str, args: tuple) -> bool:
        if op in ("write", "fsync"):
            try:
                target = self._readlink(f"/proc/self/fd/{args[0]}")
            except OSError:
                return False
        else:
            target = os.fspath(args[0])
        if not target.startswith(self.state):
            return False
        if op == "open":
            flags = args[1]
            if self.err == errno.EACCES:
                return bool(flags & os.O_CREAT) and not os.path.exists(target)
            return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        return True

    def _wrap(self, op: str, real):
        def fn(*args, **kw):
            if self.armed and self._ours(op, args) and (self.left is None or self.left > 0):
                if self.left is not None:
                    self.left -= 1
                self.hits += 1
                raise OSError(self.err, os.strerror(self.err))
            return real(*args, **kw)
        return fn


def _claim(group: int, addr: str) -> Claim:
    return Claim(group=group, owner=Owner(name="vm1"), devices=[
        DeviceRecord(address=addr, role="requested", original_driver="e1000e", original_override=None)])


def _names(path: Path) -> set[str]:
    return {p.name for p in path.iterdir()}


def _touches(write_log, addr: str) -> bool:
    return any(addr in f"{p} {v}" for p, v in write_log)


# --------------------------------------------------------------------------- 1. a save that fails


@pytest.mark.parametrize("op,err,hint", [
    ("write", errno.ENOSPC, "free space in"),
    ("write", errno.EDQUOT, "quota"),
    ("fsync", errno.EIO, "dmesg"),
    ("open", errno.EROFS, "read-only file system"),
    ("open", errno.EACCES, "owner and mode"),
    ("replace", errno.EIO, "I/O error"),
])
def test_failed_save_names_path_and_errno_and_leaves_no_temp_file(monkeypatch, tmp_path, op, err, hint):
    store = LedgerStore(tmp_path)
    with store.transaction() as led:
        led.put(_claim(12, NIC1))
    before = (tmp_path / "ledger.json").read_bytes()
    DiskFault(monkeypatch, tmp_path, err, ops=(op,))
    with pytest.raises(LedgerSaveFailed) as e:
        with store.transaction() as led:
            led.put(_claim(15, "0000:04:00.0"))
    assert e.value.message == f"cannot save the ledger {tmp_path / 'ledger.json'}: {os.strerror(err)} " \
                              f"({errno.errorcode[err]})"
    assert e.value.errno == err and hint in e.value.hint and str(tmp_path) in e.value.hint
    assert not [n for n in _names(tmp_path) if n.endswith(".tmp")], _names(tmp_path)
    assert (tmp_path / "ledger.json").read_bytes() == before
    assert list(store.read().claims) == ["12"], "reads go on (EROFS: a read-only lock)"


def test_ledger_file_exists_at_every_moment_of_a_save(monkeypatch, tmp_path):
    """The previous generation is a hard link: no window without ledger.json (a rename left one)."""
    store = LedgerStore(tmp_path)
    with store.transaction() as led:
        led.put(_claim(12, NIC1))
    seen = []
    real = os.replace

    def spy(src, dst):
        seen.append((tmp_path / "ledger.json").exists())
        return real(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    with store.transaction() as led:
        led.put(_claim(15, "0000:04:00.0"))
    assert seen and all(seen)
    assert list(LedgerStore(tmp_path)._load_file(store.bak_path).claims) == ["12"]


def test_refused_prepare_writes_nothing_to_sysfs(monkeypatch, tmp_path):
    sim = load_sim("lab")
    before = sim.state()
    eng = make_engine(sim, tmp_path / "state")
    eng.store.dir.mkdir()
    DiskFault(monkeypatch, tmp_path / "state", errno.ENOSPC)
    with pytest.raises(LedgerSaveFailed) as e:
        eng.prepare([PAIR], VM1)
    assert str(e.value) == (f"cannot save the ledger {tmp_path / 'state' / 'ledger.json'}: No space left on "
                            f"device (ENOSPC): free space in {tmp_path / 'state'}; nothing was bound")
    assert sim.write_log == [] and sim.state() == before


def _bind_steps(tmp_path) -> list[str]:
    names: list[str] = []
    eng = make_engine(load_sim("lab"), tmp_path / "names")
    eng.executor.on_step = names.append
    eng.prepare([PAIR], VM1)
    return [n for n in names if n.startswith("bind:")]


def test_outcome_save_failing_after_both_binds_gives_both_back(monkeypatch, tmp_path):
    """The ledger is written ahead: no save between the binds, so the save that can fail after
    the first sysfs write is the activation's; both devices were bound and both go back."""
    first, second = (s.split(":", 1)[1] for s in _bind_steps(tmp_path))
    sim = load_sim("lab")
    before = sim.state()
    eng = make_engine(sim, tmp_path / "state")
    fault = DiskFault(monkeypatch, tmp_path / "state", errno.ENOSPC, times=1, armed=False)
    eng.executor.on_step = lambda name: setattr(fault, "armed", fault.armed or name.startswith("activate:"))
    with pytest.raises(LedgerSaveFailed, match=r"\(ENOSPC\)") as e:
        eng.prepare([PAIR], VM1)
    assert fault.hits == 1 and e.value.hint.endswith("what was done was undone")
    assert _touches(sim.write_log, first) and _touches(sim.write_log, second), "both were bound, then given back"
    assert sim.state() == before and eng.ledger().claims == {}


def test_no_save_between_the_binds_of_a_fresh_claim(tmp_path):
    """Every device's intent is on disk before the first sysfs write (the claim's one save)."""
    sim = load_sim("lab")
    eng = make_engine(sim, tmp_path / "state")
    seen: list[tuple[str, int, list[str]]] = []
    eng.executor.on_step = lambda name: seen.append((name, eng.store.saves, sorted(
        r.state for c in eng.store.read().claims.values() for r in c.devices)))
    eng.prepare([PAIR], VM1)
    binds = [(n, k, st) for n, k, st in seen if n.startswith("bind:")]
    assert len(binds) == 2 and binds[0][1] == binds[1][1], "a save between the binds"
    assert binds[0][2] == ["binding", "binding"], "both intents recorded before the first bind"


def test_rollback_that_cannot_save_still_restores_and_names_both(monkeypatch, tmp_path):
    """Every save fails from the second bind on: the first device still goes back (sysfs is the
    truth); the ledger keeps the claim until a release can be saved."""
    _, second = (s.split(":", 1)[1] for s in _bind_steps(tmp_path))
    sim = load_sim("lab")
    before = sim.state()
    eng = make_engine(sim, tmp_path / "state")
    fault = DiskFault(monkeypatch, tmp_path / "state", errno.ENOSPC, armed=False)
    eng.executor.on_step = lambda name: setattr(fault, "armed", fault.armed or name == f"bind:{second}")
    with pytest.raises(ExecutionFailed) as e:
        eng.prepare([PAIR], VM1)
    msg = e.value.message
    assert msg.startswith(f"cannot save the ledger {eng.store.path}: No space left on device (ENOSPC)")
    assert "rolled back on the host, but the ledger could not record it" in msg
    assert "is back on e1000e, but the ledger could not record it" in msg
    assert "the claim of group 15 stays" in msg
    assert "free space in" in e.value.hint and "`hostdevctl release --owner vm1`" in e.value.hint
    assert sim.state() == before
    assert not [n for n in _names(eng.store.dir) if n.endswith(".tmp")]
    fault.armed = False
    assert list(eng.ledger().claims) == ["15"], "the claim stays recorded (limbo), never silently lost"
    eng.release(VM1)
    assert eng.ledger().claims == {} and sim.state() == before


def test_release_with_a_failing_save_refuses_before_any_sysfs_write(monkeypatch, tmp_path):
    sim = load_sim("lab")
    eng = make_engine(sim, tmp_path / "state")
    eng.prepare([PAIR], VM1)
    writes = len(sim.write_log)
    fault = DiskFault(monkeypatch, tmp_path / "state", errno.EIO, ops=("fsync",))
    with pytest.raises(LedgerSaveFailed, match=r"Input/output error \(EIO\)"):
        eng.release(VM1)
    assert len(sim.write_log) == writes and sim.driver("0000:04:00.0") == "vfio-pci"
    fault.armed = False
    eng.release(VM1)
    assert sim.driver("0000:04:00.0") == "e1000e" and eng.ledger().claims == {}


def test_daemon_replies_with_the_errno_and_keeps_serving(monkeypatch):
    with running_daemon("lab") as (d, sim, path):
        fault = DiskFault(monkeypatch, d.engine.store.dir, errno.ENOSPC)
        reply = call(path, {"op": "prepare", "domain": {"name": "vm1"}, "addresses": [NIC1]})
        assert not reply["ok"] and reply["error"]["code"] == "LEDGER_SAVE"
        assert "(ENOSPC)" in reply["error"]["message"] and str(d.engine.store.path) in reply["error"]["message"]
        assert "nothing was bound" in reply["error"]["hint"]
        assert sim.driver(NIC1) == "e1000e"
        status = call(path, {"op": "status"})
        assert status["ok"] and status["claims"] == []
        fault.armed = False
        assert call(path, {"op": "prepare", "domain": {"name": "vm1"}, "addresses": [NIC1]})["ok"]


# --------------------------------------------------------------------------- 2. a damaged ledger at start


def _two_generations(state: Path) -> LedgerStore:
    """ledger.json.bak holds claim 12; ledger.json claims 12 and 15."""
    store = LedgerStore(state)
    with store.transaction() as led:
        led.put(_claim(12, NIC1))
    with store.transaction() as led:
        led.put(_claim(15, "0000:04:00.0"))
    return store


def _damage(path: Path, how: str) -> bytes:
    raw = path.read_bytes()
    bad = {"truncated": raw[: len(raw) // 2], "empty": b"", "garbage": b"\x00\x17\xff" * 50,
           "invalid": b'{"version": 1, "claims": {"1": {"group": 1}}}'}[how]
    path.write_bytes(bad)
    return bad


def _records(caplog, kind: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "journal", {}).get("MESSAGE_ID") == MSG[kind]]


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage", "invalid"])
def test_damaged_ledger_falls_back_to_the_previous_generation(tmp_path, caplog, how):
    _two_generations(tmp_path)
    bad = _damage(tmp_path / "ledger.json", how)
    store = LedgerStore(tmp_path)
    with caplog.at_level(logging.WARNING):
        health = store.recover()
    assert health.recovered and health.generation == "ledger.json.bak" and store.read_only is None
    assert list(store.read().claims) == ["12"]
    [kept] = [n for n in _names(tmp_path) if n.startswith("ledger.json.damaged-")]
    assert (tmp_path / kept).read_bytes() == bad, "the damaged file is kept for the operator"
    assert health.kept == [kept] and (tmp_path / "ledger.json.bak").exists()
    [rec] = _records(caplog, "ledger_recovered")
    assert rec.levelno == logging.WARNING and kept in rec.getMessage() and "ledger.json.bak" in rec.getMessage()
    # and it is an ordinary ledger again
    with store.transaction() as led:
        led.put(_claim(16, "0000:06:01.0"))
    assert sorted(LedgerStore(tmp_path).read().claims) == ["12", "16"]


def test_check_names_the_damaged_file_and_the_generation(tmp_path):
    _two_generations(tmp_path)
    _damage(tmp_path / "ledger.json", "truncated")
    before = ledger_file_check(LedgerStore(tmp_path).inspect())
    assert before is not None and before.name == "ledger" and before.status == "fail"
    assert "not valid JSON" in before.message and "ledger.json.bak is readable (1 claims)" in before.message
    assert "systemctl restart hostdevd" in before.hint
    LedgerStore(tmp_path).recover()
    after = ledger_file_check(LedgerStore(tmp_path).inspect())
    assert after is not None and after.status == "warn"
    assert "ledger.json.damaged-" in after.message and "ledger.json.bak" in after.message
    assert ledger_file_check(LedgerStore(tmp_path / "fresh").inspect()) is None


def test_hostdevctl_check_shows_the_ledger_line(tmp_path):
    cfg = tmp_path / "hostdevd.toml"
    cfg.write_text(f'state_dir = "{tmp_path / "state"}"\nruntime_dir = "{tmp_path / "run"}"\n')
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "ledger.json").write_text("{garbage")
    rc, out = run_cli(["--config", str(cfg), "check"], load_sim("lab"))
    assert rc == 1
    [line] = [ln for ln in out.splitlines() if ln.startswith("FAIL  ledger")]
    assert "not valid JSON" in line and "read-only" in line and "ledger.json.bak does not exist" in line


def test_missing_ledger_with_a_previous_generation_is_recovered(tmp_path):
    """What an interrupted save of earlier versions (rename to .bak, then crash) left behind."""
    _two_generations(tmp_path)
    (tmp_path / "ledger.json").unlink()
    health = LedgerStore(tmp_path).recover()
    assert health.recovered and list(LedgerStore(tmp_path).read().claims) == ["12"]


def test_a_newer_version_is_not_repaired_from_an_older_generation(tmp_path):
    _two_generations(tmp_path)
    (tmp_path / "ledger.json").write_text('{"version": 2, "claims": {}}')
    store = LedgerStore(tmp_path)
    health = store.recover()
    assert health.generation is None and "version 2" in (store.read_only or "")
    assert (tmp_path / "ledger.json").read_text() == '{"version": 2, "claims": {}}'
    assert list(LedgerStore(tmp_path)._load_file(store.bak_path).claims) == ["12"], ".bak untouched"


@pytest.mark.parametrize("bak", ["missing", "garbage"])
def test_no_readable_generation_is_read_only(tmp_path, caplog, bak):
    sim = load_sim("lab")
    before = sim.state()
    eng = make_engine(sim, tmp_path / "state")
    state = eng.store.dir
    state.mkdir()
    (state / "ledger.json").write_text('{"version": 1, "claims": {"15": ')
    if bak == "garbage":
        (state / "ledger.json.bak").write_text("not json")
    with caplog.at_level(logging.WARNING):
        health = eng.store.recover()
    assert health.generation is None and eng.store.read_only is not None
    [rec] = _records(caplog, "ledger_read_only")
    assert rec.levelno == logging.ERROR
    with pytest.raises(LedgerReadOnly) as e:
        eng.prepare([PAIR], VM1)
    assert "read-only and refuses new claims" in e.value.message and "not valid JSON" in e.value.message
    assert "repair" in e.value.hint and "systemctl restart hostdevd" in e.value.hint
    with pytest.raises(LedgerReadOnly):
        eng.apply_reservations()                 # every write of the ledger asks the store first
    assert eng.release(VM1)[1].ok, "releasing nothing is fine"
    assert eng.ledger().claims == {}
    assert sim.write_log == [] and sim.state() == before
    assert (state / "ledger.json").read_text() == '{"version": 1, "claims": {"15": ', "left in place"
    assert not [n for n in _names(state) if "damaged" in n or n.endswith(".tmp")]


@pytest.fixture
def base():
    path = short_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_daemon_falls_back_at_start_and_goes_read_only_without_a_generation(base):
    _two_generations(base / "good")
    _damage(base / "good" / "ledger.json", "garbage")
    with running_daemon("lab", state_dir=base / "good") as (d, sim, path):
        st = call(path, {"op": "status"})
        assert st["ledger"]["generation"] == "ledger.json.bak" and st["ledger"]["read_only"] is None
        assert st["ledger"]["kept"][0].startswith("ledger.json.damaged-")
        # (its half-prepared claim 12 is then rolled back by the start's reconciliation, as any)
        assert d.engine.store.health is not None and list(d.engine.store.health.ledger.claims) == ["12"]
    (base / "bad").mkdir()
    (base / "bad" / "ledger.json").write_text("{")
    with running_daemon("lab", state_dir=base / "bad") as (d, sim, path):
        assert d.status_line().startswith("read-only")
        st = call(path, {"op": "status"})
        assert st["ok"] and st["claims"] == [] and "cannot be used" in st["ledger"]["read_only"]
        reply = call(path, {"op": "prepare", "domain": {"name": "vm1"}, "addresses": [NIC1]})
        assert not reply["ok"] and reply["error"]["code"] == "LEDGER_READ_ONLY"
        assert call(path, {"op": "release", "domain": {"name": "vm1"}})["ok"]
        assert call(path, {"op": "ping"})["ok"] and sim.write_log == []


def test_systemd_gets_ready_with_a_read_only_status(base):
    (base / "state").mkdir(mode=0o700)
    (base / "state" / "ledger.json").write_text("{")
    notify = Notify(base / "notify")
    with daemon_process(base, notify) as proc:
        ready = notify.wait_for("READY=1")
        assert "STATUS=read-only" in ready
        reply = call(str(base / "run" / "hostdevd.sock"),
                     {"op": "prepare", "domain": {"name": "vm1"}, "addresses": [NIC1]})
        assert reply["error"]["code"] == "LEDGER_READ_ONLY"
        proc.terminate()
        assert proc.wait(15) == 0
    assert (base / "state" / "ledger.json").read_text() == "{"


# --------------------------------------------------------------------------- 3. StrictModes


@pytest.fixture
def files(tmp_path):
    etc, state = tmp_path / "etc", tmp_path / "state"
    etc.mkdir(mode=0o755)
    state.mkdir(mode=0o700)
    (etc / "hostdevd.toml").write_text("")
    os.chmod(etc / "hostdevd.toml", 0o644)
    (state / "ledger.json").write_text("{}")
    os.chmod(state / "ledger.json", 0o600)
    return etc / "hostdevd.toml", state


def test_strict_modes_accept_what_the_installer_makes(files):
    cfg, state = files
    check_files(cfg, state)
    check_files(cfg.parent / "absent.toml", state / "absent")     # missing paths are not checked


@pytest.mark.parametrize("which,mode,needle", [
    ("config", 0o664, "group-writable (mode 0664"),
    ("config", 0o646, "world-writable (mode 0646"),
    ("etc", 0o777, "group- and world-writable (mode 0777"),
    ("state", 0o770, "group-writable (mode 0770"),
    ("ledger", 0o666, "group- and world-writable (mode 0666"),
])
def test_strict_modes_refuse_writable_by_others(files, which, mode, needle):
    cfg, state = files
    path = {"config": cfg, "etc": cfg.parent, "state": state, "ledger": state / "ledger.json"}[which]
    os.chmod(path, mode)
    with pytest.raises(InsecureFile) as e:
        check_files(cfg, state)
    assert str(e.value).count("\n") == 0
    assert e.value.message.startswith(f"refusing to start: {path} is ") and needle in e.value.message
    assert e.value.hint.endswith(f"fix: `chmod go-w {path}`")


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_strict_modes_owner(files):
    cfg, state = files
    os.chown(state / "ledger.json", 4321, -1)
    err = problem(state / "ledger.json", euid=0)
    assert err is not None and "owned by 4321, not root" in err.message
    assert err.hint.endswith(f"fix: `chown root {state / 'ledger.json'}`")
    # not root: the current user's (or root's) files are fine, another user's are not
    assert problem(cfg, euid=4321) is None and problem(state / "ledger.json", euid=4321) is None
    err = problem(state / "ledger.json", euid=1234)
    assert err is not None and "not root or 1234" in err.message and "chown 1234" in err.hint
    os.chmod(state / "ledger.json", 0o620)
    err = problem(state / "ledger.json", euid=0)
    assert err is not None and f"`chown root {state / 'ledger.json'} && chmod go-w {state / 'ledger.json'}`" \
        in err.hint


def test_daemon_refuses_to_start_with_a_group_writable_config(files):
    cfg, state = files
    os.chmod(cfg, 0o664)
    proc = subprocess.run([sys.executable, "-m", "hostdevd.doors.daemon_main", "--config", str(cfg), "run",
                           "--no-libvirt", "--no-udev", "--state-dir", str(state)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert f"{cfg} is group-writable (mode 0664" in proc.stderr and f"chmod go-w {cfg}" in proc.stderr
    assert json.loads((state / "ledger.json").read_text()) == {}
