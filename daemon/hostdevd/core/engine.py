"""The core's composition root: config + sysfs + ledger, wired once.

The daemon, the hook's server side and hostdevctl are thin doors onto an
:class:`Engine`; it imports neither libvirt nor systemd.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from .address import PciAddress
from .config import Config
from .errors import HostdevError, Refused
from .executor import Executor, Result, Runner, default_modprobe, default_runner
from .ledger import Claim, Ledger, Owner
from .ledger_store import LedgerStore
from .locks import GroupLocks
from .logfields import log_action
from .migrate import MigrationReport, assess
from .netreq import NetRequest, net_requests
from .planner import Plan, Policy, groups_of, plan_prepare, plan_release
from .preflight import with_preflight
from .reconcile import Guard, ReconcileReport, RunningDomain, adopt_domain, reconcile, release_missing, release_owner
from .reservations import ReservationReport, apply_reservations
from .sriov import SriovReport, VfResult, set_vfs_by_hand
from .sriov import apply_config as apply_sriov_config
from .sysfs import RealHost, Sysfs
from .telemetry import Telemetry
from .topology import Topology, from_group_reads, from_sysfs
from .vf_wait import SysfsPollWaiter, VfWaiter
from .vfnet import NetlinkBackend, VfNetManager

if TYPE_CHECKING:
    from .domxml import DomainPlacement, DomainRequest, GuestNuma
    from .pools import NetworkLookup

log = logging.getLogger("hostdevd.engine")

CRITICAL_TTL = 10.0  # seconds


class Engine:
    def __init__(self, config: Config | None = None, sysfs: Sysfs | None = None,
                 store: LedgerStore | None = None, modprobe: Callable[[str], None] | None = default_modprobe,
                 runner: Runner = default_runner,
                 netlink: NetlinkBackend | None = None, vf_waiter: VfWaiter | None = None):
        self.config = config or Config()
        self.sysfs = sysfs or Sysfs(RealHost(self.config.sysfs_root), self.config.write_timeout)
        self.store = store or LedgerStore(self.config.state_dir)
        # Counts and durations of what the engine does; a door installs a recorder (doors/metrics.py).
        # The executor and the ledger store share it.
        self.telemetry = Telemetry()
        self.store.telemetry = self.telemetry
        self.policy = Policy.from_config(self.config)
        # The doors plug in pyroute2 and udev on a real host (doors/wiring.py); the core's defaults
        # are none (VF MAC/VLAN not handled) and sysfs polling for new VFs.
        self.netlink = netlink
        self.executor = Executor(self.sysfs, self.store, modprobe=modprobe,
                                 verify_timeout=self.config.bind_verify_timeout,
                                 release_wait=self.config.release_wait_timeout, runner=runner,
                                 vfnet=VfNetManager(self.netlink) if self.netlink is not None else None)
        self.vf_waiter: VfWaiter = vf_waiter or SysfsPollWaiter(self.sysfs)
        self.locks = GroupLocks()
        self._critical: tuple[float, tuple[str, ...], dict] | None = None
        self._critical_lock = threading.Lock()

    # ---- read side ----
    def topology(self, with_critical: bool = True) -> Topology:
        topo = from_sysfs(self.sysfs, with_critical=False)
        if with_critical:
            topo.critical = self.critical()
        return topo

    def scoped(self, addresses: Iterable[PciAddress] = (), groups: Iterable[int] = (),
               with_critical: bool = True) -> Topology:
        """What a request decides on, read in O(group) (issue 13): the devices, their groups'
        members and the PFs of VFs among them (:func:`from_group_reads`), with the cached
        host-critical devices. The whole-host scan (:meth:`topology`) stays for the commands that
        show the whole host (groups, check, reservations, orphans)."""
        topo = from_group_reads(self.sysfs, addresses, groups)
        if with_critical:
            topo.critical = self.critical()
        return topo

    def critical(self) -> dict:
        """Host-critical devices, cached: reading them (and every boot_vga) is O(host). The cache
        is used while the facts they come from read the same (mount table, swaps, routes, kernel
        command line: a few small /proc files) and for at most CRITICAL_TTL seconds, so a device
        that becomes critical without any of those changing (a bridge or bond enslaving the
        route's NIC) is seen within that time, as before; :meth:`forget_host_facts` (udev:
        devices added, removed, rebound) drops it at once."""
        key = self.sysfs.critical_fingerprint()
        with self._critical_lock:
            now = time.monotonic()
            cached = self._critical
            if cached is None or now - cached[0] > CRITICAL_TTL or cached[1] != key:
                cached = self._critical = (now, key, self.sysfs.host_critical(self.config.policy.critical))
            return dict(cached[2])

    def topology_mode(self, udev: bool) -> dict[str, Any]:
        """How requests read the host (the daemon's ``status``)."""
        return {"requests": "per group: the requested devices, their IOMMU groups' members, their PFs",
                "host_critical": ("cached while /proc's mounts, swaps, routes and cmdline read the same, at most "
                                  f"{CRITICAL_TTL:g} s" + ("; dropped on every PCI uevent (udev)" if udev else
                                                           "; udev not watched: no uevent drops it"))}

    def forget_host_facts(self) -> None:
        """Something on the host changed (a udev event): the next request reads host-critical
        devices again."""
        with self._critical_lock:
            self._critical = None

    def ledger(self) -> Ledger:
        return self.store.read()

    def plan_prepare(self, addresses: Iterable[PciAddress], owner: Owner,
                     topo: Topology | None = None, driver_models: dict[PciAddress, str] | None = None,
                     guest: GuestNuma | None = None) -> Plan:
        """Dry run, pre-flight checks included (holders, power, reset, NUMA against ``guest``).
        Reads the requested devices' groups only (O(group), issue 13); the pre-flight facts are
        gathered for those groups' endpoints."""
        addresses = list(addresses)
        topo = topo or self.scoped(addresses)
        topo = with_preflight(topo, self.sysfs, groups_of(topo, addresses))
        return plan_prepare(topo, addresses, owner, self.store.peek(), self.policy, driver_models=driver_models,
                            guest=guest)

    def plan_release(self, owner: Owner, addresses: Iterable[PciAddress] | None = None,
                     topo: Topology | None = None) -> Plan:
        ledger = self.store.peek()          # the planner only looks
        topo = topo or self._claims_topology(ledger.claims_of(owner))
        return plan_release(topo, owner, ledger, addresses)

    def _claims_topology(self, claims: Iterable[Claim]) -> Topology:
        """The groups of ``claims`` and every device they record, read now (O(group))."""
        claims = list(claims)
        return self.scoped([d.pci for c in claims for d in c.devices], [c.group for c in claims],
                           with_critical=False)

    # ---- write side ----
    def prepare(self, addresses: Iterable[PciAddress], owner: Owner,
                net: dict[PciAddress, NetRequest] | None = None,
                driver_models: dict[PciAddress, str] | None = None,
                guest: GuestNuma | None = None) -> tuple[Plan, Result]:
        """Claim and bind every group the addresses touch; all-or-nothing.

        ``net``: VF MAC/VLAN per address (``<interface type='hostdev'>``), set after the bind.
        ``driver_models``: the vfio driver per address a domain names (``<driver model=…>``, R13).
        ``guest``: the domain's vCPU and memory pinning, for the pre-flight NUMA warning.
        """
        addresses = list(addresses)
        with self.telemetry.timed("prepare"):
            # Which groups to lock: each existing device's iommu_group link (one read each); its
            # members are read once, below, under the locks.
            groups = {g for a in addresses if self.sysfs.exists(a) and (g := self.sysfs.iommu_group(a)) is not None}
            with self.locks.hold(groups):
                # Plan under the group locks, against a fresh ledger and freshly read group
                # members (only those: O(group), issue 13): no stale decisions. The pre-flight
                # facts (who holds a device open) of those groups too.
                topo = with_preflight(self.scoped(addresses, groups), self.sysfs, groups)
                plan = plan_prepare(topo, addresses, owner, self.store.peek(), self.policy, net_requests=net,
                                    driver_models=driver_models, guest=guest)
                if not plan.ok:
                    raise plan.refused()
                return plan, self.executor.prepare(plan)

    def release(self, owner: Owner, addresses: Iterable[PciAddress] | None = None) -> tuple[Plan, Result]:
        ledger = self.store.peek()
        groups = [c.group for c in ledger.claims_of(owner)]
        with self.telemetry.timed("release"), self.locks.hold(groups):
            ledger = self.store.peek()       # the planner only looks; the executor re-reads in its transactions
            plan = plan_release(self._claims_topology(ledger.claims_of(owner)), owner, ledger,
                                list(addresses) if addresses is not None else None)
            return plan, self.executor.release(plan)

    # ---- SR-IOV (R11, R12) ----
    def plan_vfs(self, pf: str, numvfs: int, autoprobe: bool | None = None):
        from .sriov import plan_vfs
        return plan_vfs(self.topology(with_critical=False), self.ledger(), pf, numvfs, autoprobe)

    def set_vfs(self, pf: str, numvfs: int, autoprobe: bool | None = None, timeout: float = 60.0):
        """Give the PF ``numvfs`` VFs (through 0), wait for them, record them; refuse while any is assigned."""
        from .sriov import resolve_pf, vfs_of
        topo = self.topology(with_critical=False)
        dev = resolve_pf(topo, pf)
        devs = ([dev] + vfs_of(topo, dev)) if dev is not None else []
        with self.telemetry.timed("set_vfs"), self.locks.hold(d.group for d in devs if d.group is not None):
            plan = self.plan_vfs(pf, numvfs, autoprobe)
            return self.executor.apply_vf_plan(plan, self.vf_waiter, timeout)

    def verify_vf_net(self, owner: Owner) -> list[str]:
        """After a domain started: do its VFs carry the MAC/VLAN it asked for (whoever set them)?"""
        out = []
        for claim in self.ledger().claims_of(owner):
            for rec in claim.devices:
                if rec.vf_netconfig is not None:
                    out += self.executor.vf_net.verify(claim.group, rec.pci)
        return out

    def forget_vanished(self, addr: PciAddress) -> str:
        """A claimed device left the host (udev remove): drop it under its group's lock (R6)."""
        claim = self.ledger().claim_for_device(addr)
        if claim is None:
            return ""
        with self.locks.hold([claim.group]):
            what = self.executor.forget_vanished(claim.group, addr)
            fresh = self.ledger().claim_for_group(claim.group)
            if what == "device" and fresh is not None and not fresh.requested:
                # Only companions left: nothing of the group is in use any more, so it goes back
                # (a claim without requested devices would otherwise never be released).
                self.release_group(fresh)
                what = "released"
            return what

    def release_group(self, claim: Claim) -> Result:
        """Release one claim's group whoever owns it; the caller holds the group lock."""
        with self.telemetry.timed("release"):
            plan = plan_release(self._claims_topology([claim]), claim.owner, self.ledger(),
                                claim.requested_pci or None, group=claim.group)
            return self.executor.release(plan)

    # ---- use-cases the doors call (typed in, typed out) ----
    def prepare_domain(self, req: DomainPrepare) -> Prepared:
        """A domain's start (libvirt's hook, hostdevctl prepare): its PCI host devices and the
        VFs of its hostdev networks, whole groups, all-or-nothing."""
        extras = request_extras(req.parsed)
        addrs = list(req.addresses)
        picks: dict[PciAddress, NetRequest] = {}
        if req.parsed is not None and req.parsed.networks and req.networks is not None:
            from .pools import pick_pool_vfs  # network XML (lxml) only for a domain with networks
            with self.telemetry.refusals("prepare"):
                found = pick_pool_vfs(req.parsed, req.owner, req.networks, self.topology, self.ledger(),
                                      self.policy)
            extras["networks"] = found.networks
            extras["warnings"] = extras.get("warnings", []) + found.warnings
            picks = found.vfs
            addrs += [a for a in picks if a not in addrs]
        if not addrs:
            return Prepared(req.owner, extras=extras, note="no PCI host device to prepare")
        # phase "start" (libvirt's 'start begin' hook): a VF from a hostdev network is known only
        # now, and libvirt already set its MAC/VLAN: recorded and verified, not written.
        with self.telemetry.refusals("prepare"):
            net = net_requests(req.parsed, resolved_by_libvirt=req.phase == "start")
        net.update(picks)
        t0 = time.monotonic()
        with req.serialize() if req.serialize is not None else nullcontext():
            plan, result = self._prepare_logged(addrs, req.owner, net,
                                                req.parsed.driver_models() if req.parsed is not None else None,
                                                req.parsed.numa if req.parsed is not None else None)
        log.info("prepared %s for %s (%s) in %.0f ms", ", ".join(map(str, addrs)), req.owner.label(), req.origin,
                 (time.monotonic() - t0) * 1000)
        return Prepared(req.owner, plan, result, extras)

    def release_domain(self, owner: Owner, addresses: list[PciAddress] | None = None) -> Prepared:
        """A domain stopped (hook, event) or hostdevctl release: refcounted, best effort."""
        plan, result = self.release(owner, addresses)
        return Prepared(owner, plan, result, {"warnings": plan.warnings})

    def plan_for(self, action: str, owner: Owner, addresses: list[PciAddress], *, everything: bool,
                 driver_models: dict[PciAddress, str] | None = None, guest: GuestNuma | None = None) -> Plan:
        """Dry run: the prepare plan, or the release plan (``everything``: all of ``owner``'s)."""
        if action == "prepare":
            return self.plan_prepare(addresses, owner, driver_models=driver_models, guest=guest)
        return self.plan_release(owner, None if everything else addresses)

    def check_attachable(self, owner: Owner, addresses: list[PciAddress],
                         driver_models: dict[PciAddress, str] | None = None) -> Plan:
        """Hot-plug into the persistent definition only: nothing is bound now (the start's prepare
        does it), but refuse now what that start would refuse anyway (no IOMMU, a bridge, policy,
        host-critical). Ownership is not judged: whoever holds the group then decides."""
        plan = plan_prepare(self.scoped(addresses), addresses, owner, Ledger(), self.policy,
                            driver_models=driver_models)
        if not plan.ok:
            raise plan.refused()
        return plan

    def attach_prepare(self, owner: Owner, addresses: list[PciAddress], net: dict[PciAddress, NetRequest],
                       driver_models: dict[PciAddress, str] | None = None) -> Attached:
        """Hot-plug, before libvirt's attach: whole groups prepared; ``new`` is what only this
        attach claimed (given back by :meth:`attach_rollback` if libvirt refuses)."""
        held = {a for c in self.ledger().claims_of(owner) for a in c.requested_pci}
        new = [a for a in addresses if a not in held]
        plan, result = self._prepare_logged(addresses, owner, net, driver_models)
        return Attached(owner, plan, result, new)

    def _prepare_logged(self, addresses: list[PciAddress], owner: Owner, net: dict[PciAddress, NetRequest],
                        driver_models: dict[PciAddress, str] | None = None,
                        guest: GuestNuma | None = None) -> tuple[Plan, Result]:
        try:
            return self.prepare(addresses, owner, net, driver_models, guest)
        except Refused as e:
            few = ", ".join(map(str, addresses[:4]))    # a domain may name thousands: the log line stays short
            if len(addresses) > 4:
                few += f" and {len(addresses) - 4:,} more"
            log_action(log, logging.WARNING, "refused", "refused %s for %s: %s", few,
                       owner.label(), e.message, owner=owner, action="prepare", result="refused")
            raise

    def attach_rollback(self, attached: Attached) -> list[str]:
        """libvirt refused the attach: give back what this attach claimed; the problems, if any."""
        if not attached.new:
            return []
        try:
            self.release(attached.owner, attached.new)
        except HostdevError as e:
            return [f"release failed: {e}"]
        return []

    def detach_release(self, owner: Owner, addresses: list[PciAddress], *, guest_had: list[PciAddress],
                       still_attached: list[PciAddress], guest_changed: bool
                       ) -> tuple[list[PciAddress], Prepared | None]:
        """Hot-unplug, after libvirt's detach: release what the guest let go of, and what hostdevd
        held for a device the domain no longer has. ``guest_changed`` is False when only the
        persistent definition changed on a running domain: the live guest, and so its claims,
        stay. Returns (released addresses, the release)."""
        if not guest_changed:
            return [], None
        claimed = {a for c in self.ledger().claims_of(owner) for a in c.requested_pci}
        release = [a for a in addresses if a not in still_attached and (a in guest_had or a in claimed)]
        if not release:
            return [], None
        return release, self.release_domain(owner, release)

    def vfs_set(self, pf: str, numvfs: int, autoprobe: bool | None = None,
                wait_timeout: float | None = None) -> VfResult:
        """``hostdevctl vfs set``: unset options come from the PF's ``[[sriov]]`` entry."""
        return set_vfs_by_hand(self, pf, numvfs, autoprobe, wait_timeout)

    def apply_sriov_config(self) -> SriovReport:
        """Daemon start: every configured PF gets its VFs (before reservations: a reserved
        device may be a VF)."""
        return apply_sriov_config(self, self.config.sriov)

    def apply_reservations(self) -> ReservationReport:
        """Bind every configured reservation's group; give back groups no longer configured."""
        return apply_reservations(self, self.config.reserve)

    def reconcile(self, running: list[RunningDomain] | None, *, listed_at: datetime | None = None,
                  guard: Guard | None = None) -> ReconcileReport:
        """Ledger vs sysfs vs libvirt's running domains (None: libvirt unreachable). Not while the
        ledger is read-only (no readable generation): there is nothing to compare, nothing to record."""
        if self.store.read_only is not None:
            return ReconcileReport(libvirt=running is not None, skipped=[f"read-only: {self.store.read_only}"])
        with self.telemetry.timed("reconcile"):
            report = reconcile(self, running, listed_at=listed_at, guard=guard)
        self.telemetry.reconciled()
        return report

    def adopt_domain(self, dom: RunningDomain, report: ReconcileReport | None = None) -> list[int]:
        """Claims for the devices a running domain uses that no claim covers."""
        return adopt_domain(self, dom, report)

    def release_missing(self, dom: RunningDomain, *, before: datetime | None = None) -> list[str]:
        """Release what ``dom``'s live XML no longer has (libvirt hot-unplug behind hostdevd's back)."""
        return release_missing(self, dom, before=before)

    def release_owner(self, owner: Owner, *, before: datetime | None = None) -> list[int]:
        """A stop event the hook did not handle: release ``owner``'s claims older than the event."""
        return release_owner(self, owner, before=before)

    def migration_report(self, owner: Owner, placement: DomainPlacement | None, source: str, *,
                         running: bool | None = None, ledger_only: bool = False) -> MigrationReport:
        """Which assigned devices block a live migration of ``owner``, which can be unplugged first.
        ``placement``: the guest's view (live or given XML), None when only the ledger is known."""
        claims = [c for c in self.ledger().claims_of(owner) if c.owner.kind == "domain"]
        report = assess(owner.name, placement, claims, self.topology(with_critical=False), source)
        report.running = running
        if running is False:
            report.notes.append(f"{owner.name} is not running: there is nothing to migrate live")
        if ledger_only:
            report.notes.append("libvirt is not connected: the verdict comes from the ledger alone")
        level = logging.WARNING if report.blocked else logging.INFO
        log_action(log, level, "migrate", "%s%s", report.summary(),
                   (": unplug " + ", ".join(report.unplug_first) + " first") if report.unplug_first
                   and not report.cannot_unplug else "", owner=owner, action="migrate-check",
                   result="blocked" if report.blocked else "ok")
        return report


@dataclass
class DomainPrepare:
    """What a door asks of :meth:`Engine.prepare_domain`."""
    owner: Owner
    addresses: list[PciAddress]
    parsed: DomainRequest | None = None
    phase: Literal["prepare", "start"] = "prepare"
    origin: str = "cli"
    # libvirt's network XML by name: hostdev-network pools are checked only with it.
    networks: NetworkLookup | None = None
    # Held around the claim and binds (the daemon's per-domain gate), not around lookups.
    serialize: Callable[[], AbstractContextManager[object]] | None = None


@dataclass
class Prepared:
    """A prepare or release: the plan run, the executor's result and what the reply adds."""
    owner: Owner
    plan: Plan | None = None
    result: Result | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    note: str | None = None

    @property
    def groups(self) -> list[int]:
        return self.result.groups if self.result is not None else []

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"owner": self.owner.model_dump(), "groups": self.groups}
        if self.plan is not None:
            out["plan"] = self.plan.to_json()
        if self.result is not None:
            out["result"] = self.result.to_json()
        if self.note is not None:
            out["note"] = self.note
        return {**out, **self.extras}


@dataclass
class Attached:
    owner: Owner
    plan: Plan
    result: Result
    new: list[PciAddress]


def request_extras(parsed: DomainRequest | None) -> dict[str, Any]:
    """What a reply says about a domain's devices hostdevd does not handle, and its networks."""
    if parsed is None:
        return {}
    out: dict[str, Any] = {}
    if parsed.out_of_scope:
        out["out_of_scope"] = [o.to_dict() for o in parsed.out_of_scope]
    if parsed.networks:
        out["networks"] = [n.to_dict() for n in parsed.networks]
        out["warnings"] = [f"interface on network {n.network!r} has no <actual> device in this XML (libvirt "
                           "picks a hostdev network's VF after the prepare hook); if it is a hostdev network, "
                           "hostdevd prepares its VF at libvirt's 'start begin' hook" for n in parsed.networks]
    return out

