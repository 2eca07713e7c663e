"""CPU and node lists as the kernel and libvirt write them: "0-3,8,10-11", libvirt's "^2" exclusions.

Pure; :mod:`.sysfs_preflight` reads node cpulists with it and :mod:`.domxml` a domain's
``cpuset`` and ``nodeset`` attributes.
"""
from __future__ import annotations

import re

MAX_CPU = 16383          # larger than any host: a number above it is a mistake, not a CPU
_ITEM_RE = re.compile(r"^(\^)?([0-9]{1,5})(?:-([0-9]{1,5}))?$")


def parse_cpuset(text: str, limit: int = MAX_CPU) -> frozenset[int] | None:
    """The set a list names; None when it is malformed (a range backwards, a number over ``limit``).
    An empty list is the empty set (a memory-only NUMA node's cpulist)."""
    text = text.strip()
    if not text:
        return frozenset()
    include: set[int] = set()
    exclude: set[int] = set()
    for item in text.split(","):
        m = _ITEM_RE.match(item.strip())
        if not m:
            return None
        lo = int(m[2])
        hi = int(m[3]) if m[3] is not None else lo
        if hi < lo or hi > limit or (m[1] and m[3] is not None):
            return None
        (exclude if m[1] else include).update(range(lo, hi + 1))
    return frozenset(include - exclude)


def format_cpuset(cpus: frozenset[int] | set[int]) -> str:
    """"0-3,8": the kernel's own compact form."""
    out: list[str] = []
    run: list[int] = []
    for c in sorted(cpus):
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [c]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)
