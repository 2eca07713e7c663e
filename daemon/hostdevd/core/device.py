"""One PCI function, the single model of it whichever source described it.

:meth:`hostdevd.core.sysfs.Sysfs.read_device` fills every field from live sysfs;
:mod:`hostdevd.core.topology` reads it back from a JSON snapshot and
:mod:`hostdevd.core.listing` from a pasted IOMMU-group listing, which carry less
(no header type, usually no SR-IOV or reset facts: those fields keep their defaults).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .address import PciAddress

# PCI-to-PCI bridges (0604) and semi-transparent ones (0609): the only classes a
# listing can call bridges, since it carries no header type.
BRIDGE_CLASSES = ("0604", "0609")
VFIO = "vfio-pci"                     # the generic vfio driver (core/variants.py picks a variant over it)
VFIO_DRIVERS = (VFIO,)
STUB_DRIVERS = ("pci-stub",)


def is_vfio_driver(name: str | None) -> bool:
    """vfio-pci or a vendor variant (mlx5_vfio_pci, virtio_vfio_pci, ...): every one ends in vfio_pci.
    Module names use underscores; driver names in /sys/bus/pci/drivers may use dashes."""
    return name is not None and name.replace("-", "_").endswith("vfio_pci")


@dataclass
class Device:
    address: PciAddress
    vendor: str                   # "10de" (4 lower-case hex digits)
    device: str                   # "1401"
    pci_class: str                # "030000" (6 digits); class_code gives "0300"
    bridge: bool                  # header type != 0 (live) or class 0604/0609 (listing, unreadable config)
    group: int | None             # IOMMU group; None when the function has none
    driver: str | None = None
    driver_override: str | None = None
    name: str | None = None       # human description (listing, lspci)
    physfn: PciAddress | None = None
    virtfns: list[PciAddress] = field(default_factory=list)
    sriov_totalvfs: int | None = None
    sriov_numvfs: int | None = None
    sriov_drivers_autoprobe: bool | None = None
    boot_vga: bool = False
    reset_method: list[str] | None = None
    has_reset: bool = False
    has_vfio_dev: bool = False    # has vfio-dev/: bound to a vfio driver (6.1+: vfio-pci and every variant)
    net: list[str] = field(default_factory=list)
    # config[0x0e] & 0x7f from live sysfs; None when config is unreadable and for
    # snapshots and listings (which carry only ``bridge``).
    header_type: int | None = None
    # Subsystem ids ("1458:3702") from live sysfs: part of a device's identity across boots.
    # Not compared, and not in snapshots (which never carried them).
    subsystem: str | None = field(default=None, compare=False)
    # The kernel's modalias ("pci:v000015B3d0000101E..."), live sysfs only: what modules.alias matches.
    modalias: str | None = field(default=None, compare=False)

    @property
    def class_code(self) -> str:
        return self.pci_class[:4]

    @property
    def vendor_device(self) -> str:
        return f"{self.vendor}:{self.device}"

    @property
    def on_vfio(self) -> bool:
        # vfio-dev/ names every vfio driver on 6.1+; the name catches variants on older kernels.
        return self.driver in VFIO_DRIVERS or is_vfio_driver(self.driver) or self.has_vfio_dev

    @property
    def viable_for_vfio(self) -> bool:
        """The kernel's vfio_dev_viable(): may this member sit in an open group?"""
        return self.bridge or self.driver is None or self.on_vfio or self.driver in STUB_DRIVERS

    def to_json(self) -> dict:
        # The hostdevd-topology/1 snapshot shape; header_type is not part of it.
        d = {
            "address": str(self.address),
            "class": self.class_code,
            "vendor": self.vendor,
            "device": self.device,
            "bridge": self.bridge,
            "pci_class": self.pci_class,
            "driver": self.driver,
            "driver_override": self.driver_override,
            "name": self.name,
            "physfn": str(self.physfn) if self.physfn else None,
            "virtfns": [str(v) for v in self.virtfns],
            "sriov_totalvfs": self.sriov_totalvfs,
            "sriov_numvfs": self.sriov_numvfs,
            "sriov_drivers_autoprobe": self.sriov_drivers_autoprobe,
            "boot_vga": self.boot_vga,
            "reset_method": self.reset_method,
            "has_reset": self.has_reset,
            "has_vfio_dev": self.has_vfio_dev,
            "net": self.net,
        }
        return d
