"""Host-critical devices beyond block devices, the default route and the boot VGA (issue 12,
item 5): shared filesystems (9p, virtiofs), network filesystems and iSCSI, console= consoles,
the guest agent's channel and policy.critical; the planner's refusal and the override."""
from __future__ import annotations

import copy
import ipaddress
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from hostdevd.core.address import PciAddress
from hostdevd.core.config import parse_config
from hostdevd.core.critical import (
    Mount,
    console_names,
    network_servers,
    parse_address,
    parse_mountinfo,
    parse_routes,
    route_interface,
)
from hostdevd.core.errors import ConfigError
from hostdevd.core.ledger import Ledger, Owner
from hostdevd.core.planner import Policy, plan_prepare
from hostdevd.core.sysfs import RealHost, Sysfs
from hostdevd.core.topology import from_sysfs
from hostdevd.sim.simkernel import SimKernel

from .conftest import make_engine
from .test_sysfs import materialize

TOPOLOGIES = Path(__file__).resolve().parent.parent / "topologies"
A = PciAddress.parse
VM = Owner(name="vm1", uuid="11111111-1111-1111-1111-111111111111")

NVME, ONBOARD, PORT0, PORT1 = "0000:02:00.0", "0000:00:1f.6", "0000:01:00.0", "0000:01:00.1"
NINEP, VIRTIOFS, VCONSOLE, SERIAL = "0000:00:10.0", "0000:00:11.0", "0000:00:12.0", "0000:00:13.0"
AHCI = "0000:00:17.0"


def base(**extra: Any) -> dict:
    """dual_port_nic.json (NVMe root, onboard NIC with the default route, an I350 pair) plus a
    virtio 9p device, a virtiofs device, a virtio-serial device, a PCI serial card and AHCI."""
    spec = json.loads((TOPOLOGIES / "dual_port_nic.json").read_text())
    spec["drivers"].update({"virtio-pci": {"ids": ["1af4:*"], "module": "virtio_pci"},
                            "serial": {"ids": ["1415:c158"], "module": "8250_pci"},
                            "ahci": {"ids": ["*:*:010601"]}})
    spec["devices"] += [
        {"address": NINEP, "vendor": "1af4", "device": "1049", "class": "000200", "group": 10,
         "driver": "virtio-pci", "virtio": {"mount_tag": "hostshare"}},
        {"address": VIRTIOFS, "vendor": "1af4", "device": "105a", "class": "018000", "group": 11,
         "driver": "virtio-pci", "virtio": {"tag": "myfs"}},
        {"address": VCONSOLE, "vendor": "1af4", "device": "1043", "class": "078000", "group": 12,
         "driver": "virtio-pci", "virtio": {"ports": [{"console": True}, "org.qemu.guest_agent.0", "com.example.x"]}},
        {"address": SERIAL, "vendor": "1415", "device": "c158", "class": "070002", "group": 13,
         "driver": "serial", "tty": ["ttyS4", "ttyS5"]},
        {"address": AHCI, "vendor": "8086", "device": "a282", "class": "010601", "group": 14,
         "driver": "ahci", "block": ["sda", "sda1", "sda2"]},
    ]
    spec["cmdline"] = "BOOT_IMAGE=/vmlinuz root=/dev/nvme0n1p2 ro console=tty0 console=ttyS0,115200n8"
    spec.update(extra)
    return spec


def critical(spec: dict, listed: tuple[str, ...] = ()) -> dict[str, str]:
    return {str(a): r for a, r in Sysfs(SimKernel(spec)).host_critical(listed).items()}


BASELINE = {NVME: "controller of a mounted filesystem (/)", ONBOARD: "NIC carrying the default route (eno1)",
            "0000:00:02.0": "boot VGA (the host console)",
            VCONSOLE: "virtio-serial channel org.qemu.guest_agent.0 (host agent)"}


def test_baseline_marks_only_what_the_host_uses():
    # console=ttyS0 is a legacy 8250 port (platform/serial8250, no PCI); tty0 is a VT; nothing
    # is mounted from the shares; the virtio-serial device carries the guest agent's port
    k = SimKernel(base())
    assert k.readlink("class/tty/ttyS0") == "../../devices/platform/serial8250/tty/ttyS0"
    assert critical(base()) == BASELINE


# ----- (a) shared filesystems ---------------------------------------------------------------------

def test_9p_share_protects_its_virtio_device():
    spec = base(mounts=[{"block": "nvme0n1p2", "mountpoint": "/", "fstype": "xfs"},
                        {"source": "hostshare", "mountpoint": "/mnt/share", "fstype": "9p",
                         "options": "rw,access=client,msize=262144,trans=virtio"}])
    k = SimKernel(spec)
    assert k.read("bus/virtio/devices/virtio0/mount_tag") == "hostshare\0"
    assert k.readlink("bus/virtio/devices/virtio0").endswith("/0000:00:10.0/virtio0")
    found = critical(spec)
    assert found[NINEP] == "virtio device of the mounted 9p share 'hostshare' (/mnt/share)"
    assert VIRTIOFS not in found


def test_9p_mount_of_another_tag_or_transport_protects_nothing():
    for m in ({"source": "other", "mountpoint": "/mnt/o", "fstype": "9p", "options": "rw,trans=virtio"},
              {"source": "hostshare", "mountpoint": "/mnt/x", "fstype": "9p", "options": "rw,trans=xen"}):
        assert NINEP not in critical(base(mounts=[m]))


def test_virtiofs_share_by_sysfs_tag():
    spec = base(mounts=[{"source": "myfs", "mountpoint": "/srv/fs", "fstype": "virtiofs", "options": "rw"}])
    k = SimKernel(spec)
    assert k.read("fs/virtiofs/1/tag") == "myfs\n"
    assert k.readlink("fs/virtiofs/1/device").endswith("/0000:00:11.0/virtio1")
    found = critical(spec)
    assert found[VIRTIOFS] == "virtio device of the mounted virtiofs share 'myfs' (/srv/fs)"
    assert NINEP not in found
    other = base(mounts=[{"source": "nosuch", "mountpoint": "/srv/fs", "fstype": "virtiofs"}])
    assert VIRTIOFS not in critical(other)


class _Hide:
    """The simulated kernel without some sysfs paths (an older kernel)."""

    def __init__(self, k: SimKernel, prefix: str):
        self.k, self.prefix = k, prefix

    def __getattr__(self, name: str) -> Any:
        return getattr(self.k, name)

    def _check(self, rel: str) -> None:
        if rel.startswith(self.prefix):
            raise FileNotFoundError(rel)

    def read(self, rel: str) -> str:
        self._check(rel)
        return self.k.read(rel)

    def listdir(self, rel: str) -> list[str]:
        self._check(rel)
        return self.k.listdir(rel)

    def readlink(self, rel: str) -> str:
        self._check(rel)
        return self.k.readlink(rel)

    def exists(self, rel: str) -> bool:
        return not rel.startswith(self.prefix) and self.k.exists(rel)


def test_virtiofs_before_linux_6_9_keeps_every_virtiofs_device():
    spec = base(mounts=[{"source": "myfs", "mountpoint": "/srv/fs", "fstype": "virtiofs"}])
    s = Sysfs(_Hide(SimKernel(spec), "fs/virtiofs"))   # type: ignore[arg-type]
    found = {str(a): r for a, r in s.host_critical().items()}
    assert found[VIRTIOFS] == "virtio device of the mounted virtiofs share 'myfs' (/srv/fs)"
    assert NINEP not in found


# ----- (b) network filesystems and iSCSI ----------------------------------------------------------

ROUTES = [{"dest": "10.0.0.0/24", "dev": "enp1s0f1"}, {"dest": "10.0.0.0/16", "dev": "enp1s0f0"},
          {"dest": "10.9.0.0/24", "dev": "enp1s0f0", "metric": 10},
          {"dest": "10.9.0.0/24", "dev": "enp1s0f1", "metric": 5},
          {"dest": "fd00:5::/64", "dev": "enp1s0f0"}]


def net_mount(source: str, fstype: str, options: str = "rw", mountpoint: str = "/srv/data") -> dict:
    return base(routes=ROUTES, mounts=[{"block": "nvme0n1p2", "mountpoint": "/", "fstype": "xfs"},
                                       {"source": source, "mountpoint": mountpoint, "fstype": fstype,
                                        "options": options}])


@pytest.mark.parametrize("source,fstype,options,nic,reason", [
    ("10.0.0.5:/export", "nfs4", "rw,vers=4.2,clientaddr=10.1.0.2,addr=10.0.0.5", PORT1,
     "NIC carrying the route to the NFS server 10.0.0.5 (enp1s0f1)"),
    ("filer:/export", "nfs", "rw,vers=3,mountaddr=10.0.7.1,addr=10.0.7.1", PORT0,
     "NIC carrying the route to the NFS server 10.0.7.1 (enp1s0f0)"),
    ("[fd00:5::5]:/export", "nfs4", "rw,vers=4.2", PORT0,
     "NIC carrying the route to the NFS server fd00:5::5 (enp1s0f0)"),
    ("//nas/media", "cifs", "rw,vers=3.1.1,addr=10.9.0.3,file_mode=0755", PORT1,
     "NIC carrying the route to the SMB server 10.9.0.3 (enp1s0f1)"),
    ("10.0.0.8:6789,10.0.3.9:6789:/", "ceph", "rw,name=admin", PORT1,
     "NIC carrying the route to the Ceph monitor 10.0.0.8 (enp1s0f1)"),
    ("admin@fsid.cephfs=/", "ceph", "rw,mon_addr=10.0.3.9:6789", PORT0,
     "NIC carrying the route to the Ceph monitor 10.0.3.9 (enp1s0f0)"),
    ("10.0.0.12:/gv0", "fuse.glusterfs", "rw,user_id=0", PORT1,
     "NIC carrying the route to the GlusterFS server 10.0.0.12 (enp1s0f1)"),
    ("10.0.0.13", "9p", "rw,trans=tcp,port=564", PORT1,
     "NIC carrying the route to the 9p server 10.0.0.13 (enp1s0f1)"),
])
def test_network_filesystem_protects_the_nic_routing_to_its_server(source, fstype, options, nic, reason):
    found = critical(net_mount(source, fstype, options))
    assert found[nic] == reason
    other = PORT0 if nic == PORT1 else PORT1
    assert other not in found or "10.0.3.9" in found[other]     # ceph: each monitor's NIC
    assert found[ONBOARD] == "NIC carrying the default route (eno1)"


def test_ceph_protects_the_nic_of_every_monitor():
    found = critical(net_mount("10.0.0.8:6789,10.0.3.9:6789:/", "ceph"))
    assert found[PORT1].endswith("10.0.0.8 (enp1s0f1)") and found[PORT0].endswith("10.0.3.9 (enp1s0f0)")


def test_server_only_behind_the_default_route_or_by_name():
    # 192.168.2.0/24 and the default route are the onboard NIC's: nothing new is protected;
    # a host name is never resolved
    for src, opts in (("192.168.2.7:/x", "rw,addr=192.168.2.7"), ("8.8.8.8:/x", "rw,addr=8.8.8.8"),
                      ("filer:/x", "rw")):
        found = critical(net_mount(src, "nfs4", opts))
        assert PORT0 not in found and PORT1 not in found
        assert found[ONBOARD] == "NIC carrying the default route (eno1)"


def test_nfs_root_through_a_bridge_over_a_bond():
    spec = base(default_route=None,
                virtual_net=[{"name": "bond0", "lower": ["enp1s0f0", "enp1s0f1"]}, {"name": "br0", "brif": ["bond0"]}],
                routes=[{"dest": "10.0.0.0/24", "dev": "br0"}],
                mounts=[{"source": "10.0.0.5:/roots/h1", "mountpoint": "/", "fstype": "nfs",
                         "options": "rw,vers=3,addr=10.0.0.5"}])
    found = critical(spec)
    assert found[PORT0] == found[PORT1] == "NIC carrying the route to the NFS server 10.0.0.5 (br0)"
    assert NVME not in found and ONBOARD not in found


ISCSI = {"session": 1, "host": 3, "address": "10.0.0.7", "persistent_address": "10.0.0.7", "block": ["sdb", "sdb1"]}


def test_iscsi_disk_in_use_protects_the_nic_to_the_target():
    spec = base(routes=ROUTES, iscsi=[ISCSI],
                mounts=[{"block": "nvme0n1p2", "mountpoint": "/", "fstype": "xfs"},
                        {"block": "sdb1", "mountpoint": "/srv/lun", "fstype": "ext4"}])
    k = SimKernel(spec)
    assert k.readlink("class/block/sdb1") == \
        "../../devices/platform/host3/session1/target3:0:0/3:0:0:0/block/sdb/sdb1"
    assert k.read("class/iscsi_connection/connection1:0/persistent_address") == "10.0.0.7\n"
    found = critical(spec)
    assert found[PORT1] == "NIC carrying the route to the iSCSI target 10.0.0.7 (enp1s0f1)"
    assert PORT0 not in found


def test_iscsi_under_multipath_and_as_swap():
    second = dict(ISCSI, session=2, host=4, address="10.0.3.7", persistent_address="10.0.3.7", block=["sdc"])
    spec = base(routes=ROUTES, iscsi=[ISCSI, second], dm=[{"name": "dm-0", "slaves": ["sdb1", "sdc"],
                                                          "dm_name": "mpatha"}],
                mounts=[{"block": "dm-0", "mountpoint": "/srv/mp", "fstype": "xfs"}])
    found = critical(spec)
    assert found[PORT1].endswith("iSCSI target 10.0.0.7 (enp1s0f1)")
    assert found[PORT0].endswith("iSCSI target 10.0.3.7 (enp1s0f0)")
    swap = base(routes=ROUTES, iscsi=[ISCSI], swaps=["sdb1"])
    assert critical(swap)[PORT1] == "NIC carrying the route to the iSCSI target 10.0.0.7 (enp1s0f1)"


def test_btrfs_reports_an_anonymous_device_number_and_is_found_by_its_source():
    spec = base(mounts=[{"block": "nvme0n1p2", "mountpoint": "/", "fstype": "btrfs",
                         "options": "rw,ssd,subvol=/@"},
                        {"block": "dm-0", "mountpoint": "/home", "fstype": "btrfs"}],
                dm=[{"name": "dm-0", "slaves": ["sda2"], "dm_name": "crypt-home"}])
    lines = SimKernel(spec).proc_read("self/mountinfo").splitlines()
    assert any(" 0:" in line and "btrfs /dev/nvme0n1p2" in line for line in lines)
    assert any("btrfs /dev/mapper/crypt-home" in line for line in lines)
    found = critical(spec)
    assert found[NVME] == "controller of a mounted filesystem (/)"
    assert found[AHCI] == "controller of a mounted filesystem (/home)"


# ----- (c) console= and the guest agent -----------------------------------------------------------

def test_serial_console_on_a_pci_card():
    spec = base(cmdline="root=/dev/nvme0n1p2 console=ttyS5,115200n8 console=tty0")
    k = SimKernel(spec)
    assert k.readlink("class/tty/ttyS5").endswith("/0000:00:13.0/tty/ttyS5")
    assert critical(spec)[SERIAL] == "serial console ttyS5 (console= on the kernel command line)"
    assert SERIAL not in critical(base(cmdline="root=/dev/nvme0n1p2 console=ttyS1"))


def test_hvc_console_protects_the_virtio_console_devices():
    spec = base(cmdline="root=/dev/nvme0n1p2 console=hvc0")
    k = SimKernel(spec)
    assert k.readlink("class/tty/hvc0") == "../../devices/virtual/tty/hvc0"   # no way back to the port
    found = critical(spec)
    assert found[VCONSOLE] == "virtio console hvc0 (console= on the kernel command line)"
    assert NINEP not in found and VIRTIOFS not in found


def test_agent_port_by_name_only():
    spec = base()
    vcon = next(d for d in spec["devices"] if d["address"] == VCONSOLE)
    vcon["virtio"]["ports"] = [{"console": True}, "com.example.x", {"id": 3}]
    assert VCONSOLE not in critical(spec)
    k = SimKernel(spec)
    assert sorted(k.listdir("class/virtio-ports")) == ["vport2p0", "vport2p1", "vport2p3"]
    assert k.read("class/virtio-ports/vport2p1/name") == "com.example.x\n"
    assert not k.exists("class/virtio-ports/vport2p3/name")


def test_lab_l1_marks_the_share_and_the_agent_but_not_the_isa_console():
    k = SimKernel.from_file(TOPOLOGIES / "lab.json")
    assert "console=ttyS0" in k.proc_read("cmdline")
    found = {str(a): r for a, r in Sysfs(k).host_critical().items()}
    assert found == {"0000:00:10.0": "controller of a mounted filesystem (/)",
                     "0000:00:11.0": "NIC carrying the default route (enp0s17)",
                     "0000:00:12.0": "virtio-serial channel org.qemu.guest_agent.0 (host agent)",
                     "0000:00:13.0": "virtio device of the mounted 9p share 'src' (/mnt/src)"}


# ----- (d) policy.critical ------------------------------------------------------------------------

def test_policy_critical_entries_and_their_reasons():
    spec = base(routes=ROUTES, mounts=[{"block": "nvme0n1p2", "mountpoint": "/", "fstype": "xfs"},
                                       {"block": "sda1", "mountpoint": "/srv/scratch", "fstype": "ext4"}])
    assert AHCI in critical(spec)
    spec["mounts"] = spec["mounts"][:1]
    spec["swaps"] = []
    listed = ("net:enp1s0f1", "0000:00:17.0", "mount:/")
    found = critical(spec, listed)
    assert found[PORT1] == "listed in policy.critical (net:enp1s0f1)"
    assert found[AHCI] == "listed in policy.critical (0000:00:17.0)"
    assert found[NVME] == "controller of a mounted filesystem (/)"          # the first reason wins
    spec["mounts"].append({"source": "10.0.3.5:/x", "mountpoint": "/srv/nfs", "fstype": "nfs4",
                           "options": "rw,addr=10.0.3.5"})
    spec["routes"] = []
    found = critical(spec, ("mount:/srv/nfs", "net:nosuch0", "0000:0f:00.0", "mount:/not/mounted"))
    assert PORT0 not in found                                               # no route: nothing to protect
    spec["routes"] = ROUTES
    found = critical(spec, ("mount:/srv/nfs",))
    assert found[PORT0] == "NIC carrying the route to the NFS server 10.0.3.5 (enp1s0f0)"
    spec["mounts"].pop()
    assert set(critical(spec, ("net:nosuch0", "0000:0f:00.0", "mount:/not/mounted"))) == set(BASELINE)


def test_policy_critical_mount_of_a_share():
    spec = base(mounts=[{"source": "hostshare", "mountpoint": "/mnt/share", "fstype": "9p"}])
    # 9p already protects it; listing the mount point gives the same device
    found = critical(spec, ("mount:/mnt/share",))
    assert found[NINEP].startswith("virtio device of the mounted 9p share")
    spec["mounts"] = [{"source": "myfs", "mountpoint": "/srv/fs", "fstype": "virtiofs"}]
    assert critical(spec, ("mount:/srv/fs",))[VIRTIOFS].startswith("virtio device of the mounted virtiofs")


@pytest.mark.parametrize("entry,normal", [
    ("0000:05:00.0", "0000:05:00.0"), ("05:00.0", "0000:05:00.0"), ("net:eth2", "net:eth2"),
    ("net:br-lan.10", "net:br-lan.10"), ("mount:/srv/data/", "mount:/srv/data"),
    ("mount://srv//data", "mount:/srv/data"), ("mount:/", "mount:/"),
])
def test_config_policy_critical_valid(entry, normal):
    cfg = parse_config(f'[policy]\ncritical = ["{entry}"]\n')
    assert cfg.policy.critical == [normal]


@pytest.mark.parametrize("entry,message", [
    ("eth2", "policy.critical[0]: 'eth2' is neither a PCI address (0000:05:00.0), net:IFNAME nor mount:/path"),
    ("net:", "policy.critical[0]: 'net:': net: needs a network interface name (net:eth2)"),
    ("net:../x", "policy.critical[0]: 'net:../x': net: needs a network interface name (net:eth2)"),
    ("net:averyveryverylongname", "net: needs a network interface name"),
    ("mount:srv", "policy.critical[0]: 'mount:srv': mount: needs an absolute path (mount:/srv/data)"),
    ("10de:1b80", "is neither a PCI address"),
])
def test_config_policy_critical_errors_are_one_line(entry, message):
    with pytest.raises(ConfigError) as ei:
        parse_config(f'[policy]\ncritical = ["{entry}"]\n', "hostdevd.toml")
    assert message in str(ei.value) and "\n" not in ei.value.message
    assert str(ei.value).startswith("hostdevd.toml: policy.critical[0]: ")


# ----- the planner: refused unless allow_host_critical names it ------------------------------------

def test_planner_refuses_the_share_device_unless_allowed():
    spec = base(mounts=[{"block": "nvme0n1p2", "mountpoint": "/", "fstype": "xfs"},
                        {"source": "hostshare", "mountpoint": "/mnt/share", "fstype": "9p"}])
    topo = from_sysfs(Sysfs(SimKernel(spec)))
    plan = plan_prepare(topo, [A(NINEP)], VM, Ledger())
    assert not plan.ok
    text = str(plan.refusals[0])
    assert "host-critical" in text and "virtio device of the mounted 9p share 'hostshare' (/mnt/share)" in text
    policy = Policy.from_config(parse_config(f'[policy]\nallow_host_critical = ["{NINEP}"]\n'))
    assert plan_prepare(topo, [A(NINEP)], VM, Ledger(), policy).ok


def test_engine_applies_policy_critical(tmp_path):
    sim = SimKernel(base())
    eng = make_engine(sim, tmp_path / "a", '[policy]\ncritical = ["net:enp1s0f0"]\n')
    plan = eng.plan_prepare([A(PORT0)], VM)
    assert not plan.ok
    assert "listed in policy.critical (net:enp1s0f0)" in " ".join(str(r) for r in plan.refusals)
    assert eng.topology().critical[A(PORT0)] == "listed in policy.critical (net:enp1s0f0)"
    eng = make_engine(sim, tmp_path / "b", '[policy]\ncritical = ["net:enp1s0f0"]\n'
                      'allow_host_critical = ["0000:01:00.0"]\n')
    assert eng.plan_prepare([A(PORT0)], VM).ok
    assert make_engine(sim, tmp_path / "c").plan_prepare([A(PORT0)], VM).ok


# ----- safety: names from /proc reach a path only after the strict check --------------------------

class _Recorder:
    def __init__(self, k: SimKernel):
        self.k, self.paths = k, []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.k, name)
        if name in ("read", "read_bytes", "readlink", "listdir", "exists", "realpath"):
            def rec(rel: str, *a: Any) -> Any:
                self.paths.append(rel)
                return attr(rel, *a)
            return rec
        return attr


def test_hostile_proc_text_never_builds_a_path():
    spec = base(cmdline='console=../../bus/pci console=ttyS0/../../x console=.. console="hvc0"',
                mounts=[{"source": "/dev/../../bus", "mountpoint": "/a", "fstype": "btrfs-like"},
                        {"source": "/dev/mapper/../../x", "mountpoint": "/b", "fstype": "btrfs"},
                        {"source": "/dev/..", "mountpoint": "/c", "fstype": "xfs"},
                        {"source": "../..", "mountpoint": "/d", "fstype": "9p"},
                        {"source": "fe80::1%..", "mountpoint": "/e", "fstype": "nfs", "options": "addr=fe80::1%.."}])
    rec = _Recorder(SimKernel(spec))
    found = {str(a) for a in Sysfs(rec).host_critical(("net:..", "mount:/../x")).keys()}   # type: ignore[arg-type]
    assert ".." not in " ".join(p for p in rec.paths if not p.startswith("dev/block/"))
    assert all("/.." not in p and not p.startswith("..") for p in rec.paths)
    assert VCONSOLE in found                    # console="hvc0" still counts


# ----- the parsers ------------------------------------------------------------------------------------

def test_parse_mountinfo_fields_escapes_and_optional_fields():
    text = ("36 35 98:0 /mnt1 /mnt/my\\040share rw,noatime master:1 shared:5 - ext3 /dev/root rw,errors=continue\n"
            "37 35 0:41 / /srv rw - nfs4 10.0.0.5:/export rw,vers=4.2,clientaddr=10.0.0.2,addr=10.0.0.5\n"
            "garbage line\n"
            "38 35 0:42 / /x rw - 9p src\n")
    m = parse_mountinfo(text)
    assert m[0] == Mount("98:0", "/mnt/my share", "ext3", "/dev/root", "rw,errors=continue")
    assert m[1].option("addr") == ["10.0.0.5"] and m[1].anonymous
    assert m[2] == Mount("0:42", "/x", "9p", "src", "")
    assert len(m) == 3


def test_parse_address_forms():
    ip = ipaddress.ip_address
    assert parse_address("10.0.0.5") == (ip("10.0.0.5"), None)
    assert parse_address("10.0.0.5:6789") == (ip("10.0.0.5"), None)
    assert parse_address("[fd00::5]:6789") == (ip("fd00::5"), None)
    assert parse_address("fe80::1%eth1") == (ip("fe80::1"), "eth1")
    assert parse_address("fe80::1%3") == (ip("fe80::1"), None)
    assert parse_address("filer") is None and parse_address("[fd00::5") is None


def test_network_servers_kinds():
    nfs = Mount("0:1", "/x", "nfs4", "filer:/e", "rw,clientaddr=10.1.1.1,addr=10.0.0.5")
    assert network_servers(nfs) == ("NFS server", [(ipaddress.ip_address("10.0.0.5"), None)])
    assert network_servers(Mount("0:1", "/x", "9p", "src", "rw,trans=virtio")) is None
    assert network_servers(Mount("8:1", "/", "ext4", "/dev/sda1", "rw")) is None
    assert network_servers(Mount("0:1", "/x", "cifs", "//10.0.0.9/share", "rw")) == \
        ("SMB server", [(ipaddress.ip_address("10.0.0.9"), None)])


def test_routes_longest_prefix_then_metric_in_host_byte_order():
    def le(addr: str) -> str:
        return f"{int.from_bytes(ipaddress.IPv4Address(addr).packed, sys.byteorder):08X}"
    head = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
    rows = [("eth0", "0.0.0.0", "0001", 100, "0.0.0.0"), ("eth1", "10.0.0.0", "0001", 0, "255.255.0.0"),
            ("eth2", "10.0.5.0", "0001", 20, "255.255.255.0"), ("eth3", "10.0.5.0", "0001", 10, "255.255.255.0"),
            ("eth4", "10.0.6.0", "0201", 0, "255.255.255.0"), ("eth5", "10.0.7.0", "0000", 0, "255.255.255.0")]
    text = head + "".join(f"{i}\t{le(d)}\t00000000\t{f}\t0\t0\t{m}\t{le(mask)}\t0\t0\t0\n" for i, d, f, m, mask in rows)
    z = "0" * 32
    v6 = (f"fd000000000000000000000000000000 10 {z} 00 {z} 00000100 00000001 00000000 00000001     eth6\n"
          f"fd000000000000000000000000000001 80 {z} 00 {z} 00000000 00000001 00000000 80200001       lo\n")
    routes = parse_routes(text, v6)
    ip = ipaddress.ip_address
    assert route_interface(routes, ip("10.0.5.9")) == "eth3"
    assert route_interface(routes, ip("10.0.9.9")) == "eth1"
    assert route_interface(routes, ip("10.0.6.1")) == "eth1"         # reject route skipped
    assert route_interface(routes, ip("10.0.7.1")) == "eth1"         # route not up
    assert route_interface(routes, ip("192.0.2.1")) == "eth0"
    assert route_interface(routes, ip("fd00::1")) == "eth6"          # the lo route does not count
    assert route_interface(routes, ip("2001:db8::1")) is None


def test_console_names():
    assert console_names("ro console=tty0 console=ttyS0,115200n8 quiet console=hvc0 console=ttyS0") == \
        ["tty0", "ttyS0", "hvc0"]
    assert console_names("root=/dev/sda1") == []


# ----- the simulation against a real tree ---------------------------------------------------------

def test_realhost_on_a_materialized_tree_finds_the_same(tmp_path):
    spec = base(routes=ROUTES, iscsi=[ISCSI], cmdline="root=/dev/nvme0n1p2 console=ttyS4",
                mounts=[{"block": "nvme0n1p2", "mountpoint": "/", "fstype": "xfs"},
                        {"source": "hostshare", "mountpoint": "/mnt/share", "fstype": "9p"},
                        {"source": "myfs", "mountpoint": "/srv/fs", "fstype": "virtiofs"},
                        {"block": "sdb1", "mountpoint": "/srv/lun", "fstype": "ext4"},
                        {"source": "10.0.3.5:/x", "mountpoint": "/srv/nfs", "fstype": "nfs4",
                         "options": "rw,addr=10.0.3.5"}])
    k = SimKernel(copy.deepcopy(spec))
    materialize(k, tmp_path)
    (tmp_path / "proc" / "cmdline").write_text(k.proc_read("cmdline"))
    real = Sysfs(RealHost(str(tmp_path / "sys"), str(tmp_path / "proc"), str(tmp_path / "dev")))
    expected = Sysfs(k).host_critical()
    assert real.host_critical() == expected
    assert {str(a) for a in expected} == {NVME, ONBOARD, "0000:00:02.0", VCONSOLE, NINEP, VIRTIOFS, PORT0,
                                          PORT1, SERIAL}


# ----- the simulated kernel's spec for these facts: one error line per mistake ----------------------

def _with_device(**kw: Any):
    def mutate(spec: dict) -> None:
        spec["devices"].append(dict({"address": "0000:00:14.0", "vendor": "1af4", "device": "1043",
                                     "class": "078000", "group": 20, "driver": "virtio-pci"}, **kw))
    return mutate


@pytest.mark.parametrize("mutate,message", [
    (_with_device(vendor="8086", device="10d3", virtio={"ports": []}), "virtio needs a virtio PCI device"),
    (_with_device(virtio={"mount_tag": "x"}), "mount_tag needs a virtio device of type 9, this one is 3"),
    (_with_device(virtio={"ports": [{"id": 1}, {"id": 1}]}), "port id 1 is taken"),
    (_with_device(virtio={"ports": ["has space"]}), "bad port name"),
    (_with_device(device="1049", virtio={"mount_tag": ""}), "mount_tag must be 1-36 characters"),
    (_with_device(vendor="1415", device="c158", driver="serial", tty=["ttyS0"]), "tty ttyS0 is already taken"),
    (lambda s: s.update(routes=[{"dest": "10.0.0.0/24", "dev": "nosuch"}]), "routes[0]: unknown interface"),
    (lambda s: s.update(routes=[{"dest": "10.0.0.0/33", "dev": "eno1"}]), "routes[0]: bad dest or via"),
    (lambda s: s.update(iscsi=[{"session": 1, "host": 3, "address": "filer"}]), "iscsi[0]: address must be"),
    (lambda s: s.update(mounts=[{"source": "a b", "mountpoint": "/x", "fstype": "9p"}]), "without blanks"),
    (lambda s: s.update(dm=[{"name": "dm-0", "slaves": [], "dm_name": "a/b"}]), "bad dm_name"),
])
def test_spec_errors(mutate, message):
    spec = base()
    mutate(spec)
    with pytest.raises(ConfigError) as ei:
        SimKernel(spec)
    assert message in str(ei.value) and "\n" not in str(ei.value)


def test_virtio_type_from_the_pci_id():
    k = SimKernel(base())
    types = {n: (k.read(f"bus/virtio/devices/{n}/device").strip(),
                 posixpath_basename(k.readlink(f"bus/virtio/devices/{n}/driver")))
             for n in k.listdir("bus/virtio/devices")}
    assert types == {"virtio0": ("0x0009", "9pnet_virtio"), "virtio1": ("0x001a", "virtiofs"),
                     "virtio2": ("0x0003", "virtio_console")}
    # unbinding virtio-pci takes the virtio device (and what hangs off it) away
    k.write("bus/pci/drivers/virtio-pci/unbind", NINEP)
    assert "virtio0" not in k.listdir("bus/virtio/devices")


def posixpath_basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]
