"""parse_listing and class_warnings against the IOMMU-group listings people post.

Every fixture in tests/listings/ is modelled on a real post shape; the tables
below state what each one must parse to: group, address, class, vendor:device
and whether it is a bridge.
"""
from __future__ import annotations

import html
import json
import random
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostdevd.core.address import PciAddress
from hostdevd.core.errors import ListingError
from hostdevd.core.listing import UNPARSED_SHOWN, Listing, class_warnings, parse_listing, read_listing
from hostdevd.core.topology import Device, Topology, from_snapshot

LISTINGS = Path(__file__).resolve().parent.parent / "listings"


def read(name: str) -> str:
    # newline="" keeps CRLF as it is in the file.
    with open(LISTINGS / f"{name}.txt", newline="", encoding="utf-8") as f:
        return f.read()


def A(text: str) -> PciAddress:
    return PciAddress.parse(text)


def rows(topo: Topology) -> list[tuple]:
    return [(g, str(d.address), d.class_code, d.vendor_device, d.bridge)
            for g, members in topo.groups.items() for d in members]


def table(text: str) -> list[tuple]:
    out = []
    for line in text.strip().splitlines():
        g, bdf, cls, ids, kind = line.split()
        out.append((int(g), "0000:" + bdf, cls, ids, kind == "bridge"))
    return out


# group  address  class  vendor:device  bridge?
EXPECTED = {
    "gtx1080_z270_inline_unsorted": """
        0   00:00.0 0600 8086:591f -
        1   00:01.0 0604 8086:1901 bridge
        1   01:00.0 0300 10de:1b80 -
        1   01:00.1 0403 10de:10f0 -
        2   00:02.0 0300 8086:5912 -
        3   00:14.0 0c03 8086:a2af -
        3   00:14.2 1180 8086:a2b1 -
        4   00:16.0 0780 8086:a2ba -
        5   00:17.0 0106 8086:a282 -
        6   00:1b.0 0604 8086:a2e7 bridge
        7   00:1c.0 0604 8086:a290 bridge
        8   00:1d.0 0604 8086:a298 bridge
        9   00:1f.0 0601 8086:a2c5 -
        9   00:1f.2 0580 8086:a2a1 -
        9   00:1f.3 0403 8086:a2f0 -
        9   00:1f.4 0c05 8086:a2a3 -
        9   00:1f.6 0200 8086:15b8 -
        10  02:00.0 0280 8086:24fd -
        11  03:00.0 0108 144d:a804 -
    """,
    "x570_rx580_inline": """
        0   00:01.0 0600 1022:1482 -
        1   00:01.1 0604 1022:1483 bridge
        2   00:01.2 0604 1022:1483 bridge
        2   02:00.0 0604 1022:57ad bridge
        2   03:01.0 0604 1022:57a3 bridge
        2   03:05.0 0604 1022:57a3 bridge
        2   03:08.0 0604 1022:57a4 bridge
        2   03:09.0 0604 1022:57a4 bridge
        2   03:0a.0 0604 1022:57a4 bridge
        2   04:00.0 0200 8086:1539 -
        2   05:00.0 0280 8086:2723 -
        2   06:00.0 1300 1022:1485 -
        2   06:00.1 0c03 1022:149c -
        2   06:00.3 0c03 1022:149c -
        2   07:00.0 0106 1022:7901 -
        2   08:00.0 0106 1022:7901 -
        3   00:02.0 0600 1022:1482 -
        4   00:03.0 0600 1022:1482 -
        5   00:03.1 0604 1022:1483 bridge
        6   00:04.0 0600 1022:1482 -
        7   00:05.0 0600 1022:1482 -
        8   00:07.0 0600 1022:1482 -
        9   00:07.1 0604 1022:1484 bridge
        10  00:08.0 0600 1022:1482 -
        11  00:08.1 0604 1022:1484 bridge
        12  00:14.0 0c05 1022:790b -
        12  00:14.3 0601 1022:790e -
        13  00:18.0 0600 1022:1440 -
        13  00:18.1 0600 1022:1441 -
        13  00:18.2 0600 1022:1442 -
        13  00:18.3 0600 1022:1443 -
        13  00:18.4 0600 1022:1444 -
        13  00:18.5 0600 1022:1445 -
        13  00:18.6 0600 1022:1446 -
        13  00:18.7 0600 1022:1447 -
        14  01:00.0 0108 144d:a808 -
        15  09:00.0 0300 1002:67df -
        15  09:00.1 0403 1002:aaf0 -
        16  0a:00.0 1300 1022:148a -
        17  0b:00.0 1300 1022:1485 -
        18  0b:00.1 1080 1022:1486 -
        19  0b:00.3 0c03 1022:149c -
        20  0b:00.4 0403 1022:1487 -
    """,
    "z390_header_tabs": """
        0   00:00.0 0600 8086:3e30 -
        1   00:01.0 0604 8086:1901 bridge
        1   01:00.0 0300 10de:1b06 -
        1   01:00.1 0403 10de:10ef -
        2   00:02.0 0300 8086:3e98 -
        3   00:12.0 1180 8086:a379 -
        4   00:14.0 0c03 8086:a36d -
        4   00:14.2 0500 8086:a36f -
        5   00:16.0 0780 8086:a360 -
        6   00:17.0 0106 8086:a352 -
        7   00:1b.0 0604 8086:a340 bridge
        8   00:1c.0 0604 8086:a338 bridge
        9   00:1c.4 0604 8086:a33c bridge
        10  00:1d.0 0604 8086:a330 bridge
        11  00:1f.0 0601 8086:a305 -
        11  00:1f.3 0403 8086:a348 -
        11  00:1f.4 0c05 8086:a323 -
        11  00:1f.5 0c80 8086:a324 -
        11  00:1f.6 0200 8086:15bc -
        12  02:00.0 0108 144d:a808 -
        13  03:00.0 0c03 1b21:1242 -
        14  04:00.0 0108 15b7:5006 -
    """,
    "turing_b450_domain_header": """
        0   00:01.0 0600 1022:1482 -
        1   00:01.1 0604 1022:1483 bridge
        2   00:01.3 0604 1022:1483 bridge
        2   03:00.0 0c03 1022:43d5 -
        2   03:00.1 0106 1022:43c8 -
        2   03:00.2 0604 1022:43c6 bridge
        2   20:00.0 0604 1022:43c7 bridge
        2   20:01.0 0604 1022:43c7 bridge
        2   20:04.0 0604 1022:43c7 bridge
        2   22:00.0 0200 10ec:8168 -
        3   00:02.0 0600 1022:1482 -
        4   00:03.0 0600 1022:1482 -
        5   00:03.1 0604 1022:1483 bridge
        6   00:07.1 0604 1022:1484 bridge
        7   00:08.1 0604 1022:1484 bridge
        8   00:14.0 0c05 1022:790b -
        8   00:14.3 0601 1022:790e -
        9   01:00.0 0108 1987:5012 -
        10  26:00.0 0300 10de:1f07 -
        10  26:00.1 0403 10de:10f9 -
        10  26:00.2 0c03 10de:1ada -
        10  26:00.3 0c80 10de:1adb -
        11  27:00.0 1300 1022:148a -
        12  28:00.0 1300 1022:1485 -
        13  28:00.1 1080 1022:1486 -
        14  28:00.3 0c03 1022:149c -
        15  28:00.4 0403 1022:1487 -
    """,
    "mixed_case_navi21": """
        0   00:00.0 0600 1022:1452 -
        1   00:01.0 0600 1022:1452 -
        2   00:01.3 0604 1022:1453 bridge
        10  00:03.1 0604 1022:1453 bridge
        16  0a:00.0 0604 1002:1478 bridge
        17  0b:00.0 0604 1002:1479 bridge
        18  0c:00.0 0300 1002:73bf -
        18  0c:00.1 0403 1002:ab28 -
        19  0d:00.0 0108 2646:2263 -
    """,
    "crlf_proxmox_putty": """
        0   00:00.0 0600 8086:3ec2 -
        1   00:01.0 0604 8086:1901 bridge
        1   01:00.0 0107 1000:0087 -
        2   00:02.0 0300 8086:3e92 -
        3   00:14.0 0c03 8086:a36d -
        3   00:14.2 0500 8086:a36f -
        4   00:16.0 0780 8086:a360 -
        5   00:17.0 0106 8086:a352 -
        6   00:1b.0 0604 8086:a32c bridge
        7   00:1f.0 0601 8086:a308 -
        7   00:1f.3 0403 8086:a348 -
        7   00:1f.4 0c05 8086:a323 -
        7   00:1f.5 0c80 8086:a324 -
        7   00:1f.6 0200 8086:15bb -
        8   02:00.0 0108 8086:f1a8 -
    """,
    "w2145_first_on_header_line": """
        0   00:00.0 0600 8086:2020 -
        1   00:04.0 0880 8086:2021 -
        1   00:04.1 0880 8086:2021 -
        1   00:04.2 0880 8086:2021 -
        1   00:04.3 0880 8086:2021 -
        25  00:1f.0 0601 8086:a2d2 -
        25  00:1f.2 0580 8086:a2a1 -
        25  00:1f.3 0403 8086:a2f0 -
        25  00:1f.4 0c05 8086:a2a3 -
        25  00:1f.6 0200 8086:15b7 -
        30  17:00.0 0604 8086:2030 bridge
        31  18:00.0 0300 10de:2484 -
        31  18:00.1 0403 10de:228b -
        32  19:00.0 0108 8086:0a54 -
    """,
    "reddit_b550_rx6700xt_noise": """
        2   00:01.2 0604 1022:1483 bridge
        2   02:00.0 0c03 1022:43ee -
        2   02:00.1 0106 1022:43eb -
        2   02:00.2 0604 1022:43e9 bridge
        2   03:04.0 0604 1022:43ea bridge
        2   03:08.0 0604 1022:43ea bridge
        2   03:09.0 0604 1022:43ea bridge
        2   05:00.0 0200 10ec:8125 -
        2   06:00.0 0280 8086:2723 -
        14  0a:00.0 0604 1002:1478 bridge
        15  0b:00.0 0604 1002:1479 bridge
        16  0c:00.0 0300 1002:73df -
        16  0c:00.1 0403 1002:ab28 -
    """,
    "rtx3080_z690_nnk_drivers": """
        0   00:00.0 0600 8086:4668 -
        1   00:01.0 0604 8086:460d bridge
        2   00:02.0 0300 8086:4680 -
        12  00:14.0 0c03 8086:7ae0 -
        12  00:14.2 0500 8086:7aa7 -
        14  00:17.0 0106 8086:7ae2 -
        17  00:1f.0 0601 8086:7a84 -
        17  00:1f.3 0403 8086:7ad0 -
        17  00:1f.4 0c05 8086:7aa3 -
        17  00:1f.5 0c80 8086:7aa4 -
        18  01:00.0 0300 10de:2206 -
        18  01:00.1 0403 10de:1aef -
        19  02:00.0 0108 144d:a80a -
        20  04:00.0 0200 8086:15f3 -
    """,
    "usb_progif_nnv": """
        1   00:01.0 0604 8086:1901 bridge
        1   01:00.0 0300 10de:1c03 -
        1   01:00.1 0403 10de:10f1 -
        4   00:14.0 0c03 8086:a36d -
        4   00:14.2 0500 8086:a36f -
        6   00:17.0 0106 8086:a352 -
        13  04:00.0 0c03 1b73:1100 -
    """,
    "group_colon_driver_suffix": """
        0   00:00.0 0600 8086:3ec2 -
        1   00:01.0 0604 8086:1901 bridge
        1   01:00.0 0300 10de:21c4 -
        1   01:00.1 0403 10de:1aeb -
        1   01:00.2 0c03 10de:1aec -
        1   01:00.3 0c80 10de:1aed -
        2   00:02.0 0300 8086:3e92 -
        3   00:14.0 0c03 8086:a36d -
        3   00:14.2 0500 8086:a36f -
        5   00:17.0 0106 8086:a352 -
    """,
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_parses_to_exact_groups(name):
    topo = parse_listing(read(name))
    assert rows(topo) == table(EXPECTED[name])
    assert topo.source == "listing"
    assert topo.iommu_active is True
    assert topo.critical == {}
    for d in topo.devices.values():
        assert len(d.pci_class) == 6 and d.pci_class[:4] == d.class_code
        assert d.bridge == (d.class_code in ("0604", "0609"))


# Forum markup around a fixture above: each must parse to exactly the clean fixture's devices
# (groups, IDs, names, drivers). Value: (clean fixture, the lines left not understood).
MARKUP = {
    "markup_bbcode_xenforo_z390": ("z390_header_tabs", [45]),   # [QUOTE] [SPOILER] [CODE] [COLOR] [B] [FONT] [SIZE]
    "markup_bbcode_phpbb_gtx1080": ("gtx1080_z270_inline_unsorted", []),  # [code=text] [color] [size] [i]
    "markup_markdown_backticks_rtx3080": ("rtx3080_z690_nnk_drivers", [81]),  # ```console, > quoted ```
    "markup_markdown_tildes_x570": ("x570_rx580_inline", []),           # ~~~bash and ~~~, **bold**
    "markup_html_pre_turing": ("turing_b450_domain_header", [46]),      # <pre><code>, &nbsp; &amp; &#63;, <span style>
    "markup_html_br_w2145": ("w2145_first_on_header_line", []),         # one source line, <br />, <div>, <b>
}


@pytest.mark.parametrize("name", sorted(MARKUP))
def test_markup_fixture_parses_like_the_clean_one(name):
    clean, unparsed = MARKUP[name]
    listing = read_listing(read(name))
    assert rows(listing.topology) == table(EXPECTED[clean])
    assert listing.topology.devices == parse_listing(read(clean)).devices
    # the markup itself is never reported; the prose left in the post is (its line numbers are the paste's)
    assert [n for n, _ in listing.unparsed.lines] == unparsed and listing.unparsed.count == len(unparsed)


def test_every_fixture_is_covered():
    names = {p.stem for p in LISTINGS.glob("*.txt")}
    assert names == set(EXPECTED) | set(MARKUP) | {n for n in names if n.startswith("error_")}
    assert len(EXPECTED) >= 10
    assert {clean for clean, _ in MARKUP.values()} <= set(EXPECTED)


# --- shape by shape ------------------------------------------------------------------------

def test_gpu_audio_and_root_port_share_group_1():
    topo = parse_listing(read("gtx1080_z270_inline_unsorted"))
    g1 = topo.group_members(1)
    assert [str(d.address) for d in g1] == ["0000:00:01.0", "0000:01:00.0", "0000:01:00.1"]
    port, gpu, audio = g1
    assert port.bridge and not gpu.bridge and not audio.bridge
    assert gpu.name == "NVIDIA Corporation GP104 [GeForce GTX 1080]"
    assert gpu.pci_class == "030000" and gpu.vendor == "10de" and gpu.device == "1b80"
    assert audio.name == "NVIDIA Corporation GP104 High Definition Audio Controller"
    # The glob order of the Arch script is 0, 1, 10, 11, 2, ...: groups come out numeric.
    assert list(topo.groups) == list(range(12))


def test_host_bridges_and_lpc_are_endpoints_not_bridges():
    topo = parse_listing(read("x570_rx580_inline"))
    assert topo.get(A("00:01.0")).class_code == "0600" and not topo.get(A("00:01.0")).bridge
    assert topo.get(A("00:14.3")).class_code == "0601" and not topo.get(A("00:14.3")).bridge
    assert all(d.bridge for d in topo.devices.values() if d.class_code == "0604")


def test_x570_chipset_group_is_one_big_group():
    topo = parse_listing(read("x570_rx580_inline"))
    big = topo.group_members(2)
    assert len(big) == 14
    assert sum(d.bridge for d in big) == 7
    assert {d.class_code for d in big if not d.bridge} == {"0200", "0280", "1300", "0c03", "0106"}


def test_names_with_brackets_and_colons():
    topo = parse_listing(read("x570_rx580_inline"))
    gpu, audio = topo.group_members(15)
    assert gpu.vendor_device == "1002:67df"
    assert gpu.name == "Advanced Micro Devices, Inc. [AMD/ATI] Ellesmere [Radeon RX 470/480/570/570X/580/580X/590]"
    assert audio.vendor_device == "1002:aaf0"
    assert audio.name.endswith("Ellesmere HDMI Audio [Radeon RX 470/480 / 570/580/590]")
    df = topo.get(A("00:18.3"))
    assert (df.class_code, df.device) == ("0600", "1443")
    assert df.name == "Advanced Micro Devices, Inc. [AMD] Matisse Device 24: Function 3"
    gpp = topo.get(A("00:07.1"))
    assert gpp.name.endswith("to bus[E:B]") and gpp.vendor_device == "1022:1484"


def test_z390_pch_group():
    topo = parse_listing(read("z390_header_tabs"))
    pch = topo.group_members(11)
    assert [(str(d.address)[5:], d.class_code) for d in pch] == [
        ("00:1f.0", "0601"), ("00:1f.3", "0403"), ("00:1f.4", "0c05"), ("00:1f.5", "0c80"), ("00:1f.6", "0200")]
    assert not any(d.bridge for d in pch)
    assert topo.get(A("00:00.0")).name.endswith("Host Bridge/DRAM Registers [Coffee Lake S]")


def test_turing_four_functions_with_domain():
    topo = parse_listing(read("turing_b450_domain_header"))
    gpu = topo.group_members(10)
    assert [(d.address.function, d.class_code, d.vendor_device) for d in gpu] == [
        (0, "0300", "10de:1f07"), (1, "0403", "10de:10f9"), (2, "0c03", "10de:1ada"), (3, "0c80", "10de:1adb")]
    assert len({d.address.slot_id for d in gpu}) == 1


def test_lspci_nnk_drivers():
    topo = parse_listing(read("rtx3080_z690_nnk_drivers"))
    drivers = {str(a)[5:]: d.driver for a, d in topo.devices.items()}
    assert drivers == {
        "00:00.0": "igen6_edac", "00:01.0": "pcieport", "00:02.0": "i915",
        "00:14.0": "xhci_hcd", "00:14.2": None, "00:17.0": "ahci",
        "00:1f.0": None, "00:1f.3": "snd_hda_intel", "00:1f.4": "i801_smbus", "00:1f.5": None,
        "01:00.0": "vfio-pci", "01:00.1": "vfio-pci", "02:00.0": "nvme", "04:00.0": "igc",
    }
    assert topo.get(A("01:00.0")).on_vfio
    # "Subsystem: ... [1043:8694]" never becomes the vendor:device.
    assert topo.get(A("00:00.0")).vendor_device == "8086:4668"


def test_lspci_nnv_prog_if_and_noise():
    topo = parse_listing(read("usb_progif_nnv"))
    assert topo.get(A("00:14.0")).pci_class == "0c0330"
    assert topo.get(A("04:00.0")).pci_class == "0c0330"
    assert topo.get(A("00:17.0")).pci_class == "010601"
    assert topo.get(A("00:01.0")).pci_class == "060400"
    assert topo.get(A("01:00.1")).pci_class == "040300"
    assert topo.get(A("01:00.0")).name == "NVIDIA Corporation GP106 [GeForce GTX 1060 6GB]"
    assert topo.get(A("04:00.0")).driver == "vfio-pci"
    assert topo.get(A("00:14.2")).driver is None
    assert len(topo.devices) == 7


def test_prog_if_on_an_inline_line():
    line = ("IOMMU Group 4 00:14.0 USB controller [0c03]: Intel Corporation Cannon Lake PCH USB 3.1 "
            "xHCI Host Controller [8086:a36d] (rev 10) (prog-if 30 [XHCI])")
    d = parse_listing(line).get(A("00:14.0"))
    assert (d.class_code, d.pci_class, d.vendor_device, d.group) == ("0c03", "0c0330", "8086:a36d", 4)
    assert d.name == "Intel Corporation Cannon Lake PCH USB 3.1 xHCI Host Controller"


def test_mixed_case_and_separators():
    topo = parse_listing(read("mixed_case_navi21"))
    gpu = topo.get(A("0c:00.0"))
    assert (gpu.vendor, gpu.device, gpu.group) == ("1002", "73bf", 18)
    assert str(topo.get(A("0d:00.0")).address) == "0000:0d:00.0"


def test_crlf_line_endings():
    raw = (LISTINGS / "crlf_proxmox_putty.txt").read_bytes()
    assert b"\r\n" in raw, "fixture lost its CRLF line endings (git autocrlf?)"
    topo = parse_listing(raw.decode())
    assert len(topo.devices) == 15
    assert all(d.name and "\r" not in d.name for d in topo.devices.values())
    lf = raw.decode().replace("\r\n", "\n")
    assert rows(parse_listing(lf)) == rows(topo)
    assert rows(parse_listing(lf.replace("\n", "\r"))) == rows(topo)


def test_first_device_on_header_line_then_continuations():
    topo = parse_listing(read("w2145_first_on_header_line"))
    assert [d.address.function for d in topo.group_members(1)] == [0, 1, 2, 3]
    assert len(topo.group_members(25)) == 5
    assert topo.get(A("19:00.0")).name == "Intel Corporation NVMe Datacenter SSD [3DNAND, Beta Rock Controller]"


def test_group_colon_style_with_trailing_driver():
    topo = parse_listing(read("group_colon_driver_suffix"))
    assert [d.driver for d in topo.group_members(1)] == ["pcieport", "vfio-pci", "vfio-pci", "xhci_hcd", "nvidia-gpu"]
    assert topo.get(A("00:14.2")).driver is None


def test_reddit_post_noise_breaks_and_merges():
    topo = parse_listing(read("reddit_b550_rx6700xt_noise"))
    # The lspci -nnk paste after the listing supplies drivers for grouped devices...
    assert topo.get(A("0c:00.0")).driver == "vfio-pci"
    assert topo.get(A("0c:00.1")).driver == "snd_hda_intel"
    assert topo.get(A("0c:00.0")).group == 16
    # ...and a device only seen in the grep after a prompt is kept, ungrouped.
    nvme = topo.get(A("01:00.0"))
    assert nvme.group is None and nvme.vendor_device == "144d:a809"
    assert "0000:01:00.0" not in {str(d.address) for m in topo.groups.values() for d in m}
    assert [u["address"] for u in topo.to_json()["ungrouped"]] == ["0000:01:00.0"]


def test_unsorted_and_domain_variants_are_equivalent():
    text = read("gtx1080_z270_inline_unsorted")
    base = parse_listing(text)
    lines = [line for line in text.splitlines() if line.startswith("IOMMU")]
    rnd = random.Random(7)
    for _ in range(5):
        rnd.shuffle(lines)
        assert parse_listing("\n".join(lines)).devices == base.devices
    # "iommu group N 0000:BB:SS.F ..."
    with_domain = "\n".join(re.sub(r"^IOMMU Group (\d+) ", r"iommu group \1 0000:", line) for line in lines)
    assert all(re.match(r"iommu group \d+ 0000:[0-9a-f]{2}:", line) for line in with_domain.splitlines())
    assert parse_listing(with_domain).devices == base.devices


def test_tab_and_colon_after_group_number():
    text = ("IOMMU Group 1:\t01:00.0 VGA compatible controller [0300]: NVIDIA Corporation GP104 "
            "[GeForce GTX 1080] [10de:1b80] (rev a1)\n"
            "IOMMU Group 1\t01:00.1 Audio device [0403]: NVIDIA Corporation GP104 High Definition "
            "Audio Controller [10de:10f0] (rev a1)\n")
    topo = parse_listing(text)
    assert [str(d.address) for d in topo.group_members(1)] == ["0000:01:00.0", "0000:01:00.1"]


def test_header_with_trailing_words_and_no_rev():
    text = ("IOMMU Group 7: (2 devices)\n"
            "    03:00.0 Non-Volatile memory controller [0108]: Samsung Electronics Co Ltd NVMe SSD "
            "Controller SM981/PM981/PM983 [144d:a808]\n"
            "    03:00.1 Ethernet controller [0200]: Intel Corporation I211 Gigabit Network Connection "
            "[8086:1539] (rev 03)\n")
    topo = parse_listing(text)
    assert [(str(d.address), d.group) for d in topo.devices.values()] == [
        ("0000:03:00.0", 7), ("0000:03:00.1", 7)]


def test_lspci_n_numeric_lines():
    topo = parse_listing("IOMMU Group 1:\n\t01:00.0 0300: 10de:1b80 (rev a1)\n\t01:00.1 0403: 10de:10f0 (rev a1)\n")
    gpu = topo.get(A("01:00.0"))
    assert (gpu.class_code, gpu.vendor_device, gpu.name, gpu.group) == ("0300", "10de:1b80", None, 1)


def test_prose_starting_with_group_is_not_a_header():
    text = ("IOMMU Group 1 01:00.0 VGA compatible controller [0300]: NVIDIA Corporation GP104 [10de:1b80] (rev a1)\n"
            "Group 3 has my NVMe in it, is that bad?\n"
            "IOMMU Group 3 02:00.0 Non-Volatile memory controller [0108]: Samsung Electronics Co Ltd "
            "NVMe SSD Controller SM981/PM981/PM983 [144d:a808]\n")
    topo = parse_listing(text)
    assert {str(a): d.group for a, d in topo.devices.items()} == {"0000:01:00.0": 1, "0000:02:00.0": 3}


def test_identical_duplicates_merge():
    line = "IOMMU Group 1 01:00.0 VGA compatible controller [0300]: NVIDIA Corporation GP104 [10de:1b80] (rev a1)"
    topo = parse_listing(f"{line}\n{line}\n\n{line.replace('IOMMU Group 1', 'IOMMU group 1:')}\n")
    assert list(topo.devices) == [A("01:00.0")]


def test_malformed_line_outside_any_group_is_ignored():
    text = (read("gtx1080_z270_inline_unsorted")
            + "[alex@arch ~]$ lspci | grep VGA\n"
            + "01:00.0 VGA compatible controller: NVIDIA Corporation GP104 [GeForce GTX 1080] (rev a1)\n"
            + "00:20.0 PCI bridge [0604]: Intel Corporation Device [8086:1901]\n"
            + "\tKernel driver in use: vfio-pci\n")
    assert parse_listing(text).devices == parse_listing(read("gtx1080_z270_inline_unsorted")).devices
    # ignored, but not without a word: both device-like lines are reported (the driver line is theirs)
    assert read_listing(text).unparsed.lines == [
        (23, "01:00.0 VGA compatible controller: NVIDIA Corporation GP104 [GeForce GTX 1080] (rev a1)"),
        (24, "00:20.0 PCI bridge [0604]: Intel Corporation Device [8086:1901]")]


# --- lines not understood ------------------------------------------------------------------

def test_corpus_lines_not_understood_are_the_reddit_posts_prose_only():
    found = {name: read_listing(read(name)).unparsed for name in EXPECTED}
    assert {n: u.count for n, u in found.items() if u.count} == {"reddit_b550_rx6700xt_noise": 3}
    assert [n for n, _ in found["reddit_b550_rx6700xt_noise"].lines] == [1, 2, 42]
    assert found["reddit_b550_rx6700xt_noise"].lines[2] == (
        42, "Edit: kernel 6.1, amd_iommu=on iommu=pt in the cmdline.")
    for name in EXPECTED:   # lspci -v/-k lines, prompts, "...", headers and fences are all understood
        assert found[name].count == 0 or name.startswith("reddit")


def test_unparsed_lines_are_counted_and_the_first_few_kept():
    junk = [f"IOMMU Grupo {i} 01:00.{i} VGA [0300]: NVIDIA [10de:1b80]" for i in range(8)]
    text = read("gtx1080_z270_inline_unsorted") + "\n".join(junk) + "\n" + "x" * 5000 + "\n"
    u = read_listing(text).unparsed
    assert u.count == 9 and len(u.lines) == UNPARSED_SHOWN == 5
    assert u.lines[0] == (22, junk[0])
    data = u.to_json()
    assert data == {"count": 9, "lines": [{"line": n, "text": t} for n, t in u.lines]}
    json.dumps(data)
    message = u.message()
    assert message is not None and "\n" not in message and len(message) < 400
    assert message.startswith("9 lines of the listing not understood, skipped: line 22 'IOMMU Grupo 0 ")
    assert message.endswith("and 6 more: if one is a device, paste it as `lspci -nn` prints it")
    assert read_listing(read("gtx1080_z270_inline_unsorted")).unparsed.message() is None


def test_a_long_unparsed_line_is_cut():
    text = "IOMMU Group 1 01:00.0 VGA compatible controller [0300]: NVIDIA GP104 [10de:1b80]\n" + "y" * 10000
    (n, shown), = read_listing(text).unparsed.lines
    assert n == 2 and len(shown) == 120 and shown.endswith("\u2026")


@pytest.mark.parametrize("line", [
    "...", "\u2026", "[...]", "(...)", "<snip>", "[snip]", "snip",                  # trim marks
    "$ lspci -nnk", "root@pve:~# ./iommu.sh", "And the -nnk output:",          # breaks
    "IOMMU Group 7 (2 devices)", "### Group 3 ###", "```text", "~~~",           # headers, fences
    "\tKernel driver in use: vfio-pci",
])
def test_understood_lines_are_not_reported(line):
    text = f"IOMMU Group 1 01:00.0 VGA compatible controller [0300]: NVIDIA GP104 [10de:1b80]\n{line}\n"
    assert read_listing(text).unparsed.count == 0


def test_lspci_v_lines_that_lost_their_indentation_are_understood_after_a_device_only():
    dev = "IOMMU Group 1 01:00.0 VGA compatible controller [0300]: NVIDIA GP104 [10de:1b80]"
    fields = ["Subsystem: eVga.com. Corp. Device [3842:3897]", "Flags: bus master, fast devsel, latency 0",
              "Memory at a0000000 (32-bit, non-prefetchable) [size=16M]", "I/O ports at e000 [size=128]",
              "Capabilities: <access denied>", "Kernel modules: nouveau, nvidia", "Kernel driver in use: nvidia"]
    listing = read_listing("\n".join([dev, *fields]))
    assert listing.unparsed.count == 0 and listing.topology.get(A("01:00.0")).driver == "nvidia"
    # prose breaks the device's block: what follows it is reported, indented or not
    listing = read_listing("\n".join([dev, "Edit: it works now", *fields[:2]]))
    assert [n for n, _ in listing.unparsed.lines] == [2, 3, 4]


# --- forum markup --------------------------------------------------------------------------

GPU = "IOMMU Group 1 01:00.0 VGA compatible controller [0300]: NVIDIA Corporation GP104 [GeForce GTX 1080] [10de:1b80]"
AUDIO = "IOMMU Group 1 01:00.1 Audio device [0403]: NVIDIA Corporation GP104 HDMI Audio [10de:10f0]"


@pytest.mark.parametrize("text", [
    f"[CODE]{GPU}\n{AUDIO}[/CODE]",
    f"[code=text]\n{GPU}\n{AUDIO}\n[/code]",
    f"[COLOR=rgb(226, 80, 65)]{GPU}[/COLOR]\n[color=#00ff00]{AUDIO}[/color]",
    f"[QUOTE=\"alex, post: 1\"][SPOILER=\"groups\"][B]{GPU}[/B]\n[I]{AUDIO}[/I][/SPOILER][/QUOTE]",
    f"[FONT=Courier New][SIZE=2]{GPU}\n{AUDIO}[/SIZE][/FONT]",
    f"```\n{GPU}\n{AUDIO}\n```", f"```text\n{GPU}\n{AUDIO}\n```", f"~~~\n{GPU}\n{AUDIO}\n~~~",
    f"~~~ console\n{GPU}\n{AUDIO}\n~~~", f"> ```\n> {GPU}\n> {AUDIO}\n> ```",
    f"<pre>{GPU}\n{AUDIO}</pre>", f"<pre><code>{GPU}<br>{AUDIO}</code></pre>", f"{GPU}<br/>{AUDIO}<BR />",
    f'<span style="color: red">{GPU}</span>\n<p>{AUDIO}</p>',
    f"<code>{GPU}</code>\n<code>{AUDIO}</code>",
    f"&gt; {GPU}\n&gt; {AUDIO}",
    f"IOMMU Group 1:<br>&nbsp;&nbsp;&nbsp;&nbsp;{GPU[14:]}<br>&nbsp;&nbsp;&nbsp;&nbsp;{AUDIO[14:]}",
])
def test_forum_markup_is_read_through(text):
    listing = read_listing(text)
    assert listing.topology.devices == parse_listing(f"{GPU}\n{AUDIO}\n").devices
    assert listing.unparsed.count == 0


def test_markup_keeps_lspci_brackets_and_entities_in_names():
    text = ('IOMMU Group 15 09:00.0 VGA compatible controller [0300]: Advanced Micro Devices, Inc. [AMD/ATI] '
            "Ellesmere [Radeon RX 470/480/570/570X/580/580X/590] [1002:67df] (rev e7)\n"
            "IOMMU Group 9 00:07.1 PCI bridge [0604]: Advanced Micro Devices, Inc. [AMD] Starship/Matisse Internal "
            "PCIe GPP Bridge 0 to bus[E:B] [1022:1484]\n"
            "IOMMU Group 3 03:00.0 Ethernet controller [0200]: AT&amp;T &lt;Labs&gt; Device [1234:5678]\n")
    topo = parse_listing(text)
    assert topo.get(A("09:00.0")).name == ("Advanced Micro Devices, Inc. [AMD/ATI] Ellesmere "
                                           "[Radeon RX 470/480/570/570X/580/580X/590]")
    assert topo.get(A("00:07.1")).name.endswith("to bus[E:B]")
    assert topo.get(A("03:00.0")).name == "AT&T <Labs> Device"


def test_a_closing_code_tag_ends_the_section_after_its_line():
    text = (f"[CODE]IOMMU Group 1:\n\t{GPU[14:]}[/CODE]\n"
            "[CODE]01:00.1 Audio device [0403]: NVIDIA Corporation GP104 HDMI Audio [10de:10f0][/CODE]\n")
    topo = parse_listing(text)
    assert topo.get(A("01:00.0")).group == 1 and topo.get(A("01:00.1")).group is None


def test_br_keeps_the_line_numbers_of_the_paste():
    with pytest.raises(ListingError, match="^line 2: "):
        parse_listing("<p>groups:</p>\nIOMMU Group 1:<br>01:00.0 VGA compatible controller: NVIDIA GP104<br>")


# --- errors --------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "", "\n\n   \n", "hello, my VM won't start\n",
    "IOMMU Group 1:\nIOMMU Group 2:\n",
    "for d in /sys/kernel/iommu_groups/*/devices/*; do echo $d; done\n",
])
def test_no_device_lines(text):
    with pytest.raises(ListingError) as e:
        parse_listing(text)
    assert e.value.message == "no IOMMU group lines found"
    assert str(e.value).startswith("no IOMMU group lines found: paste the output of")
    assert e.value.code == "INVALID_LISTING"


def test_plain_lspci_without_groups():
    with pytest.raises(ListingError, match="no IOMMU group lines found"):
        parse_listing(read("error_plain_lspci"))


def test_lspci_without_nn_inside_a_group_names_the_line():
    with pytest.raises(ListingError) as e:
        parse_listing(read("error_lspci_without_nn"))
    assert e.value.message.startswith("line 2: ")
    assert "-nn" in e.value.hint


@pytest.mark.parametrize("text,lineno", [
    ("IOMMU Group 1 01:00.0 VGA compatible controller [0300]: NVIDIA Corporation GP104 (rev a1)\n", 1),
    ("IOMMU Group 1:\n\t01:00.0 VGA compatible controller: NVIDIA Corporation GP104 [10de:1b80]\n", 2),
    ("IOMMU Group 1:\n\t01:00.0 VGA compatible controller [0300]: NVIDIA [10de:1b80]\n\t01:00.1\n", 3),
    # slot 0x20 and function 8 are not PCI addresses
    ("IOMMU Group 1 00:20.0 PCI bridge [0604]: Intel Corporation Device [8086:1901]\n", 1),
    ("IOMMU Group 1 00:01.8 PCI bridge [0604]: Intel Corporation Device [8086:1901]\n", 1),
    # a VMD domain does not fit 16 bits
    ("IOMMU Group 3:\n\t10000:e1:00.0 Non-Volatile memory controller [0108]: Samsung [144d:a808]\n", 2),
])
def test_malformed_device_lines(text, lineno):
    with pytest.raises(ListingError) as e:
        parse_listing(text)
    assert e.value.message.startswith(f"line {lineno}: ")


def test_same_device_in_two_groups():
    with pytest.raises(ListingError) as e:
        parse_listing(read("error_two_boots"))
    assert e.value.message == ("line 8: 0000:01:00.0 is in IOMMU group 13 here but in group 1 on line 3")


def test_same_address_with_different_ids():
    text = ("IOMMU Group 1 01:00.0 VGA compatible controller [0300]: NVIDIA Corporation GP104 [10de:1b80] (rev a1)\n"
            "IOMMU Group 1 01:00.0 VGA compatible controller [0300]: NVIDIA Corporation GP104 [10de:1b81] (rev a1)\n")
    with pytest.raises(ListingError, match="line 2: 0000:01:00.0 is 10de:1b81"):
        parse_listing(text)


def test_not_text():
    with pytest.raises(ListingError):
        parse_listing(b"IOMMU Group 1")  # type: ignore[arg-type]


# --- JSON ----------------------------------------------------------------------------------

def test_to_json_shape():
    data = parse_listing(read("turing_b450_domain_header")).to_json()
    assert [g["group"] for g in data["groups"]] == list(range(16))
    g10 = data["groups"][10]
    assert [{k: d[k] for k in ("address", "class", "vendor", "device", "bridge")} for d in g10["devices"]] == [
        {"address": "0000:26:00.0", "class": "0300", "vendor": "10de", "device": "1f07", "bridge": False},
        {"address": "0000:26:00.1", "class": "0403", "vendor": "10de", "device": "10f9", "bridge": False},
        {"address": "0000:26:00.2", "class": "0c03", "vendor": "10de", "device": "1ada", "bridge": False},
        {"address": "0000:26:00.3", "class": "0c80", "vendor": "10de", "device": "1adb", "bridge": False},
    ]
    assert data["groups"][1]["devices"][0]["bridge"] is True
    assert data["source"] == "listing" and data["ungrouped"] == [] and data["critical"] == {}
    json.dumps(data)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_snapshot_roundtrip(name):
    topo = parse_listing(read(name))
    back = from_snapshot(json.dumps(topo.to_json()))
    assert back.devices == topo.devices
    assert list(back.groups) == list(topo.groups)
    assert back.iommu_active is True


def test_minimal_snapshot_shape_roundtrip():
    topo = parse_listing(read("gtx1080_z270_inline_unsorted"))
    minimal = {"groups": [
        {"group": g["group"], "devices": [{k: d[k] for k in ("address", "class", "vendor", "device", "bridge")}
                                         for d in g["devices"]]}
        for g in topo.to_json()["groups"]]}
    back = from_snapshot(json.dumps(minimal))
    assert rows(back) == rows(topo)
    assert {a: d.pci_class for a, d in back.devices.items()} == {a: d.pci_class for a, d in topo.devices.items()}


# --- class warnings ------------------------------------------------------------------------

STORAGE = "storage controller: may hold the host's root filesystem"
CONSOLE = "the only display controller: likely the host console"
USB = "USB controller: may carry the host's keyboard"
NIC = "the only Ethernet controller: may be the host's network link"


def warnings(name: str) -> dict[str, str]:
    return {str(a)[5:]: w for a, w in class_warnings(parse_listing(read(name))).items()}


def test_warnings_single_gpu_host():
    assert warnings("turing_b450_domain_header") == {
        "01:00.0": STORAGE, "03:00.0": USB, "03:00.1": STORAGE, "22:00.0": NIC,
        "26:00.0": CONSOLE,  # the RTX 2070 is the only display device
        "28:00.3": USB,      # the GPU's own USB-C controller (26:00.2) is not warned about
    }


def test_warnings_igpu_plus_dgpu_have_no_console_guess():
    w = warnings("z390_header_tabs")
    assert CONSOLE not in w.values()
    assert w == {"00:14.0": USB, "00:17.0": STORAGE, "00:1f.6": NIC, "02:00.0": STORAGE,
                 "03:00.0": USB, "04:00.0": STORAGE}


def test_warnings_skip_devices_already_on_vfio():
    w = warnings("usb_progif_nnv")
    assert "04:00.0" not in w             # Fresco USB card on vfio-pci
    assert w == {"00:14.0": USB, "00:17.0": STORAGE, "01:00.0": CONSOLE}
    w = warnings("reddit_b550_rx6700xt_noise")
    assert "0c:00.0" not in w             # the only GPU, already on vfio-pci
    assert w["01:00.0"] == STORAGE        # ungrouped devices are warned about too


def test_warnings_x570_and_sas_hba():
    assert warnings("crlf_proxmox_putty")["01:00.0"] == STORAGE  # SAS HBA, class 0107
    assert warnings("x570_rx580_inline") == {
        "01:00.0": STORAGE, "07:00.0": STORAGE, "08:00.0": STORAGE,
        "04:00.0": NIC,                      # the Wi-Fi card (0280) does not count
        "06:00.1": USB, "06:00.3": USB, "0b:00.3": USB,
        "09:00.0": CONSOLE,
    }


def test_no_nic_warning_with_two_ethernet_controllers():
    text = ("IOMMU Group 20 04:00.0 Ethernet controller [0200]: Intel Corporation I211 Gigabit Network "
            "Connection [8086:1539] (rev 03)\n"
            "IOMMU Group 21 05:00.0 Ethernet controller [0200]: Intel Corporation I211 Gigabit Network "
            "Connection [8086:1539] (rev 03)\n")
    assert class_warnings(parse_listing(text)) == {}


def test_warnings_skip_known_critical():
    topo = parse_listing(read("turing_b450_domain_header"))
    topo.critical = {A("01:00.0"): "root filesystem"}
    assert A("01:00.0") not in class_warnings(topo)


# --- properties ----------------------------------------------------------------------------

FRAGMENTS = [
    "IOMMU Group ", "iommu group ", "Group: ", "### Group ", "1", "12", ":", " ", "\t", "\n", "\r\n", "\r",
    "00:01.0", "0000:01:00.0", "01:00.1", "10000:e1:00.0", "ff:1f.7", "00:20.0", "00:1f.8", "1:0.0",
    " VGA compatible controller", " [0300]", ": ", "NVIDIA Corporation GP104", " [GeForce GTX 1080]",
    " [10de:1b80]", " [10DE:1B80]", " (rev a1)", " (prog-if 30 [XHCI])", " 0300: 10de:1b80",
    "\tKernel driver in use: vfio-pci", "\tSubsystem: Device [1043:8694]", "Driver: nvme",
    "$ ", "root@pve:~# ", "```", "> ", "Here is my output:", "[", "]", "\u00a0", "\ufeff", "٣", "K",
]


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.text())
def test_fuzz_arbitrary_text_only_raises_listing_error(text):
    try:
        topo = parse_listing(text)
    except ListingError:
        return
    assert topo.devices and topo.iommu_active


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)), max_size=60))
def test_fuzz_listing_like_text_only_raises_listing_error(parts):
    try:
        topo = parse_listing("".join(parts))
    except ListingError:
        return
    for d in topo.devices.values():
        assert len(d.vendor) == 4 and len(d.device) == 4 and len(d.pci_class) == 6
        assert d.bridge == (d.class_code in ("0604", "0609"))
    from_snapshot(json.dumps(topo.to_json()))


MARKUP_FRAGMENTS = [
    "[CODE]", "[/CODE]", "[code=text]", "[COLOR=#ff0000]", "[COLOR=rgb(1, 2, 3)]", "[/COLOR]", "[B]", "[/b]",
    '[QUOTE="a, post: 1"]', "[/QUOTE]", "[SPOILER]", "[/SPOILER]", "[FONT=Courier New]", "[SIZE=2]", "[/SIZE]",
    "[COLOR=", "[SIZE=", "[", "[/", "```", "```text", "~~~", "~~~ bash", "<pre>", "</pre>", "<code>", "</code>",
    "<br>", "<br />", "<BR/>", '<span style="color: red">', "</span>", "<p>", "</div>", "<span ", "<", ">",
    "&gt;", "&amp;", "&nbsp;", "&#63;", "&#x3e;", "&", "&#", "&#99999999999;", "&bogus;", "<access denied>",
]


def _one_line_error(text: str) -> Listing | None:
    try:
        listing = read_listing(text)
    except ListingError as e:
        assert "\n" not in str(e) and "\r" not in str(e) and e.message
        return None
    u = listing.unparsed
    assert 0 <= len(u.lines) <= min(u.count, UNPARSED_SHOWN)
    assert all("\n" not in t and "\r" not in t and len(t) <= 120 for _, t in u.lines)
    assert u.message() is None if not u.count else "\n" not in (u.message() or "\n")
    json.dumps(u.to_json())
    return listing


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.sampled_from(FRAGMENTS + MARKUP_FRAGMENTS), st.text(max_size=4)), max_size=80))
def test_fuzz_markup_and_garbage_give_a_topology_or_one_line_error(parts):
    listing = _one_line_error("".join(parts))
    if listing is not None:
        assert listing.topology.devices and listing.topology.iommu_active


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet=st.sampled_from("[]<>/&#;=\"'` \t\n\r>*~:.0123456789abcdefBCOLRpre"), max_size=300))
def test_fuzz_bracket_soup_gives_a_topology_or_one_line_error(text):
    _one_line_error(text)


def test_hostile_markup_is_fast():
    # unclosed tags and entities by the hundred thousand: no quadratic scans
    for text in ("[COLOR=" * 200_000, "<span " * 200_000, "&#" * 400_000, "[/" * 400_000, "<br>" * 200_000):
        with pytest.raises(ListingError):
            parse_listing(text)


_hex4 = st.integers(0, 0xFFFF).map(lambda v: f"{v:04x}")
_classes = st.sampled_from(["0600", "0604", "0609", "0601", "0300", "0380", "0403", "0c03", "0108", "0200", "ff00"])


@st.composite
def topologies(draw):
    addrs = draw(st.lists(st.builds(PciAddress, st.integers(0, 3), st.integers(0, 255), st.integers(0, 31),
                                    st.integers(0, 7)), min_size=1, max_size=12, unique=True))
    devices = {}
    for a in addrs:
        cls = draw(_classes)
        devices[a] = Device(address=a, vendor=draw(_hex4), device=draw(_hex4), pci_class=cls + "00",
                            bridge=cls in ("0604", "0609"), group=draw(st.integers(0, 40)),
                            name=draw(st.sampled_from([
                                "Intel Corporation Device", "NVIDIA Corporation GP104 [GeForce GTX 1080]",
                                "Advanced Micro Devices, Inc. [AMD/ATI] Ellesmere [Radeon RX 470/480]"])),
                            driver=draw(st.sampled_from([None, "vfio-pci", "nvme", "snd_hda_intel"])))
    return Topology(devices=dict(sorted(devices.items())), iommu_active=True, source="listing")


def _bdf(d: Device, domain: bool, upper: bool) -> str:
    s = str(d.address) if domain or d.address.domain else str(d.address)[5:]
    return s.upper() if upper else s


@settings(max_examples=200)
@given(topologies(), st.sampled_from(["inline", "header", "first-on-header"]), st.booleans(), st.booleans(),
       st.sampled_from(["\n", "\r\n"]), st.randoms())
def test_rendered_listings_parse_back_exactly(topo, style, domain, upper, eol, rnd):
    out: list[str] = []

    def line(d: Device) -> list[str]:
        ids = f"[{d.vendor}:{d.device}]"
        main = (f"{_bdf(d, domain, upper)} Some class [{d.class_code}]: {d.name} "
                f"{ids.upper() if upper else ids} (rev a1)")
        return [main] + ([f"\tKernel driver in use: {d.driver}"] if d.driver else [])

    if style == "inline":
        items = [(g, d) for g, ms in topo.groups.items() for d in ms]
        rnd.shuffle(items)
        for g, d in items:
            first, *rest = line(d)
            out.append(f"{'iommu group' if upper else 'IOMMU Group'} {g}{rnd.choice([' ', chr(9), ': '])}{first}")
            out += rest
    else:
        for g, ms in topo.groups.items():
            lines = [text for d in ms for text in line(d)]
            if style == "header":
                out.append(f"IOMMU Group {g}:")
                out += ["\t" + text.lstrip("\t") for text in lines]
            else:
                out.append(f"IOMMU Group {g}:\t{lines[0]}")
                out += ["\t\t" + text.lstrip("\t") for text in lines[1:]]
    back = parse_listing(eol.join(out) + eol)
    assert back.devices == topo.devices


_WRAPS = {
    "bbcode": lambda lines, rnd: ["[CODE]"] + [rnd.choice(["{}", "[COLOR=#e25041]{}[/COLOR]", "[B]{}[/B]",
                                                          "[FONT=Courier New]{}[/FONT]", "[SIZE=2]{}[/SIZE]"]).format(x)
                                               for x in lines] + ["[/CODE]"],
    "quote": lambda lines, rnd: ['[QUOTE="op"][SPOILER="groups"]'] + lines + ["[/SPOILER][/QUOTE]"],
    "markdown": lambda lines, rnd: [rnd.choice(["```", "```text", "~~~", "~~~console"])] + lines + ["```"],
    "html": lambda lines, rnd: ["<pre><code>"] + [
        rnd.choice(["{}", '<span style="color: #c0392b">{}</span>', "<b>{}</b>"]).format(
            html.escape(x, quote=False).replace("\t", "&nbsp;&nbsp;&nbsp;&nbsp;")) for x in lines] + ["</code></pre>"],
    "html-br": lambda lines, rnd: ["<p>" + "<br />".join(html.escape(x, quote=False) for x in lines) + "</p>"],
}


@settings(max_examples=200)
@given(topologies(), st.sampled_from(sorted(_WRAPS)), st.randoms())
def test_rendered_listings_in_markup_parse_back_exactly(topo, wrap, rnd):
    out: list[str] = []
    for g, ms in topo.groups.items():
        out.append(f"IOMMU Group {g}:")
        for d in ms:
            out.append(f"\t{d.address} Some class [{d.class_code}]: {d.name} [{d.vendor}:{d.device}] (rev a1)")
            out += [f"\tKernel driver in use: {d.driver}"] if d.driver else []
    listing = read_listing("\n".join(_WRAPS[wrap](out, rnd)) + "\n")
    assert listing.topology.devices == topo.devices
    assert listing.unparsed.count == 0
