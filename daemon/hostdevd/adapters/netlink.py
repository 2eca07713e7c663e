"""The netlink door (R12): VF MAC/VLAN through pyroute2, the only code that imports it.

:class:`Pyroute2Backend` implements :class:`hostdevd.core.vfnet.NetlinkBackend`;
pyroute2 is the daemon's extra, imported when the backend is built, so the core
and the tests run without it.
"""
from __future__ import annotations

import errno
import importlib.util
import logging
from collections.abc import Callable
from typing import Any

from ..core.errors import NetlinkError
from ..core.sysfs import RealHost, Sysfs
from ..core.vfnet import NetlinkBackend, VfNet

log = logging.getLogger("hostdevd.engine")


class Pyroute2Backend:
    """Real netlink through pyroute2: ``IPRoute().get_links(pf, ext_mask=1)`` and
    ``IPRoute().link('set', index=pf, vf={...})``. A socket per call: IPRoute objects
    are not shared between threads."""

    def __init__(self) -> None:
        from pyroute2 import IPRoute  # the daemon's extra
        from pyroute2.netlink.exceptions import NetlinkError as _PyNetlinkError
        self._IPRoute = IPRoute
        self._error = _PyNetlinkError

    def _index(self, ipr, pf_netdev: str) -> int:
        found = ipr.link_lookup(ifname=pf_netdev)
        if not found:
            raise NetlinkError(f"no network interface {pf_netdev}", "is the PF's driver loaded?", errno.ENODEV)
        return found[0]

    def vf_table(self, pf_netdev: str) -> dict[int, VfNet]:
        try:
            with self._IPRoute() as ipr:
                msgs = ipr.get_links(self._index(ipr, pf_netdev), ext_mask=1)
        except self._error as e:
            raise NetlinkError(f"reading the VFs of {pf_netdev} failed: {e}", err=e.code) from e
        table: dict[int, VfNet] = {}
        for msg in msgs:
            vflist = msg.get_attr("IFLA_VFINFO_LIST")
            if vflist is None:
                continue
            for info in vflist.get_attrs("IFLA_VF_INFO"):
                mac = info.get_attr("IFLA_VF_MAC")
                if mac is None:
                    continue
                vlan = info.get_attr("IFLA_VF_VLAN")
                spoof = info.get_attr("IFLA_VF_SPOOFCHK")
                trust = info.get_attr("IFLA_VF_TRUST")
                # The kernel reports -1 (0xffffffff) for "not supported by this driver".
                table[int(mac["vf"])] = VfNet(
                    mac=str(mac["mac"]).lower(),
                    vlan=int(vlan["vlan"]) if vlan is not None else None,
                    qos=int(vlan["qos"]) if vlan is not None else None,
                    spoofchk=None if spoof is None or spoof["spoofchk"] == 0xFFFFFFFF else bool(spoof["spoofchk"]),
                    trust=None if trust is None or trust["trust"] == 0xFFFFFFFF else bool(trust["trust"]))
        return table

    def set_vf(self, pf_netdev: str, vf: int, *, mac: str | None = None, vlan: int | None = None,
               qos: int | None = None, spoofchk: bool | None = None, trust: bool | None = None) -> None:
        spec: dict = {"vf": int(vf)}
        if mac is not None:
            spec["mac"] = mac
        if vlan is not None:
            spec["vlan"] = {"vlan": int(vlan), "qos": int(qos or 0)}
        if spoofchk is not None:
            spec["spoofchk"] = int(spoofchk)
        if trust is not None:
            spec["trust"] = int(trust)
        try:
            with self._IPRoute() as ipr:
                ipr.link("set", index=self._index(ipr, pf_netdev), vf=spec)
        except self._error as e:
            raise NetlinkError(f"setting VF {vf} of {pf_netdev} ({_describe(spec)}) failed: "
                               f"{errno.errorcode.get(e.code, e.code)} {e}", err=e.code) from e


def _describe(spec: dict) -> str:
    return ", ".join(f"{k} {v['vlan'] if k == 'vlan' else v}" for k, v in spec.items() if k != "vf") or "nothing"


def default_netlink(sysfs: Sysfs) -> NetlinkBackend | None:
    """pyroute2 on a real host (sysfs at /sys); none for the simulated kernel or a moved sysfs root."""
    if not isinstance(sysfs.backend, RealHost) or sysfs.backend.sys_root != "/sys":
        return None
    if importlib.util.find_spec("pyroute2") is None:
        log.warning("pyroute2 is not installed: VF MAC/VLAN are neither saved nor restored")
        return None
    return _Lazy(Pyroute2Backend)


class _Lazy:
    """Builds the real object on first use: hostdevctl's commands that never touch a VF
    do not pay for importing pyroute2 (about a second under the lab's emulation)."""

    def __init__(self, factory: Callable[[], NetlinkBackend]):
        self._factory = factory
        self._obj: NetlinkBackend | None = None

    def __getattr__(self, name: str) -> Any:
        if self._obj is None:
            self._obj = self._factory()
        return getattr(self._obj, name)
