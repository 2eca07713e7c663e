"""R14 device cdevs and iommufd: QEMU with iommufd opens /dev/vfio/devices/vfioN (never /dev/vfio/N),
so release, refcounting, reconciliation and the topology count both; `hostdevctl check` says whether
iommufd is usable."""
from __future__ import annotations

import errno
import json
import os
import threading

import pytest

from hostdevd.core.address import PciAddress as A
from hostdevd.core.checks import run_checks
from hostdevd.core.errors import ExecutionFailed, SysfsError
from hostdevd.core.ledger import Ledger, Owner
from hostdevd.core.reconcile import reconcile
from hostdevd.core.sysfs import RealHost, Sysfs
from hostdevd.sim.simkernel import SimKernel

from .conftest import TOPOLOGIES, load_sim, make_engine

VM1 = Owner(name="vm1", uuid="00000000-0000-0000-0000-000000000001")
PAIR, PAIR_B = A.parse("0000:04:00.0"), A.parse("0000:04:00.1")     # lab group 15


@pytest.fixture
def sim() -> SimKernel:
    return load_sim("lab")


@pytest.fixture
def eng(sim, tmp_path):
    return make_engine(sim, tmp_path / "state")


def _cdev(eng, addr: A) -> str:
    name = eng.sysfs.vfio_cdev(addr)
    assert name is not None and name.startswith("vfio")
    return f"/dev/vfio/devices/{name}"


# --------------------------------------------------------------------------- the simulated kernel


def test_a_device_cdev_is_counted_and_excludes_the_group_node(eng, sim):
    eng.prepare([PAIR], VM1)
    s = eng.sysfs
    node = _cdev(eng, PAIR)
    assert s.vfio_cdev_node_exists(node.rsplit("/", 1)[1]) and s.iommufd_node_exists()
    assert s.vfio_users(15) == 0 and s.vfio_open_nodes(15) == {}
    sim.open_device(PAIR)
    assert s.vfio_open_nodes(15) == {node: 1} and s.vfio_users(15) == 1
    assert s.vfio_group_users(15) == 0                     # the legacy count alone misses it
    with pytest.raises(OSError) as e:
        sim.open_group(15)                                 # vfio_group_fops_open: cdev in use
    assert e.value.errno == errno.EBUSY
    sim.close_device(PAIR)
    sim.open_group(15)
    with pytest.raises(OSError) as e:
        sim.open_device(PAIR)                              # vfio_device_block_group: group in use
    assert e.value.errno == errno.EBUSY
    sim.close_group(15)


def test_an_open_cdev_keeps_the_device_and_its_group_from_host_drivers(eng, sim):
    eng.prepare([PAIR], VM1)
    sim.open_device(PAIR)
    with pytest.raises(SysfsError, match="EBUSY"):
        eng.sysfs.unbind(PAIR)                             # vfio's remove() waits for the user
    s = eng.sysfs
    s.set_driver_override(PAIR_B, None)
    s.unbind(PAIR_B)                                       # its own cdev is closed: it may leave
    s.drivers_probe(PAIR_B)
    assert sim.driver(PAIR_B) is None                      # e1000e's probe: EBUSY, the group's DMA is owned
    sim.close_device(PAIR)
    s.drivers_probe(PAIR_B)
    assert sim.driver(PAIR_B) == "e1000e"


# --------------------------------------------------------------------------- release and reconcile


def test_release_refuses_while_only_a_cdev_is_open_and_proceeds_once_it_closes(eng, sim):
    before = sim.state()
    eng.prepare([PAIR], VM1)
    node = _cdev(eng, PAIR_B)
    sim.open_device(PAIR_B)
    topo = eng.topology()
    assert topo.group_users == {15: 1}
    assert any("still open (1 users)" in w for w in eng.plan_release(VM1).warnings)
    with pytest.raises(ExecutionFailed) as e:
        eng.release(VM1)
    assert f"{node} is still open" in str(e.value)
    claim = eng.ledger().claim_for_group(15)
    assert claim.state == "failed" and sim.driver(PAIR) == sim.driver(PAIR_B) == "vfio-pci"
    sim.close_device(PAIR_B)
    eng.release(VM1)
    assert sim.state() == before and eng.ledger().claims == {}


def test_release_waits_for_the_cdev_to_close(sim, tmp_path):
    eng = make_engine(sim, tmp_path / "state")
    eng.executor.release_wait = 5.0
    eng.prepare([PAIR], VM1)
    sim.open_device(PAIR)
    closer = threading.Timer(0.3, sim.close_device, args=(PAIR,))
    closer.start()
    try:
        eng.release(VM1)
    finally:
        closer.join()
    assert sim.driver(PAIR) == "e1000e" and eng.ledger().claims == {}


def test_reconcile_leaves_a_gone_domains_group_while_a_cdev_is_open(eng, sim):
    eng.prepare([PAIR], VM1)
    sim.open_device(PAIR)                                  # an iommufd QEMU hostdevd did not see stop
    report = reconcile(eng, [])
    assert report.released == [] and _cdev(eng, PAIR) in report.skipped[0]
    assert eng.ledger().claim_for_group(15).state == "active"
    sim.close_device(PAIR)
    report = reconcile(eng, [])
    assert report.released and eng.ledger().claims == {}


class Crash(BaseException):
    """The daemon died here (the executor's rollback catches Exception only)."""


def test_reconcile_leaves_a_half_release_while_a_cdev_is_open(sim, tmp_path):
    eng = make_engine(sim, tmp_path / "state")
    eng.prepare([PAIR], VM1)

    def crash(name):
        if name.startswith("restore:"):
            raise Crash(name)

    eng.executor.on_step = crash
    with pytest.raises(Crash):
        eng.release(VM1)
    sim.open_device(PAIR)                                  # QEMU (iommufd) got the device again somehow
    eng = make_engine(sim, tmp_path / "state")             # the restarted daemon
    report = reconcile(eng, None)
    assert eng.ledger().claim_for_group(15).state == "releasing"
    assert any(f"{_cdev(eng, PAIR)} is open" in n for n in report.skipped)
    sim.close_device(PAIR)
    reconcile(eng, None)
    assert eng.ledger().claims == {} and sim.driver(PAIR) == "e1000e"


def test_realhost_counts_group_and_cdev_opens_in_one_pass(tmp_path):
    sys_root, proc, dev = tmp_path / "sys", tmp_path / "proc", tmp_path / "dev"
    d = sys_root / "devices/pci0000:00/0000:04:00.0"
    (d / "vfio-dev/vfio3").mkdir(parents=True)
    (sys_root / "bus/pci/devices").mkdir(parents=True)
    (sys_root / "kernel/iommu_groups/15/devices").mkdir(parents=True)
    os.symlink("../../../devices/pci0000:00/0000:04:00.0", sys_root / "bus/pci/devices/0000:04:00.0")
    os.symlink("../../../../devices/pci0000:00/0000:04:00.0", sys_root / "kernel/iommu_groups/15/devices/0000:04:00.0")
    (dev / "vfio/devices").mkdir(parents=True)
    (dev / "vfio/devices/vfio3").write_text("")
    (dev / "iommu").write_text("")
    for pid, fds in (("100", [str(dev / "vfio/devices/vfio3"), str(dev / "iommu")]),
                     ("200", [str(dev / "vfio/devices/vfio3")]), ("300", ["/dev/null"])):
        (proc / pid / "fd").mkdir(parents=True)
        for i, t in enumerate(fds):
            os.symlink(t, proc / pid / "fd" / str(i))
    s = Sysfs(RealHost(str(sys_root), str(proc), str(dev)))
    assert s.vfio_cdev(A.parse("0000:04:00.0")) == "vfio3"
    assert s.vfio_open_nodes(15) == {"/dev/vfio/devices/vfio3": 2} and s.vfio_users(15) == 2
    assert s.vfio_group_users(15) == 0
    assert s.iommufd_node_exists() and s.vfio_cdev_node_exists("vfio3") and not s.vfio_cdev_node_exists("../x")


# --------------------------------------------------------------------------- hostdevctl check


def _iommufd(sysfs: Sysfs, ledger: Ledger | None = None):
    return next(c for c in run_checks(sysfs, ledger or Ledger()) if c.name == "iommufd")


def test_check_reports_iommufd_present(eng, sim):
    c = _iommufd(eng.sysfs)
    assert c.status == "ok" and "no device is on a vfio driver now" in c.message
    eng.prepare([PAIR], VM1)
    c = _iommufd(eng.sysfs, eng.ledger())
    assert c.status == "ok" and "all 2 devices on vfio drivers have /dev/vfio/devices/vfioN" in c.message
    assert "libvirt" in c.message and "\n" not in c.message


def test_check_reports_iommufd_absent():
    sim = SimKernel.from_file(TOPOLOGIES / "lab.json")
    sim.iommufd = False
    c = _iommufd(Sysfs(sim))
    assert c.status == "warn" and "no /dev/iommu" in c.message and "modprobe iommufd" in c.hint


def test_check_warns_when_devices_on_vfio_have_no_cdev(tmp_path):
    spec = json.loads((TOPOLOGIES / "lab.json").read_text())
    sim = SimKernel.from_spec({**spec, "vfio_device_cdev": False})
    eng = make_engine(sim, tmp_path / "state")
    eng.prepare([PAIR], VM1)
    c = _iommufd(eng.sysfs, eng.ledger())
    assert c.status == "warn" and str(PAIR) in c.message and "CONFIG_VFIO_DEVICE_CDEV" in c.hint


def test_check_says_when_the_kernel_has_no_iommufd_at_all():
    """Debian 13's 6.12 is built without CONFIG_IOMMUFD: nothing to modprobe, nothing to fix."""
    sim = SimKernel.from_file(TOPOLOGIES / "lab.json")
    sim.iommufd, sim.iommufd_build = False, "none"
    c = _iommufd(Sysfs(sim))
    assert c.status == "ok" and "CONFIG_IOMMUFD is not set" in c.message and "/dev/vfio/N" in c.message
    assert "modprobe" not in c.hint and sim.kernel_release in c.message


def test_check_is_unsure_when_iommufd_is_built_in_without_its_node():
    sim = SimKernel.from_file(TOPOLOGIES / "lab.json")
    sim.iommufd, sim.iommufd_build = False, "builtin"
    assert Sysfs(sim).iommufd_support() == "unknown"
    assert _iommufd(Sysfs(sim)).status == "warn"


def test_iommufd_support_reads_the_running_kernels_module_lists(tmp_path):
    """The real backend: <modules root>/<release>/modules.dep, as depmod writes it."""
    from hostdevd.core.sysfs import RealHost
    (tmp_path / "proc/sys/kernel").mkdir(parents=True)
    (tmp_path / "proc/sys/kernel/osrelease").write_text("6.12.99-test\n")
    mods = tmp_path / "lib/6.12.99-test"
    mods.mkdir(parents=True)
    (mods / "modules.dep").write_text("kernel/drivers/vfio/vfio.ko.xz:\n")
    (mods / "modules.builtin").write_text("kernel/drivers/pci/pci.ko\n")
    host = RealHost(sys_root=str(tmp_path / "sys"), proc_root=str(tmp_path / "proc"),
                    dev_root=str(tmp_path / "dev"), modules_root=str(tmp_path / "lib"))
    assert Sysfs(host).iommufd_support() == "absent"
    (mods / "modules.dep").write_text("kernel/drivers/iommu/iommufd/iommufd.ko.xz: kernel/x.ko\n")
    assert Sysfs(host).iommufd_support() == "module"
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/iommu").write_text("")
    assert Sysfs(host).iommufd_support() == "ready"


# libvirt's domain capabilities: the format of libvirt's tests/domaincapsdata/qemu_10.0.0-q35.x86_64.xml
# (a libvirt that offers iommufd hostdevs), cut to the hostdev element; libvirt 11.3 has no iommufd enum.
DOMCAPS = """<domainCapabilities><path>/usr/bin/qemu-system-x86_64</path><domain>kvm</domain>
  <devices><hostdev supported='yes'>
    <enum name='mode'><value>subsystem</value></enum>
    <enum name='subsysType'><value>usb</value><value>pci</value><value>scsi</value></enum>
    <enum name='pciBackend'><value>default</value><value>vfio</value></enum>{extra}
  </hostdev></devices></domainCapabilities>"""
IOMMUFD_ENUM = "<enum name='iommufd'><value>yes</value><value>no</value></enum>"


def test_domain_capabilities_say_whether_libvirt_offers_iommufd():
    from hostdevd.core.domcaps import advertises_iommufd
    assert advertises_iommufd(DOMCAPS.format(extra=IOMMUFD_ENUM)) is True
    assert advertises_iommufd(DOMCAPS.format(extra="")) is False
    assert advertises_iommufd(DOMCAPS.format(extra="<enum name='iommufd'><value>no</value></enum>")) is False
    assert advertises_iommufd("<domain/>") is None and advertises_iommufd("<<not xml") is None


@pytest.mark.parametrize("libvirt,said", [(True, "advertise iommufd, so a domain may"),
                                          (False, "does not advertise iommufd"), (None, "libvirt was not asked")])
def test_check_reports_what_libvirt_says(libvirt, said):
    sim = SimKernel.from_file(TOPOLOGIES / "lab.json")
    c = next(c for c in run_checks(Sysfs(sim), Ledger(), libvirt_iommufd=libvirt) if c.name == "iommufd")
    assert said in c.message
