"""PCI addresses, parsed once and validated strictly.

Every sysfs path hostdevd builds starts from a :class:`PciAddress`; a string
from a user, an XML file or a socket never reaches a path until it has been
through :func:`PciAddress.parse` or :func:`PciAddress.from_parts`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidAddress

# DDDD:BB:SS.F, or BB:SS.F (domain 0), as lspci and sysfs print it.
_BDF_RE = re.compile(
    r"^(?:(?P<domain>[0-9a-fA-F]{4}):)?(?P<bus>[0-9a-fA-F]{2}):(?P<slot>[0-9a-fA-F]{2})\.(?P<function>[0-7])$"
)
# libvirt reads PCI address attributes with strtoul(base 0): 0x-hex, 0-prefixed octal, decimal.
_NUM_RE = re.compile(r"^(?:0[xX][0-9a-fA-F]{1,8}|0[0-7]{1,11}|[1-9][0-9]{0,9}|0)$")

_LIMITS = {"domain": 0xFFFF, "bus": 0xFF, "slot": 0x1F, "function": 0x7}
_PARSED: dict[str, PciAddress] = {}     # text -> its address (PciAddress.parse); bounded
_PARSED_MAX = 1 << 16


@dataclass(frozen=True, order=True, slots=True)
class PciAddress:
    domain: int
    bus: int
    slot: int
    function: int

    def __post_init__(self) -> None:
        for field, limit in _LIMITS.items():
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
                raise InvalidAddress(f"PCI {field} {value!r} out of range 0..{limit:#x}")

    @classmethod
    def parse(cls, text: str) -> PciAddress:
        """Parse ``DDDD:BB:SS.F`` or ``BB:SS.F``; raise InvalidAddress otherwise. Addresses are
        values (frozen): one parsed before is handed out again (a ledger of 1,000 claims parses
        its addresses on every read)."""
        hit = _PARSED.get(text) if isinstance(text, str) else None
        if hit is not None and cls is PciAddress:
            return hit
        if not isinstance(text, str) or len(text) > 16:
            raise InvalidAddress(f"not a PCI address: {str(text)[:40]!r} (expected DDDD:BB:SS.F)")
        m = _BDF_RE.match(text.strip())
        if not m:
            raise InvalidAddress(f"not a PCI address: {text!r} (expected DDDD:BB:SS.F, e.g. 0000:01:00.0)")
        addr = cls(
            int(m["domain"] or "0", 16), int(m["bus"], 16), int(m["slot"], 16), int(m["function"], 16)
        )
        if cls is PciAddress:
            if len(_PARSED) >= _PARSED_MAX:
                _PARSED.clear()
            _PARSED[text] = addr
        return addr

    @classmethod
    def from_parts(cls, domain: str | None, bus: str | None, slot: str | None,
                   function: str | None) -> PciAddress:
        """Build from libvirt XML attributes (``0x``-hex or decimal; domain/function default 0)."""
        values = []
        for name, raw in (("domain", domain), ("bus", bus), ("slot", slot), ("function", function)):
            if raw is None:
                if name in ("bus", "slot"):
                    raise InvalidAddress(f"PCI address is missing its {name} attribute")
                values.append(0)
                continue
            raw = raw.strip()
            if not _NUM_RE.match(raw):
                raise InvalidAddress(f"PCI {name}={raw[:20]!r} is not a number (use 0x-hex or decimal)")
            values.append(int(raw, 0) if raw[:2].lower() == "0x" or raw == "0"
                          else int(raw, 8) if raw.startswith("0") else int(raw, 10))
        return cls(*values)

    def __str__(self) -> str:
        return f"{self.domain:04x}:{self.bus:02x}:{self.slot:02x}.{self.function:x}"

    @property
    def slot_id(self) -> tuple[int, int, int]:
        """Domain, bus and slot: the functions of one multifunction device share it."""
        return (self.domain, self.bus, self.slot)
