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
    """A request was refused; ``refusals`` says why, one ``{"device", "reason", "hint", "code"}``
    per reason, each with exactly one stable reason code (:class:`Reason`, :data:`REFUSAL_CODES`).

    Refused without per-device reasons, the request as a whole is one refusal (``device`` "-",
    the message as its reason) with ``reason`` as its code, so that every refusal on the wire
    and in the metrics has its code."""
    code = "REFUSED"

    def __init__(self, message: str, hint: str | None = None, refusals: list[dict] | None = None,
                 holders: list[dict] | None = None, reason: str | None = None):
        super().__init__(message, hint)
        self.refusals = list(refusals) if refusals else [
            {"device": "-", "reason": message, "hint": hint or "", "code": reason or Reason.REFUSED}]
        # Who holds the groups refused for ownership: [{"group": N, "owner": {...}}] (R3).
        self.holders = holders or []

    @property
    def codes(self) -> list[str]:
        """The refusals' reason codes, one per refusal (metrics count refusals by them)."""
        return [r.get("code") or Reason.REFUSED for r in self.refusals]


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


# --------------------------------------------------------------------------- reason codes

class Reason:
    """The stable codes of why a request was refused (a refusal's ``code``: ``Refusal.code`` and
    every entry of ``Refused.refusals``) or warned about (``Caution.code``). The one list of them:
    they travel in ``--json`` and over the socket, and metrics count refusals by them
    (``hostdevd_refusals_total{reason=...}``, one series per :data:`REFUSAL_CODES`; warnings are
    not counted). A code is its attribute's name; it is only ever added, never renamed or reused
    for another meaning. A refusal no more specific code fits carries ``REFUSED``."""

    # refusals: the planner's rules (core/planner.py, core/plan.py)
    REFUSED = "REFUSED"                          # no more specific code (Refused.code)
    UNKNOWN_DEVICE = "UNKNOWN_DEVICE"            # no such PCI function on the host
    NO_IOMMU = "NO_IOMMU"                        # no IOMMU group (R1)
    BRIDGE = "BRIDGE"                            # a PCI bridge was requested (R2)
    BRIDGES_ONLY = "BRIDGES_ONLY"                # a group of PCI bridges only: nothing to hand over (inventory)
    GROUP_HELD = "GROUP_HELD"                    # another owner holds the group (R3)
    GROUP_BUSY = "GROUP_BUSY"                    # the group is being prepared for the same owner right now
    POLICY_DENY = "POLICY_DENY"                  # policy.deny matches
    POLICY_NOT_ALLOWED = "POLICY_NOT_ALLOWED"    # policy.allow is set and does not match
    HOST_CRITICAL = "HOST_CRITICAL"              # host-critical device or boot VGA (R3)
    SRIOV_PF_COMPANION = "SRIOV_PF_COMPANION"    # a PF with VFs would be bound as a companion
    GROUP_CHANGED = "GROUP_CHANGED"              # the ledger's group differs from the host's now
    VFIO_DRIVER = "VFIO_DRIVER"                  # a vfio driver override that is no vfio driver (R13)
    # refusals: VF networking and SR-IOV
    NET_NOT_VF = "NET_NOT_VF"                    # MAC/VLAN asked of a device that is not a VF
    NET_NO_PF_NETDEV = "NET_NO_PF_NETDEV"        # a VF whose PF has no network interface
    NET_VLAN_TRUNK = "NET_VLAN_TRUNK"            # a VLAN trunk (or several tags) asked of a VF
    NO_FREE_VF = "NO_FREE_VF"                    # a hostdev network's pool has no VF the domain could get
    SRIOV_NUMVFS = "SRIOV_NUMVFS"                # a change of a PF's VF count (sriov_numvfs) refused
    # refusals: hot-plug
    NOT_RUNNING = "NOT_RUNNING"                  # a live attach/detach asked of a domain that is not running
    # refusals: pre-flight (core/preflight.py)
    DEVICE_IN_USE = "DEVICE_IN_USE"              # a process holds the device
    DEVICE_MAYBE_IN_USE = "DEVICE_MAYBE_IN_USE"  # a process holds the nvidia driver's nodes, GPU unknown
    VFIO_IN_USE = "VFIO_IN_USE"                  # an unclaimed group's vfio node is open
    # warnings (the plan goes ahead): pre-flight
    IN_USE_STOPPED_BY_HOST_ACTIONS = "IN_USE_STOPPED_BY_HOST_ACTIONS"  # a holder's unit is in stop_units
    POWER_D3COLD = "POWER_D3COLD"                # power_state D3cold: the bind may fail
    CONFIG_UNREADABLE = "CONFIG_UNREADABLE"      # config space unreadable (or all ones)
    NO_RESET_METHOD = "NO_RESET_METHOD"          # no reset: state can leak between guests
    NUMA_MISMATCH = "NUMA_MISMATCH"              # the guest's vCPUs or memory are on another node
    PROC_SCAN_INCOMPLETE = "PROC_SCAN_INCOMPLETE"  # /proc could not be read whole: holders may be missed


REFUSAL_CODES = (Reason.REFUSED, Reason.UNKNOWN_DEVICE, Reason.NO_IOMMU, Reason.BRIDGE, Reason.BRIDGES_ONLY,
                 Reason.GROUP_HELD, Reason.GROUP_BUSY, Reason.POLICY_DENY, Reason.POLICY_NOT_ALLOWED,
                 Reason.HOST_CRITICAL, Reason.SRIOV_PF_COMPANION, Reason.GROUP_CHANGED, Reason.VFIO_DRIVER,
                 Reason.NET_NOT_VF, Reason.NET_NO_PF_NETDEV, Reason.NET_VLAN_TRUNK, Reason.NO_FREE_VF,
                 Reason.SRIOV_NUMVFS, Reason.NOT_RUNNING,
                 Reason.DEVICE_IN_USE, Reason.DEVICE_MAYBE_IN_USE, Reason.VFIO_IN_USE)
"""Every code a refusal may carry (the label values of ``hostdevd_refusals_total``)."""
WARNING_CODES = (Reason.IN_USE_STOPPED_BY_HOST_ACTIONS, Reason.POWER_D3COLD, Reason.CONFIG_UNREADABLE,
                 Reason.NO_RESET_METHOD, Reason.NUMA_MISMATCH, Reason.PROC_SCAN_INCOMPLETE)
"""Every code a plan caution (a warning that does not refuse) may carry; never a refusal's."""
