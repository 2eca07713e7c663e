"""The executor's host actions (config ``host_actions``): units stopped and modules unloaded
for a group before its first bind, each recorded in the claim before it runs; undone at
release and on rollback (modules back before the devices, units started after them). A unit
or module another claim also needs stays stopped until the last of them is released.
Commands go through an injectable runner so tests never stop a real unit.
"""
from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from .errors import ExecutionFailed
from .executor_base import ExecutorBase
from .ledger import HostActionRecord, Owner
from .logfields import log_action
from .planner import Plan, Step
from .states import HostActionState

log = logging.getLogger("hostdevd.executor")

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


class HostActionSteps(ExecutorBase):
    runner: Runner

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
            claim = ledger.held(group)
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
        name, timeout = step.target, step.timeout or 30.0
        self._boundary(f"{step.action}:{name}")
        what = f"unit {name}" if kind == "unit" else f"module {name}"
        running = self.unit_active(name, timeout) if kind == "unit" else self.sysfs.module_loaded(name)
        if not running:
            other = self._shared_action(group, kind, name)
            if other is not None:
                # Stopped for another group: this group needs it stopped too, so the last
                # release (not the first) brings it back.
                self._record_action(group, HostActionRecord(kind=kind, name=name, state=HostActionState.DONE,
                                                            timeout=timeout))
                undo.append((f"{step.action}:{name}", lambda: self._drop_action(group, kind, name)))
                note = f"already {'stopped' if kind == 'unit' else 'unloaded'} for group {other}"
            else:
                note = f"not {'active' if kind == 'unit' else 'loaded'}: nothing to do"
            log_action(log, logging.INFO, "host_action", "%s %s: %s", step.action.replace("_", " "), name, note,
                       group=group, owner=plan.owner, action=step.action, result="skipped")
            return
        # Intent first: a crash after the command leaves a record that release undoes.
        self._record_action(group, HostActionRecord(kind=kind, name=name, state=HostActionState.PENDING,
                                                    timeout=timeout))
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
        self._record_action(group, HostActionRecord(kind=kind, name=name, state=HostActionState.DONE, timeout=timeout))
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
