"""The daemon socket's framing and client, stdlib only.

The libvirt hook imports this module, so it must stay light: ``json``,
``socket``, ``os``, ``time`` and nothing from the rest of hostdevd.

Protocol (version 1): one request per line, a JSON object
``{"v": 1, "op": "...", ...}`` followed by ``\\n``; one reply per line,
``{"v": 1, "ok": true, ...}`` or
``{"v": 1, "ok": false, "error": {"code": ..., "message": ..., "hint": ...}}``.
A message is at most :data:`MAX_MESSAGE` bytes, newline included. A
connection may carry several requests in turn; each gets exactly one reply.
"""
from __future__ import annotations

import json
import os
import socket
import time

PROTOCOL_VERSION = 1
MAX_MESSAGE = 1024 * 1024
SOCKET_NAME = "hostdevd.sock"
DEFAULT_RUNTIME_DIR = "/run/hostdevd"
DEFAULT_SOCKET = os.path.join(DEFAULT_RUNTIME_DIR, SOCKET_NAME)


def socket_path(runtime_dir: str = DEFAULT_RUNTIME_DIR) -> str:
    return os.path.join(runtime_dir, SOCKET_NAME)


class WireError(Exception):
    """The request could not be delivered or its reply could not be read."""

    code = "WIRE"

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class DaemonNotRunning(WireError):
    code = "NOT_RUNNING"


class DaemonTimeout(WireError):
    code = "TIMEOUT"


class BadReply(WireError):
    code = "BAD_REPLY"


def encode(message: dict) -> bytes:
    """One message as one line of UTF-8 JSON; ValueError when it is over MAX_MESSAGE."""
    data = json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"
    if len(data) > MAX_MESSAGE:
        raise ValueError(f"message of {len(data)} bytes is over the {MAX_MESSAGE}-byte limit")
    return data


class LineReader:
    """Read newline-terminated messages from a socket with a size limit and a deadline."""

    def __init__(self, sock: socket.socket, limit: int = MAX_MESSAGE):
        self.sock = sock
        self.limit = limit
        self.buf = b""

    def read(self, timeout: float | None) -> bytes | None:
        """Return one line without its newline, None at a clean EOF.

        Raises ``socket.timeout`` when no complete line arrives within ``timeout``
        seconds (a deadline for the whole line, not per ``recv``), and
        ``OverflowError`` when the line exceeds the limit. Text after EOF without
        a newline counts as the last line.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            nl = self.buf.find(b"\n")
            if nl >= 0:
                if nl + 1 > self.limit:
                    raise OverflowError(nl + 1)
                line, self.buf = self.buf[:nl], self.buf[nl + 1:]
                return line
            if len(self.buf) >= self.limit:
                raise OverflowError(len(self.buf))
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("timed out")
                self.sock.settimeout(remaining)
            chunk = self.sock.recv(min(65536, self.limit + 1 - len(self.buf)))
            if not chunk:
                line, self.buf = self.buf, b""
                return line if line.strip() else None
            self.buf += chunk


def call(sock_path: str, request: dict, timeout: float = 30.0) -> dict:
    """Send one request, return the daemon's reply (a dict with ``ok``).

    An ``ok: false`` reply is returned, not raised: it is the daemon's answer.
    Raises :class:`DaemonNotRunning` when nothing listens on ``sock_path``,
    :class:`DaemonTimeout` when no reply arrives within ``timeout`` seconds
    (connect, send and receive together), :class:`BadReply` for a reply that
    is not a JSON object, and :class:`WireError` for anything else.
    """
    request = dict(request)
    request.setdefault("v", PROTOCOL_VERSION)
    data = encode(request)
    deadline = time.monotonic() + timeout
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        try:
            s.connect(sock_path)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise DaemonNotRunning(f"hostdevd is not running (no daemon on {sock_path}: {e.strerror})",
                                   "systemctl start hostdevd") from None
        except PermissionError:
            raise WireError(f"permission denied on {sock_path}", "run as root") from None
        try:
            try:
                s.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                pass    # the daemon answered early (refused peer, oversize) and closed: read why
            line = LineReader(s).read(max(0.001, deadline - time.monotonic()))
        except TimeoutError:
            raise DaemonTimeout(f"hostdevd did not answer within {timeout:g} s",
                                "see `journalctl -u hostdevd`") from None
        except OverflowError:
            raise BadReply(f"hostdevd's reply is over the {MAX_MESSAGE}-byte limit") from None
        except OSError as e:
            raise WireError(f"lost the connection to hostdevd: {e.strerror or e}",
                            "see `journalctl -u hostdevd`") from None
    finally:
        s.close()
    if line is None:
        raise BadReply("hostdevd closed the connection without a reply", "see `journalctl -u hostdevd`")
    try:
        reply = json.loads(line)
    except ValueError:
        raise BadReply(f"hostdevd's reply is not JSON: {line[:80]!r}") from None
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise BadReply(f"hostdevd's reply is not a reply object: {line[:80]!r}")
    return reply
