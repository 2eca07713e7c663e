"""The daemon's socket API: request validation, dispatch, and the UNIX socket server.

Framing is in :mod:`hostdevd.wire` (newline-delimited JSON, 1 MiB per
message). This module adds:

* request models, one per op, strict (unknown fields are errors);
* :class:`Dispatcher`: one line in, one reply dict out; every failure becomes
  ``{"ok": false, "error": {"code", "message", "hint"}}`` and never an exception;
* :class:`ApiServer`: a threaded server on ``<runtime_dir>/hostdevd.sock``
  (mode 0600) that only answers root or the daemon's own uid (SO_PEERCRED),
  bounds every message's size and the time to send it, and stays up whatever
  a client sends.

Ops (``v`` is 1 for all):

``ping``      -> ``{"version", "pid"}``
``status``    -> ``{"daemon": {...libvirt state...}, "claims": [...], "reservations": [...], "drift": [...],
                 "udev": {...}, "metrics": {"listen", "port", "error"}}``
``metrics``   -> ``{"text"}``: the Prometheus exposition text (README "Metrics")
``prepare``   ``{"domain": {"name", "uuid"?}, "xml" | "addresses", "origin"?, "phase"?}`` -> claims + plan
              (phase "start": libvirt's 'start begin' hook, where a hostdev network's VF is known)
``release``   ``{"domain", "xml"?, "addresses"?}``: without addresses, every claim of the domain
``plan``      ``{"owner": {"name", "uuid"?, "kind"?}, "xml" | "addresses", "action"?}`` (dry run)
``vfs_set``   ``{"pf", "numvfs", "autoprobe"?, "wait_timeout"?}``: SR-IOV VF count (through 0) -> VFs
``attach``    ``{"domain", "xml" | "addresses", "live"?, "config"?}``: prepare, then libvirt attach (virsh's
              --live/--config; neither: the domain's current state)
``detach``    ``{"domain", "xml" | "addresses", "live"?, "config"?, "timeout"?}``: libvirt detach, wait for
              the guest to let go (DEVICE_REMOVED), then release; ``pending`` lists what it kept
``migrate_check`` ``{"domain", "xml"?, "origin"?}`` -> ``{"migration": {...}}``: assigned devices that
              block live migration, and which can be hot-unplugged first

The ops themselves live on the service (``op_<name>(request, peer)``); this
module knows nothing of engines or libvirt.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import stat
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..core.errors import (
    BadRequest,
    Busy,
    HostdevError,
    InternalError,
    PermissionDenied,
    Refused,
    RequestTimeout,
    TooLarge,
    UnknownOp,
    UnsupportedVersion,
)
from ..core.telemetry import Telemetry
from .wire import MAX_MESSAGE, PROTOCOL_VERSION, LineReader, call, encode, socket_path  # noqa: F401 (re-export)

log = logging.getLogger("hostdevd.api")

DEFAULT_READ_TIMEOUT = 30.0
MAX_CONNECTIONS = 128
_UUID_PATTERN = r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$"


def error_reply(err: HostdevError) -> dict:
    """The one shape every failure takes on the wire."""
    body = err.to_dict()
    if isinstance(err, Refused) and err.refusals:
        body["refusals"] = err.refusals
    holders = getattr(err, "holders", None)
    if holders:
        body["holders"] = holders
    return {"v": PROTOCOL_VERSION, "ok": False, "error": body}


# --------------------------------------------------------------------------- requests


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_max_length=MAX_MESSAGE)


class DomainRef(_Strict):
    name: str = Field(min_length=1, max_length=256)
    uuid: str | None = Field(default=None, pattern=_UUID_PATTERN)


class OwnerRef(_Strict):
    name: str = Field(min_length=1, max_length=256)
    uuid: str | None = Field(default=None, max_length=64)
    kind: Literal["domain", "manual", "reservation"] = "domain"


class _Request(_Strict):
    v: Literal[1]
    op: str


class _Devices(_Request):
    """``xml`` (a domain or a device fragment) or ``addresses`` (PCI addresses)."""
    xml: str | None = None
    addresses: list[str] | None = Field(default=None, max_length=256)

    @model_validator(mode="after")
    def _one_source(self):
        if self.op == "release" or getattr(self, "action", None) == "release":
            if self.xml is not None and self.addresses is not None:
                raise ValueError("give xml or addresses, not both")
            return self
        if (self.xml is None) == (self.addresses is None):
            raise ValueError("give exactly one of xml or addresses")
        return self


class PingRequest(_Request):
    op: Literal["ping"]


class StatusRequest(_Request):
    op: Literal["status"]


class MetricsRequest(_Request):
    op: Literal["metrics"]


class PrepareRequest(_Devices):
    op: Literal["prepare"]
    domain: DomainRef
    # "hook": sent by libvirt's hook; the daemon must not call libvirt about this domain (R9).
    origin: Literal["hook", "cli", "api"] = "api"
    # "start": libvirt's 'start begin' hook, where a hostdev network's VF is first known.
    phase: Literal["prepare", "start"] = "prepare"


class ReleaseRequest(_Devices):
    op: Literal["release"]
    domain: DomainRef
    origin: Literal["hook", "cli", "api"] = "api"


class PlanRequest(_Devices):
    op: Literal["plan"]
    owner: OwnerRef
    action: Literal["prepare", "release"] = "prepare"


class AttachRequest(_Devices):
    op: Literal["attach"]
    domain: DomainRef
    live: bool = False
    config: bool = False


class DetachRequest(_Devices):
    op: Literal["detach"]
    domain: DomainRef
    live: bool = False
    config: bool = False
    timeout: float | None = Field(default=None, gt=0, le=600)


class MigrateCheckRequest(_Request):
    op: Literal["migrate_check"]
    domain: DomainRef
    xml: str | None = None
    origin: Literal["hook", "cli", "api"] = "api"


class VfsSetRequest(_Request):
    """``hostdevctl vfs set``: give a PF ``numvfs`` VFs (through 0), refused while any is assigned."""
    op: Literal["vfs_set"]
    pf: str = Field(min_length=1, max_length=64)
    numvfs: int = Field(ge=0, le=65535)
    autoprobe: bool | None = None
    wait_timeout: float | None = Field(default=None, gt=0, le=600)


REQUESTS: dict[str, type[_Request]] = {
    "ping": PingRequest,
    "status": StatusRequest,
    "metrics": MetricsRequest,
    "prepare": PrepareRequest,
    "vfs_set": VfsSetRequest,
    "release": ReleaseRequest,
    "plan": PlanRequest,
    "attach": AttachRequest,
    "detach": DetachRequest,
    "migrate_check": MigrateCheckRequest,
}


# --------------------------------------------------------------------------- dispatch


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


def _one_line(text: object, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _validation_message(op: str, e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(request)"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        return f"{op}: missing field {loc}"
    if err["type"] == "extra_forbidden":
        return f"{op}: unknown field {loc}"
    return f"{op}: field {loc}: {_one_line(msg, 160)}"


class Dispatcher:
    """Decode, validate and route one request line; always return a reply dict.

    ``service`` has one ``op_<name>(request, peer) -> dict`` method per op; what
    it returns is merged into ``{"v": 1, "ok": true}``, what it raises (a
    HostdevError) becomes the error reply.
    """

    def __init__(self, service: Any, telemetry: Telemetry | None = None):
        self.service = service
        # Every answered request is counted (op, origin, result); a hook's is libvirt waiting.
        self.telemetry = telemetry or Telemetry()

    def parse(self, line: bytes) -> _Request:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("request is not UTF-8", "send one JSON object per line") from None
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise BadRequest(f"request is not valid JSON ({_one_line(e, 120)})",
                             'send one JSON object per line, e.g. {"v": 1, "op": "status"}') from None
        if not isinstance(obj, dict):
            raise BadRequest(f"request is a JSON {type(obj).__name__}, not an object",
                             'send {"v": 1, "op": ...}')
        if "v" not in obj:
            raise BadRequest("request has no protocol version field v", 'send {"v": 1, "op": ...}')
        if obj["v"] != PROTOCOL_VERSION or isinstance(obj["v"], bool):
            raise UnsupportedVersion(f"protocol version {_one_line(repr(obj['v']), 20)} is not supported "
                                     f"(this hostdevd speaks {PROTOCOL_VERSION})",
                                     "use a hostdevctl of the same version as the daemon")
        op = obj.get("op")
        if not isinstance(op, str):
            raise BadRequest("request has no op field", f"ops: {', '.join(REQUESTS)}")
        model = REQUESTS.get(op)
        if model is None:
            raise UnknownOp(f"unknown op {_one_line(repr(op), 40)}", f"ops: {', '.join(REQUESTS)}")
        try:
            return model.model_validate(obj)
        except ValidationError as e:
            raise BadRequest(_validation_message(op, e)) from None

    def handle(self, line: bytes, peer: Peer) -> dict:
        t0 = time.monotonic()
        op, origin, result = "invalid", "api", "error"
        try:
            req = self.parse(line)
            op, origin = req.op, getattr(req, "origin", "api")     # both bounded by the request models
            reply = {"v": PROTOCOL_VERSION, "ok": True}
            reply.update(getattr(self.service, f"op_{req.op}")(req, peer) or {})
            result = "ok"
            return reply
        except Refused as e:
            result = "refused"
            return error_reply(e)
        except HostdevError as e:
            return error_reply(e)
        except Exception as e:  # a bug must not take the server down; say so and log it
            log.exception("internal error serving a request")
            return error_reply(InternalError(f"internal error: {_one_line(e, 200)}",
                                             "see `journalctl -u hostdevd`; please report it"))
        finally:
            self.telemetry.request(op, origin, result, time.monotonic() - t0)


# --------------------------------------------------------------------------- server


def peer_credentials(sock: socket.socket) -> Peer:
    """The connecting process's pid, uid and gid, from the kernel (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid)


class ApiServer:
    """Threaded UNIX stream server; one thread per connection.

    Contract: whatever bytes a client sends, it gets at most one reply per line
    and the server keeps serving others. Oversize lines and slow senders get an
    error reply and the connection is closed; other errors leave it open.
    """

    def __init__(self, path: str, dispatcher: Dispatcher, *, read_timeout: float = DEFAULT_READ_TIMEOUT,
                 max_message: int = MAX_MESSAGE, allowed_uids: set[int] | None = None,
                 max_connections: int = MAX_CONNECTIONS):
        self.path = path
        self.dispatcher = dispatcher
        self.read_timeout = read_timeout
        self.max_message = max_message
        self.allowed_uids = allowed_uids if allowed_uids is not None else {0, os.getuid()}
        self._slots = threading.BoundedSemaphore(max_connections)
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._active = 0
        self._active_cond = threading.Condition()
        self.served = 0

    # ---- lifecycle
    def start(self) -> None:
        """Bind (mode 0600, stale socket removed, live one refused) and serve in a thread."""
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(128)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, args=(sock,), name="api-accept", daemon=True)
        self._thread.start()
        log.info("listening on %s", self.path)

    def _remove_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise HostdevError(f"{self.path} exists and is not a socket", "move it away, then start hostdevd")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(self.path)
        except OSError:
            os.unlink(self.path)  # nobody listens: left by a daemon that died
            return
        finally:
            probe.close()
        raise HostdevError(f"another hostdevd is already listening on {self.path}",
                           "stop it first (systemctl stop hostdevd)")

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def active(self) -> int:
        with self._active_cond:
            return self._active

    def stop(self, drain_timeout: float = 0.0) -> bool:
        """Stop accepting; wait up to ``drain_timeout`` for requests in flight. True when drained."""
        self._stopping.set()
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
        if self._thread is not None:
            self._thread.join(5)
            try:                        # only a socket this server bound
                if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                    os.unlink(self.path)
            except OSError:
                pass
        with self._active_cond:
            return self._active_cond.wait_for(lambda: self._active == 0, drain_timeout)

    # ---- serving
    def _accept_loop(self, sock: socket.socket) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = sock.accept()
            except OSError as e:
                if self._stopping.is_set():
                    return
                log.warning("accept failed: %s", e)   # EMFILE and friends: do not spin
                time.sleep(0.1)
                continue
            if not self._slots.acquire(blocking=False):
                self._send(conn, error_reply(Busy("too many connections", "retry in a moment")))
                conn.close()
                continue
            t = threading.Thread(target=self._serve, args=(conn,), name="api-conn", daemon=True)
            t.start()

    def _send(self, conn: socket.socket, reply: dict) -> bool:
        try:
            data = encode(reply)
        except ValueError:
            data = encode(error_reply(TooLarge("the reply is over the 1 MiB limit",
                                               "ask for less (e.g. status of one domain)")))
        try:
            conn.settimeout(self.read_timeout)
            conn.sendall(data)
            return True
        except OSError:
            return False

    def _serve(self, conn: socket.socket) -> None:
        with self._active_cond:
            self._active += 1
        try:
            self._serve_conn(conn)
        except Exception:
            log.exception("connection handler failed")
        finally:
            conn.close()
            self._slots.release()
            with self._active_cond:
                self._active -= 1
                self._active_cond.notify_all()

    def _serve_conn(self, conn: socket.socket) -> None:
        try:
            peer = peer_credentials(conn)
        except OSError as e:
            log.warning("cannot read peer credentials: %s", e)
            return
        if peer.uid not in self.allowed_uids:
            log.warning("refused a connection from pid %s uid %s (not root)", peer.pid, peer.uid)
            self._send(conn, error_reply(PermissionDenied(
                f"hostdevd accepts requests from root only (your uid is {peer.uid})",
                "run the command as root (sudo)")))
            return
        reader = LineReader(conn, self.max_message)
        while not self._stopping.is_set():
            try:
                line = reader.read(self.read_timeout)
            except TimeoutError:
                if reader.buf:
                    self._send(conn, error_reply(RequestTimeout(
                        f"no complete request within {self.read_timeout:g} s", "end each request with a newline")))
                return
            except OverflowError:
                self._send(conn, error_reply(TooLarge(
                    f"request is over the {self.max_message}-byte limit", "send smaller XML")))
                return
            except OSError:
                return
            if line is None:
                return
            if not line.strip():
                continue
            reply = self.dispatcher.handle(line, peer)
            self.served += 1
            if not self._send(conn, reply):
                return
