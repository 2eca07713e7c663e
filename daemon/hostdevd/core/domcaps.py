"""What libvirt's domain capabilities say about hostdevs (R14): whether the installed libvirt can
hand a PCI hostdev to QEMU through iommufd. libvirt lists it as ``<devices><hostdev><enum
name='iommufd'><value>yes</value>`` (libvirt's tests/domaincapsdata); libvirt 11.3, Debian 13's,
has no such enum and always opens the legacy ``/dev/vfio/N`` container."""
from __future__ import annotations

from .errors import InvalidXML
from .xmlsafe import _load

_MAX = 4 * 1024 * 1024


def advertises_iommufd(xml: str | bytes) -> bool | None:
    """True or False from a ``virsh domcapabilities`` document; None when it is not one."""
    try:
        root = _load(xml, "domain capabilities", _MAX)
    except InvalidXML:
        return None
    if root.tag != "domainCapabilities":
        return None
    values = root.xpath("devices/hostdev[@supported='yes']/enum[@name='iommufd']/value/text()")
    return "yes" in [str(v).strip() for v in values]
