"""Socket requests into the engine's typed arguments: domain XML or addresses into
``PciAddress`` values and an :class:`~hostdevd.core.ledger.Owner` (the XML's name and uuid
must agree with the request's)."""
from __future__ import annotations

import uuid as uuidlib

from ..core.address import PciAddress
from ..core.domxml import DomainRequest, parse_device, parse_domain
from ..core.errors import BadRequest
from ..core.ledger import Owner
from .api import DomainRef


def norm_uuid(text: str | None) -> str | None:
    """libvirt's form (lower case, dashed): owners compare UUIDs as strings."""
    if not text:
        return None
    try:
        return str(uuidlib.UUID(text))
    except ValueError:
        return text.lower()


def request_devices(xml: str | None, addresses: list[str] | None, fragment: bool
                    ) -> tuple[DomainRequest | None, list[PciAddress]]:
    """The PCI devices a request names: from its domain XML (``fragment``: one device's
    XML, as attach/detach send), else from its address list."""
    if xml is not None:
        parsed = parse_device(xml) if fragment else parse_domain(xml)
        return parsed, parsed.addresses()
    return None, [PciAddress.parse(a) for a in addresses or []]


def request_owner(ref: DomainRef, parsed: DomainRequest | None) -> Owner:
    uuid = norm_uuid(ref.uuid)
    if parsed is not None:
        if parsed.name and parsed.name != ref.name:
            raise BadRequest(f"domain {ref.name!r} does not match the XML's <name>{parsed.name}</name>")
        if parsed.uuid:
            if uuid and norm_uuid(parsed.uuid) != uuid:
                raise BadRequest(f"domain uuid {uuid} does not match the XML's <uuid>{parsed.uuid}</uuid>")
            uuid = norm_uuid(parsed.uuid)
    return Owner(name=ref.name, uuid=uuid, kind="domain")
