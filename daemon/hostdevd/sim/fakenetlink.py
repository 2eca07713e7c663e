"""An in-memory netlink peer for tests: the :class:`hostdevd.core.vfnet.NetlinkBackend` double."""
from __future__ import annotations

import errno
import threading
from collections.abc import Callable

from ..core.errors import NetlinkError
from ..core.vfnet import ZERO_MAC, VfNet


class FakeNetlink:
    """An in-memory netlink peer for tests: PF netdevs with VF tables and a few bad habits.

    * ``add_pf(name, nvfs)`` — VFs start with MAC 00:00:00:00:00:00, VLAN 0, spoof-check on,
      trust off (what igb/ixgbe/i40e report for fresh VFs);
    * ``reject_zero_mac.add(name)`` — that PF's driver answers EINVAL to the all-zero MAC
      (igb before Linux 5.x did);
    * ``busy(name, vf, n, err=EAGAIN)`` — the next ``n`` set requests for that VF fail with
      ``err`` (a VF still in reset after FLR);
    * ``no_trust.add(name)`` — the driver does not report trust (older drivers);
    * ``calls`` — every set request, in order: (pf, vf, {attr: value}).
    """

    def __init__(self) -> None:
        self.pfs: dict[str, dict[int, VfNet]] = {}
        self.reject_zero_mac: set[str] = set()
        self.no_trust: set[str] = set()
        self._busy: dict[tuple[str, int], tuple[int, int]] = {}
        self.calls: list[tuple[str, int, dict]] = []
        self._lock = threading.Lock()

    def add_pf(self, name: str, nvfs: int, mac: Callable[[int], str] | None = None) -> FakeNetlink:
        with self._lock:
            self.pfs[name] = {i: VfNet(mac=mac(i) if mac else ZERO_MAC, vlan=0, qos=0, spoofchk=True,
                                       trust=False) for i in range(nvfs)}
        return self

    def busy(self, pf: str, vf: int, count: int, err: int = errno.EAGAIN) -> None:
        with self._lock:
            self._busy[(pf, vf)] = (count, err)

    def vf(self, pf: str, vf: int) -> VfNet:
        with self._lock:
            v = self.pfs[pf][vf]
            return VfNet(**v.to_json())

    def vf_table(self, pf_netdev: str) -> dict[int, VfNet]:
        with self._lock:
            if pf_netdev not in self.pfs:
                raise NetlinkError(f"no network interface {pf_netdev}", err=errno.ENODEV)
            out = {}
            for i, v in self.pfs[pf_netdev].items():
                c = VfNet(**v.to_json())
                if pf_netdev in self.no_trust:
                    c.trust = None
                out[i] = c
            return out

    def set_vf(self, pf_netdev: str, vf: int, *, mac: str | None = None, vlan: int | None = None,
               qos: int | None = None, spoofchk: bool | None = None, trust: bool | None = None) -> None:
        attrs = {k: v for k, v in (("mac", mac), ("vlan", vlan), ("qos", qos), ("spoofchk", spoofchk),
                                   ("trust", trust)) if v is not None}
        with self._lock:
            self.calls.append((pf_netdev, vf, attrs))
            table = self.pfs.get(pf_netdev)
            if table is None:
                raise NetlinkError(f"no network interface {pf_netdev}", err=errno.ENODEV)
            if vf not in table:
                raise NetlinkError(f"{pf_netdev} has no VF {vf}", err=errno.EINVAL)
            left, err = self._busy.get((pf_netdev, vf), (0, 0))
            if left:
                self._busy[(pf_netdev, vf)] = (left - 1, err)
                raise NetlinkError(f"VF {vf} of {pf_netdev} is busy", err=err)
            if mac is not None and mac == ZERO_MAC and pf_netdev in self.reject_zero_mac:
                raise NetlinkError(f"{pf_netdev} refuses MAC {ZERO_MAC} for VF {vf}", err=errno.EINVAL)
            v = table[vf]
            if mac is not None:
                v.mac = mac.lower()
            if vlan is not None:
                v.vlan, v.qos = vlan, qos or 0
            if spoofchk is not None:
                v.spoofchk = spoofchk
            if trust is not None and pf_netdev not in self.no_trust:
                v.trust = trust
