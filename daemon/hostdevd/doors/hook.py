"""libvirt's qemu hook (``/etc/libvirt/hooks/qemu.d/hostdevd``): thin, stdlib only, fast.

libvirt runs it synchronously, under its own locks, for every domain event:
``hostdevd <domain> <op> <subop> <extra>`` with the domain XML on stdin (R9).
It never calls libvirt; it forwards the XML to the daemon and turns the
reply into an exit status and one line on stderr (libvirt shows that line
when a start is refused).

* ``prepare begin``: nothing to do unless the XML mentions a PCI hostdev
  (``<hostdev``, ``type='hostdev'``) or a network interface
  (``<interface type='network'``), decided by substring, without parsing.
  Otherwise ask the daemon to prepare; exit 1 on refusal (the start aborts).
* ``start begin``: only for a domain whose XML now shows a VF interface (``<interface
  type='hostdev'``, ``<actual type='hostdev'``): libvirt picks a hostdev network's VF
  *after* ``prepare begin`` (qemuProcessPrepareHost, before qemuProcessLaunch runs this
  hook), so this is where that VF is first known. Same request with ``phase: start``;
  exit 1 on refusal (the start aborts). Groups prepared at ``prepare begin`` are no-ops.
* ``release end``: ask the daemon to release; never fail (exit 0, log to stderr).
* ``migrate`` / ``restore``: XML filters; print the XML unchanged, first. For
  ``migrate`` with a PCI hostdev in the XML, then ask the daemon (at most
  ``MIGRATE_TIMEOUT`` seconds, never an error) whether assigned devices block
  the live migration and which can be hot-unplugged first; the answer goes to
  stderr (libvirt logs it) and, from the daemon, to journald. The exit status
  is 0 whatever happens: this hook never stops a migration.
* everything else (``reconnect`` above all: failing it kills running QEMUs):
  exit 0 at once without blocking.

Imports: only the standard library and :mod:`hostdevd.wire`.
"""
from __future__ import annotations

import os
import sys

from .wire import DEFAULT_SOCKET, DaemonNotRunning, WireError, call

PREPARE_TIMEOUT = 60.0
RELEASE_TIMEOUT = 90.0
MIGRATE_TIMEOUT = 3.0
NOT_RUNNING = "hostdevd is not running: systemctl start hostdevd"
_HOSTDEV_MARKERS = ("<hostdev", "type='hostdev'", 'type="hostdev"')
_NETWORK_MARKERS = ("<interface type='network'", '<interface type="network"')
_VF_INTERFACE_MARKERS = ("<interface type='hostdev'", '<interface type="hostdev"', "<actual type='hostdev'",
                         '<actual type="hostdev"')


def mentions_hostdev(xml: str) -> bool:
    """True when the XML names a PCI hostdev for certain (a hostdev element or interface)."""
    return any(m in xml for m in _HOSTDEV_MARKERS)


def needs_daemon(xml: str) -> bool:
    """Cheap filter: could this domain need a PCI device prepared?

    ``<interface type='network'>`` counts because the network may be a VF pool
    (the chosen VF then shows up as ``<actual type='hostdev'>``).
    """
    return mentions_hostdev(xml) or any(m in xml for m in _NETWORK_MARKERS)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _error_line(domain: str, what: str, err: dict) -> str:
    msg = _one_line(err.get("message") or "unknown error")
    hint = err.get("hint")
    line = f"hostdevd: {what} {_one_line(domain)}: {msg}"
    if hint:
        line += f" ({_one_line(hint)})"
    return line


def _read_all(stream) -> str:
    data = stream.buffer.read() if hasattr(stream, "buffer") else stream.read()
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else data


def _drain_nonblocking(stream) -> None:
    """Take what libvirt already wrote to stdin without ever waiting for more."""
    try:
        fd = stream.fileno()
        os.set_blocking(fd, False)
        while os.read(fd, 65536):
            pass
    except (OSError, ValueError, AttributeError):
        pass


def prepare(domain: str, xml: str, sock: str, stderr, phase: str = "prepare") -> int:
    if not needs_daemon(xml):
        return 0
    if phase == "start" and not any(m in xml for m in _VF_INTERFACE_MARKERS):
        return 0
    request = {"op": "prepare", "origin": "hook", "domain": {"name": domain}, "xml": xml}
    if phase != "prepare":
        request["phase"] = phase
    try:
        reply = call(sock, request, PREPARE_TIMEOUT)
    except DaemonNotRunning:
        if not mentions_hostdev(xml):
            # Only a libvirt network interface: most are NAT/bridge networks. Fail
            # open rather than stop every VM on the host while hostdevd is down.
            print(f"hostdevd: warning: {NOT_RUNNING} ({_one_line(domain)} has a network interface; "
                  "not checked)", file=stderr)
            return 0
        print(NOT_RUNNING, file=stderr)
        return 1
    except WireError as e:
        print(f"hostdevd: cannot prepare {_one_line(domain)}: {_one_line(e.message)}"
              + (f" ({_one_line(e.hint)})" if e.hint else ""), file=stderr)
        return 1
    if reply.get("ok"):
        return 0
    print(_error_line(domain, "refused to prepare", reply.get("error") or {}), file=stderr)
    return 1


def release(domain: str, xml: str, sock: str, stderr) -> int:
    if not needs_daemon(xml):
        return 0
    request = {"op": "release", "origin": "hook", "domain": {"name": domain}, "xml": xml}
    try:
        reply = call(sock, request, RELEASE_TIMEOUT)
    except WireError as e:
        print(f"hostdevd: release of {_one_line(domain)} not done: {_one_line(e.message)}; hostdevd releases it "
              "when it next reconciles", file=stderr)
        return 0
    if not reply.get("ok"):
        print(_error_line(domain, "release incomplete for", reply.get("error") or {}), file=stderr)
    return 0


def migrate_report(domain: str, xml: str, sock: str, stderr) -> None:
    """Report (stderr; the daemon logs to journald) what blocks a live migration. Never fails, never waits
    longer than MIGRATE_TIMEOUT."""
    if not mentions_hostdev(xml):
        return
    request = {"op": "migrate_check", "origin": "hook", "domain": {"name": domain}, "xml": xml}
    try:
        reply = call(sock, request, MIGRATE_TIMEOUT)
    except DaemonNotRunning:
        return                          # nothing to say: hostdevd is not in charge on this host
    except WireError as e:
        print(f"hostdevd: migrate check of {_one_line(domain)} skipped: {_one_line(e.message)}", file=stderr)
        return
    if not reply.get("ok"):
        print(_error_line(domain, "could not check the migration of", reply.get("error") or {}), file=stderr)
        return
    m = reply.get("migration") or {}
    print(f"hostdevd: {_one_line(m.get('summary', ''))}", file=stderr)
    for d in m.get("devices", []):
        if d.get("blocks"):
            verdict = {True: "can be hot-unplugged", False: "cannot be hot-unplugged", None: "hot-unplug unknown"}
            print(f"hostdevd:   {_one_line(d.get('address'))}: {verdict[d.get('unplug')]} "
                  f"({_one_line(d.get('reason', ''))})", file=stderr)
    for step in m.get("steps", []):
        print(f"hostdevd:   then: {_one_line(step)}", file=stderr)


def main(argv: list[str] | None = None, socket_path: str | None = None,
         stdin=None, stdout=None, stderr=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    sock = socket_path or os.environ.get("HOSTDEVD_SOCKET") or DEFAULT_SOCKET
    domain = argv[0] if argv else "?"
    op = argv[1] if len(argv) > 1 else ""
    subop = argv[2] if len(argv) > 2 else ""
    try:
        if op == "prepare" and subop == "begin":
            return prepare(domain, _read_all(stdin), sock, stderr)
        if op == "start" and subop == "begin":
            return prepare(domain, _read_all(stdin), sock, stderr, phase="start")
        if op == "release" and subop == "end":
            return release(domain, _read_all(stdin), sock, stderr)
        if op in ("migrate", "restore"):
            xml = _read_all(stdin)
            stdout.write(xml)            # the XML, unchanged, before anything that could go wrong
            stdout.flush()
            if op == "migrate":
                migrate_report(domain, xml, sock, stderr)
            return 0
        _drain_nonblocking(stdin)
        return 0
    except Exception as e:
        if op in ("prepare", "start"):
            print(f"hostdevd: hook failed for {_one_line(domain)}: {_one_line(e)}", file=stderr)
            return 1
        print(f"hostdevd: hook {_one_line(op)} {_one_line(subop)} for {_one_line(domain)}: {_one_line(e)}", file=stderr)
        return 0


if __name__ == "__main__":
    sys.exit(main())
