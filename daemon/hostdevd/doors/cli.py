"""hostdevctl: status, dry-run plans, host checks, and prepare/release by hand.

Exit codes: 0 ok, 1 refused or problem found, 2 usage error. Every command
takes --json. Read-only commands work without the daemon.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import __version__
from ..core.address import PciAddress
from ..core.checks import run_checks
from ..core.config import Config, load_config
from ..core.domxml import parse_domain
from ..core.engine import DomainPrepare, Engine
from ..core.errors import HostdevError, Refused, UsageError
from ..core.ledger import Ledger, LedgerStore, Owner
from ..core.planner import plan_prepare, plan_release
from ..core.sysfs import RealHost, Sysfs
from ..core.topology import Topology, from_snapshot
from .wiring import host_engine

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 as well; keep one line
        raise UsageError(f"{self.prog}: {message}", f"see `{self.prog} --help`")


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[("-" if c is None else str(c)) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*headers).rstrip()]
    lines += [fmt.format(*r).rstrip() for r in cells]
    return "\n".join(lines)


class Context:
    """What every command needs, built lazily from the global options."""

    def __init__(self, args: argparse.Namespace, sysfs: Sysfs | None = None, netlink=None):
        self.args = args
        self._sysfs = sysfs
        self._netlink = netlink          # tests: a sim.fakenetlink.FakeNetlink; None: pyroute2 on a real host
        self._config: Config | None = None
        self._engine: Engine | None = None

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
            from ..core.listing import class_warnings, parse_listing
            topo = parse_listing(_read_text(a.listing))
            return topo, class_warnings(topo)
        if getattr(a, "snapshot", None):
            return from_snapshot(_read_text(a.snapshot)), {}
        return self.engine.topology(), {}


def _daemon_socket(ctx: Context) -> str | None:
    """The daemon's socket when it answers; None means work locally."""
    if getattr(ctx.args, "no_daemon", False):
        return None
    from . import wire
    path = wire.socket_path(ctx.config.runtime_dir)
    try:
        return path if wire.call(path, {"op": "ping"}, timeout=5).get("ok") else None
    except wire.WireError:
        return None


def _via_daemon(ctx: Context, sock: str, request: dict, out: Callable[[str], None], title: str) -> int:
    """Send a write to the daemon, so its per-group locks and claims cover hand-run commands too."""
    from . import wire
    try:
        reply = wire.call(sock, request, timeout=300)
    except wire.WireError as e:
        raise HostdevError(e.message, e.hint) from e
    if reply.get("ok"):
        data = reply.get("plan") or {"ok": True, "owner": reply.get("owner", {}), "groups": [], "steps": [],
                                     "warnings": []}
        data["result"] = reply.get("result")
        data.setdefault("notes", []).append("done by the hostdevd daemon")
        for key in ("note", "libvirt_attached", "pending"):
            if key in reply:
                data["notes"].append(f"{key}: {reply[key]}")
        _print_plan(ctx, data, out, title)
        return EXIT_OK
    err = reply.get("error", {})
    refusals = err.get("refusals") or [{"device": "-", "reason": err.get("message", "refused"),
                                        "hint": err.get("hint") or ""}]
    data = {"ok": False, "owner": request.get("domain", {}), "groups": [], "steps": [], "warnings": [],
            "refusals": refusals, "error": err}
    _print_plan(ctx, data, out, title)
    return EXIT_USAGE if err.get("code") in ("BAD_REQUEST", "INVALID_XML", "INVALID_ADDRESS", "USAGE") \
        else EXIT_PROBLEM


def _domain_ref(owner: Owner) -> dict:
    return {"name": owner.name, **({"uuid": owner.uuid} if owner.uuid else {})}


_STDIN: list[str] = []      # stdin can be read once; a command may need the XML twice


def _read_text(path: str) -> str:
    try:
        if path == "-":
            if not _STDIN:
                _STDIN.append(sys.stdin.read())
            return _STDIN[0]
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from e


def _owner_label(ledger: Ledger, addr: PciAddress) -> str | None:
    claim = ledger.claim_for_device(addr)
    if claim is None:
        return "reserved" if str(addr) in ledger.reservations else None
    label = "reserved" if claim.owner.kind == "reservation" else claim.owner.name
    if claim.reserved and claim.owner.kind != "reservation":
        label += " (reserved)"
    return label if claim.state == "active" else f"{label} ({claim.state})"


# ---------------------------------------------------------------- commands
def cmd_groups(ctx: Context, out: Callable[[str], None]) -> int:
    topo, _ = ctx.topology()
    ledger = ctx.ledger() if topo.source == "sysfs" else Ledger()
    data = topo.to_json()
    for g in data["groups"]:
        for d in g["devices"]:
            d["owner"] = _owner_label(ledger, PciAddress.parse(d["address"]))
    if ctx.args.save:
        Path(ctx.args.save).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    if ctx.args.json:
        out(json.dumps(data, indent=2))
        return EXIT_OK
    rows = []
    entries = [(g["group"], d) for g in data["groups"] for d in g["devices"]]
    entries += [(None, d) for d in data["ungrouped"]]
    for group, d in entries:
        addr = PciAddress.parse(d["address"])
        notes = ["bridge"] if d["bridge"] else []
        if addr in topo.critical:
            notes.append("host-critical")
        rows.append([group, d["address"], d["class"], f"{d['vendor']}:{d['device']}",
                     d.get("driver") or ("" if topo.source == "listing" else "-"),
                     _owner_label(ledger, addr), ", ".join(notes), d.get("name") or ""])
    headers = ["GROUP", "ADDRESS", "CLASS", "VENDOR:DEV", "DRIVER", "OWNER", "NOTE", "NAME"]
    if topo.source != "listing":
        headers, rows = headers[:-1], [r[:-1] for r in rows]
    out(_table(headers, rows))
    if not topo.iommu_active:
        out("")
        out("No IOMMU groups: the IOMMU is off or absent on this host, so no device can be passed through.")
        out("Enable VT-d / AMD-Vi in the firmware and boot with intel_iommu=on (or amd_iommu=on); "
            "`hostdevctl check` explains.")
        return EXIT_PROBLEM
    return EXIT_OK


def _requests(ctx: Context) -> tuple[list[PciAddress], Owner | None, list[str]]:
    """Addresses from a domain XML file and/or --device; the owner the XML names."""
    a = ctx.args
    addrs: list[PciAddress] = [PciAddress.parse(d) for d in (a.device or [])]
    notes: list[str] = []
    owner = None
    if a.xml:
        dom = parse_domain(_read_text(a.xml).encode())
        addrs += [r.address for r in dom.requests]
        if dom.name:
            owner = Owner(name=dom.name, uuid=dom.uuid)
        notes += [f"out of scope ({o.kind}): {o.detail} - not bound by hostdevd" for o in dom.out_of_scope]
        notes += [f"interface type='network' source {n.network!r}: libvirt picks the device at start; "
                  "the hook prepares it then" for n in dom.networks]
    if getattr(a, "owner", None):
        owner = Owner(name=a.owner, uuid=getattr(a, "uuid", None) or (owner.uuid if owner else None))
    return addrs, owner, notes


def _print_plan(ctx: Context, plan_json: dict, out: Callable[[str], None], title: str) -> None:
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
        out(f"  refused: {r['reason']}")
        out(f"    fix: {r['hint']}")
    for w in plan_json.get("warnings", []):
        out(f"  warning: {w}")
    for n in plan_json.get("notes", []):
        out(f"  note: {n}")


def cmd_plan(ctx: Context, out: Callable[[str], None]) -> int:
    addrs, owner, notes = _requests(ctx)
    owner = owner or Owner(name="plan", kind="manual")
    topo, warnings = ctx.topology()
    ledger = ctx.ledger() if topo.source == "sysfs" else Ledger()
    if ctx.args.release:
        plan = plan_release(topo, owner, ledger, addrs or None)
    else:
        if not addrs:
            raise UsageError("nothing to plan: give a domain XML file or --device BDF")
        plan = plan_prepare(topo, addrs, owner, ledger, ctx.engine.policy if topo.source == "sysfs"
                            else _policy(ctx), warnings, net_requests=_net_requests(ctx))
    data = plan.to_json()
    data["source"] = topo.source
    data["notes"] = notes
    _print_plan(ctx, data, out, "release plan" if ctx.args.release else "plan")
    return EXIT_OK if plan.ok else EXIT_PROBLEM


def _net_requests(ctx: Context) -> dict:
    """VF MAC/VLAN from the domain XML's <interface type='hostdev'> (none with --device only)."""
    if not getattr(ctx.args, "xml", None):
        return {}
    from ..core.netreq import net_requests
    return net_requests(parse_domain(_read_text(ctx.args.xml).encode()))


def _policy(ctx: Context):
    from ..core.planner import Policy
    return Policy.from_config(ctx.config)


def cmd_prepare(ctx: Context, out: Callable[[str], None]) -> int:
    addrs, owner, notes = _requests(ctx)
    if owner is None:
        raise UsageError("prepare needs an owner: a domain XML with <name>, or --owner NAME")
    if not addrs:
        raise UsageError("nothing to prepare: give a domain XML file or --device BDF")
    sock = _daemon_socket(ctx)
    if sock:
        req = {"op": "prepare", "domain": _domain_ref(owner), "origin": "cli"}
        if ctx.args.xml and not ctx.args.device:   # the XML carries VF MAC/VLAN (<interface type='hostdev'>)
            req["xml"] = _read_text(ctx.args.xml)
        else:
            req["addresses"] = [str(a) for a in addrs]
        return _via_daemon(ctx, sock, req, out, "prepared")
    parsed = parse_domain(_read_text(ctx.args.xml).encode()) if ctx.args.xml else None
    try:
        done = ctx.engine.prepare_domain(DomainPrepare(owner, addrs, parsed, origin="cli"))
    except Refused as e:
        plan = ctx.engine.plan_prepare(addrs, owner)
        data = plan.to_json()
        data["ok"] = False
        data.setdefault("refusals", e.refusals or [{"device": "-", "reason": e.message, "hint": e.hint or ""}])
        _print_plan(ctx, data, out, "prepare")
        return EXIT_PROBLEM
    assert done.plan is not None and done.result is not None
    data = done.plan.to_json()
    data["result"] = done.result.to_json()
    data["notes"] = notes
    _print_plan(ctx, data, out, "prepared")
    return EXIT_OK


def cmd_release(ctx: Context, out: Callable[[str], None]) -> int:
    addrs, owner, _ = _requests(ctx)
    if owner is None:
        raise UsageError("release needs an owner: a domain XML with <name>, or --owner NAME")
    sock = _daemon_socket(ctx)
    if sock:
        req = {"op": "release", "domain": _domain_ref(owner), "origin": "cli"}
        if addrs:
            req["addresses"] = [str(a) for a in addrs]
        return _via_daemon(ctx, sock, req, out, "released")
    done = ctx.engine.release_domain(owner, addrs or None)
    assert done.plan is not None and done.result is not None
    data = done.plan.to_json()
    data["result"] = done.result.to_json()
    if not done.plan.groups:
        data["warnings"].append(f"{owner.name} holds no groups")
    _print_plan(ctx, data, out, "released")
    return EXIT_OK


def _hotplug(ctx: Context, out: Callable[[str], None], op: str) -> int:
    """attach/detach go through the daemon: it holds the group locks, calls libvirt and hears its events."""
    from . import wire
    a = ctx.args
    if not a.xml and not a.device:
        raise UsageError(f"{op}: give a device XML file or --device BDF")
    if a.xml and a.device:
        raise UsageError(f"{op}: give a device XML file or --device BDF, not both")
    sock = _daemon_socket(ctx)
    if not sock:
        raise HostdevError(f"{op} needs the hostdevd daemon (it calls libvirt and waits for its events)",
                           "systemctl start hostdevd")
    req: dict[str, Any] = {"op": op, "domain": {"name": a.domain}, "live": bool(a.live), "config": bool(a.persist)}
    if a.xml:
        req["xml"] = _read_text(a.xml)
    else:
        req["addresses"] = [str(PciAddress.parse(d)) for d in a.device]
    wait = 0.0
    if op == "detach":
        if a.timeout is not None:
            req["timeout"] = a.timeout
        wait = a.timeout if a.timeout is not None else ctx.config.detach_timeout
    try:
        reply = wire.call(sock, req, timeout=wait + 300)
    except wire.WireError as e:
        raise HostdevError(e.message, e.hint) from e
    if not reply.get("ok"):
        return _via_daemon_error(ctx, req, reply, out, op)
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


def _via_daemon_error(ctx: Context, request: dict, reply: dict, out: Callable[[str], None], title: str) -> int:
    err = reply.get("error", {})
    if ctx.args.json:
        out(json.dumps(reply, indent=2))
    else:
        out(f"{title} {', '.join(request.get('addresses') or []) or 'the device'} "
            f"{'to' if title == 'attach' else 'from'} {request['domain']['name']}: FAILED")
        for r in err.get("refusals") or [{"reason": err.get("message", "failed"), "hint": err.get("hint")}]:
            out(f"  {r['reason']}")
            if r.get("hint"):
                out(f"    fix: {r['hint']}")
    return EXIT_USAGE if err.get("code") in ("BAD_REQUEST", "INVALID_XML", "INVALID_ADDRESS", "USAGE") \
        else EXIT_PROBLEM


def cmd_attach(ctx: Context, out: Callable[[str], None]) -> int:
    return _hotplug(ctx, out, "attach")


def cmd_detach(ctx: Context, out: Callable[[str], None]) -> int:
    return _hotplug(ctx, out, "detach")


def _print_migration(m: dict, out: Callable[[str], None]) -> None:
    out(m["summary"] + (f"  [from the {m['source']}]" if m.get("source") != "live XML" else ""))
    if m["devices"]:
        verdict = {True: "yes", False: "NO", None: "?"}
        rows = [[d["address"], d["role"], d.get("group"), d.get("guest"), d.get("controller"),
                 verdict[d["unplug"]] if d["blocks"] else "-", d["reason"]] for d in m["devices"]]
        out(_table(["ADDRESS", "ROLE", "GROUP", "GUEST", "GUEST BUS", "UNPLUG", "WHY"], rows))
    for d in m["devices"]:
        for n in d.get("notes", []):
            out(f"  note: {d['address']}: {n}")
    for n in m.get("notes", []):
        out(f"  note: {n}")
    if m.get("steps"):
        out("unplug, migrate, replug:" if not m.get("cannot_unplug") else "to move it:")
        for step in m["steps"]:
            out(f"  {step}")


def cmd_check_migrate(ctx: Context, out: Callable[[str], None]) -> int:
    """Does DOMAIN hold assigned devices that block live migration; which can be unplugged first?"""
    from . import wire
    a = ctx.args
    xml = _read_text(a.xml) if a.xml else None
    sock = _daemon_socket(ctx)
    if sock:
        req: dict[str, Any] = {"op": "migrate_check", "origin": "cli", "domain": {"name": a.domain}}
        if xml is not None:
            req["xml"] = xml
        try:
            reply = wire.call(sock, req, timeout=60)
        except wire.WireError as e:
            raise HostdevError(e.message, e.hint) from e
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


def cmd_status(ctx: Context, out: Callable[[str], None]) -> int:
    ledger = ctx.ledger()
    drift = _daemon_drift(ctx)
    if ctx.args.json:
        data = json.loads(ledger.model_dump_json())
        data["drift"] = drift   # the ledger plus what the daemon saw through udev ([] without a daemon)
        out(json.dumps(data, indent=2))
        return EXIT_OK
    rows = []
    for _, c in sorted(ledger.claims.items(), key=lambda kv: int(kv[0])):
        for d in c.devices:
            rows.append([c.group, c.owner.label(), c.state, d.address, d.role, d.state,
                         d.original_driver or "none", d.original_override or ""])
    if not rows:
        out("no claims: every device is with the host")
        return EXIT_OK
    out(_table(["GROUP", "OWNER", "CLAIM", "ADDRESS", "ROLE", "STATE", "ORIG DRIVER", "ORIG OVERRIDE"], rows))
    for c in ledger.claims.values():
        for n in c.notes:
            out(f"group {c.group}: {n}")
        if c.host_actions:
            out(f"group {c.group}: host actions undone at release: " + ", ".join(
                f"{'stopped' if a.kind == 'unit' else 'unloaded'} {a.name}"
                + (" (pending)" if a.state == "pending" else "") for a in c.host_actions))
    for d in drift:
        out(f"DRIFT: {d['address']} (group {d['group']}, {d['owner']}) is on {d['driver'] or 'no driver'}, "
            f"not {d['expected']}, since {d['since']}: changed behind hostdevd's back, left as it is")
    return EXIT_OK


def _daemon_drift(ctx: Context) -> list[dict]:
    """Drift the daemon saw through udev (empty without a daemon)."""
    from . import wire
    sock = _daemon_socket(ctx)
    if not sock:
        return []
    try:
        return wire.call(sock, {"op": "status"}, timeout=10).get("drift") or []
    except wire.WireError:
        return []


def cmd_check(ctx: Context, out: Callable[[str], None]) -> int:
    results = run_checks(ctx.sysfs, ctx.ledger())
    failed = any(r.status == "fail" for r in results)
    if ctx.args.json:
        out(json.dumps({"ok": not failed, "checks": [r.to_json() for r in results]}, indent=2))
    else:
        for r in results:
            out(f"{r.status.upper():<5} {r.name:<22} {r.message}")
            if r.hint and r.status != "ok":
                out(f"      fix: {r.hint}")
    return EXIT_PROBLEM if failed else EXIT_OK


def cmd_vfs(ctx: Context, out: Callable[[str], None]) -> int:
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
        out(_table(["PF", "VF", "ADDRESS", "GROUP", "DRIVER", "OWNER", "MAC", "VLAN"], rows))
    return EXIT_OK


def cmd_vfs_set(ctx: Context, out: Callable[[str], None]) -> int:
    a = ctx.args
    if a.numvfs < 0:
        raise UsageError("vfs set: the VF count cannot be negative")
    sock = _daemon_socket(ctx)
    if sock:
        from . import wire
        req = {"op": "vfs_set", "pf": a.pf, "numvfs": a.numvfs}
        if a.autoprobe is not None:
            req["autoprobe"] = a.autoprobe
        if a.wait_timeout:
            req["wait_timeout"] = a.wait_timeout
        try:
            reply = wire.call(sock, req, timeout=(a.wait_timeout or 600) + 30)
        except wire.WireError as e:
            raise HostdevError(e.message, e.hint) from e
        if not reply.get("ok"):
            err = reply.get("error", {})
            return _vfs_refused(ctx, out, a.pf, err.get("message", "refused"), err.get("hint"),
                                2 if err.get("code") in ("BAD_REQUEST", "USAGE") else EXIT_PROBLEM)
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


def _vfs_refused(ctx: Context, out: Callable[[str], None], pf: str, message: str, hint: str | None,
                 status: int) -> int:
    if ctx.args.json:
        out(json.dumps({"ok": False, "pf": pf, "error": {"message": message, "hint": hint}}, indent=2))
    else:
        out(f"vfs set {pf}: REFUSED")
        out(f"  refused: {message}")
        if hint:
            out(f"    fix: {hint}")
    return status


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable output")
    p = _Parser(prog="hostdevctl", description=__doc__.splitlines()[0], parents=[common])
    p.add_argument("--version", action="version", version=f"hostdevctl {__version__}")
    p.add_argument("--config", help="config file (default /etc/hostdevd/hostdevd.toml)")
    p.add_argument("--state-dir", help="ledger directory (default from config: /var/lib/hostdevd)")
    p.add_argument("--sysfs-root", help="sysfs mount point (default /sys; for tests and the lab)")
    p.add_argument("--no-daemon", action="store_true",
                   help="prepare/release in this process even when the daemon runs")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def source_opts(sp: argparse.ArgumentParser) -> None:
        g = sp.add_mutually_exclusive_group()
        g.add_argument("--listing", metavar="FILE", help="an IOMMU-group listing (forum post style) instead of sysfs")
        g.add_argument("--snapshot", metavar="FILE", help="a JSON snapshot from `groups --save`")

    def request_opts(sp: argparse.ArgumentParser, owner: bool = True) -> None:
        sp.add_argument("xml", nargs="?", help="domain XML file (or - for stdin)")
        sp.add_argument("--device", action="append", metavar="BDF", help="PCI address; repeatable")
        if owner:
            sp.add_argument("--owner", metavar="NAME", help="owning domain name")
            sp.add_argument("--uuid", metavar="UUID", help="owning domain UUID")

    sp = sub.add_parser("groups", parents=[common], help="IOMMU groups, devices, drivers and owners")
    source_opts(sp)
    sp.add_argument("--save", metavar="FILE", help="also write a JSON snapshot")
    sp.set_defaults(func=cmd_groups)

    sp = sub.add_parser("plan", parents=[common], help="dry run: what prepare (or --release) would do")
    request_opts(sp)
    source_opts(sp)
    sp.add_argument("--release", action="store_true", help="plan a release instead")
    sp.set_defaults(func=cmd_plan)

    sp = sub.add_parser("check", parents=[common], help="validate the host for passthrough")
    sp.set_defaults(func=cmd_check)

    sp = sub.add_parser("prepare", parents=[common], help="claim groups and bind them to vfio-pci")
    request_opts(sp)
    sp.set_defaults(func=cmd_prepare)

    sp = sub.add_parser("release", parents=[common], help="release claims and restore recorded drivers")
    request_opts(sp)
    sp.set_defaults(func=cmd_release)

    for name, what in (("attach", "prepare the device's group, then hot-plug it into a running domain"),
                       ("detach", "hot-unplug a device, wait for the guest to let go, then release its group "
                                  "when nothing else of the domain uses it")):
        sp = sub.add_parser(name, parents=[common], help=what + " (needs the daemon)")
        sp.add_argument("domain", help="domain name")
        sp.add_argument("xml", nargs="?", help="device XML file (<hostdev> or <interface type='hostdev'>)")
        sp.add_argument("--device", action="append", metavar="BDF", help="PCI address; repeatable")
        sp.add_argument("--live", action="store_true",
                        help="the running domain (neither --live nor --config: the domain's current state)")
        # dest differs from the global --config (the config file) that precedes the command
        sp.add_argument("--config", dest="persist", action="store_true", help="the persistent definition")
        if name == "detach":
            sp.add_argument("--timeout", type=float, metavar="SECONDS",
                            help="how long to wait for the guest to let go (default: detach_timeout, 30)")
        sp.set_defaults(func=cmd_attach if name == "attach" else cmd_detach)

    sp = sub.add_parser("check-migrate", parents=[common],
                        help="which assigned devices block a live migration, and which can be hot-unplugged first")
    sp.add_argument("domain", help="domain name")
    sp.add_argument("--xml", metavar="FILE", help="judge this domain XML (virsh dumpxml) instead of asking libvirt")
    sp.set_defaults(func=cmd_check_migrate)

    sp = sub.add_parser("status", parents=[common], help="the ledger: claims, owners, recorded drivers")
    sp.set_defaults(func=cmd_status)

    sp = sub.add_parser("vfs", parents=[common], help="SR-IOV PFs and their VFs: group, driver, owner, MAC, VLAN")
    sp.set_defaults(func=cmd_vfs)
    vsub = sp.add_subparsers(dest="vfs_command", parser_class=_Parser)
    vs = vsub.add_parser("set", parents=[common], help="set a PF's VF count (through 0); refused while any VF "
                         "is assigned (through the daemon when it runs)")
    vs.add_argument("pf", help="the PF: PCI address or network interface name")
    vs.add_argument("numvfs", type=int, help="number of VFs (0 removes them)")
    g = vs.add_mutually_exclusive_group()
    g.add_argument("--autoprobe", dest="autoprobe", action="store_true", default=None,
                   help="new VFs are probed by host drivers")
    g.add_argument("--no-autoprobe", dest="autoprobe", action="store_false",
                   help="new VFs stay driverless until a domain gets one")
    vs.add_argument("--wait-timeout", type=float, metavar="S", help="seconds to wait for the VFs (udev)")
    vs.set_defaults(func=cmd_vfs_set)
    return p


def main(argv: list[str] | None = None, sysfs: Sysfs | None = None,
         out: Callable[[str], None] = print, netlink=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="hostdevctl: %(message)s")
    _STDIN.clear()
    try:
        args = build_parser().parse_args(argv)
        return args.func(Context(args, sysfs, netlink), out)
    except HostdevError as e:
        as_json = "--json" in (argv if argv is not None else sys.argv[1:])
        if as_json and not isinstance(e, UsageError):
            out(json.dumps({"ok": False, "error": e.to_dict()}))
        print(f"hostdevctl: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
