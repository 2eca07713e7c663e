"""The executor: the only writer.

Applies a :class:`~hostdevd.planner.Plan` to the host through
:class:`~hostdevd.sysfs.Sysfs`, recording intent in the ledger before the
first sysfs write so a crash at any point leaves enough on disk to finish or
undo it. The ledger is written ahead: a prepare's claim records every device
it will bind (original driver and override, target driver) in one durable
write, and its outcome in one more; a release likewise (issue 13). Recovery
reads sysfs and finishes or undoes from that record.

* Prepare is all-or-nothing: each step registers its undo the moment it
  succeeds; on failure the undos run in reverse and the claim is dropped
  (or kept as ``failed`` with a note naming what could not be undone).
* Release is best effort: each device's failure is logged and the rest
  continue (libvirt's reattach does the same); a group whose devices did not
  all come back keeps a ``failed`` claim so nothing is forgotten.
* Release runs the planner's release steps in the planner's order.
* Reconciliation and reservations decide; the records they decided are written here.

Its parts: host actions (:mod:`.executor_host`), SR-IOV writes (:mod:`.executor_sriov`),
VF MAC/VLAN through netlink (:mod:`.executor_vfnet`), shared state (:mod:`.executor_base`).
Nothing else writes sysfs or the ledger.
"""
from __future__ import annotations

import logging
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from .address import PciAddress
from .errors import ExecutionFailed, HostdevError, LedgerError, LedgerSaveFailed, Reason, Refused
from .executor_base import ExecutorBase, wait_until
from .executor_host import Runner, RunResult, default_runner
from .executor_records import RecordSteps
from .executor_sriov import SriovSteps
from .executor_vfnet import VfNetSteps
from .ledger import Claim, DeviceRecord
from .ledger_store import LedgerStore
from .logfields import log_action
from .planner import GroupPlan, Plan, Step, held_refusal, refused
from .states import ClaimState, DeviceState, allowed
from .sysfs import Sysfs
from .sysfs_vfio import open_nodes_text
from .topology import VFIO
from .variants import recorded, same_driver
from .vfnet import VfNetManager

log = logging.getLogger("hostdevd.executor")

# Steps that keep a request's groups one after another: host actions (a unit or module may
# serve several groups) and VF MAC/VLAN (one netlink socket per PF).
_SERIAL_STEPS = ("stop_unit", "unload_module", "save_net", "set_net")


def default_modprobe(module: str) -> None:
    proc = subprocess.run(["modprobe", module], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        msg = proc.stderr.strip() or f"exit status {proc.returncode}"
        raise ExecutionFailed(f"modprobe {module} failed: {msg}",
                              "is the module blacklisted (install ... /bin/false)? remove that line")


@dataclass
class Result:
    ok: bool
    groups: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"ok": self.ok, "groups": self.groups, "errors": self.errors, "notes": self.notes}


class Executor(RecordSteps, SriovSteps):
    def __init__(self, sysfs: Sysfs, store: LedgerStore, *,
                 modprobe: Callable[[str], None] | None = default_modprobe,
                 verify_timeout: float = 5.0, release_wait: float = 10.0,
                 on_step: Callable[[str], None] | None = None, runner: Runner = default_runner,
                 vfnet: VfNetManager | None = None):
        ExecutorBase.__init__(self, sysfs, store, on_step)
        # VF MAC/VLAN through the PF (R4/R6/R12); without a netlink backend VFs move without them.
        self.vf_net = VfNetSteps(sysfs, vfnet, store)
        self.modprobe = modprobe
        self.runner = runner
        self.verify_timeout = verify_timeout
        self.release_wait = release_wait
        # Independent groups of one prepare bind at the same time (see _prepare_in_parallel).
        self.parallel_groups = True

    # ------------------------------------------------------------------ SR-IOV

    # ------------------------------------------------------------------ prepare
    def prepare(self, plan: Plan) -> Result:
        """Apply a prepare plan; raise Refused/ExecutionFailed after rolling back."""
        if not plan.ok:
            raise plan.refused()
        self.store.refuse_if_read_only()     # no readable ledger at start: nothing new is claimed
        undo: list[tuple[str, Callable[[], None]]] = []
        result = Result(ok=True)
        fresh = [gp for gp in plan.groups if not gp.already_held]
        parallel = self.parallel_groups and len(fresh) > 1 and not any(s.action in _SERIAL_STEPS for s in plan.steps)
        try:
            for gp in plan.groups:
                steps = [s for s in plan.steps if s.group == gp.group]
                if gp.already_held:
                    # Held already: converge on the kernel (bind what is not on vfio-pci, R-converge).
                    self.promote(gp.group, gp.requested)
                    self._converge(plan, gp)
                    self._run_prepare_steps(plan, gp, steps, undo)
                    result.groups.append(gp.group)
                    continue
                self._claim(plan, gp, undo)
                if parallel:
                    continue            # every claim recorded first; the groups bind below, at once
                self._run_prepare_steps(plan, gp, steps, undo)
                self._activate(plan, gp)
                result.groups.append(gp.group)
            if parallel:
                self._prepare_in_parallel(plan, fresh, undo)
                result.groups = [gp.group for gp in plan.groups]
        except Exception as e:
            changed = any(not name.startswith("claim:") for name, _ in undo)
            failures, unrecorded = self._rollback(plan, undo)
            msg = str(e)
            if failures:
                msg += "; rollback incomplete: " + "; ".join(failures)
            if unrecorded:
                msg += "; rolled back on the host, but the ledger could not record it: " + "; ".join(unrecorded)
            log_action(log, logging.ERROR, "rollback", "prepare for %s failed, rolled back: %s",
                       plan.owner.label(), msg, owner=plan.owner, action="prepare", result="failed")
            if isinstance(e, LedgerSaveFailed) and not failures and not unrecorded:
                e.hint = f"{e.hint}; {'what was done was undone' if changed else 'nothing was bound'}"
            if isinstance(e, HostdevError) and not failures and not unrecorded:
                raise
            hint = getattr(e, "hint", None)
            if unrecorded and not failures:
                hint = (f"{hint}; then " if hint else "") + (
                    f"`hostdevctl release --owner {plan.owner.name}`: the devices are back with the host, "
                    "the ledger still shows the claim")
            raise ExecutionFailed(msg, hint) from e
        return result

    def _activate(self, plan: Plan, gp: GroupPlan) -> None:
        self._boundary(f"activate:{gp.group}")
        with self.store.transaction(durable=False) as ledger:    # the outcome: every member on vfio
            claim = ledger.held(gp.group)
            for rec in claim.devices:
                if rec.state == DeviceState.BINDING:        # written ahead at the claim; each bind verified
                    rec.move_to(DeviceState.VFIO)
            claim.move_to(ClaimState.ACTIVE)
            ledger.put(claim)
        log_action(log, logging.INFO, "claim", "group %s active for %s", gp.group, plan.owner.label(),
                   group=gp.group, owner=plan.owner, action="prepare", result="ok")

    def _prepare_in_parallel(self, plan: Plan, groups: list[GroupPlan], undo: list) -> None:
        """Independent groups of one request (each claimed already) bind at the same time, one
        thread per group: the kernel's remove() and probe() of one group's drivers overlap with
        the others' (issue 13). Each group keeps its own undo list; when any group fails, every
        thread is waited for and all of it is rolled back, claims last, as one request."""
        wanted = {s.driver or VFIO for s in plan.steps if s.action == "bind"
                  and s.pci is not None and not same_driver(self.sysfs.driver(s.pci), s.driver or VFIO)}
        for driver in sorted(wanted):
            self._load_vfio_driver(driver)          # once, before the threads: modprobe is not per group
        undos: dict[int, list] = {gp.group: [] for gp in groups}
        errors: dict[int, BaseException] = {}

        def run(gp: GroupPlan) -> None:
            try:
                self._run_prepare_steps(plan, gp, [s for s in plan.steps if s.group == gp.group], undos[gp.group])
                self._activate(plan, gp)
            except BaseException as e:  # re-raised below, once every group stopped
                errors[gp.group] = e

        threads = [threading.Thread(target=run, args=(gp,), name=f"prepare-group-{gp.group}", daemon=True)
                   for gp in groups[1:]]
        for t in threads:
            t.start()
        run(groups[0])
        for t in threads:
            t.join()
        for gp in groups:
            undo.extend(undos[gp.group])
        if errors:
            raise next(errors[gp.group] for gp in groups if gp.group in errors)

    def _run_prepare_steps(self, plan: Plan, gp: GroupPlan, steps: list[Step], undo: list) -> None:
        for step in steps:
            if step.action == "bind":
                self._bind_step(plan, gp.group, step.pci, undo, step.driver or VFIO)
            elif step.action == "reset":
                self._reset_step(plan, gp.group, step.pci)
            elif step.action in ("stop_unit", "unload_module"):
                self._host_action_step(plan, gp.group, step, undo)
            elif step.action == "save_net":
                self._boundary(f"save_net:{step.pci}")
                self.vf_net.save(plan, gp.group, step.pci)
            elif step.action == "set_net":
                self._boundary(f"set_net:{step.pci}")
                self.vf_net.apply(plan, gp.group, step.pci, plan.net[step.pci], undo)

    def _converge(self, plan: Plan, gp: GroupPlan) -> None:
        """A held group prepared again: the claim is of this boot now, and every member the
        planner found off vfio-pci (read under the group lock) has a record to bind against."""
        with self.store.transaction() as ledger:
            claim = ledger.held(gp.group)
            claim.boot_id = self.sysfs.boot_id()
            for a in gp.bind:
                if claim.device(a) is None and a not in gp.keep:
                    claim.devices.append(self._record(a, "companion" if a in gp.companions else "requested",
                                                      DeviceState.HOST))
            ledger.put(claim)

    def _record(self, addr: PciAddress, role: str, state: DeviceState, target: str | None = None) -> DeviceRecord:
        """A device as it is now: its driver and override to give back, and who it is. With a
        ``target`` driver that it is not on: the intent to bind it there (state binding)."""
        dev = self.sysfs.read_device(addr)   # read live: the topology may be seconds old
        rec = DeviceRecord(address=str(addr), role=role, state=state, original_driver=dev.driver,
                           original_override=dev.driver_override, bound_by_us=False,
                           vendor_device=dev.vendor_device, subsystem=dev.subsystem,
                           vfio_driver=recorded(dev.driver) if dev.on_vfio else None)
        if target is not None and not same_driver(dev.driver, target):
            rec.state, rec.bound_by_us, rec.vfio_driver = DeviceState.BINDING, True, recorded(target)
        return rec

    def _claim(self, plan: Plan, gp: GroupPlan, undo: list) -> None:
        """Record the claim atomically: a racing owner loses here, before any sysfs write."""
        self._boundary(f"claim:{gp.group}")
        with self.store.transaction() as ledger:
            holder = ledger.claim_for_group(gp.group)
            if gp.takeover and holder is not None and holder.owner.kind == "reservation" \
                    and holder.state == ClaimState.ACTIVE:
                # Borrow the reserved group: the devices stay where they are and keep
                # their recorded original drivers; release gives the group back.
                reservation = holder.owner.model_copy()
                for rec in holder.devices:
                    rec.role = "companion" if rec.pci in gp.companions else "requested"
                holder.owner, holder.state = plan.owner, ClaimState.CLAIMED
                holder.boot_id = self.sysfs.boot_id()
                ledger.put(holder)
                undo.append((f"claim:{gp.group}",
                             lambda g=gp.group, r=reservation: self._to_reservation(g, r)))
                log_action(log, logging.INFO, "claim", "%s borrows reserved group %s", plan.owner.label(),
                           gp.group, group=gp.group, owner=plan.owner, action="claim", result="borrowed")
                return
            if holder is not None and not holder.owner.same(plan.owner):
                # Lost a race with another owner since the plan was made: the planner's refusal.
                raise refused([held_refusal(str(gp.requested[0]) if gp.requested else "-", gp.group, holder.owner)])
            if holder is not None:
                raise Refused(f"IOMMU group {gp.group} is already being prepared for {plan.owner.label()}",
                              "wait for the first request to finish", reason=Reason.GROUP_BUSY)
            # Written ahead: every device this group's steps will bind is recorded as binding, with
            # what to give back, in this one durable write before the first sysfs write.
            targets = {s.pci: s.driver or VFIO for s in plan.steps if s.action == "bind" and s.group == gp.group}
            records = [self._record(a, "companion" if a in gp.companions else "requested",
                                    DeviceState.VFIO if a in gp.keep else DeviceState.HOST,
                                    target=None if a in gp.keep else targets.get(a)) for a in gp.bind]
            # A reservation's claim says so in the same transaction (never a second write).
            ledger.put(Claim(group=gp.group, owner=plan.owner, state=ClaimState.CLAIMED, devices=records,
                             reserved=plan.owner.kind == "reservation", boot_id=self.sysfs.boot_id()))
        log_action(log, logging.INFO, "claim", "claimed group %s for %s", gp.group, plan.owner.label(),
                   group=gp.group, owner=plan.owner, action="claim", result="ok")
        undo.append((f"claim:{gp.group}", lambda g=gp.group: self._drop_claim(g)))

    def _load_vfio_driver(self, driver: str) -> str:
        """Load the vfio driver's module if needed; its name in /sys/bus/pci/drivers (vfio-pci's
        module is vfio_pci, a variant's driver is named after its module)."""
        name = self.sysfs.pci_driver_name(driver)
        if name is None:
            if self.modprobe is None:
                raise ExecutionFailed(f"the {driver} driver is not loaded", f"run `modprobe {driver}`")
            self.modprobe(driver)
            name = self.sysfs.pci_driver_name(driver)
        return name or driver

    def _bind_step(self, plan: Plan, group: int, addr: PciAddress, undo: list, driver: str = VFIO) -> None:
        with self.telemetry.timed("bind"):
            self._bind_device(plan, group, addr, undo, driver)

    def _written_ahead(self, group: int, addr: PciAddress, driver: str) -> DeviceRecord | None:
        """The claim's record of this bind when the claim's own write recorded it (a fresh claim:
        binding, ours, to this driver); None when this bind needs its own intent (converging)."""
        claim = self.store.peek().claim_for_group(group)
        rec = claim.device(addr) if claim is not None and claim.state == ClaimState.CLAIMED else None
        if rec is None or rec.state != DeviceState.BINDING or not rec.bound_by_us \
                or rec.vfio_driver != recorded(driver):
            return None
        return rec.model_copy()

    def _bind_device(self, plan: Plan, group: int, addr: PciAddress, undo: list, driver: str) -> None:
        self._boundary(f"bind:{addr}")
        ahead = self._written_ahead(group, addr, driver)
        if same_driver(self.sysfs.driver(addr), driver):
            if ahead is None:       # written ahead: the activation records it on vfio
                self._set_state(group, addr, state=DeviceState.VFIO, vfio_driver=recorded(driver), durable=False)
            return
        driver = self._load_vfio_driver(driver)
        if ahead is not None:
            self._bind_writes(plan, group, addr, undo, driver, ahead)
            return
        # Intent first: a crash from here on leaves a record saying we were moving it. A device
        # recorded as found on vfio-pci (so never to be given back) that a converging prepare now
        # finds on a host driver gives back that driver. (A fresh claim's record stays as read at
        # the claim: host actions may have unloaded its driver since.)
        with self.store.transaction() as ledger:      # one read-modify-write, not a read and then one
            claim = ledger.held(group)
            rec = claim.device(addr)
            if rec is None:
                raise LedgerError(f"{addr} is not in the claim of IOMMU group {group}", "see `hostdevctl status`")
            if not rec.bound_by_us and rec.state == DeviceState.VFIO:
                rec.original_driver, rec.original_override = self.sysfs.driver(addr), self.sysfs.driver_override(addr)
            rec.move_to(DeviceState.BINDING)
            rec.bound_by_us = True
            rec.vfio_driver = recorded(driver)      # None for vfio-pci: what older ledgers meant
            ledger.put(claim)
            rec = rec.model_copy()
        self._bind_writes(plan, group, addr, undo, driver, rec)
        self._set_state(group, addr, state=DeviceState.VFIO, durable=False)      # an outcome: sysfs shows it

    def _bind_writes(self, plan: Plan, group: int, addr: PciAddress, undo: list, driver: str,
                     rec: DeviceRecord) -> None:
        """The sysfs writes of one bind, its intent (``rec``) already on disk."""
        undo.append((f"bind:{addr}", lambda r=rec, g=group: self._restore(g, r)))
        self.sysfs.set_driver_override(addr, driver)
        self.sysfs.unbind(addr)
        self.sysfs.drivers_probe(addr)
        if not wait_until(lambda: self.sysfs.driver(addr) == driver, self.verify_timeout):
            raise ExecutionFailed(f"{addr} did not bind to {driver} (driver is now {self.sysfs.driver(addr)})",
                                  f"check `dmesg` for {driver} errors")
        log_action(log, logging.INFO, "bind", "bound %s to %s (was %s)", addr, driver,
                   rec.original_driver or "no driver", address=addr, group=group, owner=plan.owner,
                   action="bind", result="ok")

    def _reset_step(self, plan: Plan, group: int, addr: PciAddress) -> None:
        self._boundary(f"reset:{addr}")
        if not self.sysfs.read_device(addr).has_reset:
            log_action(log, logging.WARNING, "reset", "%s has no reset method; not reset", addr,
                       address=addr, group=group, owner=plan.owner, action="reset", result="skipped")
            return
        self.sysfs.reset(addr)
        log_action(log, logging.INFO, "reset", "reset %s", addr, address=addr, group=group,
                   owner=plan.owner, action="reset", result="ok")

    def _rollback(self, plan: Plan, undo: list) -> tuple[list[str], list[str]]:
        """Undo in reverse. Returns what could not be undone, and what was undone on the host
        but could not be recorded (a ledger save failed: the claim stays in the ledger)."""
        failures: list[str] = []
        unrecorded: list[str] = []
        claim_kept = False
        # Modules come back first: a device can only return to a driver that is loaded.
        modules = [u for u in undo if u[0].startswith("unload_module:")]
        for name, fn in list(reversed(modules)) + [u for u in reversed(undo) if u not in modules]:
            if name.startswith("claim:") and failures:
                continue      # keep the claim (marked failed below): it records what was not given back
            try:
                fn()
            except Exception as e:  # keep undoing the rest
                if isinstance(e, LedgerSaveFailed) and name.startswith(("claim:", "bind:")):
                    # _restore gave the device back whatever the ledger says (sysfs is the truth);
                    # a claim's drop has nothing on the host to undo: only the record failed.
                    unrecorded.append(e.message if name.startswith("bind:") else
                                      f"the claim of group {name.split(':')[1]} stays: {e.message}")
                    claim_kept = claim_kept or name.startswith("claim:")
                    continue
                failures.append(f"{name}: {e}")
                log_action(log, logging.ERROR, "step_failed", "undo of %s failed: %s", name, e,
                           owner=plan.owner, action="rollback", result="failed")
        if not failures and not claim_kept:
            unrecorded = []     # every claim was dropped: its device records went with it
        if failures:
            # Keep what could not be undone visible, never silently forgotten.
            groups = {int(n.split(":")[1]) for n, _ in undo if n.startswith("claim:")}
            try:
                with self.store.transaction() as ledger:
                    for g in groups:
                        claim = ledger.claim_for_group(g)
                        if claim is None:
                            continue
                        claim.move_to(ClaimState.FAILED)
                        claim.notes.append("rollback incomplete: " + "; ".join(failures + unrecorded))
                        ledger.put(claim)
            except LedgerError as e:
                unrecorded.append(f"the claim could not be marked failed: {e.message}")
        return failures, unrecorded

    # ------------------------------------------------------------------ host actions

    # ------------------------------------------------------------------ restore
    def _restore(self, group: int, rec: DeviceRecord, ahead: bool = False) -> None:
        """Put one device back exactly as recorded (driver and driver_override).

        A reprobe is not enough: a VF with sriov_drivers_autoprobe=0 is never
        probed unless driver_override names a driver, and a device whose
        override pointed elsewhere would land on the wrong driver. ``ahead``: the
        release's intent was written ahead (device restoring) and its outcome is
        the release's to write; otherwise this device's own records are saved.
        """
        with self.telemetry.timed("unbind"):
            self._restore_device(group, rec, ahead)

    def _restore_device(self, group: int, rec: DeviceRecord, ahead: bool = False) -> None:
        addr = rec.pci
        self._boundary(f"restore:{addr}")
        if not self.sysfs.exists(addr):
            log_action(log, logging.WARNING, "restore", "%s is gone (hot-unplugged); dropped from the ledger", addr,
                       address=addr, group=group, action="restore", result="vanished")
            self._forget_device(group, addr)
            return
        # Intent first, but the device goes back even when this save fails: sysfs is the truth,
        # and the record on disk still names the original driver, so nothing is forgotten.
        unsaved = not ahead and self._try_state(group, addr, state=DeviceState.RESTORING) is not None
        want = rec.original_driver
        # Read before writing: after a reboot (or a hand's rebind) the device may be back already.
        if self.sysfs.driver(addr) == want and self.sysfs.driver_override(addr) == rec.original_override:
            if not ahead:
                self._restored(group, addr, want, unsaved)
            log_action(log, logging.INFO, "restore", "%s is on %s already; nothing to write", addr,
                       want or "no driver", address=addr, group=group, action="restore", result="ok")
            return
        self.sysfs.set_driver_override(addr, rec.original_override)
        current = self.sysfs.driver(addr)
        if current is not None and current != want:
            self.sysfs.unbind(addr)
        if want is not None and self.sysfs.driver(addr) != want:
            self.sysfs.drivers_probe(addr)
            if self.sysfs.driver(addr) != want and self.sysfs.driver_loaded(want):
                # Not probed (autoprobe off) or matched another driver: name it explicitly.
                if self.sysfs.driver(addr) is not None:
                    self.sysfs.unbind(addr)
                self.sysfs.set_driver_override(addr, want)
                try:
                    self.sysfs.drivers_probe(addr)
                finally:
                    self.sysfs.set_driver_override(addr, rec.original_override)
            if not wait_until(lambda: self.sysfs.driver(addr) == want, self.verify_timeout):
                raise ExecutionFailed(f"{addr} did not return to {want} (driver is now "
                                      f"{self.sysfs.driver(addr) or 'none'})",
                                      "check `dmesg`; bind it by hand with driverctl or sysfs")
        if not ahead:
            self._restored(group, addr, want, unsaved)
        log_action(log, logging.INFO, "restore", "returned %s to %s", addr, want or "no driver",
                   address=addr, group=group, action="restore", result="ok")

    def _try_state(self, group: int, addr: PciAddress, *, durable: bool = True,
                   **changes: object) -> LedgerSaveFailed | None:
        """_set_state, returning the save's failure instead of raising it."""
        try:
            self._set_state(group, addr, durable=durable, **changes)
        except LedgerSaveFailed as e:
            return e
        return None

    def _restored(self, group: int, addr: PciAddress, want: str | None, unsaved: bool) -> None:
        """Record a device given back (``unsaved``: its move to restoring was never saved: that
        first, the state table wants it); a failed save is raised after the fact, naming both."""
        err = self._try_state(group, addr, state=DeviceState.RESTORING) if unsaved else None
        if err is None:
            err = self._try_state(group, addr, state=DeviceState.HOST, bound_by_us=False, durable=False)
        if err is not None:
            log_action(log, logging.ERROR, "restore", "returned %s to %s, but the ledger could not record it: %s",
                       addr, want or "no driver", err.message, address=addr, group=group, action="restore",
                       result="unrecorded")
            raise LedgerSaveFailed(f"{addr} is back on {want or 'no driver'}, but the ledger could not record it: "
                                   f"{err.message}", err.hint, err=err.errno)

    # ------------------------------------------------------------------ release
    def release(self, plan: Plan) -> Result:
        """Give groups back to the host by running the planner's release steps, best effort;
        raise ExecutionFailed naming what stayed."""
        result = Result(ok=True)
        for gp in plan.groups:
            steps = [s for s in plan.steps if s.group == gp.group]
            if gp.group in plan.keep_claims:
                remaining = plan.keep_claims[gp.group]
                self._shrink_claim(gp.group, remaining)
                result.notes.append(f"group {gp.group} stays held for {', '.join(map(str, remaining))}")
                continue
            if gp.group in plan.to_reservation:
                self._boundary(f"release:{gp.group}")
                errs = self._run_release_steps(plan, gp.group, steps)
                result.notes += self.vf_net.take_notes(gp.group) + errs
                self._to_reservation(gp.group)
                log_action(log, logging.INFO, "release", "group %s back to its reservation (stays on vfio-pci)",
                           gp.group, group=gp.group, owner=plan.owner, action="release", result="reserved")
                result.groups.append(gp.group)
                continue
            err = self._release_group(plan, gp.group, steps)
            result.notes += self.vf_net.take_notes(gp.group)
            if err:
                result.ok = False
                result.errors.append(err)
            else:
                result.groups.append(gp.group)
        if not result.ok:
            raise ExecutionFailed("; ".join(result.errors), "see `hostdevctl status`; the ledger keeps the record")
        return result

    def _shrink_claim(self, group: int, remaining: list[PciAddress]) -> None:
        with self.store.transaction() as ledger:
            claim = ledger.held(group)
            for rec in claim.devices:
                if rec.role == "requested" and rec.pci not in remaining:
                    rec.role = "companion"
            ledger.put(claim)

    def _release_group(self, plan: Plan, group: int, steps: list[Step]) -> str | None:
        self._boundary(f"release:{group}")
        if self.store.peek().claim_for_group(group) is None:
            return None
        # R6, R14: rebind only after QEMU has closed the group node and every member's device cdev
        # (iommufd opens only those), or the host driver's probe hits EBUSY.
        if not wait_until(lambda: self.sysfs.vfio_users(group) == 0, self.release_wait, 0.1):
            msg = (f"group {group}: {open_nodes_text(self.sysfs.vfio_open_nodes(group))} still open; "
                   "devices left on their vfio drivers")
            with self.store.transaction() as ledger:
                busy = ledger.held(group)
                busy.move_to(ClaimState.FAILED)
                busy.notes.append(msg)
                ledger.put(busy)
            log_action(log, logging.ERROR, "release", msg, group=group, owner=plan.owner,
                       action="release", result="busy")
            return msg
        # Written ahead, in one durable write: the claim releasing and every device hostdevd bound
        # on its way back. A crash from here on is finished by reconciliation (it reads sysfs).
        with self.store.transaction() as ledger:
            releasing = ledger.claim_for_group(group)
            if releasing is None:
                return None
            releasing.move_to(ClaimState.RELEASING)
            for rec in releasing.devices:
                if rec.bound_by_us and allowed(DeviceState, rec.state, DeviceState.RESTORING):
                    rec.move_to(DeviceState.RESTORING)
            ledger.put(releasing)
        restored: set[str] = set()
        failures = self._run_release_steps(plan, group, steps, restored)
        self._boundary(f"drop:{group}")
        try:
            with self.store.transaction(durable=bool(failures)) as ledger:   # a clean drop is an outcome
                claim = ledger.claim_for_group(group)
                if not failures:
                    ledger.drop(group)
                elif claim is not None:
                    for rec in claim.devices:
                        if rec.address in restored and rec.state == DeviceState.RESTORING:
                            rec.move_to(DeviceState.HOST)
                            rec.bound_by_us = False
                    claim.move_to(ClaimState.FAILED)
                    claim.notes.append("release incomplete: " + "; ".join(failures))
                    ledger.put(claim)
        except LedgerSaveFailed as e:   # the devices went back; only the record of it failed
            failures.append(f"the ledger could not record the release: {e.message}")
        if failures:
            return f"group {group}: " + "; ".join(failures)
        log_action(log, logging.INFO, "release", "released group %s of %s", group, plan.owner.label(),
                   group=group, owner=plan.owner, action="release", result="ok")
        return None

    def _run_release_steps(self, plan: Plan, group: int, steps: list[Step],
                           restored: set[str] | None = None) -> list[str]:
        """The planner's order (modules back, VF settings back while on vfio-pci, devices back
        newest first, units started); each step best effort. Returns the failures. ``restored``:
        the release's intent was written ahead; the devices given back are added to it."""
        failures: list[str] = []
        for step in steps:
            claim = self.store.peek().claim_for_group(group)     # only looked at: parsed once per file version
            rec = claim.device(step.address) if claim is not None and step.address else None
            try:
                if step.action in ("load_module", "start_unit"):
                    kind = "module" if step.action == "load_module" else "unit"
                    act = next((a for a in claim.host_actions if a.kind == kind and a.name == step.name), None) \
                        if claim is not None else None
                    if act is not None:
                        failures += self._undo_host_actions(plan.owner, group, kind, [act])
                elif step.action == "restore_net" and rec is not None:
                    try:
                        self.vf_net.restore(plan, group, rec.pci)
                    except Exception as e:  # the others still get theirs back
                        log_action(log, logging.ERROR, "step_failed", "could not restore the settings of VF %s: %s",
                                   rec.address, e, address=rec.address, group=group, owner=plan.owner,
                                   action="restore_net", result="failed")
                        raise ExecutionFailed(f"{rec.address} MAC/VLAN: {e}") from e
                elif step.action in ("restore", "drop") and rec is not None and rec.bound_by_us:
                    self._restore(group, rec, ahead=restored is not None)   # a vanished one is dropped
                    if restored is not None:
                        restored.add(rec.address)
            except Exception as e:  # best effort: continue with the others
                failures.append(e.message if isinstance(e, ExecutionFailed) and step.action == "restore_net"
                                else f"{step.address or step.name}: {e}")
                if step.action in ("restore", "drop"):
                    log_action(log, logging.ERROR, "step_failed", "could not restore %s: %s", step.address, e,
                               address=step.address, group=group, owner=plan.owner, action="restore",
                               result="failed")
        return failures


__all__ = ["Executor", "Result", "RunResult", "Runner", "default_modprobe", "default_runner", "wait_until"]
