"""hostdevctl attach, detach and check-migrate: devices in and out of a running domain, through the daemon."""
from __future__ import annotations

import json
from typing import Any

from ..core.address import PciAddress
from ..core.errors import HostdevError, UsageError
from ..core.ledger import Owner
from .cli_common import (
    EXIT_OK,
    EXIT_PROBLEM,
    Context,
    Out,
    ask_daemon,
    daemon_socket,
    read_text,
    refusal_text,
    refused_status,
    table,
)


def _hotplug(ctx: Context, out: Out, op: str) -> int:
    """attach/detach go through the daemon: it holds the group locks, calls libvirt and hears its events."""
    a = ctx.args
    if not a.xml and not a.device:
        raise UsageError(f"{op}: give a device XML file or --device BDF")
    if a.xml and a.device:
        raise UsageError(f"{op}: give a device XML file or --device BDF, not both")
    sock = daemon_socket(ctx)
    if not sock:
        raise HostdevError(f"{op} needs the hostdevd daemon (it calls libvirt and waits for its events)",
                           "systemctl start hostdevd")
    req: dict[str, Any] = {"op": op, "domain": {"name": a.domain}, "live": bool(a.live), "config": bool(a.persist)}
    if a.xml:
        req["xml"] = read_text(a.xml)
    else:
        req["addresses"] = [str(PciAddress.parse(d)) for d in a.device]
    wait = 0.0
    if op == "detach":
        if a.timeout is not None:
            req["timeout"] = a.timeout
        wait = a.timeout if a.timeout is not None else ctx.config.detach_timeout
    reply = ask_daemon(sock, req, timeout=wait + 300)
    if not reply.get("ok"):
        return _hotplug_failed(ctx, req, reply, out, op)
    if ctx.args.json:
        out(json.dumps(reply, indent=2))
        return EXIT_PROBLEM if reply.get("pending") else EXIT_OK
    what = ", ".join(req.get("addresses") or []) or "the device"
    where = "+".join(w for w, on in (("live", reply.get("live")), ("config", reply.get("config"))) if on)
    took = f" in {reply['seconds']:.1f} s" if reply.get("seconds") is not None else ""
    if op == "attach":
        out(f"attached {what} to {a.domain} ({where}): OK{took}")
        plan = reply.get("plan") or {}
        for g in plan.get("groups", []):
            out(f"  group {g['group']}: {'held' if g.get('already_held') else 'bound'} "
                f"{', '.join(g['bind'])}" + (f"; companions {', '.join(g['companions'])}" if g["companions"] else ""))
        for w in plan.get("warnings", []):
            out(f"  warning: {w}")
        if reply.get("note"):
            out(f"  note: {reply['note']}")
        return EXIT_OK
    pending = reply.get("pending") or []
    status = "PENDING" if pending else "OK"
    out(f"detach {what} from {a.domain} ({where}): {status}{took}")
    if reply.get("removed"):
        out(f"  the guest let go of {', '.join(reply['removed'])}")
    if reply.get("groups"):
        out(f"  released group{'s' if len(reply['groups']) > 1 else ''} {', '.join(map(str, reply['groups']))}: "
            "back on the host's drivers")
    for w in reply.get("warnings", []):
        out(f"  warning: {w}")
    if reply.get("note"):
        out(f"  {reply['note']}")
    return EXIT_PROBLEM if pending else EXIT_OK


def _hotplug_failed(ctx: Context, request: dict, reply: dict, out: Out, title: str) -> int:
    err = reply.get("error", {})
    if ctx.args.json:
        out(json.dumps(reply, indent=2))
    else:
        out(f"{title} {', '.join(request.get('addresses') or []) or 'the device'} "
            f"{'to' if title == 'attach' else 'from'} {request['domain']['name']}: FAILED")
        for r in err.get("refusals") or [{"reason": err.get("message", "failed"), "hint": err.get("hint")}]:
            out(f"  {refusal_text(r)}")
            if r.get("hint"):
                out(f"    fix: {r['hint']}")
    return refused_status(err)


def cmd_attach(ctx: Context, out: Out) -> int:
    return _hotplug(ctx, out, "attach")


def cmd_detach(ctx: Context, out: Out) -> int:
    return _hotplug(ctx, out, "detach")


def _print_migration(m: dict, out: Out) -> None:
    out(m["summary"] + (f"  [from the {m['source']}]" if m.get("source") != "live XML" else ""))
    if m["devices"]:
        verdict = {True: "yes", False: "NO", None: "?"}
        rows = [[d["address"], d["role"], d.get("group"), d.get("guest"), d.get("controller"),
                 verdict[d["unplug"]] if d["blocks"] else "-", d["reason"]] for d in m["devices"]]
        out(table(["ADDRESS", "ROLE", "GROUP", "GUEST", "GUEST BUS", "UNPLUG", "WHY"], rows))
    for d in m["devices"]:
        for n in d.get("notes", []):
            out(f"  note: {d['address']}: {n}")
    for n in m.get("notes", []):
        out(f"  note: {n}")
    if m.get("steps"):
        out("unplug, migrate, replug:" if not m.get("cannot_unplug") else "to move it:")
        for step in m["steps"]:
            out(f"  {step}")


def cmd_check_migrate(ctx: Context, out: Out) -> int:
    """Does DOMAIN hold assigned devices that block live migration; which can be unplugged first?"""
    a = ctx.args
    xml = read_text(a.xml) if a.xml else None
    sock = daemon_socket(ctx)
    if sock:
        req: dict[str, Any] = {"op": "migrate_check", "origin": "cli", "domain": {"name": a.domain}}
        if xml is not None:
            req["xml"] = xml
        reply = ask_daemon(sock, req, timeout=60)
        if not reply.get("ok"):
            err = reply.get("error", {})
            raise HostdevError(err.get("message", "check failed"), err.get("hint"))
        m = reply["migration"]
    else:
        from ..core.domxml import guest_placements
        placement = guest_placements(xml) if xml is not None else None
        owner = Owner(name=a.domain, uuid=placement.uuid if placement is not None else None)
        report = ctx.engine.migration_report(owner, placement, "given XML")
        if placement is None:
            report.notes.append("the daemon is not running: the verdict comes from the ledger alone "
                                "(give the live XML with --xml for guest placement)")
        m = report.to_json()
    if ctx.args.json:
        out(json.dumps(m, indent=2))
    else:
        _print_migration(m, out)
    return EXIT_PROBLEM if m["blocked"] else EXIT_OK
