"""Simulated hosts of a chosen size for the scale benchmarks (standard library only).

:func:`host_spec` takes the lab topology (``tests/topologies/lab.json``: root disk, default-route
NIC, 9p share, bridges, an SR-IOV PF) and adds e1000e functions on PCI domain 0001 until the host
has ``functions`` PCI functions: half of them single-function devices, each its own IOMMU group,
half two-function devices whose functions share a group (the GPU + HDMI audio case). The
resulting spec feeds ``SimKernel.from_spec`` or ``hostdevd run --sim FILE``.

    python bench/hostgen.py 4096 > /tmp/host4096.json
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAB = REPO / "tests" / "topologies" / "lab.json"
FIRST_GROUP = 1000
EXTRA_DOMAIN = 1


def host_spec(functions: int) -> dict:
    """The lab's spec grown to ``functions`` PCI functions (VFs of the lab's PF included)."""
    spec = copy.deepcopy(json.loads(LAB.read_text()))
    from_lab = lab_functions(spec)
    extra = max(0, functions - from_lab)
    devices = spec["devices"]
    group, n, bus, slot = FIRST_GROUP, 0, 1, 0
    while n < extra:
        pair = (group % 2 == 1) and extra - n >= 2
        for fn in range(2 if pair else 1):
            devices.append({"address": f"{EXTRA_DOMAIN:04x}:{bus:02x}:{slot:02x}.{fn}", "vendor": "8086",
                            "device": "10d3", "class": "020000", "group": group, "driver": "e1000e"})
            n += 1
        group += 1
        slot += 1
        if slot == 32:
            slot, bus = 0, bus + 1
    spec["description"] = f"bench host: the lab topology grown to {functions} PCI functions"
    return spec


def lab_functions(spec: dict) -> int:
    """PCI functions of a spec, its PFs' initial VFs included."""
    return len(spec["devices"]) + sum(int(d.get("sriov", {}).get("numvfs", 0)) for d in spec["devices"])


def extra_devices(spec: dict, groups: int) -> list[str]:
    """The first function of each of the first ``groups`` added groups (what a domain asks for)."""
    seen: dict[int, str] = {}
    for d in spec["devices"]:
        g = d.get("group")
        if isinstance(g, int) and g >= FIRST_GROUP and g not in seen:
            seen[g] = d["address"]
            if len(seen) == groups:
                break
    return list(seen.values())


if __name__ == "__main__":
    json.dump(host_spec(int(sys.argv[1]) if len(sys.argv) > 1 else 1024), sys.stdout, indent=1)
