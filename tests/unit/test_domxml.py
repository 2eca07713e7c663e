"""hostdevd.domxml against hostile, malformed and tricky input.

Every refusal must be an InvalidXML (a UsageError) with a one-line message that
says what is wrong; nothing else may escape, whatever the bytes.
"""
from __future__ import annotations

import os
import re
from xml.sax.saxutils import quoteattr

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostdevd.core import xmlsafe as domxml
from hostdevd.core.address import PciAddress
from hostdevd.core.domxml import DeviceRequest, NetworkRef, parse_device, parse_domain
from hostdevd.core.errors import InvalidXML, UsageError
from hostdevd.core.netxml import parse_network, parse_networkport, parse_nodedev, parse_nodedevs
from hostdevd.core.xmlsafe import DEFAULT_MAX_BYTES

A = PciAddress.parse


def refused(xml, match: str, parser=parse_domain, **kw) -> str:
    """Assert ``parser(xml)`` raises InvalidXML matching ``match`` with a one-line message."""
    with pytest.raises(InvalidXML, match=match) as info:
        parser(xml, **kw)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message, message
    assert len(message) < 500, message
    assert info.value.code == "INVALID_XML"
    return message


def domain(devices: str, name: str = "vm1") -> str:
    return (f"<domain type='kvm'><name>{name}</name><uuid>d091ea82-29e6-2e34-3005-f02617b36e87</uuid>"
            f"<devices>{devices}</devices></domain>")


def hostdev(bus="0x06", slot="0x12", function="0x2", domain_="0x0000", extra="", managed="yes") -> str:
    m = f" managed='{managed}'" if managed is not None else ""
    return (f"<hostdev mode='subsystem' type='pci'{m}><source>"
            f"<address domain='{domain_}' bus='{bus}' slot='{slot}' function='{function}'/>"
            f"</source>{extra}</hostdev>")


# --------------------------------------------------------------------------- entities, DTDs

BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<domain><name>&lol9;</name></domain>
"""

XXE_FILE = """<?xml version="1.0"?>
<!DOCTYPE domain [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<domain><name>&xxe;</name><devices/></domain>
"""

XXE_IN_ATTRIBUTE = """<!DOCTYPE hostdev [<!ENTITY bus SYSTEM "file:///etc/hostname">]>
<hostdev mode='subsystem' type='pci'><source><address bus='&bus;' slot='0x01'/></source></hostdev>
"""

EXTERNAL_DTD = '<!DOCTYPE domain SYSTEM "http://127.0.0.1:9/evil.dtd"><domain><name>x</name></domain>'
PARAMETER_ENTITY = ('<!DOCTYPE d [<!ENTITY % p SYSTEM "file:///etc/passwd"> %p;]>'
                    "<domain><name>x</name></domain>")


@pytest.mark.parametrize("xml", [BILLION_LAUGHS, XXE_FILE, XXE_IN_ATTRIBUTE, EXTERNAL_DTD, PARAMETER_ENTITY],
                         ids=["billion-laughs", "xxe-file", "xxe-attribute", "external-dtd", "parameter-entity"])
@pytest.mark.parametrize("as_bytes", [False, True])
def test_dtd_and_entity_declarations_are_refused(xml, as_bytes):
    message = refused(xml.encode() if as_bytes else xml, r"<!DOCTYPE> or <!ENTITY> declaration")
    assert "root:" not in message                       # nothing of /etc/passwd leaks into a message


@pytest.mark.parametrize("xml", [
    "<!doctype domain><domain/>",                       # not XML, but refuse before libxml2 decides
    "<! DOCTYPE domain><domain/>",
    "<domain><![CDATA[x]]><!ENTITY a 'b'></domain>",
    "<!ELEMENT domain ANY><domain/>",
])
def test_declaration_spellings_are_refused(xml):
    refused(xml, r"<!DOCTYPE> or <!ENTITY> declaration")


@pytest.mark.parametrize("parser", [parse_device, parse_network, parse_nodedev, parse_nodedevs, parse_networkport])
def test_every_entry_point_refuses_entities(parser):
    refused(BILLION_LAUGHS, r"declaration", parser=parser)
    refused(XXE_FILE, r"declaration", parser=parser)


def test_dtd_is_refused_even_if_the_pre_scan_missed_it():
    """Defence in depth: the parsed tree is checked for a DTD and entity nodes too.

    (For billion laughs libxml2's own limits fire first: its amplification limit, or, in the
    libxml2 of Debian 13's lxml 5.4, its entity loop detection; either way it is refused.)
    """
    for data in (BILLION_LAUGHS.encode(), XXE_FILE.encode(), b"<!DOCTYPE domain><domain/>"):
        with pytest.raises(InvalidXML, match="carries a DTD|entity amplification|entity reference loop"):
            domxml._parse(data, "domain")


def test_undefined_entity_reference_is_refused():
    refused(domain("", name="&xxe;"), r"not well-formed: Entity 'xxe' not defined")


def test_predefined_entities_and_char_refs_are_fine():
    got = parse_domain(domain("", name="a&amp;b&#x41;&lt;"))
    assert got.name == "a&bA<"


def test_xinclude_is_not_processed():
    xml = ("<domain xmlns:xi='http://www.w3.org/2001/XInclude'><name>x</name>"
           "<xi:include href='/etc/passwd' parse='text'/><devices/></domain>")
    got = parse_domain(xml)
    assert got.name == "x" and got.requests == []


def test_parser_is_configured_hardened():
    parser = domxml._parser()
    # lxml does not expose the options directly; check behaviour instead: a DTD given straight to the
    # parser is not loaded and its entities are not expanded.
    from lxml import etree
    root = etree.fromstring(b'<!DOCTYPE d [<!ENTITY a "expanded">]><d>&a;</d>', parser)
    assert "expanded" not in etree.tostring(root).decode()


# --------------------------------------------------------------------------- size, encoding, garbage


def test_size_limit_message_is_exact():
    xml = domain("") + " " * (DEFAULT_MAX_BYTES)
    size = len(xml.encode())
    refused(xml, rf"^domain XML is {size} bytes, over the 1 MiB limit$")
    refused(xml.encode(), rf"^domain XML is {size} bytes, over the 1 MiB limit$")


def test_size_limit_counts_bytes_not_characters():
    xml = domain("", name="é" * 600)                   # 600 characters, 1200 bytes
    size = len(xml.encode())
    assert len(xml) < 1024 < size
    refused(xml, rf"domain XML is {size} bytes, over the 1 KiB limit", max_bytes=1024)


def test_document_at_the_limit_is_accepted():
    base = domain(hostdev())
    padded = base.replace("</domain>", "<!--" + "x" * (DEFAULT_MAX_BYTES - len(base) - 7) + "--></domain>")
    assert len(padded.encode()) == DEFAULT_MAX_BYTES
    assert parse_domain(padded).addresses() == [A("0000:06:12.2")]
    refused(padded + " ", r"over the 1 MiB limit")


def test_custom_limits_are_named():
    refused(domain("") + " " * 5000, r"over the 4 KiB limit", max_bytes=4096)
    refused(domain("") + " " * 5000, r"over the 1000 byte limit", max_bytes=1000)


def test_gigantic_string_is_refused_without_copying():
    refused("x" * (65 * 1024 * 1024), r"at least \d+ bytes, over the 1 MiB limit")


def test_deep_nesting_is_refused():
    deep = "<domain>" + "<a>" * 5000 + "</a>" * 5000 + "</domain>"
    refused(deep, r"nested more than 256 deep")


def test_wide_but_shallow_is_fine():
    xml = domain("<input type='mouse'/>" * 20000)
    assert parse_domain(xml).requests == []


@pytest.mark.parametrize("data, match", [
    (b"", r"empty"),
    (b"   \n\t ", r"empty"),
    ("", r"empty"),
    (b"\x00\x01\x02\x03", r"not well-formed"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", r"not valid UTF-8"),
    ("not xml at all", r"not well-formed"),
    ("<domain", r"not well-formed"),
    ("<domain></domian>", r"not well-formed: Opening and ending tag mismatch"),
    ("<domain/><domain/>", r"not well-formed: Extra content"),
    ("<domain a='1' a='2'/>", r"not well-formed"),
    ("<domain>\x00</domain>", r"not well-formed"),
    ("<domain>\x1b[31m</domain>", r"not well-formed"),
    ("{\"domain\": 1}", r"not well-formed"),
])
def test_garbage_is_refused(data, match):
    refused(data, match)


@pytest.mark.parametrize("data", [
    b"<domain><name>caf\xe9</name></domain>",                                    # Latin-1
    b"<?xml version='1.0' encoding='ISO-8859-1'?><domain><name>caf\xe9</name></domain>",
    "<domain/>".encode("utf-16"),                                                # UTF-16 with BOM
    b"<domain><name>\xc0\xaf</name></domain>",                                   # overlong UTF-8
    b"<domain><name>\xed\xa0\x80</name></domain>",                               # encoded surrogate
])
def test_non_utf8_is_refused(data):
    refused(data, r"not valid UTF-8 \(byte 0x[0-9a-f]{2} at offset \d+\)")


def test_lone_surrogate_in_str_is_refused():
    refused(domain("", name="\ud800"), r"not valid UTF-8")


def test_utf8_bom_and_declaration_are_accepted():
    xml = "\ufeff<?xml version='1.0' encoding='UTF-8'?>" + domain(hostdev(), name="café")
    assert parse_domain(xml).name == "café"
    assert parse_domain(xml.encode("utf-8")).name == "café"


def test_declared_encoding_is_ignored_for_utf8_bytes():
    data = "<?xml version='1.0' encoding='ISO-8859-1'?><domain><name>café</name></domain>".encode()
    assert parse_domain(data).name == "café"             # bytes are UTF-8, whatever the declaration says


@pytest.mark.parametrize("value", [None, 42, ["<domain/>"], object()])
def test_wrong_input_type_is_refused(value):
    refused(value, r"must be str or bytes")


def test_bytearray_and_memoryview_are_accepted():
    data = domain(hostdev()).encode()
    assert parse_domain(bytearray(data)) == parse_domain(memoryview(data)) == parse_domain(data)


@pytest.mark.parametrize("xml", ["<network><name>n</name></network>", "<device/>", "<devices/>",
                                 "<domain xmlns='http://example.com/ns'/>"])
def test_wrong_root_is_refused(xml):
    refused(xml, r"expected <domain>, <hostdev> or <interface>")


# --------------------------------------------------------------------------- addresses


@pytest.mark.parametrize("attrs, match", [
    ("domain='0x0000' slot='0x12' function='0x2'", r"missing its bus attribute"),
    ("domain='0x0000' bus='0x06' function='0x2'", r"missing its slot attribute"),
    ("bus='0x100' slot='0x00'", r"PCI bus 256 out of range 0\.\.0xff"),
    ("bus='256' slot='0x00'", r"PCI bus 256 out of range"),
    ("bus='0x00' slot='0x20'", r"PCI slot 32 out of range 0\.\.0x1f"),
    ("bus='0x00' slot='0x00' function='0x8'", r"PCI function 8 out of range 0\.\.0x7"),
    ("domain='0x10000' bus='0x00' slot='0x00'", r"PCI domain 65536 out of range 0\.\.0xffff"),
    ("bus='-1' slot='0x00'", r"PCI bus='-1' is not a number"),
    ("bus='0x' slot='0x00'", r"is not a number"),
    ("bus='1e3' slot='0x00'", r"is not a number"),
    ("bus='0b11' slot='0x00'", r"is not a number"),
    ("bus='six' slot='0x00'", r"is not a number"),
    ("bus='' slot='0x00'", r"is not a number"),
    ("bus='\u0663' slot='0x00'", r"is not a number"),                 # Arabic-Indic digit three
    ("bus='0x 6' slot='0x00'", r"is not a number"),
    ("bus='+6' slot='0x00'", r"is not a number"),
    ("bus='010' slot='0x00'", r"PCI bus='010' is ambiguous \(libvirt reads a leading 0 as octal\)"),
    ("bus='0x06' slot='09'", r"PCI slot='09' is ambiguous"),
    ("bus='" + "9" * 5000 + "' slot='0x00'", r"PCI bus='9999.*' is too long"),
    ("bus='0x" + "0" * 40 + "6' slot='0x00'", r"too long"),
])
def test_bad_host_addresses_are_refused(attrs, match):
    xml = domain(f"<hostdev mode='subsystem' type='pci'><source><address {attrs}/></source></hostdev>")
    message = refused(xml, match)
    assert message.startswith("<hostdev type='pci'> at line 1")


def test_bad_address_in_interface_names_the_interface():
    xml = ("<interface type='hostdev'>\n<source>\n<address type='pci' bus='0x100' slot='0x00'/>"
           "</source></interface>")
    assert refused(xml, r"out of range").startswith("<interface type='hostdev'> at line 1:")


@pytest.mark.parametrize("attrs, expected", [
    ("domain='33' bus='222' slot='31' function='1'", "0021:de:1f.1"),  # libvirt's multidomain test, all decimal
    ("domain='0x0021' bus='222' slot='31' function='1'", "0021:de:1f.1"),
    ("bus='0X06' slot='0x1F' function='0x7'", "0000:06:1f.7"),
    ("bus='0xDE' slot='0x1f'", "0000:de:1f.0"),                          # domain and function default 0
    ("bus='0' slot='0' function='0'", "0000:00:00.0"),
    ("domain='0xffff' bus='0xff' slot='0x1f' function='0x7'", "ffff:ff:1f.7"),
    ("domain='65535' bus='255' slot='31' function='7'", "ffff:ff:1f.7"),
    ("domain=' 0x0000 ' bus=' 0x06' slot='0x12 ' function='2'", "0000:06:12.2"),
    ("domain='0x00000000' bus='0x0006' slot='0x12' function='0x2'", "0000:06:12.2"),
])
def test_hex_and_decimal_forms(attrs, expected):
    xml = f"<hostdev mode='subsystem' type='pci'><source><address {attrs}/></source></hostdev>"
    assert parse_domain(xml).addresses() == [A(expected)]


# --------------------------------------------------------------------------- guest vs host addresses


def test_guest_address_alone_is_not_a_host_address():
    xml = domain("<hostdev mode='subsystem' type='pci' managed='yes'>"
                 "<address type='pci' domain='0x0000' bus='0x00' slot='0x05' function='0x0'/></hostdev>")
    refused(xml, r"<hostdev type='pci'> at line 1 has no host PCI address; expected <source><address")


def test_empty_source_is_refused():
    refused(domain("<hostdev mode='subsystem' type='pci'><source/></hostdev>"), r"has no host PCI address")


def test_interface_guest_address_alone_is_not_a_host_address():
    xml = ("<interface type='hostdev' managed='yes'><mac address='52:54:00:6d:90:02'/>"
           "<address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x0'/></interface>")
    refused(xml, r"<interface type='hostdev'> at line 1 has no host PCI address")


def test_guest_address_before_source_does_not_win():
    xml = domain("<hostdev mode='subsystem' type='pci'>"
                 "<address type='pci' domain='0x0000' bus='0x00' slot='0x05' function='0x0'/>"
                 "<source><address domain='0x0000' bus='0x06' slot='0x12' function='0x2'/></source>"
                 "</hostdev>")
    assert parse_domain(xml).addresses() == [A("0000:06:12.2")]


def test_same_guest_address_twice_is_not_a_duplicate():
    guest = "<address type='pci' domain='0x0000' bus='0x00' slot='0x05' function='0x0'/>"
    xml = domain(hostdev(function="0x1", extra=guest) + hostdev(function="0x2", extra=guest))
    assert parse_domain(xml).addresses() == [A("0000:06:12.1"), A("0000:06:12.2")]


def test_guest_address_nested_in_source_child_is_not_read():
    # an <address> deeper than <source>/<address> is not the host address
    xml = domain("<hostdev mode='subsystem' type='pci'><source><x><address bus='0x01' slot='0x01'/></x>"
                 "</source></hostdev>")
    refused(xml, r"has no host PCI address")


def test_source_address_of_wrong_type_is_refused():
    xml = domain("<hostdev mode='subsystem' type='pci'><source><address type='usb' bus='1' device='2'/>"
                 "</source></hostdev>")
    refused(xml, r"source <address type='usb'>; expected type='pci'")


def test_source_uuid_address_on_pci_hostdev_is_refused():
    xml = domain("<hostdev mode='subsystem' type='pci'><source>"
                 "<address uuid='53764d0e-85a0-42b4-af5c-2046b460b1dc'/></source></hostdev>")
    refused(xml, r"uuid source address; expected a PCI address")


def test_two_source_addresses_are_refused():
    xml = domain("<hostdev mode='subsystem' type='pci'><source><address bus='1' slot='1'/>"
                 "<address bus='2' slot='2'/></source></hostdev>")
    refused(xml, r"has 2 <address> elements in <source>; expected one")


def test_two_sources_are_refused():
    xml = domain("<hostdev mode='subsystem' type='pci'><source><address bus='1' slot='1'/></source>"
                 "<source><address bus='2' slot='2'/></source></hostdev>")
    refused(xml, r"has 2 <source> elements")


def test_duplicate_host_address_is_refused():
    xml = domain("\n" + hostdev() + "\n" + hostdev(bus="6", slot="18", function="2"))
    refused(xml, r"host PCI device 0000:06:12\.2 is assigned twice: by <hostdev type='pci'> at line 2 "
                 r"and <hostdev type='pci'> at line 3")


def test_duplicate_across_hostdev_and_interface_is_refused():
    xml = domain(hostdev() + "<interface type='hostdev'><source><address type='pci' domain='0' bus='0x06' "
                 "slot='0x12' function='2'/></source></interface>")
    refused(xml, r"assigned twice: by <hostdev type='pci'> .* and <interface type='hostdev'>")


def test_hostdev_outside_devices_is_ignored():
    xml = ("<domain><name>x</name><metadata><app:cfg xmlns:app='http://example.com/app'>"
           + hostdev() + "</app:cfg></metadata><devices/></domain>")
    assert parse_domain(xml).requests == []


def test_commented_hostdev_is_ignored():
    assert parse_domain(domain("<!--" + hostdev() + "-->")).requests == []


def test_two_devices_elements_are_refused():
    refused("<domain><devices/><devices/></domain>", r"<domain> has 2 <devices> elements")


# --------------------------------------------------------------------------- hostdev types and attributes


@pytest.mark.parametrize("xml, match", [
    ("<hostdev mode='subsystem'><source><address bus='1' slot='1'/></source></hostdev>", r"has no type attribute"),
    ("<hostdev mode='sub' type='pci'/>", r"mode='sub'; expected 'subsystem' or 'capabilities'"),
    ("<hostdev mode='subsystem' type='ccw'/>", r"unknown hostdev type 'ccw' \(known: pci, usb"),
    ("<hostdev mode='capabilities' type='pci'/>", r"unknown capabilities type 'pci'"),
    ("<hostdev type='pci' managed='true'><source><address bus='1' slot='1'/></source></hostdev>",
     r"managed='true'; expected 'yes' or 'no'"),
    ("<hostdev type='pci' managed='YES'><source><address bus='1' slot='1'/></source></hostdev>",
     r"managed='YES'"),
    ("<hostdev type='pci'><driver name='vfio'/><driver name='kvm'/>"
     "<source><address bus='1' slot='1'/></source></hostdev>", r"has 2 <driver> elements"),
])
def test_malformed_hostdevs_are_refused(xml, match):
    refused(xml, match)


@pytest.mark.parametrize("managed, expected", [("yes", True), ("no", False), (None, None)])
def test_managed(managed, expected):
    assert parse_domain(domain(hostdev(managed=managed))).requests[0].managed is expected


def test_mode_defaults_to_subsystem():
    xml = "<hostdev type='pci'><source><address bus='0x06' slot='0x12' function='0x2'/></source></hostdev>"
    assert parse_domain(xml).requests == [DeviceRequest(A("0000:06:12.2"), "hostdev", None)]


def test_driver_model_wins_over_name_and_alias_is_read():
    xml = domain(hostdev(extra="<driver name='vfio' model='vfio-pci-igb'/><alias name='ua-gpu'/>"))
    req = parse_domain(xml).requests[0]
    assert (req.driver, req.alias) == ("vfio-pci-igb", "ua-gpu")


@pytest.mark.parametrize("xml, kind, detail", [
    ("<hostdev mode='subsystem' type='usb'><source><vendor id='0x1234'/><product id='0xbeef'/></source></hostdev>",
     "usb", "USB vendor 0x1234 product 0xbeef"),
    ("<hostdev mode='subsystem' type='mdev' model='vfio-pci'><source><address uuid='c2177883'/></source></hostdev>",
     "mdev", "mdev model vfio-pci uuid c2177883"),
    ("<hostdev mode='subsystem' type='scsi_host'><source protocol='vhost' wwpn='naa.50'/></hostdev>",
     "scsi_host", "wwpn naa.50"),
    ("<hostdev mode='capabilities' type='storage'><source><block>/dev/sdf1</block></source></hostdev>",
     "capabilities:storage", "/dev/sdf1"),
    ("<hostdev mode='capabilities' type='misc'><source><char>/dev/\ntty0</char></source></hostdev>",
     "capabilities:misc", "/dev/ tty0"),
    ("<hostdev mode='subsystem' type='usb'/>", "usb", "USB"),
])
def test_out_of_scope_hostdevs_are_reported_not_refused(xml, kind, detail):
    got = parse_domain(domain(xml))
    assert got.requests == [] and [o.kind for o in got.out_of_scope] == [kind]
    assert detail in got.out_of_scope[0].detail and "\n" not in got.out_of_scope[0].detail


# --------------------------------------------------------------------------- interfaces


def iface(extra: str = "", typ: str = "hostdev", managed: str | None = "yes") -> str:
    m = f" managed='{managed}'" if managed else ""
    return (f"<interface type='{typ}'{m}><source><address type='pci' domain='0x0000' bus='0x03' slot='0x07' "
            f"function='0x1'/></source>{extra}</interface>")


def test_interface_hostdev_with_mac_vlan_virtualport():
    xml = iface("<mac address='52:54:00:6D:90:02'/><vlan><tag id='42'/></vlan>"
                "<virtualport type='802.1Qbh'><parameters profileid='finance'/></virtualport>"
                "<driver name='vfio'/><alias name='hostdev0'/>")
    assert parse_device(xml).requests == [DeviceRequest(
        A("0000:03:07.1"), "interface", True, alias="hostdev0", mac="52:54:00:6d:90:02", vlan_tags=(42,),
        vlan_trunk=False, virtualport="802.1Qbh", driver="vfio")]


def test_interface_source_address_without_type_is_accepted():
    xml = "<interface type='hostdev'><source><address bus='0x03' slot='0x07' function='1'/></source></interface>"
    assert parse_device(xml).addresses() == [A("0000:03:07.1")]


@pytest.mark.parametrize("vlan, tags, trunk", [
    ("<vlan><tag id='42'/></vlan>", (42,), False),
    ("<vlan trunk='yes'><tag id='42'/></vlan>", (42,), True),
    ("<vlan><tag id='10'/><tag id='20' nativeMode='untagged'/></vlan>", (10, 20), True),
    ("<vlan><tag id='0'/></vlan>", (0,), False),
    ("<vlan><tag id='4095'/></vlan>", (4095,), False),
])
def test_vlans(vlan, tags, trunk):
    req = parse_device(iface(vlan)).requests[0]
    assert (req.vlan_tags, req.vlan_trunk) == (tags, trunk)


@pytest.mark.parametrize("extra, match", [
    ("<vlan><tag id='4096'/></vlan>", r"VLAN tag id '4096'; expected a whole number 0\.\.4095"),
    ("<vlan><tag id='-1'/></vlan>", r"VLAN tag id '-1'"),
    ("<vlan><tag id='0x10'/></vlan>", r"VLAN tag id '0x10'"),
    ("<vlan><tag/></vlan>", r"VLAN <tag> without an id"),
    ("<vlan/>", r"<vlan> with no <tag"),
    ("<vlan trunk='maybe'><tag id='1'/></vlan>", r"trunk='maybe'"),
    ("<mac address='52:54:00:6d:90'/>", r"MAC address '52:54:00:6d:90'; expected six hex pairs"),
    ("<mac address='52:54:00:6d:90:02\n'/>", r"MAC address"),
    ("<mac/>", r"<mac> without an address"),
    ("<mac address='52:54:00:6d:90:02'/><mac address='52:54:00:6d:90:03'/>", r"has 2 <mac> elements"),
])
def test_bad_interface_details_are_refused(extra, match):
    refused(iface(extra), match, parser=parse_device)


def test_interface_without_type_is_refused():
    refused("<interface><source bridge='br0'/></interface>", r"<interface> at line 1 has no type attribute")


@pytest.mark.parametrize("typ", ["bridge", "direct", "user", "vdpa", "ethernet", "vhostuser"])
def test_non_hostdev_interfaces_are_ignored(typ):
    # even with a PCI-looking source address (vdpa, direct): no host PCI binding for hostdevd
    got = parse_domain(domain(iface(typ=typ)))
    assert (got.requests, got.networks, got.out_of_scope) == ([], [], [])


def test_network_interface_is_a_network_ref():
    xml = domain("<interface type='network'><mac address='52:54:00:7B:35:93'/>"
                 "<source network='sriov-pool' portgroup='engineering'/></interface>")
    got = parse_domain(xml)
    assert got.requests == [] and got.networks == [NetworkRef("sriov-pool", "engineering", "52:54:00:7b:35:93")]


def test_network_interface_without_network_name_is_refused():
    refused(domain("<interface type='network'><source bridge='br0'/></interface>"),
            r"<interface type='network'> at line 1 has no <source network='…'/>")


def test_network_interface_resolved_by_actual_hostdev():
    xml = domain(
        "<interface type='network'><mac address='52:54:00:7b:35:93'/><source network='hostdev-net'/>"
        "<actual type='hostdev' managed='yes'><driver name='vfio'/>"
        "<source><address type='pci' domain='0x0000' bus='0x06' slot='0x10' function='0x1'/></source>"
        "<vlan><tag id='7'/></vlan></actual>"
        "<alias name='hostdev1'/>"
        "<address type='pci' domain='0x0000' bus='0x00' slot='0x03' function='0x0'/></interface>")
    got = parse_domain(xml)
    assert got.networks == []                       # resolved: a request instead of a NetworkRef
    assert got.requests == [DeviceRequest(
        A("0000:06:10.1"), "interface", True, alias="hostdev1", mac="52:54:00:7b:35:93", vlan_tags=(7,),
        driver="vfio", network="hostdev-net")]


def test_network_interface_actual_without_address_is_refused():
    xml = domain("<interface type='network'><source network='n'/><actual type='hostdev'/></interface>")
    refused(xml, r"<interface type='network'> at line 1 \(<actual type='hostdev'>\) has no host PCI address")


def test_network_interface_resolved_to_a_bridge_is_not_a_request():
    xml = domain("<interface type='network'><source network='default'/>"
                 "<actual type='bridge'><source bridge='virbr0'/></actual></interface>")
    got = parse_domain(xml)
    assert (got.requests, got.networks) == ([], [])


# --------------------------------------------------------------------------- fragments, results


def test_fragments_have_no_name_and_device_messages():
    got = parse_device(hostdev())
    assert (got.name, got.uuid, got.addresses()) == (None, None, [A("0000:06:12.2")])
    refused("<hostdev", r"^device XML is not well-formed", parser=parse_device)
    refused(b"x" * 5000, r"^device XML is 5000 bytes, over the 4 KiB limit", parser=parse_device, max_bytes=4096)


def test_to_dict_is_plain_data():
    got = parse_domain(domain(hostdev() + "<hostdev mode='subsystem' type='usb'/>"
                              "<interface type='network'><source network='n'/></interface>"))
    assert got.to_dict() == {
        "name": "vm1", "uuid": "d091ea82-29e6-2e34-3005-f02617b36e87",
        "requests": [{"address": "0000:06:12.2", "kind": "hostdev", "managed": True, "alias": None, "mac": None,
                      "vlan_tags": [], "vlan_trunk": False, "virtualport": None, "driver": None, "network": None,
                      "driver_model": None}],
        "networks": [{"network": "n", "portgroup": None, "mac": None}],
        "out_of_scope": [{"kind": "usb", "detail": "USB"}],
    }


def test_device_request_is_frozen_and_hashable():
    req = parse_device(hostdev()).requests[0]
    with pytest.raises(AttributeError):
        req.managed = False                         # type: ignore[misc]
    assert len({req, req}) == 1


# --------------------------------------------------------------------------- networks, ports, nodedevs


def network(forward: str) -> str:
    return f"<network><name>pool</name>{forward}</network>"


def test_network_without_forward_and_default_mode():
    assert parse_network(network("")).forward_mode is None
    assert parse_network(network("<forward/>")).forward_mode == "nat"
    assert not parse_network(network("<forward mode='nat'/>")).is_hostdev


@pytest.mark.parametrize("xml, match", [
    ("<network/>", r"<network> has no <name>"),
    ("<domain/>", r"root <domain>; expected <network>"),
    (network("<forward mode='hostdev'><address type='usb' bus='1' slot='1'/></forward>"),
     r"<address type='usb'>; expected type='pci'"),
    (network("<forward mode='hostdev'><address type='pci' bus='1' slot='1'/><address type='pci' bus='1' "
             "slot='1'/></forward>"), r"lists PCI device 0000:01:01\.0 twice"),
    (network("<forward mode='hostdev'><address type='pci' bus='0x100' slot='1'/></forward>"), r"out of range"),
    (network("<forward mode='passthrough'><pf/></forward>"), r"<pf> without a dev attribute"),
    (network("<forward mode='hostdev' managed='on'/>"), r"managed='on'"),
    (network("<forward/><forward/>"), r"has 2 <forward> elements"),
])
def test_bad_networks_are_refused(xml, match):
    refused(xml, match, parser=parse_network)


def test_networkport_without_plug():
    port = parse_networkport("<networkport><uuid>u</uuid><owner><name>vm</name></owner></networkport>")
    assert (port.plug_type, port.address, port.owner_name) == (None, None, "vm")
    refused("<networkport><plug type='hostdev-pci'/></networkport>", r"0 <address> elements",
            parser=parse_networkport)


@pytest.mark.parametrize("xml, match", [
    ("<domain/>", r"root <domain>; expected <device>"),
    ("<device/>", r"<device> has no <name>"),
    ("<device><name>pci_x</name><capability type='pci'><bus>1</bus></capability></device>",
     r"nodedev 'pci_x': PCI address is missing its slot attribute"),
    ("<device><name>pci_x</name><capability type='pci'><bus>1</bus><slot>1</slot>"
     "<iommuGroup number='x'/></capability></device>", r"iommuGroup number 'x'"),
    ("<device><name>pci_x</name><capability type='pci'><bus>1</bus><slot>1</slot>"
     "<iommuGroup/></capability></device>", r"<iommuGroup> without a number"),
    ("<device><name>pci_x</name><capability/></device>", r"<capability> without a type"),
    ("<device><name>x</name></device><device><name>y</name></device>", r"not well-formed"),
])
def test_bad_nodedevs_are_refused(xml, match):
    refused(xml, match, parser=parse_nodedev)


def test_nodedevs_list():
    two = "<?xml version='1.0'?><device><name>a</name></device>\n<device><name>b</name></device>"
    assert [n.name for n in parse_nodedevs(two)] == ["a", "b"]
    assert [n.name for n in parse_nodedevs("<device><name>only</name></device>")] == ["only"]
    refused("<device><name>a</name></device>junk<device><name>b</name></device>", r"text between <device>",
            parser=parse_nodedevs)
    refused("<device><name>a</name></device><network/>", r"root <network>; expected <device>",
            parser=parse_nodedevs)


# --------------------------------------------------------------------------- fuzzing

# HOSTDEVD_FUZZ_EXAMPLES=20000 for a longer run (6000 per test ran clean when this was written)
FUZZ = settings(max_examples=int(os.environ.get("HOSTDEVD_FUZZ_EXAMPLES", "400")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
PARSERS = [parse_domain, parse_device, parse_network, parse_networkport, parse_nodedev, parse_nodedevs]


def only_usage_errors(parser, data) -> None:
    try:
        parser(data)
    except UsageError as e:
        assert isinstance(e, InvalidXML) or e.code == "INVALID_ADDRESS"
        assert "\n" not in str(e) and "\r" not in str(e), str(e)


@FUZZ
@given(st.binary(max_size=4096))
def test_fuzz_bytes(data):
    for parser in PARSERS:
        only_usage_errors(parser, data)


@FUZZ
@given(st.text(max_size=4096))
def test_fuzz_text(text):
    for parser in PARSERS:
        only_usage_errors(parser, text)


TOKENS = [
    "<domain>", "</domain>", "<devices>", "</devices>", "<hostdev mode='subsystem' type='pci'>",
    "<hostdev type='pci' managed='yes'>", "<hostdev mode='capabilities' type='storage'>", "<hostdev type='mdev'>",
    "</hostdev>", "<interface type='hostdev'>", "<interface type='network'>", "</interface>",
    "<source>", "</source>", "<source network='n'/>", "<actual type='hostdev'>", "</actual>",
    "<address domain='0x0000' bus='0x06' slot='0x12' function='0x2'/>",
    "<address type='pci' bus='0x100' slot='1'/>", "<address bus='1' slot='2'/>", "<address uuid='x'/>",
    "<address type='pci'/>", "<mac address='52:54:00:00:00:01'/>", "<mac address='zz'/>",
    "<vlan>", "</vlan>", "<tag id='5'/>", "<tag id='9999'/>", "<driver name='vfio'/>", "<alias name='a'/>",
    "<network>", "</network>", "<forward mode='hostdev'>", "</forward>", "<pf dev='eth0'/>", "<name>x</name>",
    "<device>", "</device>", "<capability type='pci'>", "</capability>", "<bus>2</bus>", "<slot>3</slot>",
    "<iommuGroup number='7'>", "</iommuGroup>", "<networkport>", "</networkport>", "<plug type='hostdev-pci'>",
    "</plug>", "<!--c-->", "<![CDATA[<hostdev>]]>", "&amp;", "&x;", "&#0;", "<!DOCTYPE d>", "<?pi x?>",
    "<?xml version='1.0'?>", "\u00e9", "\ud7ff", "\x00", " ", "\n", "<", ">", "'", "\"", "/>",
]


@FUZZ
@given(st.lists(st.sampled_from(TOKENS), max_size=40))
def test_fuzz_token_soup(tokens):
    text = "".join(tokens)
    for parser in PARSERS:
        only_usage_errors(parser, text)
        only_usage_errors(parser, text.encode("utf-8", "surrogatepass"))


ATTR = st.one_of(st.text(max_size=30), st.from_regex(r"\A(0[xX])?[0-9a-fA-F]{0,12}\Z"),
                 st.integers(-5, 70000).map(str))


@FUZZ
@given(domain_=ATTR, bus=ATTR, slot=ATTR, function=ATTR, managed=st.one_of(st.none(), ATTR),
       mode=st.sampled_from(["subsystem", "capabilities", "", "x"]),
       typ=st.sampled_from(["pci", "usb", "mdev", "scsi", "", "PCI"]), as_interface=st.booleans())
def test_fuzz_address_attributes(domain_, bus, slot, function, managed, mode, typ, as_interface):
    addr = (f"<address type='pci' domain={quoteattr(domain_)} bus={quoteattr(bus)} slot={quoteattr(slot)} "
            f"function={quoteattr(function)}/>")
    managed_attr = f" managed={quoteattr(managed)}" if managed is not None else ""
    if as_interface:
        dev = f"<interface type='hostdev'{managed_attr}><source>{addr}</source></interface>"
    else:
        dev = f"<hostdev mode='{mode}' type='{typ}'{managed_attr}><source>{addr}</source></hostdev>"
    xml = domain(dev)
    try:
        got = parse_domain(xml)
    except UsageError as e:
        assert isinstance(e, InvalidXML) and "\n" not in str(e)
        return
    # Whatever was accepted must be a real, in-range address that libvirt reads the same way.
    for req in got.requests:
        assert isinstance(req.address, PciAddress)
        for raw in (domain_, bus, slot, function):
            assert not re.fullmatch(r"\s*0[0-9]+\s*", raw)      # no leading-zero (octal to libvirt) decimal
