"""Pre-flight checks: refuse a bind that would hang or fail, warn about what a guest will suffer.

Facts (:func:`gather`, through :class:`~hostdevd.core.sysfs.Sysfs` and its /proc scan) go into
the topology (``Topology.preflight``); the rules (:func:`judge`) are pure and run inside the
planner, so ``hostdevctl plan``, ``prepare``, the hook and the daemon say the same thing:

* a process holding a device that would move (its ``/dev/dri`` node, ``/dev/nvidiaN``, its
  sysfs ``resource*``/``config``/``rom`` files open or mmapped) refuses the bind, naming the
  processes (``nvidia-persistenced[812]``), unless every holder's systemd unit is one the
  matching ``[[host_actions]]`` stop first (then a warning); an unclaimed group whose
  ``/dev/vfio/N`` or device cdev someone holds refuses too (R16, R14);
* D3cold or an unreadable config space: the bind may fail (warning);
* no reset method: state can leak from one guest to the next (warning);
* a domain pinned (vCPUs, memory) to other NUMA nodes than its device (warning);
* a /proc scan that could not see everything says so (warning): holders may be missed.

Codes: :class:`~hostdevd.core.errors.Reason`.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from .address import PciAddress
from .config import Config
from .cpuset import format_cpuset
from .errors import Reason
from .plan import Caution, Plan, Refusal
from .procfs import Holder

if TYPE_CHECKING:
    from .domxml import GuestNuma
    from .sysfs import Sysfs
    from .topology import Device, Topology

D3COLD = "D3cold"
CONFIG_TOML = "/etc/hostdevd/hostdevd.toml"


@dataclass(frozen=True)
class DeviceHealth:
    power_state: str | None = None
    config_readable: bool = True
    numa_node: int | None = None
    holders: tuple[Holder, ...] = ()
    suspects: tuple[Holder, ...] = ()     # hold the nvidia driver's nodes; which GPU is unknown
    nvidia_minor_unknown: bool = False


@dataclass
class Preflight:
    devices: dict[PciAddress, DeviceHealth] = field(default_factory=dict)
    vfio_holders: dict[int, tuple[Holder, ...]] = field(default_factory=dict)   # group -> who holds its nodes
    node_cpus: dict[int, frozenset[int]] = field(default_factory=dict)
    scan_note: str | None = None           # why the /proc scan may have missed holders
    processes: int = 0                     # processes the scan looked at


def gather(sysfs: Sysfs, addresses: Iterable[PciAddress], vfio_groups: Iterable[int] = (),
           members: dict[int, list[PciAddress]] | None = None) -> Preflight:
    """The facts for ``addresses`` (power, config, NUMA node, holders) and the holders of each of
    ``vfio_groups``' vfio nodes, in one pass over /proc."""
    addrs = list(dict.fromkeys(addresses))
    nodes = [sysfs.device_nodes(a) for a in addrs]
    vfio = {g: sysfs.vfio_node_paths(g, (members or {}).get(g, [])) for g in vfio_groups}
    scan = sysfs.scan_holders(nodes, vfio)
    pf = Preflight(node_cpus=sysfs.numa_nodes(), processes=scan.processes,
                   scan_note=None if scan.complete else scan.incomplete_text())
    nvidia_any = tuple(scan.holders.get(("nvidia-any",), ()))
    for a, n in zip(addrs, nodes, strict=True):
        pf.devices[a] = DeviceHealth(
            power_state=sysfs.power_state(a), config_readable=sysfs.config_readable(a), numa_node=sysfs.numa_node(a),
            holders=tuple(scan.holders.get(("dev", a, False), ())),
            suspects=nvidia_any if n.nvidia_any else (), nvidia_minor_unknown=n.nvidia_any)
    for g in vfio:
        if scan.holders.get(("vfio", g)):
            pf.vfio_holders[g] = tuple(scan.holders[("vfio", g)])
    return pf


def with_preflight(topo: Topology, sysfs: Sysfs, groups: Iterable[int]) -> Topology:
    """``topo`` with the pre-flight facts of every endpoint of ``groups`` (a live host only)."""
    if topo.source != "sysfs":
        return topo
    groups = sorted(set(groups))
    members = {g: [d.address for d in topo.group_members(g)] for g in groups}
    endpoints = [d.address for g in groups for d in topo.group_members(g) if not d.bridge]
    open_groups = [g for g in groups if topo.group_users.get(g)]
    return replace(topo, preflight=gather(sysfs, endpoints, open_groups, members))


# ----------------------------------------------------------------------------- texts


def holders_text(holders: Iterable[Holder]) -> str:
    """"nvidia-persistenced[812] (/dev/nvidia0), Xorg[1020] (/dev/dri/card0, mmapped resource0)"."""
    by_pid: dict[tuple[int, str], list[str]] = {}
    for h in holders:
        what = h.path if h.via == "fd" else f"{h.path} mmapped"
        by_pid.setdefault((h.pid, h.comm), []).append(what)
    return ", ".join(f"{comm}[{pid}] ({', '.join(sorted(set(p)))})" for (pid, comm), p in sorted(by_pid.items()))


def _labels(holders: Iterable[Holder]) -> list[str]:
    return list(dict.fromkeys(h.label for h in holders))


def holder_hint(holders: Iterable[Holder], match: str) -> str:
    """Stop them, or name their units in a ``[[host_actions]]`` entry so hostdevd stops them."""
    holders = list(holders)
    units = sorted({h.unit for h in holders if h.unit})
    loose = _labels(h for h in holders if not h.unit)
    example = ", ".join(f'"{u}"' for u in units) or '"display-manager.service"'
    hint = (f"stop {', '.join(_labels(holders))} first, or let hostdevd do it before the bind: "
            f"host_actions.stop_units in {CONFIG_TOML} ([[host_actions]] match = \"{match}\", "
            f"stop_units = [{example}])")
    if loose:
        hint += f"; not in a system service: {', '.join(loose)} (end them, or stop what starts them)"
    return hint


def _stopped_by_host_actions(holders: tuple[Holder, ...], dev: Device, config: Config) -> bool:
    units = {u for act in config.host_actions_for(dev.address, dev.vendor, dev.device) for u in act.stop_units}
    return bool(holders) and all(h.unit and (h.unit in units or h.unit.removesuffix(".service") in units)
                                 for h in holders)


def _nodes_text(nodes: Iterable[int]) -> str:
    nodes = sorted(nodes)
    return ("node " if len(nodes) == 1 else "nodes ") + ", ".join(map(str, nodes))


# ----------------------------------------------------------------------------- the rules


def judge(topo: Topology, plan: Plan, config: Config, guest: GuestNuma | None = None) -> None:
    """Add the pre-flight refusals, cautions and NUMA nodes to a prepare ``plan`` (pure)."""
    pf = topo.preflight
    if pf is None:
        return
    looked = False
    for gp in plan.groups:
        if not gp.already_held and pf.vfio_holders.get(gp.group):
            who = pf.vfio_holders[gp.group]
            plan.refusals.append(Refusal(
                str(gp.requested[0]) if gp.requested else "-",
                f"is in IOMMU group {gp.group}, whose vfio nodes are held open by {holders_text(who)}, "
                "a user hostdevd did not give the group to",
                f"stop {', '.join(_labels(who))} (a guest started by hand or by another tool), then start again",
                code=Reason.VFIO_IN_USE))
        for a in gp.bind:
            h = pf.devices.get(a)
            dev = topo.get(a)
            if h is None or dev is None:
                continue
            looked = True
            if h.numa_node is not None:
                plan.numa[a] = h.numa_node
            if not (gp.already_held and a in gp.keep):
                _judge_holders(plan, gp.group, a in gp.companions, dev, h, config)
            addr = str(a)
            if h.power_state == D3COLD:
                plan.cautions.append(Caution(Reason.POWER_D3COLD, addr, "is in D3cold (power_state): the device "
                                             "must wake before the bind, which may fail or hang",
                                             "check the slot's power and runtime PM (power/control = on)"))
            if not h.config_readable:
                plan.cautions.append(Caution(Reason.CONFIG_UNREADABLE, addr, "has a config space that cannot be "
                                             "read (or reads all ones): the bind may fail",
                                             "check `lspci -vvv -s " + addr + "` and dmesg; the device may be "
                                             "powered off or gone from the bus"))
            if not dev.reset_method and not dev.has_reset:
                plan.cautions.append(Caution(Reason.NO_RESET_METHOD, addr, "has no reset method (reset_method is "
                                             "empty): its state can leak from one guest to the next",
                                             "pass it only to guests that trust each other, or power-cycle the "
                                             "host between owners"))
        for a in gp.requested:
            h = pf.devices.get(a)
            if h is not None and h.numa_node is not None and guest is not None:
                _judge_numa(plan, a, h.numa_node, guest, pf.node_cpus)
    if looked and pf.scan_note:
        plan.cautions.append(Caution(Reason.PROC_SCAN_INCOMPLETE, "-", f"the scan of /proc for processes holding "
                                     f"the devices was incomplete ({pf.scan_note}): a holder may be missed",
                                     "run as root (the daemon does)"))
    plan.warnings += [str(c) for c in plan.cautions]


def _judge_holders(plan: Plan, group: int, companion: bool, dev: Device, h: DeviceHealth, config: Config) -> None:
    addr = str(dev.address)
    what = f"is a companion in group {group} and " if companion else "is "
    for holders, code, reason in (
            (h.holders, Reason.DEVICE_IN_USE, f"{what}held by {holders_text(h.holders)}: unbinding its driver "
                                              "would hang or fail while they hold it"),
            (h.suspects, Reason.DEVICE_MAYBE_IN_USE,
             f"{what}on the nvidia driver, and {holders_text(h.suspects)} hold the driver's nodes; which GPU "
             f"they use is unknown (no /proc/driver/nvidia/gpus/{addr}/information)")):
        if not holders:
            continue
        if _stopped_by_host_actions(holders, dev, config):
            plan.cautions.append(Caution(Reason.IN_USE_STOPPED_BY_HOST_ACTIONS, addr,
                                         f"is held by {holders_text(holders)}, whose units host_actions stop "
                                         "before the bind"))
            continue
        plan.refusals.append(Refusal(addr, reason, holder_hint(holders, dev.vendor_device), code=code))


def _judge_numa(plan: Plan, a: PciAddress, node: int, guest: GuestNuma,
                node_cpus: dict[int, frozenset[int]]) -> None:
    off = []
    if guest.cpus is not None and node_cpus:
        cpu_nodes = {n for n, cpus in node_cpus.items() if cpus & guest.cpus}
        if cpu_nodes and node not in cpu_nodes:
            off.append(f"its vCPUs are pinned to {_nodes_text(cpu_nodes)} (host CPUs {format_cpuset(guest.cpus)})")
    if guest.memory_nodes is not None and node not in guest.memory_nodes:
        off.append(f"its memory is bound to {_nodes_text(guest.memory_nodes)} (<numatune>)")
    if not off:
        return
    local = format_cpuset(node_cpus[node]) if node in node_cpus else "?"
    plan.cautions.append(Caution(
        Reason.NUMA_MISMATCH, str(a),
        f"is on NUMA node {node}, but the guest is not: {' and '.join(off)}; DMA and interrupts cross nodes",
        f"pin the vCPUs to node {node}'s CPUs ({local}) and set <numatune><memory nodeset='{node}'/>, "
        f"or pass a device on the guest's node"))
