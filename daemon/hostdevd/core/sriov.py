"""SR-IOV provisioning (R11): create a PF's VFs, wait for them, record them.

Three layers, like the rest of the core:

* :func:`plan_vfs` is pure: topology + ledger + what is wanted -> a :class:`VfPlan`
  (the writes to make) or refusals that say why. It refuses to change ``sriov_numvfs``
  while any VF (or the PF) is held by a domain or the reservation, naming them, and
  while QEMU has a VF's group open behind hostdevd's back.
* :meth:`Executor.apply_vf_plan <hostdevd.executor.Executor.apply_vf_plan>` makes the
  writes (the executor stays the only writer): intent in the ledger first (``changing``),
  ``sriov_drivers_autoprobe``, ``sriov_numvfs`` through 0, then it waits for the VFs with a
  ``VfWaiter`` and records them (``ready``).
* Waiting is injectable (:class:`hostdevd.core.vf_wait.VfWaiter`):
  :class:`hostdevd.adapters.udev.UdevWaiter` listens to udev (pyudev, subsystem ``pci``,
  action ``add``: the same events ``udevadm settle`` waits for) and is what the daemon
  uses on a real host; :class:`hostdevd.core.vf_wait.SysfsPollWaiter` polls sysfs and is
  what the simulated kernel and tests use. A watch is opened *before* the write so no
  event is missed.

Kernel facts (drivers/pci/iov.c): ``sriov_numvfs`` only changes through 0 (N -> M with both
non-zero is EBUSY); a PF without a driver (or whose driver has no ``sriov_configure``)
answers ENOENT; the write returns once the VFs are added, but udev (naming, rules,
libvirt's node devices) follows later. Real NICs are slow: i40e takes 22 s for 64 VFs,
ixgbe over 60 s, hence the per-PF ``wait_timeout`` that also bounds the write itself.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from .address import PciAddress
from .config import SriovConfig
from .errors import HostdevError, InvalidAddress, Refused
from .ledger import Ledger, Owner
from .logfields import log_action
from .topology import Device, Topology

if TYPE_CHECKING:
    from .engine import Engine
    from .planner import Policy, Refusal

log = logging.getLogger("hostdevd.sriov")


# --------------------------------------------------------------------------- plan (pure)


# One write of a VfPlan: ("autoprobe", bool) | ("numvfs", n) | ("wait", n).
VfStep = tuple[Literal["autoprobe", "numvfs", "wait"], int]


@dataclass
class VfPlan:
    pf: str                               # PF address
    pf_ref: str                           # what the user named (address or netdev)
    current: int | None                   # sriov_numvfs now
    wanted: int
    autoprobe_now: bool | None
    autoprobe: bool
    totalvfs: int | None = None
    steps: list[VfStep] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    hint: str = ""
    holders: list[dict] = field(default_factory=list)   # who holds VFs: {"address", "owner", "kind", "group"}

    @property
    def ok(self) -> bool:
        return not self.refusals

    @property
    def noop(self) -> bool:
        return self.ok and not self.steps

    def to_json(self) -> dict:
        return {"pf": self.pf, "pf_ref": self.pf_ref, "current": self.current, "wanted": self.wanted,
                "autoprobe_now": self.autoprobe_now, "autoprobe": self.autoprobe, "totalvfs": self.totalvfs,
                "steps": [{"write": k, "value": v} for k, v in self.steps], "ok": self.ok,
                "refusals": self.refusals, "hint": self.hint, "holders": self.holders}

    def describe(self) -> list[str]:
        out = []
        for k, v in self.steps:
            if k == "autoprobe":
                out.append(f"write {int(bool(v))} to {self.pf}/sriov_drivers_autoprobe")
            elif k == "numvfs":
                out.append(f"write {v} to {self.pf}/sriov_numvfs")
            else:
                out.append(f"wait for {v} VFs (udev)")
        return out


def resolve_pf(topo: Topology, ref: str) -> Device | None:
    """The PF a config entry names: a PCI address, or a netdev name the topology lists."""
    try:
        return topo.get(PciAddress.parse(ref))
    except InvalidAddress:
        pass
    for dev in topo.devices.values():
        if ref in dev.net:
            return dev
    return None


def vfs_of(topo: Topology, pf: Device) -> list[Device]:
    return [d for a in pf.virtfns if (d := topo.get(a)) is not None]


def plan_vfs(topo: Topology, ledger: Ledger, pf_ref: str, numvfs: int, autoprobe: bool | None) -> VfPlan:
    """Decide the writes that give ``pf_ref`` ``numvfs`` VFs with ``autoprobe`` (None: keep the
    PF's current setting); or refuse."""
    pf = resolve_pf(topo, pf_ref)
    if pf is None:
        plan = VfPlan(pf_ref, pf_ref, None, numvfs, None, bool(autoprobe))
        plan.refusals.append(f"no PCI device or network interface {pf_ref!r} on this host")
        plan.hint = "check the address with `hostdevctl groups` or the interface with `ip link`"
        return plan
    if autoprobe is None:
        autoprobe = bool(pf.sriov_drivers_autoprobe) if pf.sriov_drivers_autoprobe is not None else False
    addr = str(pf.address)
    plan = VfPlan(addr, pf_ref, pf.sriov_numvfs, numvfs, pf.sriov_drivers_autoprobe, autoprobe,
                  pf.sriov_totalvfs)
    if pf.physfn is not None:
        plan.refusals.append(f"{addr} is itself a VF (of {pf.physfn}); VFs are created on the PF")
        plan.hint = f"configure {pf.physfn} instead"
        return plan
    if pf.sriov_totalvfs is None:
        plan.refusals.append(f"{addr} [{pf.vendor_device}] has no SR-IOV capability (no sriov_totalvfs)")
        plan.hint = "pick the PF of an SR-IOV capable device (`lspci -vs` shows 'Single Root I/O Virtualization')"
        return plan
    if numvfs > pf.sriov_totalvfs:
        plan.refusals.append(f"{addr} supports at most {pf.sriov_totalvfs} VFs (sriov_totalvfs), not {numvfs}")
        plan.hint = f"ask for {pf.sriov_totalvfs} or fewer"
        return plan
    if numvfs and pf.driver is None:
        plan.refusals.append(f"{addr} has no driver, so the kernel cannot enable its VFs (sriov_numvfs is ENOENT)")
        plan.hint = "load the PF's driver (e.g. `modprobe igb`) and bind it first"
        return plan
    if pf.on_vfio and (claim := ledger.claim_for_device(pf.address)) is not None:
        plan.refusals.append(f"{addr} itself is assigned to {claim.owner.kind} {claim.owner.label()}")
        plan.hint = f"release {claim.owner.name} first"
        return plan

    recreate = bool(pf.sriov_numvfs) and numvfs == pf.sriov_numvfs and \
        pf.sriov_drivers_autoprobe is not None and pf.sriov_drivers_autoprobe != autoprobe
    changes_vfs = (pf.sriov_numvfs or 0) != numvfs or recreate
    if changes_vfs and pf.sriov_numvfs:
        _refuse_if_assigned(topo, ledger, pf, plan)
        if not plan.ok:
            return plan
    if pf.sriov_drivers_autoprobe != autoprobe:
        plan.steps.append(("autoprobe", autoprobe))
    if changes_vfs:
        if pf.sriov_numvfs:
            plan.steps.append(("numvfs", 0))
        if numvfs:
            plan.steps.append(("numvfs", numvfs))
            plan.steps.append(("wait", numvfs))
    return plan


def _refuse_if_assigned(topo: Topology, ledger: Ledger, pf: Device, plan: VfPlan) -> None:
    """R11: never change the VF count under a domain (or a reservation, or an unknown QEMU)."""
    held, busy = [], []
    for vf in vfs_of(topo, pf):
        claim = ledger.claim_for_device(vf.address)
        if claim is not None:
            who = "the reservation" if claim.owner.kind == "reservation" else \
                f"{claim.owner.kind} {claim.owner.label()}"
            held.append(f"{vf.address} to {who}")
            plan.holders.append({"address": str(vf.address), "owner": claim.owner.name,
                                 "kind": claim.owner.kind, "group": claim.group})
        elif vf.on_vfio and vf.group is not None and topo.group_users.get(vf.group):
            busy.append(f"{vf.address} (/dev/vfio/{vf.group} or its /dev/vfio/devices/vfioN is open: a QEMU "
                        "hostdevd does not know about)")
    if held or busy:
        owners = sorted({h["owner"] for h in plan.holders})
        plan.refusals.append(
            f"cannot change {plan.pf} from {pf.sriov_numvfs} to {plan.wanted} VFs while VFs are assigned: "
            + "; ".join(held + busy))
        plan.hint = ("stop or release " + ", ".join(owners) if owners else
                     "stop the VM using it") + ", then set the VF count again"


# --------------------------------------------------------------------------- apply


@dataclass
class VfResult:
    pf: str
    numvfs: int
    vfs: list[str] = field(default_factory=list)
    seconds: float | None = None          # writing N to sriov_numvfs until udev announced every VF
    remove_seconds: float | None = None   # writing 0 (the kernel removes the old VFs synchronously)
    waiter: str = ""
    notes: list[str] = field(default_factory=list)
    changed: bool = False

    def to_json(self) -> dict:
        return {"pf": self.pf, "numvfs": self.numvfs, "vfs": self.vfs, "seconds": self.seconds,
                "remove_seconds": self.remove_seconds, "waiter": self.waiter, "notes": self.notes,
                "changed": self.changed}


# --------------------------------------------------------------------------- config


def entry_for(engine: Engine, pf_ref: str) -> SriovConfig | None:
    """The ``[[sriov]]`` entry naming the same PF as ``pf_ref`` (by address or netdev)."""
    topo = engine.topology(with_critical=False)
    dev = resolve_pf(topo, pf_ref)
    for e in engine.config.sriov:
        if e.pf == pf_ref or (dev is not None and (resolve_pf(topo, e.pf) is dev)):
            return e
    return None


def set_vfs_by_hand(engine: Engine, pf_ref: str, numvfs: int, autoprobe: bool | None = None,
                    wait_timeout: float | None = None) -> VfResult:
    """``hostdevctl vfs set``: unset options come from the PF's ``[[sriov]]`` entry, else the
    PF keeps its autoprobe setting and the wait is 60 s."""
    entry = entry_for(engine, pf_ref)
    if autoprobe is None and entry is not None:
        autoprobe = entry.autoprobe
    timeout = wait_timeout or (entry.wait_timeout if entry is not None else 60.0)
    result = engine.set_vfs(pf_ref, numvfs, autoprobe, timeout)
    if entry is not None and entry.numvfs != numvfs:
        result.notes.append(f"the config asks for {entry.numvfs} VFs on {entry.pf}: the next daemon start "
                            "sets that again")
    return result


@dataclass
class SriovReport:
    results: list[VfResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"results": [r.to_json() for r in self.results], "errors": self.errors}


def apply_config(engine: Engine, entries: list[SriovConfig]) -> SriovReport:
    """Daemon start: every configured PF gets its VFs. A refusal or failure is logged and
    reported; the daemon carries on (the other PFs, reservations and domains still matter)."""
    report = SriovReport()
    for entry in entries:
        try:
            report.results.append(engine.set_vfs(entry.pf, entry.numvfs, entry.autoprobe, entry.wait_timeout))
        except Exception as e:
            report.errors.append(f"{entry.pf}: {e}")
            log_action(log, logging.ERROR, "refused" if isinstance(e, Refused) else "sriov",
                       "cannot give %s %s VFs: %s", entry.pf, entry.numvfs, e, action="sriov",
                       result="refused" if isinstance(e, Refused) else "failed")
    return report


# --------------------------------------------------------------------------- hostdev networks


def network_pool(topo: Topology, network) -> list[PciAddress]:
    """The VFs a libvirt hostdev network (``domxml.parse_network``) hands out: the VFs of its
    ``<pf dev=…/>`` PFs (by netdev name) and its explicit ``<address>`` list, in that order."""
    pool: list[PciAddress] = []
    for dev in network.pf_devs:
        pf = resolve_pf(topo, dev)
        if pf is not None:
            pool += pf.virtfns
    pool += network.vf_addresses
    return list(dict.fromkeys(pool))


def pool_candidates(topo: Topology, ledger: Ledger, owner: Owner, pool: list[PciAddress],
                    policy: Policy | None = None) -> tuple[list[PciAddress], dict[PciAddress, Refusal]]:
    """Which VFs of a pool ``owner`` could get (each planned alone); the others with the
    planner's first refusal (which names the holder when another owner has the VF)."""
    from .planner import plan_prepare
    ok: list[PciAddress] = []
    why: dict[PciAddress, Refusal] = {}
    for addr in pool:
        plan = plan_prepare(topo, [addr], owner, ledger, policy)
        if plan.ok:
            ok.append(addr)
        else:
            why[addr] = plan.refusals[0]
    return ok, why


# --------------------------------------------------------------------------- listing


def vf_listing(topo: Topology, ledger: Ledger, netlink=None) -> dict:
    """Every SR-IOV PF with its VFs: address, group, driver, owner, and MAC/VLAN as the PF
    reports them (netlink; None where it cannot be read). ``netlink`` is a VfNetManager."""
    pfs = []
    for pf in sorted((d for d in topo.devices.values() if d.sriov_totalvfs is not None and d.physfn is None),
                     key=lambda d: d.address):
        netdev = pf.net[0] if pf.net else None
        table, net_error = {}, None
        if netdev and netlink is not None and pf.virtfns:
            try:
                table = netlink.backend.vf_table(netdev)
            except HostdevError as e:
                net_error = str(e)
        rec = ledger.sriov.get(str(pf.address))
        vfs = []
        for i, addr in enumerate(pf.virtfns):
            vf = topo.get(addr)
            claim = ledger.claim_for_device(addr)
            owner = None
            if claim is not None:
                owner = "reserved" if claim.owner.kind == "reservation" else claim.owner.name
            net = table.get(i)
            held = claim.device(addr) if claim is not None else None
            saved = held.vf_netconfig if held is not None else None
            vfs.append({"index": i, "address": str(addr), "group": vf.group if vf else None,
                        "driver": vf.driver if vf else None, "owner": owner,
                        "mac": net.mac if net else None, "vlan": net.vlan if net else None,
                        "spoofchk": net.spoofchk if net else None, "trust": net.trust if net else None,
                        "saved": saved.model_dump() if saved is not None else None})
        pfs.append({"pf": str(pf.address), "netdev": netdev, "driver": pf.driver, "group": pf.group,
                    "totalvfs": pf.sriov_totalvfs, "numvfs": pf.sriov_numvfs,
                    "autoprobe": pf.sriov_drivers_autoprobe, "record": rec.model_dump() if rec else None,
                    "netlink_error": net_error, "vfs": vfs})
    return {"pfs": pfs}
