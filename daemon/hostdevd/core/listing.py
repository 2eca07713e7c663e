"""Read the IOMMU-group listings people post when they ask for passthrough help.

:func:`parse_listing` turns such a paste into a :class:`Topology` (source
``"listing"``) so hostdevd can reason about a host it cannot see. Shapes read:

* one line per device, the Arch wiki script (``printf 'IOMMU Group %s '; lspci -nns``)::

      IOMMU Group 1 01:00.0 VGA compatible controller [0300]: NVIDIA Corporation GP104 [10de:1b80] (rev a1)

  in any case, ``:`` after the number or not, tabs or spaces, any order,
  with or without the ``0000:`` domain; also ``Group:  1   0000:01:00.0 ...``;
* a header per group (``IOMMU Group 1:``, ``IOMMU group 1``, ``### Group 1 ###``,
  ``IOMMU Group: 1``) followed by ``lspci -nn``/``-nns``/``-nnD`` lines,
  indented or not; the first device may share the header's line;
* ``lspci -nnk`` / ``-nnv`` continuation lines: ``Kernel driver in use: X``
  (and a trailing ``Driver: X``) sets the device's driver, everything else
  (``Subsystem:``, ``Kernel modules:``, ``Flags:``, ...) is ignored;
* ``lspci -n`` lines (``01:00.0 0300: 10de:1b80 (rev a1)``), which carry no names.

Rules:

* A *device line* is one that starts (after the optional ``IOMMU Group N``) with
  something BDF-like followed by white space. Inside a group section it must be a
  well-formed ``lspci -nn`` line or the parse fails naming the line; outside
  one it is kept as an ungrouped device when well formed and ignored otherwise.
* A group section runs from its header to the next header or to a *break*:
  a shell prompt or command (``$ ...``, ``root@pve:~# ...``, ``for d in ...``),
  a Markdown code fence, or an unindented line ending in ``:`` ("Here is my
  lspci -nn:"). Blank lines and other text do not end it.
* The vendor:device pair is the last ``[xxxx:xxxx]`` bracket; the class is the
  first ``[cccc]`` followed by ``:``. ``(prog-if xx)`` fills the last byte of
  :attr:`Device.pci_class`, which is otherwise ``cccc00``.
* A device listed twice is merged when both lines agree; different groups or
  different IDs for one address raise :class:`ListingError`. A later driver
  line wins over an earlier one (pastes of "before" and "after").
* A text without a single grouped device line raises :class:`ListingError`.
* Forum markup is read through, line by line (line numbers stay those of the paste):
  BBCode tags (``[CODE]``, ``[COLOR=...]``, ``[B]``, ``[QUOTE]``, ``[SPOILER]``, ``[FONT=...]``,
  ``[SIZE=...]``, ...), HTML tags (``<pre>``, ``<code>``, ``<span style=...>``, ...) and
  entities (``&gt;``, ``&amp;``, ``&nbsp;``); ``<br>`` splits a line. ``[CODE]`` and
  ``<pre>`` blocks start and end sections as Markdown fences do.
* Nothing is dropped without a word: :func:`read_listing` also returns the lines it did
  not understand (:class:`Unparsed`). Understood are blank lines, headers, device lines,
  driver lines, the other ``lspci -v``/``-k`` lines after a device line (indented, or
  starting with an lspci field such as ``Subsystem:``), breaks and trim marks (``...``,
  ``[snip]``). Everything else is *not understood*: a device-like line outside any group
  that is not a well-formed ``lspci -nn`` line, and any other text (prose included: the
  parser cannot tell prose from a device line it failed to recognise).

Nothing here knows which devices the host needs (root disk, console, network):
a listing carries no such facts, so ``critical`` is empty and
:func:`class_warnings` offers cautions by class instead.
"""
from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

from .address import PciAddress
from .device import BRIDGE_CLASSES, STUB_DRIVERS, Device
from .errors import HostdevError, ListingError
from .topology import Topology

__all__ = ["parse_listing", "read_listing", "Listing", "Unparsed", "class_warnings", "LISTING_HINT",
           "MAX_LISTING_CHARS"]

LISTING_HINT = (
    "paste the output of: for d in /sys/kernel/iommu_groups/*/devices/*; do "
    "n=${d#*/iommu_groups/*}; n=${n%%/*}; printf 'IOMMU Group %s ' \"$n\"; "
    "lspci -nns \"${d##*/}\"; done"
)
_LINE_HINT = (
    "expected an `lspci -nn` line such as `01:00.0 VGA compatible controller [0300]: "
    "NVIDIA Corporation GP104 [10de:1b80] (rev a1)`; run lspci with -nn"
)
MAX_LISTING_CHARS = 4 * 1024 * 1024

_F = re.IGNORECASE | re.ASCII

# Markdown quotes, bullets and bold that forums wrap around pasted lines.
_DECOR_RE = re.compile(r"^[\s>*\-+|`]*", _F)
# "IOMMU Group 1", "IOMMU group 1:", "### Group 1 ###", "IOMMU Group: 1", "Group:  1".
_HEADER_RE = re.compile(
    r"^#*\s*(?P<iommu>iommu[\s_-]*)?group\s*:?\s*(?P<group>[0-9]{1,9})(?![0-9a-z.])\s*(?:[:#*]+\s*)?(?P<rest>.*)$",
    _F
)
# Something that looks like a PCI address at the start of a line, loosely: it
# makes the line a device line; strict validation comes after.
_BDFISH_RE = re.compile(
    r"^(?P<bdf>(?:[0-9a-f]{1,8}:)?[0-9a-f]{2}:[0-9a-f]{2}\.[0-9a-f])(?=\s|$)(?P<rest>.*)$", _F
)
_BDF_RE = re.compile(
    r"^(?:(?P<domain>[0-9a-f]{1,8}):)?(?P<bus>[0-9a-f]{2}):(?P<slot>[0-9a-f]{2})\.(?P<function>[0-9a-f])$", _F
)
# lspci -nn: "VGA compatible controller [0300]: NVIDIA ... [10de:1b80] (rev a1)"
_CLASS_RE = re.compile(r"\[(?P<cls>[0-9a-f]{4})\]\s*:", _F)
_IDS_RE = re.compile(r"\[(?P<vendor>[0-9a-f]{4}):(?P<device>[0-9a-f]{4})\]", _F)
# lspci -n: "0300: 10de:1b80 (rev a1)"
_NUMERIC_RE = re.compile(
    r"^(?:class\s+)?(?P<cls>[0-9a-f]{4}):\s+"
    r"(?P<vendor>[0-9a-f]{4}):(?P<device>[0-9a-f]{4})(?![0-9a-z])(?P<tail>.*)$", _F
)
_PROGIF_RE = re.compile(r"\(prog-if\s+(?P<progif>[0-9a-f]{2})\b", _F)
_TRAIL_DRIVER_RE = re.compile(r"(?:^|\s)driver:\s*(?P<driver>[A-Za-z0-9_.+-]{1,64})", _F)
_KDRIVER_RE = re.compile(r"^kernel\s+driver\s+in\s+use\s*:\s*(?P<driver>[A-Za-z0-9_.+-]{1,64})\s*$", _F)
# Section breaks: prompts, shell commands, code fences.
_PROMPT_RE = re.compile(
    r"^(?:\[[^\]]{0,80}\]\s*[$#%]|[\w.-]{1,64}@[\w.-]{1,64}[^\s$#%]{0,80}\s*[$#%]|[$#%])(?:\s|$)", _F
)
_COMMAND_RE = re.compile(
    r"^(?:for|do|done|echo|printf|lspci|sudo|doas|find|shopt|cat|ls|bash|sh|zsh|n=|\./|#!)(?:\s|$|[;/])", _F
)
_FENCE_RE = re.compile(r"^[\s>]*(?:```|~~~)")
# Forum markup. Tag names are listed so that lspci's own brackets ([0300], [AMD/ATI], [E:B],
# <access denied>) are never taken for tags; attribute values stop at the next bracket.
_CODE_OPEN_RE = re.compile(r"\[code(?:=[^\[\]\n]{0,64})?\]|<pre(?:\s[^<>]*)?>", re.I)
_CODE_CLOSE_RE = re.compile(r"\[/code\]|</pre\s*>", re.I)
_BBCODE_RE = re.compile(
    r"\[/?(?:b|i|u|s|strike|color|colour|font|size|quote|spoiler|ispoiler|icode|plain|noparse|indent|"
    r"left|center|right|justify|highlight|tt|sub|sup|url|email|list|\*|hr|table|tr|td|th|heading|user)"
    r"(?:=[^\[\]\n]{0,200})?\]", re.I)
_HTML_TAG_RE = re.compile(
    r"</?(?:span|code|kbd|samp|tt|var|b|i|u|s|strike|strong|em|font|small|big|sub|sup|mark|del|ins|a|"
    r"blockquote|q|cite|ul|ol|table|tbody|thead|td|th|hr|wbr|details|summary|section|article|"
    r"p|div|li|tr|br|pre)(?:\s[^<>]*)?/?>", re.I)
# What makes a new line in rendered HTML: a paste may hold the whole listing on one source line.
_HTML_LINE_RE = re.compile(r"<br\s*/?>|</?(?:p|div|li|tr)(?:\s[^<>]*)?>", re.I)
# Lines of lspci -v/-vv/-k after a device line, when a paste lost their indentation.
_LSPCI_FIELD_RE = re.compile(
    r"^(?:subsystem|devicename|flags|capabilities|kernel\s+modules|bus|physical\s+slot|control|status|"
    r"latency|interrupt|numa\s+node|secondary\s+status|bridgectl|(?:prefetchable\s+)?memory\s+behind\s+bridge|"
    r"i/o\s+behind\s+bridge|region\s+[0-9]+)\s*:|^(?:memory|i/o\s+ports|expansion\s+rom)\s+at\s", _F)
# Where a poster cut something out.
_TRIM_RE = re.compile(r"^(?:\.{2,}|\u2026|[\[(<]\s*(?:\.{2,}|\u2026|snip(?:ped)?)\s*[\])>]|snip(?:ped)?)$", _F)
# Unicode spaces forums turn tabs and indentation into.
_SPACES = str.maketrans(dict.fromkeys("\xa0\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
                                      "\u2008\u2009\u200a\u202f\u205f\u3000", " "))


@dataclass
class _Seen:
    device: Device
    line: int


UNPARSED_SHOWN = 5          # lines of their text kept for the report
_SHOWN_CHARS = 120


@dataclass
class Unparsed:
    """Lines of a listing that were not understood: how many, and the first few (line, text)."""
    count: int = 0
    lines: list[tuple[int, str]] = field(default_factory=list)

    def add(self, lineno: int, text: str) -> None:
        self.count += 1
        if len(self.lines) < UNPARSED_SHOWN:
            self.lines.append((lineno, _cut(" ".join(text.split()), _SHOWN_CHARS)))

    def to_json(self) -> dict:
        return {"count": self.count, "lines": [{"line": n, "text": t} for n, t in self.lines]}

    def message(self) -> str | None:
        """One line for a person, or None when every line was understood."""
        if not self.count:
            return None
        shown = ", ".join(f"line {n} {_cut(t, 60)!r}" for n, t in self.lines[:3])
        more = f" and {self.count - 3:,} more" if self.count > 3 else ""
        lines = "1 line" if self.count == 1 else f"{self.count:,} lines"
        return (f"{lines} of the listing not understood, skipped: {shown}{more}: if one is a device, "
                "paste it as `lspci -nn` prints it")


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n - 1] + "\u2026"


@dataclass
class Listing:
    """A parsed listing: the topology, and what of the paste was not understood."""
    topology: Topology
    unparsed: Unparsed


def _fail(lineno: int, message: str, hint: str | None = _LINE_HINT) -> ListingError:
    return ListingError(f"line {lineno}: {message}", hint)


def _address(text: str, lineno: int) -> PciAddress:
    m = _BDF_RE.match(text)
    if not m:  # pragma: no cover - _BDFISH_RE already matched the same shape
        raise _fail(lineno, f"not a PCI address: {text!r}")
    try:
        return PciAddress(int(m["domain"] or "0", 16), int(m["bus"], 16),
                          int(m["slot"], 16), int(m["function"], 16))
    except HostdevError as e:
        raise _fail(lineno, f"{text!r} is not a PCI address ({e.message})",
                    "addresses look like 0000:01:00.0 (slot 00-1f, function 0-7)") from e


def _parse_device(bdf: str, rest: str, group: int | None, lineno: int) -> Device | None:
    """One device line; None when *rest* is not a device description."""
    rest = rest.strip()
    m = _NUMERIC_RE.match(rest)
    if m:
        cls, vendor, device, name, tail = m["cls"], m["vendor"], m["device"], None, m["tail"]
    else:
        c = _CLASS_RE.search(rest)
        if not c:
            return None
        desc = rest[c.end():]
        ids = list(_IDS_RE.finditer(desc))
        if not ids:
            return None
        last = ids[-1]
        cls, vendor, device = c["cls"], last["vendor"], last["device"]
        name = desc[:last.start()].strip() or None
        tail = desc[last.end():]
    address = _address(bdf, lineno)
    p = _PROGIF_RE.search(tail)
    cls = cls.lower()
    d = _TRAIL_DRIVER_RE.search(tail)
    return Device(
        address=address,
        vendor=vendor.lower(),
        device=device.lower(),
        pci_class=cls + (p["progif"].lower() if p else "00"),
        bridge=cls in BRIDGE_CLASSES,
        group=group,
        driver=d["driver"] if d else None,
        name=name,
    )


def _lines(text: str) -> list[tuple[int, str, bool, bool]]:
    """(line number, text, a code block opens before it, one closes after it) with forum markup
    taken out; ``<br>`` gives several entries with the paste's line number."""
    out = []
    for lineno, physical in enumerate(re.split(r"\r\n|\r|\n", text), start=1):
        pieces = _HTML_LINE_RE.split(physical) if "<" in physical else [physical]
        for piece in pieces:
            opens = closes = False
            if "[" in piece or "<" in piece:
                opens, closes = bool(_CODE_OPEN_RE.search(piece)), bool(_CODE_CLOSE_RE.search(piece))
                if opens or closes:
                    piece = _CODE_CLOSE_RE.sub("", _CODE_OPEN_RE.sub("", piece))
                piece = _HTML_TAG_RE.sub("", _BBCODE_RE.sub("", piece))
            if "&" in piece:
                piece = html.unescape(piece)
            out.append((lineno, piece.translate(_SPACES).rstrip(), opens, closes))
    return out


def _is_break(raw: str, line: str) -> bool:
    if _PROMPT_RE.match(line) or _COMMAND_RE.match(line):
        return True
    # "Here is my lspci -nn output:" -- unindented prose introducing something else.
    return not raw[:1].isspace() and line.endswith(":")


def parse_listing(text: str) -> Topology:
    """Parse a pasted IOMMU-group listing; raise :class:`ListingError` if it holds none."""
    return read_listing(text).topology


def read_listing(text: str) -> Listing:
    """:func:`parse_listing`, and the lines that were not understood."""
    if not isinstance(text, str):
        raise ListingError("an IOMMU group listing must be text", LISTING_HINT)
    if len(text) > MAX_LISTING_CHARS:
        raise ListingError(f"listing is too large ({len(text)} characters, at most {MAX_LISTING_CHARS})",
                           "paste only the IOMMU group listing")
    seen: dict[PciAddress, _Seen] = {}
    unparsed = Unparsed()
    group: int | None = None
    last: Device | None = None
    block = False       # after a device line: its lspci -v/-k lines may follow

    for lineno, raw, opens, closes in _lines(text.lstrip("\ufeff")):
        if opens:
            group, last, block = None, None, False
        if _FENCE_RE.match(raw):
            group, last, block = None, None, False
            continue
        line = _DECOR_RE.sub("", raw).rstrip("*` ")
        if line:
            group, last, block = _read_line(lineno, raw, line, group, last, block, seen, unparsed)
        if closes:
            group, last, block = None, None, False

    if not any(s.device.group is not None for s in seen.values()):
        raise ListingError("no IOMMU group lines found", LISTING_HINT)
    devices = {a: seen[a].device for a in sorted(seen)}
    return Listing(Topology(devices=devices, iommu_active=True, source="listing", critical={}), unparsed)


def _read_line(lineno: int, raw: str, line: str, group: int | None, last: Device | None, block: bool,
               seen: dict[PciAddress, _Seen], unparsed: Unparsed) -> tuple[int | None, Device | None, bool]:
    """One non-blank line: the section's group, the device driver lines apply to, and whether
    lspci -v/-k lines may follow, after it."""
    in_section = False
    h = _HEADER_RE.match(line)
    if h:
        rest = h["rest"].strip()
        bdfish = _BDFISH_RE.match(rest) is not None
        # "Group 3 has my GPU" is prose; "IOMMU Group 3 (2 devices)" is a header.
        if h["iommu"] or bdfish or not rest:
            group, last, block = int(h["group"]), None, False
            if not bdfish:
                return group, last, block
            line, in_section = rest, True
    b = _BDFISH_RE.match(line)
    if b:
        in_section = in_section or group is not None
        try:
            dev = _parse_device(b["bdf"], b["rest"], group if in_section else None, lineno)
        except ListingError:
            if in_section:
                raise
            dev = None
        if dev is None:
            if in_section:
                raise _fail(lineno, f"not an `lspci -nn` device line: {line[:80]!r}")
            # Outside any group: someone else's output (lspci without -nn). Not an error, but said.
            unparsed.add(lineno, line)
            return group, None, True
        return group, _merge(seen, dev, lineno), True
    k = _KDRIVER_RE.match(line)
    if k:
        if last is not None:
            last.driver = k["driver"]
        return group, last, block
    if block and (raw[:1].isspace() or _LSPCI_FIELD_RE.match(line)):
        return group, last, block       # Subsystem:, Kernel modules:, Flags:, Memory at ... of the device above
    if _is_break(raw, line):
        return None, None, False
    if not _TRIM_RE.match(line):
        unparsed.add(lineno, line)
    return group, last, False


def _merge(seen: dict[PciAddress, _Seen], dev: Device, lineno: int) -> Device:
    """Record *dev*; return the Device later driver lines should update."""
    prev = seen.get(dev.address)
    if prev is None:
        seen[dev.address] = _Seen(dev, lineno)
        return dev
    old = prev.device
    if (old.vendor, old.device, old.class_code) != (dev.vendor, dev.device, dev.class_code):
        raise _fail(lineno, f"{dev.address} is {dev.vendor_device} class {dev.class_code} here but "
                            f"{old.vendor_device} class {old.class_code} on line {prev.line}",
                    "paste the listing of one host only")
    if old.group is not None and dev.group is not None and old.group != dev.group:
        raise _fail(lineno, f"{dev.address} is in IOMMU group {dev.group} here but in group "
                            f"{old.group} on line {prev.line}",
                    "paste one complete listing from one boot of one host")
    if old.group is None and dev.group is not None:
        old.group = dev.group
        prev.line = lineno
    if dev.driver is not None:
        old.driver = dev.driver
    if old.name is None:
        old.name = dev.name
    if old.pci_class.endswith("00") and not dev.pci_class.endswith("00"):
        old.pci_class = dev.pci_class
    return old


# --- cautions by class ---------------------------------------------------------------------

_DISPLAY_CLASSES = ("0300", "0380")   # VGA and "display controller"; 0302 (3D) drives no console


def class_warnings(topology: Topology) -> dict[PciAddress, str]:
    """Cautions by device class for hosts whose critical devices are unknown.

    A listing cannot say which disk holds the root filesystem, which GPU shows
    the console or where the keyboard is plugged in; these warnings say what a
    device of that class may be. Devices already on vfio-pci or pci-stub (the
    host does not use them) and addresses in ``topology.critical`` are skipped.
    """
    out: dict[PciAddress, str] = {}
    devices = sorted(topology.devices.values(), key=lambda d: d.address)
    displays = [d for d in devices if d.class_code in _DISPLAY_CLASSES]
    nics = [d for d in devices if d.class_code == "0200"]
    display_slots = {d.address.slot_id for d in devices if d.class_code.startswith("03")}
    for d in devices:
        if d.address in topology.critical or d.on_vfio or d.driver in STUB_DRIVERS:
            continue
        cc = d.class_code
        if cc.startswith("01"):
            out[d.address] = "storage controller: may hold the host's root filesystem"
        elif cc in _DISPLAY_CLASSES and len(displays) == 1:
            out[d.address] = "the only display controller: likely the host console"
        elif cc == "0c03" and d.address.slot_id not in display_slots:
            # A GPU's own USB-C controller (Turing) rarely carries the keyboard.
            out[d.address] = "USB controller: may carry the host's keyboard"
        elif cc == "0200" and len(nics) == 1:
            out[d.address] = "the only Ethernet controller: may be the host's network link"
    return out

