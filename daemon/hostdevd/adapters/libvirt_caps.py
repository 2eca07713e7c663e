"""libvirt's domain capabilities for `hostdevctl check` (R14: does this libvirt offer iommufd for
hostdevs). A libvirt that is not running or not reachable is "not asked", never an error.

A read-write connection, as virsh uses as root: over a read-only one libvirt 11.3 in the lab gave
no domain capabilities. Nothing is changed through it."""
from __future__ import annotations

from typing import Any

import libvirt


def _quiet(_ctx: Any, _err: Any) -> None:
    """libvirt prints every error to stderr by default; the caller reports its own line."""


def domain_capabilities(uri: str) -> str | None:
    """The XML of ``virsh domcapabilities`` for `uri`, or None when libvirt cannot be asked."""
    libvirt.registerErrorHandler(_quiet, None)
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError:
        return None
    try:
        return conn.getDomainCapabilities()
    except libvirt.libvirtError:
        return None
    finally:
        conn.close()
