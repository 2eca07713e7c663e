"""The vfio half of :mod:`.sysfs`: variant drivers (R13) and who holds a device open (R14).

* modules.alias of the running kernel (``<modules root>/<release>/modules.alias``, read through
  the backend and cached per release: a new kernel's file is only read after a reboot anyway);
* which ``/sys/bus/pci/drivers`` entry a vfio module registered (vfio-pci's module is vfio_pci;
  variants use their module name, with underscores);
* the opens that keep a group from going back to the host: ``/dev/vfio/<group>`` (the legacy
  container path) and each member's ``/dev/vfio/devices/vfioN`` (iommufd; N from sysfs
  ``<BDF>/vfio-dev/vfioN``). QEMU with iommufd opens only the latter.

:class:`~hostdevd.core.sysfs.Sysfs` inherits it; only validated names become path components.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

from .address import PciAddress
from .device import is_vfio_driver
from .errors import InvalidAddress
from .variants import NAME_RE, VariantTable, module_of, parse_vfio_aliases

if TYPE_CHECKING:
    from .sysfs import HostBackend

_CDEV_RE = re.compile(r"^vfio[0-9]{1,6}$")
_RELEASE_RE = re.compile(r"^[A-Za-z0-9._+~-]{1,64}$")
# "kernel/drivers/iommu/iommufd/iommufd.ko.xz:" (modules.dep) or "...iommufd.ko" (modules.builtin)
_IOMMUFD_KO = re.compile(r"^\S*/iommufd\.ko(\.[a-z]+)?(:|$)", re.M)


def open_nodes_text(nodes: dict[str, int]) -> str:
    """For "... still open": '/dev/vfio/12 is', '/dev/vfio/12 and /dev/vfio/devices/vfio0 are'."""
    names = list(nodes) or ["its VFIO nodes"]
    return " and ".join(names) + (" is" if len(names) == 1 else " are")


class VfioReads:
    backend: HostBackend
    _variant_cache: dict[str, VariantTable]

    if TYPE_CHECKING:   # provided by Sysfs
        @staticmethod
        def _dev(addr: PciAddress, attr: str = "") -> str: ...
        def device_addresses(self) -> list[PciAddress]: ...
        def driver(self, addr: PciAddress) -> str | None: ...

    def vfio_bound_addresses(self) -> list[PciAddress]:
        """Every function on a vfio driver (vfio-pci, a variant by name, or any driver with a
        ``vfio-dev/`` directory, as Device.on_vfio says), from its driver link alone: one or two
        reads per function instead of read_device's dozen (the daemon's start, issue 13)."""
        out = []
        for addr in self.device_addresses():
            drv = self.driver(addr)
            if drv is None:
                continue
            if is_vfio_driver(drv) or self.backend.exists(self._dev(addr, "vfio-dev")):
                out.append(addr)
        return out

    # ----- R13: variant drivers -------------------------------------------
    def kernel_release(self) -> str | None:
        try:
            text = self.backend.proc_read("sys/kernel/osrelease").strip()
        except OSError:
            return None
        return text if _RELEASE_RE.match(text) and text not in (".", "..") else None

    def vfio_variants(self) -> VariantTable:
        """The running kernel's vfio_pci: aliases (cached per release) and the loaded PCI drivers."""
        release = self.kernel_release()
        cache, key = self._variant_cache, release or ""
        if key not in cache:
            table = VariantTable(release)
            if release is not None:
                try:
                    text = self.backend.modules_read(f"{release}/modules.alias")
                    table = VariantTable(release, parse_vfio_aliases(text), found=True)
                except (OSError, UnicodeDecodeError):
                    pass          # no modules.alias: every device gets vfio-pci
            cache[key] = table
        try:
            drivers = self.backend.listdir("bus/pci/drivers")
        except OSError:
            drivers = []
        base = cache[key]
        return VariantTable(base.release, base.aliases, base.found,
                            frozenset(module_of(d) for d in drivers if NAME_RE.match(d)))

    def pci_driver_name(self, driver: str) -> str | None:
        """The /sys/bus/pci/drivers entry of a driver or its module, as the kernel spells it
        ("vfio-pci" for vfio_pci, "mlx5_vfio_pci"), or None when it is not loaded."""
        if not NAME_RE.match(driver):
            return None
        mod = module_of(driver)
        try:     # the module says which PCI driver it registered (module/<m>/drivers/pci:<name>)
            for e in self.backend.listdir(f"module/{mod}/drivers"):
                name = e[4:] if e.startswith("pci:") else ""
                if NAME_RE.match(name) and self.backend.exists(f"bus/pci/drivers/{name}"):
                    return name
        except OSError:
            pass
        for name in dict.fromkeys((driver, mod, mod.replace("_", "-"))):
            if self.backend.exists(f"bus/pci/drivers/{name}"):
                return name
        return None

    # ----- R14: device cdevs and iommufd ----------------------------------
    def vfio_cdev(self, addr: PciAddress) -> str | None:
        """The device's vfio cdev name (``vfio-dev/vfio3`` gives "vfio3"): bound to a vfio driver, 6.1+."""
        try:
            names = sorted(e for e in self.backend.listdir(self._dev(addr, "vfio-dev")) if _CDEV_RE.match(e))
        except OSError:
            return None
        return names[0] if names else None

    def group_member_addresses(self, group: int) -> list[PciAddress]:
        """The group's PCI members, sorted; non-PCI members (platform devices) are not ours."""
        try:
            entries = self.backend.listdir(f"kernel/iommu_groups/{int(group)}/devices")
        except OSError:
            return []
        out = []
        for e in entries:
            try:
                out.append(PciAddress.parse(e))
            except InvalidAddress:
                continue
        return sorted(out)

    def vfio_open_nodes(self, group: int) -> dict[str, int]:
        """{"/dev/vfio/12": 1, "/dev/vfio/devices/vfio3": 1}: the group's nodes someone holds open."""
        nodes = [f"vfio/{int(group)}"]
        nodes += [f"vfio/devices/{c}" for a in self.group_member_addresses(group) if (c := self.vfio_cdev(a))]
        users = self.backend.dev_users(nodes)
        return {f"/dev/{n}": users[n] for n in nodes if users.get(n)}

    def vfio_users(self, group: int) -> int:
        """Opens of the group node and of every member's device cdev: 0 means QEMU let go (R6, R14)."""
        return sum(self.vfio_open_nodes(group).values())

    def iommufd_node_exists(self) -> bool:
        return self.backend.dev_exists("iommu")

    def iommufd_support(self) -> str:
        """'ready' (/dev/iommu exists), 'module' (iommufd.ko is in modules.dep, not loaded), 'absent'
        (the running kernel has it neither as a module nor built in: CONFIG_IOMMUFD unset, as in
        Debian 13's 6.12), or 'unknown' (neither file readable)."""
        if self.iommufd_node_exists():
            return "ready"
        release = self.kernel_release()
        read_any = False
        for name in ("modules.dep", "modules.builtin"):
            try:
                text = self.backend.modules_read(f"{release}/{name}") if release else ""
            except (OSError, UnicodeDecodeError):
                continue
            read_any = read_any or bool(release)
            if _IOMMUFD_KO.search(text):
                # built in but no /dev/iommu would be odd: say unknown rather than guess
                return "module" if name == "modules.dep" else "unknown"
        return "absent" if read_any else "unknown"

    def vfio_cdev_node_exists(self, cdev: str) -> bool:
        return bool(_CDEV_RE.match(cdev)) and self.backend.dev_exists(f"vfio/devices/{cdev}")
