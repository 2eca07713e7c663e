"""First lab tests: the L1 kernel really has what hostdevd relies on.

These assert real kernel state inside the nested VM (IOMMU, vfio-pci, IOMMU
groups, sysfs driver binding) and that the hostdevd venv is usable there.
"""
import pytest

pytestmark = pytest.mark.lab

SYS = "/sys/bus/pci/devices"


def _wait_driver(lab, bdf, want, timeout=20):
    """Poll (inside L1) until bdf is bound to `want` ('none' = unbound); return the driver seen."""
    r = lab.run(
        f'd={SYS}/{bdf}; end=$((SECONDS + {timeout:d})); '
        'drv() { [ -e "$d/driver" ] && basename "$(readlink "$d/driver")" || echo none; }; '
        f'while [ "$(drv)" != "{want}" ] && [ $SECONDS -lt $end ]; do sleep 0.1; done; drv',
        timeout=timeout + 10)
    return r.stdout.strip()


def test_iommu_present_and_groups_exist(lab):
    units = lab.run("ls /sys/class/iommu", timeout=10).stdout.split()
    assert units, "/sys/class/iommu is empty: no IOMMU in L1"
    assert any(u.startswith("dmar") for u in units), units
    groups = lab.run("ls /sys/kernel/iommu_groups", timeout=10).stdout.split()
    assert len(groups) >= 10, groups
    cmdline = lab.run("cat /proc/cmdline", timeout=10).stdout
    assert "intel_iommu=on" in cmdline


def test_vfio_pci_loaded(lab):
    r = lab.run("ls -d /sys/module/vfio /sys/module/vfio_pci /sys/module/vfio_iommu_type1 "
                "/sys/bus/pci/drivers/vfio-pci && test -c /dev/vfio/vfio", timeout=10, check=False)
    assert r.rc == 0, r


def test_topology_resolves_every_device(lab):
    topo = lab.topology()
    for name in ("nic1", "nvme1", "nvme_pf", "nic2a", "nic2b", "pcibr", "nic3a", "nic3b",
                 "swup", "swdn1", "swdn2", "nic4a", "nic4b"):
        assert topo[name].startswith("0000:"), (name, topo)
    assert lab.pci_info(topo["nic1"])["driver"] == "e1000e"
    assert lab.pci_info(topo["nic3a"])["driver"] == "e1000"
    assert lab.pci_info(topo["nvme_pf"])["driver"] == "nvme"


def test_nic1_is_alone_in_its_group(lab):
    nic1 = lab.topology()["nic1"]
    info = lab.pci_info(nic1)
    assert info["group_members"] == [nic1]


def test_multifunction_pair_shares_one_group(lab):
    topo = lab.topology()
    a, b = lab.pci_info(topo["nic2a"]), lab.pci_info(topo["nic2b"])
    assert a["iommu_group"] is not None
    assert a["iommu_group"] == b["iommu_group"]
    assert a["group_members"] == sorted([topo["nic2a"], topo["nic2b"]])
    # same slot, functions 0 and 1
    assert topo["nic2a"][:-1] == topo["nic2b"][:-1]
    assert (topo["nic2a"][-1], topo["nic2b"][-1]) == ("0", "1")


def test_pci_bridge_group_contains_bridge_and_both_nics(lab):
    topo = lab.topology()
    info = lab.pci_info(topo["nic3a"])
    assert info["group_members"] == sorted([topo["pcibr"], topo["nic3a"], topo["nic3b"]])


def test_raw_sysfs_moves_nic1_to_vfio_and_back(lab):
    nic1 = lab.topology()["nic1"]
    group = lab.pci_info(nic1)["iommu_group"]
    assert _wait_driver(lab, nic1, "e1000e", timeout=1) == "e1000e"
    try:
        lab.run(f"echo vfio-pci > {SYS}/{nic1}/driver_override && "
                f"echo {nic1} > {SYS}/{nic1}/driver/unbind && "
                f"echo {nic1} > /sys/bus/pci/drivers_probe", timeout=30)
        assert _wait_driver(lab, nic1, "vfio-pci") == "vfio-pci"
        info = lab.pci_info(nic1)
        assert info["driver"] == "vfio-pci"
        assert info["driver_override"] == "vfio-pci"
        lab.run(f"test -c /dev/vfio/{group:d}", timeout=10)
    finally:
        lab.run(f"if [ -e {SYS}/{nic1}/driver ]; then echo {nic1} > {SYS}/{nic1}/driver/unbind; fi; "
                f"echo > {SYS}/{nic1}/driver_override; "
                f"echo {nic1} > /sys/bus/pci/drivers_probe", timeout=30, check=False)
    assert _wait_driver(lab, nic1, "e1000e") == "e1000e"
    info = lab.pci_info(nic1)
    assert info["driver"] == "e1000e"
    assert info["driver_override"] is None


def test_hostdevd_venv_imports_hostdevd(lab):
    r = lab.run(["/opt/hostdevd/bin/python", "-c",
                 "import hostdevd, sys; print(hostdevd.__path__[0]); print(sys.prefix)"], timeout=60)
    path, prefix = r.stdout.split()
    assert path.startswith("/opt/hostdevd/lib/python3.11/site-packages/hostdevd"), path
    assert prefix == "/opt/hostdevd"
    # runtime dependencies: wheels (pydantic, pyudev, pyroute2) and Debian packages
    # through --system-site-packages (libvirt, lxml, systemd)
    lab.run(["/opt/hostdevd/bin/python", "-c",
             "import pydantic, pyudev, pyroute2, libvirt, lxml.etree, systemd.journal; "
             "assert pydantic.VERSION.startswith('2.'), pydantic.VERSION"], timeout=60)
    # console scripts from [project.scripts]
    lab.run("test -x /opt/hostdevd/bin/hostdevctl && test -x /opt/hostdevd/bin/hostdevd", timeout=10)
