"""hostdevctl vfs and vfs set: SR-IOV PFs and their VFs, and a PF's VF count."""
from __future__ import annotations

import json

from ..core.errors import Refused, UsageError
from .cli_common import EXIT_OK, EXIT_PROBLEM, EXIT_USAGE, Context, Out, ask_daemon, daemon_socket, table


def cmd_vfs(ctx: Context, out: Out) -> int:
    from ..core.sriov import vf_listing
    eng = ctx.engine
    data = vf_listing(eng.topology(with_critical=False), ctx.ledger(), eng.executor.vf_net.manager)
    if ctx.args.json:
        out(json.dumps(data, indent=2))
        return EXIT_OK
    if not data["pfs"]:
        out("no SR-IOV capable PF on this host")
        return EXIT_OK
    rows = []
    for pf in data["pfs"]:
        probe = {True: "on", False: "off", None: "?"}[pf["autoprobe"]]
        rec = pf["record"]
        made = f", set by hostdevd: {rec['state']}" + (f" in {rec['seconds']:.3f} s" if rec.get("seconds") else "") \
            if rec else ""
        out(f"PF {pf['pf']} {pf['netdev'] or '-'} ({pf['driver'] or 'no driver'}): {pf['numvfs']} of "
            f"{pf['totalvfs']} VFs, autoprobe {probe}{made}")
        if pf["netlink_error"]:
            out(f"  MAC/VLAN unknown: {pf['netlink_error']}")
        for v in pf["vfs"]:
            rows.append([pf["pf"], v["index"], v["address"], v["group"], v["driver"], v["owner"], v["mac"],
                         v["vlan"]])
    if rows:
        out("")
        out(table(["PF", "VF", "ADDRESS", "GROUP", "DRIVER", "OWNER", "MAC", "VLAN"], rows))
    return EXIT_OK


def cmd_vfs_set(ctx: Context, out: Out) -> int:
    a = ctx.args
    if a.numvfs < 0:
        raise UsageError("vfs set: the VF count cannot be negative")
    sock = daemon_socket(ctx)
    if sock:
        req = {"op": "vfs_set", "pf": a.pf, "numvfs": a.numvfs}
        if a.autoprobe is not None:
            req["autoprobe"] = a.autoprobe
        if a.wait_timeout:
            req["wait_timeout"] = a.wait_timeout
        reply = ask_daemon(sock, req, timeout=(a.wait_timeout or 600) + 30)
        if not reply.get("ok"):
            err = reply.get("error", {})
            return _vfs_refused(ctx, out, a.pf, err.get("message", "refused"), err.get("hint"),
                                EXIT_USAGE if err.get("code") in ("BAD_REQUEST", "USAGE") else EXIT_PROBLEM)
        data = reply["vfs"]
        data["notes"] = data.get("notes", []) + ["done by the hostdevd daemon"]
    else:
        try:
            data = ctx.engine.vfs_set(a.pf, a.numvfs, a.autoprobe, a.wait_timeout).to_json()
        except Refused as e:
            return _vfs_refused(ctx, out, a.pf, e.message, e.hint, EXIT_PROBLEM)
    if ctx.args.json:
        out(json.dumps({"ok": True, **data}, indent=2))
        return EXIT_OK
    how = (f"in {data['seconds']:.3f} s ({data['waiter']})" if data.get("seconds") is not None else "")
    out(f"PF {data['pf']}: {data['numvfs']} VFs {'set ' + how if data['changed'] else '(unchanged)'}".rstrip())
    for v in data["vfs"]:
        out(f"  {v}")
    for n in data.get("notes", []):
        out(f"  note: {n}")
    return EXIT_OK


def _vfs_refused(ctx: Context, out: Out, pf: str, message: str, hint: str | None, status: int) -> int:
    if ctx.args.json:
        out(json.dumps({"ok": False, "pf": pf, "error": {"message": message, "hint": hint}}, indent=2))
    else:
        out(f"vfs set {pf}: REFUSED")
        out(f"  refused: {message}")
        if hint:
            out(f"    fix: {hint}")
    return status
