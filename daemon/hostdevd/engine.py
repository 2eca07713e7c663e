"""The core's composition root: config + sysfs + ledger, wired once.

The daemon, the hook's server side and hostdevctl are thin doors onto an
:class:`Engine`; it imports neither libvirt nor systemd.
"""
from __future__ import annotations

import logging
import threading
from contextlib import ExitStack, contextmanager
from typing import Iterable, Iterator

from .address import PciAddress
from .config import Config
from .errors import Refused
from .executor import Executor, Result, Runner, default_modprobe, default_runner
from .ledger import Ledger, LedgerStore, Owner
from .planner import Plan, Policy, groups_of, plan_prepare, plan_release
from .sysfs import RealHost, Sysfs
from .topology import Topology, from_sysfs

log = logging.getLogger("hostdevd.engine")


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
                 store: LedgerStore | None = None, modprobe=default_modprobe, runner: Runner = default_runner):
        self.config = config or Config()
        self.sysfs = sysfs or Sysfs(RealHost(self.config.sysfs_root), self.config.write_timeout)
        self.store = store or LedgerStore(self.config.state_dir)
        self.policy = Policy.from_config(self.config)
        self.executor = Executor(self.sysfs, self.store, modprobe=modprobe,
                                 verify_timeout=self.config.bind_verify_timeout,
                                 release_wait=self.config.release_wait_timeout, runner=runner)
        self.locks = GroupLocks()

    # ---- read side ----
    def topology(self, with_critical: bool = True) -> Topology:
        return from_sysfs(self.sysfs, with_critical=with_critical)

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
    def prepare(self, addresses: Iterable[PciAddress], owner: Owner) -> tuple[Plan, Result]:
        """Claim and bind every group the addresses touch; all-or-nothing."""
        addresses = list(addresses)
        with self.locks.hold(groups_of(self.topology(with_critical=False), addresses)):
            # Plan under the group locks, against a fresh ledger: no stale decisions.
            plan = plan_prepare(self.topology(), addresses, owner, self.ledger(), self.policy)
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

    def forget_vanished(self, addr: PciAddress) -> str:
        """A claimed device left the host (udev remove): drop it under its group's lock (R6)."""
        claim = self.ledger().claim_for_device(addr)
        if claim is None:
            return ""
        with self.locks.hold([claim.group]):
            return self.executor.forget_vanished(claim.group, addr)
