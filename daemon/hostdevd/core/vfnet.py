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
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .errors import NetlinkError
from .ledger import VfNetConfig

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
