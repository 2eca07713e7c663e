"""Hardened lxml parsing shared by every parser of libvirt XML (:mod:`.domxml`, :mod:`.netxml`).

Everything hostdevd parses is XML that somebody else wrote (a hook's stdin, a
socket client, ``virsh dumpxml``), so the parser is hardened and strict:

* input is UTF-8 (``str`` is encoded, ``bytes`` must decode) and at most
  ``max_bytes`` (1 MiB by default);
* any ``<!DOCTYPE``/``<!ENTITY``-style declaration is refused *before* libxml2
  sees the document (no entity expansion, no external entities, no DTD), and
  the parsed tree is checked again afterwards;
* lxml runs with ``resolve_entities=False, no_network=True, load_dtd=False,
  huge_tree=False``;
* every failure is an :class:`~hostdevd.core.errors.InvalidXML` whose message is
  one line naming the element (and its source line) that is wrong.

The small element helpers here (one child, its text, yes/no, a PCI address, a
MAC) are the ones both the domain and the network/nodedev parsers use.
"""
from __future__ import annotations

import re

from lxml import etree

from .address import PciAddress
from .errors import InvalidAddress, InvalidXML

MiB = 1024 * 1024
DEFAULT_MAX_BYTES = MiB

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


# --------------------------------------------------------------------------- element helpers


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


def _driver(el: etree._Element, ctx: str) -> str | None:
    drv = _one(el, "driver", ctx)
    if drv is None:
        return None
    return drv.get("model") or drv.get("name") or None


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
