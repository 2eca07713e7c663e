"""The udev door (R10): a pyudev netlink monitor for subsystem ``pci``, read in its own thread.

Each uevent becomes a :class:`~hostdevd.core.pci_events.PciEvent` handed to a sink; the
handler in :mod:`hostdevd.core.pci_events` decides. It reads nothing from /sys (pyudev builds
the device from the uevent; only ``DRIVER``, ``PCI_SLOT_NAME`` and the device path are used).
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from ..core.pci_events import PciEvent

log = logging.getLogger("hostdevd.udev")


class UdevWatch:
    """pyudev netlink monitor for subsystem pci, read in a daemon thread."""

    def __init__(self, monitor_factory: Callable[[], Any] | None = None, poll_timeout: float = 1.0):
        self._factory = monitor_factory or self._pyudev_monitor
        self.poll_timeout = poll_timeout
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.error: str | None = None
        self.received = 0

    @staticmethod
    def _pyudev_monitor() -> Any:
        import pyudev

        monitor = pyudev.Monitor.from_netlink(pyudev.Context())
        monitor.filter_by("pci")
        return monitor

    def start(self, sink: Callable[[PciEvent], None]) -> bool:
        """Open the monitor and start reading; False (and ``error`` set) when udev is unavailable."""
        try:
            monitor = self._factory()
            monitor.start()
        except Exception as e:  # no pyudev, no libudev, no netlink permission: run without udev
            self.error = f"{type(e).__name__}: {e}"
            log.warning("not watching udev (%s): devices changed behind hostdevd's back are noticed only by "
                        "reconciliation and `hostdevctl check`", self.error)
            return False
        self._thread = threading.Thread(target=self._run, args=(monitor, sink), name="udev-monitor", daemon=True)
        self._thread.start()
        log.info("watching udev for PCI add/remove/bind/unbind")
        return True

    def _run(self, monitor: Any, sink: Callable[[PciEvent], None]) -> None:
        while not self._stopping.is_set():
            try:
                device = monitor.poll(timeout=self.poll_timeout)
            except Exception as e:
                if self._stopping.is_set():
                    return
                self.error = f"{type(e).__name__}: {e}"
                log.exception("reading udev events failed")
                self._stopping.wait(1.0)
                continue
            if device is None:
                continue
            ev = PciEvent.from_udev(device)
            if ev is None:
                continue
            self.received += 1
            try:
                sink(ev)
            except Exception:
                log.exception("PCI event sink failed on %s", ev)

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(self.poll_timeout + 2)

    @property
    def watching(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def healthy(self) -> bool:
        """False only when the reader thread died after a successful start."""
        return self._thread is None or self._thread.is_alive() or self._stopping.is_set()
