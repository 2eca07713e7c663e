"""A plan's values: what the planner decides and the executor runs.

:class:`Plan` (ordered :class:`Step` s per :class:`GroupPlan`) or the :class:`Refusal` s that say
why not. Pure data; :mod:`.planner` makes them, re-exporting them for its importers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from .address import PciAddress
from .errors import InternalError, Reason, Refused
from .ledger import Owner
from .netreq import NetRequest


@dataclass
class Refusal:
    """Why one device (or, with ``device`` "-", the whole request) is refused.

    ``reason`` does not repeat the device: it reads as what is said about it ("is a PCI
    bridge; ...") so that ``str()`` gives "0000:05:00.0 is a PCI bridge; ... (hint)".
    A refusal of no single device (``device`` "-") has a whole sentence as its reason.
    """
    device: str
    reason: str
    hint: str
    # Set when another owner holds the device's IOMMU group (R3): who, for the reply's "holders".
    group: int | None = None
    holder: Owner | None = None
    # Why, as one stable code (errors.REFUSAL_CODES): in --json and the socket's replies, and what
    # metrics count refusals by (hostdevd_refusals_total{reason=...}).
    code: str = Reason.REFUSED

    def to_json(self) -> dict:
        return {"device": self.device, "reason": self.reason, "hint": self.hint, "code": self.code}

    @property
    def text(self) -> str:
        """The reason with its device, without the hint."""
        return self.reason if self.device in ("", "-") else f"{self.device} {self.reason}"

    def __str__(self) -> str:
        return f"{self.text} ({self.hint})"


@dataclass(frozen=True)
class Caution:
    """A warning with a stable code (errors.WARNING_CODES) that does not refuse: the pre-flight
    checks' D3cold, no reset method, NUMA mismatch, ... ``message`` reads like a refusal's reason
    (it does not repeat the device); its text also goes into the plan's ``warnings``."""
    code: str
    device: str
    message: str
    hint: str = ""

    def to_json(self) -> dict:
        return {"code": self.code, "device": self.device, "message": self.message, "hint": self.hint}

    def __str__(self) -> str:
        text = self.message if self.device in ("", "-") else f"{self.device} {self.message}"
        return f"{text} ({self.hint})" if self.hint else text


StepAction = Literal["claim", "bind", "keep", "skip", "reset", "activate", "restore", "drop", "update",
                     "stop_unit", "unload_module", "load_module", "start_unit",
                     "save_net", "set_net", "restore_net"]
HOST_ACTIONS = ("stop_unit", "unload_module", "load_module", "start_unit")


@dataclass
class Step:
    action: StepAction
    group: int
    address: PciAddress | None = None
    detail: str = ""
    name: str | None = None          # host actions: the unit or module
    timeout: float | None = None     # host actions: seconds for the command
    driver: str | None = None        # bind: the vfio driver (vfio-pci or a variant, R13)

    @property
    def pci(self) -> PciAddress:
        """The device of a device step (bind, reset, keep, restore, save_net, ...); a step
        that names none here is a hostdevd bug."""
        if self.address is None:
            raise InternalError(f"{self.action} step of group {self.group} names no device")
        return self.address

    @property
    def target(self) -> str:
        """The unit or module of a host action step (stop_unit, load_module, ...)."""
        if self.name is None:
            raise InternalError(f"{self.action} step of group {self.group} names no unit or module")
        return self.name

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"action": self.action, "group": self.group,
                             "address": str(self.address) if self.address is not None else None,
                             "detail": self.detail}
        if self.name is not None:
            d["name"] = self.name
            d["timeout"] = self.timeout
        if self.driver is not None:
            d["driver"] = self.driver
        return d

    def __str__(self) -> str:
        target = self.address or self.name or f"group {self.group}"
        return f"{self.action:<8} {target}" + (f"  {self.detail}" if self.detail else "")


@dataclass
class GroupPlan:
    group: int
    requested: list[PciAddress] = field(default_factory=list)
    bind: list[PciAddress] = field(default_factory=list)        # every endpoint that must sit on vfio-pci
    companions: list[PciAddress] = field(default_factory=list)  # bound only because they share the group
    skip: list[PciAddress] = field(default_factory=list)        # bridges, never bound
    keep: list[PciAddress] = field(default_factory=list)        # already on vfio-pci/pci-stub: left as they are
    already_held: bool = False                                  # this owner holds the group already
    takeover: bool = False                                      # a domain borrows a reserved group

    def to_json(self) -> dict:
        return {"group": self.group, "requested": _strs(self.requested), "bind": _strs(self.bind),
                "companions": _strs(self.companions), "skip": _strs(self.skip), "keep": _strs(self.keep),
                "already_held": self.already_held, "takeover": self.takeover}


def _strs(addresses: list[PciAddress]) -> list[str]:
    return [str(a) for a in addresses]


@dataclass
class Plan:
    action: Literal["prepare", "release"]
    owner: Owner
    groups: list[GroupPlan] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # Release only: groups whose claim merely shrinks (other requested devices still held).
    keep_claims: dict[int, list[PciAddress]] = field(default_factory=dict)
    # Release only: reserved groups that go back to the reservation, staying on vfio-pci.
    to_reservation: list[int] = field(default_factory=list)
    # Prepare only: VF network settings requested per address (<interface type='hostdev'>).
    net: dict[PciAddress, NetRequest] = field(default_factory=dict)
    # Prepare only, live host: the pre-flight checks' coded warnings, and each device's NUMA node.
    cautions: list[Caution] = field(default_factory=list)
    numa: dict[PciAddress, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.refusals

    def group(self, n: int) -> GroupPlan | None:
        return next((g for g in self.groups if g.group == n), None)

    def refusal_message(self) -> str:
        return "; ".join(str(r) for r in self.refusals)

    def refused(self) -> Refused:
        """The exception for a refused plan: the per-device reasons and, where another owner
        holds a group, the holders (decided here, once)."""
        return refused(self.refusals)

    def to_json(self) -> dict:
        d = {"ok": self.ok, "action": self.action, "owner": self.owner.model_dump(),
             "groups": [g.to_json() for g in self.groups],
             "steps": [s.to_json() for s in self.steps],
             "warnings": self.warnings}
        if self.refusals:
            d["refusals"] = [r.to_json() for r in self.refusals]
        if self.cautions:
            d["cautions"] = [c.to_json() for c in self.cautions]
        if self.numa:
            d["numa"] = {str(a): n for a, n in sorted(self.numa.items())}
        return d


def held_refusal(device: str, group: int, holder: Owner) -> Refusal:
    """R3: the group belongs to someone else. The planner says so, and the executor says the
    same when it loses a race for the claim."""
    held = f"held by {holder.kind} {holder.label()}"
    reason = f"IOMMU group {group} is {held}" if device in ("", "-") else f"is in IOMMU group {group}, {held}"
    return Refusal(device, reason,
                   f"stop {holder.name} or release its devices first (`hostdevctl release --owner {holder.name}`)",
                   group=group, holder=holder, code=Reason.GROUP_HELD)


def refused(refusals: list[Refusal]) -> Refused:
    holders = {r.group: r.holder for r in refusals if r.holder is not None and r.group is not None}
    return Refused("; ".join(str(r) for r in refusals), refusals=[r.to_json() for r in refusals],
                   holders=[{"group": g, "owner": h.model_dump()} for g, h in sorted(holders.items())])
