"""hostdevctl plan, prepare and release: claim groups for a domain (or dry-run it), and give them back."""
from __future__ import annotations

from ..core.address import PciAddress
from ..core.domxml import GuestNuma, parse_domain
from ..core.engine import DomainPrepare
from ..core.errors import Refused, UsageError
from ..core.ledger import Ledger, Owner
from ..core.netreq import NetRequest, net_requests
from ..core.planner import Policy, groups_of, plan_prepare, plan_release
from ..core.preflight import with_preflight
from .cli_common import (
    EXIT_OK,
    EXIT_PROBLEM,
    Context,
    Out,
    daemon_socket,
    domain_ref,
    print_plan,
    read_text,
    via_daemon,
)


def _requests(ctx: Context) -> tuple[list[PciAddress], Owner | None, list[str]]:
    """Addresses from a domain XML file and/or --device; the owner the XML names."""
    a = ctx.args
    addrs: list[PciAddress] = [PciAddress.parse(d) for d in (a.device or [])]
    notes: list[str] = []
    owner = None
    if a.xml:
        dom = parse_domain(read_text(a.xml).encode())
        addrs += [r.address for r in dom.requests]
        if dom.name:
            owner = Owner(name=dom.name, uuid=dom.uuid)
        notes += [f"out of scope ({o.kind}): {o.detail} - not bound by hostdevd" for o in dom.out_of_scope]
        notes += [f"interface type='network' source {n.network!r}: libvirt picks the device at start; "
                  "the hook prepares it then" for n in dom.networks]
    if getattr(a, "owner", None):
        owner = Owner(name=a.owner, uuid=getattr(a, "uuid", None) or (owner.uuid if owner else None))
    return addrs, owner, notes


def cmd_plan(ctx: Context, out: Out) -> int:
    addrs, owner, notes = _requests(ctx)
    owner = owner or Owner(name="plan", kind="manual")
    topo, warnings = ctx.topology()
    ledger = ctx.ledger() if topo.source == "sysfs" else Ledger()
    if ctx.args.release:
        plan = plan_release(topo, owner, ledger, addrs or None)
    else:
        if not addrs:
            raise UsageError("nothing to plan: give a domain XML file or --device BDF")
        if topo.source == "sysfs":      # the pre-flight checks: who holds the devices, power, reset
            topo = with_preflight(topo, ctx.sysfs, groups_of(topo, addrs))
        plan = plan_prepare(topo, addrs, owner, ledger, ctx.engine.policy if topo.source == "sysfs"
                            else Policy.from_config(ctx.config), warnings, net_requests=_net_requests(ctx),
                            driver_models=_driver_models(ctx), guest=_guest(ctx))
    data = plan.to_json()
    data["source"] = topo.source
    if ctx.unparsed is not None:
        data["unparsed"] = ctx.unparsed
    data["notes"] = notes
    print_plan(ctx, data, out, "release plan" if ctx.args.release else "plan")
    return EXIT_OK if plan.ok else EXIT_PROBLEM


def _net_requests(ctx: Context) -> dict[PciAddress, NetRequest]:
    """VF MAC/VLAN from the domain XML's <interface type='hostdev'> (none with --device only)."""
    if not getattr(ctx.args, "xml", None):
        return {}
    return net_requests(parse_domain(read_text(ctx.args.xml).encode()))


def _guest(ctx: Context) -> GuestNuma | None:
    """Where the domain XML pins its vCPUs and memory (the NUMA pre-flight check)."""
    if not getattr(ctx.args, "xml", None):
        return None
    return parse_domain(read_text(ctx.args.xml).encode()).numa


def _driver_models(ctx: Context) -> dict[PciAddress, str]:
    """The vfio driver each <hostdev> of the domain XML names with <driver model=…> (R13)."""
    if not getattr(ctx.args, "xml", None):
        return {}
    return parse_domain(read_text(ctx.args.xml).encode()).driver_models()


def cmd_prepare(ctx: Context, out: Out) -> int:
    addrs, owner, notes = _requests(ctx)
    if owner is None:
        raise UsageError("prepare needs an owner: a domain XML with <name>, or --owner NAME")
    if not addrs:
        raise UsageError("nothing to prepare: give a domain XML file or --device BDF")
    sock = daemon_socket(ctx)
    if sock:
        req = {"op": "prepare", "domain": domain_ref(owner), "origin": "cli"}
        if ctx.args.xml and not ctx.args.device:   # the XML carries VF MAC/VLAN (<interface type='hostdev'>)
            req["xml"] = read_text(ctx.args.xml)
        else:
            req["addresses"] = [str(a) for a in addrs]
        return via_daemon(ctx, sock, req, out, "prepared")
    parsed = parse_domain(read_text(ctx.args.xml).encode()) if ctx.args.xml else None
    try:
        done = ctx.engine.prepare_domain(DomainPrepare(owner, addrs, parsed, origin="cli"))
    except Refused as e:
        plan = ctx.engine.plan_prepare(addrs, owner, driver_models=_driver_models(ctx), guest=_guest(ctx))
        data = plan.to_json()
        data["ok"] = False
        data.setdefault("refusals", e.refusals)
        print_plan(ctx, data, out, "prepare")
        return EXIT_PROBLEM
    assert done.plan is not None and done.result is not None
    data = done.plan.to_json()
    data["result"] = done.result.to_json()
    data["notes"] = notes
    print_plan(ctx, data, out, "prepared")
    return EXIT_OK


def cmd_release(ctx: Context, out: Out) -> int:
    addrs, owner, _ = _requests(ctx)
    if owner is None:
        raise UsageError("release needs an owner: a domain XML with <name>, or --owner NAME")
    sock = daemon_socket(ctx)
    if sock:
        req = {"op": "release", "domain": domain_ref(owner), "origin": "cli"}
        if addrs:
            req["addresses"] = [str(a) for a in addrs]
        return via_daemon(ctx, sock, req, out, "released")
    done = ctx.engine.release_domain(owner, addrs or None)
    assert done.plan is not None and done.result is not None
    data = done.plan.to_json()
    data["result"] = done.result.to_json()
    if not done.plan.groups:
        data["warnings"].append(f"{owner.name} holds no groups")
    print_plan(ctx, data, out, "released")
    return EXIT_OK
