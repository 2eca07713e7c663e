"""The udev door (R10): a pyudev netlink monitor for subsystem ``pci``, read in its own thread.

Each uevent becomes a :class:`~hostdevd.core.pci_events.PciEvent` handed to a sink; the
handler in :mod:`hostdevd.core.pci_events` decides. It reads nothing from /sys (pyudev builds
the device from the uevent; only ``DRIVER``, ``PCI_SLOT_NAME`` and the device path are used).

:class:`UdevWaiter` waits for the ``add`` events of a PF's new VFs (R11), and
:func:`default_waiter` picks it on a real host (sysfs polling,
:class:`hostdevd.core.vf_wait.SysfsPollWaiter`, otherwise).
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from ..core.address import PciAddress
from ..core.errors import SriovTimeout
from ..core.pci_events import PciEvent
from ..core.sysfs import RealHost, Sysfs
from ..core.vf_wait import SysfsPollWaiter, VfWaiter, vfs_present

log = logging.getLogger("hostdevd.udev")
_sriov_log = logging.getLogger("hostdevd.sriov")   # default_waiter's warning kept its logger


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


# --------------------------------------------------------------------------- waiting for new VFs


class UdevWaiter:
    """Waits for udev's ``add`` events of the new VFs (pyudev, subsystem pci): what
    ``udevadm settle`` would wait for, but only for these devices and with a deadline.

    Events come from udev after its rules ran (source ``udev``, not the raw kernel
    uevents), so a VF counts once udev is done with it. Without a running udevd no
    event ever comes: when the deadline passes and sysfs already shows every VF, the
    wait succeeds with a note instead of failing.
    """
    name = "udev"

    def __init__(self, sysfs: Sysfs):
        if "pyudev" not in sys.modules and importlib.util.find_spec("pyudev") is None:
            raise ImportError("pyudev is not installed")
        self.sysfs = sysfs
        self._pyudev: Any = None
        self._context: Any = None

    @property
    def context(self) -> Any:
        """pyudev's context, made on the first wait: hostdevctl's commands that never wait for a
        VF do not import pyudev (issue 13)."""
        if self._context is None:
            import pyudev  # the daemon's extra; imported only when this waiter is used
            self._pyudev = pyudev
            self._context = pyudev.Context()
        return self._context

    @contextlib.contextmanager
    def watch(self, pf: PciAddress) -> Iterator[_UdevWatch]:
        context = self.context
        monitor = self._pyudev.Monitor.from_netlink(context)
        monitor.filter_by(subsystem="pci")
        monitor.start()
        try:
            yield _UdevWatch(self.sysfs, monitor)
        finally:
            with contextlib.suppress(Exception):
                monitor.stop() if hasattr(monitor, "stop") else None


class _UdevWatch:
    def __init__(self, sysfs: Sysfs, monitor):
        self.sysfs = sysfs
        self.monitor = monitor
        self.seen: set[str] = set()

    def wait(self, pf: PciAddress, count: int, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            present = {str(v) for v in vfs_present(self.sysfs, pf)}
            if len(present) >= count and present <= self.seen:
                return []
            left = deadline - time.monotonic()
            if left <= 0:
                if len(present) >= count:
                    missing = sorted(present - self.seen)
                    return [f"udev announced {len(present) - len(missing)} of {count} VFs within {timeout:g} s "
                            f"(is systemd-udevd running?); sysfs shows all of them"]
                raise SriovTimeout(f"{pf}: {len(present)} of {count} VFs appeared within {timeout:g} s",
                                   "raise wait_timeout for this PF; check `dmesg`")
            dev = self.monitor.poll(timeout=min(left, 1.0))
            if dev is not None and dev.action == "add":
                self.seen.add(dev.sys_name)


def default_waiter(sysfs: Sysfs) -> VfWaiter:
    """udev on a real host under /sys; sysfs polling for the simulated kernel or a moved root."""
    if isinstance(sysfs.backend, RealHost) and sysfs.backend.sys_root == "/sys":
        try:
            return UdevWaiter(sysfs)
        except Exception as e:  # pyudev missing or no udev netlink socket: still work, say so
            _sriov_log.warning("udev unavailable (%s): waiting for VFs by polling sysfs", e)
    return SysfsPollWaiter(sysfs)
