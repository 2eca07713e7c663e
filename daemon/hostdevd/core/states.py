"""Claim and device states, and which moves between them are legal (as Nova's PciDevice does).

The ledger stores the enum values (``"active"``, ``"vfio"``, ...), so the file format is the
one of the plain strings before; a StrEnum compares equal to its value, so
``claim.state == "active"`` keeps working. Each table maps a state to the states it may
move to; staying in the same state is always allowed (a retried step writes it again).
Creating a record or loading the ledger file is never checked: any state may be read back,
whatever a crash left.
"""
from __future__ import annotations

from enum import StrEnum

from .errors import IllegalTransition


class _State(StrEnum):
    # repr() as the plain value: log lines and messages that print a list or set of states
    # (``sorted(states)``) read exactly as when the states were strings.
    def __repr__(self) -> str:
        return repr(self.value)


class ClaimState(_State):
    """Where a claim on one IOMMU group stands."""

    CLAIMED = "claimed"
    """The group is recorded for its owner; its devices are being moved to vfio-pci (or a crash
    interrupted that). Nothing is guaranteed on the host yet."""
    ACTIVE = "active"
    """Every device of the group is on vfio-pci (or was left on it) and the owner may use it."""
    RELEASING = "releasing"
    """The group is being given back: devices return to their recorded drivers, host actions are undone."""
    FAILED = "failed"
    """An undo (rollback or release) did not complete; the claim is kept, with notes, for an operator."""


class DeviceState(_State):
    """Where one device of a claim stands on the host."""

    HOST = "host"
    """On its host driver (or none), as before the claim: not touched yet, or given back."""
    BINDING = "binding"
    """Intent recorded: driver_override/unbind/probe writes towards vfio-pci are under way."""
    VFIO = "vfio"
    """Bound to vfio-pci (by hostdevd, or already there)."""
    RESTORING = "restoring"
    """On its way back to the recorded driver and driver_override."""


# The three below only name their values: any move between them is allowed.
class VfNetState(StrEnum):
    """What hostdevd did with a VF's network settings (see VfNetConfig)."""

    SAVED = "saved"
    SET = "set"
    LIBVIRT = "libvirt"


class SriovState(StrEnum):
    """Where creating VFs on a PF stands (see SriovRecord)."""

    CHANGING = "changing"
    READY = "ready"
    FAILED = "failed"


class HostActionState(StrEnum):
    """Whether a host action's command is known to have completed (see HostActionRecord)."""

    PENDING = "pending"
    DONE = "done"


_C = ClaimState
CLAIM_TRANSITIONS: dict[ClaimState, frozenset[ClaimState]] = {
    _C.CLAIMED: frozenset({
        _C.ACTIVE,      # executor.prepare: every step done ("activate"); executor.complete_prepare
                        # (reconcile): an interrupted prepare of a running domain; executor._to_reservation:
                        # a borrow rolled back, or a half-prepared borrow released
        _C.RELEASING,   # executor._release_group: reconcile rolls back a half prepare
        _C.FAILED,      # executor._rollback incomplete (meant to; see test_states' xfail);
                        # executor.forget_vanished: every device gone, host actions not undone
    }),
    _C.ACTIVE: frozenset({
        _C.CLAIMED,     # executor._claim: a domain borrows a reserved group (the reservation's active claim)
        _C.RELEASING,   # executor._release_group
        _C.FAILED,      # executor.forget_vanished: every device gone, host actions not undone;
                        # executor._rollback incomplete after a borrow was given back (_to_reservation)
    }),
    _C.RELEASING: frozenset({
        _C.FAILED,      # executor._release_group: /dev/vfio/N still open, or a restore/undo failed
    }),
    _C.FAILED: frozenset({
        _C.RELEASING,   # executor._release_group: a failed claim released again
        _C.ACTIVE,      # executor._to_reservation: a failed borrowed claim released back to its reservation
    }),
}

_D = DeviceState
DEVICE_TRANSITIONS: dict[DeviceState, frozenset[DeviceState]] = {
    _D.HOST: frozenset({
        _D.BINDING,     # executor._bind_step: intent recorded before the sysfs writes
        _D.VFIO,        # executor._bind_step: already on vfio-pci; executor.complete_prepare (reconcile)
    }),
    _D.BINDING: frozenset({
        _D.VFIO,        # executor._bind_step: bound; executor.complete_prepare (reconcile)
        _D.RESTORING,   # executor._restore: rollback of a failed bind, or release after a crash mid-bind
    }),
    _D.VFIO: frozenset({
        _D.RESTORING,   # executor._restore: release, rollback
        _D.BINDING,     # executor._bind_step: a prepare converging on the kernel found the device
                        # off vfio-pci (a reboot, someone else's unbind) and binds it again
    }),
    _D.RESTORING: frozenset({
        _D.HOST,        # executor._restore: back on the recorded driver
        _D.VFIO,        # executor.complete_prepare (reconcile): a prepare whose rollback had begun; the device is
                        # still on vfio-pci and the running domain uses it
    }),
}

TRANSITIONS: dict[type[StrEnum], dict] = {ClaimState: CLAIM_TRANSITIONS, DeviceState: DEVICE_TRANSITIONS}


def allowed(kind: type[ClaimState] | type[DeviceState], old: str, new: str) -> bool:
    """Whether ``old`` -> ``new`` is legal for ``kind`` (the same state always is)."""
    o, n = kind(old), kind(new)
    return o == n or n in TRANSITIONS[kind][o]


def check_transition(kind: type[ClaimState] | type[DeviceState], old: str, new: str, what: str) -> None:
    """Raise IllegalTransition unless ``what`` (e.g. "claim of group 12", "device 0000:01:00.0")
    may go from ``old`` to ``new``. Both must be values of ``kind`` (ValueError otherwise)."""
    if not allowed(kind, old, new):
        raise IllegalTransition(what, str(kind(old)), str(kind(new)),
                                sorted(str(s) for s in TRANSITIONS[kind][kind(old)]))
