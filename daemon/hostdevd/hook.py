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
* ``release end``: ask the daemon to release; never fail (exit 0, log to stderr).
* ``migrate`` / ``restore``: XML filters; print the XML unchanged.
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
NOT_RUNNING = "hostdevd is not running: systemctl start hostdevd"
_HOSTDEV_MARKERS = ("<hostdev", "type='hostdev'", 'type="hostdev"')
_NETWORK_MARKERS = ("<interface type='network'", '<interface type="network"')


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
    line = f"hostdevd: {what} {domain}: {msg}"
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


def prepare(domain: str, xml: str, sock: str, stderr) -> int:
    if not needs_daemon(xml):
        return 0
    request = {"op": "prepare", "origin": "hook", "domain": {"name": domain}, "xml": xml}
    try:
        reply = call(sock, request, PREPARE_TIMEOUT)
    except DaemonNotRunning:
        if not mentions_hostdev(xml):
            # Only a libvirt network interface: most are NAT/bridge networks. Fail
            # open rather than stop every VM on the host while hostdevd is down.
            print(f"hostdevd: warning: {NOT_RUNNING} ({domain} has a network interface; "
                  "not checked)", file=stderr)
            return 0
        print(NOT_RUNNING, file=stderr)
        return 1
    except WireError as e:
        print(f"hostdevd: cannot prepare {domain}: {_one_line(e.message)}"
              + (f" ({e.hint})" if e.hint else ""), file=stderr)
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
        print(f"hostdevd: release of {domain} not done: {_one_line(e.message)}; hostdevd releases it "
              "when it next reconciles", file=stderr)
        return 0
    if not reply.get("ok"):
        print(_error_line(domain, "release incomplete for", reply.get("error") or {}), file=stderr)
    return 0


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
        if op == "release" and subop == "end":
            return release(domain, _read_all(stdin), sock, stderr)
        if op in ("migrate", "restore"):
            stdout.write(_read_all(stdin))
            stdout.flush()
            return 0
        _drain_nonblocking(stdin)
        return 0
    except Exception as e:  # noqa: BLE001 - a hook crash must be one readable line
        if op == "prepare":
            print(f"hostdevd: hook failed for {domain}: {_one_line(e)}", file=stderr)
            return 1
        print(f"hostdevd: hook {op} {subop} for {domain}: {_one_line(e)}", file=stderr)
        return 0


if __name__ == "__main__":
    sys.exit(main())
