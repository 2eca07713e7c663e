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

# The C halves of ``socket`` and ``json``: the hook's client needs nothing more, and the Python
# modules would pull in enum and re (about half of the hook's own start-up, issue 13). The daemon's
# side (api.py) imports the full modules.
import _json
import _socket
import os
import time

TYPE_CHECKING = False      # typing itself imports re: not for the hook's start-up
if TYPE_CHECKING:
    import socket
    from typing import Any

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


def _dumps(value: Any) -> str:
    """json.dumps(value, ensure_ascii=False, separators=(",", ":")) for what requests hold
    (dicts with string keys, lists, strings, numbers, booleans, None), without importing json."""
    if isinstance(value, str):
        return _json.encode_basestring(value)
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"not JSON: {value!r}")
        return float.__repr__(value)
    if isinstance(value, dict):
        items = []
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"JSON object keys must be strings, not {type(k).__name__}")
            items.append(_json.encode_basestring(k) + ":" + _dumps(v))
        return "{" + ",".join(items) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_dumps(v) for v in value) + "]"
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


class _ScanContext:
    """What _json's scanner reads from a json.JSONDecoder (strict, hooks, number parsers)."""
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    memo: dict = {}

    @staticmethod
    def parse_constant(name: str) -> float:
        return {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}[name]


_scan = _json.make_scanner(_ScanContext())  # type: ignore[arg-type]  # duck-typed, as json.scanner is


def _loads(text: str) -> Any:
    """json.loads for one reply line, without importing json; ValueError when it is not JSON."""
    start = len(text) - len(text.lstrip(" \t\n\r"))
    try:
        value, end = _scan(text, start)
    except StopIteration:
        raise ValueError("expecting a JSON value") from None
    finally:
        _ScanContext.memo.clear()
    if text[end:].strip(" \t\n\r"):
        raise ValueError("extra data after the JSON value")
    return value


def encode(message: dict) -> bytes:
    """One message as one line of UTF-8 JSON; ValueError when it is over MAX_MESSAGE."""
    data = _dumps(message).encode("utf-8") + b"\n"
    if len(data) > MAX_MESSAGE:
        raise ValueError(f"message of {len(data)} bytes is over the {MAX_MESSAGE}-byte limit")
    return data


class LineReader:
    """Read newline-terminated messages from a socket with a size limit and a deadline."""

    def __init__(self, sock: socket.socket | _socket.socket, limit: int = MAX_MESSAGE):
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
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
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
        reply = _loads(line.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise BadReply(f"hostdevd's reply is not JSON: {line[:80]!r}") from None
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise BadReply(f"hostdevd's reply is not a reply object: {line[:80]!r}")
    return reply
