"""What every hostdevctl command shares: exit codes, the Context, output helpers, daemon routing.

The cli_* command modules import from here, and doors/cli.py imports them; nothing here
imports a command module, so there is no cycle.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.address import PciAddress
from ..core.config import Config, load_config
from ..core.engine import Engine
from ..core.errors import HostdevError, UsageError
from ..core.ledger import Ledger, Owner
from ..core.ledger_store import LedgerStore
from ..core.sysfs import RealHost, Sysfs
from ..core.topology import Topology, from_snapshot
from .wiring import host_engine

if TYPE_CHECKING:
    from ..core.vfnet import NetlinkBackend

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2

Out = Callable[[str], None]
"""Where a command writes its output, one line per call (print, or a list's append in tests)."""

_USAGE_CODES = ("BAD_REQUEST", "INVALID_XML", "INVALID_ADDRESS", "USAGE")


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[("-" if c is None else str(c)) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*headers).rstrip()]
    lines += [fmt.format(*r).rstrip() for r in cells]
    return "\n".join(lines)


class Context:
    """What every command needs, built lazily from the global options."""

    def __init__(self, args: argparse.Namespace, sysfs: Sysfs | None = None,
                 netlink: NetlinkBackend | None = None):
        self.args = args
        self._sysfs = sysfs
        self._netlink = netlink          # tests: a sim.fakenetlink.FakeNetlink; None: pyroute2 on a real host
        self._config: Config | None = None
        self._engine: Engine | None = None
        # --listing: the lines it did not understand, for the output's "unparsed" (None otherwise).
        self.unparsed: dict | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(self.args.config)
            if self.args.state_dir:
                self._config.state_dir = self.args.state_dir
            if self.args.sysfs_root:
                self._config.sysfs_root = self.args.sysfs_root
        return self._config

    @property
    def sysfs(self) -> Sysfs:
        if self._sysfs is None:
            self._sysfs = Sysfs(RealHost(self.config.sysfs_root), self.config.write_timeout)
        return self._sysfs

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = host_engine(self.config, self.sysfs, netlink=self._netlink)
        return self._engine

    def ledger(self) -> Ledger:
        try:
            return LedgerStore(self.config.state_dir).read()
        except PermissionError:
            return Ledger()  # not root: show the host without owners

    def topology(self) -> tuple[Topology, dict[PciAddress, str]]:
        """The topology to work on, and class cautions (listing only)."""
        a = self.args
        if getattr(a, "listing", None):
            from ..core.listing import class_warnings, read_listing
            listing = read_listing(read_text(a.listing))
            self.unparsed = listing.unparsed.to_json()
            said = listing.unparsed.message()
            if said:
                print(f"hostdevctl: warning: {said}", file=sys.stderr)
            return listing.topology, class_warnings(listing.topology)
        if getattr(a, "snapshot", None):
            return from_snapshot(read_text(a.snapshot)), {}
        return self.engine.topology(), {}


# ---------------------------------------------------------------- input
_STDIN: list[str] = []      # stdin can be read once; a command may need the XML twice


def forget_stdin() -> None:
    """Start a command afresh: main() may run many times in one process (tests)."""
    _STDIN.clear()


def read_text(path: str) -> str:
    try:
        if path == "-":
            if not _STDIN:
                _STDIN.append(sys.stdin.read())
            return _STDIN[0]
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from e


# ---------------------------------------------------------------- the daemon
def daemon_socket(ctx: Context) -> str | None:
    """The daemon's socket when it answers; None means work locally."""
    if getattr(ctx.args, "no_daemon", False):
        return None
    from . import wire
    path = wire.socket_path(ctx.config.runtime_dir)
    try:
        return path if wire.call(path, {"op": "ping"}, timeout=5).get("ok") else None
    except wire.WireError:
        return None


def ask_daemon(sock: str, request: dict, timeout: float) -> dict:
    """One request to the daemon; a broken connection is the command's error."""
    from . import wire
    try:
        return wire.call(sock, request, timeout=timeout)
    except wire.WireError as e:
        raise HostdevError(e.message, e.hint) from e


def refused_status(err: dict) -> int:
    """The exit code for the daemon's error: usage when the request itself was wrong."""
    return EXIT_USAGE if err.get("code") in _USAGE_CODES else EXIT_PROBLEM


def via_daemon(ctx: Context, sock: str, request: dict, out: Out, title: str) -> int:
    """Send a write to the daemon, so its per-group locks and claims cover hand-run commands too."""
    reply = ask_daemon(sock, request, timeout=300)
    if reply.get("ok"):
        data = reply.get("plan") or {"ok": True, "owner": reply.get("owner", {}), "groups": [], "steps": [],
                                     "warnings": []}
        data["result"] = reply.get("result")
        data.setdefault("notes", []).append("done by the hostdevd daemon")
        for key in ("note", "libvirt_attached", "pending"):
            if key in reply:
                data["notes"].append(f"{key}: {reply[key]}")
        print_plan(ctx, data, out, title)
        return EXIT_OK
    err = reply.get("error", {})
    refusals = err.get("refusals") or [{"device": "-", "reason": err.get("message", "refused"),
                                        "hint": err.get("hint") or ""}]
    data = {"ok": False, "owner": request.get("domain", {}), "groups": [], "steps": [], "warnings": [],
            "refusals": refusals, "error": err}
    print_plan(ctx, data, out, title)
    return refused_status(err)


def domain_ref(owner: Owner) -> dict:
    return {"name": owner.name, **({"uuid": owner.uuid} if owner.uuid else {})}


# ---------------------------------------------------------------- output
def refusal_text(r: dict) -> str:
    """A refusal from a plan's JSON as one phrase naming its device once: the planner's reasons
    do not repeat the device ("is a PCI bridge; ..."), other refusals may already start with it."""
    device, reason = str(r.get("device") or "-"), str(r.get("reason") or "refused")
    return reason if device == "-" or reason.startswith(device) else f"{device} {reason}"


def print_plan(ctx: Context, plan_json: dict, out: Out, title: str) -> None:
    if ctx.args.json:
        out(json.dumps(plan_json, indent=2))
        return
    out(f"{title} for {plan_json['owner']['name']}: {'OK' if plan_json['ok'] else 'REFUSED'}")
    for g in plan_json["groups"]:
        out(f"  group {g['group']}: bind {', '.join(g['bind']) or '-'}"
            + (f"; companions {', '.join(g['companions'])}" if g["companions"] else "")
            + (f"; skip bridges {', '.join(g['skip'])}" if g["skip"] else ""))
    if plan_json.get("steps"):
        out("  steps:")
        for s in plan_json["steps"]:
            target = s["address"] or s.get("name") or f"group {s['group']}"
            out(f"    {s['action']:<8} {target}" + (f"  {s['detail']}" if s["detail"] else ""))
    for r in plan_json.get("refusals", []):
        out(f"  refused: {refusal_text(r)}")
        if r.get("hint"):
            out(f"    fix: {r['hint']}")
    if plan_json.get("numa"):
        out("  numa: " + ", ".join(f"{a} node {n}" for a, n in plan_json["numa"].items()))
    for w in plan_json.get("warnings", []):
        out(f"  warning: {w}")
    for n in plan_json.get("notes", []):
        out(f"  note: {n}")
