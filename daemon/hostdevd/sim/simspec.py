"""The simulated kernel's state model and the declarative spec that builds it.

:class:`hostdevd.simkernel.SimKernel` keeps its state in the dataclasses here;
:class:`SpecLoader` validates a spec (every problem is one :class:`ConfigError`
line naming the entry) and fills a kernel from it.

Spec (JSON or TOML; unknown keys are errors)::

    {
      "iommu": true,                  # false: no groups, no class/iommu entries
      "iommu_units": ["dmar0"],       # default ["dmar0"] when iommu
      "interrupt_remapping": true,    # default: same as iommu
      "unsafe_interrupts": false,     # vfio_iommu_type1.allow_unsafe_interrupts
      "iommu_group_type": "DMA",      # kernel/iommu_groups/N/type
      "cmdline": "...", "kvm": true,
      "open_group_unbind": "ebusy",   # or "block"
      "modules": ["kvm", "vfio"],     # extra loaded modules (drivers' modules are implied)
      "kernel_release": "6.12.38+deb13-amd64",   # /proc/sys/kernel/osrelease, /lib/modules/<it>/
      "modules_alias": true,          # false: no modules.alias (see hostdevd.sim.simvfio)
      "iommufd": true,                # /dev/iommu (default: same as iommu)
      "vfio_device_cdev": true,       # /dev/vfio/devices/vfioN for devices on a vfio driver
      "blacklisted_modules": [],      # load_module() raises EPERM for these
      "drivers": {                    # vfio-pci, pci-stub, pcieport are built in (override keys)
        "e1000e": {"ids": ["8086:10d3", "8086:*", "*:*:0403"],  # vendor:device[:class prefix]
                   "refuse": false,   # true or an errno name: every probe fails with it
                   "module": "e1000e", "loaded": true, "sriov_configure": true,
                   "vfio": false, "driver_managed_dma": false},
        "mlx5_vfio_pci": {"vfio": true, "loaded": false,   # a variant: matched only through
                          "aliases": ["vfio_pci:v000015B3d0000101Esv*sd*bc*sc*i*"]}  # driver_override
      },
      "devices": [{
        "address": "0000:01:00.0", "vendor": "8086", "device": "10d3",
        "class": "020000", "header_type": 0,        # default 1 for class 0604/0609
        "group": 12, "driver": "e1000e", "driver_override": null,
        "boot_vga": false, "reset_method": ["flr"], # endpoints default ["flr"], bridges []
        "net": ["enp1s0"], "block": ["nvme0n1", "nvme0n1p1", {"name": "sda", "dev": "8:0"}],
        "secondary_bus": 1,                          # bridges: children nest under it
        "parent": "0000:00:1c.0",                   # alternative to secondary_bus
        "refuse_drivers": ["nvme"],                  # probes of these drivers fail here
        "tty": ["ttyS4"],                            # serial ports of a PCI serial card (ttyS0-3 are legacy)
        "virtio": {"mount_tag": "src"},              # virtio devices (1af4:1000-107f; the type comes from
                                                     # the PCI id): 9p "mount_tag", virtiofs "tag",
                                                     # console "ports": ["org.qemu.guest_agent.0",
                                                     # {"console": true, "id": 0}] (named ports get ids from 1)
        "sriov": {"totalvfs": 8, "numvfs": 0, "vf_device": "1520", "vf_vendor": "8086",
                  "vf_driver": "igbvf", "offset": 1, "stride": 1, "autoprobe": true,
                  "vfs_share_group": false, "vf_ifname": "enp3s0f0v{n}",
                  "vf_refuse_drivers": []},
        "numa_node": 0, "power_state": "D0",         # inventory facts: hostdevd.sim.siminventory
        "drm": ["card0"], "nvidia_minor": 0, "config_readable": true,   # pre-flight: hostdevd.sim.simproc
        "pcie_link": {"speed": 8.0, "width": 4, "max_speed": 8.0, "max_width": 4}
      }],
      "pci_ids": {"8086": {"name": "Intel Corporation", "devices": {"10d3": "82574L Gigabit Network Connection"}}},
      "numa_nodes": {"0": "0-3", "1": "4-7"},        # devices/system/node/nodeN/cpulist (hostdevd.sim.simproc)
      "processes": [{"pid": 812, "comm": "nvidia-persistenced", "unit": "nvidia-persistenced.service",
                     "fds": ["/dev/nvidia0", "sysfs:0000:01:00.0/config"], "maps": []}],
      "dm": [{"name": "dm-0", "slaves": ["nvme0n1p3"], "dev": "253:0", "dm_name": "vg-root"}],
      "iscsi": [{"session": 1, "host": 3, "address": "10.0.0.7", "persistent_address": "10.0.0.7",
                 "block": ["sdb", "sdb1"]}],         # software iSCSI: disks under platform/hostH/sessionS
      "virtual_net": [{"name": "br0", "brif": ["enp1s0"]}, {"name": "bond0", "lower": ["eth1"]}],
      "mounts": [{"block": "nvme0n1p2", "mountpoint": "/", "fstype": "ext4"},
                 {"source": "src", "mountpoint": "/mnt/src", "fstype": "9p", "options": "rw,trans=virtio"}],
                                      # btrfs/bcachefs on a block: MAJ:MIN 0:N, the /dev node as source
      "swaps": ["nvme0n1p3"],
      "default_route": "enp1s0", "default_route6": null,
      "routes": [{"dest": "10.0.0.0/24", "dev": "eth1", "via": null, "metric": 0}]   # IPv4 or IPv6
    }
"""
from __future__ import annotations

import errno
import ipaddress
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

from ..core.address import PciAddress
from ..core.errors import ConfigError, InvalidAddress
from .siminventory import SimFacts, load_facts, load_pci_ids
from .simproc import SimDevicePre, load_device_pre, load_numa_nodes, load_processes

if TYPE_CHECKING:
    from .simkernel import SimKernel

VFIO_PCI = "vfio-pci"
PCI_STUB = "pci-stub"
PCIEPORT = "pcieport"
VIRTIO_PCI = "virtio-pci"

# Built-in drivers every simulated kernel has (a spec may override their keys).
BUILTIN_DRIVERS: dict[str, dict[str, Any]] = {
    PCIEPORT: {"module": None, "driver_managed_dma": True, "sriov_configure": False},
    PCI_STUB: {"module": "pci_stub", "driver_managed_dma": True, "sriov_configure": False},
    VFIO_PCI: {"module": "vfio_pci", "vfio": True, "driver_managed_dma": True, "sriov_configure": False,
               "aliases": ["vfio_pci:v*d*sv*sd*bc*sc*i*"]},
}
VFIO_DEPS = ("vfio", "vfio_pci_core", "vfio_iommu_type1", "irqbypass")
HEX_RE = re.compile(r"^(?:0[xX])?[0-9a-fA-F]+$")
NAME_RE = re.compile(r"^[A-Za-z0-9_.:+-]{1,64}$")
TAG_RE = re.compile(r"^[^\s\x00]{1,36}$")
LEGACY_TTYS = ("ttyS0", "ttyS1", "ttyS2", "ttyS3")       # 8250's nr_uarts ports on platform/serial8250
# virtio device id -> the driver that binds it (include/uapi/linux/virtio_ids.h)
VIRTIO_DRIVERS = {1: "virtio_net", 2: "virtio_blk", 3: "virtio_console", 4: "virtio_rng", 5: "virtio_balloon",
                  8: "virtio_scsi", 9: "9pnet_virtio", 16: "virtio_gpu", 18: "virtio_input", 26: "virtiofs"}
# transitional PCI device ids (virtio spec 4.1.2.1) whose virtio id is not in the subsystem id
TRANSITIONAL = {0x1000: 1, 0x1001: 2, 0x1002: 5, 0x1003: 3, 0x1004: 8, 0x1005: 4, 0x1009: 9}



@dataclass
class SimDriver:
    name: str
    ids: list[tuple[int | None, int | None, str | None]]
    module: str | None
    loaded: bool = True
    refuse: int = 0                 # errno every probe fails with; 0 = probes succeed
    sriov_configure: bool = True
    vfio: bool = False
    driver_managed_dma: bool = False
    dynids: list[tuple[int, int]] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)    # its "vfio_pci:..." lines in modules.alias

    @property
    def host(self) -> bool:
        """A driver that gives the host a netdev / disk (not a vfio or stub driver)."""
        return not self.vfio and self.name != PCI_STUB


@dataclass
class SimBlock:
    name: str
    major: int
    minor: int
    disk: str | None = None          # the whole disk, for a partition

    @property
    def dev(self) -> str:
        return f"{self.major}:{self.minor}"


@dataclass
class SimPort:
    id: int
    name: str | None = None
    console: bool = False


@dataclass
class SimVirtio:
    """The virtio device on a virtio-pci function (virtioN under it while bound)."""
    id: int                                          # virtio device id
    mount_tag: str | None = None                     # 9p
    fs_tag: str | None = None                        # virtiofs
    ports: list[SimPort] = field(default_factory=list)   # virtio-serial

    @property
    def driver(self) -> str | None:
        return VIRTIO_DRIVERS.get(self.id)


@dataclass
class SimIscsi:
    """A software iSCSI session (iscsi_tcp): its disks have no PCI device above them."""
    session: int
    host: int
    address: str
    persistent_address: str
    port: int = 3260
    block: list[SimBlock] = field(default_factory=list)


@dataclass
class SimRoute:
    dest: Any                                        # ipaddress.IPv4Network | IPv6Network
    dev: str
    via: Any = None                                  # ipaddress.IPv4Address | IPv6Address | None
    metric: int = 0


@dataclass
class SimSriov:
    totalvfs: int
    vf_vendor: int
    vf_device: int
    offset: int = 1
    stride: int = 1
    autoprobe: bool = True
    share_group: bool = False
    vf_ifname: str | None = None
    vf_refuse_drivers: set[str] = field(default_factory=set)
    vf_reset_method: list[str] = field(default_factory=lambda: ["flr"])
    vfs: list[PciAddress] = field(default_factory=list)


@dataclass
class SimDevice:
    addr: PciAddress
    vendor: int
    device: int
    pci_class: int
    header_type: int
    group: int | None
    driver: str | None = None
    override: str | None = None
    subsystem_vendor: int = 0
    subsystem_device: int = 0
    revision: int = 0
    boot_vga: bool = False
    reset_methods: list[str] = field(default_factory=list)
    supported_resets: list[str] = field(default_factory=list)
    net: list[str] = field(default_factory=list)
    block: list[SimBlock] = field(default_factory=list)
    parent: PciAddress | None = None
    secondary_bus: int | None = None
    sriov: SimSriov | None = None
    physfn: PciAddress | None = None
    refuse_drivers: set[str] = field(default_factory=set)
    virtio_index: int | None = None
    virtio: SimVirtio | None = None
    tty: list[str] = field(default_factory=list)
    vfio_index: int | None = None
    resets: int = 0
    facts: SimFacts = field(default_factory=SimFacts)     # numa_node, power_state, PCIe link
    pre: SimDevicePre = field(default_factory=SimDevicePre)  # drm nodes, nvidia minor, config (simproc)

    @property
    def bridge(self) -> bool:
        return self.header_type != 0


def virtio_id(vendor: int, device: int, subsystem_device: int) -> int | None:
    """The virtio device id of a virtio-pci function (virtio_pci_modern_probe: modern ids are
    0x1040 + id; transitional ones use the subsystem device id)."""
    if vendor != 0x1AF4:
        return None
    if 0x1040 <= device <= 0x107F:
        return device - 0x1040
    if 0x1000 <= device <= 0x103F:
        return subsystem_device or TRANSITIONAL.get(device)
    return None


def lowest_free(used: set[int], start: int = 0) -> int:
    n = start
    while n in used:
        n += 1
    return n


def errno_value(err: int | str | bool) -> int:
    if err is True:
        return errno.ENODEV
    if isinstance(err, str):
        code = getattr(errno, err.upper(), None)
        if not isinstance(code, int):
            raise ValueError(f"unknown errno name {err!r}")
        return code
    if isinstance(err, int) and err > 0:
        return err
    raise ValueError(f"not an errno: {err!r}")


def vf_address(pf: SimDevice, k: int) -> PciAddress:
    """VF ``k`` of ``pf``: routing id PF + offset + k*stride (ValueError past bus ff)."""
    sr = pf.sriov
    assert sr is not None
    rid = (pf.addr.bus << 8 | pf.addr.slot << 3 | pf.addr.function) + sr.offset + k * sr.stride
    if rid > 0xFFFF:
        raise ValueError(f"VF {k} of {pf.addr} would be past bus ff")
    return PciAddress(pf.addr.domain, rid >> 8, (rid >> 3) & 0x1F, rid & 7)


class SpecLoader:
    """Validate a spec and fill a SimKernel. Every problem is one ConfigError line."""

    TOP = {"format", "description", "comment", "iommu", "iommu_units", "interrupt_remapping",
           "unsafe_interrupts", "iommu_group_type", "cmdline", "kvm", "open_group_unbind", "modules",
           "blacklisted_modules", "drivers", "devices", "dm", "virtual_net", "mounts", "swaps",
           "default_route", "default_route6", "routes", "iscsi", "kernel_release", "modules_alias", "iommufd",
           "vfio_device_cdev", "pci_ids", "processes", "numa_nodes"}
    DRIVER = {"ids", "refuse", "module", "loaded", "sriov_configure", "vfio", "driver_managed_dma",
              "comment", "aliases"}
    DEVICE = {"address", "name", "comment", "vendor", "device", "subsystem_vendor", "subsystem_device",
              "class", "revision", "header_type", "group", "driver", "driver_override", "boot_vga",
              "reset_method", "net", "block", "parent", "secondary_bus", "refuse_drivers", "sriov", "tty",
              "virtio", "numa_node", "power_state", "pcie_link", "drm", "nvidia_minor", "config_readable"}
    SRIOV = {"totalvfs", "numvfs", "vf_vendor", "vf_device", "vf_driver", "offset", "stride", "autoprobe",
             "vfs_share_group", "vf_ifname", "vf_refuse_drivers", "vf_reset_method"}

    def __init__(self, k: SimKernel, spec: Any):
        self.k = k
        self.spec = spec
        self.pending_vfs: list[tuple[SimDevice, int]] = []
        self.raw_blocks: list[tuple[SimDevice | SimIscsi, Any, str]] = []

    def fail(self, where: str, msg: str) -> NoReturn:
        raise ConfigError(f"topology spec: {where}: {msg}" if where else f"topology spec: {msg}")

    def keys(self, obj: Any, allowed: set[str], where: str) -> dict:
        if not isinstance(obj, dict):
            self.fail(where, f"expected an object, got {type(obj).__name__}")
        extra = sorted(set(obj) - allowed)
        if extra:
            self.fail(where, f"unknown key {extra[0]!r} (allowed: {', '.join(sorted(allowed))})")
        return obj

    def typed(self, obj: dict, key: str, types: tuple, where: str, default: Any = None) -> Any:
        v = obj.get(key, default)
        if v is default:
            return v
        if not isinstance(v, types) or (bool not in types and isinstance(v, bool)):
            self.fail(where, f"{key} must be {' or '.join(t.__name__ for t in types)}, got {v!r}")
        return v

    def hexnum(self, v: Any, where: str, what: str, limit: int) -> int:
        if isinstance(v, int) and not isinstance(v, bool):
            n = v
        elif isinstance(v, str) and HEX_RE.match(v):
            n = int(v, 16)
        else:
            self.fail(where, f"{what} must be hex like \"8086\", got {v!r}")
        if not 0 <= n <= limit:
            self.fail(where, f"{what} {v!r} out of range")
        return n

    def names(self, obj: dict, key: str, where: str) -> list[str]:
        v = obj.get(key, [])
        if not isinstance(v, list) or not all(isinstance(x, str) and NAME_RE.match(x) for x in v):
            self.fail(where, f"{key} must be a list of names, got {v!r}")
        return list(v)

    def load(self) -> None:
        k, spec = self.k, self.keys(self.spec, self.TOP, "")
        k.iommu = bool(self.typed(spec, "iommu", (bool,), "", True))
        k.iommu_units = self.names(spec, "iommu_units", "") or (["dmar0"] if k.iommu else [])
        k.interrupt_remapping = bool(self.typed(spec, "interrupt_remapping", (bool,), "", k.iommu))
        k.unsafe_interrupts = bool(self.typed(spec, "unsafe_interrupts", (bool,), "", False))
        k.iommu_group_type = self.typed(spec, "iommu_group_type", (str,), "", "DMA")
        k.kvm = bool(self.typed(spec, "kvm", (bool,), "", True))
        k.open_group_unbind = self.typed(spec, "open_group_unbind", (str,), "", "ebusy")
        if k.open_group_unbind not in ("ebusy", "block"):
            self.fail("", "open_group_unbind must be \"ebusy\" or \"block\"")
        default_cmdline = "BOOT_IMAGE=/vmlinuz root=/dev/sda1 ro" + (" intel_iommu=on iommu=pt" if k.iommu else "")
        k.cmdline = self.typed(spec, "cmdline", (str,), "", default_cmdline)
        k.modules = {m.replace("-", "_") for m in self.names(spec, "modules", "")}
        k.blacklisted = {m.replace("-", "_") for m in self.names(spec, "blacklisted_modules", "")}
        release = self.typed(spec, "kernel_release", (str,), "", k.kernel_release)
        if not re.fullmatch(r"[A-Za-z0-9._+~-]{1,64}", release) or release in (".", ".."):
            self.fail("", f"bad kernel_release {release!r}")
        k.kernel_release = release
        k.modules_alias = bool(self.typed(spec, "modules_alias", (bool,), "", True))
        k.iommufd = bool(self.typed(spec, "iommufd", (bool,), "", k.iommu))
        k.vfio_device_cdev = bool(self.typed(spec, "vfio_device_cdev", (bool,), "", True))
        k.pci_ids_text = load_pci_ids(self, spec.get("pci_ids"))
        self.drivers(spec.get("drivers", {}))
        devs = spec.get("devices", [])
        if not isinstance(devs, list):
            self.fail("", "devices must be a list")
        for i, d in enumerate(devs):
            self.device(d, i)
        self.iscsi(spec.get("iscsi", []))
        load_processes(self, k, spec.get("processes", []))
        load_numa_nodes(self, k, spec.get("numa_nodes", {}))
        self.links()
        self.blocks(spec)
        self.net(spec)
        for pf, n in self.pending_vfs:
            k._create_vfs(pf, n)
        k._changed()

    def drivers(self, raw: Any) -> None:
        if not isinstance(raw, dict):
            self.fail("drivers", "must be an object {name: {...}}")
        merged: dict[str, dict] = {n: dict(v) for n, v in BUILTIN_DRIVERS.items()}
        for name, v in raw.items():
            where = f"drivers.{name}"
            if not isinstance(name, str) or not NAME_RE.match(name):
                self.fail("drivers", f"bad driver name {name!r}")
            merged.setdefault(name, {}).update(self.keys(v if v is not None else {}, self.DRIVER, where))
        for name, v in merged.items():
            where = f"drivers.{name}"
            ids = []
            for pat in v.get("ids", []):
                ids.append(self.id_pattern(pat, where))
            refuse = v.get("refuse", False)
            try:
                refuse_errno = errno_value(refuse) if refuse not in (False, None) else 0
            except ValueError as e:
                self.fail(where, f"refuse: {e}")
            module = v.get("module", name.replace("-", "_"))
            if module is not None and (not isinstance(module, str) or not NAME_RE.match(module)):
                self.fail(where, f"module must be a name or null, got {module!r}")
            drv = SimDriver(name=name, ids=ids, module=module.replace("-", "_") if module else None,
                          loaded=bool(self.typed(v, "loaded", (bool,), where, True)),
                          refuse=refuse_errno,
                          sriov_configure=bool(self.typed(v, "sriov_configure", (bool,), where, True)),
                          vfio=bool(self.typed(v, "vfio", (bool,), where, False)),
                          driver_managed_dma=bool(self.typed(v, "driver_managed_dma", (bool,), where, False)))
            aliases = v.get("aliases", [])
            if not isinstance(aliases, list) or not all(
                    isinstance(a, str) and re.fullmatch(r"vfio_pci:[A-Za-z0-9*?]{1,120}", a) for a in aliases):
                self.fail(where, f"aliases must be a list of \"vfio_pci:v...\" modaliases, got {aliases!r}")
            if aliases and (not drv.vfio or drv.module is None):
                self.fail(where, "aliases need a vfio driver with a module")
            drv.aliases = list(aliases)
            if drv.vfio:
                drv.driver_managed_dma = True
            if drv.module in self.k.blacklisted:
                drv.loaded = False
            self.k.drivers[name] = drv

    def id_pattern(self, pat: Any, where: str) -> tuple[int | None, int | None, str | None]:
        m = re.fullmatch(r"([0-9a-fA-F]{4}|\*):([0-9a-fA-F]{4}|\*)(?::([0-9a-fA-F]{2}|[0-9a-fA-F]{4}|[0-9a-fA-F]{6}))?",
                         pat if isinstance(pat, str) else "")
        if not m:
            self.fail(where, f"id {pat!r} is not vendor:device[:class prefix] (hex or *)")
        return (None if m[1] == "*" else int(m[1], 16), None if m[2] == "*" else int(m[2], 16),
                m[3].lower() if m[3] else None)

    def device(self, raw: Any, i: int) -> None:
        k = self.k
        where = f"devices[{i}]"
        raw = self.keys(raw, self.DEVICE, where)
        try:
            addr = PciAddress.parse(raw.get("address"))
        except InvalidAddress as e:
            self.fail(where, str(e))
        where = f"devices[{i}] ({addr})"
        if addr in k.devices:
            self.fail(where, "duplicate address")
        for key in ("vendor", "device", "class"):
            if key not in raw:
                self.fail(where, f"missing {key}")
        cls = raw["class"]
        if not (isinstance(cls, str) and re.fullmatch(r"(?:0[xX])?[0-9a-fA-F]{6}", cls)):
            self.fail(where, f"class must be 6 hex digits like \"020000\", got {cls!r}")
        pci_class = int(cls, 16)
        default_hdr = 1 if pci_class >> 8 in (0x0604, 0x0609) else 2 if pci_class >> 8 == 0x0607 else 0
        hdr = self.typed(raw, "header_type", (int,), where, default_hdr)
        if hdr not in (0, 1, 2):
            self.fail(where, f"header_type must be 0, 1 or 2, got {hdr!r}")
        group = self.typed(raw, "group", (int,), where)
        if k.iommu and group is None:
            self.fail(where, "missing group (every device has one while the IOMMU is on)")
        if not k.iommu and group is not None:
            self.fail(where, "has a group but iommu is false")
        if group is not None and group < 0:
            self.fail(where, "group must be >= 0")
        driver = self.typed(raw, "driver", (str,), where)
        if driver is not None:
            drv = k.drivers.get(driver)
            if drv is None:
                self.fail(where, f"unknown driver {driver!r} (declare it under \"drivers\")")
            if not drv.loaded:
                self.fail(where, f"driver {driver!r} is not loaded")
            if drv.vfio and (hdr != 0 or group is None):
                self.fail(where, f"{driver} cannot hold a bridge or a device without an IOMMU group")
        override = self.typed(raw, "driver_override", (str,), where)
        if override is not None and not NAME_RE.match(override):
            self.fail(where, f"bad driver_override {override!r}")
        rm = raw.get("reset_method", ["flr"] if hdr == 0 and pci_class >> 16 != 0x06 else [])
        if isinstance(rm, str):
            rm = rm.split()
        if not isinstance(rm, list) or not all(isinstance(x, str) for x in rm):
            self.fail(where, f"reset_method must be a list of names, got {rm!r}")
        boot_vga = bool(self.typed(raw, "boot_vga", (bool,), where, False))
        if boot_vga and pci_class >> 8 != 0x0300:
            self.fail(where, "boot_vga set on a device that is not VGA (class 0300xx)")
        parent = raw.get("parent")
        if parent is not None:
            try:
                parent = PciAddress.parse(parent)
            except InvalidAddress as e:
                self.fail(where, f"parent: {e}")
        sec = raw.get("secondary_bus")
        if sec is not None:
            sec = self.hexnum(sec, where, "secondary_bus", 0xFF) if isinstance(sec, str) else sec
            if not isinstance(sec, int) or not 0 < sec <= 0xFF or hdr != 1:
                self.fail(where, "secondary_bus needs a bridge (header type 1) and a bus 1..255")
        dev = SimDevice(addr=addr, vendor=self.hexnum(raw["vendor"], where, "vendor", 0xFFFF),
                   device=self.hexnum(raw["device"], where, "device", 0xFFFF), pci_class=pci_class,
                   header_type=hdr, group=group, driver=driver, override=override,
                   subsystem_vendor=self.hexnum(raw.get("subsystem_vendor", 0), where, "subsystem_vendor", 0xFFFF),
                   subsystem_device=self.hexnum(raw.get("subsystem_device", 0), where, "subsystem_device", 0xFFFF),
                   revision=self.hexnum(raw.get("revision", 0), where, "revision", 0xFF),
                   boot_vga=boot_vga, reset_methods=list(rm), supported_resets=list(rm),
                   net=self.names(raw, "net", where), parent=parent, secondary_bus=sec,
                   refuse_drivers=set(self.names(raw, "refuse_drivers", where)))
        dev.tty = self.names(raw, "tty", where)
        dev.facts = load_facts(self, raw, where)
        dev.pre = load_device_pre(self, raw, where)
        if (dev.net or raw.get("block") or dev.tty) and (driver is None or not k.drivers[driver].host):
            self.fail(where, "net/block/tty devices need the device bound to a host driver")
        for name in dev.tty:
            if name in LEGACY_TTYS or any(name in o.tty for o in k.devices.values()):
                self.fail(where, f"tty {name} is already taken (ttyS0-3 are the legacy 8250 ports)")
        vid = virtio_id(dev.vendor, dev.device, dev.subsystem_device)
        if vid is not None:
            dev.virtio = self.virtio(vid, raw.get("virtio", {}), f"{where}.virtio")
        elif "virtio" in raw:
            self.fail(where, "virtio needs a virtio PCI device (vendor 1af4, device 1000-107f)")
        self.raw_blocks.append((dev, raw.get("block", []), where))
        if "sriov" in raw:
            self.sriov(dev, raw["sriov"], where)
        k.devices[addr] = dev
        if driver == VIRTIO_PCI:
            dev.virtio_index = lowest_free({d.virtio_index for d in k.devices.values() if d.virtio_index is not None})
        if driver is not None and k.drivers[driver].vfio:
            dev.vfio_index = lowest_free({d.vfio_index for d in k.devices.values() if d.vfio_index is not None})

    def virtio(self, vid: int, raw: Any, where: str) -> SimVirtio:
        raw = self.keys(raw, {"mount_tag", "tag", "ports"}, where)
        v = SimVirtio(id=vid)
        for key, want in (("mount_tag", 9), ("tag", 26), ("ports", 3)):
            if key in raw and vid != want:
                self.fail(where, f"{key} needs a virtio device of type {want}, this one is {vid}")
        for key in ("mount_tag", "tag"):
            tag = raw.get(key)
            if tag is not None and not (isinstance(tag, str) and TAG_RE.match(tag)):
                self.fail(where, f"{key} must be 1-36 characters without blanks, got {tag!r}")
        v.mount_tag, v.fs_tag = raw.get("mount_tag"), raw.get("tag")
        ports = raw.get("ports", [])
        if not isinstance(ports, list):
            self.fail(where, "ports must be a list")
        used: set[int] = set()
        for p in ports:
            if isinstance(p, str):
                p = {"name": p}
            p = self.keys(p, {"name", "console", "id"}, f"{where}.ports")
            name = p.get("name")
            if name is not None and not (isinstance(name, str) and TAG_RE.match(name)):
                self.fail(where, f"bad port name {name!r}")
            console = bool(self.typed(p, "console", (bool,), where, False))
            pid = self.typed(p, "id", (int,), where)
            if pid is None:
                pid = lowest_free(used, 0 if console else 1)
            if pid in used or not 0 <= pid < 31:
                self.fail(where, f"port id {pid} is taken or out of range")
            used.add(pid)
            v.ports.append(SimPort(pid, name, console))
        return v

    def iscsi(self, raw: Any) -> None:
        if not isinstance(raw, list):
            self.fail("iscsi", "must be a list")
        for i, s in enumerate(raw):
            where = f"iscsi[{i}]"
            s = self.keys(s, {"session", "host", "address", "persistent_address", "port", "block"}, where)
            sid, host = self.typed(s, "session", (int,), where), self.typed(s, "host", (int,), where)
            if sid is None or host is None or sid < 1 or host < 0:
                self.fail(where, "session (>= 1) and host (>= 0) are required integers")
            if any(o.session == sid for o in self.k.iscsi):
                self.fail(where, f"duplicate session {sid}")
            addr = self.typed(s, "address", (str,), where)
            try:
                ipaddress.ip_address(addr or "")
            except ValueError:
                self.fail(where, f"address must be an IP address, got {addr!r}")
            sess = SimIscsi(session=sid, host=host, address=addr or "",
                            persistent_address=self.typed(s, "persistent_address", (str,), where, addr),
                            port=self.typed(s, "port", (int,), where, 3260))
            self.k.iscsi.append(sess)
            self.raw_blocks.append((sess, s.get("block", []), where))

    def sriov(self, dev: SimDevice, raw: Any, where: str) -> None:
        where = f"{where}.sriov"
        raw = self.keys(raw, self.SRIOV, where)
        total = self.typed(raw, "totalvfs", (int,), where)
        if total is None or not 0 < total <= 0xFFFF:
            self.fail(where, "totalvfs must be a positive integer")
        sr = SimSriov(totalvfs=total,
                    vf_vendor=self.hexnum(raw.get("vf_vendor", dev.vendor), where, "vf_vendor", 0xFFFF),
                    vf_device=self.hexnum(raw.get("vf_device", dev.device), where, "vf_device", 0xFFFF),
                    offset=self.typed(raw, "offset", (int,), where, 1),
                    stride=self.typed(raw, "stride", (int,), where, 1),
                    autoprobe=bool(self.typed(raw, "autoprobe", (bool,), where, True)),
                    share_group=bool(self.typed(raw, "vfs_share_group", (bool,), where, False)),
                    vf_ifname=self.typed(raw, "vf_ifname", (str,), where),
                    vf_refuse_drivers=set(self.names(raw, "vf_refuse_drivers", where)))
        if sr.offset < 1 or sr.stride < 1:
            self.fail(where, "offset and stride must be >= 1")
        rm = raw.get("vf_reset_method", ["flr"])
        sr.vf_reset_method = rm.split() if isinstance(rm, str) else list(rm)
        if sr.vf_ifname is not None and "{n}" not in sr.vf_ifname:
            self.fail(where, "vf_ifname must contain {n}")
        vf_driver = self.typed(raw, "vf_driver", (str,), where)
        if vf_driver is not None:
            drv = self.k.drivers.get(vf_driver)
            if drv is None:
                drv = self.k.drivers[vf_driver] = SimDriver(name=vf_driver, ids=[], module=vf_driver.replace("-", "_"))
            if not any((v in (None, sr.vf_vendor)) and (d in (None, sr.vf_device)) and c is None
                       for v, d, c in drv.ids):
                drv.ids.append((sr.vf_vendor, sr.vf_device, None))
        dev.sriov = sr
        numvfs = self.typed(raw, "numvfs", (int,), where, 0)
        if not 0 <= numvfs <= total:
            self.fail(where, f"numvfs must be 0..{total}")
        if numvfs:
            drv = self.k.drivers.get(dev.driver or "")
            if drv is None or not drv.sriov_configure:
                self.fail(where, "numvfs > 0 needs the PF bound to a driver that configures SR-IOV")
            self.pending_vfs.append((dev, numvfs))

    def links(self) -> None:
        k = self.k
        buses: dict[tuple[int, int], PciAddress] = {}
        for a, d in k.devices.items():
            if d.secondary_bus is not None:
                key = (a.domain, d.secondary_bus)
                if key in buses:
                    self.fail(f"devices ({a})", f"secondary_bus {d.secondary_bus:#x} also claimed by {buses[key]}")
                buses[key] = a
        for a, d in k.devices.items():
            if d.parent is not None:
                p = k.devices.get(d.parent)
                if p is None or not p.bridge:
                    self.fail(f"devices ({a})", f"parent {d.parent} is not a bridge in the spec")
            seen = {a}
            cur = d
            while True:
                nxt = cur.parent if cur.parent is not None else buses.get((cur.addr.domain, cur.addr.bus))
                if nxt is None:
                    break
                if nxt in seen:
                    self.fail(f"devices ({a})", "bridge parents form a cycle")
                seen.add(nxt)
                cur = k.devices[nxt]
        vgas = [a for a, d in k.devices.items() if d.boot_vga]
        if len(vgas) > 1:
            self.fail("devices", f"more than one boot_vga device: {', '.join(map(str, sorted(vgas)))}")
        for a, d in k.devices.items():
            sr = d.sriov
            if sr is None:
                continue
            for n in range(sr.totalvfs):
                try:
                    vf = vf_address(d, n)
                except ValueError:
                    self.fail(f"devices ({a})", "VF routing ids run past bus ff")
                if vf in k.devices:
                    self.fail(f"devices ({a})", f"VF {n} would be at {vf}, which the spec already uses")

    def blocks(self, spec: dict) -> None:
        k = self.k
        used: dict[str, str] = {}
        counters: dict[int, int] = {259: 0}

        def number(name: str, disk: str | None, explicit: Any, where: str) -> tuple[int, int]:
            if explicit is not None:
                if not (isinstance(explicit, str) and re.fullmatch(r"\d+:\d+", explicit)):
                    self.fail(where, f"block dev must be \"MAJ:MIN\", got {explicit!r}")
                maj, mnr = map(int, explicit.split(":"))
            else:
                m = re.fullmatch(r"(sd|vd)([a-z])(\d*)", name)
                if m:
                    maj = 8 if m[1] == "sd" else 254
                    mnr = (ord(m[2]) - ord("a")) * 16 + int(m[3] or 0)
                else:
                    maj, mnr = 259, counters[259]
                    counters[259] += 1
            dev = f"{maj}:{mnr}"
            if dev in used:
                self.fail(where, f"block {name} number {dev} already used by {used[dev]}")
            used[dev] = name
            return maj, mnr

        names: set[str] = set()
        for dev, raw, where in self.raw_blocks:
            if not isinstance(raw, list):
                self.fail(where, "block must be a list")
            entries = []
            for b in raw:
                if isinstance(b, str):
                    entries.append((b, None))
                elif isinstance(b, dict) and set(b) <= {"name", "dev"} and isinstance(b.get("name"), str):
                    entries.append((b["name"], b.get("dev")))
                else:
                    self.fail(where, f"bad block entry {b!r} (a name or {{\"name\", \"dev\"}})")
            listed = [n for n, _ in entries]
            for name, explicit in entries:
                if not NAME_RE.match(name) or name in names:
                    self.fail(where, f"bad or duplicate block name {name!r}")
                names.add(name)
                disk = next((d for d in listed if d != name and re.fullmatch(re.escape(d) + r"p?\d+", name)), None)
                maj, mnr = number(name, disk, explicit, where)
                dev.block.append(SimBlock(name, maj, mnr, disk))
        for i, raw in enumerate(spec.get("dm", [])):
            where = f"dm[{i}]"
            raw = self.keys(raw, {"name", "slaves", "dev", "dm_name"}, where)
            dm = raw.get("name")
            if not isinstance(dm, str) or not NAME_RE.match(dm) or dm in names:
                self.fail(where, f"bad or duplicate name {dm!r}")
            names.add(dm)
            maj, mnr = number(dm, None, raw.get("dev", f"253:{i}"), where)
            slaves = self.names(raw, "slaves", where)
            dm_name = self.typed(raw, "dm_name", (str,), where, dm)
            if not NAME_RE.match(dm_name):
                self.fail(where, f"bad dm_name {dm_name!r}")
            k.dm_names[dm] = dm_name
            k.dm.append((SimBlock(dm, maj, mnr), slaves))
        for i, (_, slaves) in enumerate(k.dm):
            for s in slaves:
                if s not in names:
                    self.fail(f"dm[{i}]", f"unknown slave block device {s!r}")
        for i, m in enumerate(spec.get("mounts", [])):
            where = f"mounts[{i}]"
            m = self.keys(m, {"block", "source", "mountpoint", "fstype", "options"}, where)
            if any(not isinstance(m.get(key, ""), str) or re.search(r"\s", m.get(key, ""))
                   for key in ("source", "fstype", "options")):
                self.fail(where, "source, fstype and options must be strings without blanks")
            if not isinstance(m.get("mountpoint"), str) or not m["mountpoint"].startswith("/"):
                self.fail(where, "mountpoint must be an absolute path")
            if m.get("block") is not None and m["block"] not in names:
                self.fail(where, f"unknown block device {m['block']!r}")
            k.mounts.append({kk: str(vv) for kk, vv in m.items() if vv is not None})
        swaps = spec.get("swaps", [])
        if not isinstance(swaps, list):
            self.fail("swaps", "must be a list")
        for s in swaps:
            if not isinstance(s, str) or (not s.startswith("/") and s not in names):
                self.fail("swaps", f"unknown block device {s!r} (or give an absolute swap file path)")
            k.swaps.append(s)

    def net(self, spec: dict) -> None:
        k = self.k
        names: set[str] = {"lo"}
        for a, d in sorted(k.devices.items()):
            for n in d.net:
                if n in names:
                    self.fail(f"devices ({a})", f"duplicate interface name {n!r}")
                names.add(n)
        for i, raw in enumerate(spec.get("virtual_net", [])):
            where = f"virtual_net[{i}]"
            raw = self.keys(raw, {"name", "brif", "lower"}, where)
            name = raw.get("name")
            if not isinstance(name, str) or not NAME_RE.match(name) or name in names:
                self.fail(where, f"bad or duplicate name {name!r}")
            names.add(name)
            entry = {}
            for key in ("brif", "lower"):
                if key in raw:
                    entry[key] = self.names(raw, key, where)
            k.virtual_net[name] = entry
        for name, entry in k.virtual_net.items():
            for port in entry.get("brif", []) + entry.get("lower", []):
                if port not in names:
                    self.fail(f"virtual_net ({name})", f"unknown interface {port!r}")
        for key in ("default_route", "default_route6"):
            v = spec.get(key)
            if v is not None and v not in names:
                self.fail(key, f"unknown interface {v!r}")
            setattr(k, key, v)
        routes = spec.get("routes", [])
        if not isinstance(routes, list):
            self.fail("routes", "must be a list")
        for i, r in enumerate(routes):
            where = f"routes[{i}]"
            r = self.keys(r, {"dest", "dev", "via", "metric"}, where)
            if r.get("dev") not in names:
                self.fail(where, f"unknown interface {r.get('dev')!r}")
            try:
                dest = ipaddress.ip_network(r.get("dest", ""), strict=False)
                via = ipaddress.ip_address(r["via"]) if r.get("via") is not None else None
            except (ValueError, TypeError) as e:
                self.fail(where, f"bad dest or via: {e}")
            if via is not None and via.version != dest.version:
                self.fail(where, "via and dest must be the same IP version")
            metric = self.typed(r, "metric", (int,), where, 0)
            k.routes.append(SimRoute(dest=dest, dev=r["dev"], via=via, metric=metric))
