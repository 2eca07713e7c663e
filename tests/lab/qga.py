#!/usr/bin/env python3
"""Stdlib-only client for the QEMU guest agent (QGA) and QMP unix sockets.

Importable (``from qga import QGA, qmp``) and usable as a command:

  qga.py QGA_SOCK ping                      exit 0 if the guest agent answers
  qga.py QGA_SOCK exec 'shell command'      run via /bin/sh -c in the guest; prints
                                            stdout/stderr, exits with the guest exit code
        [--timeout S] [--stdin]             --stdin: pass this process's stdin to the command
  qga.py QGA_SOCK put LOCAL REMOTE          copy a file into the guest
  qga.py QGA_SOCK get REMOTE [LOCAL]        copy a file out of the guest (stdout if no LOCAL)
  qga.py QMP_SOCK powerdown                 QMP system_powerdown (ACPI)
  qga.py QMP_SOCK quit                      QMP quit (hard stop)
  qga.py QMP_SOCK qmp CMD [JSON_ARGS]       any QMP command, prints the JSON reply

Exit codes: guest exit code for exec; 124 on timeout; 125 on agent/transport errors.

Every guest command runs under coreutils ``timeout`` inside the guest as well, so
a command that outlives its time limit is killed there (with its whole process
group), not just abandoned by the client.
"""
import base64
import json
import os
import random
import socket
import sys
import time

# qemu-ga's own environment is systemd's minimal one; commands get this one.
GUEST_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
}
CHUNK = 48 * 1024


class AgentError(Exception):
    """The guest agent answered with an error, or the connection broke."""


class GuestTimeout(socket.timeout):
    """A guest command (or an agent reply) did not finish in time."""


class QGA:
    """One connection to a guest agent socket (QEMU accepts one client at a time)."""

    def __init__(self, path, timeout=10.0):
        self.path = path
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
            self.buf = b""
            self._sync()
        except BaseException:
            self.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def _recv_more(self, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            raise GuestTimeout("no reply from the guest agent in time")
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            raise GuestTimeout("no reply from the guest agent in time") from None
        if not data:
            raise AgentError("connection closed by QEMU")
        self.buf += data

    def _read_json(self, deadline):
        dec = json.JSONDecoder()
        while True:
            s = self.buf.lstrip(b"\xff \r\n\t")
            if s:
                text = s.decode("utf-8", "replace")
                try:
                    obj, end = dec.raw_decode(text)
                except ValueError:
                    pass
                else:
                    self.buf = s[len(text[:end].encode("utf-8")):]
                    return obj
            self.buf = s
            self._recv_more(deadline)

    def _sync(self):
        # 0xFF resets the agent's parser; guest-sync-delimited answers with 0xFF first,
        # so stale replies left by earlier (timed-out) clients are discarded.
        sid = random.randint(1, 2**31 - 1)
        deadline = time.monotonic() + self.timeout
        self.sock.sendall(b"\xff" + json.dumps(
            {"execute": "guest-sync-delimited", "arguments": {"id": sid}}).encode() + b"\n")
        while True:
            while b"\xff" not in self.buf:
                self.buf = b""
                self._recv_more(deadline)
            self.buf = self.buf[self.buf.rindex(b"\xff") + 1:]
            obj = self._read_json(deadline)
            if obj.get("return") == sid:
                return

    def cmd(self, execute, arguments=None, timeout=None):
        msg = {"execute": execute}
        if arguments is not None:
            msg["arguments"] = arguments
        deadline = time.monotonic() + (timeout or self.timeout)
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        obj = self._read_json(deadline)
        if "error" in obj:
            raise AgentError("{}: {}".format(execute, obj["error"].get("desc", obj["error"])))
        return obj.get("return")

    def exec_argv(self, argv, timeout=600.0, input_data=None, env=None):
        """Run argv in the guest (no shell). Returns (exit code, stdout bytes, stderr bytes).

        The command is wrapped in ``timeout -k 5 T`` in the guest; the client waits
        a little longer than T and raises GuestTimeout if it still has not finished.
        Exit code 124 means the guest-side timeout fired.
        """
        full_env = dict(GUEST_ENV)
        full_env.update(env or {})
        args = {
            "path": "/usr/bin/timeout",
            "arg": ["-k", "5", f"{max(timeout, 1):g}"] + list(argv),
            "env": ["{}={}".format(*kv) for kv in full_env.items()],
            "capture-output": True,
        }
        if input_data is not None:
            if isinstance(input_data, str):
                input_data = input_data.encode()
            args["input-data"] = base64.b64encode(input_data).decode()
        pid = self.cmd("guest-exec", args)["pid"]
        deadline = time.monotonic() + timeout + 15
        delay = 0.02
        while True:
            st = self.cmd("guest-exec-status", {"pid": pid})
            if st.get("exited"):
                out = base64.b64decode(st["out-data"]) if st.get("out-data") else b""
                err = base64.b64decode(st["err-data"]) if st.get("err-data") else b""
                code = st["exitcode"] if "exitcode" in st else 128 + st.get("signal", 0)
                return code, out, err
            if time.monotonic() > deadline:
                raise GuestTimeout(f"guest command still running after {timeout}s (guest pid {pid}): {argv!r}")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)

    def exec_sh(self, command, timeout=600.0, input_data=None, env=None, shell="/bin/sh"):
        """Run a shell command string in the guest (dash by default; shell='/bin/bash')."""
        return self.exec_argv([shell, "-c", command], timeout, input_data, env)

    def write(self, remote, data, mode="wb"):
        h = self.cmd("guest-file-open", {"path": remote, "mode": mode})
        try:
            for i in range(0, len(data), CHUNK):
                self.cmd("guest-file-write",
                         {"handle": h, "buf-b64": base64.b64encode(data[i:i + CHUNK]).decode()})
        finally:
            self.cmd("guest-file-close", {"handle": h})

    def read(self, remote):
        h = self.cmd("guest-file-open", {"path": remote, "mode": "rb"})
        out = b""
        try:
            while True:
                r = self.cmd("guest-file-read", {"handle": h, "count": CHUNK})
                out += base64.b64decode(r.get("buf-b64", ""))
                if r.get("eof") or r.get("count", 0) == 0:
                    break
        finally:
            self.cmd("guest-file-close", {"handle": h})
        return out

    def put(self, local, remote):
        with open(local, "rb") as f:
            self.write(remote, f.read())

    def get(self, remote):
        return self.read(remote)


def ping(path, timeout=5.0):
    """True if a guest agent answers on path."""
    try:
        with QGA(path, timeout=timeout) as g:
            g.cmd("guest-ping")
        return True
    except (OSError, AgentError, ValueError):
        return False


def qmp(path, execute, arguments=None, timeout=10.0):
    """Run one QMP command; returns the reply dict ({"closed": True} if QEMU hung up)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    f = s.makefile("rwb")

    def send(cmd, args=None):
        m = {"execute": cmd}
        if args:
            m["arguments"] = args
        f.write(json.dumps(m).encode() + b"\n")
        f.flush()
        while True:
            line = f.readline()
            if not line:
                return {"closed": True}
            obj = json.loads(line)
            if "return" in obj or "error" in obj:
                return obj

    try:
        json.loads(f.readline())  # greeting
        send("qmp_capabilities")
        return send(execute, arguments)
    finally:
        f.close()
        s.close()


def main(argv):
    if len(argv) < 3:
        sys.stderr.write(__doc__)
        return 2
    sock, op, rest = argv[1], argv[2], argv[3:]
    timeout = float(os.environ.get("QGA_TIMEOUT", "600"))
    use_stdin = False
    args = []
    i = 0
    while i < len(rest):
        if rest[i] == "--timeout":
            timeout = float(rest[i + 1])
            i += 2
        elif rest[i] == "--stdin":
            use_stdin = True
            i += 1
        else:
            args.append(rest[i])
            i += 1
    try:
        if op in ("powerdown", "quit", "qmp"):
            if op == "qmp":
                r = qmp(sock, args[0], json.loads(args[1]) if len(args) > 1 else None)
                print(json.dumps(r))
                return 1 if "error" in r else 0
            r = qmp(sock, "system_powerdown" if op == "powerdown" else "quit")
            return 1 if "error" in r else 0
        if op == "ping":
            return 0 if ping(sock, float(os.environ.get("QGA_CONNECT_TIMEOUT", "5"))) else 125
        with QGA(sock, timeout=float(os.environ.get("QGA_CONNECT_TIMEOUT", "20"))) as g:
            if op == "exec":
                if len(args) != 1:
                    sys.stderr.write("exec takes exactly one shell command string\n")
                    return 2
                data = sys.stdin.buffer.read() if use_stdin else None
                code, out, err = g.exec_sh(args[0], timeout=timeout, input_data=data)
                sys.stdout.buffer.write(out)
                sys.stdout.flush()
                sys.stderr.buffer.write(err)
                sys.stderr.flush()
                return code
            if op == "put":
                g.put(args[0], args[1])
                return 0
            if op == "get":
                data = g.get(args[0])
                if len(args) > 1:
                    with open(args[1], "wb") as f:
                        f.write(data)
                else:
                    sys.stdout.buffer.write(data)
                return 0
            sys.stderr.write(f"unknown operation {op!r}\n")
            return 2
    except TimeoutError as e:
        sys.stderr.write(f"qga.py: timeout: {e}\n")
        return 124
    except (OSError, AgentError, ValueError) as e:
        sys.stderr.write(f"qga.py: {e}\n")
        return 125


if __name__ == "__main__":
    sys.exit(main(sys.argv))
