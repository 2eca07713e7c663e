"""What the core tells an operator's metrics about the work it does: counts and durations.

The core calls a :class:`Telemetry` (one per :class:`~hostdevd.core.engine.Engine`, shared with
its executor and ledger store); by default it records nothing. A door installs a
:class:`Recorder` (the daemon and hostdevctl: :mod:`hostdevd.doors.metrics`, backed by
prometheus_client), so the core never imports a metrics library.

Every label a recorder gets is bounded: an operation from :data:`OPERATIONS`, a result from
:data:`RESULTS`, an error's stable ``code`` (:mod:`.errors`), a refusal's reason code
(:class:`.errors.Reason`), an API op. Never a message, an address or a domain name.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Protocol

from .errors import HostdevError, Reason, Refused

OPERATIONS = ("prepare", "release", "bind", "unbind", "attach", "detach", "set_vfs", "reconcile")
"""``unbind``: a device given back to its recorded driver (a release's or a rollback's restore)."""
RESULTS = ("ok", "refused", "error")


class Recorder(Protocol):
    """Where the counts go. Called from any thread; must not raise."""

    def operation(self, op: str, result: str, seconds: float, code: str | None) -> None:
        """One operation ended; ``code``: the error's stable code when ``result`` is "error"."""

    def refused(self, op: str, reasons: Iterable[str]) -> None:
        """A request was refused for these reason codes (each counted once)."""

    def ledger_saved(self, seconds: float, ok: bool) -> None: ...

    def request(self, op: str, origin: str, result: str, seconds: float) -> None:
        """One socket request answered (``origin`` "hook": libvirt's hook is waiting on it)."""

    def reconciled(self, timestamp: float) -> None: ...


class NullRecorder:
    """The default: nothing is recorded."""

    def operation(self, op: str, result: str, seconds: float, code: str | None) -> None:
        pass

    def refused(self, op: str, reasons: Iterable[str]) -> None:
        pass

    def ledger_saved(self, seconds: float, ok: bool) -> None:
        pass

    def request(self, op: str, origin: str, result: str, seconds: float) -> None:
        pass

    def reconciled(self, timestamp: float) -> None:
        pass


def refusal_reasons(err: Refused) -> list[str]:
    """The distinct reason codes of a refusal's entries (:data:`.errors.REFUSAL_CODES`), in order."""
    return list(dict.fromkeys(err.codes)) or [Reason.REFUSED]


class Telemetry:
    """The core's handle on the installed :class:`Recorder`; :meth:`install` swaps it (the door does)."""

    def __init__(self, recorder: Recorder | None = None):
        self.recorder: Recorder = recorder or NullRecorder()

    def install(self, recorder: Recorder) -> None:
        self.recorder = recorder

    @contextmanager
    def timed(self, op: str) -> Iterator[None]:
        """Time the block as ``op``: "ok", "refused" (and its reasons) or "error" (with the
        error's code; "INTERNAL" for anything that is no HostdevError). The exception goes on."""
        t0 = time.monotonic()
        try:
            yield
        except Refused as e:
            self.recorder.operation(op, "refused", time.monotonic() - t0, None)
            self._count_refusal(op, e)
            raise
        except HostdevError as e:
            self.recorder.operation(op, "error", time.monotonic() - t0, e.code)
            raise
        except BaseException:
            self.recorder.operation(op, "error", time.monotonic() - t0, "INTERNAL")
            raise
        self.recorder.operation(op, "ok", time.monotonic() - t0, None)

    @contextmanager
    def refusals(self, op: str) -> Iterator[None]:
        """Count a refusal raised in the block (work before an operation's timed part)."""
        try:
            yield
        except Refused as e:
            self._count_refusal(op, e)
            raise

    def _count_refusal(self, op: str, err: Refused) -> None:
        """Once per refusal, under the innermost operation (an attach's refused prepare counts
        as a prepare refusal, not twice)."""
        if not getattr(err, "_counted", False):
            setattr(err, "_counted", True)  # noqa: B010 (an attribute no error class declares)
            self.recorder.refused(op, refusal_reasons(err))

    def ledger_saved(self, seconds: float, ok: bool) -> None:
        self.recorder.ledger_saved(seconds, ok)

    def request(self, op: str, origin: str, result: str, seconds: float) -> None:
        self.recorder.request(op, origin, result, seconds)

    def reconciled(self, timestamp: float | None = None) -> None:
        self.recorder.reconciled(time.time() if timestamp is None else timestamp)
