"""hostdevctl export nova|kubevirt: passthrough config for OpenStack Nova or KubeVirt.

core/export.py decides what is offered and why the rest is left out; this module prints it.

* nova: the ``[pci]`` section of nova.conf, ``device_spec`` and ``alias`` lines of one JSON dict
  each (multi-valued options), as https://docs.openstack.org/nova/latest/admin/pci-passthrough.html
  and https://docs.openstack.org/nova/latest/configuration/config.html#pci show them.
* kubevirt: the ``permittedHostDevices`` block of the KubeVirt CR's ``spec.configuration``, as
  https://kubevirt.io/user-guide/virtual_machines/host-devices/ shows it. Written by hand: a few
  fixed keys, values from a fixed alphabet (hex ids, qualified names), always double-quoted, so no
  YAML library is needed.

Whatever is left out is a ``#`` comment naming the device and the reason, in both formats.
"""
from __future__ import annotations

import json

from ..core.errors import UsageError
from ..core.export import DOMAIN_RE, Offer, PciHostDevice, kubevirt, nova, offer
from ..core.ledger import Ledger
from ..core.planner import Policy
from ..core.topology import Topology
from ..core.variants import choose_driver
from .cli_common import EXIT_OK, EXIT_PROBLEM, Context, Out


def _one_line(text: str) -> str:
    return " ".join(text.split())       # a reason must not end the comment early


def _left_out_comments(o: Offer) -> list[str]:
    lines = [f"# left out: {lo.address} ({lo.vendor_device}): {_one_line(lo.reason)}" for lo in o.left_out]
    if o.bridge_groups:
        lines.append("# groups of PCI bridges only, which stay with the host: "
                     + ", ".join(map(str, o.bridge_groups)))
    return lines


def _print_nova(o: Offer, topo: Topology, out: Out) -> None:
    specs, aliases = nova(o)
    out(f"# hostdevctl export nova ({topo.source}): [pci] of nova.conf on this compute node; the alias")
    out("# lines also go to nova-api's. Each device_spec is the only endpoint of its IOMMU group:")
    out("# hostdevd's hook moves the group to vfio when libvirt starts the instance.")
    out("[pci]")
    for s in specs:
        out(f"device_spec = {json.dumps(s)}")
    for a in aliases:
        out(f"alias = {json.dumps(a)}")
    for d in o.offered:
        if d.held_by:
            out(f"# {d.address} is held by {_one_line(d.held_by)} now: an instance given it is refused "
                "until that lets go")
    for line in _left_out_comments(o):
        out(line)


def _variant_notes(ctx: Context, topo: Topology, entries: list[PciHostDevice]) -> list[str]:
    """KubeVirt's device plugin lists only functions on vfio-pci itself, not a variant driver (R13)."""
    if topo.source != "sysfs":
        return []
    notes = []
    for addr in [a for e in entries for a in e.addresses]:
        dev = topo.require(addr)
        choice = choose_driver(dev, topo.variants, None, ctx.config.vfio_driver_for(dev.address, dev.vendor,
                                                                                   dev.device))
        if choice.driver != "vfio-pci" and choice.refusal is None:
            notes.append(f"# note: hostdevd binds {addr} to {choice}; KubeVirt takes only functions on "
                         f"vfio-pci: name vfio-pci for {dev.vendor_device} under [vfio_drivers]")
    return notes


def _print_kubevirt(ctx: Context, o: Offer, topo: Topology, domain: str | None, out: Out) -> None:
    entries, notes = kubevirt(o, topo, domain)
    out(f"# hostdevctl export kubevirt ({topo.source}): goes under spec.configuration of the KubeVirt CR")
    out("# (kubectl edit kubevirt -n kubevirt). KubeVirt assigns only functions already on vfio-pci: list")
    out("# them under reserve in /etc/hostdevd/hostdevd.toml and hostdevd binds them at start.")
    for n in notes:
        out(f"# {_one_line(n)}")
    for line in _variant_notes(ctx, topo, entries) + _left_out_comments(o):
        out(line)
    out("permittedHostDevices:")
    if not entries:
        out("  pciHostDevices: []")
        return
    out("  pciHostDevices:")
    for e in entries:
        out(f'  - pciVendorSelector: "{e.selector}"')
        out(f'    resourceName: "{e.resource_name}"')
        out("    externalResourceProvider: false")


def cmd_export(ctx: Context, out: Out) -> int:
    topo, _ = ctx.topology()
    ledger = ctx.ledger() if topo.source == "sysfs" else Ledger()
    names = ({a: ctx.sysfs.pci_ids().names(d.vendor, d.device)[1] for a, d in topo.devices.items()}
             if topo.source == "sysfs" else {})
    o = offer(topo, ledger, Policy.from_config(ctx.config), names)
    target = ctx.args.target
    domain = ctx.args.resource_domain
    if domain is not None and not DOMAIN_RE.match(domain):
        raise UsageError(f"--resource-domain {domain!r} is not a DNS subdomain", "give one like example.com")
    if ctx.args.json:
        data: dict = {"target": target, "source": topo.source,
                      "left_out": [{"address": str(lo.address), "vendor_device": lo.vendor_device,
                                    "reason": lo.reason} for lo in o.left_out],
                      "bridge_groups": o.bridge_groups}
        if target == "nova":
            data["device_spec"], data["alias"] = nova(o)
            data["held"] = {str(d.address): d.held_by for d in o.offered if d.held_by}
        else:
            entries, notes = kubevirt(o, topo, domain)
            data["pciHostDevices"] = [{"pciVendorSelector": e.selector, "resourceName": e.resource_name,
                                       "externalResourceProvider": False} for e in entries]
            data["not_permitted"] = notes
        out(json.dumps(data, indent=2))
    elif target == "nova":
        _print_nova(o, topo, out)
    else:
        _print_kubevirt(ctx, o, topo, domain, out)
    return EXIT_OK if topo.iommu_active else EXIT_PROBLEM
