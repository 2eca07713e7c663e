"""Sysfs against the simulated kernel (reads, host-critical devices, timed writes), and
RealHost against a real directory tree of files and symlinks."""
from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import pytest

from hostdevd.core.address import PciAddress
from hostdevd.core.errors import SysfsError, SysfsTimeout
from hostdevd.core.sysfs import RealHost, Sysfs
from hostdevd.core.topology import from_sysfs, refresh_groups
from hostdevd.sim.materialize import write_sys_tree
from hostdevd.sim.simkernel import SimKernel

TOPOLOGIES = Path(__file__).resolve().parent.parent / "topologies"
A = PciAddress.parse


def load(name: str, **kw) -> tuple[SimKernel, Sysfs]:
    k = SimKernel.from_file(TOPOLOGIES / name)
    return k, Sysfs(k, **kw)


# ----- reads -------------------------------------------------------------------------------------

def test_read_device_fields_lab():
    k, s = load("lab.json")
    nic = s.read_device(A("0000:01:00.0"))
    assert (nic.vendor, nic.device, nic.pci_class, nic.header_type) == ("8086", "10d3", "020000", 0)
    assert (nic.driver, nic.driver_override, nic.group) == ("e1000e", None, 12)
    assert nic.net == ["enp1s0"] and nic.reset_method == ["flr"] and nic.has_reset
    assert not nic.has_vfio_dev and nic.physfn is None and nic.sriov_totalvfs is None
    rp = s.read_device(A("0000:00:02.0"))
    assert rp.header_type == 1 and rp.driver == "pcieport" and not rp.has_reset
    nic4b = s.read_device(A("0000:0a:00.0"))
    assert nic4b.driver_override == "e1000e"
    pf = s.read_device(A("0000:03:00.0"))
    assert (pf.sriov_totalvfs, pf.sriov_numvfs, pf.sriov_drivers_autoprobe) == (16, 0, False)
    virtio_net = s.read_device(A("0000:00:11.0"))
    assert virtio_net.net == []            # as on a real VM: the netdev lives under virtioN
    with pytest.raises(SysfsError, match="does not exist"):
        s.read_device(A("0000:42:00.0"))


def test_read_device_vfs_and_vfio():
    k, s = load("lab.json")
    pf = A("0000:03:00.0")
    s.set_sriov_numvfs(pf, 3)
    raw = s.read_device(pf)
    assert raw.sriov_numvfs == 3
    assert raw.virtfns == [A("0000:03:00.1"), A("0000:03:00.2"), A("0000:03:00.3")]
    vf = s.read_device(A("0000:03:00.2"))
    assert vf.physfn == pf and vf.group == 21 and vf.driver is None
    a = A("0000:03:00.2")
    s.set_driver_override(a, "vfio-pci")
    s.drivers_probe(a)
    vf = s.read_device(a)
    assert vf.driver == "vfio-pci" and vf.has_vfio_dev   # kernel 6.1+: vfio-dev/ for every vfio driver
    assert s.vfio_group_node_exists(21) and not s.vfio_group_node_exists(22)
    k.open_group(21)
    assert s.vfio_group_users(21) == 1


def test_boot_vga_and_gpu_functions():
    k, s = load("gpu_4fn.json")
    gpu = s.read_device(A("0000:01:00.0"))
    assert gpu.device == "1e87" and not gpu.boot_vga
    assert s.read_device(A("0000:04:00.0")).boot_vga
    assert [str(m) for m in s.iommu_groups()[1]] == [
        "0000:00:01.1", "0000:01:00.0", "0000:01:00.1", "0000:01:00.2", "0000:01:00.3"]
    assert s.driver(A("0000:01:00.3")) == "nvidia-gpu"
    assert s.module_loaded("i2c_nvidia_gpu") and s.module_loaded("xhci-pci")


@pytest.mark.parametrize("name", sorted(p.name for p in TOPOLOGIES.glob("*.json")))
def test_iommu_groups_match_the_simulation(name):
    k, s = load(name)
    assert {g: [str(a) for a in m] for g, m in s.iommu_groups().items()} == k.groups()
    assert s.iommu_active() == (name != "no_iommu.json")
    assert [str(a) for a in s.device_addresses()] == list(k.state())


def test_platform_facts():
    k, s = load("lab.json")
    assert s.iommu_units() == ["dmar0"]
    assert s.interrupt_remapping() is True
    assert s.unsafe_interrupts_allowed() is False
    assert s.module_loaded("vfio-pci") and s.module_loaded("vfio_iommu_type1")
    assert s.driver_loaded("vfio-pci") and not s.driver_loaded("igb")
    k2, s2 = load("no_iommu.json")
    assert not s2.iommu_active() and s2.iommu_units() == [] and s2.interrupt_remapping() is False
    assert s2.iommu_group(A("0000:00:19.0")) is None


# ----- host-critical devices (R3) ----------------------------------------------------------------

CRITICAL = {
    "desktop_gpu.json": {"0000:02:00.0": "mounted", "0000:03:00.0": "default route", "0000:00:02.0": "boot VGA"},
    "gpu_4fn.json": {"0000:02:00.0": "mounted", "0000:03:00.0": "default route", "0000:04:00.0": "boot VGA"},
    "chipset_group.json": {"0000:00:17.0": "mounted", "0000:00:1f.6": "default route", "0000:01:00.0": "boot VGA"},
    "dual_port_nic.json": {"0000:02:00.0": "mounted", "0000:00:1f.6": "default route", "0000:00:02.0": "boot VGA"},
    "sriov_pf.json": {"0000:02:00.0": "mounted", "0000:00:1f.6": "default route"},
    "no_iommu.json": {"0000:00:17.0": "mounted", "0000:00:19.0": "default route", "0000:01:00.0": "boot VGA"},
    "lab.json": {"0000:00:10.0": "mounted", "0000:00:11.0": "default route", "0000:00:12.0": "host agent",
                 "0000:00:13.0": "9p share 'src'"},
}


@pytest.mark.parametrize("name", sorted(CRITICAL))
def test_host_critical(name):
    _, s = load(name)
    found = {str(a): r for a, r in s.host_critical().items()}
    assert set(found) == set(CRITICAL[name])
    for a, word in CRITICAL[name].items():
        assert word in found[a]


def test_host_critical_through_dm_swap_bridge_and_bond():
    spec = json.loads((TOPOLOGIES / "dual_port_nic.json").read_text())
    spec["devices"].append({"address": "0000:00:17.0", "vendor": "8086", "device": "a282", "class": "010601",
                            "group": 9, "driver": "ahci", "block": ["sda", "sda1"]})
    spec["drivers"]["ahci"] = {"ids": ["*:*:010601"]}
    spec["dm"] = [{"name": "dm-0", "slaves": ["nvme0n1p2"]}, {"name": "dm-1", "slaves": ["sda1"]}]
    spec["mounts"] = [{"block": "dm-0", "mountpoint": "/", "fstype": "ext4"}]
    spec["swaps"] = ["dm-1"]
    spec["virtual_net"] = [{"name": "bond0", "lower": ["enp1s0f0", "enp1s0f1"]},
                           {"name": "br0", "brif": ["bond0"]}]
    spec["default_route"] = "br0"
    k = SimKernel(spec)
    s = Sysfs(k)
    assert k.listdir("class/block/dm-0/slaves") == ["nvme0n1p2"]
    found = {str(a): r for a, r in s.host_critical().items()}
    assert "mounted filesystem (/)" in found["0000:02:00.0"]
    assert "swap device /dev/dm-1" in found["0000:00:17.0"]
    assert "default route (br0)" in found["0000:01:00.0"] and "default route (br0)" in found["0000:01:00.1"]
    assert "0000:00:1f.6" not in found


def test_ipv6_default_route():
    spec = json.loads((TOPOLOGIES / "sriov_pf.json").read_text())
    spec["default_route"] = None
    spec["default_route6"] = "enp3s0f0"
    s = Sysfs(SimKernel(spec))
    assert s.default_route_interfaces() == ["enp3s0f0"]
    assert "default route" in s.host_critical()[A("0000:03:00.0")]


def test_topology_from_simulated_sysfs():
    _, s = load("chipset_group.json")
    topo = from_sysfs(s)
    g7 = topo.group_members(7)
    assert [d.address for d in g7 if d.bridge] == [A("0000:00:1c.0")]
    assert not any(d.viable_for_vfio for d in g7 if not d.bridge)
    assert topo.critical[A("0000:00:17.0")].startswith("controller of a mounted filesystem")


class _ConfigUnreadable:
    """The simulated kernel with every config space unreadable."""

    def __init__(self, k: SimKernel):
        self.k = k

    def __getattr__(self, name: str):
        return getattr(self.k, name)

    def read_bytes(self, rel: str, size: int) -> bytes:
        raise PermissionError(errno.EACCES, "Permission denied")


def test_read_device_decides_bridge_by_header_type_then_class():
    k, s = load("lab.json")
    rp, nic = s.read_device(A("0000:00:02.0")), s.read_device(A("0000:01:00.0"))
    assert (rp.header_type, rp.bridge, nic.header_type, nic.bridge) == (1, True, 0, False)
    blind = Sysfs(_ConfigUnreadable(k))
    rp, nic = blind.read_device(A("0000:00:02.0")), blind.read_device(A("0000:01:00.0"))
    assert rp.pci_class.startswith("0604") and (rp.header_type, rp.bridge) == (None, True)
    assert (nic.header_type, nic.bridge) == (None, False)


def test_refresh_groups_rereads_members_and_keeps_the_scan_facts():
    _, s = load("lab.json")
    topo = from_sysfs(s)
    a = A("0000:01:00.0")                                      # e1000e, group 12
    topo.devices[a].name = "from the scan"
    s.set_driver_override(a, "vfio-pci")
    s.unbind(a)
    s.drivers_probe(a)
    fresh = refresh_groups(topo, s, {12})
    d = fresh.devices[a]
    assert (d.driver, d.driver_override, d.has_vfio_dev) == ("vfio-pci", "vfio-pci", True)
    assert (d.bridge, d.group, d.name, d.header_type) == (False, 12, "from the scan", 0)
    assert topo.devices[a].driver == "e1000e"                  # the scan itself is not changed
    assert all(fresh.devices[b] is topo.devices[b] for b in topo.devices if topo.devices[b].group != 12)


# ----- writes ------------------------------------------------------------------------------------

def test_sysfs_write_sequence_and_errors():
    k, s = load("lab.json")
    a = A("0000:04:00.0")
    s.set_driver_override(a, "vfio-pci")
    s.unbind(a)
    s.drivers_probe(a)
    assert s.driver(a) == "vfio-pci" and s.driver_override(a) == "vfio-pci"
    s.set_driver_override(a, None)
    assert s.driver_override(a) is None
    with pytest.raises(SysfsError, match=r"failed for device 0000:04:00.1: ENODEV") as ei:
        s.bind(A("0000:04:00.1"), "e1000")
    assert ei.value.path == "bus/pci/drivers/e1000/bind"
    with pytest.raises(SysfsError, match="EBUSY"):
        s.bind(A("0000:04:00.1"), "e1000e")
    s.reset(a)
    assert k.reset_count("0000:04:00.0") == 1
    s.unbind(a)
    s.unbind(a)                                   # no driver: nothing to do
    s.bind(a, "e1000e")
    assert k.state()["0000:04:00.0"] == ("e1000e", None)
    pf = A("0000:03:00.0")
    s.set_sriov_drivers_autoprobe(pf, True)
    s.set_sriov_numvfs(pf, 2)
    with pytest.raises(SysfsError, match="EBUSY"):
        s.set_sriov_numvfs(pf, 4)
    with pytest.raises(SysfsError, match="ERANGE"):
        s.set_sriov_numvfs(pf, 17)


def test_injected_failure_reaches_the_caller_as_sysfs_error():
    k, s = load("lab.json")
    k.fail_writes("drivers_probe", errno.EIO)
    a = A("0000:01:00.0")
    with pytest.raises(SysfsError, match="EIO") as ei:
        s.drivers_probe(a)
    assert not isinstance(ei.value, SysfsTimeout)
    s.drivers_probe(a)


def test_write_timeout_names_the_device_and_other_writes_go_on():
    k, s = load("lab.json", write_timeout=0.2)
    nic1, nic2a = A("0000:01:00.0"), A("0000:04:00.0")
    k.hang_writes("*/e1000e/unbind", value=str(nic1))
    t0 = time.monotonic()
    with pytest.raises(SysfsTimeout) as ei:
        s.unbind(nic1)
    assert 0.15 < time.monotonic() - t0 < 2
    assert "0000:01:00.0" in str(ei.value) and ei.value.path == "bus/pci/drivers/e1000e/unbind"
    # the simulation is not wedged: other devices' writes complete
    s.set_driver_override(nic2a, "vfio-pci")
    s.unbind(nic2a)
    s.drivers_probe(nic2a)
    assert s.driver(nic2a) == "vfio-pci"
    assert s.driver(nic1) == "e1000e"
    # once the kernel lets go, the abandoned write completes, as it would on a real host
    k.release_hangs()
    deadline = time.monotonic() + 2
    while s.driver(nic1) is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert s.driver(nic1) is None


def test_open_group_and_vfio_unbind_under_sysfs_timeout():
    spec = json.loads((TOPOLOGIES / "lab.json").read_text())
    spec["open_group_unbind"] = "block"
    k = SimKernel(spec)
    s = Sysfs(k, write_timeout=0.2)
    a = A("0000:01:00.0")
    s.set_driver_override(a, "vfio-pci")
    s.unbind(a)
    s.drivers_probe(a)
    k.open_group(12)
    with pytest.raises(SysfsTimeout, match="0000:01:00.0"):
        s.unbind(a)
    k.close_group(12)
    deadline = time.monotonic() + 2
    while s.driver(a) is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert s.driver(a) is None


# ----- RealHost on a real directory tree ------------------------------------------------------------

def materialize(k: SimKernel, root: Path) -> None:
    """Write the simulated /sys, /proc files and /dev nodes as real files and symlinks."""
    write_sys_tree(k, root / "sys")
    proc = root / "proc"
    for name in ("interrupts", "self/mountinfo", "swaps", "net/route", "net/ipv6_route"):
        (proc / name).parent.mkdir(parents=True, exist_ok=True)
        (proc / name).write_text(k.proc_read(name))
    (root / "dev" / "vfio").mkdir(parents=True)


@pytest.mark.parametrize("name", ["lab.json", "desktop_gpu.json", "sriov_pf.json", "no_iommu.json"])
def test_realhost_reads_a_materialized_tree_like_the_simulation(tmp_path, name):
    k = SimKernel.from_file(TOPOLOGIES / name)
    if name == "sriov_pf.json":
        k.write("bus/pci/devices/0000:03:00.0/sriov_numvfs", "3")
    materialize(k, tmp_path)
    real = Sysfs(RealHost(str(tmp_path / "sys"), str(tmp_path / "proc"), str(tmp_path / "dev")))
    sim = Sysfs(k)
    assert real.device_addresses() == sim.device_addresses()
    assert real.iommu_groups() == sim.iommu_groups()
    for a in sim.device_addresses():
        assert real.read_device(a) == sim.read_device(a)
    assert real.host_critical() == sim.host_critical()
    assert real.interrupt_remapping() == sim.interrupt_remapping()
    assert real.iommu_units() == sim.iommu_units()
    assert from_sysfs(real).to_json() == from_sysfs(sim).to_json()
    for a in sim.device_addresses():
        rel = f"bus/pci/devices/{a}"
        assert real.backend.realpath(rel) == str(tmp_path / "sys") + k.realpath(rel)[len("/sys"):]


def test_realhost_file_operations(tmp_path):
    sys_root, proc, dev = tmp_path / "sys", tmp_path / "proc", tmp_path / "dev"
    d = sys_root / "devices/pci0000:00/0000:00:02.0/0000:01:00.0"
    d.mkdir(parents=True)
    (sys_root / "bus/pci/devices").mkdir(parents=True)
    (sys_root / "bus/pci/drivers/e1000e").mkdir(parents=True)
    (sys_root / "kernel/iommu_groups/12/devices").mkdir(parents=True)
    (d / "vendor").write_text("0x8086\n")
    (d / "driver_override").write_text("(null)\n")
    (d / "config").write_bytes(bytes(14) + b"\x80" + bytes(241))
    os.symlink("../../../devices/pci0000:00/0000:00:02.0/0000:01:00.0", sys_root / "bus/pci/devices/0000:01:00.0")
    os.symlink("../../../../bus/pci/drivers/e1000e", d / "driver")
    os.symlink("../../../../kernel/iommu_groups/12", d / "iommu_group")
    os.symlink("../../../../devices/pci0000:00/0000:00:02.0/0000:01:00.0",
               sys_root / "kernel/iommu_groups/12/devices/0000:01:00.0")
    os.symlink("nowhere", d / "dangling")
    h = RealHost(str(sys_root), str(proc), str(dev))
    rel = "bus/pci/devices/0000:01:00.0"
    assert h.read(f"{rel}/vendor") == "0x8086\n"
    assert h.read_bytes(f"{rel}/config", 64)[0x0E] == 0x80
    assert h.readlink(f"{rel}/driver") == "../../../../bus/pci/drivers/e1000e"
    assert h.listdir("kernel/iommu_groups/12/devices") == ["0000:01:00.0"]
    assert h.exists(f"{rel}/dangling") and not h.exists(f"{rel}/nosuch")
    assert h.realpath(rel) == str(d)
    h.write(f"{rel}/driver_override", "vfio-pci")
    assert (d / "driver_override").read_text() == "vfio-pci"
    with pytest.raises(FileNotFoundError):
        h.read(f"{rel}/reset")
    s = Sysfs(h)
    assert s.driver(A("0000:01:00.0")) == "e1000e"
    assert s.iommu_group(A("0000:01:00.0")) == 12
    assert s.header_type(A("0000:01:00.0")) == 0
    assert s.iommu_groups() == {12: [A("0000:01:00.0")]}


def test_realhost_proc_mountinfo_and_vfio_users(tmp_path):
    sys_root, proc, dev = tmp_path / "sys", tmp_path / "proc", tmp_path / "dev"
    nvme = sys_root / "devices/pci0000:00/0000:00:1d.0/0000:02:00.0/nvme/nvme0/nvme0n1"
    (nvme / "nvme0n1p2").mkdir(parents=True)
    (sys_root / "class/block").mkdir(parents=True)
    (sys_root / "dev/block").mkdir(parents=True)
    target = "../../devices/pci0000:00/0000:00:1d.0/0000:02:00.0/nvme/nvme0/nvme0n1/nvme0n1p2"
    os.symlink(target, sys_root / "class/block/nvme0n1p2")
    os.symlink(target, sys_root / "dev/block/259:2")
    (proc / "self").mkdir(parents=True)
    (proc / "self/mountinfo").write_text(
        "22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw\n"
        "23 22 0:22 / /sys rw,nosuid shared:2 - sysfs sysfs rw\n")
    (proc / "swaps").write_text("Filename\tType\tSize\tUsed\tPriority\n")
    (dev / "vfio").mkdir(parents=True)
    (dev / "vfio/12").write_text("")
    for pid, fds in (("100", ["/dev/vfio/12", "/dev/null"]), ("200", [str(dev / "vfio/12")]), ("300", [])):
        fd_dir = proc / pid / "fd"
        fd_dir.mkdir(parents=True)
        for i, t in enumerate(fds):
            os.symlink(t, fd_dir / str(i))
    h = RealHost(str(sys_root), str(proc), str(dev))
    s = Sysfs(h)
    assert s.host_critical() == {A("0000:02:00.0"): "controller of a mounted filesystem (/)"}
    assert s.vfio_group_node_exists(12) and not s.vfio_group_node_exists(13)
    # RealHost compares the fd link with <dev_root>/vfio/<N>
    assert h.vfio_group_users(12) == 1
    assert s.interrupt_remapping() is None        # no /proc/interrupts in this tree
