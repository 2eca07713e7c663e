"""hostdevctl's read-only views: groups (the host's IOMMU groups; --json is the versioned inventory,
core/inventory.py), status (the ledger), check (the host)."""
from __future__ import annotations

import json
from pathlib import Path

from ..core.address import PciAddress
from ..core.assignable import group_verdicts
from ..core.checks import run_checks
from ..core.inventory import add_inventory
from ..core.ledger import Ledger
from ..core.ledger_store import LedgerHealth, LedgerStore
from ..core.planner import Policy
from ..core.states import ClaimState, HostActionState
from ..core.topology import Topology
from ..core.variants import DriverChoice, choose_driver
from .cli_common import EXIT_OK, EXIT_PROBLEM, Context, Out, daemon_socket, table


def _owner_label(ledger: Ledger, addr: PciAddress) -> str | None:
    claim = ledger.claim_for_device(addr)
    if claim is None:
        return "reserved" if str(addr) in ledger.reservations else None
    label = "reserved" if claim.owner.kind == "reservation" else claim.owner.name
    if claim.reserved and claim.owner.kind != "reservation":
        label += " (reserved)"
    return label if claim.state == ClaimState.ACTIVE else f"{label} ({claim.state})"


def _vfio_choices(ctx: Context, topo: Topology) -> dict[PciAddress, DriverChoice]:
    """R13: the vfio driver each endpoint would be bound to (modules.alias, [vfio_drivers]); the live
    host only (a listing or snapshot has no modalias, and needs no config)."""
    if topo.source != "sysfs":
        return {}
    cfg = ctx.config
    return {d.address: choose_driver(d, topo.variants, None, cfg.vfio_driver_for(d.address, d.vendor, d.device))
            for d in topo.devices.values() if not d.bridge}


def _inventory(ctx: Context, topo: Topology, ledger: Ledger, data: dict) -> dict:
    """The hostdevd-inventory/1 keys (core/inventory.py); sysfs facts from the live host only."""
    for d in data["ungrouped"]:        # every device has an owner key in /1 (a reservation may name one)
        d["owner"] = _owner_label(ledger, PciAddress.parse(d["address"]))
    facts = ({a: ctx.sysfs.device_facts(a, d.vendor, d.device) for a, d in topo.devices.items()}
             if topo.source == "sysfs" else {})
    return add_inventory(data, topo, ledger, group_verdicts(topo, Policy.from_config(ctx.config)), facts)


def cmd_groups(ctx: Context, out: Out) -> int:
    topo, _ = ctx.topology()
    ledger = ctx.ledger() if topo.source == "sysfs" else Ledger()
    choices = _vfio_choices(ctx, topo)
    data = topo.to_json()
    if ctx.unparsed is not None:
        data["unparsed"] = ctx.unparsed
    for g in data["groups"]:
        for d in g["devices"]:
            d["owner"] = _owner_label(ledger, PciAddress.parse(d["address"]))
            if (c := choices.get(PciAddress.parse(d["address"]))) is not None:
                d["vfio_driver"], d["vfio_driver_from"] = c.driver, c.source
                if c.refusal:
                    d["vfio_driver_refused"] = c.refusal
    if ctx.args.json or ctx.args.save:
        data = _inventory(ctx, topo, ledger, data)
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
        if (c := choices.get(addr)) is not None and c.refusal:
            notes.append("vfio driver override refused")
        elif c is not None and c.source != "default":
            notes.append(f"vfio: {c}")
        rows.append([group, d["address"], d["class"], f"{d['vendor']}:{d['device']}",
                     d.get("driver") or ("" if topo.source == "listing" else "-"),
                     _owner_label(ledger, addr), ", ".join(notes), d.get("name") or ""])
    headers = ["GROUP", "ADDRESS", "CLASS", "VENDOR:DEV", "DRIVER", "OWNER", "NOTE", "NAME"]
    if topo.source != "listing":
        headers, rows = headers[:-1], [r[:-1] for r in rows]
    out(table(headers, rows))
    if not topo.iommu_active:
        out("")
        out("No IOMMU groups: the IOMMU is off or absent on this host, so no device can be passed through.")
        out("Enable VT-d / AMD-Vi in the firmware and boot with intel_iommu=on (or amd_iommu=on); "
            "`hostdevctl check` explains.")
        return EXIT_PROBLEM
    return EXIT_OK


def cmd_status(ctx: Context, out: Out) -> int:
    ledger = ctx.ledger()
    drift = _daemon_drift(ctx)
    if ctx.args.json:
        data = json.loads(ledger.model_dump_json())
        data["drift"] = drift   # the ledger plus what the daemon saw through udev ([] without a daemon)
        out(json.dumps(data, indent=2))
        return EXIT_OK
    rows = []
    for _, c in sorted(ledger.claims.items(), key=lambda kv: int(kv[0])):
        for dev in c.devices:
            rows.append([c.group, c.owner.label(), c.state, dev.address, dev.role, dev.state,
                         dev.original_driver or "none", dev.original_override or ""])
    if not rows:
        out("no claims: every device is with the host")
        return EXIT_OK
    out(table(["GROUP", "OWNER", "CLAIM", "ADDRESS", "ROLE", "STATE", "ORIG DRIVER", "ORIG OVERRIDE"], rows))
    for c in ledger.claims.values():
        for n in c.notes:
            out(f"group {c.group}: {n}")
        if c.host_actions:
            out(f"group {c.group}: host actions undone at release: " + ", ".join(
                f"{'stopped' if a.kind == 'unit' else 'unloaded'} {a.name}"
                + (" (pending)" if a.state == HostActionState.PENDING else "") for a in c.host_actions))
    for d in drift:
        out(f"DRIFT: {d['address']} (group {d['group']}, {d['owner']}) is on {d['driver'] or 'no driver'}, "
            f"not {d['expected']}, since {d['since']}: changed behind hostdevd's back, left as it is")
    return EXIT_OK


def _daemon_drift(ctx: Context) -> list[dict]:
    """Drift the daemon saw through udev (empty without a daemon)."""
    from . import wire
    sock = daemon_socket(ctx)
    if not sock:
        return []
    try:
        return wire.call(sock, {"op": "status"}, timeout=10).get("drift") or []
    except wire.WireError:
        return []


def _libvirt_iommufd(uri: str) -> bool | None:
    """Whether libvirt's domain capabilities offer iommufd hostdevs; None: libvirt not asked."""
    try:
        from ..adapters.libvirt_caps import domain_capabilities
    except ImportError:                  # no libvirt-python here
        return None
    from ..core.domcaps import advertises_iommufd  # the XML parser only for `check`
    xml = domain_capabilities(uri)
    return advertises_iommufd(xml) if xml is not None else None


def cmd_check(ctx: Context, out: Out) -> int:
    try:
        health: LedgerHealth | None = LedgerStore(ctx.config.state_dir).inspect()
    except PermissionError:
        health = None                  # not root: show the host without owners
    results = run_checks(ctx.sysfs, health.ledger if health is not None else Ledger(), ctx.config.policy.critical,
                         health=health, libvirt_iommufd=_libvirt_iommufd(ctx.config.libvirt_uri))
    failed = any(r.status == "fail" for r in results)
    if ctx.args.json:
        out(json.dumps({"ok": not failed, "checks": [r.to_json() for r in results]}, indent=2))
    else:
        for r in results:
            out(f"{r.status.upper():<5} {r.name:<22} {r.message}")
            if r.hint and r.status != "ok":
                out(f"      fix: {r.hint}")
    return EXIT_PROBLEM if failed else EXIT_OK
