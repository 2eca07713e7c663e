"""The executor: the only writer.

Applies a :class:`~hostdevd.planner.Plan` to the host through
:class:`~hostdevd.sysfs.Sysfs`, recording intent in the ledger before each
step so a crash at any point leaves enough on disk to finish or undo it.

* Prepare is all-or-nothing: each step registers its undo the moment it
  succeeds; on failure the undos run in reverse and the claim is dropped
  (or kept as ``failed`` with a note naming what could not be undone).
* Release is best effort: each device's failure is logged and the rest
  continue (libvirt's reattach does the same); a group whose devices did not
  all come back keeps a ``failed`` claim so nothing is forgotten.
* Host actions (config ``host_actions``): units stopped and modules unloaded
  after the claim and before the first bind, each recorded in the claim
  before it runs; undone at release and on rollback with modules loaded
  *before* the devices go back to their drivers and units started *after*.
  Commands go through an injectable runner (``systemctl``, ``modprobe``).
* SR-IOV (R11): a :class:`~hostdevd.sriov.VfPlan` is applied here too, so the
  ``sriov_*`` writes also come from the only writer.
"""
from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .address import PciAddress
from .errors import ExecutionFailed, HostdevError, Refused
from .ledger import RESERVATION, Claim, DeviceRecord, HostActionRecord, LedgerStore, Owner, SriovRecord, now
from .logfields import log_action
from .planner import Plan, Step, held_refusal, refused
from .sriov import VfPlan, VfResult
from .sysfs import Sysfs
from .topology import VFIO
from .vf_wait import VfWaiter
from .vfnet import VfNetManager, VfNetSteps

log = logging.getLogger("hostdevd.executor")


def default_modprobe(module: str) -> None:
    proc = subprocess.run(["modprobe", module], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        msg = proc.stderr.strip() or f"exit status {proc.returncode}"
        raise ExecutionFailed(f"modprobe {module} failed: {msg}",
                              "is the module blacklisted (install ... /bin/false)? remove that line")


@dataclass
class RunResult:
    rc: int
    output: str = ""


Runner = Callable[[list[str], float], RunResult]


def default_runner(argv: list[str], timeout: float) -> RunResult:
    """Run a host command (systemctl, modprobe) with a timeout; the executor's only subprocess door
    for host actions, injectable so tests never stop a real unit."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ExecutionFailed(f"`{' '.join(argv)}` did not finish within {timeout:g} s",
                              "raise host_actions.timeout, or find out what holds it up "
                              "(`systemctl list-jobs`, `lsmod`)") from None
    except OSError as e:
        raise ExecutionFailed(f"cannot run {argv[0]}: {e.strerror or e}") from None
    return RunResult(proc.returncode, " ".join((proc.stderr or proc.stdout or "").split()))


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


@dataclass
class Result:
    ok: bool
    groups: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"ok": self.ok, "groups": self.groups, "errors": self.errors, "notes": self.notes}


class Executor:
    def __init__(self, sysfs: Sysfs, store: LedgerStore, *,
                 modprobe: Callable[[str], None] | None = default_modprobe,
                 verify_timeout: float = 5.0, release_wait: float = 10.0,
                 on_step: Callable[[str], None] | None = None, runner: Runner = default_runner,
                 vfnet: VfNetManager | None = None):
        self.sysfs = sysfs
        self.store = store
        # VF MAC/VLAN through the PF (R4/R6/R12); without a netlink backend VFs move without them.
        self.vf_net = VfNetSteps(sysfs, vfnet, store, self._set_state)
        self.modprobe = modprobe
        self.runner = runner
        self.verify_timeout = verify_timeout
        self.release_wait = release_wait
        # Called at every step boundary with a name ("claim:12", "bind:0000:01:00.0", ...);
        # tests use it to crash the executor at each boundary.
        self.on_step = on_step

    def _boundary(self, name: str) -> None:
        if self.on_step:
            self.on_step(name)

    # ------------------------------------------------------------------ SR-IOV
    def _record_sriov(self, pf: str, **changes) -> None:
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
                          refusals=[{"device": plan.pf, "reason": r, "hint": plan.hint} for r in plan.refusals])
        pf = PciAddress.parse(plan.pf)
        result = VfResult(plan.pf, plan.wanted, waiter=waiter.name)
        if plan.noop:
            result.vfs = [str(v) for v in self.sysfs.read_device(pf).virtfns]
            self._record_sriov(plan.pf, numvfs=plan.wanted, autoprobe=plan.autoprobe, state="ready", vfs=result.vfs,
                    previous_numvfs=plan.current, note=None)
            return result
        result.changed = True
        self._record_sriov(plan.pf, numvfs=plan.wanted, autoprobe=plan.autoprobe, state="changing",
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
            self._record_sriov(plan.pf, state="failed", note=str(e))
            log_action(log, logging.ERROR, "sriov", "setting %s VFs on %s failed: %s", plan.wanted, plan.pf, e,
                       address=plan.pf, action="sriov", result="failed")
            raise
        result.seconds = round(time.monotonic() - t0, 3) if plan.wanted else None
        result.vfs = [str(v) for v in self.sysfs.read_device(pf).virtfns]
        self._record_sriov(plan.pf, state="ready", vfs=result.vfs, seconds=result.seconds,
                note="; ".join(result.notes) or None)
        log_action(log, logging.INFO, "sriov", "%s now has %s VFs (was %s)%s", plan.pf, plan.wanted, plan.current,
                   f", seen by {waiter.name} after {result.seconds:.3f} s" if result.seconds is not None else "",
                   address=plan.pf, action="sriov", result="ok")
        return result

    # ------------------------------------------------------------------ prepare
    def prepare(self, plan: Plan) -> Result:
        """Apply a prepare plan; raise Refused/ExecutionFailed after rolling back."""
        if not plan.ok:
            raise plan.refused()
        undo: list[tuple[str, Callable[[], None]]] = []
        result = Result(ok=True)
        try:
            for gp in plan.groups:
                steps = [s for s in plan.steps if s.group == gp.group]
                if gp.already_held:
                    self.promote(gp.group, gp.requested)
                    result.groups.append(gp.group)
                    continue
                self._claim(plan, gp, undo)
                for step in steps:
                    if step.action == "bind":
                        self._bind_step(plan, gp.group, PciAddress.parse(step.address), undo)
                    elif step.action == "reset":
                        self._reset_step(plan, gp.group, PciAddress.parse(step.address))
                    elif step.action in ("stop_unit", "unload_module"):
                        self._host_action_step(plan, gp.group, step, undo)
                    elif step.action == "save_net":
                        self._boundary(f"save_net:{step.address}")
                        self.vf_net.save(plan, gp.group, PciAddress.parse(step.address))
                    elif step.action == "set_net":
                        self._boundary(f"set_net:{step.address}")
                        self.vf_net.apply(plan, gp.group, PciAddress.parse(step.address), plan.net[step.address],
                                          undo)
                self._boundary(f"activate:{gp.group}")
                with self.store.transaction() as ledger:
                    claim = ledger.claim_for_group(gp.group)
                    claim.state = "active"
                    ledger.put(claim)
                log_action(log, logging.INFO, "claim", "group %s active for %s", gp.group, plan.owner.label(),
                           group=gp.group, owner=plan.owner, action="prepare", result="ok")
                result.groups.append(gp.group)
        except Exception as e:
            failures = self._rollback(plan, undo)
            msg = str(e)
            if failures:
                msg += "; rollback incomplete: " + "; ".join(failures)
            log_action(log, logging.ERROR, "rollback", "prepare for %s failed, rolled back: %s",
                       plan.owner.label(), msg, owner=plan.owner, action="prepare", result="failed")
            if isinstance(e, HostdevError) and not failures:
                raise
            raise ExecutionFailed(msg, getattr(e, "hint", None)) from e
        return result

    def promote(self, group: int, requested: list[str]) -> None:
        """Companions of a held group the owner now uses itself become requested (refcount, R6)."""
        with self.store.transaction() as ledger:
            claim = ledger.claim_for_group(group)
            if claim is None:
                return
            for rec in claim.devices:
                if rec.address in requested:
                    rec.role = "requested"
            ledger.put(claim)

    def _claim(self, plan: Plan, gp, undo: list) -> None:
        """Record the claim atomically: a racing owner loses here, before any sysfs write."""
        self._boundary(f"claim:{gp.group}")
        with self.store.transaction() as ledger:
            holder = ledger.claim_for_group(gp.group)
            if gp.takeover and holder is not None and holder.owner.kind == "reservation" \
                    and holder.state == "active":
                # Borrow the reserved group: the devices stay where they are and keep
                # their recorded original drivers; release gives the group back.
                reservation = holder.owner.model_copy()
                for rec in holder.devices:
                    rec.role = "companion" if rec.address in gp.companions else "requested"
                holder.owner, holder.state = plan.owner, "claimed"
                ledger.put(holder)
                undo.append((f"claim:{gp.group}",
                             lambda g=gp.group, r=reservation: self._to_reservation(g, r)))
                log_action(log, logging.INFO, "claim", "%s borrows reserved group %s", plan.owner.label(),
                           gp.group, group=gp.group, owner=plan.owner, action="claim", result="borrowed")
                return
            if holder is not None and not holder.owner.same(plan.owner):
                # Lost a race with another owner since the plan was made: the planner's refusal.
                raise refused([held_refusal(gp.requested[0] if gp.requested else "-", gp.group, holder.owner)])
            if holder is not None:
                raise Refused(f"IOMMU group {gp.group} is already being prepared for {plan.owner.label()}",
                              "wait for the first request to finish")
            records = []
            for a in gp.bind:
                addr = PciAddress.parse(a)
                records.append(DeviceRecord(
                    address=a, role="companion" if a in gp.companions else "requested",
                    state="vfio" if a in gp.keep else "host",
                    # Read live: the topology may be seconds old.
                    original_driver=self.sysfs.driver(addr),
                    original_override=self.sysfs.driver_override(addr),
                    bound_by_us=False))
            # A reservation's claim says so in the same transaction (never a second write).
            ledger.put(Claim(group=gp.group, owner=plan.owner, state="claimed", devices=records,
                             reserved=plan.owner.kind == "reservation"))
        log_action(log, logging.INFO, "claim", "claimed group %s for %s", gp.group, plan.owner.label(),
                   group=gp.group, owner=plan.owner, action="claim", result="ok")
        undo.append((f"claim:{gp.group}", lambda g=gp.group: self._drop_claim(g)))

    def _set_state(self, group: int, addr: PciAddress, **changes) -> DeviceRecord:
        with self.store.transaction() as ledger:
            claim = ledger.claim_for_group(group)
            rec = claim.device(addr)
            for k, v in changes.items():
                setattr(rec, k, v)
            ledger.put(claim)
            return rec.model_copy()

    def _bind_step(self, plan: Plan, group: int, addr: PciAddress, undo: list) -> None:
        self._boundary(f"bind:{addr}")
        if self.sysfs.driver(addr) == VFIO:
            self._set_state(group, addr, state="vfio")
            return
        if not self.sysfs.driver_loaded(VFIO):
            if self.modprobe is None:
                raise ExecutionFailed("the vfio-pci driver is not loaded", "run `modprobe vfio-pci`")
            self.modprobe(VFIO)
        # Intent first: a crash from here on leaves a record saying we were moving it.
        rec = self._set_state(group, addr, state="binding", bound_by_us=True)
        undo.append((f"bind:{addr}", lambda r=rec, g=group: self._restore(g, r)))
        self.sysfs.set_driver_override(addr, VFIO)
        self.sysfs.unbind(addr)
        self.sysfs.drivers_probe(addr)
        if not wait_until(lambda: self.sysfs.driver(addr) == VFIO, self.verify_timeout):
            raise ExecutionFailed(f"{addr} did not bind to vfio-pci (driver is now {self.sysfs.driver(addr)})",
                                  "check `dmesg` for vfio-pci errors")
        self._set_state(group, addr, state="vfio")
        log_action(log, logging.INFO, "bind", "bound %s to vfio-pci (was %s)", addr,
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

    # ------------------------------------------------------------------ records others decide
    # Reconciliation and reservations decide; these write what they decided (one writer).
    def record_reservations(self, addresses: list[str]) -> None:
        with self.store.transaction() as ledger:
            ledger.reservations = list(addresses)

    def unreserve(self, group: int) -> None:
        """A reservation no longer configured: its claim becomes an ordinary one (released next)."""
        with self.store.transaction() as ledger:
            claim = ledger.claim_for_group(group)
            if claim is not None:
                claim.reserved = False
                ledger.put(claim)

    def adopt(self, claim: Claim) -> bool:
        """Record a claim for a group a running domain already uses; False when one exists."""
        with self.store.transaction() as ledger:
            if ledger.claim_for_group(claim.group) is not None:
                return False
            ledger.put(claim)
            return True

    def complete_prepare(self, group: int, on_vfio: set[str], note: str) -> None:
        """Reconciliation found an interrupted prepare whose binds all finished and whose domain
        runs with the devices: mark what is on vfio-pci and activate the claim."""
        with self.store.transaction() as ledger:
            claim = ledger.claim_for_group(group)
            if claim is None:
                return
            for rec in claim.devices:
                if rec.address in on_vfio:
                    rec.state = "vfio"
            claim.state = "active"
            claim.notes.append(f"{now()}: {note}")
            ledger.put(claim)

    def _to_reservation(self, group: int, reservation: Owner | None = None) -> None:
        with self.store.transaction() as ledger:
            claim = ledger.claim_for_group(group)
            if claim is None:
                return
            claim.owner = reservation or Owner(**RESERVATION)
            claim.state = "active"
            for rec in claim.devices:
                rec.role = "requested"
            ledger.put(claim)

    def _drop_claim(self, group: int) -> None:
        with self.store.transaction() as ledger:
            ledger.drop(group)

    def _rollback(self, plan: Plan, undo: list) -> list[str]:
        failures = []
        # Modules come back first: a device can only return to a driver that is loaded.
        modules = [u for u in undo if u[0].startswith("unload_module:")]
        for name, fn in list(reversed(modules)) + [u for u in reversed(undo) if u not in modules]:
            try:
                fn()
            except Exception as e:  # keep undoing the rest
                failures.append(f"{name}: {e}")
                log_action(log, logging.ERROR, "step_failed", "undo of %s failed: %s", name, e,
                           owner=plan.owner, action="rollback", result="failed")
        if failures:
            # Keep what could not be undone visible, never silently forgotten.
            groups = {int(n.split(":")[1]) for n, _ in undo if n.startswith("claim:")}
            with self.store.transaction() as ledger:
                for g in groups:
                    claim = ledger.claim_for_group(g)
                    if claim is None:
                        continue
                    claim.state = "failed"
                    claim.notes.append("rollback incomplete: " + "; ".join(failures))
                    ledger.put(claim)
        return failures

    # ------------------------------------------------------------------ host actions
    def _run(self, argv: list[str], timeout: float) -> RunResult:
        return self.runner(argv, timeout)

    def unit_active(self, unit: str, timeout: float = 30.0) -> bool:
        return self._run(["systemctl", "is-active", "--quiet", unit], timeout).rc == 0

    def _shared_action(self, group: int, kind: str, name: str) -> int | None:
        """Another claim that records the same unit/module (it stopped it first): its group."""
        for c in self.store.read().claims.values():
            if c.group != group and any(a.kind == kind and a.name == name for a in c.host_actions):
                return c.group
        return None

    def _record_action(self, group: int, rec: HostActionRecord) -> None:
        with self.store.transaction() as ledger:
            claim = ledger.claim_for_group(group)
            claim.host_actions = [a for a in claim.host_actions
                                  if not (a.kind == rec.kind and a.name == rec.name)] + [rec]
            ledger.put(claim)

    def _drop_action(self, group: int, kind: str, name: str) -> None:
        with self.store.transaction() as ledger:
            claim = ledger.claim_for_group(group)
            if claim is None:
                return
            claim.host_actions = [a for a in claim.host_actions if not (a.kind == kind and a.name == name)]
            ledger.put(claim)

    def _host_action_step(self, plan: Plan, group: int, step: Step, undo: list) -> None:
        """Stop a unit / unload a module before binding (config host_actions); undo registered."""
        kind = "unit" if step.action == "stop_unit" else "module"
        name, timeout = step.name, step.timeout or 30.0
        self._boundary(f"{step.action}:{name}")
        what = f"unit {name}" if kind == "unit" else f"module {name}"
        running = self.unit_active(name, timeout) if kind == "unit" else self.sysfs.module_loaded(name)
        if not running:
            other = self._shared_action(group, kind, name)
            if other is not None:
                # Stopped for another group: this group needs it stopped too, so the last
                # release (not the first) brings it back.
                self._record_action(group, HostActionRecord(kind=kind, name=name, state="done", timeout=timeout))
                undo.append((f"{step.action}:{name}", lambda: self._drop_action(group, kind, name)))
                note = f"already {'stopped' if kind == 'unit' else 'unloaded'} for group {other}"
            else:
                note = f"not {'active' if kind == 'unit' else 'loaded'}: nothing to do"
            log_action(log, logging.INFO, "host_action", "%s %s: %s", step.action.replace("_", " "), name, note,
                       group=group, owner=plan.owner, action=step.action, result="skipped")
            return
        # Intent first: a crash after the command leaves a record that release undoes.
        self._record_action(group, HostActionRecord(kind=kind, name=name, state="pending", timeout=timeout))
        undo_fn = lambda: self._undo_host_action(plan.owner, group, kind, name, timeout)  # noqa: E731
        undo.append((f"{step.action}:{name}", undo_fn))
        argv = ["systemctl", "stop", name] if kind == "unit" else ["modprobe", "-r", name]
        t0 = time.monotonic()
        res = self._run(argv, timeout)
        if res.rc != 0:
            log_action(log, logging.ERROR, "host_action", "%s %s failed: %s", step.action.replace("_", " "), name,
                       res.output or f"exit status {res.rc}", group=group, owner=plan.owner, action=step.action,
                       result="failed")
            raise ExecutionFailed(f"`{' '.join(argv)}` failed for group {group}: "
                                  f"{res.output or f'exit status {res.rc}'}",
                                  f"the host still uses {what}; see host_actions in /etc/hostdevd/hostdevd.toml")
        if kind == "module" and self.sysfs.module_loaded(name):
            raise ExecutionFailed(f"module {name} is still loaded after `modprobe -r {name}`",
                                  "something holds it (lsmod shows the users)")
        self._record_action(group, HostActionRecord(kind=kind, name=name, state="done", timeout=timeout))
        log_action(log, logging.INFO, "host_action", "%s %s for group %s (%.0f ms)", "stopped" if kind == "unit"
                   else "unloaded", what, group, (time.monotonic() - t0) * 1000, group=group, owner=plan.owner,
                   action=step.action, result="ok")

    # Undo of a host action: (argv, what the log says it did, the hint when it fails).
    _HOST_UNDO = {
        "unit": (("systemctl", "start"), "start_unit", "started unit %s again (group %s)", "start it by hand"),
        "module": (("modprobe",), "load_module", "loaded module %s again (group %s)", "load it by hand"),
    }

    def _undo_host_action(self, owner: Owner | None, group: int, kind: str, name: str, timeout: float) -> None:
        """Start a stopped unit or load an unloaded module again, then drop its record."""
        argv, action, done, hint = self._HOST_UNDO[kind]
        cmd = " ".join(argv + (name,))
        self._boundary(f"{action}:{name}")
        res = self._run([*argv, name], timeout)
        if res.rc != 0:
            why = res.output or f"exit status {res.rc}"
            log_action(log, logging.ERROR, "host_action", "%s failed: %s", cmd, why, group=group, owner=owner,
                       action=action, result="failed")
            raise ExecutionFailed(f"`{cmd}` failed: {why}", f"{hint}: {cmd}")
        self._drop_action(group, kind, name)
        log_action(log, logging.INFO, "host_action", done, name, group, group=group, owner=owner, action=action,
                   result="ok")

    def _undo_host_actions(self, owner: Owner, group: int, kind: str, records: list[HostActionRecord]
                           ) -> list[str]:
        """Release side: load modules / start units this claim recorded, newest first; best effort."""
        failures = []
        for act in reversed(records):
            if act.kind != kind:
                continue
            other = self._shared_action(group, act.kind, act.name)
            if other is not None:
                self._drop_action(group, act.kind, act.name)
                log_action(log, logging.INFO, "host_action", "%s %s stays %s: group %s still needs it", act.kind,
                           act.name, "stopped" if kind == "unit" else "unloaded", other, group=group, owner=owner,
                           action="start_unit" if kind == "unit" else "load_module", result="deferred")
                continue
            try:
                self._undo_host_action(owner, group, kind, act.name, act.timeout)
            except Exception as e:  # best effort, like every release step
                failures.append(f"{act.kind} {act.name}: {e}")
        return failures

    # ------------------------------------------------------------------ restore
    def _restore(self, group: int, rec: DeviceRecord) -> None:
        """Put one device back exactly as recorded (driver and driver_override).

        A reprobe is not enough: a VF with sriov_drivers_autoprobe=0 is never
        probed unless driver_override names a driver, and a device whose
        override pointed elsewhere would land on the wrong driver.
        """
        addr = rec.pci
        self._boundary(f"restore:{addr}")
        if not self.sysfs.exists(addr):
            log_action(log, logging.WARNING, "restore", "%s is gone (hot-unplugged); dropped from the ledger", addr,
                       address=addr, group=group, action="restore", result="vanished")
            self._forget_device(group, addr)
            return
        self._set_state(group, addr, state="restoring")
        want = rec.original_driver
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
        self._set_state(group, addr, state="host", bound_by_us=False)
        log_action(log, logging.INFO, "restore", "returned %s to %s", addr, want or "no driver",
                   address=addr, group=group, action="restore", result="ok")

    def _forget_device(self, group: int, addr: PciAddress) -> None:
        with self.store.transaction() as ledger:
            claim = ledger.claim_for_group(group)
            if claim is not None:
                claim.devices = [d for d in claim.devices if d.address != str(addr)]
                claim.notes.append(f"{addr} vanished; dropped")
                ledger.put(claim)

    def forget_vanished(self, group: int, addr: PciAddress) -> str:
        """A claimed device disappeared from the host (hot-unplug, VFs removed): drop its record.

        The caller holds the group lock. A claim left without devices is dropped
        with it, its host actions undone. Returns what was done ("device", "claim",
        or "" when nothing was recorded or the device is back).
        """
        if self.sysfs.exists(addr):
            return ""
        claim = self.store.read().claim_for_group(group)
        if claim is None or claim.device(addr) is None:
            return ""
        owner = claim.owner
        self._forget_device(group, addr)
        log_action(log, logging.WARNING, "release", "%s is gone from the host; dropped from the claim of %s",
                   addr, owner.label(), address=addr, group=group, owner=owner, action="vanished",
                   result="dropped")
        claim = self.store.read().claim_for_group(group)
        if claim is None or claim.devices:
            return "device"
        failures = self._undo_host_actions(owner, group, "module", claim.host_actions)
        failures += self._undo_host_actions(owner, group, "unit", claim.host_actions)
        with self.store.transaction() as ledger:
            c = ledger.claim_for_group(group)
            if c is not None and not c.devices:
                if failures:
                    c.state = "failed"
                    c.notes.append("every device vanished; host actions not undone: " + "; ".join(failures))
                    ledger.put(c)
                else:
                    ledger.drop(group)
        log_action(log, logging.WARNING, "release", "group %s of %s has no device left; claim dropped", group,
                   owner.label(), group=group, owner=owner, action="vanished", result="dropped")
        return "claim"

    # ------------------------------------------------------------------ release
    def release(self, plan: Plan) -> Result:
        """Give groups back to the host by running the planner's release steps, best effort;
        raise ExecutionFailed naming what stayed."""
        result = Result(ok=True)
        for gp in plan.groups:
            steps = [s for s in plan.steps if s.group == gp.group]
            if gp.group in plan.keep_claims:
                self._shrink_claim(gp.group, plan.keep_claims[gp.group])
                result.notes.append(f"group {gp.group} stays held for {', '.join(plan.keep_claims[gp.group])}")
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

    def _shrink_claim(self, group: int, remaining: list[str]) -> None:
        with self.store.transaction() as ledger:
            claim = ledger.claim_for_group(group)
            for rec in claim.devices:
                if rec.role == "requested" and rec.address not in remaining:
                    rec.role = "companion"
            ledger.put(claim)

    def _release_group(self, plan: Plan, group: int, steps: list[Step]) -> str | None:
        self._boundary(f"release:{group}")
        with self.store.transaction() as ledger:
            claim = ledger.claim_for_group(group)
            if claim is None:
                return None
            claim.state = "releasing"
            ledger.put(claim)
        # R6: rebind only after QEMU has closed the group, or the host driver's probe hits EBUSY.
        if not wait_until(lambda: self.sysfs.vfio_group_users(group) == 0, self.release_wait, 0.1):
            msg = f"group {group}: /dev/vfio/{group} is still open; devices left on vfio-pci"
            with self.store.transaction() as ledger:
                claim = ledger.claim_for_group(group)
                claim.state = "failed"
                claim.notes.append(msg)
                ledger.put(claim)
            log_action(log, logging.ERROR, "release", msg, group=group, owner=plan.owner,
                       action="release", result="busy")
            return msg
        failures = self._run_release_steps(plan, group, steps)
        self._boundary(f"drop:{group}")
        with self.store.transaction() as ledger:
            claim = ledger.claim_for_group(group)
            if not failures:
                ledger.drop(group)
            elif claim is not None:
                claim.state = "failed"
                claim.notes.append("release incomplete: " + "; ".join(failures))
                ledger.put(claim)
        if failures:
            return f"group {group}: " + "; ".join(failures)
        log_action(log, logging.INFO, "release", "released group %s of %s", group, plan.owner.label(),
                   group=group, owner=plan.owner, action="release", result="ok")
        return None

    def _run_release_steps(self, plan: Plan, group: int, steps: list[Step]) -> list[str]:
        """The planner's order (modules back, VF settings back while on vfio-pci, devices back
        newest first, units started); each step best effort. Returns the failures."""
        failures: list[str] = []
        for step in steps:
            claim = self.store.read().claim_for_group(group)
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
                    self._restore(group, rec)        # a vanished device is dropped from the record
            except Exception as e:  # best effort: continue with the others
                failures.append(e.message if isinstance(e, ExecutionFailed) and step.action == "restore_net"
                                else f"{step.address or step.name}: {e}")
                if step.action in ("restore", "drop"):
                    log_action(log, logging.ERROR, "step_failed", "could not restore %s: %s", step.address, e,
                               address=step.address, group=group, owner=plan.owner, action="restore",
                               result="failed")
        return failures
