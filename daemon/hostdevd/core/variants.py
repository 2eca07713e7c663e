"""Which vfio driver a device is bound to (R13): vfio-pci or a vendor variant driver.

The kernel's documented choice, which libvirt >= 10 makes for managed hostdevs too: the
device's ``modalias`` prefixed with ``vfio_`` is matched against the ``vfio_pci:`` aliases of
``/lib/modules/<release>/modules.alias``; the most specific match wins (the generic
``vfio_pci:v*d*sv*sd*bc*sc*i*`` matches every device and so always comes last); without a
match, or without the file, it is vfio-pci. A variant driver is what makes VF live migration
possible; plain vfio-pci on such a device loses it.

Two overrides win over the choice: ``<driver model='NAME'/>`` in the domain's ``<hostdev>``
(libvirt's) and ``[vfio_drivers]`` in hostdevd.toml. Either must name a vfio driver, never a
host driver, or the device is refused.

Pure: :mod:`.sysfs_vfio` reads the file and the loaded drivers into a :class:`VariantTable`.
Names are checked against :data:`NAME_RE` before they can become a path or a modprobe argument.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

from .device import VFIO, Device, is_vfio_driver

NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ALIAS_PREFIX = "vfio_pci:"
GENERIC_MODULE = "vfio_pci"
_ALIAS_RE = re.compile(r"^alias\s+(vfio_pci:\S+)\s+(\S+)\s*$")


def module_of(driver: str) -> str:
    """The module name of a driver: modules use underscores, drivers/ may show dashes."""
    return driver.replace("-", "_")


def same_driver(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and module_of(a) == module_of(b)


def canonical(driver: str) -> str:
    """How hostdevd names a vfio driver: "vfio-pci" (its driver name) or the variant's module name."""
    return VFIO if module_of(driver) == GENERIC_MODULE else module_of(driver)


def recorded(driver: str | None) -> str | None:
    """The ledger's ``vfio_driver``: None for vfio-pci, so older ledgers read the same."""
    if driver is None or module_of(driver) == GENERIC_MODULE or not NAME_RE.match(driver):
        return None
    return module_of(driver)


@dataclass(frozen=True)
class VfioAlias:
    pattern: str          # "vfio_pci:v000015B3d0000101Esv*sd*bc*sc*i*"
    module: str           # "mlx5_vfio_pci"

    @property
    def specificity(self) -> tuple[int, int]:
        """Fewer wildcards first, then the longer literal part: the kernel's "most specific"."""
        wild = sum(self.pattern.count(c) for c in "*?[")
        return wild, -(len(self.pattern) - wild)


def parse_vfio_aliases(text: str) -> tuple[VfioAlias, ...]:
    """The ``alias vfio_pci:... MODULE`` lines of modules.alias; other lines (and modules
    with unsafe names) are ignored."""
    out = []
    for line in text.splitlines():
        if not line.startswith("alias vfio_pci:"):
            continue
        m = _ALIAS_RE.match(line)
        if m and NAME_RE.match(m[2]):
            out.append(VfioAlias(m[1], module_of(m[2])))
    return tuple(out)


@dataclass(frozen=True)
class VariantTable:
    """What the running kernel offers: its vfio_pci: aliases and the PCI drivers loaded now."""
    release: str | None
    aliases: tuple[VfioAlias, ...] = ()
    found: bool = False                                   # modules.alias was read
    loaded: frozenset[str] = field(default_factory=frozenset)   # module names of /sys/bus/pci/drivers/*

    @property
    def modules(self) -> set[str]:
        return {a.module for a in self.aliases}

    def best(self, modalias: str) -> str | None:
        """The module of the most specific alias matching ``vfio_`` + modalias, or None."""
        key = "vfio_" + modalias
        hits = [a for a in self.aliases if fnmatch.fnmatchcase(key, a.pattern)]
        return min(hits, key=lambda a: a.specificity).module if hits else None

    def knows(self, driver: str) -> bool:
        m = module_of(driver)
        return m == GENERIC_MODULE or m in self.modules or m in self.loaded


@dataclass(frozen=True)
class DriverChoice:
    """The vfio driver for one device, where the choice came from, or why an override is refused."""
    driver: str                      # canonical(): "vfio-pci", "mlx5_vfio_pci"
    source: str                      # "default", "modules.alias", "<driver model>", "[vfio_drivers]"
    refusal: str | None = None       # reads after the device: "asks for driver 'mlx5_core' ..."
    hint: str = ""

    @property
    def variant(self) -> bool:
        return module_of(self.driver) != GENERIC_MODULE

    def __str__(self) -> str:
        """ "mlx5_vfio_pci (modules.alias)"; plain "vfio-pci" when nothing chose otherwise."""
        return self.driver if self.source == "default" else f"{self.driver} ({self.source})"


_HINT = ("name a vfio driver (vfio-pci, or a variant such as mlx5_vfio_pci that modules.alias lists under "
         "vfio_pci:), or drop the override")


def _override_problem(name: str, table: VariantTable | None) -> str | None:
    if not NAME_RE.match(name):
        return "is not a driver name (letters, digits, _ and - only)"
    if not (is_vfio_driver(name) or (table is not None and module_of(name) in table.modules)):
        return "is not a VFIO driver: a host driver would not hand the device to the guest"
    if table is not None and table.found and not table.knows(name):
        return f"is unknown to kernel {table.release}: not in its modules.alias and not loaded"
    return None


def choose_driver(dev: Device, table: VariantTable | None, model: str | None = None,
                  configured: str | None = None) -> DriverChoice:
    """``model``: the domain's ``<driver model=…>``; ``configured``: ``[vfio_drivers]``. The domain's
    word wins over the config's (libvirt's own override is the closer one), both over modules.alias."""
    for name, source in ((model, "<driver model>"), (configured, "[vfio_drivers]")):
        if name is None:
            continue
        problem = _override_problem(name, table)
        if problem is not None:
            return DriverChoice(VFIO, source, f"asks for driver {name[:64]!r} ({source}), which {problem}", _HINT)
        return DriverChoice(canonical(name), source)
    if table is None or not table.found or dev.modalias is None:
        return DriverChoice(VFIO, "default")
    module = table.best(dev.modalias)
    if module is None or module == GENERIC_MODULE:     # the generic alias: what every device gets
        return DriverChoice(VFIO, "default")
    return DriverChoice(canonical(module), "modules.alias")
