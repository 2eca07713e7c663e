"""The simulated kernel: layout, the driver core's bind/unbind/probe rules, vfio groups,
SR-IOV, resets, fault injection and spec validation."""
from __future__ import annotations

import errno
import json
import threading
import time
from pathlib import Path

import pytest

from hostdevd.core.errors import ConfigError
from hostdevd.sim.simkernel import SimKernel

TOPOLOGIES = Path(__file__).resolve().parent.parent / "topologies"

NIC1 = "0000:01:00.0"          # lab: e1000e, alone in group 12
NIC2A, NIC2B = "0000:04:00.0", "0000:04:00.1"   # lab: group 15
NIC4B = "0000:0a:00.0"         # lab: driver_override "e1000e" preset
NVME_PF = "0000:03:00.0"       # lab: SR-IOV PF, autoprobe 0
PCIBR = "0000:05:00.0"         # lab: pcie-pci-bridge, no driver, group 16
RP1 = "0000:00:02.0"


def lab() -> SimKernel:
    return SimKernel.from_file(TOPOLOGIES / "lab.json")


def dev(bdf: str, attr: str) -> str:
    return f"bus/pci/devices/{bdf}/{attr}"



def raises_errno(code: int, fn, *args):
    with pytest.raises(OSError) as ei:
        fn(*args)
    assert ei.value.errno == code, f"expected {errno.errorcode[code]}, got {ei.value!r}"
    return ei.value


def minimal(**extra) -> dict:
    spec = {
        "drivers": {"e1000e": {"ids": ["8086:10d3"]}, "igb": {"ids": ["8086:*"]}},
        "devices": [
            {"address": "0000:00:02.0", "vendor": "1b36", "device": "000c", "class": "060400",
             "group": 1, "driver": "pcieport", "secondary_bus": 1},
            {"address": "0000:01:00.0", "vendor": "8086", "device": "10d3", "class": "020000",
             "group": 2, "driver": "e1000e", "net": ["eth0"]},
        ],
    }
    spec.update(extra)
    return spec


# ----- loading and layout -------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted(TOPOLOGIES.glob("*.json")), ids=lambda p: p.name)
def test_every_topology_loads_consistently(path):
    k = SimKernel.from_file(path)
    groups = k.groups()
    for bdf, (driver, override) in k.state().items():
        assert k.exists(f"bus/pci/devices/{bdf}/vendor")
        if driver:
            assert k.readlink(dev(bdf, "driver")).endswith(f"/bus/pci/drivers/{driver}")
            assert k.exists(f"bus/pci/drivers/{driver}/{bdf}")
        assert k.read(dev(bdf, "driver_override")) == f"{override or '(null)'}\n"
    for n, members in groups.items():
        assert sorted(k.listdir(f"kernel/iommu_groups/{n}/devices")) == members


def test_lab_groups_match_the_observed_table():
    g = lab().groups()
    assert sorted(g) == list(range(20))
    assert g[12] == [NIC1]
    assert g[15] == [NIC2A, NIC2B]
    assert g[16] == [PCIBR, "0000:06:01.0", "0000:06:02.0"]
    assert g[18] == ["0000:08:00.0", "0000:09:00.0"]
    assert g[19] == ["0000:08:01.0", NIC4B]
    assert g[11] == ["0000:00:1f.0", "0000:00:1f.2", "0000:00:1f.3"]


def test_layout_links_are_the_kernels():
    k = lab()
    assert k.readlink(f"bus/pci/devices/{NIC1}") == f"../../../devices/pci0000:00/{RP1}/{NIC1}"
    assert k.readlink(dev(NIC1, "driver")) == "../../../../bus/pci/drivers/e1000e"
    assert k.readlink(dev(NIC1, "iommu_group")) == "../../../../kernel/iommu_groups/12"
    assert k.readlink("class/net/enp1s0/device") == f"../../../{NIC1}"
    assert k.readlink("class/net/enp1s0") == f"../../devices/pci0000:00/{RP1}/{NIC1}/net/enp1s0"
    # virtio: the netdev hangs off virtioN, and `device` names virtioN, not the PCI function
    assert k.readlink("class/net/enp0s17").startswith("../../devices/pci0000:00/0000:00:11.0/virtio")
    assert "0000:" not in k.readlink("class/net/enp0s17/device")
    assert k.readlink("class/block/vda").startswith("../../devices/pci0000:00/0000:00:10.0/virtio")
    assert k.readlink("dev/block/254:0") == k.readlink("class/block/vda")
    # the switch nests: rp6 -> upstream -> downstream 2 -> nic4b
    assert k.realpath(f"bus/pci/devices/{NIC4B}") == \
        f"/sys/devices/pci0000:00/0000:00:07.0/0000:07:00.0/0000:08:01.0/{NIC4B}"
    assert k.listdir("class/iommu") == ["dmar0"]
    assert k.read("module/vfio_iommu_type1/parameters/allow_unsafe_interrupts") == "N\n"
    assert k.read(dev(NIC1, "vendor")) == "0x8086\n"
    assert k.read(dev(NIC1, "class")) == "0x020000\n"
    assert k.read("kernel/iommu_groups/12/type") == "identity\n"


def test_config_space_header_type_and_multifunction_bit():
    k = lab()
    assert k.read_bytes(dev(NIC1, "config"), 64)[0x0E] == 0x00
    assert k.read_bytes(dev(NIC2A, "config"), 64)[0x0E] == 0x80
    assert k.read_bytes(dev(RP1, "config"), 64)[0x0E] == 0x01
    cfg = k.read_bytes(dev(NIC1, "config"), 256)
    assert len(cfg) == 256 and cfg[0:4] == bytes([0x86, 0x80, 0xD3, 0x10])


def test_file_semantics_errors():
    k = lab()
    raises_errno(errno.ENOENT, k.read, dev(NIC1, "nonexistent"))
    raises_errno(errno.ENOENT, k.read, "bus/pci/devices/0000:99:00.0/vendor")
    raises_errno(errno.EISDIR, k.read, f"bus/pci/devices/{NIC1}")
    raises_errno(errno.EACCES, k.read, "bus/pci/drivers_probe")
    raises_errno(errno.EACCES, k.write, dev(NIC1, "vendor"), "0x1234")
    raises_errno(errno.ENOTDIR, k.listdir, dev(NIC1, "vendor"))
    raises_errno(errno.EINVAL, k.readlink, dev(NIC1, "vendor"))
    assert not k.exists(dev(RP1, "driver_override/x"))
    assert k.exists(dev(NIC1, "driver"))


def test_no_iommu_has_no_groups_and_no_units():
    k = SimKernel.from_file(TOPOLOGIES / "no_iommu.json")
    assert k.listdir("kernel/iommu_groups") == []
    assert k.listdir("class/iommu") == []
    assert not k.exists(dev("0000:00:19.0", "iommu_group"))
    assert "IR-" not in k.proc_read("interrupts")
    # vfio-pci's probe needs an IOMMU group
    k.write(dev("0000:00:19.0", "driver_override"), "vfio-pci")
    k.write("bus/pci/drivers/e1000e/unbind", "0000:00:19.0")
    k.write("bus/pci/drivers_probe", "0000:00:19.0")
    assert k.driver("0000:00:19.0") is None
    raises_errno(errno.EINVAL, k.write, "bus/pci/drivers/vfio-pci/bind", "0000:00:19.0")


# ----- driver_override, bind, unbind, drivers_probe -----------------------------------------

def test_driver_override_store_is_the_kernels():
    k = lab()
    p = dev(NIC1, "driver_override")
    k.write(p, "vfio-pci\n")
    assert k.read(p) == "vfio-pci\n"
    k.write(p, "\n")
    assert k.read(p) == "(null)\n" and k.driver_override(NIC1) is None
    k.write(p, "pci-stub")
    k.write(p, "")
    assert k.driver_override(NIC1) is None
    k.write(p, "vfio-pci\ngarbage")           # cut at the first newline
    assert k.driver_override(NIC1) == "vfio-pci"


def test_vfio_roundtrip_by_override_unbind_probe():
    k = lab()
    k.write(dev(NIC1, "driver_override"), "vfio-pci")
    assert k.driver(NIC1) == "e1000e"          # the override alone changes nothing
    k.write("bus/pci/drivers/e1000e/unbind", NIC1)
    assert k.driver(NIC1) is None
    assert not k.exists("class/net/enp1s0")    # the netdev goes with the host driver
    k.write("bus/pci/drivers_probe", NIC1)
    assert k.driver(NIC1) == "vfio-pci"
    assert k.dev_exists("vfio/12") and k.exists(dev(NIC1, "vfio-dev"))
    k.write(dev(NIC1, "driver_override"), "\n")
    k.write("bus/pci/drivers/vfio-pci/unbind", NIC1)
    assert not k.dev_exists("vfio/12")
    k.write("bus/pci/drivers_probe", NIC1)
    assert k.state()[NIC1] == ("e1000e", None)
    assert k.exists("class/net/enp1s0")


def test_preset_override_is_restored_exactly():
    k = lab()
    before = k.state()[NIC4B]
    assert before == ("e1000e", "e1000e")
    k.write(dev(NIC4B, "driver_override"), "vfio-pci")
    k.write("bus/pci/drivers/e1000e/unbind", NIC4B)
    k.write("bus/pci/drivers_probe", NIC4B)
    assert k.state()[NIC4B] == ("vfio-pci", "vfio-pci")
    k.write(dev(NIC4B, "driver_override"), "e1000e")
    k.write("bus/pci/drivers/vfio-pci/unbind", NIC4B)
    k.write("bus/pci/drivers_probe", NIC4B)
    assert k.state()[NIC4B] == before


def test_unbind_needs_the_bound_driver():
    k = lab()
    raises_errno(errno.ENODEV, k.write, "bus/pci/drivers/e1000/unbind", NIC1)
    raises_errno(errno.ENODEV, k.write, "bus/pci/drivers/e1000e/unbind", "01:00.0")
    raises_errno(errno.ENODEV, k.write, "bus/pci/drivers/e1000e/unbind", "0000:99:00.0")
    k.write("bus/pci/drivers/e1000e/unbind", NIC1 + "\n")   # sysfs_streq: one newline is fine
    assert k.driver(NIC1) is None
    raises_errno(errno.ENODEV, k.write, "bus/pci/drivers/e1000e/unbind", NIC1)


def test_bind_rules():
    k = lab()
    raises_errno(errno.EBUSY, k.write, "bus/pci/drivers/e1000e/bind", NIC1)
    k.write("bus/pci/drivers/e1000e/unbind", NIC1)
    raises_errno(errno.ENODEV, k.write, "bus/pci/drivers/e1000/bind", NIC1)       # id table
    raises_errno(errno.ENODEV, k.write, "bus/pci/drivers/vfio-pci/bind", NIC1)    # no ids
    k.write(dev(NIC1, "driver_override"), "vfio-pci")
    raises_errno(errno.ENODEV, k.write, "bus/pci/drivers/e1000e/bind", NIC1)      # override rules
    k.write("bus/pci/drivers/vfio-pci/bind", NIC1)
    assert k.driver(NIC1) == "vfio-pci"
    raises_errno(errno.ENOENT, k.write, "bus/pci/drivers/nosuch/bind", NIC1)


def test_drivers_probe_rules():
    k = lab()
    k.write("bus/pci/drivers_probe", NIC1)                  # bound: nothing happens
    assert k.driver(NIC1) == "e1000e"
    raises_errno(errno.ENODEV, k.write, "bus/pci/drivers_probe", "0000:99:00.0")
    k.write("bus/pci/drivers/e1000e/unbind", NIC1)
    k.write("bus/pci/drivers_probe", NIC1)                  # id table
    assert k.driver(NIC1) == "e1000e"
    k.write("bus/pci/drivers/e1000e/unbind", NIC1)
    k.write(dev(NIC1, "driver_override"), "igb")            # override names a driver not loaded
    k.write("bus/pci/drivers_probe", NIC1)
    assert k.driver(NIC1) is None


def test_bridges_bind_only_pcieport_and_vfio_refuses_them():
    k = lab()
    k.write("bus/pci/drivers/pcieport/unbind", RP1)
    k.write("bus/pci/drivers_probe", RP1)
    assert k.driver(RP1) == "pcieport"
    k.write("bus/pci/drivers_probe", PCIBR)                 # the brief's rule: pcieport if listed
    assert k.driver(PCIBR) == "pcieport"
    k.write("bus/pci/drivers/pcieport/unbind", PCIBR)
    k.write(dev(PCIBR, "driver_override"), "vfio-pci")
    raises_errno(errno.EINVAL, k.write, "bus/pci/drivers/vfio-pci/bind", PCIBR)
    k.write("bus/pci/drivers_probe", PCIBR)
    assert k.driver(PCIBR) is None
    k.write(dev(NIC1, "driver_override"), "pcieport")
    k.write("bus/pci/drivers/e1000e/unbind", NIC1)
    raises_errno(errno.ENODEV, k.write, "bus/pci/drivers/pcieport/bind", NIC1)


def test_refusing_driver_and_per_device_refusal():
    k = lab()
    k.set_refuse("e1000e")
    k.write("bus/pci/drivers/e1000e/unbind", NIC1)
    k.write("bus/pci/drivers_probe", NIC1)                  # probe failure: write succeeds
    assert k.driver(NIC1) is None
    raises_errno(errno.ENODEV, k.write, "bus/pci/drivers/e1000e/bind", NIC1)
    k.set_refuse("e1000e", "EIO")
    raises_errno(errno.EIO, k.write, "bus/pci/drivers/e1000e/bind", NIC1)
    k.set_refuse("e1000e", None)
    k.write("bus/pci/drivers/e1000e/bind", NIC1)
    assert k.driver(NIC1) == "e1000e"
    spec = minimal()
    spec["drivers"]["e1000e"]["refuse"] = "EPROBE_DEFER" if hasattr(errno, "EPROBE_DEFER") else "EAGAIN"
    k2 = SimKernel(spec)
    k2.write("bus/pci/drivers/e1000e/unbind", "0000:01:00.0")
    k2.write("bus/pci/drivers_probe", "0000:01:00.0")      # e1000e refuses, igb (8086:*) takes it
    assert k2.driver("0000:01:00.0") == "igb"


def test_modules_unload_and_load():
    k = lab()
    k.unload_module("e1000e")
    assert not k.exists("bus/pci/drivers/e1000e") and not k.exists("module/e1000e")
    assert k.driver(NIC1) is None and k.driver(NIC4B) is None
    k.load_module("e1000e")                                  # driver_attach(): probes unbound devices
    assert k.driver(NIC1) == "e1000e" and k.driver(NIC4B) == "e1000e"
    raises_errno(errno.EBUSY, k.unload_module, "vfio_iommu_type1")    # used by vfio_pci
    k.unload_module("vfio-pci")
    assert not k.exists("bus/pci/drivers/vfio-pci")
    k.write(dev(NIC1, "driver_override"), "vfio-pci")
    k.write("bus/pci/drivers/e1000e/unbind", NIC1)
    k.write("bus/pci/drivers_probe", NIC1)
    assert k.driver(NIC1) is None
    k.load_module("vfio_pci")                                # modprobe vfio-pci binds overrides
    assert k.driver(NIC1) == "vfio-pci"
    assert "vfio_iommu_type1" in k.loaded_modules()
    k.open_group(12)
    raises_errno(errno.EBUSY, k.unload_module, "vfio_pci")
    k2 = SimKernel(minimal(blacklisted_modules=["vfio_pci"]))
    assert not k2.exists("bus/pci/drivers/vfio-pci")
    with pytest.raises(OSError, match="administratively prohibited"):
        k2.load_module("vfio-pci")


def test_new_id_and_remove_id():
    k = lab()
    k.write("bus/pci/drivers/e1000e/unbind", NIC1)
    raises_errno(errno.EEXIST, k.write, "bus/pci/drivers/e1000e/new_id", "8086 10d3")
    k.write("bus/pci/drivers/vfio-pci/new_id", "8086 10d3")  # grabs every unbound 10d3
    assert k.driver(NIC1) == "vfio-pci"
    assert k.driver(NIC2A) == "e1000e"                        # bound devices are left alone
    k.write("bus/pci/drivers/vfio-pci/remove_id", "8086 10d3")
    raises_errno(errno.ENODEV, k.write, "bus/pci/drivers/vfio-pci/remove_id", "8086 10d3")
    raises_errno(errno.EINVAL, k.write, "bus/pci/drivers/vfio-pci/new_id", "zz")


# ----- vfio groups ---------------------------------------------------------------------------------

def to_vfio(k: SimKernel, bdf: str) -> None:
    k.write(dev(bdf, "driver_override"), "vfio-pci")
    drv = k.driver(bdf)
    if drv:
        k.write(f"bus/pci/drivers/{drv}/unbind", bdf)
    k.write("bus/pci/drivers_probe", bdf)
    assert k.driver(bdf) == "vfio-pci"


def test_open_group_requires_a_viable_group():
    k = lab()
    raises_errno(errno.ENOENT, k.open_group, 15)              # no /dev/vfio/15 yet
    to_vfio(k, NIC2A)
    with pytest.raises(PermissionError, match="group 15 is not viable"):
        k.open_group(15)
    to_vfio(k, NIC2B)
    k.open_group(15)
    k.open_group(15)
    assert k.vfio_group_users(15) == 2
    k.close_group(15)
    k.close_group(15)
    assert k.vfio_group_users(15) == 0
    with pytest.raises(ValueError):
        k.close_group(15)


def test_bridges_and_unbound_members_are_viable():
    k = lab()
    to_vfio(k, "0000:06:01.0")
    to_vfio(k, "0000:06:02.0")
    k.open_group(16)                                           # pcie-pci-bridge has no driver
    to_vfio(k, "0000:09:00.0")
    k.open_group(18)                                           # downstream port on pcieport
    k.write("bus/pci/drivers/e1000e/unbind", NIC2A)
    to_vfio(k, NIC2B)
    k.open_group(15)                                           # NIC2A unbound: viable


def test_pci_stub_member_is_viable():
    k = lab()
    k.write(dev(NIC2A, "driver_override"), "pci-stub")
    k.write("bus/pci/drivers/e1000e/unbind", NIC2A)
    k.write("bus/pci/drivers_probe", NIC2A)
    assert k.driver(NIC2A) == "pci-stub"
    to_vfio(k, NIC2B)
    k.open_group(15)


def test_host_driver_cannot_bind_into_an_open_group():
    k = lab()
    k.write("bus/pci/drivers/e1000e/unbind", NIC2A)
    to_vfio(k, NIC2B)
    k.open_group(15)
    raises_errno(errno.EBUSY, k.write, "bus/pci/drivers/e1000e/bind", NIC2A)
    k.write("bus/pci/drivers_probe", NIC2A)                   # probe error swallowed
    assert k.driver(NIC2A) is None
    k.write(dev(NIC2A, "driver_override"), "vfio-pci")        # vfio-pci may join
    k.write("bus/pci/drivers_probe", NIC2A)
    assert k.driver(NIC2A) == "vfio-pci"


def test_unbinding_vfio_from_an_open_group_is_ebusy_by_default():
    k = lab()
    to_vfio(k, NIC1)
    k.open_group(12)
    raises_errno(errno.EBUSY, k.write, "bus/pci/drivers/vfio-pci/unbind", NIC1)
    k.close_group(12)
    k.write("bus/pci/drivers/vfio-pci/unbind", NIC1)
    assert k.driver(NIC1) is None


def test_unbinding_vfio_from_an_open_group_blocks_in_block_mode():
    spec = json.loads((TOPOLOGIES / "lab.json").read_text())
    spec["open_group_unbind"] = "block"
    k = SimKernel(spec)
    to_vfio(k, NIC1)
    k.open_group(12)
    done = threading.Event()

    def unbind():
        k.write("bus/pci/drivers/vfio-pci/unbind", NIC1)
        done.set()

    t = threading.Thread(target=unbind, daemon=True)
    t.start()
    assert not done.wait(0.2)
    assert k.driver(NIC2A) == "e1000e"                         # the lock is not held meanwhile
    k.close_group(12)
    assert done.wait(2)
    assert k.driver(NIC1) is None


def test_interrupt_remapping_gate():
    spec = json.loads((TOPOLOGIES / "lab.json").read_text())
    spec["interrupt_remapping"] = False
    k = SimKernel(spec)
    assert "IR-" not in k.proc_read("interrupts")
    to_vfio(k, NIC1)
    with pytest.raises(PermissionError, match="allow_unsafe_interrupts"):
        k.open_group(12)
    spec["unsafe_interrupts"] = True
    k = SimKernel(spec)
    assert k.read("module/vfio_iommu_type1/parameters/allow_unsafe_interrupts") == "Y\n"
    to_vfio(k, NIC1)
    k.open_group(12)


# ----- SR-IOV ------------------------------------------------------------------------------------

def sriov() -> SimKernel:
    return SimKernel.from_file(TOPOLOGIES / "sriov_pf.json")


PF = "0000:03:00.0"


def test_vfs_are_created_with_offset_stride_links_groups_and_autoprobe():
    k = sriov()
    before = set(k.groups())
    k.write(dev(PF, "sriov_numvfs"), "4")
    vfs = ["0000:03:10.0", "0000:03:10.4", "0000:03:11.0", "0000:03:11.4"]
    assert k.vfs(PF) == vfs
    assert k.read(dev(PF, "sriov_numvfs")) == "4\n"
    new_groups = [k.group_of(v) for v in vfs]
    assert len(set(new_groups)) == 4 and not set(new_groups) & before
    assert new_groups == sorted(new_groups) and new_groups[0] == max(before) + 1
    for i, v in enumerate(vfs):
        assert k.readlink(dev(v, "physfn")) == f"../{PF}"
        assert k.readlink(dev(PF, f"virtfn{i}")) == f"../{v}"
        assert k.driver(v) == "igbvf"
        assert k.read(dev(v, "device")) == "0x1520\n"
        assert k.exists(f"class/net/enp3s0f0v{i}")
    raises_errno(errno.EBUSY, k.write, dev(PF, "sriov_numvfs"), "2")   # only through 0
    k.write(dev(PF, "sriov_numvfs"), "4")                               # same value: no-op
    raises_errno(errno.ERANGE, k.write, dev(PF, "sriov_numvfs"), "9")
    raises_errno(errno.EINVAL, k.write, dev(PF, "sriov_numvfs"), "two")
    k.write(dev(PF, "sriov_numvfs"), "0")
    assert k.vfs(PF) == [] and set(k.groups()) == before
    assert not k.exists(dev(PF, "virtfn0"))
    assert not k.has_device(vfs[0])
    k.write(dev(PF, "sriov_numvfs"), "2")
    assert k.vfs(PF) == vfs[:2]


def test_autoprobe_off_keeps_vfs_driverless_unless_overridden():
    k = lab()
    assert k.read(dev(NVME_PF, "sriov_drivers_autoprobe")) == "0\n"
    k.write(dev(NVME_PF, "sriov_numvfs"), "8")
    g = k.groups()
    assert [g[n] for n in range(20, 28)] == [[f"0000:03:00.{f}"] for f in range(1, 8)] + [["0000:03:01.0"]]
    vf = "0000:03:00.1"
    assert all(k.driver(v) is None for v in k.vfs(NVME_PF))
    k.write("bus/pci/drivers_probe", vf)                      # pci_device_can_probe() says no
    assert k.driver(vf) is None
    raises_errno(errno.ENODEV, k.write, "bus/pci/drivers/nvme/bind", vf)
    k.write(dev(vf, "driver_override"), "vfio-pci")
    k.write("bus/pci/drivers_probe", vf)
    assert k.driver(vf) == "vfio-pci"
    k.write(dev(NVME_PF, "sriov_drivers_autoprobe"), "1")
    k.write("bus/pci/drivers_probe", "0000:03:00.2")          # nvme refuses these VFs (lab pitfall)
    assert k.driver("0000:03:00.2") is None
    raises_errno(errno.EINVAL, k.write, dev(NVME_PF, "sriov_drivers_autoprobe"), "maybe")


def test_vfs_can_share_the_pf_group_and_pf_needs_a_driver():
    spec = json.loads((TOPOLOGIES / "sriov_pf.json").read_text())
    pf = next(d for d in spec["devices"] if d["address"] == PF)
    pf["sriov"]["vfs_share_group"] = True
    k = SimKernel(spec)
    k.write(dev(PF, "sriov_numvfs"), "3")
    assert k.groups()[5] == [PF, "0000:03:10.0", "0000:03:10.4", "0000:03:11.0"]
    k.write(dev(PF, "sriov_numvfs"), "0")
    k.write("bus/pci/drivers/igb/unbind", PF)
    raises_errno(errno.ENOENT, k.write, dev(PF, "sriov_numvfs"), "2")


def test_unbinding_the_pf_driver_removes_its_vfs():
    k = sriov()
    k.write(dev(PF, "sriov_numvfs"), "2")
    k.write("bus/pci/drivers/igb/unbind", PF)
    assert k.vfs(PF) == [] and not k.has_device("0000:03:10.0")


def test_vfs_on_vfio_in_an_open_group_block_removal():
    k = sriov()
    k.write(dev(PF, "sriov_numvfs"), "2")
    vf = "0000:03:10.0"
    to_vfio(k, vf)
    k.open_group(k.group_of(vf))
    raises_errno(errno.EBUSY, k.write, dev(PF, "sriov_numvfs"), "0")
    assert k.vfs(PF) == [vf, "0000:03:10.4"]


def test_initial_numvfs_in_spec():
    spec = json.loads((TOPOLOGIES / "sriov_pf.json").read_text())
    next(d for d in spec["devices"] if d["address"] == PF)["sriov"]["numvfs"] = 2
    k = SimKernel(spec)
    assert k.vfs(PF) == ["0000:03:10.0", "0000:03:10.4"]
    assert k.driver("0000:03:10.0") == "igbvf"


# ----- reset, remove ---------------------------------------------------------------------------

def test_reset_counts_and_needs_a_method():
    k = lab()
    k.write(dev(NIC1, "reset"), "1")
    k.write(dev(NIC1, "reset"), "1\n")
    assert k.reset_count(NIC1) == 2
    raises_errno(errno.EINVAL, k.write, dev(NIC1, "reset"), "2")
    assert k.read(dev(NIC1, "reset_method")) == "flr\n"
    assert not k.exists(dev("0000:00:10.0", "reset"))          # virtio-blk: no reset method
    raises_errno(errno.ENOENT, k.write, dev("0000:00:10.0", "reset"), "1")
    k.write(dev(NIC1, "reset_method"), "")
    assert not k.exists(dev(NIC1, "reset"))
    k.write(dev(NIC1, "reset_method"), "default")
    raises_errno(errno.EINVAL, k.write, dev(NIC1, "reset_method"), "bus")
    assert k.reset_count(NIC1) == 2


def test_remove_attribute_and_hot_unplug():
    k = lab()
    k.write(dev(NIC2B, "remove"), "1")
    assert not k.has_device(NIC2B)
    assert k.groups()[15] == [NIC2A]
    k.hot_unplug(NIC1)
    assert 12 not in k.groups()
    assert not k.exists(f"bus/pci/devices/{NIC1}")


# ----- /proc and /dev ----------------------------------------------------------------------------

def test_proc_files():
    k = SimKernel.from_file(TOPOLOGIES / "desktop_gpu.json")
    mi = k.proc_read("self/mountinfo").splitlines()
    root = [row.split() for row in mi if row.split()[4] == "/"][0]
    assert root[2] == k.read("class/block/nvme0n1p2/dev").strip()
    assert "/dev/nvme0n1p3" in k.proc_read("swaps")
    assert k.proc_read("net/route").splitlines()[1].split()[:2] == ["enp3s0", "00000000"]
    assert "IR-PCI-MSI" in k.proc_read("interrupts")
    assert "vfio_pci" in k.proc_read("modules")
    raises_errno(errno.ENOENT, k.proc_read, "nosuch")
    assert k.dev_exists("nvme0n1p2") and k.dev_exists("vfio/vfio") and not k.dev_exists("vfio/1")


def test_route_disappears_with_the_nic_driver():
    k = SimKernel.from_file(TOPOLOGIES / "desktop_gpu.json")
    k.write("bus/pci/drivers/r8169/unbind", "0000:03:00.0")
    assert len(k.proc_read("net/route").splitlines()) == 1
    assert not k.exists("class/net/enp3s0")
    # mounts stay, the block device node goes
    k.write("bus/pci/drivers/nvme/unbind", "0000:02:00.0")
    assert " / " in k.proc_read("self/mountinfo")
    assert not k.exists("dev/block/259:2")


# ----- fault injection -----------------------------------------------------------------------------

def test_fail_writes_counts_globs_and_values():
    k = lab()
    k.fail_writes("drivers_probe", errno.EIO, count=2)
    raises_errno(errno.EIO, k.write, "bus/pci/drivers_probe", NIC1)
    raises_errno(errno.EIO, k.write, "bus/pci/drivers_probe", NIC1)
    k.write("bus/pci/drivers_probe", NIC1)
    k.fail_writes("bus/pci/devices/*/driver_override", "EPERM", count=None)
    raises_errno(errno.EPERM, k.write, dev(NIC1, "driver_override"), "vfio-pci")
    raises_errno(errno.EPERM, k.write, dev(NIC2A, "driver_override"), "vfio-pci")
    k.clear_faults()
    k.fail_writes("unbind", errno.EIO, value=NIC2A)
    k.write("bus/pci/drivers/e1000e/unbind", NIC1)
    raises_errno(errno.EIO, k.write, "bus/pci/drivers/e1000e/unbind", NIC2A)
    assert k.driver(NIC2A) == "e1000e"                          # a failed write changes nothing
    assert k.write_log[-1] == ("bus/pci/drivers/e1000e/unbind", NIC2A)


def test_hang_writes_until_released_then_complete():
    k = lab()
    k.hang_writes("*/e1000e/unbind")
    done = threading.Event()
    t = threading.Thread(target=lambda: (k.write("bus/pci/drivers/e1000e/unbind", NIC1), done.set()),
                         daemon=True)
    t.start()
    deadline = time.monotonic() + 2
    while k.hanging_writes() == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert k.hanging_writes() == 1 and not done.is_set()
    k.write(dev(NIC2A, "driver_override"), "vfio-pci")         # other writes go on
    assert k.driver(NIC1) == "e1000e"
    k.release_hangs()
    assert done.wait(2)
    assert k.driver(NIC1) is None


def test_delay_writes():
    k = lab()
    k.delay_writes("drivers_probe", 0.1, count=1)
    t0 = time.monotonic()
    k.write("bus/pci/drivers_probe", NIC1)
    assert time.monotonic() - t0 >= 0.09


def test_write_log_and_state():
    k = lab()
    to_vfio(k, NIC1)
    assert k.write_log == [(dev(NIC1, "driver_override"), "vfio-pci"),
                           ("bus/pci/drivers/e1000e/unbind", NIC1),
                           ("bus/pci/drivers_probe", NIC1)]
    assert k.writes_to("drivers_probe") == [("bus/pci/drivers_probe", NIC1)]
    assert k.state()[NIC1] == ("vfio-pci", "vfio-pci")


def test_concurrent_writers_are_serialised():
    k = lab()
    nics = [NIC1, NIC2A, NIC2B, "0000:09:00.0"]
    errors = []

    def flip(bdf):
        try:
            for _ in range(8):
                to_vfio(k, bdf)
                k.write(dev(bdf, "driver_override"), "\n")
                k.write("bus/pci/drivers/vfio-pci/unbind", bdf)
                k.write("bus/pci/drivers_probe", bdf)
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=flip, args=(b,)) for b in nics]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(k.driver(b) == "e1000e" for b in nics)


# ----- the spec ------------------------------------------------------------------------------------

@pytest.mark.parametrize("mutate, message", [
    (lambda s: s.update(bogus=1), "unknown key 'bogus'"),
    (lambda s: s["devices"][1].update(driver="e1000"), "unknown driver 'e1000'"),
    (lambda s: s["devices"][1].pop("group"), "missing group"),
    (lambda s: s["devices"].append(dict(s["devices"][1], address="01:00.0", net=[])), "duplicate address"),
    (lambda s: s["devices"][1].update(address="0000:01:00.8"), "not a PCI address"),
    (lambda s: s["devices"][1].update({"class": "0200"}), "class must be 6 hex digits"),
    (lambda s: s["devices"][1].update(vendor="80z6"), "vendor must be hex"),
    (lambda s: s["devices"][1].update(driver_override="vfio pci"), "bad driver_override"),
    (lambda s: s["devices"][1].update(driver_override="vfio-pci"), None),   # a half-done rebind is a real state
    (lambda s: s["devices"][1].update(boot_vga=True), "not VGA"),
    (lambda s: s["devices"][1].update(driver=None), "need the device bound"),
    (lambda s: s.update(iommu=False), "has a group but iommu is false"),
    (lambda s: s.update(default_route="eth9"), "unknown interface 'eth9'"),
    (lambda s: s.update(mounts=[{"block": "sdz", "mountpoint": "/"}]), "unknown block device 'sdz'"),
    (lambda s: s["drivers"].update(x={"ids": ["8086"]}), "not vendor:device"),
    (lambda s: s["devices"][1].update(sriov={"totalvfs": 2, "vf_device": "10d4", "numvfs": 3}), "numvfs must be"),
    (lambda s: s["devices"][1].update(sriov={"totalvfs": 2, "offset": 65535}), "past bus ff"),
    (lambda s: s["devices"][0].update(secondary_bus=0), "secondary_bus"),
    (lambda s: s["devices"][1].update(driver="vfio-pci", net=[]), None),
])
def test_bad_specs_fail_with_one_line(mutate, message):
    spec = minimal()
    mutate(spec)
    if message is None:
        SimKernel(spec)                       # sanity: a valid variation loads
        return
    with pytest.raises(ConfigError) as ei:
        SimKernel(spec)
    assert message in str(ei.value) and "\n" not in str(ei.value)


def test_vf_collision_with_an_existing_device_is_reported():
    spec = json.loads((TOPOLOGIES / "lab.json").read_text())
    spec["devices"].append({"address": "0000:03:00.5", "vendor": "8086", "device": "10d3", "class": "020000",
                            "group": 30})
    with pytest.raises(ConfigError, match="VF 4 would be at 0000:03:00.5"):
        SimKernel(spec)


def test_from_file_toml_and_errors(tmp_path):
    p = tmp_path / "t.toml"
    p.write_text('''
iommu = true
[drivers.e1000e]
ids = ["8086:10d3"]
[[devices]]
address = "0000:00:19.0"
vendor = "8086"
device = "10d3"
class = "020000"
group = 3
driver = "e1000e"
net = ["eno1"]
''')
    k = SimKernel.from_file(p)
    assert k.state() == {"0000:00:19.0": ("e1000e", None)}
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        SimKernel.from_file(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        SimKernel.from_file(tmp_path / "missing.json")
    bad.write_text('{"devices": [{"address": "0000:00:19.0"}]}')
    with pytest.raises(ConfigError, match=r"bad.json: topology spec: devices\[0\] \(0000:00:19.0\): missing vendor"):
        SimKernel.from_file(bad)


def test_empty_kernel_has_the_builtin_drivers():
    k = SimKernel()
    assert sorted(k.listdir("bus/pci/drivers")) == ["pci-stub", "pcieport", "vfio-pci"]
    assert k.listdir("bus/pci/devices") == []
