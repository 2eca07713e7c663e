"""Names from the PCI ID database (pci.ids), looked up lazily; pure.

pci.ids is about 1.4 MB and the inventory needs a few dozen names, so nothing is parsed up
front: a lookup finds its vendor line once (the vendor's block is remembered), then the device
line inside that block. Format (https://pci-ids.ucw.cz/, the file's own header)::

    vvvv  Vendor name
    <TAB>dddd  Device name
    <TAB><TAB>ssss ssss  Subsystem name     (skipped)
    C cc  Class name                        (the class section: never matches a vendor line)

:mod:`.sysfs_inventory` reads the file; this module only searches text.
"""
from __future__ import annotations

import re

_ID_RE = re.compile(r"^[0-9a-f]{4}$")
_NEXT_TOP = re.compile(r"^[^\t#\n]", re.M)          # the line after a vendor's block
_NAME_MAX = 200


def _clean(name: str) -> str | None:
    name = "".join(c for c in name.strip() if c.isprintable())[:_NAME_MAX]
    return name or None


class PciIds:
    """Lookups in one pci.ids text; ``PciIds("")`` knows no names (no file on the host)."""

    def __init__(self, text: str):
        self.text = text
        self._vendors: dict[str, tuple[str | None, int, int]] = {}    # id -> (name, block start, end)
        self._devices: dict[tuple[str, str], str | None] = {}

    def _vendor(self, vendor: str) -> tuple[str | None, int, int]:
        if vendor not in self._vendors:
            m = re.search(rf"^{vendor}  (.+)$", self.text, re.M)
            if m is None:
                self._vendors[vendor] = (None, 0, 0)
            else:
                nxt = _NEXT_TOP.search(self.text, m.end() + 1)
                self._vendors[vendor] = (_clean(m[1]), m.end(), nxt.start() if nxt else len(self.text))
        return self._vendors[vendor]

    def names(self, vendor: str, device: str) -> tuple[str | None, str | None]:
        """(vendor name, device name); None for what the file does not list. Ids are 4 hex digits."""
        vendor, device = vendor.lower(), device.lower()
        if not (_ID_RE.match(vendor) and _ID_RE.match(device)):
            return None, None
        vname, start, end = self._vendor(vendor)
        key = (vendor, device)
        if key not in self._devices:
            m = re.compile(rf"^\t{device}  (.+)$", re.M).search(self.text, start, end) if end else None
            self._devices[key] = _clean(m[1]) if m else None
        return vname, self._devices[key]
