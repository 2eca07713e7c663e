"""One error hierarchy with stable codes (firewalld's FirewallError style).

Every error hostdevd shows a person is one line naming what is wrong and,
where there is one, what to do. ``code`` is stable and travels over the
socket API; ``exit_status`` is the hostdevctl exit code.

Every exception class of the daemon lives here, with one exception: the
socket client's errors (``WireError``, ``DaemonNotRunning``, ``DaemonTimeout``,
``BadReply``) stay in :mod:`hostdevd.doors.wire`, because the libvirt hook
(:mod:`hostdevd.doors.hook`) may import only the standard library and
``wire`` (``tests/unit/test_hook.py`` checks the exact module list).
"""
from __future__ import annotations


class HostdevError(Exception):
    code = "ERROR"
    exit_status = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}: {self.hint}" if self.hint else self.message

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "hint": self.hint}


class UsageError(HostdevError):
    code = "USAGE"
    exit_status = 2


class InvalidAddress(UsageError):
    code = "INVALID_ADDRESS"


class InvalidXML(UsageError):
    code = "INVALID_XML"


class ConfigError(UsageError):
    code = "CONFIG"


class InsecureFile(ConfigError):
    """A config or state file others than root could change (core/strictmodes.py)."""
    code = "INSECURE_FILE"


class ListingError(UsageError):
    code = "INVALID_LISTING"


class UnknownDevice(HostdevError):
    code = "UNKNOWN_DEVICE"


class SysfsError(HostdevError):
    """A sysfs read or write failed; ``path`` names the file."""
    code = "SYSFS"

    def __init__(self, message: str, hint: str | None = None, path: str | None = None):
        super().__init__(message, hint)
        self.path = path


class SysfsTimeout(SysfsError):
    code = "SYSFS_TIMEOUT"


class Refused(HostdevError):
    """The planner refused; ``refusals`` carries the per-device reasons."""
    code = "REFUSED"

    def __init__(self, message: str, hint: str | None = None, refusals: list | None = None,
                 holders: list[dict] | None = None, codes: list[str] | None = None):
        super().__init__(message, hint)
        self.refusals = refusals or []
        # The refusals' reason codes (core/plan.py REFUSAL_CODES): bounded, for metrics.
        self.codes = codes or []
        # Who holds the groups refused for ownership: [{"group": N, "owner": {...}}] (R3).
        self.holders = holders or []


class ExecutionFailed(HostdevError):
    code = "EXECUTION_FAILED"


class LedgerError(HostdevError):
    code = "LEDGER"


class LedgerDamaged(LedgerError):
    """The ledger file is truncated or garbage (not JSON, not the model): the daemon's start
    falls back to the previous generation (``ledger.json.bak``)."""
    code = "LEDGER_DAMAGED"


class LedgerSaveFailed(LedgerError):
    """The ledger could not be written (ENOSPC, EIO, EROFS, EACCES); ``errno`` is the cause.
    Raised before the sysfs write the save was to record."""
    code = "LEDGER_SAVE"

    def __init__(self, message: str, hint: str | None = None, err: int = 0):
        super().__init__(message, hint)
        self.errno = err


class LedgerReadOnly(LedgerError):
    """The daemon started with no readable ledger generation: it refuses every change."""
    code = "LEDGER_READ_ONLY"


class NotFound(HostdevError):
    code = "NOT_FOUND"


class SriovTimeout(ExecutionFailed):
    code = "SRIOV_TIMEOUT"


class NetlinkError(HostdevError):
    """A netlink request failed; ``errno`` is the kernel's answer."""
    code = "NETLINK"

    def __init__(self, message: str, hint: str | None = None, err: int = 0):
        super().__init__(message, hint)
        self.errno = err


# --------------------------------------------------------------------------- libvirt


class LibvirtFailure(HostdevError):
    """libvirt refused or failed a call (attach, detach, lookup)."""
    code = "LIBVIRT"


class LibvirtUnavailable(LibvirtFailure):
    """No connection to libvirt right now."""
    code = "LIBVIRT_UNAVAILABLE"


# --------------------------------------------------------------------------- socket API


class BadRequest(UsageError):
    code = "BAD_REQUEST"


class UnknownOp(UsageError):
    code = "UNKNOWN_OP"


class UnsupportedVersion(UsageError):
    code = "UNSUPPORTED_VERSION"


class TooLarge(UsageError):
    code = "TOO_LARGE"


class RequestTimeout(UsageError):
    code = "TIMEOUT"


class PermissionDenied(HostdevError):
    code = "PERMISSION_DENIED"


class Busy(HostdevError):
    code = "BUSY"


class InternalError(HostdevError):
    code = "INTERNAL"


class IllegalTransition(HostdevError):
    """A claim or device was asked to move to a state its current one does not lead to
    (core/states.py has the tables): a hostdevd bug, never an operator's mistake."""
    code = "ILLEGAL_TRANSITION"

    def __init__(self, what: str, old: str, new: str, allowed: list[str] | None = None):
        super().__init__(f"{what}: illegal state change from {old} to {new}",
                         f"from {old} it may go to {', '.join(allowed)}" if allowed else f"{old} is final")
        self.what, self.old, self.new = what, old, new
