"""The executor's SR-IOV writes (R11): a :class:`~hostdevd.core.sriov.VfPlan` applied with
intent recorded first, so the ``sriov_*`` writes also come from the only writer."""
from __future__ import annotations

import logging
import time
from typing import Any

from .address import PciAddress
from .errors import HostdevError, Reason, Refused
from .executor_base import ExecutorBase
from .ledger import SriovRecord, now
from .logfields import log_action
from .sriov import VfPlan, VfResult
from .states import SriovState
from .vf_wait import VfWaiter

log = logging.getLogger("hostdevd.executor")


class SriovSteps(ExecutorBase):
    def _record_sriov(self, pf: str, **changes: Any) -> None:
        with self.store.transaction() as ledger:
            rec = ledger.sriov.get(pf)
            if rec is None:
                rec = SriovRecord(pf=pf, numvfs=changes.pop("numvfs"), autoprobe=changes.pop("autoprobe"))
            for k, v in changes.items():
                setattr(rec, k, v)
            rec.updated = now()
            ledger.sriov[pf] = rec

    def apply_vf_plan(self, plan: VfPlan, waiter: VfWaiter, timeout: float) -> VfResult:
        """SR-IOV (R11): make the plan's writes; record intent first and the VFs after.
        Raises on refusal or failure (the ledger then says ``failed``; sriov_numvfs cannot be
        rolled back meaningfully: the old VFs are gone once 0 was written)."""
        if not plan.ok:
            raise Refused("; ".join(plan.refusals), plan.hint or None,
                          refusals=[{"device": plan.pf, "reason": r, "hint": plan.hint, "code": Reason.SRIOV_NUMVFS}
                                    for r in plan.refusals])
        pf = PciAddress.parse(plan.pf)
        result = VfResult(plan.pf, plan.wanted, waiter=waiter.name)
        if plan.noop:
            result.vfs = [str(v) for v in self.sysfs.read_device(pf).virtfns]
            self._record_sriov(plan.pf, numvfs=plan.wanted, autoprobe=plan.autoprobe, state=SriovState.READY,
                               vfs=result.vfs, previous_numvfs=plan.current, note=None)
            return result
        result.changed = True
        self._record_sriov(plan.pf, numvfs=plan.wanted, autoprobe=plan.autoprobe, state=SriovState.CHANGING,
                           previous_numvfs=plan.current, vfs=[], seconds=None,
                           note=f"changing from {plan.current} to {plan.wanted} VFs")
        t0 = time.monotonic()
        try:
            with waiter.watch(pf) as watch:
                for kind, value in plan.steps:
                    self._boundary(f"sriov:{kind}:{value}")
                    if kind == "autoprobe":
                        self.sysfs.set_sriov_drivers_autoprobe(pf, bool(value))
                    elif kind == "numvfs":
                        t0 = time.monotonic()
                        self.sysfs.set_sriov_numvfs(pf, int(value), timeout=timeout)
                        if not value:
                            result.remove_seconds = round(time.monotonic() - t0, 3)
                    elif kind == "wait":
                        result.notes += watch.wait(pf, int(value), max(0.0, timeout - (time.monotonic() - t0)))
        except HostdevError as e:
            self._record_sriov(plan.pf, state=SriovState.FAILED, note=str(e))
            log_action(log, logging.ERROR, "sriov", "setting %s VFs on %s failed: %s", plan.wanted, plan.pf, e,
                       address=plan.pf, action="sriov", result="failed")
            raise
        result.seconds = round(time.monotonic() - t0, 3) if plan.wanted else None
        result.vfs = [str(v) for v in self.sysfs.read_device(pf).virtfns]
        self._record_sriov(plan.pf, state=SriovState.READY, vfs=result.vfs, seconds=result.seconds,
                           note="; ".join(result.notes) or None)
        log_action(log, logging.INFO, "sriov", "%s now has %s VFs (was %s)%s", plan.pf, plan.wanted, plan.current,
                   f", seen by {waiter.name} after {result.seconds:.3f} s" if result.seconds is not None else "",
                   address=plan.pf, action="sriov", result="ok")
        return result
