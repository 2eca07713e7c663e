"""The ledger file: loaded, validated and replaced atomically (temp + fsync + rename + dir
fsync, one previous generation kept as a hard link), flock-serialised between the daemon and a
hand-run hostdevctl; a damaged file falls back to the previous generation or to read-only mode,
and a failed save names the path and errno (issue 12's storage faults). The models it stores
are in :mod:`.ledger`."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .errors import LedgerDamaged, LedgerError, LedgerReadOnly, LedgerSaveFailed
from .ledger import DAMAGED_INFIX, LEDGER_FILE, LEDGER_VERSION, Ledger, now
from .logfields import log_action
from .telemetry import Telemetry

log = logging.getLogger("hostdevd.ledger")


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
        self.durable_saves = 0     # saves whose rename is fsynced too (intents)
        self.fsyncs = 0            # fsync calls: data on every save, the directory on durable ones
        self._outcome = False      # the save under way records an outcome (transaction(durable=False))
        self._peeked: tuple[tuple, Ledger] | None = None     # peek(): (file identity, its ledger)
        # Set by recover(): what the start found, and why every change is refused (None: it is not).
        self.health: LedgerHealth | None = None
        self.read_only: str | None = None
        # Save durations go here (the engine shares its own, core/telemetry.py).
        self.telemetry = Telemetry()

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
        self._write(ledger, durable=not self._outcome)

    def _write(self, ledger: Ledger, keep_previous: bool = True, durable: bool = True) -> None:
        """Replace the file atomically (temp file, fsync of its data, rename). ``durable``: the
        directory is fsynced too before returning (every intent: what a crash must find, rename
        included). An *outcome* (a bind or restore that finished, a claim activated or dropped)
        skips that directory fsync (issue 13): its data is fsynced before the rename, so a power
        cut can at worst lose the rename (the previous, complete generation is what the next
        boot reads: never a truncated file, never a fall-back to ``.bak``), and the intent saved
        durably before it is all recovery needs (claims of an earlier boot are released by
        reading sysfs before any write, README "Reboots"); a crash of hostdevd alone keeps it
        (the page cache survives the process). The next durable save covers it too. The
        executor writes ahead (a request's whole intent in one save, its outcome in one more):
        a cycle (prepare and release) fsyncs 6 times: 2 intents x 2, 2 outcomes x 1 (16 before
        issue 13)."""
        ledger.updated = now()
        t0 = time.monotonic()
        data = ledger.model_dump_json(indent=2).encode() + b"\n"
        tmp = self.path.with_name(f".{LEDGER_FILE}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)                # always: a power cut never leaves a truncated file
                self.fsyncs += 1
            finally:
                os.close(fd)
            if keep_previous:
                self._keep_previous()
            os.replace(tmp, self.path)
            if durable:
                dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(dfd)
                    self.fsyncs += 1
                finally:
                    os.close(dfd)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            self.telemetry.ledger_saved(time.monotonic() - t0, ok=False)
            raise self._save_failed(e) from e
        self.saves += 1
        self.durable_saves += durable
        self.telemetry.ledger_saved(time.monotonic() - t0, ok=True)

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
    def transaction(self, durable: bool = True) -> Iterator[Ledger]:
        """Read-modify-write under the lock; saved only when the block succeeds. ``durable=False``
        for outcomes only (see :meth:`_write`)."""
        self.refuse_if_read_only()
        with self.locked():
            ledger = self.load()
            yield ledger
            outer, self._outcome = self._outcome, not durable
            try:
                self.save(ledger)
            finally:
                self._outcome = outer

    def read(self) -> Ledger:
        with self.locked():
            return self.load()

    def peek(self) -> Ledger:
        """The ledger as on disk, parsed once per version of the file and *shared*: for callers
        that only look (the planner, reconciliation's checks), never change it; changes go through
        :meth:`transaction`. Parsing and validating grows with the claims (~50 ms for 1,000), and a
        request or a reconciliation pass would otherwise pay it again and again (issue 13). Every
        save replaces the file (a new inode), so a changed ledger is never mistaken for the
        cached one."""
        with self.locked():
            try:
                st = os.stat(self.path)
            except OSError:
                return self.load()
            key = (st.st_ino, st.st_size, st.st_mtime_ns, self.read_only)
            cached = self._peeked
            if cached is None or cached[0] != key:
                cached = self._peeked = (key, self.load())
            return cached[1]
