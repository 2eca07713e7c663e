"""What a domain asks of its VFs' network settings (R12): MAC and VLAN per VF.

Pure: a parsed domain (:class:`hostdevd.core.domxml.DomainRequest`) in, one
:class:`NetRequest` per VF out. :mod:`hostdevd.core.vfnet` applies them.
"""
from __future__ import annotations

from dataclasses import dataclass

from .address import PciAddress
from .errors import Reason, Refused


@dataclass
class NetRequest:
    """What a domain asks of a VF's network settings (from ``<interface type='hostdev'>``)."""
    mac: str | None = None
    vlan: int | None = None
    managed: bool | None = None        # managed='yes': libvirt sets them; hostdevd records and verifies
    # libvirt chose this VF from a hostdev network and configured it before hostdevd saw it:
    # what hostdevd reads then is libvirt's setting, not the original (libvirt restores that).
    libvirt_first: bool = False

    @property
    def wants_settings(self) -> bool:
        return self.mac is not None or self.vlan is not None

    def to_json(self) -> dict:
        return {"mac": self.mac, "vlan": self.vlan, "managed": self.managed, "libvirt_first": self.libvirt_first}


def net_requests(parsed, resolved_by_libvirt: bool = False) -> dict[PciAddress, NetRequest]:
    """MAC/VLAN per VF from a parsed domain (``domxml.DomainRequest``).

    ``<interface type='hostdev'>`` carries them; a ``<hostdev>`` never does. One VLAN tag
    only: SR-IOV VFs have no trunk mode (IFLA_VF_VLAN is one id), libvirt refuses it too.
    An interface from a hostdev *network* (``<actual>``, or a VF first seen at libvirt's
    ``start begin`` hook: ``resolved_by_libvirt``) was configured by libvirt before
    hostdevd saw it, so libvirt owns its settings: recorded and verified, never written.
    """
    out: dict[PciAddress, NetRequest] = {}
    if parsed is None:
        return out
    for r in parsed.requests:
        if r.kind != "interface":
            continue
        if r.vlan_trunk or len(r.vlan_tags) > 1:
            raise Refused(f"{r.address}: VLAN trunk {list(r.vlan_tags)} on an SR-IOV VF: a VF takes one VLAN tag",
                          "give the interface a single <vlan><tag id=…/></vlan>", reason=Reason.NET_VLAN_TRUNK)
        libvirt_owned = resolved_by_libvirt or r.network is not None
        out[r.address] = NetRequest(mac=r.mac, vlan=r.vlan_tags[0] if r.vlan_tags else None,
                                    managed=True if libvirt_owned else r.managed, libvirt_first=libvirt_owned)
    return out
