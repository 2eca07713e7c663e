"""libvirt domain XML in, plain values out: domains, device fragments, guest placements.

Everything here reads XML that somebody else wrote (a hook's stdin, a socket
client, ``virsh dumpxml``), so it is parsed by :mod:`.xmlsafe` (no DTD or
entities, no network, 1 MiB limit, one-line :class:`~hostdevd.core.errors.InvalidXML`
messages). Networks, network ports and node devices are :mod:`.netxml`'s.

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
:func:`hostdevd.core.netxml.parse_network` on the network's XML).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lxml import etree

from .address import PciAddress
from .cpuset import parse_cpuset
from .xmlsafe import (
    DEFAULT_MAX_BYTES,
    _check_numbers,
    _children,
    _driver,
    _err,
    _load,
    _mac,
    _one,
    _one_line,
    _pci,
    _q,
    _tag,
    _text,
    _uint,
    _yes_no,
)

DeviceKind = Literal["hostdev", "interface"]

# Hostdev types hostdevd recognises but does not bind (reported, never an error).
OUT_OF_SCOPE_SUBSYS = ("usb", "scsi", "scsi_host", "mdev")
CAPABILITIES_TYPES = ("storage", "misc", "net")


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
    # <driver model=…> alone: libvirt's choice of vfio variant driver (R13), checked by the planner.
    driver_model: str | None = None

    def to_dict(self) -> dict:
        return {
            "address": str(self.address), "kind": self.kind, "managed": self.managed,
            "alias": self.alias, "mac": self.mac, "vlan_tags": list(self.vlan_tags),
            "vlan_trunk": self.vlan_trunk, "virtualport": self.virtualport,
            "driver": self.driver, "network": self.network, "driver_model": self.driver_model,
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
    numa: GuestNuma | None = None        # where the guest runs (vCPU pinning, <numatune>); <domain> only

    def addresses(self) -> list[PciAddress]:
        """Host addresses of the requests, in document order."""
        return [r.address for r in self.requests]

    def driver_models(self) -> dict[PciAddress, str]:
        """The vfio driver each request names with ``<driver model=…>`` (libvirt's override)."""
        return {r.address: r.driver_model for r in self.requests if r.driver_model}

    def to_dict(self) -> dict:
        return {
            "name": self.name, "uuid": self.uuid,
            "requests": [r.to_dict() for r in self.requests],
            "networks": [n.to_dict() for n in self.networks],
            "out_of_scope": [o.to_dict() for o in self.out_of_scope],
        }


@dataclass(frozen=True, slots=True)
class GuestNuma:
    """Where a domain's vCPUs and memory may be on the host (the pre-flight NUMA check).

    ``cpus``: the host CPUs its vCPUs may run on (``<cputune><vcpupin cpuset>``, the rest of the
    vCPUs ``<vcpu cpuset>``); None when some vCPU may run anywhere. ``memory_nodes``:
    ``<numatune><memory nodeset>``; None when absent or left to numad (``placement='auto'``)."""
    cpus: frozenset[int] | None = None
    memory_nodes: frozenset[int] | None = None

    @property
    def constrained(self) -> bool:
        return self.cpus is not None or self.memory_nodes is not None


def _first(el: etree._Element, tag: str) -> etree._Element | None:
    return next(iter(_children(el, tag)), None)


def guest_numa(root: etree._Element) -> GuestNuma:
    """Read a ``<domain>``'s placement; malformed lists (libvirt rejects them) count as absent."""
    vcpu = _first(root, "vcpu")
    count = 1
    vcpu_set: frozenset[int] | None = None
    if vcpu is not None:
        try:
            count = max(1, min(int((vcpu.text or "1").strip()), 16384))
        except ValueError:
            count = 1
        if vcpu.get("placement") != "auto" and vcpu.get("cpuset"):
            vcpu_set = parse_cpuset(vcpu.get("cpuset") or "")
    pinned: dict[int, frozenset[int]] = {}
    cputune = _first(root, "cputune")
    for pin in _children(cputune, "vcpupin") if cputune is not None else []:
        pin_cpus = parse_cpuset(pin.get("cpuset") or "")
        try:
            which = int(pin.get("vcpu") or "")
        except ValueError:
            continue
        if pin_cpus and 0 <= which < count:
            pinned[which] = pin_cpus
    cpus: frozenset[int] | None
    if len(pinned) >= count:
        cpus = frozenset().union(*pinned.values())
    elif vcpu_set:
        cpus = vcpu_set.union(*pinned.values())
    else:
        cpus = None
    memory = None
    numatune = _first(root, "numatune")
    mem = _first(numatune, "memory") if numatune is not None else None
    if mem is not None and mem.get("placement") != "auto" and mem.get("nodeset"):
        memory = parse_cpuset(mem.get("nodeset") or "") or None
    return GuestNuma(cpus, memory)


# --------------------------------------------------------------------------- helpers


def _ctx(el: etree._Element) -> str:
    """How a message names an element: ``<hostdev type='pci'> at line 34``."""
    typ = el.get("type")
    name = f"<{_tag(el)} type={_q(typ, 20)}>" if typ is not None else f"<{_tag(el)}>"
    line = el.sourceline
    return f"{name} at line {line}" if line else name


def _alias(el: etree._Element, ctx: str) -> str | None:
    alias = _one(el, "alias", ctx)
    return alias.get("name") if alias is not None else None


def _vlan(el: etree._Element, ctx: str) -> tuple[tuple[int, ...], bool] | None:
    vlan = _one(el, "vlan", ctx)
    if vlan is None:
        return None
    ids = [_uint(t.get("id"), "VLAN tag id", ctx, 4095) for t in _children(vlan, "tag")]
    tags = tuple(t for t in ids if t is not None)
    if len(tags) != len(ids):
        raise _err(f"{ctx} has a VLAN <tag> without an id attribute")
    if not tags:
        raise _err(f"{ctx} has a <vlan> with no <tag id=…/>")
    trunk = _yes_no(vlan.get("trunk"), "trunk", ctx)
    return tags, bool(trunk) or len(tags) > 1     # libvirt: more than one tag means trunk


def _driver_model(el: etree._Element, ctx: str) -> str | None:
    drv = _one(el, "driver", ctx)
    return drv.get("model") or None if drv is not None else None


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
        driver_model=_driver_model(el, ctx),
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
    driver, model = _driver(dev, ctx), _driver_model(dev, ctx)
    if driver is None and dev is not el:
        driver, model = _driver(el, ctx), _driver_model(el, ctx)
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
        driver_model=model,
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
    if source is None or not network:
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

    result = DomainRequest(name, uuid, numa=guest_numa(root) if root.tag == "domain" else None)
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
