"""``hostdevd``: run the daemon in the foreground, or install its system files.

    hostdevd [--config FILE] [run] [--log-level LEVEL] [--no-libvirt] [--no-udev]
    hostdevd [--config FILE] install [--prefix /] [--no-reload]

``run`` is what systemd starts (Type=notify): it never forks, says READY=1
once the socket is listening, pings the watchdog (WATCHDOG=1) from the main
loop while the socket server and the event worker are alive, and keeps
STATUS= current. SIGTERM (also at host shutdown) stops serving and closes the
ledger; nothing is rebound. Exit status: 0 clean stop, 1 could not start or
became unhealthy, 2 usage or configuration error (also a config file, state dir
or ledger that others than root could change: core/strictmodes.py).

A damaged ledger with a readable previous generation is no reason not to start
(the daemon goes on from ledger.json.bak). With no readable generation it starts
*read-only*: READY=1 all the same (the socket serves status, and a failed start
would only make systemd restart it into the same state), with STATUS= beginning
"read-only" and every change refused until an operator repairs the ledger.
"""
from __future__ import annotations

import argparse
import collections
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from .. import __version__
from ..core.config import DEFAULT_PATH, Config, load_config
from ..core.errors import HostdevError
from ..core.strictmodes import check_files
from ..core.sysfs import Sysfs
from . import faultknob
from .wire import socket_path
from .wiring import host_engine

log = logging.getLogger("hostdevd.main")

DEFAULT_STATUS_INTERVAL = 10.0
STATUS_POLL = 1.0
HOOK_PATH = "etc/libvirt/hooks/qemu.d/hostdevd"
UNIT_PATH = "etc/systemd/system/hostdevd.service"
TMPFILES_PATH = "etc/tmpfiles.d/hostdevd.conf"
CATALOG_PATH = "usr/lib/systemd/catalog/hostdevd.catalog"
CONFIG_PATH = DEFAULT_PATH.lstrip("/")


# --------------------------------------------------------------------------- sd_notify


def notify(state: str) -> bool:
    """sd_notify(3): a no-op (False) without $NOTIFY_SOCKET."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return False
    try:
        import systemd.daemon as sd_daemon
        return bool(sd_daemon.notify(state))
    except ImportError:
        pass
    addr = os.environ["NOTIFY_SOCKET"]
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(state.encode(), addr)
        return True
    except OSError:
        return False


def watchdog_interval() -> float | None:
    """Half of WatchdogSec when the watchdog is armed for this process, else None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(0.1, int(usec) / 2e6)
    except ValueError:
        return None


# --------------------------------------------------------------------------- run


def build_daemon(config: Config, args: argparse.Namespace):
    from .service import Daemon

    if getattr(args, "sim", None):
        from ..sim.simkernel import SimKernel  # simulated kernel: demos and tests only
        sim = SimKernel.from_file(args.sim)
        # the sim records every write for tests to inspect; a long-running demo keeps the last few
        sim.write_log = collections.deque(sim.write_log, maxlen=10_000)  # type: ignore[assignment]
        engine = host_engine(config, Sysfs(sim, config.write_timeout), modprobe=sim.load_module)
    else:
        engine = host_engine(config)
    on_step = faultknob.from_environment()
    if on_step is not None:
        engine.executor.on_step = on_step  # the lab's fault scenarios (doors/faultknob.py)
    adapter = None
    if not args.no_libvirt:
        try:
            from ..adapters.libvirt_events import LibvirtEvents
        except ImportError as e:
            log.warning("libvirt-python is not installed (%s): running without libvirt events", e)
        else:
            adapter = LibvirtEvents(config.libvirt_uri)
    udev = None
    if not getattr(args, "no_udev", False) and not getattr(args, "sim", None):
        # A simulated kernel has no uevents; the real one is watched (R10).
        from ..adapters.udev import UdevWatch
        udev = UdevWatch()
    return Daemon(config, engine, adapter, udev=udev)


def run(config: Config, args: argparse.Namespace) -> int:
    try:
        daemon = build_daemon(config, args)
    except HostdevError as e:
        log.error("cannot start: %s", e)
        return 1
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("received %s: stopping (devices stay as they are)", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, lambda *_: log.info("SIGHUP ignored: restart hostdevd to apply a new config"))
    try:
        daemon.start()
    except HostdevError as e:
        log.error("cannot start: %s", e)
        notify(f"STATUS=cannot start: {e}")
        return 1
    status = daemon.status_line()
    notify(f"READY=1\nSTATUS={status}")
    wd = watchdog_interval()
    interval = wd or DEFAULT_STATUS_INTERVAL
    rc = 0
    next_check = time.monotonic() + interval
    # STATUS= follows the daemon within STATUS_POLL (`systemctl status` shows claims as they
    # change); health and the watchdog ping keep their own interval.
    while not stop.wait(min(STATUS_POLL, interval)):
        line = daemon.status_line()
        if line != status:
            status = line
            notify(f"STATUS={status}")
        if time.monotonic() < next_check:
            continue
        next_check = time.monotonic() + interval
        if not daemon.healthy():
            log.error("a daemon thread died; %s", "no more watchdog pings: systemd restarts hostdevd" if wd
                      else "exiting so that systemd restarts hostdevd")
            notify("STATUS=unhealthy: a daemon thread died")
            if not wd:
                rc = 1
                break
            stop.wait()
            break
        if wd:
            notify("WATCHDOG=1")
    notify("STOPPING=1\nSTATUS=stopping")
    daemon.stop()
    return rc


# --------------------------------------------------------------------------- install


def data_dir() -> Path:
    """Where the unit, tmpfiles, catalog and example config ship."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[3] / "systemd", Path(sys.prefix) / "share" / "hostdevd" / "systemd"):
        if (candidate / "hostdevd.service").is_file():
            return candidate
    raise HostdevError("cannot find hostdevd's systemd files (hostdevd.service, ...)",
                       "run `hostdevd install` from a source checkout")


def exec_start(config_path: str | None) -> str:
    script = Path(sys.executable).parent / "hostdevd"
    cmd = f"{script} run" if os.access(script, os.X_OK) else f"{sys.executable} -m hostdevd.doors.daemon_main run"
    if config_path:
        cmd = cmd.replace(" run", f" --config {os.path.abspath(config_path)} run", 1)
    return cmd


def hook_script(sock: str) -> str:
    """The launcher libvirt runs. ``-IS``: no environment, no user site, no site-packages
    scan (saves ~20 ms per hook); the package's directory is named instead."""
    pkg_parent = str(Path(__file__).resolve().parents[2])
    return (f"#!{sys.executable} -IS\n"
            "# libvirt qemu hook for hostdevd, written by `hostdevd install`.\n"
            "# libvirt runs it as: <domain> <op> <subop> <extra>, domain XML on stdin.\n"
            "# It only forwards prepare/release to the daemon (see hostdevd/doors/hook.py).\n"
            "import sys\n"
            f"sys.path.insert(0, {pkg_parent!r})\n"
            "try:\n"
            "    from hostdevd.doors.hook import main\n"
            "except ImportError:  # moved since install: fall back to the normal search path\n"
            "    del sys.path[0]\n"
            "    import site\n"
            "    site.main()\n"
            "    try:\n"
            "        from hostdevd.doors.hook import main\n"
            "    except ImportError:\n"
            "        # hostdevd removed, its hook left behind (a conffile stays until purge): never\n"
            "        # refuse starts or fail libvirt's reconnect (that stops running domains) for it\n"
            "        print('hostdevd: hook left behind (hostdevd is not installed): not checked; '\n"
            "              'remove this file or reinstall hostdevd', file=sys.stderr)\n"
            "        sys.exit(0)\n"
            f"sys.exit(main(socket_path={sock!r}))\n")


def _write(path: Path, text: str, mode: int, out) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    print(f"installed {path}", file=out)


def install(prefix: str, config: Config, config_path: str | None, reload: bool, out=sys.stdout) -> int:
    src = data_dir()
    root = Path(prefix)
    unit = (src / "hostdevd.service").read_text(encoding="utf-8")
    unit = "\n".join(f"ExecStart={exec_start(config_path)}" if line.startswith("ExecStart=") else line
                     for line in unit.splitlines()) + "\n"
    _write(root / UNIT_PATH, unit, 0o644, out)
    _write(root / TMPFILES_PATH, (src / "hostdevd.tmpfiles").read_text(encoding="utf-8"), 0o644, out)
    _write(root / CATALOG_PATH, (src / "hostdevd.catalog").read_text(encoding="utf-8"), 0o644, out)
    _write(root / HOOK_PATH, hook_script(socket_path(config.runtime_dir)), 0o755, out)
    cfg = root / CONFIG_PATH
    if cfg.exists():
        print(f"kept existing {cfg}", file=out)
    else:
        _write(cfg, (src / "hostdevd.toml.example").read_text(encoding="utf-8"), 0o644, out)
    if reload and root.resolve() == Path("/"):
        for cmd in (["systemctl", "daemon-reload"], ["journalctl", "--update-catalog"],
                    ["systemd-tmpfiles", "--create", "hostdevd.conf"]):
            if shutil.which(cmd[0]) is None:
                print(f"skipped `{' '.join(cmd)}`: {cmd[0]} not found", file=out)
                continue
            proc = subprocess.run(cmd, capture_output=True, text=True)
            status = "done" if proc.returncode == 0 else f"failed: {proc.stderr.strip() or proc.returncode}"
            print(f"`{' '.join(cmd)}` {status}", file=out)
    print("next: `systemctl enable --now hostdevd`, then restart libvirtd (virtqemud) so it runs the new hook "
          "(libvirt finds hook scripts only when it starts)", file=out)
    return 0


# --------------------------------------------------------------------------- main


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hostdevd", description="hostdevd daemon: safe PCI passthrough for libvirt/KVM")
    p.add_argument("--version", action="version", version=f"hostdevd {__version__}")
    p.add_argument("--config", help=f"configuration file (default {DEFAULT_PATH})")
    sub = p.add_subparsers(dest="command")
    r = sub.add_parser("run", help="run the daemon in the foreground (what systemd starts; the default)")
    i = sub.add_parser("install", help="install the systemd unit, tmpfiles, catalog, libvirt hook and config")
    i.add_argument("--prefix", default="/", help="install under this root (default /)")
    i.add_argument("--no-reload", action="store_true", help="do not run systemctl daemon-reload and friends")
    for sp in (p, r):
        sp.add_argument("--log-level", default=argparse.SUPPRESS, type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="default INFO")
        sp.add_argument("--no-libvirt", action="store_true", default=argparse.SUPPRESS,
                        help="do not connect to libvirt (socket and hook only)")
        sp.add_argument("--no-udev", action="store_true", default=argparse.SUPPRESS,
                        help="do not watch udev for PCI bind/unbind/add/remove")
        sp.add_argument("--sim", default=argparse.SUPPRESS, metavar="SPEC",
                        help="use a simulated kernel from a topology spec (demos and tests)")
        sp.add_argument("--state-dir", default=argparse.SUPPRESS, help="override state_dir")
        sp.add_argument("--runtime-dir", default=argparse.SUPPRESS, help="override runtime_dir")
    return p


def main(argv: list[str] | None = None) -> int:
    from ..adapters.journal import setup_logging

    args = parser().parse_args(argv)
    for name, default in (("log_level", "INFO"), ("no_libvirt", False), ("no_udev", False), ("sim", None),
                          ("state_dir", None),
                          ("runtime_dir", None)):
        if not hasattr(args, name):
            setattr(args, name, default)
    setup_logging(args.log_level)
    try:
        config = load_config(args.config)
        if args.state_dir:
            config.state_dir = args.state_dir
        if args.runtime_dir:
            config.runtime_dir = args.runtime_dir
    except HostdevError as e:
        print(f"hostdevd: {e}", file=sys.stderr)
        return 2
    if args.command != "install":
        try:
            # StrictModes: a config or ledger others could change decides what hostdevd binds.
            check_files(args.config or DEFAULT_PATH, config.state_dir)
        except HostdevError as e:
            print(f"hostdevd: {e}", file=sys.stderr)
            return 2
    if args.command == "install":
        try:
            return install(args.prefix, config, args.config, not args.no_reload)
        except (HostdevError, OSError) as e:
            print(f"hostdevd install: {e}", file=sys.stderr)
            return 1
    return run(config, args)


if __name__ == "__main__":
    sys.exit(main())
