"""The ledger: hostdevd's only state.

One JSON file (validated pydantic model, versioned) under the state dir,
replaced atomically (write temp, fsync, rename, fsync dir). Every claim says
who owns an IOMMU group, which devices it moved, and what driver and
driver_override each had before, so nothing is ever forgotten across
crashes, daemon restarts or libvirtd restarts (libvirt itself loses its
"inactive" list on restart; we must not).

Device states: ``host`` (not touched yet) -> ``binding`` (intent recorded,
sysfs writes under way) -> ``vfio`` (on vfio-pci) -> ``restoring`` -> gone.
Claim states: ``claimed`` -> ``active`` -> ``releasing`` -> gone; ``failed``
keeps a claim whose undo did not complete so an operator can see it.
Both are enums (core/states.py) whose tables say which moves are legal: assigning
``state`` on an existing Claim or DeviceRecord (or ``move_to``) raises
IllegalTransition for any other; building a record or loading the file never does.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .address import PciAddress
from .errors import LedgerDamaged, LedgerError, LedgerReadOnly, LedgerSaveFailed
from .logfields import log_action
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
_SAVE_HINTS = {
    errno.ENOSPC: "free space in {dir}",
    errno.EDQUOT: "free space in {dir} (the disk quota is used up)",
    errno.EROFS: "{dir} is on a read-only file system: remount it read-write",
    errno.EACCES: "hostdevd cannot write to {dir}: check its owner and mode (`ls -ld {dir}`)",
    errno.EPERM: "hostdevd cannot write to {dir}: check its owner, mode and attributes (`lsattr -d {dir}`)",
    errno.EIO: "the disk under {dir} reported an I/O error: check `dmesg` and the disk",
}


def _errno_text(e: OSError) -> str:
    """The reason and the errno's name: ``No space left on device (ENOSPC)``."""
    name = errno.errorcode.get(e.errno or 0)
    why = e.strerror or str(e)
    return f"{why} ({name})" if name else why


@dataclass
class LedgerHealth:
    """What the ledger's files say (:meth:`LedgerStore.inspect`, :meth:`LedgerStore.recover`)."""
    path: Path
    ledger: Ledger = field(default_factory=lambda: Ledger())   # the generation in use (empty when none)
    generation: str | None = LEDGER_FILE     # its file name; None when no generation is readable
    damaged: str | None = None               # why ledger.json cannot be used (None: it can)
    unusable_bak: str | None = None          # why ledger.json.bak cannot be used either
    kept: list[str] = field(default_factory=list)   # damaged ledgers kept (ledger.json.damaged-*)
    recovered: bool = False                  # this start went on from ledger.json.bak


def ledger_json_schema() -> str:
    return json.dumps(Ledger.model_json_schema(), indent=2, sort_keys=True) + "\n"


class LedgerStore:
    """Load and atomically replace the ledger file.

    ``transaction()`` holds a process lock and an flock on ``ledger.lock`` so the
    daemon and a hand-run hostdevctl never interleave a read-modify-write.

    Storage faults (README "Storage faults"): a save that fails (ENOSPC, EIO, EROFS, EACCES)
    raises :class:`LedgerSaveFailed` naming the path and the errno and leaves no temp file;
    the executor records every intent before its sysfs write, so nothing unrecorded happens.
    :meth:`recover` (the daemon's start) falls back to ``ledger.json.bak`` when the ledger
    is damaged, keeping the damaged file as ``ledger.json.damaged-TIME``; with no readable
    generation the store is *read-only*: reads see an empty ledger and every change is
    refused (:meth:`refuse_if_read_only`, the one place that refuses).
    """

    def __init__(self, state_dir: str | os.PathLike):
        self.dir = Path(state_dir)
        self.path = self.dir / LEDGER_FILE
        self.bak_path = self.dir / f"{LEDGER_FILE}.bak"
        self._lock = threading.RLock()
        self._depth = 0
        self._lock_fd: int | None = None
        self.saves = 0
        # Set by recover(): what the start found, and why every change is refused (None: it is not).
        self.health: LedgerHealth | None = None
        self.read_only: str | None = None

    # ------------------------------------------------------------------ read
    def _load_file(self, path: Path) -> Ledger:
        """One generation; FileNotFoundError when it does not exist, LedgerDamaged when it is
        truncated or garbage, LedgerError when it cannot be read or is of another version."""
        try:
            raw = path.read_bytes()
        except (FileNotFoundError, PermissionError):
            raise                        # PermissionError: not root (hostdevctl shows the host without owners)
        except OSError as e:
            raise LedgerError(f"cannot read ledger {path}: {e.strerror}") from e
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise LedgerDamaged(
                f"ledger {path} is not valid JSON ({e})",
                "it is truncated or was not written by hostdevd; hostdevd falls back to ledger.json.bak when it "
                "starts (`systemctl restart hostdevd`), `hostdevctl check` says which generation is readable",
            ) from e
        if isinstance(data, dict) and data.get("version") not in (None, LEDGER_VERSION):
            raise LedgerError(f"ledger {path} has version {data.get('version')!r}; this hostdevd reads "
                              f"version {LEDGER_VERSION}", "upgrade hostdevd")
        try:
            return Ledger.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            raise LedgerDamaged(f"ledger {path} is invalid at {'.'.join(map(str, err['loc']))}: {err['msg']}",
                                "restore it from the .bak copy (hostdevd falls back to it when it starts)") from e

    def load(self) -> Ledger:
        if self.read_only is not None:
            return Ledger()        # nothing readable: reads see no claims, every change is refused
        try:
            return self._load_file(self.path)
        except FileNotFoundError:
            return Ledger()

    def inspect(self) -> LedgerHealth:
        """What the files say, changing nothing and taking no lock (`hostdevctl check`, the start).
        PermissionError when the state dir cannot be read (not root)."""
        kept = sorted(n for n in os.listdir(self.dir) if n.startswith(LEDGER_FILE + DAMAGED_INFIX)) \
            if self.dir.is_dir() else []
        health = LedgerHealth(path=self.path, kept=kept)
        try:
            health.ledger = self._load_file(self.path)
            return health
        except FileNotFoundError:
            if not self.bak_path.exists():
                return health              # a fresh install: the empty ledger
            health.damaged = f"{self.path} is missing"
        except LedgerError as e:
            health.damaged = e.message
            if not isinstance(e, LedgerDamaged):
                # Unreadable (EIO) or written by a newer hostdevd: an older generation would be
                # wrong, not a repair.
                health.generation = None
                return health
        try:
            health.ledger = self._load_file(self.bak_path)
            health.generation = self.bak_path.name
        except FileNotFoundError:
            health.generation, health.unusable_bak = None, f"{self.bak_path.name} does not exist"
        except LedgerError as e:
            health.generation, health.unusable_bak = None, e.message
        return health

    def recover(self) -> LedgerHealth:
        """The daemon's start: use the ledger; when it is damaged, go on from the previous
        generation (ledger.json.bak) and keep the damaged file as ledger.json.damaged-TIME;
        when no generation is readable, leave the damaged file where it is and go read-only."""
        with self.locked():
            health = self.health = self.inspect()
            self.read_only = None
            if health.damaged is None:
                return health
            if health.generation is not None:
                kept = "-"
                try:
                    if self.path.exists():
                        kept = self._keep_damaged()
                        health.kept.append(kept)
                    # The damaged file is replaced atomically; .bak stays the good generation.
                    self._write(health.ledger, keep_previous=False)
                except (OSError, LedgerError) as e:
                    health.unusable_bak = f"{health.generation} could not be written back: {e}"
                    health.generation = None
                else:
                    health.recovered = True
                    log_action(log, logging.WARNING, "ledger_recovered",
                               "the ledger is damaged (%s): kept it as %s and went on from the previous generation "
                               "%s (%d claims, saved %s)", health.damaged, kept, self.bak_path,
                               len(health.ledger.claims), health.ledger.updated, action="start", result="recovered")
                    return health
            self.read_only = (f"the ledger {self.path} cannot be used ({health.damaged}) and no earlier generation "
                              f"is readable ({health.unusable_bak or 'not tried'})")
            log_action(log, logging.ERROR, "ledger_read_only", "read-only: %s; new claims are refused, the damaged "
                       "file is left in place", self.read_only, action="start", result="read-only")
            return health

    def _keep_damaged(self) -> str:
        """A second name for the damaged ledger (never deleted): ledger.json.damaged-TIME."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        name, n = f"{LEDGER_FILE}{DAMAGED_INFIX}{stamp}", 1
        while (self.dir / name).exists():
            n += 1
            name = f"{LEDGER_FILE}{DAMAGED_INFIX}{stamp}-{n}"
        try:
            os.link(self.path, self.dir / name)
        except OSError:                     # a file system without hard links
            shutil.copy2(self.path, self.dir / name)
        return name

    def refuse_if_read_only(self) -> None:
        """The one place read-only mode refuses a change: every save and transaction asks here."""
        if self.read_only is not None:
            raise LedgerReadOnly(
                f"hostdevd is read-only and refuses new claims: {self.read_only}",
                f"check `hostdevctl groups` for devices on vfio-pci, repair {self.path} or move it aside, then "
                "`systemctl restart hostdevd` (`hostdevctl check` names the files)")

    def state(self) -> dict[str, Any]:
        """For the daemon's status reply."""
        h = self.health
        return {"path": str(self.path), "read_only": self.read_only,
                "generation": h.generation if h is not None else LEDGER_FILE,
                "damaged": h.damaged if h is not None else None,
                "kept": list(h.kept) if h is not None else []}

    # ------------------------------------------------------------------ write
    def save(self, ledger: Ledger) -> None:
        self.refuse_if_read_only()
        self._write(ledger)

    def _write(self, ledger: Ledger, keep_previous: bool = True) -> None:
        ledger.updated = now()
        data = ledger.model_dump_json(indent=2).encode() + b"\n"
        tmp = self.path.with_name(f".{LEDGER_FILE}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            if keep_previous:
                self._keep_previous()
            os.replace(tmp, self.path)
            dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise self._save_failed(e) from e
        self.saves += 1

    def _keep_previous(self) -> None:
        """One previous generation, for recover() and an operator: ledger.json.bak. A hard link,
        so ledger.json exists at every moment (a rename would leave a window without it)."""
        if not self.path.exists():
            return
        link = self.path.with_name(f".{LEDGER_FILE}.bak.{os.getpid()}.{threading.get_ident()}.tmp")
        with contextlib.suppress(OSError):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(link)
            os.link(self.path, link)
            os.replace(link, self.bak_path)
        with contextlib.suppress(OSError):
            os.unlink(link)

    def _save_failed(self, e: OSError) -> LedgerSaveFailed:
        hint = _SAVE_HINTS.get(e.errno or 0, "check {dir} and `dmesg`").format(dir=self.dir)
        return LedgerSaveFailed(f"cannot save the ledger {self.path}: {_errno_text(e)}", hint, err=e.errno or 0)

    # ------------------------------------------------------------------ lock
    def _open_lock(self) -> int | None:
        lock = self.dir / "ledger.lock"
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            return os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            if e.errno != errno.EROFS:
                raise
        # A read-only file system: lock read-only (flock needs no write access) so reads go on;
        # every save fails and says why.
        try:
            return os.open(lock, os.O_RDONLY)
        except OSError:
            return None

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        with self._lock:
            if self._depth == 0:
                self._lock_fd = self._open_lock()
                if self._lock_fd is not None:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and self._lock_fd is not None:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                    os.close(self._lock_fd)
                    self._lock_fd = None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Ledger]:
        """Read-modify-write under the lock; saved only when the block succeeds."""
        self.refuse_if_read_only()
        with self.locked():
            ledger = self.load()
            yield ledger
            self.save(ledger)

    def read(self) -> Ledger:
        with self.locked():
            return self.load()
