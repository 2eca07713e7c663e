"""The planner: pure rules, no I/O.

topology + requests + ledger + policy -> a :class:`Plan` (ordered steps) or
a refusal that says why and how to fix it. Every rule of
``docs/hostdev-rules.md`` that can be decided before touching the host lives
here (R1 groups, R2 viability and companions, R3 ownership and host-critical
devices, R6 refcounted release, R13 the vfio driver of each device), so most tests aim here.
The plan's values are in :mod:`.plan`.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .address import PciAddress
from .config import Config, DeviceMatcher
from .errors import Reason
from .ledger import Claim, Ledger, Owner
from .netreq import NetRequest
from .plan import HOST_ACTIONS, Caution, GroupPlan, Plan, Refusal, Step, StepAction, held_refusal, refused
from .preflight import judge as judge_preflight
from .states import ClaimState, VfNetState
from .topology import VFIO, Device, Topology
from .variants import DriverChoice, choose_driver, same_driver

if TYPE_CHECKING:
    from .domxml import GuestNuma  # the XML parser (lxml) only for commands that parse XML

__all__ = ["HOST_ACTIONS", "Caution", "GroupPlan", "Plan", "Policy", "Refusal", "Step", "StepAction", "groups_of",
           "held_refusal", "plan_prepare", "plan_release", "refused"]


@dataclass(frozen=True)
class Policy:
    allow: DeviceMatcher = field(default_factory=lambda: DeviceMatcher([]))
    deny: DeviceMatcher = field(default_factory=lambda: DeviceMatcher([]))
    allow_critical: DeviceMatcher = field(default_factory=lambda: DeviceMatcher([]))
    config: Config = field(default_factory=Config)

    @classmethod
    def from_config(cls, cfg: Config) -> Policy:
        return cls(DeviceMatcher(cfg.policy.allow), DeviceMatcher(cfg.policy.deny),
                   DeviceMatcher(cfg.policy.allow_host_critical), cfg)

    def reset_preference(self, dev: Device) -> str:
        return self.config.reset_preference(dev.address, dev.vendor, dev.device)

    def vfio_driver(self, dev: Device) -> str | None:
        return self.config.vfio_driver_for(dev.address, dev.vendor, dev.device)


NO_IOMMU_HINT = ("enable VT-d / AMD-Vi in the firmware and boot with intel_iommu=on (Intel) or "
                 "amd_iommu=on (AMD); `hostdevctl check` verifies")


PER_DEVICE_REFUSALS = 3
"""Up to this many requested devices refused for one reason get one refusal each; more get one
refusal that counts them and names the first few (a domain may name thousands)."""


def _per_request(addresses: list[PciAddress], one: str, many: str, hint: str, code: str) -> list[Refusal]:
    """Refusals of requested devices for one reason: ``one`` says it of a device, ``many`` of several."""
    if len(addresses) <= PER_DEVICE_REFUSALS:
        return [Refusal(str(a), one, hint, code=code) for a in addresses]
    first = ", ".join(map(str, addresses[:PER_DEVICE_REFUSALS]))
    return [Refusal("-", f"{len(addresses):,} requested devices {many}: {first}, \u2026", hint, code=code)]


def _refuse_device(dev: Device, role: str, topo: Topology, policy: Policy,
                   warnings: dict[PciAddress, str]) -> Refusal | None:
    """Host-critical and policy rules for one endpoint that would go to vfio-pci."""
    addr = str(dev.address)
    # "0000:00:1f.2 is host-critical: ..." / "0000:00:1f.2 is a companion in group 11 and host-critical: ..."
    what = "is " if role == "requested" else f"is a companion in group {dev.group} and "
    if policy.deny.matches(dev.address, dev.vendor, dev.device):
        return Refusal(addr, f"{what}denied by policy.deny (vendor:device {dev.vendor_device})",
                       "remove it from policy.deny in /etc/hostdevd/hostdevd.toml to allow passthrough",
                       code=Reason.POLICY_DENY)
    if policy.allow and not policy.allow.matches(dev.address, dev.vendor, dev.device):
        return Refusal(addr, f"{what}not in policy.allow (vendor:device {dev.vendor_device})",
                       "add its address or vendor:device to policy.allow in /etc/hostdevd/hostdevd.toml",
                       code=Reason.POLICY_NOT_ALLOWED)
    reason = topo.critical.get(dev.address) or ("boot VGA (the host console)" if dev.boot_vga else None)
    if reason and not policy.allow_critical.matches(dev.address, dev.vendor, dev.device):
        return Refusal(addr, f"{what}host-critical: {reason}",
                       f"pass another device, or add {addr} to policy.allow_host_critical if the host can "
                       "really do without it", code=Reason.HOST_CRITICAL)
    if dev.sriov_numvfs and role == "companion":
        return Refusal(addr, f"{what}an SR-IOV PF with {dev.sriov_numvfs} VFs enabled; unbinding it "
                       "would destroy them", "the platform lacks ACS between the PF and its VFs; assign the "
                       "whole PF instead, or use a slot with ACS", code=Reason.SRIOV_PF_COMPANION)
    return None


def plan_prepare(topo: Topology, requests: Iterable[PciAddress], owner: Owner, ledger: Ledger,
                 policy: Policy | None = None, class_warnings: dict[PciAddress, str] | None = None,
                 net_requests: dict[PciAddress, NetRequest] | None = None,
                 driver_models: Mapping[PciAddress, str] | None = None, guest: GuestNuma | None = None) -> Plan:
    """Plan moving whole groups to vfio drivers for ``owner`` (all-or-nothing).

    ``net_requests``: MAC/VLAN a domain asks for per VF (``<interface type='hostdev'>``).
    ``driver_models``: the vfio driver a domain names per device (``<driver model=…>``, R13).
    ``guest``: where the domain's vCPUs and memory are pinned (the pre-flight NUMA check). The
    pre-flight rules (:mod:`.preflight`) run when the topology carries their facts.
    """
    policy = policy or Policy()
    plan = Plan("prepare", owner)
    plan.net = {a: r for a, r in (net_requests or {}).items() if r.wants_settings}
    warn = class_warnings or {}
    wanted: dict[int, list[PciAddress]] = {}
    unknown: list[PciAddress] = []
    no_group: list[PciAddress] = []
    bridges: list[PciAddress] = []
    for addr in dict.fromkeys(requests):  # de-duplicate, keep order
        dev = topo.get(addr)
        if dev is None:
            unknown.append(addr)
        elif not topo.iommu_active or dev.group is None:
            no_group.append(addr)
        elif dev.bridge:
            bridges.append(addr)
        else:
            wanted.setdefault(dev.group, []).append(addr)
    plan.refusals += _per_request(unknown, "does not exist on this host", "do not exist on this host",
                                  "`hostdevctl groups` lists the devices and their addresses", Reason.UNKNOWN_DEVICE)
    plan.refusals += _per_request(no_group, "has no IOMMU group: the IOMMU is off or absent",
                                  "have no IOMMU group: the IOMMU is off or absent", NO_IOMMU_HINT, Reason.NO_IOMMU)
    plan.refusals += _per_request(bridges, "is a PCI bridge; bridges are never bound to vfio-pci",
                                  "are PCI bridges; bridges are never bound to vfio-pci",
                                  "pass the endpoint devices behind the bridge instead", Reason.BRIDGE)

    for group, addrs in sorted(wanted.items()):
        gp = GroupPlan(group, requested=list(addrs))
        plan.groups.append(gp)
        holder = ledger.claim_for_group(group)
        gp.takeover = bool(holder and holder.owner.kind == "reservation" and owner.kind != "reservation"
                           and holder.state == ClaimState.ACTIVE)
        if holder and not holder.owner.same(owner) and not gp.takeover:
            plan.refusals.append(held_refusal(str(addrs[0]), group, holder.owner))
        gp.already_held = bool(holder and holder.owner.same(owner))
        for dev in topo.group_members(group):
            a = dev.address
            if dev.bridge:
                gp.skip.append(a)
                continue
            role = "requested" if a in addrs else "companion"
            gp.bind.append(a)
            if role == "companion":
                gp.companions.append(a)
            # The kernel decides, not the ledger: a held device the kernel shows off vfio-pci
            # (a reboot, a host driver took it) is bound again.
            if dev.on_vfio or dev.driver == "pci-stub":
                gp.keep.append(a)
            refusal = _refuse_device(dev, role, topo, policy, warn)
            if refusal:
                plan.refusals.append(refusal)
            elif a in warn:
                plan.warnings.append(f"{a}: {warn[a]}")
            elif dev.boot_vga and a not in gp.keep and not policy.config.host_actions_for(
                    dev.address, dev.vendor, dev.device):
                plan.warnings.append(f"{a} is the boot VGA and no host_actions match it: whatever shows the "
                                     "host console (display manager, fbcon, its driver) still holds it and the "
                                     "bind may hang; add a [[host_actions]] entry that stops and unloads them")
        for a in gp.bind:
            other = ledger.claim_for_device(a)
            if other and other.group != group:
                plan.refusals.append(Refusal(str(a), f"is in group {other.group} in the ledger, but the host now "
                                             f"reports group {group}", "the topology changed; run `hostdevctl check`",
                                             code=Reason.GROUP_CHANGED))
    if not topo.iommu_active and not plan.refusals:
        plan.refusals.append(Refusal("-", "the IOMMU is off or absent", NO_IOMMU_HINT, code=Reason.NO_IOMMU))
    _refuse_net(topo, plan)
    judge_preflight(topo, plan, policy.config, guest)
    drivers = _choose_drivers(topo, plan, policy, driver_models or {})

    planned_actions: set[tuple[str, str]] = set()
    for gp in plan.groups:
        if gp.already_held:
            claim = ledger.claim_for_group(gp.group)
            new = [a for a in gp.requested if claim and a not in claim.requested_pci]
            if new:
                plan.steps.append(Step("update", gp.group, None, "add requested " + ", ".join(map(str, new))))
            for a in gp.bind:                  # held, but the kernel shows it off vfio-pci
                if a not in gp.keep:
                    dev = topo.require(a)
                    plan.steps.append(Step("bind", gp.group, a, f"held, but on {dev.driver or 'no driver'} -> "
                                           f"{drivers[a]}", driver=drivers[a].driver))
            continue
        plan.steps.append(Step("claim", gp.group, None, f"owner {owner.label()}"
                               + (", borrowed from the reservation" if gp.takeover else "")))
        plan.steps += _host_action_steps(topo, gp, policy, planned_actions)
        for a in gp.skip:
            plan.steps.append(Step("skip", gp.group, a, "bridge: left on its driver"))
        for a in gp.bind:                      # R4: VF network settings saved before anything moves
            vf = _vf_netdev(topo, a)
            if vf:
                plan.steps.append(Step("save_net", gp.group, a, f"VF {vf[1]} of {vf[0]}: save MAC, VLAN, "
                                       "spoof-check, trust"))
        for a in gp.bind:
            dev = topo.require(a)
            role = "companion" if a in gp.companions else "requested"
            # A listing rarely says which driver a device has.
            drv = dev.driver or ("driver unknown" if topo.source == "listing" else "no driver")
            if a in gp.keep:
                plan.steps.append(Step("keep", gp.group, a, f"{role}, already on {drv}"))
            else:
                plan.steps.append(Step("bind", gp.group, a, f"{role}, {drv} -> {drivers[a]}", driver=drivers[a].driver))
        for a in gp.bind:
            dev = topo.require(a)
            pref = policy.reset_preference(dev)
            if pref not in ("auto", "none") and a not in gp.keep:
                plan.steps.append(Step("reset", gp.group, a, f"{pref} (after every member is detached)"))
        for a in gp.requested:                 # R4: after bind and reset
            req = plan.net.get(a)
            if req is not None:
                what = ", ".join(f"{k} {v}" for k, v in (("mac", req.mac), ("vlan", req.vlan)) if v is not None)
                plan.steps.append(Step("set_net", gp.group, a, what + (
                    " (libvirt sets them, managed='yes': recorded, verified after start)" if req.managed else "")))
        plan.steps.append(Step("activate", gp.group, None, "persist claim as active"))
    return plan


def _choose_drivers(topo: Topology, plan: Plan, policy: Policy,
                    models: Mapping[PciAddress, str]) -> dict[PciAddress, DriverChoice]:
    """R13: the vfio driver of every member that may move; an override naming no vfio driver
    refuses its device. A member already on a vfio driver stays there (kept as found)."""
    out = {}
    for gp in plan.groups:
        for a in gp.bind:
            dev = topo.require(a)
            out[a] = choice = choose_driver(dev, topo.variants, models.get(a), policy.vfio_driver(dev))
            if choice.refusal is not None:
                plan.refusals.append(Refusal(str(a), choice.refusal, choice.hint, code=Reason.VFIO_DRIVER))
            elif a in gp.keep and choice.source != "default" and not same_driver(dev.driver, choice.driver):
                plan.warnings.append(f"{a} is on {dev.driver or 'no driver'} already and stays there; "
                                     f"{choice} applies when it is next bound")
    return out


def _vf_netdev(topo: Topology, address: PciAddress) -> tuple[str, int] | None:
    """(PF netdev, VF index) of a VF whose PF has a network interface, from the topology."""
    dev = topo.get(address)
    if dev is None or dev.physfn is None:
        return None
    pf = topo.get(dev.physfn)
    if pf is None or not pf.net or dev.address not in pf.virtfns:
        return None
    return pf.net[0], pf.virtfns.index(dev.address)


def _refuse_net(topo: Topology, plan: Plan) -> None:
    """MAC/VLAN can only be set on a VF, through its PF's network interface, one VLAN tag."""
    for a, _req in plan.net.items():
        dev = topo.get(a)
        if dev is None:
            continue
        if dev.physfn is None:
            plan.refusals.append(Refusal(str(a), "is not an SR-IOV VF: MAC/VLAN of <interface type='hostdev'> can "
                                         "only be set on a VF (libvirt refuses it too)",
                                         "use <hostdev> for a whole NIC, or pick a VF", code=Reason.NET_NOT_VF))
        elif _vf_netdev(topo, a) is None and topo.source == "sysfs":
            plan.refusals.append(Refusal(str(a), f"is a VF whose PF {dev.physfn} has no network interface, so its "
                                         "MAC/VLAN cannot be set", "is the PF bound to its network driver?",
                                         code=Reason.NET_NO_PF_NETDEV))


def _host_action_steps(topo: Topology, gp: GroupPlan, policy: Policy,
                       planned: set[tuple[str, str]]) -> list[Step]:
    """Units to stop and modules to unload before the group's devices move (config host_actions).

    Only devices that actually move count (not those kept on vfio-pci or a
    reserved group a domain borrows). Each unit and module appears once per plan.
    """
    if gp.takeover:
        return []
    units: list[tuple[str, float, PciAddress]] = []
    modules: list[tuple[str, float, PciAddress]] = []
    for a in gp.bind:
        if a in gp.keep:
            continue
        dev = topo.require(a)
        for act in policy.config.host_actions_for(dev.address, dev.vendor, dev.device):
            units += [(u, act.timeout, a) for u in act.stop_units]
            modules += [(m, act.timeout, a) for m in act.unload_modules]
    steps = []
    kinds: tuple[tuple[str, StepAction, list[tuple[str, float, PciAddress]]], ...] = (
        ("unit", "stop_unit", units), ("module", "unload_module", modules))
    for kind, action, items in kinds:
        for name, timeout, a in items:
            if (kind, name) in planned:
                continue
            planned.add((kind, name))
            steps.append(Step(action, gp.group, None, f"for {a} (host_actions, timeout {timeout:g} s)",
                              name=name, timeout=timeout))
    return steps


def plan_release(topo: Topology, owner: Owner, ledger: Ledger,
                 addresses: Iterable[PciAddress] | None = None, group: int | None = None) -> Plan:
    """Plan giving ``owner``'s groups back to the host (best effort, refcounted).

    With ``addresses``, only those requested devices are let go; a group goes back
    to the host only when no requested device of it remains held (refcount).
    With ``group``, only that group's claim is considered (reconciliation, vanished devices).
    """
    plan = Plan("release", owner)
    only = set(addresses) if addresses is not None else None
    claims = [c for c in ledger.claims_of(owner) if group is None or c.group == group]
    if only is not None:
        known = {d.pci for c in claims for d in c.devices}
        for a in sorted(only - known):
            holder = ledger.claim_for_device(a)
            why = (f"{a} is held by {holder.owner.label()}, not {owner.label()}" if holder
                   else f"{a} is not held by {owner.label()}")
            plan.warnings.append(why)
    for claim in claims:
        requested = claim.requested_pci
        remaining = [a for a in requested if only is not None and a not in only]
        if only is not None and len(remaining) == len(requested):
            continue  # nothing of this claim is being released
        gp = GroupPlan(claim.group, requested=requested)
        plan.groups.append(gp)
        if remaining:
            plan.keep_claims[claim.group] = remaining
            plan.steps.append(Step("update", claim.group, None,
                                   "still held for " + ", ".join(map(str, remaining)) + "; group stays on vfio-pci"))
            continue
        if claim.reserved and owner.kind != "reservation":
            plan.to_reservation.append(claim.group)
            gp.keep = [d.pci for d in claim.devices]
            _restore_net_steps(plan, claim, topo)
            plan.steps.append(Step("update", claim.group, None,
                                   "back to the reservation; the group stays on vfio-pci"))
            continue
        _plan_restore(plan, gp, claim, topo)
    return plan


def _restore_net_steps(plan: Plan, claim: Claim, topo: Topology) -> None:
    for rec in reversed(claim.devices):        # R6: while the VFs are still on vfio-pci
        cfg = rec.vf_netconfig
        if cfg is not None and cfg.state != VfNetState.SAVED and topo.get(rec.pci) is not None:
            vf = f"VF {cfg.vf_index} of {cfg.pf_netdev}"
            plan.steps.append(Step("restore_net", claim.group, rec.pci, (
                f"{vf}: mac {cfg.mac} vlan {cfg.vlan}" if cfg.state == VfNetState.SET else
                f"{vf}: libvirt restores it; verify mac {cfg.mac} vlan {cfg.vlan}")))


def _plan_restore(plan: Plan, gp: GroupPlan, claim: Claim, topo: Topology) -> None:
    """R6 order: modules back first, VF settings back while still on vfio-pci, devices newest
    first, units started last, then the claim dropped. The executor runs exactly these steps."""
    # Modules first: a device can only go back to a driver that is loaded.
    for act in reversed(claim.host_actions):
        if act.kind == "module":
            plan.steps.append(Step("load_module", claim.group, None, "unloaded for this group: back before the devices",
                                   name=act.name, timeout=act.timeout))
    _restore_net_steps(plan, claim, topo)
    for rec in reversed(claim.devices):
        a = rec.pci
        dev = topo.get(a)
        gp.bind.append(a)
        if rec.role == "companion":
            gp.companions.append(a)
        if dev is None:
            plan.steps.append(Step("drop", claim.group, a, "device is gone (hot-unplugged)"))
        elif not rec.bound_by_us:
            gp.keep.append(a)
            plan.steps.append(Step("keep", claim.group, a,
                                   f"was on {rec.original_driver or 'no driver'} before hostdevd: left there"))
        else:
            target = rec.original_driver or "no driver"
            extra = f", driver_override {rec.original_override!r}" if rec.original_override else ""
            plan.steps.append(Step("restore", claim.group, a, f"{rec.vfio_driver or VFIO} -> {target}{extra}"))
    for dev in topo.group_members(claim.group):
        if dev.bridge:
            gp.skip.append(dev.address)
    users = topo.group_users.get(claim.group, 0)
    if users:
        plan.warnings.append(f"group {claim.group}: /dev/vfio/{claim.group} or a member's /dev/vfio/devices/vfioN "
                             f"is still open ({users} users); release waits for QEMU to close it")
    for act in reversed(claim.host_actions):
        if act.kind == "unit":
            plan.steps.append(Step("start_unit", claim.group, None, "stopped for this group: started after the devices",
                                   name=act.name, timeout=act.timeout))
    plan.steps.append(Step("drop", claim.group, None, "remove claim from ledger"))


def groups_of(topo: Topology, addrs: Iterable[PciAddress]) -> set[int]:
    return {d.group for a in addrs if (d := topo.get(a)) is not None and d.group is not None}
