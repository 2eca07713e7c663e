"""libvirt network, network port and node device XML in, plain values out.

:func:`parse_network` reads a ``<network>`` (a hostdev/passthrough network is a VF
pool), :func:`parse_networkport` a ``<networkport>`` (the network hook's input),
:func:`parse_nodedev`/:func:`parse_nodedevs` ``virsh nodedev-dumpxml`` output. The
parsing is hardened the same way as the domain parser's (:mod:`.xmlsafe`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from lxml import etree

from .address import PciAddress
from .errors import InvalidAddress
from .xmlsafe import (
    _XMLDECL_RE,
    DEFAULT_MAX_BYTES,
    _check_numbers,
    _children,
    _driver,
    _err,
    _load,
    _mac,
    _one,
    _parse,
    _pci,
    _prepare,
    _q,
    _tag,
    _text,
    _uint,
    _yes_no,
)

# --------------------------------------------------------------------------- values


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
    pf_devs: list[str] = []
    interface_devs: list[str] = []
    vfs: list[PciAddress] = []
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
