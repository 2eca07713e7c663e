"""Per-domain coordination of socket requests and libvirt event handlers.

Every request marks its domain busy and bumps a generation; an event handler snapshots the
generation while the domain is idle, asks libvirt, and acts only if nothing happened to the
domain meanwhile (otherwise it looks again). A stale STOPPED event can so never release the
claims of a domain that was started again.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator


class DomainGate:
    """Per-domain coordination of socket requests and libvirt event handlers.

    Lock order: a domain's gate lock, then the engine's group locks. Never
    call libvirt while holding a gate lock.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active: dict[str, int] = {}
        self._gen: dict[str, int] = {}
        self._locks: dict[str, threading.RLock] = {}
        self._on_idle: dict[str, list[Callable[[], None]]] = {}

    def lock(self, name: str) -> threading.RLock:
        with self._cond:
            return self._locks.setdefault(name, threading.RLock())

    @contextlib.contextmanager
    def request(self, name: str) -> Iterator[None]:
        """Mark ``name`` busy for the whole request (including libvirt calls)."""
        with self._cond:
            self._active[name] = self._active.get(name, 0) + 1
            self._gen[name] = self._gen.get(name, 0) + 1
        try:
            yield
        finally:
            waiters: list[Callable[[], None]] = []
            with self._cond:
                self._active[name] -= 1
                if not self._active[name]:
                    del self._active[name]
                    waiters = self._on_idle.pop(name, [])
                self._gen[name] += 1
                self._cond.notify_all()
            for cb in waiters:          # outside the lock: they only queue work
                cb()

    def busy(self, name: str) -> bool:
        with self._cond:
            return bool(self._active.get(name))

    def generations(self) -> dict[str, int]:
        with self._cond:
            return dict(self._gen)

    def wait_idle(self, name: str, timeout: float) -> int | None:
        """Wait until no request serves ``name``; return its generation (None on timeout)."""
        with self._cond:
            if not self._cond.wait_for(lambda: not self._active.get(name), timeout):
                return None
            return self._gen.get(name, 0)

    def idle_or_later(self, name: str, later: Callable[[], None]) -> int | None:
        """``name``'s generation if no request serves it now; otherwise None, and ``later``
        runs (in the thread that ends the last request) as soon as none does."""
        with self._cond:
            if not self._active.get(name):
                return self._gen.get(name, 0)
            self._on_idle.setdefault(name, []).append(later)
            return None

    @contextlib.contextmanager
    def guard(self, name: str, generation: int) -> Iterator[bool]:
        """Hold ``name``'s lock; yield True when nothing touched it since ``generation``."""
        with self.lock(name):
            with self._cond:
                ok = not self._active.get(name) and self._gen.get(name, 0) == generation
            yield ok
