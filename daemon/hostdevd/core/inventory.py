"""``hostdevctl groups --json``: the versioned inventory (``"schema": "hostdevd-inventory/1"``).

The output is the hostdevd-topology/1 snapshot (``Topology.to_json``: ``groups[].group``,
``groups[].devices[]``, ``ungrouped``, ``critical``; ``groups --save`` writes it and ``--snapshot``
reads it back) plus what the groups command adds (``owner``, ``vfio_driver``) plus the
inventory keys below. Keys are only ever added within /1; a key that changes meaning or goes away
makes it /2. The pydantic models are the contract: ``schemas/inventory.schema.json`` is generated
from them (``python -m hostdevd.schemagen``) and the unit tests check the CLI output against it.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .address import PciAddress
from .assignable import GroupVerdict, host_critical_reason
from .ledger import Ledger
from .sysfs_inventory import DeviceFacts
from .topology import Topology

INVENTORY_SCHEMA: Literal["hostdevd-inventory/1"] = "hostdevd-inventory/1"
_BDF = r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$"
_HEX4 = r"^[0-9a-f]{4}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PcieLinkModel(_Strict):
    """The sysfs link attributes; speeds in GT/s (null: "Unknown"), widths in lanes (0: link down)."""
    current_speed_gts: float | None
    current_width: int | None
    max_speed_gts: float | None
    max_width: int | None


class RefusalModel(_Strict):
    device: str
    reason: str
    hint: str
    code: str = Field(default="REFUSED", description="Why, as a stable identifier (errors.REFUSAL_CODES).")


class InventoryDevice(_Strict):
    # --- hostdevd-topology/1 (Device.to_json), unchanged ---
    address: str = Field(pattern=_BDF)
    class_: str = Field(alias="class", pattern=r"^[0-9a-f]{4}$", description="Class and subclass.")
    vendor: str = Field(pattern=_HEX4)
    device: str = Field(pattern=_HEX4)
    bridge: bool
    pci_class: str = Field(pattern=r"^[0-9a-f]{6}$")
    driver: str | None
    driver_override: str | None
    name: str | None = Field(description="The description a listing gave (null from sysfs; see device_name).")
    physfn: str | None = Field(description="The PF of a VF.")
    virtfns: list[str] = Field(description="The VFs of a PF, by index.")
    sriov_totalvfs: int | None
    sriov_numvfs: int | None
    sriov_drivers_autoprobe: bool | None
    boot_vga: bool
    reset_method: list[str] | None = Field(description="sysfs reset_method, in the kernel's order.")
    has_reset: bool
    has_vfio_dev: bool
    net: list[str]
    # --- added by `groups` before the inventory ---
    owner: str | None = Field(description="Who holds the device's group in the ledger (with its claim state).")
    vfio_driver: str | None = Field(default=None, description="The vfio driver hostdevd would bind (live host).")
    vfio_driver_from: str | None = None
    vfio_driver_refused: str | None = None
    # --- hostdevd-inventory/1 ---
    group: int | None = Field(ge=0, description="The IOMMU group; null without one.")
    group_assignable: bool = Field(description="The group can be handed over whole (see the group's refusals).")
    subsystem_vendor: str | None = Field(pattern=_HEX4)
    subsystem_device: str | None = Field(pattern=_HEX4)
    vendor_name: str | None = Field(description="From the host's pci.ids.")
    device_name: str | None = Field(description="From the host's pci.ids.")
    numa_node: int | None = Field(ge=0, description="null: no NUMA affinity (-1) or unknown.")
    pcie_link: PcieLinkModel | None = Field(description="null: not a PCIe function, or unknown.")
    power_state: str | None = Field(description="sysfs power_state: D0, D3hot, D3cold, ...")
    reserved: bool = Field(description="Reserved in the ledger (config `reserve`).")
    host_critical: bool
    host_critical_reason: str | None


class InventoryGroup(_Strict):
    group: int = Field(ge=0)
    devices: list[InventoryDevice]
    assignable: bool = Field(description="Its endpoints can go to a domain together; bridges stay with the host.")
    refusals: list[RefusalModel] = Field(description="Why not, as `hostdevctl plan` would say it.")


class UnparsedLine(_Strict):
    line: int
    text: str


class Unparsed(_Strict):
    count: int = Field(ge=0)
    lines: list[UnparsedLine]


class Inventory(_Strict):
    """``hostdevctl groups --json``."""
    model_config = ConfigDict(extra="forbid", title="hostdevd-inventory/1")
    schema_: Literal["hostdevd-inventory/1"] = Field(alias="schema")
    format: Literal["hostdevd-topology/1"]
    source: Literal["sysfs", "snapshot", "listing"]
    iommu_active: bool
    groups: list[InventoryGroup]
    ungrouped: list[InventoryDevice]
    critical: dict[str, str] = Field(description="Host-critical devices the scan found: address -> reason.")
    unparsed: Unparsed | None = Field(default=None, description="--listing: the lines not understood.")


def inventory_json_schema() -> str:
    return json.dumps(Inventory.model_json_schema(), indent=2, sort_keys=True) + "\n"


def _reserved(ledger: Ledger, addr: PciAddress) -> bool:
    claim = ledger.claim_for_device(addr)
    return str(addr) in ledger.reservations or bool(claim and (claim.reserved or claim.owner.kind == "reservation"))


def add_inventory(data: dict, topo: Topology, ledger: Ledger, verdicts: Mapping[int, GroupVerdict],
                  facts: Mapping[PciAddress, DeviceFacts]) -> dict:
    """``data`` (the groups command's dict) with the inventory keys added and ``schema`` first;
    ``facts`` may miss devices (a listing or snapshot has none: their keys are null)."""
    for g in data["groups"]:
        verdict = verdicts.get(g["group"])
        g["assignable"] = bool(verdict and verdict.assignable)
        g["refusals"] = verdict.refusals_json() if verdict else []
    for d in [d for g in data["groups"] for d in g["devices"]] + data["ungrouped"]:
        addr = PciAddress.parse(d["address"])
        dev = topo.require(addr)
        f = facts.get(addr, DeviceFacts())
        sub = dev.subsystem.split(":") if dev.subsystem else [None, None]
        critical = host_critical_reason(topo, addr)
        verdict = verdicts.get(dev.group) if dev.group is not None else None
        d.update({
            "group": dev.group, "group_assignable": bool(verdict and verdict.assignable),
            "subsystem_vendor": sub[0], "subsystem_device": sub[1],
            "vendor_name": f.vendor_name, "device_name": f.device_name, "numa_node": f.numa_node,
            "pcie_link": f.pcie_link.to_json() if f.pcie_link else None, "power_state": f.power_state,
            "reserved": _reserved(ledger, addr), "host_critical": critical is not None,
            "host_critical_reason": critical,
        })
    return {"schema": INVENTORY_SCHEMA, **data}
