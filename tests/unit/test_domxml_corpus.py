"""Every XML file of the libvirt corpus (tests/corpus/libvirt), parsed, with what it must yield.

The table EXPECTED maps each file (path relative to tests/corpus/libvirt, which
is also its libvirt repository path) to an expectation. A file added to the
corpus without an entry here fails ``test_every_corpus_file_has_an_expectation``.

Negatives (files libvirt itself refuses, or that stress an edge) are marked
with ``negative=`` and say what hostdevd does with them and why.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hostdevd.core.address import PciAddress
from hostdevd.core.domxml import DeviceRequest, NetworkRef, parse_device, parse_domain
from hostdevd.core.errors import InvalidXML
from hostdevd.core.netxml import (
    HostdevNetwork,
    NetworkPort,
    NodeDevice,
    parse_network,
    parse_networkport,
    parse_nodedev,
    parse_nodedevs,
)

CORPUS = Path(__file__).resolve().parents[1] / "corpus" / "libvirt"
FILES = sorted(p.relative_to(CORPUS).as_posix() for p in CORPUS.rglob("*.xml"))

A = PciAddress.parse
MAC1 = "00:11:22:33:44:55"
QBG = "802.1Qbg"


def H(addr: str, managed: bool | None = True, **kw) -> DeviceRequest:
    return DeviceRequest(A(addr), "hostdev", managed, **kw)


def I(addr: str, mac: str | None, managed: bool | None = True, **kw) -> DeviceRequest:  # noqa: E743
    return DeviceRequest(A(addr), "interface", managed, mac=mac, **kw)


# --------------------------------------------------------------------------- expectation kinds


@dataclass
class Domain:
    """parse_domain must return exactly these requests/networks, and these out-of-scope kinds."""

    name: str | None
    requests: list[DeviceRequest] = field(default_factory=list)
    out_of_scope: list[str] = field(default_factory=list)
    networks: list[NetworkRef] = field(default_factory=list)
    detail: dict[int, str] = field(default_factory=dict)    # out_of_scope index -> substring of detail
    negative: str | None = None                             # why a libvirt-negative file is accepted
    fragment: bool = False

    def check(self, data: bytes) -> None:
        got = parse_domain(data)
        assert got.name == self.name
        assert got.uuid is None if self.fragment else got.uuid
        assert got.requests == self.requests
        assert got.addresses() == [r.address for r in self.requests]
        assert got.networks == self.networks
        assert [o.kind for o in got.out_of_scope] == self.out_of_scope
        for index, text in self.detail.items():
            assert text in got.out_of_scope[index].detail
        for o in got.out_of_scope:
            assert o.detail and "\n" not in o.detail
        # str input parses the same as bytes input
        assert parse_domain(data.decode("utf-8")) == got
        if self.fragment:
            assert parse_device(data) == got


@dataclass
class Network:
    expected: HostdevNetwork
    negative: str | None = None

    def check(self, data: bytes) -> None:
        assert parse_network(data) == self.expected


@dataclass
class Port:
    expected: NetworkPort

    def check(self, data: bytes) -> None:
        assert parse_networkport(data) == self.expected


@dataclass
class Node:
    expected: NodeDevice

    def check(self, data: bytes) -> None:
        assert parse_nodedev(data) == self.expected


@dataclass
class Nodes:
    """Several concatenated <device> documents: parse_nodedevs reads them, parse_nodedev refuses."""

    expected: list[NodeDevice]
    negative: str | None = None

    def check(self, data: bytes) -> None:
        assert parse_nodedevs(data) == self.expected
        with pytest.raises(InvalidXML, match="not well-formed"):
            parse_nodedev(data)


@dataclass
class Refused:
    """A negative file the parser refuses, with a one-line message matching ``match``."""

    parser: Callable
    match: str
    negative: str

    def check(self, data: bytes) -> None:
        with pytest.raises(InvalidXML, match=self.match) as info:
            self.parser(data)
        assert "\n" not in str(info.value)


def pci_node(name: str, addr: str, group: int | None, members: list[str], vendor: str, product: str,
             caps: list[str], parent: str | None, class_code: str = "0xffffff", **kw) -> Node:
    return Node(NodeDevice(
        name=name, address=A(addr), iommu_group=group, group_members=[A(m) for m in members],
        vendor_id=vendor, product_id=product, class_code=class_code, capabilities=caps,
        parent=parent, **kw,
    ))


def other_node(name: str, caps: list[str], parent: str | None, **kw) -> Node:
    return Node(NodeDevice(name=name, capabilities=caps, parent=parent, **kw))


def mdev_node(uuid: str, suffix: str, parent: str, mdev_type: str) -> NodeDevice:
    return NodeDevice(name=f"mdev_{uuid.replace('-', '_')}_{suffix}", capabilities=["mdev"], parent=parent,
                      iommu_group=0, mdev_type=mdev_type, mdev_uuid=uuid)


VF_02_10_7 = {"vendor": "0x8086", "product": "0x10ca", "parent": "pci_0000_00_04_0"}
VFS_02_00 = [A(f"0000:02:00.{f}") for f in (2, 3, 4, 5)]
F_06_12 = "0000:06:12"
MULTIFUNCTION = [
    H("0005:90:01.0", driver="vfio"), H("0001:01:00.1", driver="vfio"), H("0001:01:00.0", driver="vfio"),
    H("0005:90:01.2", driver="vfio"), H("0005:90:01.3", driver="vfio"), H("0000:06:12.1", driver="vfio"),
    H("0000:06:12.2", driver="vfio"),
]
NET_HOSTDEV_QBG = {"vlan_tags": (42,), "virtualport": QBG}

# --------------------------------------------------------------------------- the table

EXPECTED: dict[str, Domain | Network | Port | Node | Nodes | Refused] = {
    # ---- LXC: mode='capabilities' hostdevs are out of scope, never requests
    "tests/lxcxml2xmldata/lxc-hostdev.xml": Domain(
        "demo", out_of_scope=["capabilities:storage", "capabilities:misc", "capabilities:net"],
        detail={0: "/dev/sdf1", 1: "/dev/tty0", 2: "eth0"}),

    # ---- networks
    "tests/networkxml2xmlin/hostdev-pf-driver-model.xml": Network(HostdevNetwork(
        "hostdev", "hostdev", True, pf_devs=["eth2"], driver="vfio-pci-igb",
        uuid="81ff0d90-c91e-6742-64da-4a736edb9a9b")),
    "tests/networkxml2xmlin/hostdev.xml": Network(HostdevNetwork(
        "hostdev", "hostdev", True, vf_addresses=[A(f"0000:03:00.{f}") for f in (1, 2, 3, 4)],
        uuid="81ff0d90-c91e-6742-64da-4a736edb9a9b")),
    "tests/networkxml2xmlin/passthrough-address-crash.xml": Network(HostdevNetwork(
        "passthrough_001", "passthrough", None, vf_addresses=[A("0000:11:10.1")],
        uuid="50e92386-8dd1-4a95-8a4b-9a888274eb66"),
        negative="libvirt crash regression (PCI address in a passthrough pool): read as a one-address pool"),
    "tests/networkxml2xmlin/passthrough-pf.xml": Network(HostdevNetwork(
        "local", "passthrough", None, pf_devs=["eth0"], interface_devs=["eth10", "eth11"],
        uuid="81ff0d90-c91e-6742-64da-4a736edb9a9b")),
    "tests/networkxml2xmlout/hostdev-pf.xml": Network(HostdevNetwork(
        "hostdev", "hostdev", True, pf_devs=["eth2"], driver="vfio",
        uuid="81ff0d90-c91e-6742-64da-4a736edb9a9b")),
    "tests/networkxml2xmlout/passthrough-pf.xml": Network(HostdevNetwork(
        "local", "passthrough", None, pf_devs=["eth0"], uuid="81ff0d90-c91e-6742-64da-4a736edb9a9b")),
    "tests/virnetworkportxml2xmldata/plug-hostdev-pci.xml": Port(NetworkPort(
        uuid="5d744f21-ba4a-4d6e-bdb2-30a35ff3207d", owner_name="memtest",
        owner_uuid="d54df46f-1ab5-4a22-8618-4560ef5fac2c", mac="52:54:00:7b:35:93",
        plug_type="hostdev-pci", managed=True, driver="vfio", address=A("0001:02:03.4"))),

    # ---- node devices
    "tests/nodedevmdevctldata/mdevctl-list-multiple.out.xml": Nodes([
        mdev_node("200f228a-c80a-4d50-bfb7-f5a0e4e34045", "0000_00_02_0", "pci_0000_00_02_0", "i915-GVTg_V5_4"),
        mdev_node("de807ffc-1923-4d5f-b6c9-b20ecebc6d4b", "0000_00_02_0", "pci_0000_00_02_0", "i915-GVTg_V5_4"),
        mdev_node("435722ea-5f43-468a-874f-da34f1217f13", "0000_00_02_0", "pci_0000_00_02_0", "i915-GVTg_V5_8"),
        mdev_node("783e6dbb-ea0e-411f-94e2-717eaad438bf", "matrix", "ap_matrix", "vfio_ap-passthrough"),
        mdev_node("cc000052-9b13-9b13-9b13-cc23009b1326", "0_0_0052", "css_0_0_0052", "vfio_ccw-io"),
    ], negative="5 concatenated documents, not well-formed as one: parse_nodedev refuses, parse_nodedevs reads 5"),
    "tests/nodedevschemadata/mdev_d069d019_36ea_4111_8f0a_8c9a70e21366.xml": other_node(
        "mdev_d069d019_36ea_4111_8f0a_8c9a70e21366", ["mdev"], "pci_0000_00_02_0",
        mdev_type="i915-GVTg_V5_8", mdev_uuid="d069d019-36ea-4111-8f0a-8c9a70e21366"),
    "tests/nodedevschemadata/net_00_13_02_b9_f9_d3.xml": other_node(
        "net_00_13_02_b9_f9_d3", ["net", "80211"], "pci_8086_4227"),
    "tests/nodedevschemadata/net_00_15_58_2f_e9_55.xml": other_node(
        "net_00_15_58_2f_e9_55", ["net", "80203"], "pci_8086_109a"),
    "tests/nodedevschemadata/pci_0000_00_02_0_header_type.xml": Refused(
        parse_nodedev, r"nodedev 'pci_0000_00_02_0': PCI bus 4294967295 out of range 0\.\.0xff",
        negative="libvirt schema edge case <bus>4294967295</bus>: no such PCI bus, so refused, not truncated"),
    "tests/nodedevschemadata/pci_0000_00_1c_0_header_type.xml": pci_node(
        "pci_0000_00_1c_0", "0000:00:1c.0", 8, ["0000:00:1c.0"], "0x8086", "0x8c10", ["pci", "pci-bridge"],
        "computer"),
    "tests/nodedevschemadata/pci_0000_02_10_7_mdev_types.xml": pci_node(
        "pci_0000_02_10_7", "0000:02:10.7", 31, ["0000:02:10.7"], caps=["pci", "mdev_types"], **VF_02_10_7),
    "tests/nodedevschemadata/pci_0000_02_10_7_sriov.xml": pci_node(
        "pci_0000_02_10_7", "0000:02:10.7", 31, ["0000:02:10.7"], caps=["pci", "phys_function"],
        phys_function=A("0000:02:00.1"), **VF_02_10_7),
    "tests/nodedevschemadata/pci_0000_02_10_7_sriov_pf_vfs_all.xml": pci_node(
        "pci_0000_02_10_7", "0000:02:10.7", 31, ["0000:02:10.7"], caps=["pci", "phys_function", "virt_functions"],
        phys_function=A("0000:02:00.1"), virt_functions=VFS_02_00, max_vfs=7, **VF_02_10_7),
    "tests/nodedevschemadata/pci_0000_02_10_7_sriov_pf_vfs_all_header_type.xml": pci_node(
        "pci_0000_02_10_7", "0000:02:10.7", 31, ["0000:02:10.7"],
        caps=["pci", "phys_function", "virt_functions", "pci-bridge"],
        phys_function=A("0000:02:00.1"), virt_functions=VFS_02_00, max_vfs=7, **VF_02_10_7),
    "tests/nodedevschemadata/pci_0000_02_10_7_sriov_vfs.xml": pci_node(
        "pci_0000_02_10_7", "0000:02:10.7", 31, ["0000:02:10.7"], caps=["pci", "virt_functions"],
        virt_functions=VFS_02_00, **VF_02_10_7),
    "tests/nodedevschemadata/pci_0000_02_10_7_sriov_zero_vfs_max_count.xml": pci_node(
        "pci_0000_02_10_7", "0000:02:10.7", 31, ["0000:02:10.7"], caps=["pci", "virt_functions"],
        max_vfs=3, **VF_02_10_7),
    "tests/nodedevschemadata/pci_0000_42_00_0_vpd.xml": pci_node(
        "pci_0000_42_00_0", "0000:42:00.0", 65, ["0000:42:00.0"], "0x15b3", "0xa2d6",
        ["pci", "virt_functions", "vpd"], None, class_code="0x020000", max_vfs=16),
    "tests/nodedevschemadata/pci_1002_71c4.xml": pci_node(
        "pci_1002_71c4", "0000:01:00.0", None, [], "0x1002", "0x71c4", ["pci"], "pci_8086_27a1"),
    "tests/nodedevschemadata/pci_8086_0c0c_snd_hda_intel.xml": pci_node(
        "pci_0000_00_03_0", "0000:00:03.0", 2, ["0000:00:03.0"], "0x8086", "0x0c0c", ["pci"], "computer"),
    "tests/nodedevschemadata/pci_8086_10c9_sriov_pf.xml": pci_node(
        "pci_0000_02_00_0", "0000:02:00.0", 12, ["0000:02:00.0", "0000:02:00.1"], "0x8086", "0x10c9", ["pci"],
        "pci_0000_00_04_0"),
    "tests/nodedevschemadata/pci_8086_27c5_scsi_host.xml": other_node(
        "pci_8086_27c5_scsi_host", ["scsi_host"], "pci_8086_27c5"),
    "tests/nodedevschemadata/pci_8086_27c5_scsi_host_0.xml": other_node(
        "pci_8086_27c5_scsi_host_0", ["scsi_host"], "pci_8086_27c5"),
    "tests/nodedevschemadata/pci_8086_27c5_scsi_host_0_unique_id.xml": other_node(
        "pci_8086_27c5_scsi_host_0", ["scsi_host"], "pci_8086_27c5"),
    "tests/nodedevschemadata/pci_8086_27c5_scsi_host_scsi_device_lun0.xml": other_node(
        "pci_8086_27c5_scsi_host_scsi_device_lun0", ["scsi"], "pci_8086_27c5_scsi_host"),
    "tests/nodedevschemadata/pci_8086_27c5_scsi_host_scsi_host.xml": other_node(
        "pci_8086_27c5_scsi_host_scsi_host", ["scsi_host"], "pci_8086_27c5_scsi_host"),
    "tests/nodedevschemadata/pci_8086_4238_pcie_wireless.xml": pci_node(
        "pci_0000_03_00_0", "0000:03:00.0", 8,
        ["0000:00:1c.0", "0000:00:1c.1", "0000:00:1c.3", "0000:00:1c.4", "0000:03:00.0",
         "0000:0d:00.0", "0000:0d:00.1", "0000:0d:00.3"], "0x8086", "0x4238", ["pci"], "pci_0000_00_1c_1"),
    "tests/nodedevschemadata/pci_82579LM_network_adapter.xml": pci_node(
        "pci_0000_00_19_0", "0000:00:19.0", None, [], "0x8086", "0x1502", ["pci", "virt_functions"], "computer",
        driver="e1000e"),

    # ---- hotplug fragments (bare <hostdev>/<interface>)
    "tests/qemuhotplugtestdevices/qemuhotplug-hostdev-pci.xml": Domain(
        None, [H(f"{F_06_12}.2", driver="vfio")], fragment=True),
    "tests/qemuhotplugtestdevices/qemuhotplug-interface-hostdev.xml": Domain(
        None, [I(f"{F_06_12}.2", "52:54:00:6d:90:02")], fragment=True),
    "tests/qemuhotplugtestdevices/qemuhotplug-interface-network-hostdev.xml": Domain(
        None, networks=[NetworkRef("hostdev;plug-hostdev-pci", None, "52:54:00:7b:35:93")], fragment=True),

    # ---- live domains after hotplug: guest <address> (bus 0/1, slot 2/1) must not be mistaken for the host one
    "tests/qemuhotplugtestdomains/qemuhotplug-base-live+hostdev-pci.xml": Domain(
        "hotplug", [H(f"{F_06_12}.2", alias="hostdev0", driver="vfio")]),
    "tests/qemuhotplugtestdomains/qemuhotplug-base-live+interface-hostdev.xml": Domain(
        "hotplug", [I(f"{F_06_12}.2", "52:54:00:6d:90:02", alias="hostdev0", driver="vfio")]),
    "tests/qemuhotplugtestdomains/qemuhotplug-base-live+interface-network-hostdev.xml": Domain(
        "hotplug", [I(f"{F_06_12}.2", "52:54:00:7b:35:93", alias="hostdev0", driver="vfio")]),
    "tests/qemuhotplugtestdomains/qemuhotplug-pseries-base-live+hostdev-pci.xml": Domain(
        "hotplug", [H(f"{F_06_12}.2", alias="hostdev0", driver="vfio")]),

    # ---- qemuxml2argvdata
    "tests/qemuxml2argvdata/hostdev-mdev-display-ramfb.xml": Domain(
        "QEMUGuest2", out_of_scope=["mdev"], detail={0: "53764d0e-85a0-42b4-af5c-2046b460b1dc"}),
    "tests/qemuxml2argvdata/hostdev-mdev-display-spice-opengl.xml": Domain(
        "QEMUGuest2", out_of_scope=["mdev"], detail={0: "53764d0e-85a0-42b4-af5c-2046b460b1dc"}),
    "tests/qemuxml2argvdata/hostdev-mdev-src-address-invalid.xml": Domain(
        "QEMUGuest2", out_of_scope=["mdev"], detail={0: "without a uuid source address"},
        negative="mdev with a PCI-style source: hostdevd never binds mdevs, so it is reported out of scope "
                 "(detail says the uuid is missing) and its PCI-looking address is NOT taken as a request; "
                 "libvirt refuses the definition itself"),
    "tests/qemuxml2argvdata/hostdev-pci-address-unassigned.xml": Domain(
        "delete", [H(f"0005:90:01.{f}") for f in range(4)]),
    "tests/qemuxml2argvdata/hostdev-pci-multifunction.xml": Domain("delete", MULTIFUNCTION),
    "tests/qemuxml2argvdata/hostdev-scsi-autogen-address.xml": Domain(
        "QEMUGuest2", out_of_scope=["scsi"] * 11, detail={0: "scsi_host0", 10: "scsi_host10"}),
    "tests/qemuxml2argvdata/hostdev-scsi-shareable.xml": Domain("QEMUGuest2", out_of_scope=["scsi"]),
    "tests/qemuxml2argvdata/hostdev-scsi-vhost-scsi-ccw.xml": Domain(
        "QEMUGuest2", out_of_scope=["scsi_host"], detail={0: "naa.5123456789abcde0"}),
    "tests/qemuxml2argvdata/hostdev-scsi-vhost-scsi-pci.xml": Domain(
        "QEMUGuest2", out_of_scope=["scsi_host"], detail={0: "naa.5123456789abcde0"}),
    "tests/qemuxml2argvdata/hostdev-scsi-vhost-scsi-pcie.xml": Domain(
        "QEMUGuest2", out_of_scope=["scsi_host"], detail={0: "naa.5123456789abcde0"}),
    "tests/qemuxml2argvdata/hostdev-scsi-virtio-scsi.xml": Domain("QEMUGuest2", out_of_scope=["scsi"]),
    "tests/qemuxml2argvdata/hostdev-subsys-mdev-vfio-ap-boot-fail.xml": Domain(
        "QEMUGuest1", out_of_scope=["mdev"], detail={0: "vfio-ap"},
        negative="vfio-ap mdev with <boot order>: libvirt refuses the boot order; for hostdevd it is an "
                 "out-of-scope mdev either way"),
    "tests/qemuxml2argvdata/hostdev-subsys-mdev-vfio-ap.xml": Domain(
        "QEMUGuest1", out_of_scope=["mdev"], detail={0: "vfio-ap"}),
    "tests/qemuxml2argvdata/hostdev-subsys-mdev-vfio-ccw.xml": Domain(
        "QEMUGuest1", out_of_scope=["mdev"], detail={0: "vfio-ccw"}),
    "tests/qemuxml2argvdata/hostdev-usb-address-device-boot.xml": Domain(
        "QEMUGuest1", out_of_scope=["usb"], detail={0: "bus 14 device 6"}),
    "tests/qemuxml2argvdata/hostdev-usb-address.xml": Domain(
        "QEMUGuest1", out_of_scope=["usb"], detail={0: "bus 14 device 6"}),
    # decimal bus/slot/function: bus='222' slot='31' function='1' is 0021:de:1f.1
    "tests/qemuxml2argvdata/hostdev-vfio-multidomain.xml": Domain(
        "QEMUGuest2", [H("0021:de:1f.1", driver="vfio")]),
    # no managed attribute: managed is None, not False
    "tests/qemuxml2argvdata/hostdev-vfio-zpci-boundaries.xml": Domain(
        "QEMUGuest1", [H("ffff:00:00.0", None), H("0000:00:00.0", None)]),
    "tests/qemuxml2argvdata/hostdev-vfio-zpci-multidomain-many.xml": Domain(
        "QEMUGuest1", [H(f"000{d}:00:00.0", None) for d in range(1, 9)]),
    "tests/qemuxml2argvdata/hostdev-vfio-zpci.xml": Domain("QEMUGuest1", [H("0000:00:00.0", False)]),
    "tests/qemuxml2argvdata/net-hostdev-bootorder.xml": Domain("QEMUGuest1", [I("0000:03:07.1", MAC1)]),
    "tests/qemuxml2argvdata/net-hostdev-fail.xml": Domain(
        "QEMUGuest1", [I("0000:06:12.1", MAC1)],
        negative="interface type='hostdev' with filterref/backend/<driver queues>: libvirt refuses those "
                 "options; the host device is still unambiguous, so hostdevd reads the request (a "
                 "<driver> without name/model gives driver=None) and leaves the refusal to libvirt"),
    "tests/qemuxml2argvdata/net-hostdev-multidomain.xml": Domain(
        "QEMUGuest1", [I("2424:21:1c.6", MAC1, **NET_HOSTDEV_QBG)]),
    "tests/qemuxml2argvdata/net-hostdev-vfio-multidomain.xml": Domain(
        "QEMUGuest1", [I("0021:de:1f.1", MAC1, driver="vfio", **NET_HOSTDEV_QBG)]),
    "tests/qemuxml2argvdata/net-hostdev-vfio.xml": Domain(
        "QEMUGuest1", [I("0000:06:12.1", MAC1, driver="vfio", **NET_HOSTDEV_QBG)]),
    "tests/qemuxml2argvdata/net-hostdev.xml": Domain("QEMUGuest1", [I("0000:03:07.1", MAC1, **NET_HOSTDEV_QBG)]),
    "tests/qemuxml2argvdata/net-virtio-teaming-hostdev.xml": Domain(
        "QEMUGuest1", [H("0000:03:07.1"), H("0000:03:07.2")]),
    "tests/qemuxml2argvdata/net-virtio-teaming-network.xml": Domain(
        "QEMUGuest1", networks=[NetworkRef("mybridge", None, MAC1), NetworkRef("myhostdevpool", None, MAC1)]),
    "tests/qemuxml2argvdata/net-virtio-teaming.xml": Domain(
        "QEMUGuest1", [I("0000:03:07.1", MAC1), I("0000:03:07.2", "66:44:33:22:11:00")]),
    "tests/qemuxml2argvdata/pci-rom.xml": Domain("QEMUGuest2", [H("0000:06:12.5"), H("0000:06:12.6")]),
    "tests/qemuxml2argvdata/pseries-hostdevs-3.xml": Domain("guest", [H("0001:01:00.0"), H("0001:01:00.1")]),

    # ---- qemuxml2xmloutdata (generated outputs with guest addresses filled in)
    "tests/qemuxml2xmloutdata/hostdev-pci-multifunction.xml": Domain("delete", MULTIFUNCTION),
    "tests/qemuxml2xmloutdata/hostdev-scsi-lsi.xml": Domain("QEMUGuest2", out_of_scope=["scsi"]),
    "tests/qemuxml2xmloutdata/hostdev-vfio.xml": Domain("QEMUGuest2", [H("0000:06:12.1", driver="vfio")]),
    "tests/qemuxml2xmloutdata/net-hostdev.xml": Domain(
        "QEMUGuest1", [I("0000:03:07.1", MAC1, **NET_HOSTDEV_QBG)]),

    # ---- qemuxmlconfdata
    "tests/qemuxmlconfdata/hostdev-mdev-precreated.xml": Domain("QEMUGuest2", out_of_scope=["mdev"]),
    "tests/qemuxmlconfdata/hostdev-pci-address-device.xml": Domain("QEMUGuest2", [H("0000:06:12.5")]),
    "tests/qemuxmlconfdata/hostdev-pci-address.xml": Domain("QEMUGuest2", [H("0000:06:12.5")]),
    "tests/qemuxmlconfdata/hostdev-scsi-lsi.xml": Domain(
        "QEMUGuest2", out_of_scope=["scsi"] * 6, detail={2: "iSCSI iqn.1992-01.com.example"}),
    "tests/qemuxmlconfdata/hostdev-usb-address-device.xml": Domain("QEMUGuest1", out_of_scope=["usb"]),
    "tests/qemuxmlconfdata/hostdev-vfio-zpci-autogenerate-uids.s390x-latest.xml": Domain(
        "QEMUGuest1", [H("0000:00:00.0", False), H("0000:00:01.0", False)]),
    "tests/qemuxmlconfdata/hostdev-vfio-zpci-autogenerate.xml": Domain("QEMUGuest1", [H("0000:00:00.0", None)]),
    "tests/qemuxmlconfdata/hostdev-vfio-zpci.s390x-latest.xml": Domain("QEMUGuest1", [H("0000:00:00.0", False)]),
    # <driver model='vfio-pci-igb'> wins over <driver name='vfio'>
    "tests/qemuxmlconfdata/hostdev-vfio.xml": Domain("QEMUGuest2", [
        H("0000:06:12.1"), H("0000:06:12.2", driver="vfio"),
        H("0000:06:12.3", driver="vfio-pci-igb", driver_model="vfio-pci-igb"),
        H("0000:06:12.4", driver="vfio-pci-igb", driver_model="vfio-pci-igb")]),
    "tests/qemuxmlconfdata/pseries-hostdevs-1.ppc64-latest.xml": Domain("guest", [
        I("0005:90:01.0", "52:54:00:6d:90:02"), H("0001:01:00.0"), H("0001:01:00.1")]),
    "tests/qemuxmlconfdata/pseries-hostdevs-1.xml": Domain("guest", [
        H("0001:01:00.0"), I("0005:90:01.0", "52:54:00:6d:90:02"), H("0001:01:00.1")]),
    "tests/qemuxmlconfdata/pseries-hostdevs-2.xml": Domain("guest", [H("0001:01:00.0"), H("0005:90:01.0")]),
}


# --------------------------------------------------------------------------- tests


def test_corpus_is_present():
    assert CORPUS.is_dir(), f"{CORPUS} is missing"
    assert (CORPUS.parent / "README.md").is_file()
    assert len(FILES) >= 85


def test_every_corpus_file_has_an_expectation():
    missing = sorted(set(FILES) - set(EXPECTED))
    stale = sorted(set(EXPECTED) - set(FILES))
    assert not missing, f"corpus files without an expectation in EXPECTED: {missing}"
    assert not stale, f"expectations for files not in the corpus: {stale}"


@pytest.mark.parametrize("rel", FILES)
def test_corpus_file(rel: str):
    expectation = EXPECTED.get(rel)
    if expectation is None:
        pytest.fail(f"{rel}: no expectation in EXPECTED (add one)")
    expectation.check((CORPUS / rel).read_bytes())


def test_negatives_are_documented():
    negatives = {rel: e.negative for rel, e in EXPECTED.items() if getattr(e, "negative", None)}
    assert "tests/qemuxml2argvdata/hostdev-mdev-src-address-invalid.xml" in negatives
    assert "tests/qemuxml2argvdata/net-hostdev-fail.xml" in negatives
    assert all(e.negative.strip() for e in EXPECTED.values() if isinstance(e, (Refused, Nodes)))


def test_corpus_totals():
    """The counts the corpus gives; a change here means a parser or corpus change worth a look."""
    domains = {rel: e for rel, e in EXPECTED.items() if isinstance(e, Domain)}
    requests = sum(len(e.requests) for e in domains.values())
    out_of_scope = sum(len(e.out_of_scope) for e in domains.values())
    networks = sum(len(e.networks) for e in domains.values())
    negatives = sum(1 for e in EXPECTED.values() if getattr(e, "negative", None))
    assert (len(FILES), len(domains), requests, out_of_scope, networks, negatives) == (
        85, 55, 70, 36, 3, 6)


def test_mdev_source_pci_address_is_not_a_request():
    data = (CORPUS / "tests/qemuxml2argvdata/hostdev-mdev-src-address-invalid.xml").read_bytes()
    assert parse_domain(data).addresses() == []


def test_guest_addresses_are_not_host_addresses():
    """Every guest-side <address type='pci'> in the corpus stays out of the requests."""
    from lxml import etree
    files_with_guest_pci = 0
    for rel, exp in EXPECTED.items():
        if not isinstance(exp, Domain):
            continue
        root = etree.fromstring((CORPUS / rel).read_bytes())
        guest = {
            PciAddress.from_parts(a.get("domain"), a.get("bus"), a.get("slot"), a.get("function"))
            for dev in root.iter("hostdev", "interface") for a in dev.findall("address")
            if a.get("bus") is not None and a.get("slot") is not None
        }
        host = set(parse_domain((CORPUS / rel).read_bytes()).addresses())
        expected_host = {r.address for r in exp.requests}
        assert host == expected_host
        assert not (guest - expected_host) & host, rel
        files_with_guest_pci += bool(guest)
    assert files_with_guest_pci >= 15       # the corpus really does exercise the confusion
