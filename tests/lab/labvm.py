"""Python harness for the hostdevd nested-VM lab.

The lab is an "L1" Debian bookworm guest under QEMU TCG: a q35 machine with an
emulated Intel IOMMU and a fixed PCIe test topology (see README.md and
run-l1.sh), real vfio-pci and a real libvirtd. Control goes only through the
QEMU guest agent (qga.py); the guest has no network.

    vm = LabVM()
    ensure_image()                 # build-image.sh (cached in HOSTDEVD_LAB_DIR)
    vm.boot(share_dir=REPO_ROOT)   # checkout at /mnt/src (9p)
    vm.install_hostdevd()          # wheels built on the host -> venv /opt/hostdevd
    r = vm.run("cat /proc/cmdline", timeout=10)
    print(r.rc, r.stdout, r.stderr)
    vm.stop()

Only the Python standard library is used, so the harness also works outside
pytest (``python3 tests/lab/labvm.py`` boots, installs, prints the topology).
"""
from __future__ import annotations

import atexit
import fcntl
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

LAB_SRC = Path(__file__).resolve().parent          # tests/lab
REPO_ROOT = LAB_SRC.parents[1]                     # the checkout
sys.path.insert(0, str(LAB_SRC))
import qga  # noqa: E402  (tests/lab/qga.py)

DEFAULT_LAB_DIR = "/var/tmp/hostdevd-lab"
GUEST_VENV = "/opt/hostdevd"
GUEST_WHEELS = "/root/wheels"

# Third-party wheels installed into the guest venv (their dependencies come along).
# Must match what the project needs at run time; CPython 3.11 manylinux x86_64 like
# the guest's bookworm python3.11. libvirt-python, systemd-python and lxml come
# from Debian packages through --system-site-packages.
DEP_REQUIREMENTS = ["pydantic>=2.5,<3", "pyudev>=0.24", "pyroute2>=0.7", "prometheus_client>=0.16"]
DEP_NAMES = ["pydantic", "pydantic_core", "annotated_types", "typing_extensions",
             "typing_inspection", "pyudev", "pyroute2", "prometheus_client"]


# The Debian release of L1: bookworm (hostdevd from wheels into a venv) or trixie (hostdevd
# installed from its .deb with apt, as an operator would; a separate HOSTDEVD_LAB_DIR).
SUITE = os.environ.get("HOSTDEVD_LAB_SUITE", "bookworm")
# Debian 13 packages the image carries for hostdevd's .deb (L1 has no apt lists) and for its unit suite
SUITE_PKGS = {"trixie": "python3-pydantic,python3-pyudev,python3-pyroute2,python3-prometheus-client,"
                        "python3-pytest,python3-hypothesis"}
GUEST_DEBS = "/root/debs"


def lab_dir() -> Path:
    return Path(os.environ.get("HOSTDEVD_LAB_DIR", DEFAULT_LAB_DIR))


class LabError(RuntimeError):
    """The lab could not be built, booted, or driven."""


# What L1's kernel prints when the emulation under it broke (seen with a live nested L2 on TCG:
# timer interrupts that stop coming, starved vCPUs, a kernel stack overflow in the KVM vCPU
# thread and a panic): after this the guest agent dies and every command times out.
STALL_RE = re.compile(r"rcu: INFO: .*detected stalls|soft lockup - CPU#|rcu_.* kthread starved|"
                      r"timer wakeup didn't happen|blocked for more than \d+ seconds|"
                      r"Kernel panic - not syncing|stack guard page was hit|BUG: unable to handle|general protection")
KMSG_START = re.compile(r"^.*?(?=\[\s*\d+\.\d+\] )")


@dataclass
class Result:
    cmd: str | list
    rc: int
    stdout: str
    stderr: str
    seconds: float = 0.0

    timeout: float | None = None

    @property
    def ok(self) -> bool:
        return self.rc == 0

    @property
    def timed_out(self) -> bool:
        """True if the guest-side `timeout` killed the command (rc 124/137 at the limit)."""
        return (self.timeout is not None and self.rc in (124, 137)
                and self.seconds >= self.timeout - 0.5)

    def __str__(self) -> str:
        what = f" (TIMED OUT: killed after {self.timeout}s)" if self.timed_out else ""
        return (f"guest command {self.cmd!r}: rc={self.rc} after {self.seconds:.1f}s{what}\n"
                f"--- stdout\n{self.stdout}--- stderr\n{self.stderr}")


class GuestCommandError(LabError):
    def __init__(self, result: Result):
        super().__init__(str(result))
        self.result = result


def _log(msg: str) -> None:
    sys.stderr.write(f"[labvm] {msg}\n")
    sys.stderr.flush()


def _script_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["HOSTDEVD_LAB_DIR"] = str(lab_dir())
    env["SUITE"] = SUITE
    if SUITE in SUITE_PKGS:
        env["EXTRA_PKGS"] = SUITE_PKGS[SUITE]
    env.update(extra or {})
    return env


def image_ready() -> bool:
    img = lab_dir() / "img"
    return all((img / f).is_file() and (img / f).stat().st_size > 0
               for f in ("l1-base.raw", "vmlinuz", "initrd.img", "l2-initrd.img", ".complete"))


def ensure_image(force: bool = False, timeout: float = 1200) -> float:
    """Run build-image.sh (a no-op if the cached image is current). Returns seconds taken."""
    t0 = time.monotonic()
    env = _script_env({"FORCE": "1" if force else "0"})
    try:
        p = subprocess.run([str(LAB_SRC / "build-image.sh")], env=env, timeout=timeout,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except subprocess.TimeoutExpired as e:
        raise LabError("build-image.sh did not finish within {}s:\n{}".format(
            timeout, (e.output or "")[-4000:])) from None
    if p.returncode != 0 or not image_ready():
        raise LabError(f"build-image.sh failed (rc={p.returncode}):\n{p.stdout[-6000:]}")
    return time.monotonic() - t0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_stale_instances() -> list[str]:
    """Stop lab instances whose owning process is gone (e.g. a SIGKILLed pytest)."""
    reaped = []
    run = lab_dir() / "run"
    if not run.is_dir():
        return reaped
    for d in run.iterdir():
        owner = d / "owner"
        if not d.is_dir() or not owner.is_file():
            continue
        try:
            pid = int(owner.read_text().split()[0])
        except (ValueError, IndexError):
            continue
        if _pid_alive(pid):
            continue
        if not (d / "qemu.pid").is_file():
            # stopped long ago: drop its logs after a day
            if time.time() - d.stat().st_mtime > 86400:
                shutil.rmtree(d, ignore_errors=True)
            continue
        _log(f"stopping stale instance {d.name} (owner pid {pid} is gone)")
        subprocess.run([str(LAB_SRC / "stop-l1.sh"), "--force"], timeout=60,
                       env=_script_env({"L1_NAME": d.name}))
        reaped.append(d.name)
    return reaped


_instances = itertools.count(1)
BOOTED: weakref.WeakSet[LabVM] = weakref.WeakSet()   # every instance booted in this process


def _default_name() -> str:
    n = next(_instances)
    return f"hd{os.getpid():d}" if n == 1 else f"hd{os.getpid():d}-{n:d}"


@dataclass(eq=False)
class LabVM:
    """One L1 guest. name must be unique among running instances (default hd<pid>)."""
    name: str = field(default_factory=_default_name)
    mem: str = "3G"
    smp: int = 2
    boot_seconds: float | None = None
    _conn: qga.QGA | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _topology: dict | None = field(default=None, repr=False)
    running: bool = False
    install_info: dict | None = None
    _labfn_uploaded: bool = field(default=False, repr=False)
    stalled: list[str] = field(default_factory=list)   # kernel stall lines, once L1 stalled
    has_igb: bool = False        # booted with qemu-igb.sh's QEMU: an igb SR-IOV PF at 00:08.0

    # ------------------------------------------------------------------ paths
    @property
    def run_dir(self) -> Path:
        return lab_dir() / "run" / self.name

    @property
    def qga_sock(self) -> str:
        return str(self.run_dir / "qga.sock")

    @property
    def qmp_sock(self) -> str:
        return str(self.run_dir / "qmp.sock")

    @property
    def serial_log(self) -> Path:
        return self.run_dir / "serial.log"

    def _env(self) -> dict:
        return _script_env({"L1_NAME": self.name, "L1_MEM": self.mem, "L1_SMP": str(self.smp),
                            "L1_OWNER": str(os.getpid()),
                            "L1_REUSE_DISK": "1" if getattr(self, "_reuse_disk", False) else "0"})

    # ------------------------------------------------------------------ lifecycle
    def boot(self, share_dir: str | os.PathLike = REPO_ROOT, timeout: float = 300) -> float:
        """Boot L1 with share_dir at /mnt/src; returns seconds until the agent answered."""
        if shutil.which(os.environ.get("QEMU", "qemu-system-x86_64")) is None:
            raise LabError("qemu-system-x86_64 not found (apt-get install qemu-system-x86 qemu-utils)")
        if not image_ready():
            raise LabError(f"no lab image in {lab_dir()}; run tests/lab/build-image.sh")
        self._take_host_lock()
        self._share_dir = share_dir
        reap_stale_instances()
        env = self._env()
        env["L1_TIMEOUT"] = str(int(timeout))
        t0 = time.monotonic()
        self._topology, self._labfn_uploaded, self.install_info = None, False, None
        # Stop on any failure from here on, also if run-l1.sh itself times out.
        self.running = True
        atexit.register(self.stop)
        try:
            p = subprocess.run([str(LAB_SRC / "run-l1.sh"), str(share_dir)], env=env,
                               timeout=timeout + 60, capture_output=True,
                               text=True)
        except subprocess.TimeoutExpired:
            self.stop(force=True)
            raise LabError(f"run-l1.sh hung for {timeout + 60}s; serial log tail:\n{self._serial_tail()}") from None
        if p.returncode != 0:
            self.stop(force=True)
            # run-l1.sh's stderr already ends with the serial log tail
            raise LabError(f"run-l1.sh failed (rc={p.returncode}), logs in {self.run_dir}:\n"
                           f"{p.stdout}{p.stderr[-5000:]}")
        self.boot_seconds = time.monotonic() - t0
        self.stalled = []
        BOOTED.add(self)
        threading.Thread(target=self._watch_stalls, name="l1-stall-watch", daemon=True).start()
        _log(f"L1 '{self.name}' up after {self.boot_seconds:.1f}s (run dir {self.run_dir})")
        return self.boot_seconds

    def restart(self, power_cut: bool = False, timeout: float = 300) -> float:
        """Boot L1 again on the same disk: a clean reboot (``systemctl reboot``; QEMU runs with
        -no-reboot, so the reset ends it) or a power cut (QEMU killed, nothing flushed).
        Returns seconds until the agent answered in the new boot."""
        pid_file = self.run_dir / "qemu.pid"
        pid = int(pid_file.read_text().strip()) if pid_file.exists() else None
        if power_cut and pid is not None:
            os.kill(pid, signal.SIGKILL)
        else:
            # --force: libvirt-guests would otherwise wait minutes for a running L2 to shut down
            self.run("systemd-run --no-block systemctl reboot --force", timeout=60, check=False)
        deadline = time.monotonic() + 180
        while pid is not None and _pid_alive(pid):
            if time.monotonic() > deadline:
                raise LabError(f"L1 '{self.name}' did not go down within 180 s")
            time.sleep(1)
        self.running = False
        self._close()
        self._reuse_disk = True
        try:
            return self.boot(self._share_dir, timeout=timeout)
        finally:
            self._reuse_disk = False

    def _take_host_lock(self) -> None:
        """One L1 at a time on this host: two TCG guests on 2 cores starve each other's
        timers (RCU stalls, a hung guest agent). Waits for the other instance to stop."""
        if getattr(self, "_lock_fd", None) is not None:
            return
        lab_dir().mkdir(parents=True, exist_ok=True)
        fd = os.open(lab_dir() / ".instance.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log("another lab VM is running on this host; waiting for it to stop")
            fcntl.flock(fd, fcntl.LOCK_EX)
        self._lock_fd = fd

    def _release_host_lock(self) -> None:
        fd, self._lock_fd = getattr(self, "_lock_fd", None), None
        if fd is not None:
            os.close(fd)

    def stop(self, timeout: float = 60, force: bool = False) -> None:
        """Power L1 off (ACPI, then QMP quit, then SIGKILL; force=True skips the ACPI
        powerdown). Safe to call repeatedly."""
        if not self.running:
            self._release_host_lock()
            return
        self.running = False
        self._close()
        env = self._env()
        env["L1_STOP_TIMEOUT"] = str(int(timeout))
        try:
            subprocess.run([str(LAB_SRC / "stop-l1.sh")] + (["--force"] if force else []),
                           env=env, timeout=timeout + 30)
        except subprocess.TimeoutExpired:
            subprocess.run([str(LAB_SRC / "stop-l1.sh"), "--force"], env=env, timeout=60)
        try:
            atexit.unregister(self.stop)
        except Exception:
            pass
        self._release_host_lock()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def _watch_stalls(self, interval: float = 5.0) -> None:
        """Once L1's kernel reports a stall its agent is as good as dead: cut the agent
        connection so the command in flight fails now, not after its full timeout."""
        while self.running and not self.stalled:
            time.sleep(interval)
            st = self.stalls()
            if st and self.running:
                self.stalled = st
                _log(f"L1 '{self.name}' KERNEL STALLED: {st[0]}")
                conn = self._conn
                if conn is not None:
                    try:
                        conn.sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

    def stalls(self) -> list[str]:
        """Kernel stall lines in L1's serial log (empty while L1 is healthy)."""
        try:
            text = self.serial_log.read_text(errors="replace")
        except OSError:
            return []
        # from the kernel's "[  12.345]" on: the console line may start with a shell prompt
        return [KMSG_START.sub("", ln).strip() for ln in text.splitlines() if STALL_RE.search(ln)]

    def _stall_note(self) -> str:
        st = self.stalls()
        return f"\n*** L1 KERNEL STALLED (TCG stopped its timers): {st[0]}" if st else ""

    def _serial_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.serial_log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no serial log)"

    # ------------------------------------------------------------------ agent
    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _agent(self) -> qga.QGA:
        if not self.running:
            raise LabError(f"L1 '{self.name}' is not running")
        if self.stalled:
            raise LabError(f"L1 '{self.name}' is unusable: its kernel stalled ({self.stalled[0]})")
        if self._conn is None:
            self._conn = qga.QGA(self.qga_sock, timeout=30)
        return self._conn

    def _call(self, fn):
        """Run fn(agent) under the lock; drop the connection on any transport error
        (a fresh connection re-syncs and discards stale replies)."""
        with self._lock:
            try:
                return fn(self._agent())
            except BaseException:
                self._close()
                raise

    def run(self, cmd: str | list, timeout: float = 120, check: bool = True,
            input: str | bytes | None = None, env: dict | None = None) -> Result:
        """Run cmd in L1 as root. A string runs under ``bash -c`` (with pipefail), a list
        is exec'd as argv. The guest kills it after `timeout` seconds (rc 124).
        check=True raises GuestCommandError on a non-zero exit code."""
        if isinstance(cmd, str):
            argv = ["/bin/bash", "-o", "pipefail", "-c", cmd]
        else:
            argv = [str(a) for a in cmd]
        t0 = time.monotonic()
        try:
            rc, out, err = self._call(lambda g: g.exec_argv(argv, timeout, input, env))
        except qga.GuestTimeout as e:
            raise LabError(f"guest command timed out after {timeout}s: {cmd!r} ({e}){self._stall_note()}") from None
        except (OSError, qga.AgentError) as e:
            raise LabError(f"guest agent failure running {cmd!r}: {e}{self._stall_note()}; "
                           f"serial log tail:\n{self._serial_tail(15)}") from None
        res = Result(cmd, rc, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"),
                     time.monotonic() - t0, timeout)
        if check and rc != 0:
            if "domain is not running" in res.stderr:
                res.stderr += self._stopped_domains_note()
            raise GuestCommandError(res)
        return res

    def _stopped_domains_note(self) -> str:
        """Why an L2 stopped on its own: its state reason and the tails of its logs."""
        r = self.run("for d in $(virsh list --all --name); do echo \"== $d: $(virsh domstate --reason $d)\"; "
                     "tail -n 8 /var/log/libvirt/qemu/$d.log /var/log/libvirt/qemu/$d-serial.log 2>/dev/null; "
                     "done", timeout=60, check=False)
        return "\n--- L2 domains (lab diagnostics)\n" + r.stdout[-4000:]

    def put(self, local: str | os.PathLike | bytes, remote: str, mode: str | None = None) -> None:
        """Copy a host file (path) or bytes to remote in L1; optional chmod mode like '755'."""
        data = local if isinstance(local, bytes) else Path(local).read_bytes()
        self._call(lambda g: g.write(remote, data))
        if mode:
            self.run(["chmod", mode, remote], timeout=30)

    def get(self, remote: str, local: str | os.PathLike | None = None) -> bytes:
        """Read a file from L1; also writes it to local if given."""
        data = self._call(lambda g: g.read(remote))
        if local is not None:
            Path(local).write_bytes(data)
        return data

    def write_text(self, remote: str, text: str) -> None:
        self.put(text.encode(), remote)

    def read_text(self, remote: str) -> str:
        return self.get(remote).decode("utf-8", "replace")

    def qmp(self, execute: str, arguments: dict | None = None) -> dict:
        return qga.qmp(self.qmp_sock, execute, arguments)

    def wait_system_running(self, timeout: float = 180) -> str:
        """Wait for systemd to finish booting; returns the final state (running/degraded)."""
        r = self.run("systemctl is-system-running --wait", timeout=timeout, check=False)
        return r.stdout.strip()

    def labsh(self, snippet: str, timeout: float = 300, check: bool = True) -> Result:
        """Run a bash snippet in L1 with guest/labfn.sh sourced (uploaded on first use)."""
        if not self._labfn_uploaded:
            self.put(LAB_SRC / "guest" / "labfn.sh", "/root/labfn.sh")
            self._labfn_uploaded = True
        return self.run(". /root/labfn.sh\n" + snippet, timeout=timeout, check=check)

    # ------------------------------------------------------------------ PCI helpers
    def topology(self, refresh: bool = False) -> dict[str, str]:
        """Lab device names -> BDF, resolved in L1 from sysfs by parent port (see README).

        Names: rp1..rp6 (root ports), nic1, nvme1, nvme_pf (alias nvme2), nic2a, nic2b,
        pcibr, nic3a, nic3b, swup, swdn1, swdn2, nic4a, nic4b. Missing devices raise.
        """
        if self._topology is None or refresh:
            r = self.run(["python3", "-c", _TOPOLOGY_PY], timeout=60)
            topo = json.loads(r.stdout)
            missing = sorted(k for k, v in topo.items() if not v)
            if missing:
                raise LabError(f"lab topology incomplete, missing {missing}: {topo}")
            self._topology = topo
        return dict(self._topology)

    def pci_info(self, bdf: str) -> dict:
        """driver (None if unbound), iommu_group (int), group_members (sorted BDFs),
        vendor, device, driver_override (None if unset) of one PCI function."""
        r = self.run(["python3", "-c", _PCI_INFO_PY, bdf], timeout=60)
        return json.loads(r.stdout)

    def driver(self, bdf: str) -> str | None:
        r = self.run(f'd=/sys/bus/pci/devices/{bdf}/driver; [ -e "$d" ] && basename "$(readlink "$d")" || true',
                     timeout=30)
        return r.stdout.strip() or None

    # ------------------------------------------------------------------ hostdevd
    def install_hostdevd(self, src: str | os.PathLike = REPO_ROOT, extras: str = "daemon",
                         timeout: float = 600) -> dict:
        """Build wheels on the host, upload them, install into the venv /opt/hostdevd
        (--system-site-packages, --no-index). Returns timing/info dict."""
        t0 = time.monotonic()
        wheels = build_wheels(src)
        t_build = time.monotonic() - t0
        self.run(["rm", "-rf", GUEST_WHEELS], timeout=30)
        self.run(["mkdir", "-p", GUEST_WHEELS], timeout=30)
        for w in wheels:
            self.put(w, f"{GUEST_WHEELS}/{w.name}")
        t_upload = time.monotonic() - t0 - t_build
        target = f"hostdevd[{extras}]" if extras else "hostdevd"
        # Debian's own pip (python3-pip) is used through --system-site-packages;
        # a venv without its own pip saves ~30 s of ensurepip under TCG.
        script = f"""
set -e
rm -rf {GUEST_VENV}
python3 -m venv --without-pip --system-site-packages {GUEST_VENV}
{GUEST_VENV}/bin/python -m pip install --no-index --find-links {GUEST_WHEELS} --no-cache-dir \\
    --disable-pip-version-check --no-warn-script-location '{target}'
{GUEST_VENV}/bin/python -c 'import hostdevd, pydantic, pyudev, pyroute2, libvirt, lxml, systemd.journal'
{GUEST_VENV}/bin/python -c 'import prometheus_client'
"""
        r = self.run(script, timeout=timeout, check=False)
        if r.rc != 0:
            raise LabError(f"installing hostdevd in L1 failed:\n{r}")
        info = {
            "wheels": [w.name for w in wheels],
            "build_s": round(t_build, 1),
            "upload_s": round(t_upload, 1),
            "install_s": round(r.seconds, 1),
            "hostdevctl": self.run(["test", "-x", GUEST_VENV + "/bin/hostdevctl"], timeout=10,
                                   check=False).ok,
        }
        _log(f"hostdevd installed in L1 {GUEST_VENV}: {info}")
        self.install_info = info
        return info


    def install_deb(self, debs: list[Path], timeout: float = 600) -> dict:
        """Upload .deb files and install them with apt (no network in L1: every dependency is
        already in the image). Returns timing/info."""
        t0 = time.monotonic()
        self.run(f"rm -rf {GUEST_DEBS} && mkdir -p {GUEST_DEBS}", timeout=30)
        for d in debs:
            self.put(d, f"{GUEST_DEBS}/{d.name}")
        names = " ".join(f"{GUEST_DEBS}/{d.name}" for d in debs)
        r = self.run(f"DEBIAN_FRONTEND=noninteractive apt-get install -y {names}",
                     timeout=timeout, check=False)
        if r.rc != 0:
            raise LabError(f"apt-get install of {[d.name for d in debs]} in L1 failed:\n{r}")
        info = {"debs": [d.name for d in debs], "install_s": round(time.monotonic() - t0, 1),
                "apt": r.stdout[-1500:]}
        _log(f"installed in L1 with apt: {info['debs']} ({info['install_s']} s)")
        self.install_info = info
        return info


def igb_qemu(timeout: float = 900) -> str:
    """The path of a QEMU wrapper that adds an igb SR-IOV PF (tests/lab/qemu-igb.sh: QEMU >= 8
    from bookworm-backports, unpacked under $LAB_DIR/qemu10; a second call only checks)."""
    try:
        p = subprocess.run([str(Path(__file__).resolve().parent / "qemu-igb.sh")], check=True,
                           capture_output=True, text=True, timeout=timeout, env=_script_env())
    except subprocess.CalledProcessError as e:
        raise LabError("cannot get a QEMU with igb (tests/lab/qemu-igb.sh):\n" + e.stderr[-3000:]) from e
    return p.stdout.strip()


def build_deb(src: str | os.PathLike = REPO_ROOT, timeout: float = 1200) -> list[Path]:
    """packaging/build-deb.sh on the host; returns the .deb it left in dist/."""
    p = subprocess.run([str(Path(src) / "packaging" / "build-deb.sh")], cwd=src, timeout=timeout,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if p.returncode != 0:
        raise LabError(f"packaging/build-deb.sh failed (rc={p.returncode}):\n{p.stdout[-4000:]}")
    debs = sorted((Path(src) / "dist").glob("hostdevd_*_all.deb"), key=lambda f: f.stat().st_mtime)
    if not debs:
        raise LabError(f"packaging/build-deb.sh left no hostdevd_*_all.deb in {src}/dist")
    return debs[-1:]


# Runs inside L1 (python3 -c). Root ports are fixed at 00:02.0..00:07.0 by
# run-l1.sh (addr=0x2..0x7); everything below them is found by walking sysfs.
_TOPOLOGY_PY = r"""
import json, os
S = "/sys/bus/pci/devices"
def children(bdf):
    if not bdf:
        return []
    p = os.path.realpath(os.path.join(S, bdf))
    return sorted(e for e in os.listdir(p)
                  if e.startswith("0000:") and os.path.exists(os.path.join(p, e, "vendor")))
def nth(lst, i):
    return lst[i] if len(lst) > i else None
t = {"rp%d" % i: "0000:00:%02x.0" % (i + 1) for i in range(1, 7)}
for k, v in list(t.items()):
    if not os.path.exists(os.path.join(S, v)):
        t[k] = None
t["nic1"] = nth(children(t["rp1"]), 0)
t["nvme1"] = nth(children(t["rp2"]), 0)
pf = [c for c in children(t["rp3"]) if not os.path.exists(os.path.join(S, c, "physfn"))]
t["nvme_pf"] = t["nvme2"] = nth(pf, 0)
c = children(t["rp4"]); t["nic2a"], t["nic2b"] = nth(c, 0), nth(c, 1)
t["pcibr"] = nth(children(t["rp5"]), 0)
c = children(t["pcibr"]); t["nic3a"], t["nic3b"] = nth(c, 0), nth(c, 1)
t["swup"] = nth(children(t["rp6"]), 0)
c = children(t["swup"]); t["swdn1"], t["swdn2"] = nth(c, 0), nth(c, 1)
t["nic4a"] = nth(children(t["swdn1"]), 0)
t["nic4b"] = nth(children(t["swdn2"]), 0)
print(json.dumps(t))
"""

_PCI_INFO_PY = r"""
import json, os, sys
b = sys.argv[1]
d = "/sys/bus/pci/devices/" + b
def rd(n):
    try:
        v = open(os.path.join(d, n)).read().strip()
    except OSError:
        return None
    return v if v not in ("", "(null)") else None
g = os.path.join(d, "iommu_group")
grp = int(os.path.basename(os.readlink(g))) if os.path.exists(g) else None
mem = sorted(os.listdir("/sys/kernel/iommu_groups/%d/devices" % grp)) if grp is not None else []
drv = os.path.join(d, "driver")
print(json.dumps({
    "bdf": b,
    "driver": os.path.basename(os.readlink(drv)) if os.path.exists(drv) else None,
    "iommu_group": grp, "group_members": mem,
    "vendor": rd("vendor"), "device": rd("device"), "driver_override": rd("driver_override"),
}))
"""


# ---------------------------------------------------------------------- wheels
_TOP_IGNORE = {".git", "tests", "bench", ".lab", ".venv", "build", "dist", ".pytest_cache",
               ".hypothesis", ".ci"}


def _src_ignore(root: str):
    def ignore(d: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n == "__pycache__" or n.endswith((".pyc", ".egg-info"))}
        if os.path.abspath(d) == root:
            skip |= _TOP_IGNORE & set(names)
        return skip
    return ignore


def _pip(*args: str, timeout: float = 600) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if p.returncode != 0:
        raise LabError("{} failed (rc={}):\n{}".format(" ".join(cmd), p.returncode, p.stdout[-4000:]))


def dep_wheels(refresh: bool = False) -> list[Path]:
    """The third-party wheels for the guest, cached in $HOSTDEVD_LAB_DIR/wheels
    (downloaded once from the package index for cp311 manylinux x86_64)."""
    d = lab_dir() / "wheels"
    have = lambda: sorted(d.glob("*.whl")) if d.is_dir() else []  # noqa: E731
    names = {w.name.split("-")[0].lower() for w in have()}
    if refresh or not all(n in names for n in DEP_NAMES):
        tmp = Path(tempfile.mkdtemp(prefix="wheels.", dir=str(lab_dir())))
        try:
            _pip("download", "--dest", str(tmp), "--only-binary=:all:",
                 "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
                 "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                 "--implementation", "cp", "--abi", "cp311", "--abi", "abi3", "--abi", "none",
                 *DEP_REQUIREMENTS)
            shutil.rmtree(d, ignore_errors=True)
            tmp.rename(d)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return have()


def build_wheels(src: str | os.PathLike = REPO_ROOT) -> list[Path]:
    """Dependency wheels (cached) plus a fresh hostdevd wheel built from a copy of
    src (so the build leaves nothing behind in the checkout)."""
    deps = dep_wheels()
    out = lab_dir() / "wheels-hostdevd"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="src.", dir=str(lab_dir())) as tmp:
        copy = Path(tmp) / "hostdevd"
        shutil.copytree(src, copy, ignore=_src_ignore(os.path.abspath(src)))
        _pip("wheel", "--no-deps", "--wheel-dir", str(out), str(copy))
    own = sorted(out.glob("hostdevd-*.whl"))
    if not own:
        raise LabError(f"pip wheel produced no hostdevd wheel in {out}")
    return deps + own


def _main() -> int:
    """Manual use: boot L1, install hostdevd, print the topology, then wait for Enter."""
    print(f"image build: {ensure_image():.1f}s")
    with LabVM() as vm:
        print(f"boot: {vm.boot(REPO_ROOT):.1f}s")
        print(vm.install_hostdevd())
        print(json.dumps(vm.topology(), indent=1))
        if sys.stdin.isatty():
            print(f"L1 running: QGA socket {vm.qga_sock}. Press Enter to stop.")
            input()
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
    sys.exit(_main())
