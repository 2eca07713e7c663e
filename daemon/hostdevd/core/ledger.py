"""The ledger: hostdevd's only state.

One JSON file (validated pydantic model, versioned) under the state dir,
replaced atomically (write temp, fsync, rename, fsync dir). Every claim says
who owns an IOMMU group, which devices it moved, and what driver and
driver_override each had before, so nothing is ever forgotten across
crashes, daemon restarts or libvirtd restarts (libvirt itself loses its
"inactive" list on restart; we must not).

Device states: ``host`` (not touched yet) -> ``binding`` (intent recorded,
sysfs writes under way or still to come: a fresh claim records every device
it will bind as ``binding`` in its one save) -> ``vfio`` (on vfio-pci) ->
``restoring`` -> gone.
Claim states: ``claimed`` -> ``active`` -> ``releasing`` -> gone; ``failed``
keeps a claim whose undo did not complete so an operator can see it.
Both are enums (core/states.py) whose tables say which moves are legal: assigning
``state`` on an existing Claim or DeviceRecord (or ``move_to``) raises
IllegalTransition for any other; building a record or loading the file never does.
"""
from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .address import PciAddress
from .errors import LedgerError
from .states import ClaimState, DeviceState, HostActionState, SriovState, VfNetState, check_transition

LEDGER_VERSION: Literal[1] = 1
LEDGER_FILE = "ledger.json"
DAMAGED_INFIX = ".damaged-"     # ledger.json.damaged-20250101T120000Z: a damaged ledger kept for the operator

log = logging.getLogger("hostdevd.ledger")


RESERVATION = {"name": "reserved", "kind": "reservation"}


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class _Guarded(_Model):
    """A model whose ``state`` may only move along core/states.py's table once it exists.

    Checked in ``__setattr__``, before pydantic's assignment validation: construction and
    ``model_validate`` (loading the file) set fields without it, so any stored state loads.
    A value that is no state at all is left to pydantic, which refuses it as before.
    """
    _state_kind: ClassVar[type[ClaimState] | type[DeviceState]]

    def _what(self) -> str:
        raise NotImplementedError

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "state":
            try:
                new = self._state_kind(value)
            except (ValueError, TypeError):
                pass
            else:
                check_transition(self._state_kind, self.__dict__["state"], new, self._what())
        super().__setattr__(name, value)


class Owner(_Model):
    name: str = Field(min_length=1, max_length=256)
    uuid: str | None = Field(default=None, max_length=64)
    kind: Literal["domain", "manual", "reservation"] = "domain"

    def same(self, other: Owner) -> bool:
        if self.uuid and other.uuid:
            return self.uuid == other.uuid
        return self.name == other.name and self.kind == other.kind

    def label(self) -> str:
        return f"{self.name} ({self.uuid})" if self.uuid else self.name


class VfNetConfig(_Model):
    """A VF's network settings as its PF reports them (netlink IFLA_VF_*), saved before assignment.

    ``mac`` .. ``trust`` are the values to restore on release. ``state``: ``saved`` (read, nothing
    changed yet), ``set`` (hostdevd wrote ``requested_*``; restore them on release), ``libvirt``
    (libvirt sets MAC/VLAN itself, managed='yes': hostdevd records ``requested_*`` and verifies,
    never writes). ``notes`` say what could not be done (a driver refusing the all-zero MAC).
    """
    pf_netdev: str
    vf_index: int = Field(ge=0)
    mac: str | None = None
    vlan: int | None = None
    qos: int | None = None
    spoofchk: bool | None = None
    trust: bool | None = None
    state: VfNetState = VfNetState.SAVED
    requested_mac: str | None = None
    requested_vlan: int | None = None
    notes: list[str] = Field(default_factory=list)


class SriovRecord(_Model):
    """VFs hostdevd created on one PF (config ``[[sriov]]`` or ``hostdevctl vfs set``).

    ``changing`` is written before the first sysfs write (intent); ``ready`` once every VF
    appeared; ``failed`` keeps what went wrong.
    """
    pf: str
    numvfs: int = Field(ge=0)
    autoprobe: bool
    state: SriovState = SriovState.CHANGING
    previous_numvfs: int | None = None
    vfs: list[str] = Field(default_factory=list)
    seconds: float | None = Field(default=None, description="Time to create the VFs and see them in udev.")
    updated: str = Field(default_factory=now)
    note: str | None = None


class DeviceRecord(_Guarded):
    _state_kind = DeviceState
    address: str
    role: Literal["requested", "companion"]
    state: DeviceState = DeviceState.HOST
    original_driver: str | None
    original_override: str | None
    # False when the device was already on vfio-pci before we came: we leave it there.
    bound_by_us: bool = False
    vf_netconfig: VfNetConfig | None = None
    # Who the device was when claimed ("10de:1b80", subsystem "1458:3702"): after a reboot the
    # same address may hold another card; such a device is reported and never touched.
    vendor_device: str | None = None
    subsystem: str | None = None
    # The vfio variant driver the device is on for this claim ("mlx5_vfio_pci", R13); None means
    # vfio-pci, which is what every ledger written before variants meant.
    vfio_driver: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$")

    @field_validator("address")
    @classmethod
    def _addr(cls, v: str) -> str:
        return str(PciAddress.parse(v))

    @property
    def pci(self) -> PciAddress:
        return PciAddress.parse(self.address)

    def _what(self) -> str:
        return f"device {self.address}"

    def move_to(self, new: DeviceState | str) -> None:
        """Set ``state``, raising IllegalTransition unless the table allows the move
        (ValueError for a value that is no DeviceState)."""
        self.state = DeviceState(new)


class HostActionRecord(_Model):
    """A host action done for a claim (config ``host_actions``), undone at release.

    ``pending``: intent recorded, the command may or may not have run (a crash in
    between); release undoes it anyway (starting a running unit, loading a loaded
    module are harmless). ``done``: the unit was stopped / the module unloaded.
    """
    kind: Literal["unit", "module"]
    name: str = Field(min_length=1, max_length=256)
    state: HostActionState = HostActionState.PENDING
    timeout: float = Field(default=30.0, gt=0, le=600)


class Claim(_Guarded):
    _state_kind = ClaimState
    group: int = Field(ge=0)
    owner: Owner
    state: ClaimState = ClaimState.CLAIMED
    devices: list[DeviceRecord]
    created: str = Field(default_factory=now)
    updated: str = Field(default_factory=now)
    notes: list[str] = Field(default_factory=list)
    # The group is reserved (config `reserve`): a domain borrows it and gives it back to
    # the reservation on release; it never returns to host drivers while reserved.
    reserved: bool = False
    # Units stopped and modules unloaded for this group (config host_actions), in the order done.
    host_actions: list[HostActionRecord] = Field(default_factory=list)
    # The kernel boot (/proc/sys/kernel/random/boot_id) the claim was made or last checked in:
    # a claim from another boot describes devices the reboot already gave back (R-boot).
    boot_id: str | None = None

    def device(self, addr: PciAddress | str) -> DeviceRecord | None:
        key = str(PciAddress.parse(addr) if isinstance(addr, str) else addr)
        return next((d for d in self.devices if d.address == key), None)

    @property
    def requested(self) -> list[str]:
        return [d.address for d in self.devices if d.role == "requested"]

    @property
    def requested_pci(self) -> list[PciAddress]:
        """:attr:`requested` as addresses, to meet a plan or a domain's devices."""
        return [d.pci for d in self.devices if d.role == "requested"]

    def _what(self) -> str:
        return f"claim of group {self.group}"

    def move_to(self, new: ClaimState | str) -> None:
        """Set ``state``, raising IllegalTransition unless the table allows the move
        (ValueError for a value that is no ClaimState)."""
        self.state = ClaimState(new)


class Ledger(_Model):
    version: Literal[1] = LEDGER_VERSION
    claims: dict[str, Claim] = Field(default_factory=dict, description="Keyed by IOMMU group number.")
    reservations: list[str] = Field(default_factory=list, description="Addresses configured as reserved.")
    sriov: dict[str, SriovRecord] = Field(default_factory=dict, description=(
        "VFs created by hostdevd, keyed by PF address."))
    updated: str = Field(default_factory=now)

    def claim_for_group(self, group: int) -> Claim | None:
        return self.claims.get(str(group))

    def held(self, group: int) -> Claim:
        """The claim of ``group`` where the caller knows there is one (it made it, under the
        group's lock): LedgerError naming the group when it is missing."""
        claim = self.claims.get(str(group))
        if claim is None:
            raise LedgerError(f"IOMMU group {group} has no claim in the ledger",
                              "was the ledger changed by hand? see `hostdevctl status`")
        return claim

    def claim_for_device(self, addr: PciAddress | str) -> Claim | None:
        for c in self.claims.values():
            if c.device(addr):
                return c
        return None

    def claims_of(self, owner: Owner) -> list[Claim]:
        return [c for _, c in sorted(self.claims.items(), key=lambda kv: int(kv[0])) if c.owner.same(owner)]

    def put(self, claim: Claim) -> None:
        claim.updated = now()
        self.claims[str(claim.group)] = claim

    def drop(self, group: int) -> None:
        self.claims.pop(str(group), None)


# What to do about a save that failed, by errno (the message names the path and the errno).
def ledger_json_schema() -> str:
    return json.dumps(Ledger.model_json_schema(), indent=2, sort_keys=True) + "\n"
