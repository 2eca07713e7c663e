"""The executor's VF network steps (R4, R6, R12): a VF's MAC/VLAN/spoof-check/trust read
through its PF before anything moves, set after bind and reset, put back on release while the
VF is still on vfio-pci; libvirt's own settings (managed='yes', hostdev networks) are recorded
and verified, never overwritten. The netlink calls go through :class:`~hostdevd.core.vfnet.VfNetManager`.
"""
from __future__ import annotations

import logging
import threading

from .address import PciAddress
from .errors import ExecutionFailed, HostdevError
from .executor_base import ExecutorBase
from .ledger import VfNetConfig
from .ledger_store import LedgerStore
from .logfields import log_action
from .netreq import NetRequest
from .states import VfNetState
from .sysfs import Sysfs
from .vfnet import VfNetManager

log = logging.getLogger("hostdevd.vfnet")


def vf_identity(sysfs: Sysfs, addr: PciAddress) -> tuple[str, int] | None:
    """(PF netdev, VF index) for a VF whose PF has a network interface; None otherwise."""
    found = sysfs.vf_index(addr)
    if found is None:
        return None
    pf, index = found
    nets = sysfs.read_device(pf).net
    return (nets[0], index) if nets else None


class VfNetSteps(ExecutorBase):
    """The executor's VF network steps: read through the PF before the bind, set after it,
    restored on release while the VF is still on vfio-pci; each change recorded in the claim
    (intent first) by the executor's own ``_set_state``."""

    def __init__(self, sysfs: Sysfs, manager: VfNetManager | None, store: LedgerStore):
        super().__init__(sysfs, store)
        self.manager = manager
        self._notes: dict[int, list[str]] = {}
        self._lock = threading.Lock()

    def take_notes(self, group: int) -> list[str]:
        with self._lock:
            return self._notes.pop(group, [])

    def _note(self, group: int, notes: list[str]) -> None:
        if notes:
            with self._lock:
                self._notes.setdefault(group, []).extend(notes)

    def _saved(self, group: int, addr: PciAddress) -> VfNetConfig | None:
        claim = self.store.read().claim_for_group(group)
        rec = claim.device(addr) if claim is not None else None
        return rec.vf_netconfig.model_copy() if rec is not None and rec.vf_netconfig is not None else None

    def save(self, plan, group: int, addr: PciAddress) -> VfNetConfig | None:
        """R4: read and record the VF's settings before anything moves (best effort)."""
        ident = vf_identity(self.sysfs, addr)
        if ident is None or self.manager is None:
            return None
        pf_netdev, index = ident
        try:
            now = self.manager.read(pf_netdev, index)
        except HostdevError as e:
            log_action(log, logging.WARNING, "sriov", "cannot read the settings of VF %s (%s VF %s): %s; they will "
                       "not be restored", addr, pf_netdev, index, e, address=addr, group=group, owner=plan.owner,
                       action="save_net", result="failed")
            cfg = VfNetConfig(pf_netdev=pf_netdev, vf_index=index, notes=[f"not saved: {e}"])
            self._set_state(group, addr, vf_netconfig=cfg)
            return cfg
        cfg = VfNetConfig(pf_netdev=pf_netdev, vf_index=index, **now.to_json())
        self._set_state(group, addr, vf_netconfig=cfg)
        log_action(log, logging.INFO, "sriov", "saved VF %s (%s VF %s): mac %s vlan %s spoofchk %s trust %s", addr,
                   pf_netdev, index, now.mac, now.vlan, now.spoofchk, now.trust, address=addr, group=group,
                   owner=plan.owner, action="save_net", result="ok")
        return cfg

    def apply(self, plan, group: int, addr: PciAddress, req: NetRequest, undo: list) -> None:
        """R4: set MAC/VLAN after bind and reset; or, when libvirt does it, record it (verified later)."""
        cfg = self._saved(group, addr)
        if cfg is None or (cfg.mac is None and cfg.notes):
            why = cfg.notes[0] if cfg is not None else "it is not a VF whose PF has a network interface"
            raise ExecutionFailed(f"{addr}: cannot set MAC/VLAN: {why}",
                                  "use <hostdev> without MAC/VLAN, or a VF of a network PF")
        if req.managed or req.libvirt_first:
            cfg.state, cfg.requested_mac, cfg.requested_vlan = VfNetState.LIBVIRT, req.mac, req.vlan
            if req.libvirt_first:
                cfg.mac = cfg.vlan = cfg.qos = cfg.spoofchk = cfg.trust = None
                cfg.notes.append("read after libvirt configured it (hostdev network): the original settings "
                                 "are libvirt's to restore")
            self._set_state(group, addr, vf_netconfig=cfg)
            log_action(log, logging.INFO, "sriov", "VF %s: libvirt sets mac %s vlan %s itself (managed='yes'); "
                       "recorded, verified after start", addr, req.mac, req.vlan, address=addr, group=group,
                       owner=plan.owner, action="set_net", result="libvirt")
            return
        if self.manager is None:
            raise ExecutionFailed(f"{addr}: cannot set MAC/VLAN: no netlink", "install pyroute2")
        # Intent first: from here on release and rollback restore the saved values.
        cfg.state, cfg.requested_mac, cfg.requested_vlan = VfNetState.SET, req.mac, req.vlan
        self._set_state(group, addr, vf_netconfig=cfg)
        undo.append((f"set_net:{addr}", lambda g=group, a=addr: self.restore(plan, g, a)))
        self.manager.apply(cfg.pf_netdev, cfg.vf_index, req.mac, req.vlan)
        diff = self.manager.verify(cfg.pf_netdev, cfg.vf_index, req.mac, req.vlan)
        if diff:
            raise ExecutionFailed(f"{addr} (VF {cfg.vf_index} of {cfg.pf_netdev}) did not take its settings: "
                                  f"{'; '.join(diff)}", "check `ip link show` on the PF and `dmesg`")
        log_action(log, logging.INFO, "sriov", "set VF %s (%s VF %s): mac %s vlan %s", addr, cfg.pf_netdev,
                   cfg.vf_index, req.mac, req.vlan, address=addr, group=group, owner=plan.owner,
                   action="set_net", result="ok")

    def verify(self, group: int, addr: PciAddress) -> list[str]:
        """After start: does the VF carry what the domain asked for (whoever set it)?"""
        cfg = self._saved(group, addr)
        if cfg is None or cfg.state == VfNetState.SAVED or self.manager is None:
            return []
        try:
            diff = self.manager.verify(cfg.pf_netdev, cfg.vf_index, cfg.requested_mac, cfg.requested_vlan)
        except HostdevError as e:
            diff = [f"cannot read it: {e}"]
        return [f"{addr} (VF {cfg.vf_index} of {cfg.pf_netdev}): {d}" for d in diff]

    def restore(self, plan, group: int, addr: PciAddress) -> list[str]:
        """R6: while the VF is still on vfio-pci, put back what hostdevd changed (``set``), or
        check that libvirt did (``libvirt``: recorded, never overwritten). Raises when a write fails."""
        cfg = self._saved(group, addr)
        if cfg is None or cfg.state == VfNetState.SAVED:
            return []
        owner = getattr(plan, "owner", None)
        if cfg.state == VfNetState.LIBVIRT:
            if self.manager is None:
                return []
            try:
                diff = self.manager.verify(cfg.pf_netdev, cfg.vf_index, cfg.mac, cfg.vlan)
            except HostdevError as e:
                diff = [f"cannot read it: {e}"]
            notes = [f"{addr}: libvirt left VF {cfg.vf_index} of {cfg.pf_netdev} changed: {'; '.join(diff)} "
                     "(recorded; hostdevd does not fight libvirt)"] if diff else []
            for n in notes:
                log_action(log, logging.WARNING, "sriov", "%s", n, address=addr, group=group, owner=owner,
                           action="restore_net", result="differs")
            self._note(group, notes)
            return notes
        if self.manager is None:
            raise ExecutionFailed(f"{addr}: cannot restore its MAC/VLAN: no netlink", "install pyroute2")
        notes = self.manager.restore(cfg.pf_netdev, cfg.vf_index, cfg)
        cfg.state, cfg.notes = VfNetState.SAVED, cfg.notes + notes
        self._set_state(group, addr, vf_netconfig=cfg)
        for n in notes:
            log_action(log, logging.WARNING, "sriov", "%s", n, address=addr, group=group, owner=owner,
                       action="restore_net", result="skipped")
        log_action(log, logging.INFO, "sriov", "restored VF %s (%s VF %s): mac %s vlan %s", addr, cfg.pf_netdev,
                   cfg.vf_index, cfg.mac, cfg.vlan, address=addr, group=group, owner=owner,
                   action="restore_net", result="ok")
        self._note(group, notes)
        return notes

    def restore_all(self, plan, group: int, records) -> list[str]:
        """Release: every VF of the group, newest first, best effort; returns failures."""
        failures = []
        for rec in reversed(records):
            if rec.vf_netconfig is None or rec.vf_netconfig.state == VfNetState.SAVED:
                continue
            try:
                self.restore(plan, group, rec.pci)
            except Exception as e:  # the others still get theirs back
                failures.append(f"{rec.address} MAC/VLAN: {e}")
                log_action(log, logging.ERROR, "step_failed", "could not restore the settings of VF %s: %s",
                           rec.address, e, address=rec.address, group=group, owner=getattr(plan, "owner", None),
                           action="restore_net", result="failed")
        return failures
