"""libvirt XML in, plain values out: domains, device fragments, networks, nodedevs.

Everything here reads XML that somebody else wrote (a hook's stdin, a socket
client, ``virsh dumpxml``), so the parser is hardened and strict:

* input is UTF-8 (``str`` is encoded, ``bytes`` must decode) and at most
  ``max_bytes`` (1 MiB by default);
* any ``<!DOCTYPE``/``<!ENTITY``-style declaration is refused *before* libxml2
  sees the document (no entity expansion, no external entities, no DTD), and
  the parsed tree is checked again afterwards;
* lxml runs with ``resolve_entities=False, no_network=True, load_dtd=False,
  huge_tree=False``;
* every failure is an :class:`~hostdevd.errors.InvalidXML` whose message is one
  line naming the element (and its source line) that is wrong.

What counts as a request:

* ``<hostdev mode='subsystem' type='pci'>`` (``mode`` absent means subsystem)
  with ``<source><address domain= bus= slot= function=/></source>``;
* ``<interface type='hostdev'>`` with ``<source><address type='pci' …/></source>``;
* ``<interface type='network'>`` whose live/status XML carries
  ``<actual type='hostdev'>`` (the VF libvirt picked from a hostdev network).

Only the ``<address>`` inside ``<source>`` (or ``<actual><source>``) is a host
address; the ``<address>`` that is a direct child of a device is where the
*guest* sees it and is never read. USB, SCSI, scsi_host, mdev and LXC
``mode='capabilities'`` hostdevs are reported as :class:`OutOfScope`, never an
error. ``<interface type='network'>`` without an ``<actual>`` cannot be resolved
from the domain alone and is reported as a :class:`NetworkRef` (resolve it with
:func:`parse_network` on the network's XML).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from lxml import etree

from .address import PciAddress
from .errors import InvalidAddress, InvalidXML

MiB = 1024 * 1024
DEFAULT_MAX_BYTES = MiB

DeviceKind = Literal["hostdev", "interface"]

# Hostdev types hostdevd recognises but does not bind (reported, never an error).
OUT_OF_SCOPE_SUBSYS = ("usb", "scsi", "scsi_host", "mdev")
CAPABILITIES_TYPES = ("storage", "misc", "net")

# Declarations that only a DTD can carry. libvirt never writes any of them; they
# are how billion-laughs and external-entity (XXE) documents start.
_DECL_RE = re.compile(rb"<!\s*(?:DOCTYPE|ENTITY|ELEMENT|ATTLIST|NOTATION)", re.IGNORECASE)
_XMLDECL_RE = re.compile(rb"<\?xml\s[^>]{0,200}\?>")
_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}$")
_UINT_RE = re.compile(r"^[0-9]{1,10}$")
_LEADING_ZERO_RE = re.compile(r"^0[0-9]+$")
_BOM = b"\xef\xbb\xbf"
_LXML_SOURCE_RE = re.compile(r"\s*\(<string>, line \d+\)\s*$")
_MAX_NUMBER_CHARS = 16          # longest sane PCI attribute: 0x0000ffff (10), decimal 65535 (5)


# --------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class DeviceRequest:
    """One host PCI function the domain wants passed through."""

    address: PciAddress
    kind: DeviceKind
    managed: bool | None = None          # None: the attribute is absent (libvirt then means "no")
    alias: str | None = None
    mac: str | None = None               # lower case
    vlan_tags: tuple[int, ...] = ()
    vlan_trunk: bool = False
    virtualport: str | None = None       # <virtualport type=…>
    driver: str | None = None            # <driver model=…> if given, else <driver name=…>
    network: str | None = None           # set when resolved from <interface type='network'><actual>

    def to_dict(self) -> dict:
        return {
            "address": str(self.address), "kind": self.kind, "managed": self.managed,
            "alias": self.alias, "mac": self.mac, "vlan_tags": list(self.vlan_tags),
            "vlan_trunk": self.vlan_trunk, "virtualport": self.virtualport,
            "driver": self.driver, "network": self.network,
        }


@dataclass(frozen=True, slots=True)
class OutOfScope:
    """A hostdev hostdevd recognises but does not bind (mdev, usb, scsi, …)."""

    kind: str                            # 'mdev', 'usb', 'scsi', 'scsi_host', 'capabilities:storage', …
    detail: str

    def to_dict(self) -> dict:
        return {"kind": self.kind, "detail": self.detail}


@dataclass(frozen=True, slots=True)
class NetworkRef:
    """``<interface type='network'>`` not resolvable from the domain XML alone."""

    network: str
    portgroup: str | None = None
    mac: str | None = None

    def to_dict(self) -> dict:
        return {"network": self.network, "portgroup": self.portgroup, "mac": self.mac}


@dataclass(slots=True)
class DomainRequest:
    """What one domain (or one hotplug fragment) asks of the host."""

    name: str | None
    uuid: str | None
    requests: list[DeviceRequest] = field(default_factory=list)
    networks: list[NetworkRef] = field(default_factory=list)
    out_of_scope: list[OutOfScope] = field(default_factory=list)

    def addresses(self) -> list[PciAddress]:
        """Host addresses of the requests, in document order."""
        return [r.address for r in self.requests]

    def to_dict(self) -> dict:
        return {
            "name": self.name, "uuid": self.uuid,
            "requests": [r.to_dict() for r in self.requests],
            "networks": [n.to_dict() for n in self.networks],
            "out_of_scope": [o.to_dict() for o in self.out_of_scope],
        }


@dataclass(slots=True)
class HostdevNetwork:
    """A libvirt ``<network>``; ``forward_mode`` 'hostdev' or 'passthrough' is a VF pool."""

    name: str
    forward_mode: str | None             # None: no <forward> (isolated network)
    managed: bool | None = None
    pf_devs: list[str] = field(default_factory=list)
    vf_addresses: list[PciAddress] = field(default_factory=list)
    driver: str | None = None            # <driver model=…> if given, else <driver name=…>
    interface_devs: list[str] = field(default_factory=list)   # passthrough <interface dev=…>
    uuid: str | None = None

    @property
    def is_hostdev(self) -> bool:
        return self.forward_mode == "hostdev"


@dataclass(frozen=True, slots=True)
class NetworkPort:
    """A libvirt ``<networkport>`` (what the network hook gets on port-created)."""

    uuid: str | None
    owner_name: str | None
    owner_uuid: str | None
    mac: str | None
    plug_type: str | None                # 'hostdev-pci', 'network', 'bridge', 'direct' or None
    managed: bool | None = None
    driver: str | None = None
    address: PciAddress | None = None    # set for plug type 'hostdev-pci'


@dataclass(slots=True)
class NodeDevice:
    """A libvirt node device (``virsh nodedev-dumpxml``)."""

    name: str
    address: PciAddress | None = None
    iommu_group: int | None = None
    group_members: list[PciAddress] = field(default_factory=list)
    vendor_id: str | None = None         # "0x8086", as libvirt writes it
    product_id: str | None = None
    class_code: str | None = None        # "0x020000", as libvirt writes it
    capabilities: list[str] = field(default_factory=list)   # every <capability type>, document order
    virt_functions: list[PciAddress] = field(default_factory=list)
    phys_function: PciAddress | None = None
    driver: str | None = None
    parent: str | None = None
    max_vfs: int | None = None           # <capability type='virt_functions' maxCount=…>
    mdev_type: str | None = None
    mdev_uuid: str | None = None


# --------------------------------------------------------------------------- helpers


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _err(message: str) -> InvalidXML:
    return InvalidXML(_one_line(message, 400))


def _q(value: str | None, limit: int = 40) -> str:
    """Quote a value from the document for a message (bounded, one line)."""
    if value is None:
        return "(none)"
    value = " ".join(value.split())
    return repr(value if len(value) <= limit else value[:limit] + "...")


def _size(limit: int) -> str:
    if limit % MiB == 0:
        return f"{limit // MiB} MiB"
    if limit % 1024 == 0:
        return f"{limit // 1024} KiB"
    return f"{limit} byte"


def _prepare(xml: str | bytes, what: str, max_bytes: int) -> bytes:
    """Encoding, size and declaration checks; returns UTF-8 bytes without a BOM."""
    if isinstance(xml, str):
        if len(xml) > 64 * max_bytes:       # every character is at least one byte; don't copy gigabytes
            raise _err(f"{what} XML is at least {len(xml)} bytes, over the {_size(max_bytes)} limit")
        # surrogatepass: a lone surrogate becomes bytes the UTF-8 check below refuses
        data = xml.encode("utf-8", "surrogatepass")
    elif isinstance(xml, (bytes, bytearray, memoryview)):
        data = bytes(xml)
    else:
        raise _err(f"{what} XML must be str or bytes, not {type(xml).__name__}")
    if len(data) > max_bytes:
        raise _err(f"{what} XML is {len(data)} bytes, over the {_size(max_bytes)} limit")
    if data.startswith(_BOM):
        data = data[len(_BOM):]
    if not data.strip():
        raise _err(f"{what} XML is empty")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _err(f"{what} XML is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    if _DECL_RE.search(data):
        raise _err(f"{what} XML contains a <!DOCTYPE> or <!ENTITY> declaration, which hostdevd refuses "
                   "(libvirt never writes one; it is how entity-expansion and external-entity attacks start)")
    return data


def _parser() -> etree.XMLParser:
    # A fresh parser per document: lxml parsers keep state and are not shared across threads.
    return etree.XMLParser(
        resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False,
        remove_comments=True, remove_pis=True, dtd_validation=False, attribute_defaults=False,
        collect_ids=False, encoding="utf-8",
    )


def _parse(data: bytes, what: str) -> etree._Element:
    try:
        root = etree.fromstring(data, _parser())
    except etree.XMLSyntaxError as e:
        message = _LXML_SOURCE_RE.sub("", str(e))
        if "Excessive depth" in message:
            message = "elements nested more than 256 deep"
        raise _err(f"{what} XML is not well-formed: {message}") from None
    except (etree.LxmlError, ValueError, TypeError) as e:   # belt and braces: lxml's other refusals
        raise _err(f"{what} XML could not be parsed: {e}") from None
    if root is None:
        raise _err(f"{what} XML has no root element")
    docinfo = root.getroottree().docinfo
    if docinfo.doctype or docinfo.internalDTD is not None or docinfo.externalDTD is not None:
        raise _err(f"{what} XML carries a DTD, which hostdevd refuses")
    for _ in root.iter(etree.Entity):
        raise _err(f"{what} XML contains an entity reference, which hostdevd refuses")
    return root


def _load(xml: str | bytes, what: str, max_bytes: int) -> etree._Element:
    return _parse(_prepare(xml, what, max_bytes), what)


def _tag(el: etree._Element) -> str:
    tag = el.tag
    return _q(tag if isinstance(tag, str) else str(tag), 40).strip("'\"")


def _children(el: etree._Element, tag: str) -> list[etree._Element]:
    return [c for c in el if c.tag == tag]


def _one(el: etree._Element, tag: str, ctx: str) -> etree._Element | None:
    """The single child ``<tag>`` of ``el``, None if absent; two or more is an error."""
    found = _children(el, tag)
    if len(found) > 1:
        raise _err(f"{ctx} has {len(found)} <{tag}> elements; expected at most one")
    return found[0] if found else None


def _text(el: etree._Element, tag: str, ctx: str) -> str | None:
    child = _one(el, tag, ctx)
    if child is None or child.text is None:
        return None
    text = child.text.strip()
    return text or None


def _yes_no(value: str | None, attr: str, ctx: str) -> bool | None:
    if value is None:
        return None
    if value == "yes":
        return True
    if value == "no":
        return False
    raise _err(f"{ctx} has {attr}={_q(value)}; expected 'yes' or 'no'")


def _check_numbers(parts: dict[str, str | None], ctx: str) -> None:
    """Refuse what PciAddress.from_parts would misread or choke on.

    libvirt reads these attributes with strtoul base 0, so ``bus='010'`` is
    octal 8 to libvirt; reading it as decimal 10 would bind a different device
    than the one libvirt then assigns. Such values are refused as ambiguous.
    """
    for key, raw in parts.items():
        if raw is None:
            continue
        raw = raw.strip()
        if len(raw) > _MAX_NUMBER_CHARS:
            raise _err(f"{ctx}: PCI {key}={_q(raw, 20)} is too long to be a PCI address part")
        if _LEADING_ZERO_RE.match(raw):
            raise _err(f"{ctx}: PCI {key}={_q(raw, 20)} is ambiguous (libvirt reads a leading 0 as octal); "
                       "write 0x-hex or decimal without leading zeros")


def _pci(addr: etree._Element, ctx: str) -> PciAddress:
    """A host PCI address from ``<address domain= bus= slot= function=/>``."""
    attrs = {k: addr.get(k) for k in ("domain", "bus", "slot", "function")}
    _check_numbers(attrs, ctx)
    try:
        return PciAddress.from_parts(attrs["domain"], attrs["bus"], attrs["slot"], attrs["function"])
    except InvalidAddress as e:
        raise _err(f"{ctx}: {e.message}") from None
    except (ValueError, TypeError) as e:      # never let a stray conversion error escape
        raise _err(f"{ctx}: bad PCI address ({e})") from None


def _uint(value: str | None, what: str, ctx: str, limit: int) -> int | None:
    if value is None:
        return None
    value = value.strip()
    if not _UINT_RE.match(value) or int(value) > limit:
        raise _err(f"{ctx} has {what} {_q(value)}; expected a whole number 0..{limit}")
    return int(value)


def _ctx(el: etree._Element) -> str:
    """How a message names an element: ``<hostdev type='pci'> at line 34``."""
    typ = el.get("type")
    name = f"<{_tag(el)} type={_q(typ, 20)}>" if typ is not None else f"<{_tag(el)}>"
    line = el.sourceline
    return f"{name} at line {line}" if line else name


def _driver(el: etree._Element, ctx: str) -> str | None:
    drv = _one(el, "driver", ctx)
    if drv is None:
        return None
    return drv.get("model") or drv.get("name") or None


def _alias(el: etree._Element, ctx: str) -> str | None:
    alias = _one(el, "alias", ctx)
    return alias.get("name") if alias is not None else None


def _mac(el: etree._Element, ctx: str) -> str | None:
    mac = _one(el, "mac", ctx)
    if mac is None:
        return None
    value = mac.get("address")
    if value is None:
        raise _err(f"{ctx} has a <mac> without an address attribute")
    if not _MAC_RE.match(value):
        raise _err(f"{ctx} has MAC address {_q(value)}; expected six hex pairs like 52:54:00:6d:90:02")
    return value.lower()


def _vlan(el: etree._Element, ctx: str) -> tuple[tuple[int, ...], bool] | None:
    vlan = _one(el, "vlan", ctx)
    if vlan is None:
        return None
    tags = tuple(_uint(t.get("id"), "VLAN tag id", ctx, 4095) for t in _children(vlan, "tag"))
    if any(t is None for t in tags):
        raise _err(f"{ctx} has a VLAN <tag> without an id attribute")
    if not tags:
        raise _err(f"{ctx} has a <vlan> with no <tag id=…/>")
    trunk = _yes_no(vlan.get("trunk"), "trunk", ctx)
    return tags, bool(trunk) or len(tags) > 1     # libvirt: more than one tag means trunk


def _virtualport(el: etree._Element, ctx: str) -> str | None:
    vp = _one(el, "virtualport", ctx)
    return vp.get("type") if vp is not None else None


def _source_address(el: etree._Element, ctx: str) -> PciAddress:
    """The host address in ``<source><address …/></source>`` of a PCI device."""
    source = _one(el, "source", ctx)
    addrs = _children(source, "address") if source is not None else []
    if not addrs:
        raise _err(f"{ctx} has no host PCI address; expected "
                   "<source><address domain='0x0000' bus='0x06' slot='0x12' function='0x2'/></source>")
    if len(addrs) > 1:
        raise _err(f"{ctx} has {len(addrs)} <address> elements in <source>; expected one")
    addr = addrs[0]
    typ = addr.get("type")
    if typ is not None and typ != "pci":
        raise _err(f"{ctx} has a source <address type={_q(typ, 20)}>; expected type='pci'")
    if addr.get("uuid") is not None:
        raise _err(f"{ctx} has a uuid source address; expected a PCI address")
    return _pci(addr, ctx)


# --------------------------------------------------------------------------- domain


def _clip(*parts: str | None) -> str:
    return _one_line(" ".join(p for p in parts if p), 200)


def _out_of_scope_detail(el: etree._Element, typ: str, ctx: str) -> str:
    source = _one(el, "source", ctx)
    src = source if source is not None else etree.Element("source")
    addr = _one(src, "address", ctx)
    if typ == "usb":
        vendor, product = _one(src, "vendor", ctx), _one(src, "product", ctx)
        return _clip(
            "USB",
            f"vendor {vendor.get('id')}" if vendor is not None else None,
            f"product {product.get('id')}" if product is not None else None,
            f"bus {addr.get('bus')} device {addr.get('device')}" if addr is not None else None,
        )
    if typ == "scsi":
        if src.get("protocol") == "iscsi":
            return _clip("iSCSI", src.get("name"))
        adapter = _one(src, "adapter", ctx)
        return _clip(
            "SCSI",
            f"adapter {adapter.get('name')}" if adapter is not None else None,
            f"bus {addr.get('bus')} target {addr.get('target')} unit {addr.get('unit')}" if addr is not None else None,
        )
    if typ == "scsi_host":
        return _clip("vhost-scsi", f"protocol {src.get('protocol')}", f"wwpn {src.get('wwpn')}")
    if typ == "mdev":
        uuid = addr.get("uuid") if addr is not None else None
        if uuid is None:
            return _clip(f"mdev model {el.get('model')}", "without a uuid source address (libvirt refuses this)")
        return _clip(f"mdev model {el.get('model')}", f"uuid {uuid}")
    # mode='capabilities' (LXC): storage <block>, misc <char>, net <interface>
    for child_tag in ("block", "char", "interface"):
        text = _text(src, child_tag, ctx)
        if text:
            return _clip(f"{typ} {child_tag} {text}")
    return _clip(typ)


def _hostdev(el: etree._Element) -> DeviceRequest | OutOfScope:
    ctx = _ctx(el)
    mode = el.get("mode", "subsystem")
    typ = el.get("type")
    if typ is None:
        raise _err(f"{ctx} has no type attribute")
    if mode == "capabilities":
        if typ not in CAPABILITIES_TYPES:
            raise _err(f"{ctx} has unknown capabilities type {_q(typ, 20)} (known: {', '.join(CAPABILITIES_TYPES)})")
        return OutOfScope(f"capabilities:{typ}", _out_of_scope_detail(el, typ, ctx))
    if mode != "subsystem":
        raise _err(f"{ctx} has mode={_q(mode, 20)}; expected 'subsystem' or 'capabilities'")
    if typ in OUT_OF_SCOPE_SUBSYS:
        return OutOfScope(typ, _out_of_scope_detail(el, typ, ctx))
    if typ != "pci":
        raise _err(f"{ctx} has unknown hostdev type {_q(typ, 20)} (known: pci, {', '.join(OUT_OF_SCOPE_SUBSYS)})")
    return DeviceRequest(
        address=_source_address(el, ctx),
        kind="hostdev",
        managed=_yes_no(el.get("managed"), "managed", ctx),
        alias=_alias(el, ctx),
        driver=_driver(el, ctx),
    )


def _interface_request(el: etree._Element, dev: etree._Element, ctx: str,
                       network: str | None) -> DeviceRequest:
    """``dev`` is the element holding source/managed/driver: the interface or its <actual>."""
    vlan = _vlan(dev, ctx)
    if vlan is None and dev is not el:
        vlan = _vlan(el, ctx)
    virtualport = _virtualport(dev, ctx)
    if virtualport is None and dev is not el:
        virtualport = _virtualport(el, ctx)
    driver = _driver(dev, ctx)
    if driver is None and dev is not el:
        driver = _driver(el, ctx)
    tags, trunk = vlan if vlan is not None else ((), False)
    return DeviceRequest(
        address=_source_address(dev, ctx),
        kind="interface",
        managed=_yes_no(dev.get("managed"), "managed", ctx),
        alias=_alias(el, ctx),
        mac=_mac(el, ctx),
        vlan_tags=tags,
        vlan_trunk=trunk,
        virtualport=virtualport,
        driver=driver,
        network=network,
    )


def _interface(el: etree._Element) -> DeviceRequest | NetworkRef | None:
    ctx = _ctx(el)
    typ = el.get("type")
    if typ is None:
        raise _err(f"{ctx} has no type attribute")
    if typ == "hostdev":
        return _interface_request(el, el, ctx, None)
    if typ != "network":
        return None                                     # bridge, direct, user, vdpa, …: no host PCI binding
    source = _one(el, "source", ctx)
    network = source.get("network") if source is not None else None
    if not network:
        raise _err(f"{ctx} has no <source network='…'/>")
    actual = _one(el, "actual", ctx)
    if actual is None:
        return NetworkRef(network, source.get("portgroup"), _mac(el, ctx))
    if actual.get("type") == "hostdev":
        return _interface_request(el, actual, f"{ctx} (<actual type='hostdev'>)", network)
    return None                                         # resolved to a bridge/direct/…: not a hostdev


def _parse_domain(xml: str | bytes, max_bytes: int, what: str) -> DomainRequest:
    root = _load(xml, what, max_bytes)
    if root.tag == "domain":
        name = _text(root, "name", "<domain>")
        uuid = _text(root, "uuid", "<domain>")
        devices = _one(root, "devices", "<domain>")
        elements = [c for c in devices if c.tag in ("hostdev", "interface")] if devices is not None else []
    elif root.tag in ("hostdev", "interface"):
        name = uuid = None
        elements = [root]
    else:
        raise _err(f"{what} XML has root <{_tag(root)}>; expected <domain>, <hostdev> or <interface>")

    result = DomainRequest(name, uuid)
    seen: dict[PciAddress, str] = {}
    for el in elements:
        item = _hostdev(el) if el.tag == "hostdev" else _interface(el)
        if isinstance(item, DeviceRequest):
            here = _ctx(el)
            if item.address in seen:
                raise _err(f"host PCI device {item.address} is assigned twice: by {seen[item.address]} and {here}")
            seen[item.address] = here
            result.requests.append(item)
        elif isinstance(item, OutOfScope):
            result.out_of_scope.append(item)
        elif isinstance(item, NetworkRef):
            result.networks.append(item)
    return result


def parse_domain(xml: str | bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> DomainRequest:
    """Parse a ``<domain>`` or a bare ``<hostdev>``/``<interface>`` fragment.

    Raises :class:`InvalidXML` (one line) for anything malformed, hostile or
    ambiguous: not well-formed, DTD/entities, over ``max_bytes``, a PCI device
    without a host source address, an out-of-range address, the same host
    address twice.
    """
    return _parse_domain(xml, max_bytes, "domain")


def parse_device(xml: str | bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> DomainRequest:
    """Parse a hotplug device fragment (``<hostdev>`` or ``<interface>``); name and uuid are None.

    Same rules as :func:`parse_domain` (which also accepts fragments), but the
    messages say "device XML".
    """
    return _parse_domain(xml, max_bytes, "device")


# --------------------------------------------------------------------------- guest placement (hotplug, migration)


@dataclass(frozen=True, slots=True)
class GuestPlacement:
    """Where the guest sees one assigned host PCI function, and what that means for hot-unplug."""

    host: PciAddress
    kind: DeviceKind
    alias: str | None
    managed: bool | None
    guest_bus: int | None = None          # the device's own <address type='pci'>: None when not assigned yet
    guest_slot: int | None = None
    guest_function: int | None = None
    multifunction: bool = False           # multifunction='on', or another device shares the guest slot
    controller: str | None = None         # model of the controller whose index is guest_bus
    hotplug_off: bool = False             # that controller has <target hotplug='off'/>
    xml: str = ""                         # the element itself, for libvirt's detach

    def to_dict(self) -> dict:
        guest = (None if self.guest_bus is None else
                 f"{0:04x}:{self.guest_bus:02x}:{self.guest_slot or 0:02x}.{self.guest_function or 0:x}")
        return {"host": str(self.host), "kind": self.kind, "alias": self.alias, "managed": self.managed,
                "guest": guest, "multifunction": self.multifunction, "controller": self.controller,
                "hotplug_off": self.hotplug_off}


@dataclass(slots=True)
class DomainPlacement:
    name: str | None
    uuid: str | None
    machine: str | None                   # <os><type machine=…>, e.g. pc-q35-7.2
    devices: list[GuestPlacement] = field(default_factory=list)

    def get(self, host: PciAddress) -> GuestPlacement | None:
        return next((d for d in self.devices if d.host == host), None)


def _guest_int(value: str | None, what: str, ctx: str) -> int | None:
    if value is None:
        return None
    _check_numbers({what: value}, ctx)
    try:
        return int(value.strip(), 0)
    except ValueError:
        raise _err(f"{ctx}: guest PCI {what}={_q(value, 20)} is not a number") from None


def guest_placements(xml: str | bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> DomainPlacement:
    """Every assigned host PCI device of a (live) domain XML with its guest-side placement.

    Reads the device's own ``<address type='pci'>`` (the guest's view, which
    :func:`parse_domain` deliberately ignores) and the ``<controller type='pci'>``
    it sits on, which is what decides whether libvirt and the guest can unplug it.
    """
    root = _load(xml, "domain", max_bytes)
    if root.tag != "domain":
        raise _err(f"domain XML has root <{_tag(root)}>; expected <domain>")
    os_el = _one(root, "os", "<domain>")
    type_el = _one(os_el, "type", "<os>") if os_el is not None else None
    result = DomainPlacement(_text(root, "name", "<domain>"), _text(root, "uuid", "<domain>"),
                             type_el.get("machine") if type_el is not None else None)
    devices = _one(root, "devices", "<domain>")
    if devices is None:
        return result
    controllers: dict[int, tuple[str | None, bool]] = {}
    for c in _children(devices, "controller"):
        if c.get("type") != "pci":
            continue
        ctx = _ctx(c)
        index = _guest_int(c.get("index"), "index", ctx)
        target = _one(c, "target", ctx)
        off = target is not None and target.get("hotplug") == "off"
        if index is not None:
            controllers[index] = (c.get("model"), off)
    # Guest (bus, slot) -> how many functions sit there: a shared slot is a multifunction device.
    slots: dict[tuple[int, int], int] = {}
    for dev in devices:
        if not isinstance(dev.tag, str):
            continue
        for a in _children(dev, "address"):
            if a.get("type") == "pci" and a.get("bus") is not None and a.get("slot") is not None:
                try:
                    k = (int(a.get("bus"), 0), int(a.get("slot"), 0))
                except ValueError:
                    continue
                slots[k] = slots.get(k, 0) + 1
    for el in devices:
        if el.tag not in ("hostdev", "interface"):
            continue
        item = _hostdev(el) if el.tag == "hostdev" else _interface(el)
        if not isinstance(item, DeviceRequest):
            continue
        ctx = _ctx(el)
        guest = next((a for a in _children(el, "address") if a.get("type") == "pci"), None)
        bus = slot = fn = None
        multi = False
        if guest is not None:
            bus = _guest_int(guest.get("bus"), "bus", ctx)
            slot = _guest_int(guest.get("slot"), "slot", ctx)
            fn = _guest_int(guest.get("function"), "function", ctx)
            multi = guest.get("multifunction") == "on" or bool(fn) or slots.get((bus or 0, slot or 0), 0) > 1
        model, off = controllers.get(bus, (None, False)) if bus is not None else (None, False)
        result.devices.append(GuestPlacement(
            host=item.address, kind=item.kind, alias=item.alias, managed=item.managed,
            guest_bus=bus, guest_slot=slot, guest_function=fn, multifunction=multi, controller=model,
            hotplug_off=off, xml=etree.tostring(el, encoding="unicode", with_tail=False)))
    return result


# --------------------------------------------------------------------------- network


def parse_network(xml: str | bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> HostdevNetwork:
    """Parse a libvirt ``<network>``; hostdev/passthrough forward modes carry the VF pool."""
    root = _load(xml, "network", max_bytes)
    if root.tag != "network":
        raise _err(f"network XML has root <{_tag(root)}>; expected <network>")
    name = _text(root, "name", "<network>")
    if name is None:
        raise _err("<network> has no <name>")
    uuid = _text(root, "uuid", "<network>")
    fwd = _one(root, "forward", "<network>")
    if fwd is None:
        return HostdevNetwork(name=name, forward_mode=None, uuid=uuid)
    ctx = f"<forward> at line {fwd.sourceline}" if fwd.sourceline else "<forward>"
    pf_devs, interface_devs, vfs = [], [], []
    for child in fwd:
        if child.tag in ("pf", "interface"):
            dev = child.get("dev")
            if not dev:
                raise _err(f"{ctx} has a <{child.tag}> without a dev attribute")
            (pf_devs if child.tag == "pf" else interface_devs).append(dev)
        elif child.tag == "address":
            typ = child.get("type")
            if typ is not None and typ != "pci":
                raise _err(f"{ctx} has an <address type={_q(typ, 20)}>; expected type='pci'")
            addr = _pci(child, ctx)
            if addr in vfs:
                raise _err(f"{ctx} lists PCI device {addr} twice")
            vfs.append(addr)
    return HostdevNetwork(
        name=name,
        forward_mode=fwd.get("mode", "nat"),            # libvirt's default forward mode
        managed=_yes_no(fwd.get("managed"), "managed", ctx),
        pf_devs=pf_devs,
        vf_addresses=vfs,
        driver=_driver(fwd, ctx),
        interface_devs=interface_devs,
        uuid=uuid,
    )


def parse_networkport(xml: str | bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> NetworkPort:
    """Parse a libvirt ``<networkport>`` (network hook input for port-created/port-deleted)."""
    root = _load(xml, "networkport", max_bytes)
    if root.tag != "networkport":
        raise _err(f"networkport XML has root <{_tag(root)}>; expected <networkport>")
    ctx = "<networkport>"
    owner = _one(root, "owner", ctx)
    plug = _one(root, "plug", ctx)
    plug_type = plug.get("type") if plug is not None else None
    address = None
    if plug is not None and plug_type == "hostdev-pci":
        pctx = f"<plug type='hostdev-pci'> at line {plug.sourceline}"
        addrs = _children(plug, "address")
        if len(addrs) != 1:
            raise _err(f"{pctx} has {len(addrs)} <address> elements; expected one")
        address = _pci(addrs[0], pctx)
    return NetworkPort(
        uuid=_text(root, "uuid", ctx),
        owner_name=_text(owner, "name", ctx) if owner is not None else None,
        owner_uuid=_text(owner, "uuid", ctx) if owner is not None else None,
        mac=_mac(root, ctx),
        plug_type=plug_type,
        managed=_yes_no(plug.get("managed"), "managed", ctx) if plug is not None else None,
        driver=_driver(plug, ctx) if plug is not None else None,
        address=address,
    )


# --------------------------------------------------------------------------- nodedev


def _nodedev(root: etree._Element) -> NodeDevice:
    if root.tag != "device":
        raise _err(f"nodedev XML has root <{_tag(root)}>; expected <device>")
    name = _text(root, "name", "<device>")
    if name is None:
        raise _err("nodedev <device> has no <name>")
    ctx = f"nodedev {_q(name, 60)}"
    caps = []
    for cap in root.iter("capability"):
        typ = cap.get("type")
        if not typ:
            raise _err(f"{ctx} has a <capability> without a type attribute")
        caps.append(typ)
    driver_el = _one(root, "driver", ctx)
    node = NodeDevice(
        name=name,
        capabilities=caps,
        parent=_text(root, "parent", ctx),
        driver=_text(driver_el, "name", ctx) if driver_el is not None else None,
    )
    top = {c.get("type"): c for c in _children(root, "capability")}
    pci = top.get("pci")
    if pci is not None:
        node.address = _pci_from_elements(pci, ctx)
        vendor, product = _one(pci, "vendor", ctx), _one(pci, "product", ctx)
        node.vendor_id = vendor.get("id") if vendor is not None else None
        node.product_id = product.get("id") if product is not None else None
        node.class_code = _text(pci, "class", ctx)
        _iommu(node, pci, ctx)
        for sub in _children(pci, "capability"):
            if sub.get("type") == "virt_functions":
                node.max_vfs = _uint(sub.get("maxCount"), "virt_functions maxCount", ctx, 65535)
                node.virt_functions = [_pci(a, f"{ctx} virt_functions") for a in _children(sub, "address")]
            elif sub.get("type") == "phys_function":
                addrs = _children(sub, "address")
                if len(addrs) != 1:
                    raise _err(f"{ctx} phys_function has {len(addrs)} addresses; expected one")
                node.phys_function = _pci(addrs[0], f"{ctx} phys_function")
    mdev = top.get("mdev")
    if mdev is not None:
        type_el = _one(mdev, "type", ctx)
        node.mdev_type = type_el.get("id") if type_el is not None else None
        node.mdev_uuid = _text(mdev, "uuid", ctx)
        _iommu(node, mdev, ctx)
    return node


def _pci_from_elements(pci: etree._Element, ctx: str) -> PciAddress:
    """nodedev spells the address as child elements: <domain>0</domain><bus>2</bus>…"""
    parts = {k: _text(pci, k, ctx) for k in ("domain", "bus", "slot", "function")}
    _check_numbers(parts, ctx)
    try:
        return PciAddress.from_parts(parts["domain"], parts["bus"], parts["slot"], parts["function"])
    except InvalidAddress as e:
        raise _err(f"{ctx}: {e.message}") from None
    except (ValueError, TypeError) as e:
        raise _err(f"{ctx}: bad PCI address ({e})") from None


def _iommu(node: NodeDevice, cap: etree._Element, ctx: str) -> None:
    group = _one(cap, "iommuGroup", ctx)
    if group is None:
        return
    node.iommu_group = _uint(group.get("number"), "iommuGroup number", ctx, 2**31 - 1)
    if node.iommu_group is None:
        raise _err(f"{ctx} has an <iommuGroup> without a number attribute")
    node.group_members = [_pci(a, f"{ctx} iommuGroup") for a in _children(group, "address")]


def parse_nodedev(xml: str | bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> NodeDevice:
    """Parse one libvirt node device ``<device>``."""
    return _nodedev(_load(xml, "nodedev", max_bytes))


def parse_nodedevs(xml: str | bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> list[NodeDevice]:
    """Parse one or more concatenated ``<device>`` documents (as mdevctl-derived listings are)."""
    data = _prepare(xml, "nodedev", max_bytes)
    data = _XMLDECL_RE.sub(b"", data)
    wrapper = "hostdevd-nodedev-list"
    root = _parse(b"<%s>" % wrapper.encode() + data + b"</%s>" % wrapper.encode(), "nodedev")
    if (root.text or "").strip() or any((c.tail or "").strip() for c in root):
        raise _err("nodedev XML has text between <device> documents")
    return [_nodedev(el) for el in root]
