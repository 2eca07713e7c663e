"""One error hierarchy with stable codes (firewalld's FirewallError style).

Every error hostdevd shows a person is one line naming what is wrong and,
where there is one, what to do. ``code`` is stable and travels over the
socket API; ``exit_status`` is the hostdevctl exit code.
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

    def __init__(self, message: str, hint: str | None = None, refusals: list | None = None):
        super().__init__(message, hint)
        self.refusals = refusals or []


class ExecutionFailed(HostdevError):
    code = "EXECUTION_FAILED"


class LedgerError(HostdevError):
    code = "LEDGER"


class NotFound(HostdevError):
    code = "NOT_FOUND"
