"""VF network settings through the PF (R12): the rules around a netlink backend.

A VF's MAC, VLAN (and QoS), spoof-check and trust are administrative settings the PF's
driver keeps (``ip link set <pf> vf N mac … vlan …``; netlink ``RTM_SETLINK`` with
``IFLA_VFINFO_LIST``). They survive the VF moving between drivers, so a guest's MAC
would stay on the VF after the guest is gone unless somebody puts the old values back.

* :class:`NetlinkBackend` is the protocol: read a PF's VF table, set one VF's attributes.
  :class:`hostdevd.adapters.netlink.Pyroute2Backend` is the real one (pyroute2: the core
  runs without it); :class:`hostdevd.sim.fakenetlink.FakeNetlink` is an in-memory peer for
  tests (PF netdevs with VF tables, a driver that refuses the all-zero MAC, a VF that
  answers EAGAIN N times).
* :class:`VfNetManager` adds the rules: retry while the driver says the VF is still in
  reset (EAGAIN/EBUSY, bounded by ``retry_timeout``); never write 00:00:00:00:00:00 to a
  driver that refused it once (the restore is skipped and the reason recorded);
  compare what the PF reports with what was asked (``verify``).
* :class:`VfNetSteps` is what the executor calls, in R4/R6 order: ``save`` before bind,
  ``apply`` after bind and reset (when the request carries a MAC/VLAN and libvirt does
  not set it itself), ``restore`` on release while the VF is still on vfio-pci. Each
  records intent in the ledger (``DeviceRecord.vf_netconfig``) before it writes.

libvirt sets MAC/VLAN itself for every ``<interface type='hostdev'>`` (virhostdev.c,
"Loop 4: For SRIOV network devices … set the netdev config"), after the prepare hook.
hostdevd never fights it: with ``managed='yes'`` it records what libvirt will set and
verifies it later; with ``managed='no'`` hostdevd sets the same values first (so it is
hostdevd's saved copy that holds the true original) and restores them after libvirt's own
restore.
"""
from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .address import PciAddress
from .errors import ExecutionFailed, HostdevError, NetlinkError
from .ledger import VfNetConfig
from .logfields import log_action
from .netreq import NetRequest
from .sysfs import Sysfs

log = logging.getLogger("hostdevd.vfnet")

ZERO_MAC = "00:00:00:00:00:00"
RETRY_ERRNOS = (errno.EAGAIN, errno.EBUSY)


@dataclass
class VfNet:
    """One VF as its PF reports it (None: the driver does not report that attribute)."""
    mac: str | None = None
    vlan: int | None = None
    qos: int | None = None
    spoofchk: bool | None = None
    trust: bool | None = None

    def to_json(self) -> dict:
        return {"mac": self.mac, "vlan": self.vlan, "qos": self.qos, "spoofchk": self.spoofchk,
                "trust": self.trust}


class NetlinkBackend(Protocol):
    def vf_table(self, pf_netdev: str) -> dict[int, VfNet]:
        """Every VF the PF reports (RTM_GETLINK with IFLA_EXT_MASK = RTEXT_FILTER_VF)."""

    def set_vf(self, pf_netdev: str, vf: int, *, mac: str | None = None, vlan: int | None = None,
               qos: int | None = None, spoofchk: bool | None = None, trust: bool | None = None) -> None:
        """One RTM_SETLINK; raises NetlinkError with the kernel's errno."""


# --------------------------------------------------------------------------- rules


class VfNetManager:
    """Read, set, restore and verify VF settings with the retry and zero-MAC rules."""

    def __init__(self, backend: NetlinkBackend, retry_timeout: float = 5.0, retry_interval: float = 0.05,
                 sleep: Callable[[float], None] = time.sleep):
        self.backend = backend
        self.retry_timeout = retry_timeout
        self.retry_interval = retry_interval
        self.sleep = sleep
        # PF netdevs whose driver refused the all-zero MAC: never written to them again.
        self.zero_mac_refused: set[str] = set()
        self.retries = 0                        # how often a set was retried (tests, logs)

    def read(self, pf_netdev: str, vf: int) -> VfNet:
        table = self.backend.vf_table(pf_netdev)
        if vf not in table:
            raise NetlinkError(f"{pf_netdev} reports no VF {vf} (it lists {len(table)} VFs)",
                               "the VF count changed, or the PF driver does not report its VFs", errno.ENOENT)
        return table[vf]

    def set(self, pf_netdev: str, vf: int, **attrs) -> None:
        """One setting, retried while the driver says the VF is still resetting (EAGAIN/EBUSY)."""
        attrs = {k: v for k, v in attrs.items() if v is not None}
        if not attrs:
            return
        deadline = time.monotonic() + self.retry_timeout
        delay = self.retry_interval
        tries = 0
        while True:
            tries += 1
            try:
                self.backend.set_vf(pf_netdev, vf, **attrs)
                return
            except NetlinkError as e:
                if e.errno not in RETRY_ERRNOS or time.monotonic() + delay > deadline:
                    if e.errno in RETRY_ERRNOS:
                        e.message += f" (still busy after {tries} tries in {self.retry_timeout:g} s)"
                        e.hint = "the VF did not come out of reset; check `dmesg` for the PF driver"
                    raise
                self.retries += 1
                self.sleep(delay)
                delay = min(delay * 2, 0.5)

    def apply(self, pf_netdev: str, vf: int, mac: str | None, vlan: int | None, qos: int | None = None) -> None:
        if vlan is not None:
            self.set(pf_netdev, vf, vlan=vlan, qos=qos or 0)
        if mac is not None:
            self.set(pf_netdev, vf, mac=mac)

    def restore(self, pf_netdev: str, vf: int, saved: VfNetConfig) -> list[str]:
        """Put the saved values back; returns notes for what was deliberately not written."""
        notes: list[str] = []
        if saved.vlan is not None:
            self.set(pf_netdev, vf, vlan=saved.vlan, qos=saved.qos or 0)
        if saved.spoofchk is not None:
            self.set(pf_netdev, vf, spoofchk=saved.spoofchk)
        if saved.trust is not None:
            self.set(pf_netdev, vf, trust=saved.trust)
        if saved.mac is not None:
            if saved.mac == ZERO_MAC and pf_netdev in self.zero_mac_refused:
                notes.append(f"VF {vf} of {pf_netdev}: MAC {ZERO_MAC} not restored (this PF's driver refuses the "
                             "all-zero MAC); the VF keeps its last MAC")
            else:
                try:
                    self.set(pf_netdev, vf, mac=saved.mac)
                except NetlinkError as e:
                    if saved.mac != ZERO_MAC or e.errno != errno.EINVAL:
                        raise
                    self.zero_mac_refused.add(pf_netdev)
                    notes.append(f"VF {vf} of {pf_netdev}: the driver refused MAC {ZERO_MAC} (EINVAL); the VF keeps "
                                 "its last MAC, and hostdevd will not write the all-zero MAC to this PF again")
        return notes

    def verify(self, pf_netdev: str, vf: int, mac: str | None, vlan: int | None) -> list[str]:
        """What differs between the PF's report and the expectation (empty when all match)."""
        now = self.read(pf_netdev, vf)
        out = []
        if mac is not None and (now.mac or "").lower() != mac.lower():
            out.append(f"MAC is {now.mac}, expected {mac}")
        if vlan is not None and now.vlan is not None and now.vlan != vlan:
            out.append(f"VLAN is {now.vlan}, expected {vlan}")
        return out


# --------------------------------------------------------------------------- executor side


def vf_identity(sysfs: Sysfs, addr: PciAddress) -> tuple[str, int] | None:
    """(PF netdev, VF index) for a VF whose PF has a network interface; None otherwise."""
    found = sysfs.vf_index(addr)
    if found is None:
        return None
    pf, index = found
    nets = sysfs.read_device(pf).net
    return (nets[0], index) if nets else None


class VfNetSteps:
    """The executor's VF network steps. ``set_state(group, addr, **changes)`` updates a
    DeviceRecord in the ledger (the executor's own helper); ``store`` reads it back."""

    def __init__(self, sysfs: Sysfs, manager: VfNetManager | None, store, set_state: Callable[..., object]):
        self.sysfs = sysfs
        self.manager = manager
        self.store = store
        self.set_state = set_state
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
            self.set_state(group, addr, vf_netconfig=cfg)
            return cfg
        cfg = VfNetConfig(pf_netdev=pf_netdev, vf_index=index, **now.to_json())
        self.set_state(group, addr, vf_netconfig=cfg)
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
            cfg.state, cfg.requested_mac, cfg.requested_vlan = "libvirt", req.mac, req.vlan
            if req.libvirt_first:
                cfg.mac = cfg.vlan = cfg.qos = cfg.spoofchk = cfg.trust = None
                cfg.notes.append("read after libvirt configured it (hostdev network): the original settings "
                                 "are libvirt's to restore")
            self.set_state(group, addr, vf_netconfig=cfg)
            log_action(log, logging.INFO, "sriov", "VF %s: libvirt sets mac %s vlan %s itself (managed='yes'); "
                       "recorded, verified after start", addr, req.mac, req.vlan, address=addr, group=group,
                       owner=plan.owner, action="set_net", result="libvirt")
            return
        if self.manager is None:
            raise ExecutionFailed(f"{addr}: cannot set MAC/VLAN: no netlink", "install pyroute2")
        # Intent first: from here on release and rollback restore the saved values.
        cfg.state, cfg.requested_mac, cfg.requested_vlan = "set", req.mac, req.vlan
        self.set_state(group, addr, vf_netconfig=cfg)
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
        if cfg is None or cfg.state == "saved" or self.manager is None:
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
        if cfg is None or cfg.state == "saved":
            return []
        owner = getattr(plan, "owner", None)
        if cfg.state == "libvirt":
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
        cfg.state, cfg.notes = "saved", cfg.notes + notes
        self.set_state(group, addr, vf_netconfig=cfg)
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
            if rec.vf_netconfig is None or rec.vf_netconfig.state == "saved":
                continue
            try:
                self.restore(plan, group, rec.pci)
            except Exception as e:  # the others still get theirs back
                failures.append(f"{rec.address} MAC/VLAN: {e}")
                log_action(log, logging.ERROR, "step_failed", "could not restore the settings of VF %s: %s",
                           rec.address, e, address=rec.address, group=group, owner=getattr(plan, "owner", None),
                           action="restore_net", result="failed")
        return failures
