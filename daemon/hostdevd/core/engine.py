"""The core's composition root: config + sysfs + ledger, wired once.

The daemon, the hook's server side and hostdevctl are thin doors onto an
:class:`Engine`; it imports neither libvirt nor systemd.
"""
from __future__ import annotations

import importlib.util
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager

from .address import PciAddress
from .config import Config
from .errors import Refused
from .executor import Executor, Result, Runner, default_modprobe, default_runner
from .ledger import Ledger, LedgerStore, Owner
from .planner import Plan, Policy, groups_of, plan_prepare, plan_release
from .sysfs import RealHost, Sysfs
from .topology import Topology, from_sysfs, refresh_groups
from .vfnet import NetlinkBackend, NetRequest, VfNetManager

log = logging.getLogger("hostdevd.engine")

CRITICAL_TTL = 10.0  # seconds


class GroupLocks:
    """Serialise work per IOMMU group; different groups proceed in parallel.

    Locks are always taken in ascending group order, so two requests that
    touch overlapping sets of groups cannot deadlock.
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[int, threading.Lock] = {}

    @contextmanager
    def hold(self, groups: Iterable[int]) -> Iterator[None]:
        with ExitStack() as stack:
            for g in sorted(set(groups)):
                with self._guard:
                    lock = self._locks.setdefault(g, threading.Lock())
                stack.enter_context(lock)
            yield


class Engine:
    def __init__(self, config: Config | None = None, sysfs: Sysfs | None = None,
                 store: LedgerStore | None = None, modprobe=default_modprobe, runner: Runner = default_runner,
                 netlink: NetlinkBackend | None = None):
        self.config = config or Config()
        self.sysfs = sysfs or Sysfs(RealHost(self.config.sysfs_root), self.config.write_timeout)
        self.store = store or LedgerStore(self.config.state_dir)
        self.policy = Policy.from_config(self.config)
        self.netlink = netlink if netlink is not None else default_netlink(self.sysfs)
        self.executor = Executor(self.sysfs, self.store, modprobe=modprobe,
                                 verify_timeout=self.config.bind_verify_timeout,
                                 release_wait=self.config.release_wait_timeout, runner=runner,
                                 vfnet=VfNetManager(self.netlink) if self.netlink is not None else None)
        self._vf_waiter = None
        self.locks = GroupLocks()
        self._critical: tuple[float, dict] | None = None

    # ---- read side ----
    def topology(self, with_critical: bool = True) -> Topology:
        topo = from_sysfs(self.sysfs, with_critical=False)
        if with_critical:
            topo.critical = self.critical()
        return topo

    def critical(self) -> dict:
        """Host-critical devices, cached briefly: mounts, swaps and routes change rarely, and
        reading them (and every boot_vga) on each request doubles a prepare's cost."""
        now = time.monotonic()
        if self._critical is None or now - self._critical[0] > CRITICAL_TTL:
            self._critical = (now, self.sysfs.host_critical())
        return dict(self._critical[1])

    def ledger(self) -> Ledger:
        return self.store.read()

    def plan_prepare(self, addresses: Iterable[PciAddress], owner: Owner,
                     topo: Topology | None = None) -> Plan:
        topo = topo or self.topology()
        return plan_prepare(topo, list(addresses), owner, self.ledger(), self.policy)

    def plan_release(self, owner: Owner, addresses: Iterable[PciAddress] | None = None,
                     topo: Topology | None = None) -> Plan:
        topo = topo or self.topology(with_critical=False)
        return plan_release(topo, owner, self.ledger(), addresses)

    # ---- write side ----
    def prepare(self, addresses: Iterable[PciAddress], owner: Owner,
                net: dict[PciAddress, NetRequest] | None = None) -> tuple[Plan, Result]:
        """Claim and bind every group the addresses touch; all-or-nothing.

        ``net``: VF MAC/VLAN per address (``<interface type='hostdev'>``), set after the bind.
        """
        addresses = list(addresses)
        scan = self.topology()
        groups = groups_of(scan, addresses)
        with self.locks.hold(groups):
            # Plan under the group locks, against a fresh ledger and freshly read group
            # members: no stale decisions.
            topo = refresh_groups(scan, self.sysfs, groups)
            plan = plan_prepare(topo, addresses, owner, self.ledger(), self.policy, net_requests=net)
            if not plan.ok:
                raise Refused(plan.refusal_message(), refusals=[r.to_json() for r in plan.refusals])
            return plan, self.executor.prepare(plan)

    def release(self, owner: Owner, addresses: Iterable[PciAddress] | None = None) -> tuple[Plan, Result]:
        ledger = self.ledger()
        groups = [c.group for c in ledger.claims_of(owner)]
        with self.locks.hold(groups):
            plan = plan_release(self.topology(with_critical=False), owner, self.ledger(),
                                list(addresses) if addresses is not None else None)
            return plan, self.executor.release(plan)

    # ---- SR-IOV (R11, R12) ----
    @property
    def vf_waiter(self):
        """How set_vfs waits for new VFs: udev on a real host, sysfs polling otherwise."""
        if self._vf_waiter is None:
            from .sriov import default_waiter
            self._vf_waiter = default_waiter(self.sysfs)
        return self._vf_waiter

    @vf_waiter.setter
    def vf_waiter(self, waiter) -> None:
        self._vf_waiter = waiter

    def plan_vfs(self, pf: str, numvfs: int, autoprobe: bool | None = None):
        from .sriov import plan_vfs
        return plan_vfs(self.topology(with_critical=False), self.ledger(), pf, numvfs, autoprobe)

    def set_vfs(self, pf: str, numvfs: int, autoprobe: bool | None = None, timeout: float = 60.0):
        """Give the PF ``numvfs`` VFs (through 0), wait for them, record them; refuse while any is assigned."""
        from .sriov import resolve_pf, vfs_of
        topo = self.topology(with_critical=False)
        dev = resolve_pf(topo, pf)
        devs = ([dev] + vfs_of(topo, dev)) if dev is not None else []
        with self.locks.hold(d.group for d in devs if d.group is not None):
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
                plan = plan_release(self.topology(with_critical=False), fresh.owner, self.ledger())
                plan.groups = [g for g in plan.groups if g.group == fresh.group]
                plan.steps = [st for st in plan.steps if st.group == fresh.group]
                self.executor.release(plan)
                what = "released"
            return what


def default_netlink(sysfs: Sysfs) -> NetlinkBackend | None:
    """pyroute2 on a real host (sysfs at /sys); none for the simulated kernel or a moved sysfs root."""
    if not isinstance(sysfs.backend, RealHost) or sysfs.backend.sys_root != "/sys":
        return None
    if importlib.util.find_spec("pyroute2") is None:
        log.warning("pyroute2 is not installed: VF MAC/VLAN are neither saved nor restored")
        return None
    return _Lazy(lambda: __import__("hostdevd.core.vfnet", fromlist=["Pyroute2Backend"]).Pyroute2Backend())


class _Lazy:
    """Builds the real object on first use: hostdevctl's commands that never touch a VF
    do not pay for importing pyroute2 (about a second under the lab's emulation)."""

    def __init__(self, factory):
        self._factory = factory
        self._obj = None

    def __getattr__(self, name):
        if self._obj is None:
            self._obj = self._factory()
        return getattr(self._obj, name)
